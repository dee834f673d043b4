"""The study harness on a tiny configuration: outputs exist and their figures agree."""
import json
import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import study  # noqa: E402
import study_methods as sm  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = study.Config(name="study_tiny", models=("digits_cnn",), seeds=(0, 1),
                       rates=(20.0,), ft_epochs=1, dense_epochs=0.4, data_limit=640,
                       ablation_rates=(50.0,), progress=False)
    result = study._clean(study.run(cfg))
    out = tmp_path_factory.mktemp("study")
    paths = study.write(result, str(out))
    return cfg, result, paths


def test_outputs_exist(tiny):
    cfg, result, paths = tiny
    for kind in ("json", "md", "accuracy_png", "error_png"):
        assert os.path.getsize(paths[kind]) > 100, kind
    for kind in ("accuracy_png", "error_png"):
        with open(paths[kind], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["json"]) as f:
        loaded = json.load(f)
    assert loaded["config"]["name"] == "study_tiny"
    assert len(loaded["cells"]) == len(cfg.methods) * len(cfg.seeds) * len(cfg.rates)
    md = open(paths["md"]).read()
    for m in cfg.methods:
        assert f"`{m}`" in md


def test_every_cell_is_consistent(tiny):
    cfg, result, _ = tiny
    for c in result["cells"]:
        where = (c["method"], c["rate_target"], c["seed"])
        assert "error" not in c, (where, c.get("error"))
        for key in ("acc_post", "acc_ft", "dense_acc"):
            assert 0.0 <= c[key] <= 1.0, (where, key)
        # matched size: the realized paper_rate is the target (ANNC's budget is floored)
        assert c["paper_rate"] == pytest.approx(c["rate_target"], rel=0.02), where
        # fine-tuning keeps the size: same kept count and bits in the written file
        assert c["paper_rate_ft"] == pytest.approx(c["paper_rate"], rel=1e-9), where
        assert math.isfinite(c["storage_rate"]) and c["storage_rate"] > 1.0, where
        assert c["alloc_s"] >= 0.0 and c["ft_s"] > 0.0
        kept = sum((1.0 - sp) for sp in c["layer_sparsity"].values())
        assert kept > 0.0
    assert len(result["dense"]) == len(cfg.seeds)
    assert all(d["acc"] > 0.5 for d in result["dense"])


def test_summary_matches_cells(tiny):
    _, result, _ = tiny
    for s in result["summary"]:
        rows = [c for c in result["cells"] if (c["model"], c["method"], c["rate_target"])
                == (s["model"], s["method"], s["rate_target"])]
        assert s["seeds"] == len(rows)
        for key in ("acc_post", "acc_ft", "paper_rate", "storage_rate"):
            vals = [r[key] for r in rows]
            assert s[key] == pytest.approx(float(np.mean(vals)), rel=1e-12)
            assert s[key + "_std"] == pytest.approx(float(np.std(vals, ddof=1)), abs=1e-12)


def test_ablations_and_error_model(tiny):
    _, result, _ = tiny
    variants = {a["variant"] for a in result["ablations"]}
    assert {"unified (laplace)", "layer (laplace)", "per-channel steps (empirical)",
            "grid offset", "grid symmetric", "bits 2", "bits 3"} <= variants
    for a in result["ablations"]:
        assert a["paper_rate"] == pytest.approx(50.0, rel=1e-3)
        assert 0.0 <= a["acc_post"] <= 1.0
    # the empirical error model predicts the measured per-layer error (the Laplace one
    # only approximately)
    emp = [e for e in result["errors"] if e["error_model"] == "empirical"]
    assert emp
    for e in emp:
        assert e["predicted"] == pytest.approx(e["measured"], rel=0.05), e["layer"]
        assert e["q_measured"] >= 0.0 and e["q_predicted"] >= 0.0
        assert e["measured"] == pytest.approx(e["pruning"] + e["q_measured"], rel=1e-9)
    lap = [e for e in result["errors"] if e["error_model"] == "laplace"]
    tot = sum(e["predicted"] for e in lap) / sum(e["measured"] for e in lap)
    assert 0.5 < tot < 2.0


# ---------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,rate", [(4, 20.0), (4, 200.0), (2, 50.0), (8, 100.0)])
def test_sparsity_for_matches_paper_rate(bits, rate):
    p = sm.sparsity_for(rate, bits)
    assert 32.0 / (bits * (1.0 - p)) == pytest.approx(rate, rel=1e-12)


def test_sparsity_for_rejects_unreachable_rate():
    with pytest.raises(ValueError, match="rate=1.5"):
        sm.sparsity_for(1.5, 16)


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.laplace(size=(8, 3, 3, 3)).astype(np.float32),
            "b.weight": 0.1 * rng.laplace(size=(10, 64)).astype(np.float32)}


def test_dc_masks_exact_count_and_std_threshold():
    w = _weights()
    m = sm.dc_masks(w, 0.8)
    n = sum(x.size for x in w.values())
    assert sum(int((~x).sum()) for x in m.values()) == round(0.8 * n)
    kept = np.concatenate([np.abs(w[k][m[k]]) / w[k].std() for k in w])
    pruned = np.concatenate([np.abs(w[k][~m[k]]) / w[k].std() for k in w])
    assert kept.min() >= pruned.max()


@pytest.mark.parametrize("method", list(sm.METHODS))
def test_allocate_hits_target_rate(method):
    w = _weights(1)
    a = sm.allocate(method, w, 20.0, 4)
    assert a.plan.paper_rate == pytest.approx(20.0, rel=0.02)
    deq = sm.dequantized(a, w)
    assert set(deq) == set(w)
    nnz = sum(int(np.count_nonzero(v)) for v in deq.values())
    assert nnz == a.plan.kept


def test_per_channel_plan_reassembles():
    w = _weights(2)
    p, deq, secs = sm.per_channel_plan(w, 20.0, 4)
    assert len(p.layers) == 8 + 10
    assert p.paper_rate == pytest.approx(20.0, rel=1e-2)
    for k in w:
        assert deq[k].shape == w[k].shape
    assert sum(int(np.count_nonzero(v)) for v in deq.values()) == p.kept
    assert secs >= 0.0


def test_storage_rate_of_written_file():
    w = _weights(3)
    a = sm.allocate("opq", w, 20.0, 4)
    storage, paper, nbytes = sm.storage_rate(a.plan, w, None, {"a.bias": np.zeros(8, np.float32)})
    assert paper == pytest.approx(a.plan.paper_rate)
    assert nbytes > 0 and 1.0 < storage < math.inf


def test_rerender_from_json(tiny, tmp_path):
    _, result, paths = tiny
    study.main(["--from-json", paths["json"], "--out", str(tmp_path)])
    with open(paths["md"]) as a, open(tmp_path / "study_tiny.md") as b:
        assert a.read() == b.read()
    assert (tmp_path / "study_tiny_accuracy.png").stat().st_size > 100
