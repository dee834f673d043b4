"""opq_torch on CUDA: the torch-ops quantizer equals the CPU kernel bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import opq_torch
from opq_torch import ste

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _case(seed, shape, grid, bits, dtype):
    rng = np.random.default_rng(seed)
    c = shape[0]
    s = torch.tensor(np.abs(rng.normal(size=c)) + 0.05)
    th = torch.tensor(np.abs(rng.normal(size=c)) * 0.3)
    step = 0.6519
    w = rng.laplace(size=shape)
    flat = w.reshape(c, -1)
    k = rng.integers(0, 1 << (bits - 1), size=c)
    sd = s.numpy() * step
    flat[:, 0] = th.numpy() + k * sd if grid == "offset" else (k + 0.5) * sd  # exact ties
    w.reshape(-1)[:4] = [0.0, -0.0, np.inf, -np.inf]
    m = torch.from_numpy(rng.random(shape) < 0.6)
    return torch.tensor(w).to(dtype), m, s, th, step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", ["offset", "symmetric"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_cuda_forward_equals_cpu_kernel(dtype, grid, bits):
    w, m, s, th, step = _case(bits, (16, 8, 3, 3), grid, bits, dtype)
    cpu = ste.fake_quant_ste(w, m, s, th, step, bits, grid)  # Numba kernel
    gpu = ste.fake_quant_ste(w.cuda(), m.cuda(), s.cuda(), th.cuda(), step, bits, grid)
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(torch.signbit(gpu.cpu()), torch.signbit(cpu))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_codebook_and_backward(dtype):
    rng = np.random.default_rng(0)
    cb = torch.tensor([-1.25, -0.5, 0.25, 0.75, 2.0], dtype=torch.float64)
    w = torch.tensor(rng.laplace(size=(8, 32))).to(dtype)
    w[0, :4] = torch.tensor([-0.875, -0.125, 0.5, 1.375]).to(dtype)  # the midpoints
    m = torch.from_numpy(rng.random((8, 32)) < 0.5)
    cpu = ste.fake_quant_codebook_ste(w, m, cb)
    wg = w.cuda().requires_grad_(True)
    gpu = ste.fake_quant_codebook_ste(wg, m.cuda(), cb.cuda())
    assert torch.equal(gpu.detach().cpu(), cpu)
    g = torch.randn(w.shape, dtype=dtype, device="cuda")
    gpu.backward(g)
    assert torch.equal(wg.grad, torch.where(m.cuda(), g, torch.zeros((), dtype=dtype,
                                                                     device="cuda")))


def test_cuda_training_keeps_pruned_zero_and_matches_cpu_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(),
                        nn.Linear(16 * 4 * 4, 10))
    opq_torch.compress(net, sparsity=0.9, bits=4)
    cpu_eff = opq_torch.compressed_weights(net)
    net.cuda()
    assert torch.equal(net[0].parametrizations.weight[0].scale.cpu(),
                       torch.from_numpy(opq_torch.plan_of(net)["0.weight"].channel_scale))
    assert all(np.array_equal(v, cpu_eff[k]) for k, v in opq_torch.compressed_weights(net).items())
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(20):
            x = torch.randn(32, 3, 8, 8, device="cuda")
            y = torch.randint(0, 10, (32,), device="cuda")
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    masks = opq_torch.masks_of(net)
    eff = opq_torch.compressed_weights(net)
    assert all(np.all(eff[k][~m] == 0) for k, m in masks.items())
    # the same latent weights on the CPU give the same effective weights
    back = opq_torch.compressed_weights(net.cpu())
    assert all(np.array_equal(back[k], eff[k]) for k in eff)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("grid", ["offset", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fused_and_blocked_paths_equal_cpu_kernel(compiled, grid, dtype, monkeypatch):
    """The torch.compile'd kernel (Triton, no FMA contraction) and the eager blocks."""
    monkeypatch.setattr(ste, "TORCH_COMPILE", compiled)
    monkeypatch.setattr(ste, "TORCH_CHUNK", 700)
    monkeypatch.setattr(ste, "TORCH_BLOCKS", 10 ** 6)
    for bits in (1, 4, 8):
        w, m, s, th, step = _case(bits + 10, (33, 3000), grid, bits, dtype)
        cpu = ste.fake_quant_ste(w, m, s, th, step, bits, grid)
        gpu = ste.fake_quant_torch(w.cuda(), m.cuda(), s.cuda(), th.cuda(), step, bits, grid)
        assert gpu.dtype == dtype and torch.equal(gpu.cpu(), cpu)
        assert torch.equal(torch.signbit(gpu.cpu()), torch.signbit(cpu))


@pytest.mark.parametrize("compiled", [True, False])
def test_cuda_codebook_fused_and_blocked(compiled, monkeypatch):
    monkeypatch.setattr(ste, "TORCH_COMPILE", compiled)
    rng = np.random.default_rng(1)
    cb = torch.tensor([-1.25, -0.5, 0.25, 0.75, 2.0], dtype=torch.float64)
    w = torch.tensor(rng.laplace(size=(64, 2000)), dtype=torch.float32)
    w[0, :4] = torch.tensor([-0.875, -0.125, 0.5, 1.375])
    m = torch.from_numpy(rng.random(w.shape) < 0.5)
    cpu = ste.fake_quant_codebook_ste(w, m, cb)
    gpu = ste.fake_quant_codebook_torch(w.cuda(), m.cuda(), cb.cuda())
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("compiled", [True, False])
def test_cuda_peak_memory_under_twice_the_weight(compiled, monkeypatch):
    monkeypatch.setattr(ste, "TORCH_COMPILE", compiled)
    w, m, s, th, step = _case(0, (4096, 4096), "offset", 4, torch.float32)
    w, m, s, th = w.cuda(), m.cuda(), s.cuda(), th.cuda()
    ste.fake_quant_torch(w, m, s, th, step, 4)  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ste.fake_quant_torch(w, m, s, th, step, 4)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert out.shape == w.shape
    assert w.nbytes <= peak <= 2 * w.nbytes
