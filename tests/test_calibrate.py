"""opq_torch: sensitivity (data-free and calibrated), compensation, BatchNorm recalibration."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import opq_core
import opq_torch
from opq_torch import calibrate as C


class Net(nn.Module):
    """conv -> BN -> ReLU, conv -> ReLU -> BN (gain through the activation), LayerNorm ->
    linear."""

    def __init__(self, branch=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3)
        self.b2 = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8 * 4 * 4)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.branch = branch

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        if self.branch and x.sum() < -1e30:  # data-dependent: not traceable by torch.fx
            x = -x
        x = self.b2(F.relu(self.c2(x)))
        return self.fc(self.ln(torch.flatten(x, 1)))


def _net(seed=0, branch=False):
    torch.manual_seed(seed)
    net = Net(branch)
    with torch.no_grad():
        for bn in (net.b1, net.b2):
            bn.running_var.uniform_(0.2, 3.0)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.weight.uniform_(0.3, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
        net.ln.weight.uniform_(0.3, 2.0)
        net.ln.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _gain2(bn):
    return (bn.weight.double() ** 2 / (bn.running_var.double() + bn.eps)).detach().numpy()


def _batches(n=4, seed=1, bs=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 6, 6, generator=g) * 0.7 + 0.2 for _ in range(n)]


NAMES = ["c1.weight", "c2.weight", "fc.weight"]


@pytest.mark.parametrize("branch", [False, True])
def test_data_free_sensitivity_reads_the_graph(branch):
    net = _net(branch=branch)
    example = _batches(1)[0] if branch else None
    imp = C.sensitivity(net, NAMES, example)
    np.testing.assert_allclose(imp["c1.weight"][0], _gain2(net.b1), rtol=1e-12)
    assert imp["c1.weight"][1] is None
    b1 = (net.b1.weight.double() ** 2 + net.b1.bias.double() ** 2).detach().numpy()
    if branch:  # hooks see only module-to-module tensors (not through F.relu)
        assert "c2.weight" not in imp
    else:  # torch.fx follows channelwise operations (here ReLU) both ways
        np.testing.assert_allclose(imp["c2.weight"][0], _gain2(net.b2), rtol=1e-12)
        np.testing.assert_allclose(imp["c2.weight"][1], b1, rtol=1e-12)
    lnw, lnb = net.ln.weight.double().detach().numpy(), net.ln.bias.double().detach().numpy()
    np.testing.assert_allclose(imp["fc.weight"][1], lnw ** 2 + lnb ** 2, rtol=1e-12)
    assert imp["fc.weight"][0] is None


def test_untraceable_model_without_example_warns_and_is_unweighted():
    net = _net(branch=True)
    with pytest.warns(UserWarning, match="torch.fx cannot trace"):
        assert C.sensitivity(net, NAMES) == {}


def test_compress_auto_uses_the_importance_and_none_is_unweighted():
    net = _net()
    w = {n: p.detach().numpy().copy() for n, p in net.named_parameters() if n in NAMES}
    p_auto = opq_torch.compress(copy.deepcopy(net), sparsity=0.6, bits=4, sensitivity="auto")
    imp = {k: tuple(None if v is None else v / v.mean() for v in gh)  # each layer averages 1
           for k, gh in C.sensitivity(net, NAMES).items()}
    ref = opq_core.plan(w, sparsity=0.6, bits=4, importance=imp)
    assert [lp.to_dict() for lp in p_auto.layers] == [lp.to_dict() for lp in ref.layers]
    p_none = opq_torch.compress(copy.deepcopy(net), sparsity=0.6, bits=4, sensitivity=None)
    plain = opq_core.plan(w, sparsity=0.6, bits=4)
    assert [lp.to_dict() for lp in p_none.layers] == [lp.to_dict() for lp in plain.layers]


def _inputs(net, batches, names):
    """The dense model's inputs of each layer (eval mode)."""
    mods = dict(net.named_modules())
    got = {n: [] for n in names}
    hs = [mods[n[:-7]].register_forward_pre_hook(lambda m, i, n=n: got[n].append(i[0].detach()))
          for n in names]
    with torch.no_grad():
        for b in batches:
            net(b)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_calibration_moments_are_the_layer_input_second_moments():
    net = _net()
    cal = _batches()
    st = C.calibration_stats(net, cal, NAMES)
    xs = _inputs(net, cal, NAMES)
    fc_m = (xs["fc.weight"].double() ** 2).mean(0).numpy()
    # float32 products per batch, summed in float64
    np.testing.assert_allclose(st["fc.weight"].moment, fc_m, rtol=1e-6)
    # a conv: E[x_j^2] of the unfolded patches, averaged over kernel positions (zero padding)
    x = xs["c2.weight"].double()
    pat = F.unfold(x, 3).transpose(1, 2).reshape(-1, 8 * 9)
    np.testing.assert_allclose(st["c2.weight"].moment, (pat ** 2).mean(0).reshape(8, 9).mean(1),
                               rtol=1e-6)
    np.testing.assert_allclose(st["c2.weight"].hessian, (pat.T @ pat / pat.shape[0]).numpy(),
                               rtol=1e-5, atol=1e-6)
    p = opq_torch.compress(copy.deepcopy(net), sparsity=0.5, bits=4, calibration=cal,
                           compensate=False, sensitivity="auto")
    np.testing.assert_allclose(p["fc.weight"].importance_in, fc_m / fc_m.mean(), rtol=1e-6)
    g1 = _gain2(net.b1)
    np.testing.assert_allclose(p["c1.weight"].importance_out, g1 / g1.mean(), rtol=1e-12)


@pytest.mark.parametrize("kw", [dict(sparsity=0.6, bits=4), dict(sparsity=0.4, bits=3, grid="symmetric", error_model="laplace"),
                                dict(rate=12, bits=None)])
def test_compensation_keeps_the_plan_and_lowers_every_layer_output_error(kw, tmp_path):
    net = _net()
    cal = _batches()
    a = copy.deepcopy(net)
    b = copy.deepcopy(net)
    pa = opq_torch.compress(a, calibration=cal, compensate=False, **kw)
    pb = opq_torch.compress(b, calibration=cal, compensate=True, **kw)
    # masks, bits, grids, scales, steps: the same plan
    assert [lp.to_dict() for lp in pa.layers] == [lp.to_dict() for lp in pb.layers]
    ma, mb = opq_torch.masks_of(a), opq_torch.masks_of(b)
    w = {n: p.detach().numpy() for n, p in net.named_parameters() if n in NAMES}
    for n in NAMES:
        np.testing.assert_array_equal(ma[n], mb[n])
        np.testing.assert_array_equal(ma[n], pa.masks(w)[n])
    xs = _inputs(net, cal, NAMES)
    mods_a, mods_b, mods_d = (dict(m.named_modules()) for m in (a, b, net))
    for n in NAMES:
        path = n[:-7]
        d = mods_d[path]
        x = xs[n]
        wa, wb = mods_a[path].weight.detach(), mods_b[path].weight.detach()
        # every kept weight is nonzero on the grid, every pruned weight zero: same mask
        assert torch.equal(wb != 0, torch.from_numpy(mb[n]))
        f = (lambda ww: F.linear(x, ww)) if isinstance(d, nn.Linear) else \
            (lambda ww: F.conv2d(x, ww, None, d.stride, d.padding))
        ref = f(d.weight.detach())
        ea = float(((f(wa) - ref) ** 2).sum())
        eb = float(((f(wb) - ref) ** 2).sum())
        assert eb < ea, (n, ea, eb)
    # the file is the same size
    fa, fb = tmp_path / "a.opq", tmp_path / "b.opq"
    opq_torch.save(a, fa)
    opq_torch.save(b, fb)
    ra, rb = opq_core.read_opq(fa), opq_core.read_opq(fb)
    assert [r.nbytes for r in ra.layers] == [r.nbytes for r in rb.layers] or \
        abs(os.path.getsize(fa) - os.path.getsize(fb)) <= 0.02 * os.path.getsize(fa)
    for n in NAMES:
        np.testing.assert_array_equal(rb.masks[n], mb[n])


def test_compensation_result_quantizes_to_its_own_column_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24)) + rng.normal(size=(400, 24))
    w = {"fc": rng.normal(size=(12, 24))}
    p = opq_core.plan(w, sparsity=0.5, bits=3)
    m = p.masks(w)["fc"]
    from opq_core.compensate import compensate_layer, output_error
    r = compensate_layer(p["fc"], w["fc"], x.T @ x / len(x), m)
    assert r.used and r.error_after < r.error_before
    q = opq_core._plan.apply_layer(p["fc"], r.weight, mask=m)
    assert r.error_after == pytest.approx(output_error(w["fc"], q, x.T @ x / len(x)), rel=1e-12)
    np.testing.assert_array_equal(q != 0, m)
    with pytest.raises(ValueError, match="hessian must be 24 x 24"):
        compensate_layer(p["fc"], w["fc"], np.eye(3), m)
    with pytest.raises(ValueError, match="mask keeps"):
        compensate_layer(p["fc"], w["fc"], np.eye(24), np.ones_like(m))


def test_recalibrate_moves_running_stats_to_the_batch_statistics():
    net = _net()
    net.drop = nn.Dropout(0.5).train()  # a submodule left in train mode stays so
    opq_torch.compress(net, sparsity=0.8, bits=3, sensitivity=None)
    net.eval()
    net.drop.train()
    cal = _batches(5, seed=3)
    seen = []
    h = net.b1.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().double()))
    old_mean = net.b1.running_mean.clone()
    mom = net.b1.momentum
    assert opq_torch.recalibrate(net, cal) == 5
    h.remove()
    means = torch.stack([s.mean((0, 2, 3)) for s in seen])
    vars_ = torch.stack([s.var((0, 2, 3), unbiased=True) for s in seen])
    torch.testing.assert_close(net.b1.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.b1.running_var.double(), vars_.mean(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(old_mean, net.b1.running_mean)
    assert not net.training and not net.b1.training and net.drop.training
    assert net.b1.momentum == mom
    with pytest.raises(ValueError, match="empty"):
        opq_torch.recalibrate(net, [])


def test_compress_with_calibration_recalibrates_batchnorm():
    net = _net()
    cal = _batches()
    m = copy.deepcopy(net)
    opq_torch.compress(m, sparsity=0.7, bits=3, calibration=cal)
    assert not torch.allclose(m.b1.running_mean, net.b1.running_mean)
    ref = copy.deepcopy(m)
    opq_torch.recalibrate(ref, cal)  # the same statistics again
    torch.testing.assert_close(ref.b2.running_var, m.b2.running_var)
    with pytest.raises(ValueError, match="needs calibration"):
        opq_torch.compress(copy.deepcopy(net), sparsity=0.5, compensate=True)
