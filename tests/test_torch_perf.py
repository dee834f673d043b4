"""opq_torch's fast paths: reused output buffers, the per-call thread rule, the chunked
torch-ops formula; every one gives the bits of the plain kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from opq_core import kernels
from opq_torch import _buffers, ste


def _case(seed, shape, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    c = shape[0]
    s = torch.tensor(np.abs(rng.normal(size=c)) + 0.05)
    th = torch.tensor(np.abs(rng.normal(size=c)) * 0.3)
    w = torch.tensor(rng.laplace(size=shape)).to(dtype)
    m = torch.from_numpy(rng.random(shape) < 0.6)
    return w, m, s, th


def _kernel(w, m, s, th, step, bits, grid="offset"):
    return torch.from_numpy(kernels.fake_quant(w.numpy(), m.numpy(), s.numpy(), th.numpy(),
                                               step, bits, grid))


# ---------------------------------------------------------------------------- buffers

def test_pool_hands_a_buffer_out_again_only_when_no_tensor_uses_it():
    _buffers.clear()
    a = _buffers.take((300, 300), np.float32)
    t = torch.from_numpy(a)
    ptr = a.ctypes.data
    del a
    b = _buffers.take((300, 300), np.float32)  # t still alive: a different buffer
    assert not np.shares_memory(b, t.numpy())
    v = t[1:]  # a view keeps the storage alive
    del t
    c = _buffers.take((300, 300), np.float32)
    assert not np.shares_memory(c, v.numpy())
    del v, b, c
    d = _buffers.take((300, 300), np.float32)  # every tensor gone: the first one again
    assert d.ctypes.data == ptr
    assert _buffers.pooled_bytes() >= 2 * 300 * 300 * 4
    _buffers.clear()
    assert _buffers.pooled_bytes() == 0


def test_pool_skips_small_arrays_and_bounds_each_shape():
    _buffers.clear()
    small = [_buffers.take((10, 10), np.float64) for _ in range(3)]
    assert _buffers.pooled_bytes() == 0 and len({id(x) for x in small}) == 3
    held = [torch.from_numpy(_buffers.take((256, 256), np.float32))
            for _ in range(_buffers.PER_KEY + 2)]
    assert _buffers.pooled_bytes() == _buffers.PER_KEY * 256 * 256 * 4
    assert len({t.data_ptr() for t in held}) == len(held)
    _buffers.clear()


def test_live_outputs_and_grads_are_never_overwritten():
    """Forward outputs saved by autograd, and a parameter's .grad, keep their values while
    later calls of the same shape run."""
    _buffers.clear()
    shape = (64, 1100)
    w1, m, s, th = _case(1, shape)
    w2 = _case(2, shape)[0]
    p1 = w1.clone().requires_grad_(True)
    p2 = w2.clone().requires_grad_(True)
    y1 = ste.fake_quant_ste(p1, m, s, th, 0.5, 4)
    y1_copy = y1.detach().clone()
    y2 = ste.fake_quant_ste(p2, m, s, th, 0.5, 4)
    assert torch.equal(y1, y1_copy)
    assert torch.equal(y1.detach(), _kernel(w1, m, s, th, 0.5, 4))
    assert torch.equal(y2.detach(), _kernel(w2, m, s, th, 0.5, 4))
    g1 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g2 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (y1 * g1).sum().backward()
    grad1 = p1.grad.clone()
    (y2 * g2).sum().backward()
    assert torch.equal(p1.grad, grad1)
    assert torch.equal(p1.grad, torch.where(m, g1, 0.0))
    assert torch.equal(p2.grad, torch.where(m, g2, 0.0))
    # a second step accumulates into the held .grad
    ste.fake_quant_ste(p1, m, s, th, 0.5, 4).mul(g2).sum().backward()
    assert torch.equal(p1.grad, torch.where(m, g1, 0.0) + torch.where(m, g2, 0.0))
    # steps with the outputs freed in between give the same bits every time
    outs = [ste.fake_quant_ste(w1, m, s, th, 0.5, 4).clone() for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    _buffers.clear()


# ---------------------------------------------------------------------------- threads

def test_kernel_threads_rule(monkeypatch):
    import numba
    monkeypatch.setattr(ste, "KERNEL_THREADS", None)
    cap = min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())
    per = ste.ELEMENTS_PER_THREAD
    assert ste.kernel_threads(0) == 1
    assert ste.kernel_threads(per - 1) == 1
    assert ste.kernel_threads(2 * per) == min(2, cap)
    assert ste.kernel_threads(1000 * per) == cap
    counts = [ste.kernel_threads(n) for n in range(0, 40 * per, per // 2)]
    assert counts == sorted(counts)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ste.kernel_threads(1000 * per) == 1
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(ste, "KERNEL_THREADS", 3)
    assert ste.kernel_threads(10) == 3
