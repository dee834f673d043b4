"""The allocation: optimality, exact counts, prediction vs realization, budgets, bad input."""
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opq_core import error_model as em
from opq_core.allocate import Plan, plan, score_layer


def laplace_net(seed=0, spread=True, sizes=((64, 3, 3, 3), (128, 64, 3, 3), (256, 128), (10, 256))):
    rng = np.random.default_rng(seed)
    out = {}
    for i, shp in enumerate(sizes):
        scale = 10 ** rng.uniform(-2, 0) if spread else 0.1
        # channel scales spread within the layer too
        ch = scale * 10 ** rng.uniform(-0.5, 0.5, size=(shp[0],) + (1,) * (len(shp) - 1))
        out[f"layer{i}.weight"] = (rng.laplace(size=shp) * ch).astype(np.float32)
        out[f"layer{i}.bias"] = np.zeros(shp[0], np.float32)
    return out


def all_scores(p, w):
    return {lp.name: score_layer(w[lp.name], lp.score_q, lp.channel_scale) for lp in p.layers}


def objective(p, w, masks):
    """sum pruned w^2 + sum kept q_B s_c^2 (what the allocation minimizes)."""
    tot = 0.0
    for lp in p.layers:
        x = w[lp.name].astype(np.float64).reshape(lp.channels, -1)
        m = masks[lp.name].reshape(x.shape)
        tot += np.sum(np.where(m, 0.0, x * x)) + lp.quant_error * np.sum(m.sum(1) * lp.channel_scale ** 2)
    return tot


@pytest.mark.parametrize("method", ["opq", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99])
def test_exact_count_and_score_order(method, sparsity):
    w = laplace_net(1)
    # the pure global rule with the closed-form constants (no floor)
    p = plan(w, sparsity=sparsity, bits=3, method=method, error_model="laplace", min_density=0)
    masks = p.masks(w)
    N = p.n
    assert sum(int(m.sum()) for m in masks.values()) == p.kept == N - round(sparsity * N)
    assert p.status == 0 and p.success
    sc = all_scores(p, w)
    kept = np.concatenate([sc[k][masks[k].ravel()] for k in sc])
    pruned = np.concatenate([sc[k][~masks[k].ravel()] for k in sc])
    if kept.size and pruned.size:
        assert kept.min() >= pruned.max()   # every kept score >= every pruned one
        assert pruned.max() == p.lam
    # thresholds: every kept |w| >= theta_c, and the stationarity condition w^2 < lam + q
    for lp in p.layers:
        x = np.abs(w[lp.name].astype(np.float64)).reshape(lp.channels, -1)
        m = masks[lp.name].reshape(x.shape)
        th = lp.thresholds[:, None]
        assert np.all(x[m] >= np.broadcast_to(th, x.shape)[m])
        assert np.all(x[~m] <= np.broadcast_to(th, x.shape)[~m])
        if method == "opq":
            assert lp.score_q == pytest.approx(em.quantization_constant(3))


def test_opq_matches_brute_force_on_tiny_problems():
    rng = np.random.default_rng(7)
    for trial in range(30):
        w = {"a": rng.laplace(size=(2, 3)) * rng.uniform(0.1, 2),
             "b": rng.laplace(size=(3, 2)) * rng.uniform(0.1, 2)}
        sp = rng.choice([0.25, 0.5, 0.75])
        bits = int(rng.integers(1, 9))
        p = plan(w, sparsity=sp, bits=bits, error_model="laplace", min_density=0)
        got = objective(p, w, p.masks(w))
        k = round(sp * 12)
        flat = [(n, i) for n in ("a", "b") for i in range(6)]
        best = math.inf
        for pruned in itertools.combinations(range(12), k):
            masks = {n: np.ones(6, bool) for n in ("a", "b")}
            for j in pruned:
                masks[flat[j][0]][flat[j][1]] = False
            best = min(best, objective(p, w, masks))
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12), trial


def test_predicted_sparsity_matches_realized_on_laplace():
    w = laplace_net(3, sizes=((256, 128, 3, 3), (512, 256), (128, 512)))
    for sp in (0.5, 0.8, 0.95):
        p = plan(w, sparsity=sp, bits=4)
        for lp in p.layers:
            assert abs(lp.predicted_sparsity - lp.sparsity) < 0.01, (sp, lp.name)


def test_analytic_lambda_satisfies_the_target():
    w = laplace_net(4, sizes=((256, 128, 3, 3), (512, 256)))
    p = plan(w, sparsity=0.8, bits=2)
    n = np.array([lp.n for lp in p.layers])
    pred = np.array([lp.predicted_sparsity for lp in p.layers])
    assert np.dot(n, pred) / n.sum() == pytest.approx(0.8, abs=1e-9)


def test_opq_beats_global_and_uniform_on_its_objective():
    w = laplace_net(5)
    res = {m: plan(w, sparsity=0.9, bits=2, method=m) for m in ("opq", "global", "uniform")}
    objs = {m: objective(p, w, p.masks(w)) for m, p in res.items()}
    # objective with opq's q for every mask
    ref = res["opq"]
    o = {m: objective(ref, w, p.masks(w)) for m, p in res.items()}
    assert o["opq"] <= o["global"] and o["opq"] <= o["uniform"]
    assert objs["opq"] == pytest.approx(ref.predicted_error, rel=1e-9)


def test_eight_bits_approaches_global_magnitude_pruning():
    w = laplace_net(6, spread=False)
    g = plan(w, sparsity=0.7, bits=8, method="global").masks(w)
    o8 = plan(w, sparsity=0.7, bits=8).masks(w)
    o2 = plan(w, sparsity=0.7, bits=2).masks(w)
    agree = lambda a: np.mean(np.concatenate([(a[k] == g[k]).ravel() for k in g]))  # noqa: E731
    assert agree(o8) > 0.995
    assert agree(o8) > agree(o2)


def test_layerwise_channelwise_uses_one_scale():
    w = laplace_net(2)
    p = plan(w, sparsity=0.5, channelwise="layer")
    for lp in p.layers:
        assert np.all(lp.channel_scale == lp.channel_scale[0])


@pytest.mark.parametrize("grid", ["offset", "symmetric"])
@pytest.mark.parametrize("error_model", ["laplace", "empirical"])
def test_grids_and_models_run_and_count(grid, error_model):
    w = laplace_net(8)
    p = plan(w, sparsity=0.8, bits=3, grid=grid, error_model=error_model)
    assert p.kept == p.n - round(0.8 * p.n)
    assert all(lp.step > 0 and lp.quant_error > 0 for lp in p.layers)


def test_json_round_trip_is_exact():
    w = laplace_net(9)
    for kw in (dict(sparsity=0.9), dict(rate=60), dict(sparsity=0.5, method="uniform", grid="symmetric")):
        p = plan(w, **kw)
        text = p.to_json()
        q = Plan.from_json(text)
        assert q == p and q.to_json() == text
        assert json.loads(text)["totals"]["paper_rate"] == pytest.approx(p.paper_rate)
        for a, b in zip(p.layers, q.layers):
            assert np.array_equal(a.channel_scale, b.channel_scale)
            assert a.lam == b.lam or (math.isinf(a.lam) and math.isinf(b.lam))


def test_scales_are_float16_exact():
    p = plan(laplace_net(10), sparsity=0.5)
    for lp in p.layers:
        assert lp.scale_dtype == "float16"
        assert np.array_equal(lp.channel_scale.astype(np.float16).astype(np.float64), lp.channel_scale)


def test_repr_has_a_row_per_layer_and_totals():
    p = plan(laplace_net(0), sparsity=0.9)
    r = repr(p)
    for lp in p.layers:
        assert lp.name in r
    assert "total" in r and "paper_rate" in r and "success=True" in r


# ---------------------------------------------------------------- budget mode

def budget_objective_exhaustive(w, S, bits_set):
    """Exhaustive optimum of sum pruned w^2 + sum kept c_B s^2 s.t. sum B nnz <= S and at
    least one weight per layer (for fixed B the best k kept are the k top scores)."""
    names = list(w)
    per_layer = []
    for n in names:
        x = np.asarray(w[n], np.float64).reshape(w[n].shape[0], -1)
        s = np.abs(x).mean(1).astype(np.float16).astype(np.float64)
        opts = []
        for b in bits_set:
            c = em.quantization_constant(b)
            sc = (x * x - c * s[:, None] ** 2).ravel()
            sq = (x * x).ravel()
            qq = (c * np.broadcast_to(s[:, None] ** 2, x.shape)).ravel()
            order = np.argsort(-sc, kind="stable")
            for k in range(1, x.size + 1):
                keep = order[:k]
                err = sq.sum() - sq[keep].sum() + qq[keep].sum()
                opts.append((b * k, err))
        per_layer.append(opts)
    best = math.inf
    for combo in itertools.product(*per_layer):
        cost = sum(c for c, _ in combo)
        if cost <= S:
            best = min(best, sum(e for _, e in combo))
    return best


def test_budget_never_exceeded_and_near_exhaustive():
    rng = np.random.default_rng(11)
    worst = 0.0
    exact = 0
    for trial in range(12):
        L = int(rng.integers(2, 4))
        w = {f"l{i}": rng.laplace(size=(2, int(rng.integers(2, 4)))) * 10 ** rng.uniform(-1, 0.5)
             for i in range(L)}
        N = sum(v.size for v in w.values())
        S = float(rng.integers(L * 2, 4 * N))
        bits_set = (1, 2, 4, 8)
        p = plan(w, budget_bits=S, bits=bits_set, error_model="laplace")
        assert p.size_bits <= S
        best = budget_objective_exhaustive(w, S, bits_set)
        assert p.predicted_error >= best - 1e-9
        gap = (p.predicted_error - best) / max(best, 1e-12)
        worst = max(worst, gap)
        exact += gap < 1e-9
    # stated tolerance (README): Lagrangian + exchange search + greedy fill is within 20 % of
    # the exhaustive optimum on these tiny problems, and exact on most draws (measured on 60
    # draws of this generator: 54 exact, worst gap 3.1 %; the first solver: 53, 38 %)
    assert worst <= 0.20, worst
    assert exact >= 9, exact


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), rate=st.floats(2.0, 400.0))
def test_budget_cost_never_exceeds(seed, rate):
    w = laplace_net(seed, sizes=((16, 8, 3, 3), (32, 16), (10, 32)))
    p = plan(w, rate=rate)
    if p.success:
        assert p.size_bits <= 32 * p.n / rate + 1e-9
        assert p.paper_rate >= rate * (1 - 1e-12)
        for m, lp in zip(p.masks(w).values(), p.layers):
            assert int(m.sum()) == lp.kept


def test_budget_error_monotone_in_budget():
    w = laplace_net(12)
    errs = [plan(w, rate=r).predicted_error for r in (400, 200, 100, 50, 25, 12, 6, 3)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs


def test_budget_mixed_bits_beats_fixed_bits_at_same_size():
    w = laplace_net(13)
    fixed = plan(w, sparsity=0.9, bits=4)
    mixed = plan(w, budget_bits=fixed.size_bits)
    assert mixed.size_bits <= fixed.size_bits
    assert mixed.predicted_error <= fixed.predicted_error


def test_infeasible_budget_names_smallest_feasible():
    w = laplace_net(0)
    p = plan(w, budget_bits=3, min_density=0)
    assert not p.success and p.status == 2
    assert p.min_budget_bits == 4.0 and "smallest feasible 4 bits" in p.message


def test_fixed_bits_budget():
    w = laplace_net(14)
    p = plan(w, rate=100, bits=2)
    assert all(lp.bits == 2 for lp in p.layers) and p.paper_rate >= 100


# ---------------------------------------------------------------- edge cases

def test_all_zero_layer_and_tiny_layer():
    rng = np.random.default_rng(0)
    w = {"zero": np.zeros((4, 4), np.float32), "tiny": rng.laplace(size=(2, 1)).astype(np.float32),
         "big": rng.laplace(size=(64, 64)).astype(np.float32)}
    p = plan(w, sparsity=0.5, bits=8)
    assert p["zero"].kept == 0 and np.all(np.isfinite(p["zero"].channel_scale))
    assert p.n - p.kept >= round(0.5 * p.n)
    assert all(math.isfinite(lp.predicted_error) for lp in p.layers)
    pb = plan(w, rate=20)
    assert pb["zero"].kept == 0 and pb.size_bits <= 32 * pb.n / 20


def test_zero_channel_is_pruned_whole():
    rng = np.random.default_rng(1)
    x = rng.laplace(size=(4, 8)).astype(np.float32)
    x[2] = 0
    p = plan({"w": x}, sparsity=0.0)
    m = p.masks({"w": x})["w"]
    assert not m[2].any() and m[[0, 1, 3]].all()
    assert p.status == 1
    # the kernels get scale 1 for the dead channel; it decodes to exact zeros
    q = plan({"w": x}, sparsity=0.5)
    out = q.apply({"w": x})["w"]
    assert np.all(out[2] == 0) and int(np.count_nonzero(out)) == q.kept
    assert q.layers[0].kernel_scale[2] == 1.0 and q.layers[0].channel_scale[2] == 0.0


def test_float16_and_non_contiguous_inputs():
    rng = np.random.default_rng(2)
    a = rng.laplace(size=(32, 48)).astype(np.float16)
    b = np.asfortranarray(rng.laplace(size=(40, 24)))[:, ::2]
    p = plan({"a": a, "b": b}, sparsity=0.6)
    assert p.kept == p.n - round(0.6 * p.n)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), ValueError, r"sparsity .* got -0.1"),
    (dict(sparsity=0.5, bits=0), ValueError, r"bits .* got 0"),
    (dict(sparsity=0.5, bits=9), ValueError, r"bits .* got 9"),
    (dict(rate=1.0), ValueError, r"rate must be .* > 1.*got 1.0"),
    (dict(rate=0.5), ValueError, r"rate .* got 0.5"),
    (dict(), ValueError, r"give sparsity="),
    (dict(sparsity=0.5, rate=10), ValueError, r"not both"),
    (dict(sparsity=0.5, method="magic"), ValueError, r"method must be one of .* got 'magic'"),
    (dict(sparsity=0.5, grid="log"), ValueError, r"grid .* 'log'"),
    (dict(sparsity=0.5, exclude=["nope"]), ValueError, r"exclude: no tensor named 'nope'"),
])
def test_bad_arguments(kwargs, exc, pattern):
    w = {"fc": np.ones((4, 4), np.float32)}
    with pytest.raises(exc, match=pattern):
        plan(w, **kwargs)


def test_non_float_tensors_are_kept_and_skipped():
    # a BERT-style checkpoint: int64 position ids of ndim 2, a bool mask, an excluded name
    w = {"emb": np.random.default_rng(0).laplace(size=(16, 8)).astype(np.float32),
         "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
         "mask": np.ones((4, 4), bool), "head": np.ones((8, 8), np.float32)}
    p = plan(w, sparsity=0.5, exclude=["head"])
    assert p.names == ["emb"]
    assert set(p.skipped) == {"position_ids", "mask", "head"}
    # excluding a non-float tensor is accepted too
    assert plan(w, sparsity=0.5, exclude=["position_ids"]).names == ["emb", "head"]


def test_bad_weights():
    with pytest.raises(ValueError, match="empty"):
        plan({}, sparsity=0.5)
    with pytest.raises(ValueError, match="no compressible layer"):
        plan({"b": np.ones(5, np.float32)}, sparsity=0.5)
    with pytest.raises(ValueError, match="no compressible layer"):
        plan({"fc": np.ones((3, 3), np.int32)}, sparsity=0.5)
    bad = np.ones((3, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"'conv'.*nan.*\(1, 2\)"):
        plan({"conv": bad}, sparsity=0.5)
    with pytest.raises(TypeError, match="mapping"):
        plan([np.ones((2, 2))], sparsity=0.5)


def test_integer_buffers_are_skipped():
    w = {"fc": np.ones((4, 4), np.float32), "bn.num_batches_tracked": np.array(3)}
    p = plan(w, sparsity=0.5)
    assert p.skipped == ("bn.num_batches_tracked",)


def test_masks_reject_other_model():
    w = laplace_net(0)
    p = plan(w, sparsity=0.5)
    other = dict(w)
    other["layer1.weight"] = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"'layer1.weight'.*shape \(3, 3\).*another model"):
        p.masks(other)


def test_lazy_file_source_gives_the_same_plan(tmp_path):
    """A file opened lazily is read tensor by tensor on each pass; the plan is identical."""
    from safetensors.numpy import save_file

    from opq_core import open_weights
    rng = np.random.default_rng(5)
    w = {"a.weight": rng.laplace(size=(32, 16, 3, 3)).astype(np.float32),
         "a.bias": rng.normal(size=32).astype(np.float32),
         "b.weight": (0.3 * rng.laplace(size=(10, 512))).astype(np.float16)}
    save_file(w, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **w)
    for name in ("w.safetensors", "w.npz"):
        with open_weights(tmp_path / name) as lazy:
            for kw in (dict(sparsity=0.8), dict(sparsity=0.6, method="uniform"),
                       dict(rate=40)):
                a = plan(lazy, **kw)
                b = plan(w, **kw)
                assert a.to_dict()["layers"] == b.to_dict()["layers"], (name, kw)
                assert a.skipped == b.skipped == ("a.bias",)



def test_a_layer_pruned_entirely_is_reported():
    rng = np.random.default_rng(4)
    w = {"big": rng.laplace(size=(64, 288)), "tiny": 1e-3 * rng.laplace(size=(10, 64))}
    with pytest.warns(UserWarning, match="prunes every weight of tiny"):
        p = plan(w, sparsity=0.9, min_density=0)
    assert p["tiny"].kept == 0 and "pruned beyond 99 %: tiny (100.00 %)" in p.message
    assert p.status == 0  # the target is met exactly; the warning is advice


def test_budget_objective_no_worse_than_the_first_solver():
    # the exchange search tries a bounded number of ranked width changes per pass; on
    # tiny random problems it must reach the objective of the first solver (every change,
    # four first-improvement passes: tests/reference.py), or a better one
    from reference import budget_objective_v1
    rng = np.random.default_rng(21)
    better = 0
    for trial in range(30):
        L = int(rng.integers(2, 7))
        w = {f"l{i}": rng.laplace(size=(int(rng.integers(1, 4)), int(rng.integers(2, 6))))
             * 10 ** rng.uniform(-1, 0.5) for i in range(L)}
        N = sum(v.size for v in w.values())
        S = float(rng.integers(L * 2, 4 * N))
        bits_set = ((1, 2, 4, 8), (1, 2, 3, 4, 5, 6, 7, 8), (2, 3))[trial % 3]
        old = budget_objective_v1(w, S, bits_set)
        p = plan(w, budget_bits=S, bits=bits_set, error_model="laplace")
        if old is None:
            continue
        assert p.size_bits <= S
        assert p.predicted_error <= old + 1e-9 * abs(old), (trial, p.predicted_error, old)
        better += p.predicted_error < old - 1e-9 * abs(old)
