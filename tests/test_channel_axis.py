"""The output-channel axis of owners that store their weight [in, out, ...]
(ConvTranspose*, Hugging Face Conv1D): planned per output channel on the moved view, moved
back exactly; files planned along axis 0 (the command line) load all the same."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import opq_torch  # noqa: E402
from opq_cli import main  # noqa: E402
from opq_core._plan import LayerPlan  # noqa: E402
from opq_core.format import read_opq  # noqa: E402
from opq_torch._layers import discover  # noqa: E402


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 3), torch.nn.ReLU(),
                               torch.nn.ConvTranspose2d(6, 2, 3, groups=2),
                               torch.nn.Conv2d(2, 3, 1))


def test_discover_names_the_output_channel_axis():
    slots = discover(_net(0)).slots
    assert {n: s.axis for n, s in slots.items()} == {"0.weight": 1, "2.weight": 0, "3.weight": 0}


def test_conv_transpose_scales_go_along_the_output_channels(tmp_path):
    net = _net(0)
    x = torch.randn(2, 4, 5, 5)
    plan = opq_torch.compress(net, sparsity=0.5, bits=3, channel_axis="output")
    lp = plan["0.weight"]
    assert (lp.channel_axis, lp.shape, lp.stored_shape) == (1, (6, 4, 3, 3), (4, 6, 3, 3))
    assert lp.channel_scale.size == 6
    assert plan["2.weight"].channel_axis == 0  # grouped: the output channels are not one axis
    # each output channel o of the stored [in, out, kh, kw] weight is on its own grid
    w = opq_torch.compressed_weights(net)["0.weight"]
    s = lp.kernel_scale * lp.step
    for o in range(6):
        v = np.abs(w[:, o][w[:, o] != 0]).astype(np.float64)
        k = (v - lp.thresholds[o]) / s[o] + 0.5   # offset grid: theta + (k - 1/2) s D
        assert np.allclose(k, np.round(k), atol=1e-4), o
    # the mask is in the plan's layout; the weight is pruned where it says
    m = opq_torch.masks_of(net)["0.weight"]
    assert m.shape == lp.shape and np.array_equal(np.moveaxis(m, 0, 1), w != 0)
    y = net(x)
    y.sum().backward()
    g = net[0].parametrizations.weight.original.grad
    assert g.shape == (4, 6, 3, 3) and torch.equal(g == 0, torch.from_numpy(w == 0))
    # round trips: .opq file, state_dict, command-line decompress (stored layout)
    opq_torch.save(net, tmp_path / "t.opq")
    fresh = _net(1)
    opq_torch.load(tmp_path / "t.opq", fresh)
    assert torch.equal(fresh(x), y)
    again = _net(2)
    opq_torch.restore(again, net.state_dict())
    assert torch.equal(again(x), y)
    assert main(["decompress", str(tmp_path / "t.opq"), "-o", str(tmp_path / "t.npz"),
                 "-q"]) == 0
    with np.load(tmp_path / "t.npz") as z:
        assert np.array_equal(z["0.weight"], w)
    with pytest.raises(ValueError, match="axis 1"):
        opq_torch.pack(net)


def test_a_file_planned_along_axis_0_loads_into_the_model(tmp_path):
    net = _net(0)
    x = torch.randn(1, 4, 5, 5)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    assert main(["compress", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "c.opq"),
                 "--sparsity", "0.5", "--bits", "3", "-q"]) == 0
    cf = read_opq(tmp_path / "c.opq")
    assert cf.plan["0.weight"].channel_axis == 0 and cf.plan["0.weight"].shape == (4, 6, 3, 3)
    fresh = _net(1)
    opq_torch.load(tmp_path / "c.opq", fresh)
    assert opq_torch.plan_of(fresh)["0.weight"].channel_axis == 0
    ref = _net(0)
    opq_torch.compress(ref, cf.plan, masks=cf.masks)
    assert torch.equal(fresh(x), ref(x))


def test_layer_plan_channel_axis_round_trips_and_is_checked():
    lp = opq_torch.compress(_net(0), sparsity=0.5, bits=3, channel_axis="output")["0.weight"]
    d = lp.to_dict()
    assert d["channel_axis"] == 1 and LayerPlan.from_dict(d) == lp
    a = np.arange(np.prod(lp.stored_shape)).reshape(lp.stored_shape)
    assert np.array_equal(lp.to_stored(lp.from_stored(a)), a)
    axis0 = LayerPlan.from_dict({k: v for k, v in d.items() if k != "channel_axis"})
    assert axis0.channel_axis == 0 and "channel_axis" not in axis0.to_dict()
    with pytest.raises(ValueError, match="channel_axis 4"):
        LayerPlan.from_dict(dict(d, channel_axis=4))
