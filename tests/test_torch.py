"""opq_torch: straight-through fake-quant, compress/strip/restore, fine-tuning."""
from __future__ import annotations

import copy
import io
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import opq_torch
from opq_core import LayerPlan, Plan, kernels
from opq_torch import ste

SET = settings(max_examples=40, deadline=None, derandomize=True)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _quant_case(seed, shape, grid, bits, dtype):
    """Weights with the awkward values: exact thresholds and level boundaries, +-0, inf."""
    rng = np.random.default_rng(seed)
    c = shape[0]
    scale = np.abs(rng.normal(size=c)) + 0.05
    thr = np.abs(rng.normal(size=c)) * 0.3 * (rng.random(c) < 0.8)
    step = float(rng.choice([0.25, 0.5, 0.6519, 1.0 / 3.0]))
    w = rng.laplace(size=shape)
    flat = w.reshape(c, -1)
    n = flat.shape[1]
    for ch in range(c):
        j = rng.integers(0, n, size=min(n, 4))
        k = rng.integers(0, 1 << (bits - 1), size=j.size)
        if grid == "offset":  # exactly on a bucket edge: theta + k * s * D
            edge = thr[ch] + k * (scale[ch] * step)
        else:  # exactly half way: (k + 1/2) * s * D
            edge = (k + 0.5) * (scale[ch] * step)
        flat[ch, j] = edge * rng.choice([-1.0, 1.0], size=j.size)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e30, -1e-30])
    pos = rng.integers(0, w.size, size=special.size)
    w.reshape(-1)[pos] = special
    mask = rng.random(shape) < 0.6
    wt = torch.tensor(w, dtype=torch.float64).to(dtype)
    return (wt, torch.from_numpy(mask), torch.tensor(scale), torch.tensor(thr), step)


class Net(nn.Module):
    """Every supported layer kind: Conv1d/2d/3d (grouped, depthwise), ConvTranspose, Linear."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv1d(2, 6, 3)
        self.c2 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, padding=1)      # depthwise
        self.gc = nn.Conv2d(8, 8, 1, groups=2)                 # grouped
        self.tc = nn.ConvTranspose2d(8, 4, 2, stride=2)        # weight (in, out, k, k)
        self.c3 = nn.Conv3d(1, 3, 2)
        self.emb = nn.Embedding(5, 4)                          # compressed too
        self.fc = nn.Linear(6 * 4 + 4 * 8 * 8 + 3 * 8 + 4, 5)

    def forward(self, x):
        a = self.c1(x[:, :, 0, :]).relu().mean(dim=-1)                  # (B, 6, ...)
        a = a.reshape(a.shape[0], -1)[:, :6]
        b = self.tc(self.gc(self.dw(self.bn(self.c2(x)).relu())).relu())  # (B, 4, 8, 8)
        c = self.c3(x[:, :1].unsqueeze(2).expand(-1, 1, 3, 4, 4).contiguous())  # (B,3,2,3,3)
        c = c.reshape(c.shape[0], 3, -1)[:, :, :8].reshape(c.shape[0], -1)
        e = self.emb(torch.zeros(x.shape[0], dtype=torch.long))
        h = torch.cat([a.repeat(1, 4), b.flatten(1), c, e], dim=1)
        return self.fc(h)


def _x(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g)


def _small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5))


def _batches(n, seed=5, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 2, 6, 6, generator=g), torch.randint(0, 5, (size,), generator=g))
            for _ in range(n)]


def _np_codebook_rule(w, mask, codebook):
    """The shared codebook rule in NumPy: index = #midpoints strictly below w (float64)."""
    c = np.asarray(codebook, dtype=np.float64)
    mids = (c[:-1] + c[1:]) / 2.0
    x = w.astype(np.float64)
    idx = (x.reshape(-1, 1) > mids.reshape(1, -1)).sum(axis=1).reshape(x.shape)
    return np.where(mask, c[idx], 0.0)


def _codebook_plan(net, seed=0, bits=3):
    """A plan with codebook layers for every compressible weight of ``net``, and masks."""
    rng = np.random.default_rng(seed)
    layers, masks = [], {}
    for i, (name, p) in enumerate((k, v) for k, v in net.named_parameters()
                                  if k.endswith("weight") and v.dim() >= 2):
        if isinstance(getattr(net, name.split(".")[0], None), nn.Embedding):
            continue
        w = p.detach().numpy()
        m = rng.random(w.shape) < 0.5
        cb = np.sort(rng.choice(np.abs(w[m]).astype(np.float32), size=3, replace=False)
                     .astype(np.float64))
        cb = np.concatenate([-cb[::-1], cb])
        layers.append(LayerPlan(
            name=name, shape=tuple(w.shape), dtype="float32", bits=bits, grid="codebook",
            step=1.0, channel_scale=np.ones(w.shape[0]), scale_dtype="float32", lam=0.0,
            score_q=0.0, quant_error=0.0, kept=int(m.sum()), predicted_sparsity=0.5,
            pruning_error=0.0, predicted_error=0.0, codebook=cb))
        masks[name] = m
    plan = Plan(layers=tuple(layers), method="annc", channelwise="layer", grid="codebook",
                error_model="empirical", target_sparsity=None, budget_bits=None, lam=0.0)
    return plan, masks


# --------------------------------------------------------------------------------------
# the straight-through function
# --------------------------------------------------------------------------------------

@SET
@given(seed=st.integers(0, 2**31 - 1),
       shape=st.sampled_from([(1, 1), (3, 7), (4, 2, 3, 3), (5, 1, 3, 3), (2, 3, 2, 2, 2)]),
       grid=st.sampled_from(["offset", "symmetric"]), bits=st.integers(1, 8),
       dtype=st.sampled_from(DTYPES))
def test_torch_ops_path_equals_kernel_bit_for_bit(seed, shape, grid, bits, dtype):
    w, m, s, th, step = _quant_case(seed, shape, grid, bits, dtype)
    got = ste.fake_quant_torch(w, m, s, th, step, bits, grid)
    want = ste._fake_quant_op(w, m, s, th, step, bits, grid)  # CPU: the Numba kernel
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    # bit for bit, the sign of zero included
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    # and the kernel path equals opq_core on the exact float32 / float64 values
    cdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref = kernels.fake_quant(w.to(cdt).numpy(), m.numpy(), s.numpy(), th.numpy(), step, bits, grid)
    assert torch.equal(want, torch.from_numpy(ref).to(dtype))


def test_torch_ops_path_nan_propagates_kernel_raises():
    w = torch.tensor([[0.5, float("nan"), float("nan")]])
    m = torch.tensor([[True, True, False]])
    s = torch.ones(1, dtype=torch.float64)
    out = ste.fake_quant_torch(w, m, s, 0.0 * s, 0.5, 3, "offset")
    assert torch.isnan(out[0, 1]) and out[0, 2].item() == 0.0
    with pytest.raises(ValueError, match="NaN"):
        ste.fake_quant_ste(w, m, s, 0.0 * s, 0.5, 3, "offset")


@SET
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES),
       k=st.integers(1, 8), shape=st.sampled_from([(1, 1), (3, 5), (4, 2, 3)]))
def test_codebook_torch_path_equals_numpy_rule(seed, dtype, k, shape):
    rng = np.random.default_rng(seed)
    cb = np.unique(rng.laplace(size=k).astype(np.float32)).astype(np.float64)
    cb = cb[cb != 0]
    if cb.size == 0:
        cb = np.array([0.5])
    w = rng.laplace(size=shape)
    mids = (cb[:-1] + cb[1:]) / 2
    if mids.size:  # weights exactly on a midpoint take the lower centroid
        w.reshape(-1)[: min(w.size, mids.size)] = mids[: min(w.size, mids.size)]
    w.reshape(-1)[-1] = -0.0
    mask = rng.random(shape) < 0.7
    wt = torch.tensor(w).to(dtype)
    got = ste.fake_quant_codebook_torch(wt, torch.from_numpy(mask), torch.tensor(cb))
    x = wt.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    want = _np_codebook_rule(x.numpy(), mask, cb)
    ref = torch.from_numpy(want).to(torch.float32).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, ref)
    # the CPU operator (opq_core.codebook's kernel) agrees
    cpu = ste._fake_quant_codebook_op(wt, torch.from_numpy(mask), torch.tensor(cb))
    assert torch.equal(cpu, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["uniform", "codebook"])
def test_ste_gradient_is_grad_times_mask(dtype, kind):
    w, m, s, th, step = _quant_case(3, (4, 3, 3, 3), "offset", 4, dtype)
    w = torch.where(torch.isfinite(w), w, torch.zeros((), dtype=dtype)).requires_grad_(True)
    m[0, 0, 0, 0] = False
    if kind == "uniform":
        y = ste.fake_quant_ste(w, m, s, th, step, 4, "offset")
    else:
        y = ste.fake_quant_codebook_ste(w, m, torch.tensor([-0.5, 0.25, 1.0], dtype=torch.float64))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    g[0, 0, 0, 0] = float("nan")  # even a NaN gradient becomes +0.0 where pruned
    y.backward(g)
    want = torch.where(m, g, torch.zeros((), dtype=dtype))
    assert w.grad.dtype == dtype
    assert torch.equal(w.grad, want)
    assert not torch.signbit(w.grad[~m]).any()
    # the torch-ops backward (other devices) is the same
    assert torch.equal(ste.ste_backward_torch(g, m), want)


# --------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------

def test_forward_equals_plan_apply_weights_exactly():
    net = Net()
    x = _x()
    dense = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    plan = opq_torch.compress(net, sparsity=0.7, bits=3)
    assert set(plan.names) == {"c1.weight", "c2.weight", "dw.weight", "gc.weight", "tc.weight",
                               "c3.weight", "fc.weight", "emb.weight"}
    assert "bn.running_mean" in plan.skipped
    assert "c2.bias" in plan.skipped
    # ConvTranspose: planned as stored, channel axis = shape[0] (the input channels)
    assert plan["tc.weight"].shape == (8, 4, 2, 2) and plan["tc.weight"].channel_scale.size == 8
    applied = plan.apply(dense)
    plain = Net()
    plain.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in applied.items()})
    with torch.no_grad():
        assert torch.equal(net(_x()), plain(x))
    eff = opq_torch.compressed_weights(net)
    for name in plan.names:
        assert np.array_equal(eff[name], applied[name]), name
        assert eff[name].dtype == np.float32
    masks = opq_torch.masks_of(net)
    assert sum(int(m.sum()) for m in masks.values()) == plan.kept
    assert opq_torch.plan_of(net) == plan
    assert opq_torch.is_compressed(net) and not opq_torch.is_compressed(Net())


def test_latent_weights_are_parameters_and_state_dict_carries_the_plan():
    net = _small()
    opq_torch.compress(net, sparsity=0.5, bits=4, grid="symmetric")
    names = [n for n, _ in net.named_parameters()]
    assert "0.parametrizations.weight.original" in names
    sd = net.state_dict()
    for suffix in ("mask", "scale", "threshold", "codebook", "_extra_state"):
        assert f"3.parametrizations.weight.0.{suffix}" in sd
    assert sd["3.parametrizations.weight.0.scale"].dtype == torch.float64
    from opq_torch.compress import _decode_state
    st = _decode_state(sd["3.parametrizations.weight.0._extra_state"])
    assert st["layer"]["grid"] == "symmetric"
    # a tensor (save_pretrained / safetensors store tensors only)
    assert sd["3.parametrizations.weight.0._extra_state"].dtype == torch.uint8
    # .half() moves the float64 quantizer state without rounding it
    before = sd["0.parametrizations.weight.0.threshold"].clone()
    net.half()
    q = net[0].parametrizations.weight[0]
    assert q.threshold.dtype == torch.float64 and torch.equal(q.threshold, before)


def test_half_precision_model_matches_kernel():
    net = _small()
    opq_torch.compress(net, sparsity=0.6, bits=4)
    net.to(torch.bfloat16)
    q = net[3].parametrizations.weight[0]
    latent = net[3].parametrizations.weight.original
    assert latent.dtype == torch.bfloat16
    eff = net[3].weight
    ref = kernels.fake_quant(latent.detach().float().numpy(), q.mask.numpy(), q.scale.numpy(),
                             q.threshold.numpy(), q.step, q.bits, q.grid)
    assert eff.dtype == torch.bfloat16
    assert torch.equal(eff, torch.from_numpy(ref).to(torch.bfloat16))
    assert torch.equal(ste.fake_quant_torch(latent, q.mask, q.scale, q.threshold, q.step,
                                            q.bits, q.grid), eff)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_pruned_positions_stay_exactly_zero_after_many_steps(opt_name):
    net = _small()
    plan = opq_torch.compress(net, sparsity=0.85, bits=2)
    masks = opq_torch.masks_of(net)
    if opt_name == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-2)
    latent0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    for x, y in _batches(30):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        for path in ("0", "3", "6"):
            mod = net[int(path)]
            g = mod.parametrizations.weight.original.grad
            assert torch.all(g[~torch.from_numpy(masks[f"{path}.weight"])] == 0)
        opt.step()
    eff = opq_torch.compressed_weights(net)
    for name, m in masks.items():
        assert np.all(eff[name][~m] == 0.0), name
        assert np.all(eff[name][m] != 0.0), name
        assert np.array_equal(opq_torch.masks_of(net)[name], m)
    # the latent weights did train, and the plan did not move
    moved = [n for n, p in net.named_parameters() if not torch.equal(p, latent0[n])]
    assert "3.parametrizations.weight.original" in moved
    assert opq_torch.plan_of(net) == plan


def test_state_dict_roundtrip_into_fresh_model():
    net = Net()
    plan = opq_torch.compress(net, sparsity=0.8, bits=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # change the latent weights away from the planned ones
        opt.zero_grad()
        net(_x()).square().mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    with torch.no_grad():
        want = net(_x())
    # 1) restore(): plan and masks from the state_dict alone
    fresh = Net(seed=7)
    assert opq_torch.restore(fresh, sd) == plan
    with torch.no_grad():
        assert torch.equal(fresh(_x()), want)
    assert opq_torch.plan_of(fresh) == plan
    p2, m2 = opq_torch.plan_from_state_dict(sd)
    assert p2 == plan
    assert all(np.array_equal(m2[k], v) for k, v in opq_torch.masks_of(net).items())
    # 2) by hand: compress(fresh, plan, masks=...) then load_state_dict
    fresh2 = Net(seed=8)
    opq_torch.compress(fresh2, opq_torch.plan_of(net), masks=opq_torch.masks_of(net))
    fresh2.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh2(_x()), want)
    # a fresh model's own weights cannot reproduce the planned masks: the error says what to do
    with pytest.raises(ValueError, match="masks="):
        opq_torch.compress(Net(seed=9), plan)


def test_resume_gives_the_same_next_step():
    def make():
        net = _small()
        opq_torch.compress(net, sparsity=0.75, bits=3)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return net, opt

    data = _batches(6)

    def step(net, opt, batch):
        opt.zero_grad()
        nn.functional.cross_entropy(net(batch[0]), batch[1]).backward()
        opt.step()

    net, opt = make()
    for b in data[:4]:
        step(net, opt, b)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    for b in data[4:]:
        step(net, opt, b)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    fresh = _small(seed=3)
    opq_torch.restore(fresh, ck["model"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt2.load_state_dict(ck["opt"])
    for b in data[4:]:
        step(fresh, opt2, b)
    for (n1, p1), (n2, p2) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2
        if isinstance(p1, torch.Tensor):
            assert torch.equal(p1, p2), n1


def test_strip_gives_plain_model_and_leaves_original():
    net = Net()
    opq_torch.compress(net, sparsity=0.6, bits=4)
    x = _x()
    with torch.no_grad():
        want = net(x)
    plain = opq_torch.strip(net)
    assert not opq_torch.is_compressed(plain) and opq_torch.is_compressed(net)
    assert type(plain.c2) is nn.Conv2d and type(net.c2) is not nn.Conv2d
    with torch.no_grad():
        assert torch.equal(plain(x), want)
        assert torch.equal(net(x), want)  # the original still works, still compressed
    eff = opq_torch.compressed_weights(net)
    assert np.array_equal(plain.c2.weight.detach().numpy(), eff["c2.weight"])
    assert isinstance(plain.c2.weight, nn.Parameter)


def test_codebook_layers():
    net = _small()
    plan, masks = _codebook_plan(net)
    latent = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="codebook"):
        opq_torch.compress(copy.deepcopy(net), plan)
    opq_torch.compress(net, plan, masks=masks)
    eff = opq_torch.compressed_weights(net)
    for lp in plan.layers:
        want = _np_codebook_rule(latent[lp.name], masks[lp.name], lp.codebook).astype(np.float32)
        assert np.array_equal(eff[lp.name], want), lp.name
    x = _batches(1)[0][0].requires_grad_(False)
    net(x).sum().backward()
    g = net[3].parametrizations.weight.original.grad
    assert torch.all(g[~torch.from_numpy(masks["3.weight"])] == 0)
    sd = net.state_dict()
    fresh = _small(seed=4)
    opq_torch.restore(fresh, sd)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_exclude_by_module_or_weight_name():
    net = Net()
    plan = opq_torch.compress(net, sparsity=0.5, bits=4, exclude=["fc", "c3.weight"])
    assert "fc.weight" not in plan.names and "c3.weight" not in plan.names
    assert "fc.weight" in plan.skipped and "c3.weight" in plan.skipped
    assert type(net.fc) is nn.Linear
    # with a given plan, exclude drops the plan's layer
    net2 = Net()
    p = opq_torch.plan_of(net)
    p2 = opq_torch.compress(net2, replace(p, skipped=()), exclude="dw")
    assert "dw.weight" not in p2.names and p2.skipped == ("dw.weight",)
    assert type(net2.dw) is nn.Conv2d


def test_bad_input_errors_name_the_layer():
    net = _small()
    opq_torch.compress(net, sparsity=0.5)
    with pytest.raises(ValueError, match=r"already compressed.*'0\.weight'"):
        opq_torch.compress(net, sparsity=0.5)
    with pytest.raises(ValueError, match=r"exclude.*'nope\.weight'"):
        opq_torch.compress(_small(), sparsity=0.5, exclude=["nope.weight"])
    other = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 5))
    with pytest.raises(ValueError, match=r"'3\.weight'.*shape \(8, 8, 3, 3\).*\(4, 8, 3, 3\)"):
        opq_torch.compress(other, opq_torch.plan_of(net))
    with pytest.raises(ValueError, match=r"plan layer '0\.weight' is not in this model"):
        opq_torch.compress(nn.Sequential(nn.Identity(), nn.Linear(3, 3)),
                           opq_torch.plan_of(net))
    with pytest.raises(ValueError, match=r"masks\['3\.weight'\] has shape"):
        opq_torch.compress(_small(), opq_torch.plan_of(net),
                           masks={"3.weight": np.ones((2, 2), bool)})
    with pytest.raises(TypeError, match="nn.Module"):
        opq_torch.compress(np.zeros(3), sparsity=0.5)
    with pytest.raises(ValueError, match="not compressed"):
        opq_torch.plan_of(_small())
    with pytest.raises(ValueError, match="sparsity"):
        opq_torch.compress(_small(), sparsity=1.5)


def test_compile_matches_eager():
    net = _small()
    opq_torch.compress(net, sparsity=0.8, bits=4)
    x, y = _batches(1)[0]
    net.eval()
    eager = net(x)
    eager_loss = nn.functional.cross_entropy(net(x), y)
    eager_loss.backward()
    g_eager = net[3].parametrizations.weight.original.grad.clone()
    net.zero_grad()
    torch._dynamo.reset()
    cnet = torch.compile(net, backend="aot_eager", fullgraph=True)
    out = cnet(x)
    assert torch.equal(out, eager)
    nn.functional.cross_entropy(cnet(x), y).backward()
    assert torch.equal(net[3].parametrizations.weight.original.grad, g_eager)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile's inductor backend needs a C compiler on CPU")
def test_compile_inductor_matches_eager():
    net = _small()
    opq_torch.compress(net, sparsity=0.8, bits=4)
    net.eval()
    x = _batches(1)[0][0]
    with torch.no_grad():
        eager = net(x)
    torch._dynamo.reset()
    cnet = torch.compile(net)  # default backend, the opq ops stay opaque custom ops
    out = cnet(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    # the compressed weights themselves are bit-identical
    cw = torch.compile(lambda: net[3].weight)()
    assert torch.equal(cw, net[3].weight)


# --------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------

def test_finetune_history_and_hook():
    net = _small()
    opq_torch.compress(net, sparsity=0.8, bits=3)
    masks = opq_torch.masks_of(net)
    train = _batches(5)
    seen = []
    hist = opq_torch.finetune(net, train, epochs=2, eval_loader=_batches(2, seed=9),
                              step_hook=lambda m, s: seen.append(s), progress=False)
    assert seen == list(range(1, 11))
    assert len(hist) == 2 and hist.steps == 10
    assert all(np.isfinite(v) for v in hist.train_loss)
    assert all(0.0 <= a <= 1.0 for a in hist.train_acc + hist.eval_acc)
    assert hist.epochs[0].lr == 0.005
    assert "epoch" in repr(hist)
    eff = opq_torch.compressed_weights(net)
    assert all(np.all(eff[k][~m] == 0) for k, m in masks.items())
    with pytest.raises(ValueError, match="epochs"):
        opq_torch.finetune(net, train, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        opq_torch.finetune(net, train, epochs=1, lr=-1.0)


def test_finetune_progress_bar_and_scheduler(capsys):
    net = _small()
    opq_torch.compress(net, sparsity=0.5, bits=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hist = opq_torch.finetune(net, _batches(3), epochs=2, optimizer=opt, scheduler=sched,
                              progress=True)
    assert [e.lr for e in hist.epochs] == [5e-4, 2.5e-4]
    assert hist.eval_acc == [None, None]


def test_lazy_save_load_wrappers_exist():
    assert callable(opq_torch.save) and callable(opq_torch.load)


@pytest.mark.parametrize("threads", [1, None])
def test_kernel_threads_setting_gives_same_bits_and_is_restored(threads, monkeypatch):
    import numba
    monkeypatch.setattr(ste, "KERNEL_THREADS", threads)
    # big enough for the parallel kernels
    w, m, s, th, step = _quant_case(11, (64, 1100), "offset", 4, torch.float32)
    before = numba.get_num_threads()
    wr = w.clone().requires_grad_(True)
    y = ste.fake_quant_ste(wr, m, s, th, step, 4, "offset")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    assert numba.get_num_threads() == before
    assert torch.equal(y, ste.fake_quant_torch(w, m, s, th, step, 4, "offset"))
    assert torch.equal(wr.grad, torch.where(m, g, 0.0))


def test_budget_mode_mixed_bits_and_update():
    net = Net()
    plan = opq_torch.compress(net, rate=40.0, bits=None)
    assert plan.paper_rate >= 40.0 - 1e-9
    eff = opq_torch.compressed_weights(net)
    assert len({lp.bits for lp in plan.layers}) > 1
    for lp in plan.layers:  # per channel at most 2**(bits-1) magnitudes
        rows = eff[lp.name].reshape(lp.shape[0], -1)
        for r in rows:
            assert len(np.unique(np.abs(r[r != 0]))) <= 2 ** (lp.bits - 1)
    # update: a new mask for one layer (as a training-time method would)
    q = opq_torch.quantizers(net)["fc.weight"]
    new = np.zeros(q.mask.shape, bool)
    new[:, :3] = True
    q.update(mask=new)
    assert np.array_equal(opq_torch.masks_of(net)["fc.weight"], new)
    w = opq_torch.compressed_weights(net)["fc.weight"]
    assert np.all(w[:, 3:] == 0) and np.all(w[:, :3] != 0)
    with pytest.raises(ValueError, match="'fc.weight'"):
        q.update(mask=np.zeros((2, 2), bool))
