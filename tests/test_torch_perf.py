"""opq_torch's fast paths: reused output buffers, the per-call thread rule, the chunked
torch-ops formula; every one gives the bits of the plain kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from opq_core import kernels
from opq_torch import _buffers, ste
from torch_memory import peak_extra_bytes


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


# ---------------------------------------------------------------------------- torch-ops path

def _awkward(seed, shape, grid, bits, dtype):
    w, m, s, th = _case(seed, shape, torch.float64)
    step = 0.6519
    flat = w.reshape(shape[0], -1)
    sd = s * step
    k = torch.arange(shape[0]) % (1 << (bits - 1))
    flat[:, 0] = th + k * sd if grid == "offset" else (k + 0.5) * sd  # exact ties
    w.reshape(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    return w.to(dtype), m, s, th, step


@pytest.mark.parametrize("shape", [(37, 53), (5, 3000), (1, 7001), (4000,), (9, 4, 3, 3)])
@pytest.mark.parametrize("grid", ["offset", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_blocked_torch_formula_equals_the_kernel(shape, grid, dtype, monkeypatch):
    """Many small blocks (rows, and pieces of a row) give the kernel's bits."""
    monkeypatch.setattr(ste, "TORCH_CHUNK", 500)
    monkeypatch.setattr(ste, "TORCH_BLOCKS", 10 ** 6)
    for bits in (1, 3, 8):
        w, m, s, th, step = _awkward(bits, shape, grid, bits, dtype)
        got = ste.fake_quant_torch(w, m, s, th, step, bits, grid)
        want = ste.fake_quant_ste(w, m, s, th, step, bits, grid)  # the CPU kernel
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got, want)
        assert torch.equal(torch.signbit(got), torch.signbit(want))


def test_blocked_codebook_formula_equals_the_kernel(monkeypatch):
    monkeypatch.setattr(ste, "TORCH_CHUNK", 300)
    monkeypatch.setattr(ste, "TORCH_BLOCKS", 10 ** 6)
    rng = np.random.default_rng(3)
    cb = torch.tensor([-1.25, -0.5, 0.25, 0.75, 2.0], dtype=torch.float64)
    w = torch.tensor(rng.laplace(size=(6, 1000)), dtype=torch.float32)
    w[0, :4] = torch.tensor([-0.875, -0.125, 0.5, 1.375])  # the midpoints
    m = torch.from_numpy(rng.random((6, 1000)) < 0.5)
    assert torch.equal(ste.fake_quant_codebook_torch(w, m, cb),
                       ste.fake_quant_codebook_ste(w, m, cb))


def test_torch_formula_peak_memory_is_under_twice_the_weight():
    w, m, s, th = _case(4, (2048, 2048))
    peak, n_events = peak_extra_bytes(lambda: ste.fake_quant_torch(w, m, s, th, 0.5, 4))
    assert n_events > 0  # the profiler saw the allocations
    assert w.nbytes <= peak <= 2 * w.nbytes  # the output, plus small blocks


def test_two_forwards_before_one_backward_keep_their_saved_tensors():
    """A layer used twice in one graph (weight sharing, two micro-batches before one
    backward): the second forward must not write into the first one's output while the
    graph holds it, and the gradient is the sum of both straight-through gradients."""
    _buffers.clear()
    shape = (128, 1024)  # above the pool's size floor: outputs come from the pool
    w, m, s, th = _case(5, shape)
    p = w.clone().requires_grad_(True)
    x1 = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(2))
    x2 = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(3))
    want_w = _kernel(w, m, s, th, 0.5, 4)
    y1 = ste.fake_quant_ste(p, m, s, th, 0.5, 4)
    out1 = x1 @ y1.t()  # autograd saves y1 for the gradient of x1 (and x1 for y1's)
    del y1  # only the graph holds the first output now
    y2 = ste.fake_quant_ste(p, m, s, th, 0.5, 4)
    out2 = x2 @ y2.t()
    del y2
    x1.requires_grad_(False)
    (out1.sum() + 2.0 * out2.sum()).backward()
    g_out = torch.ones(3, shape[0])
    want_grad = torch.where(m, g_out.t() @ x1 + 2.0 * (g_out.t() @ x2), 0.0)
    assert torch.allclose(p.grad, want_grad, rtol=1e-5, atol=1e-5)
    # the values the graph used were the quantized weights, not a later overwrite
    a = torch.randn(3, shape[1], requires_grad=True)
    y3 = ste.fake_quant_ste(p, m, s, th, 0.5, 4)
    out3 = a @ y3.t()
    del y3
    for _ in range(_buffers.PER_KEY + 1):  # more forwards of the same shape meanwhile
        ste.fake_quant_ste(p.detach() * 3.0, m, s, th, 0.5, 4)
    out3.sum().backward()
    assert torch.allclose(a.grad, torch.ones(3, shape[0]) @ want_w, rtol=1e-6, atol=1e-6)
    _buffers.clear()
