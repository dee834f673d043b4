"""ANNC projections against exhaustive, dynamic-programming and full-sort oracles."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opq_core.allocate import Plan
from opq_core.annc import (annc_budget, annc_plan, choose_bits, kmeans_zero_anchored,
                           min_budget_bits, project, prune_to_budget, quantize_projection)
from opq_core.codebook import fake_quant_codebook


# --------------------------------------------------------------------------------------
# oracles
# --------------------------------------------------------------------------------------

def greedy_oracle(ws, bits, S, min_kept=1):
    """The greedy by a full sort of all densities (ties: earlier layer, earlier index)."""
    d, lid, idx = [], [], []
    forced = {}
    for i, w in enumerate(ws):
        x = np.asarray(w, np.float64).reshape(-1)
        sq = x * x
        d.append(sq / float(bits[i]))
        lid.append(np.full(x.size, i))
        idx.append(np.arange(x.size))
        if min_kept and x.size and sq.max() > 0:
            forced[i] = int(np.argmax(sq))
    d, lid, idx = np.concatenate(d), np.concatenate(lid), np.concatenate(idx)
    room = S - sum(bits[i] for i in forced)
    keep = [np.zeros(np.size(w), bool) for w in ws]
    for i, j in forced.items():
        keep[i][j] = True
    for t in np.lexsort((idx, lid, -d)):
        if d[t] <= 0:
            break
        i, j = int(lid[t]), int(idx[t])
        if forced.get(i) == j:
            continue
        if bits[i] <= room:
            keep[i][j] = True
            room -= bits[i]
    return keep


def kept_value(ws, masks):
    return sum(float(np.sum(np.asarray(w, np.float64).reshape(-1)[m.reshape(-1)] ** 2))
               for w, m in zip(ws, masks))


def exhaustive_knapsack(ws, bits, S, min_kept):
    flat = [np.asarray(w, np.float64).reshape(-1) for w in ws]
    items = [(i, j) for i, x in enumerate(flat) for j in range(x.size)]
    forced = set()
    if min_kept:
        for i, x in enumerate(flat):
            if x.size and np.max(x * x) > 0:
                forced.add((i, int(np.argmax(x * x))))
    best = -1.0
    for choice in itertools.product((0, 1), repeat=len(items)):
        sel = [it for it, c in zip(items, choice) if c]
        if not forced <= set(sel):
            continue
        if sum(bits[i] for i, _ in sel) > S:
            continue
        best = max(best, sum(flat[i][j] ** 2 for i, j in sel))
    return best


def kmeans_exhaustive(v, K):
    """Min squared error over every labelling with at most K sign-pure clusters."""
    v = np.asarray(v, np.float64)
    best = math.inf
    for lab in itertools.product(range(K), repeat=v.size):
        lab = np.array(lab)
        err = 0.0
        ok = True
        for k in range(K):
            g = v[lab == k]
            if g.size == 0:
                continue
            if (g < 0).any() and (g >= 0).any():
                ok = False
                break
            err += float(np.sum((g - g.mean()) ** 2))
        if ok:
            best = min(best, err)
    return best


def kmeans_naive_dp(a, k):
    """O(k n^2) DP on sorted values (one sign)."""
    a = np.sort(np.asarray(a, np.float64))
    n = a.size
    if k >= n:
        return 0.0

    def sse(i, j):
        g = a[i:j]
        return float(np.sum((g - g.mean()) ** 2))
    D = np.full((k + 1, n + 1), math.inf)
    D[0, 0] = 0.0
    for kk in range(1, k + 1):
        for j in range(kk, n + 1):
            D[kk, j] = min(D[kk - 1, i] + sse(i, j) for i in range(kk - 1, j))
    return D[k, n]


def rand_layers(rng, L, max_c=6, max_f=30, ties=False, zeros=False):
    ws = []
    for _ in range(L):
        w = rng.laplace(size=(int(rng.integers(1, max_c)), int(rng.integers(1, max_f))))
        w *= 10 ** rng.uniform(-1, 0)
        if ties:
            w = np.round(w * 4) / 4
        if zeros:
            w[rng.random(w.shape) < 0.3] = 0.0
        ws.append(w.astype(np.float32))
    return ws


def as_dict(ws):
    return {f"l{i}": w for i, w in enumerate(ws)}


# --------------------------------------------------------------------------------------
# pruning projection
# --------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), L=st.integers(1, 4), frac=st.floats(0.0, 1.2),
       ties=st.booleans(), zeros=st.booleans(), min_kept=st.sampled_from([0, 1]))
def test_prune_equals_full_sort_greedy(seed, L, frac, ties, zeros, min_kept):
    rng = np.random.default_rng(seed)
    ws = rand_layers(rng, L, ties=ties, zeros=zeros)
    bits = [int(b) for b in rng.integers(1, 9, size=L)]
    full = sum(w.size * b for w, b in zip(ws, bits))
    S = max(int(frac * full), sum(bits))
    r = prune_to_budget(as_dict(ws), bits, S, min_kept=min_kept)
    ref = greedy_oracle(ws, bits, S, min_kept)
    for i, w in enumerate(ws):
        assert np.array_equal(r.masks[f"l{i}"].reshape(-1), ref[i]), i
        assert r.masks[f"l{i}"].shape == w.shape
    assert r.size_bits == sum(int(m.sum()) * b for m, b in zip(ref, bits)) <= S
    perr = [float(np.sum(w.astype(np.float64)[~r.masks[f"l{i}"]] ** 2)) for i, w in enumerate(ws)]
    np.testing.assert_allclose(r.pruning_error, perr, rtol=1e-9, atol=1e-12)


def test_prune_large_equals_full_sort_and_band_repair():
    rng = np.random.default_rng(7)
    ws = [(rng.laplace(size=(64, 1200)) * s).astype(np.float32) for s in (0.05, 0.2, 0.01)]
    ws.append(np.round(rng.laplace(size=(30, 100)) * 8).astype(np.float32) / 8)  # ties
    bits = [3, 5, 2, 8]
    S = int(0.15 * sum(w.size * b for w, b in zip(ws, bits)))
    ref = greedy_oracle(ws, bits, S)
    for kw in ({}, {"sample_size": 50, "margin": 0.0}):
        r = prune_to_budget(as_dict(ws), bits, S, **kw)
        for i in range(len(ws)):
            assert np.array_equal(r.masks[f"l{i}"].reshape(-1), ref[i])
        assert r.size_bits <= S and S - r.size_bits < max(bits)


def test_prune_fill_below_the_band():
    # the leftover after the cut fits only 1-bit items, which all lie far below the band
    rng = np.random.default_rng(3)
    big = (rng.laplace(size=(50, 400)) + np.sign(rng.normal(size=(50, 400))) * 5).astype(np.float32)
    tiny = (rng.laplace(size=(4, 10)) * 1e-3).astype(np.float32)
    ws = [big, tiny]
    bits = [8, 1]
    S = 8 * 5000 + 5
    r = prune_to_budget(as_dict(ws), bits, S)
    ref = greedy_oracle(ws, bits, S)
    assert np.array_equal(r.masks["l0"].reshape(-1), ref[0])
    assert np.array_equal(r.masks["l1"].reshape(-1), ref[1])
    assert r.size_bits == S


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), same=st.booleans(), min_kept=st.sampled_from([0, 1]))
def test_prune_vs_exhaustive(seed, same, min_kept):
    """Equal bits: the greedy is the 0-1 optimum. Mixed bits: within one item's value."""
    rng = np.random.default_rng(seed)
    n1, n2 = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    ws = [rng.laplace(size=n1).astype(np.float32), rng.laplace(size=n2).astype(np.float32)]
    bits = [3, 3] if same else [int(b) for b in rng.integers(1, 9, size=2)]
    S = int(rng.integers(sum(bits), sum(bits) + 3 * max(bits) * (n1 + n2) // 2 + 1))
    r = prune_to_budget(as_dict(ws), bits, S, min_kept=min_kept)
    got = kept_value(ws, [r.masks["l0"], r.masks["l1"]])
    opt = exhaustive_knapsack(ws, bits, S, min_kept)
    assert r.size_bits <= S
    if same:
        assert got == pytest.approx(opt, rel=1e-12)
    else:
        vmax = max(float(np.max(np.asarray(w, np.float64) ** 2)) for w in ws)
        assert opt - vmax - 1e-9 <= got <= opt + 1e-9


def test_prune_zeros_never_kept_and_everything_fits():
    w = {"a": np.array([0.0, 1.0, -2.0]), "b": np.zeros(4)}
    r = prune_to_budget(w, 4, 10_000)
    assert r.masks["a"].tolist() == [False, True, True] and not r.masks["b"].any()
    assert r.size_bits == 8


def test_prune_bad_input():
    w = {"a": np.array([1.0, np.inf])}
    with pytest.raises(ValueError, match=r"weights\['a'\].*inf.*\(1,\)"):
        prune_to_budget(w, 2, 10)
    with pytest.raises(ValueError, match=r"bits\['a'\] must be in 1..8, got 9"):
        prune_to_budget({"a": np.ones(2)}, 9, 10)
    with pytest.raises(ValueError, match="smallest feasible budget.*16 bits"):
        prune_to_budget({"a": np.ones(2), "b": np.ones(2)}, 8, 10)
    with pytest.raises(ValueError, match="budget_bits"):
        prune_to_budget({"a": np.ones(2)}, 2, -1)
    with pytest.raises(TypeError, match=r"weights\['a'\].*int64"):
        prune_to_budget({"a": np.ones(2, np.int64)}, 2, 10)


# --------------------------------------------------------------------------------------
# zero-anchored k-means
# --------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 7), b=st.sampled_from([1, 2]))
def test_kmeans_optimal_vs_exhaustive(seed, n, b):
    rng = np.random.default_rng(seed)
    v = np.round(rng.laplace(size=n) * 4) / 4
    r = kmeans_zero_anchored(v, bits=(b,))
    opt = kmeans_exhaustive(v, 2 ** b)
    assert r.exact
    assert r.errors[0] == pytest.approx(opt, rel=1e-9, abs=1e-12)
    c = r.codebooks[0]
    assert c.size <= 2 ** b and np.all(c != 0) and np.all(np.diff(c) > 0)
    # quantizing with the codebook (nearest centroid, which may cross zero where the
    # sign-pure clustering may not) can only do better than the clustering itself
    # (centroids are float32-rounded means, hence the tolerance)
    if np.all(v != 0):
        wh = fake_quant_codebook(v, np.ones(v.size, bool), c)
        assert float(np.sum((v - wh) ** 2)) <= opt * (1 + 1e-5) + 1e-9


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 40), k=st.integers(1, 9))
def test_dp_equals_naive_dp(seed, n, k):
    from opq_core.annc.kmeans import _Side
    rng = np.random.default_rng(seed)
    a = np.sort(np.abs(rng.laplace(size=n)))
    s = _Side(a, exact_max=10_000, max_iter=50)
    e, c = s.get(k)
    assert e == pytest.approx(kmeans_naive_dp(a, k), rel=1e-9, abs=1e-12)
    assert c.size == min(k, np.unique(a).size)


def test_kmeans_sides_and_zero_anchor():
    rng = np.random.default_rng(0)
    v = rng.laplace(size=500)
    v = v[np.abs(v) > 0.2]  # pruned weights removed: a gap around 0
    r = kmeans_zero_anchored(v)
    assert r.exact and r.bits == tuple(range(1, 9))
    assert np.all(np.diff(r.errors) <= 0)                # monotone in b
    for b, c in zip(r.bits, r.codebooks):
        assert c.size <= 2 ** b and np.all(c != 0)
        assert np.array_equal(c.astype(np.float32).astype(np.float64), c)
        m = np.ones(v.size, bool)
        wh = fake_quant_codebook(v, m, c)
        assert np.all(np.sign(wh) == np.sign(v))         # no kept weight crosses 0
    # only positives: every centroid positive
    rp = kmeans_zero_anchored(np.abs(v), bits=(2,))
    assert np.all(rp.codebooks[0] > 0)
    # a kept exact zero gets the smallest positive float32, never 0
    rz = kmeans_zero_anchored([0.0, 0.0, 1.0, 2.0, 3.0], bits=(1,))
    assert np.all(rz.codebooks[0] != 0) and rz.codebooks[0][0] > 0


def test_lloyd_close_to_exact():
    rng = np.random.default_rng(1)
    v = rng.laplace(size=1500) * 0.05
    v = v[np.abs(v) > 0.01]
    ex = kmeans_zero_anchored(v, exact_max=10_000)
    ll = kmeans_zero_anchored(v, exact_max=300)
    assert ex.exact and not ll.exact
    assert np.all(ll.errors >= ex.errors * (1 - 1e-9))
    assert np.all(ll.errors <= ex.errors * 1.25 + 1e-12)


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="non-finite.*nan.*index 1"):
        kmeans_zero_anchored([1.0, np.nan])
    with pytest.raises(ValueError, match="bits"):
        kmeans_zero_anchored([1.0], bits=(9,))


# --------------------------------------------------------------------------------------
# multiple-choice knapsack
# --------------------------------------------------------------------------------------

def mckp_brute(E, kept, choices, S):
    best = math.inf
    for sel in itertools.product(range(len(choices)), repeat=E.shape[0]):
        if sum(kept[l] * choices[s] for l, s in enumerate(sel)) <= S:
            err = 0.0
            for l, s in enumerate(sel):
                err += E[l, s]
            best = min(best, err)
    return best


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), L=st.integers(1, 4), frac=st.floats(0.1, 1.0))
def test_mckp_dp_brute_force_and_greedy_bound(seed, L, frac):
    rng = np.random.default_rng(seed)
    choices = (1, 2, 3, 4, 5, 6, 7, 8)
    kept = rng.integers(0, 30, size=L)
    # decreasing, not necessarily convex errors
    E = np.sort(rng.exponential(size=(L, 8)) * rng.exponential(size=(L, 1)), axis=1)[:, ::-1].copy()
    E[rng.random(E.shape) < 0.2] *= 0.5
    lo, hi = int(kept.sum()), int(kept.sum()) * 8
    S = lo + int(frac * (hi - lo))
    dp = choose_bits(E, kept, S, method="dp")
    gr = choose_bits(E, kept, S, method="greedy")
    brute = mckp_brute(E, kept, choices, S)
    assert dp.method == "dp" and gr.method == "greedy"
    assert dp.error == pytest.approx(brute, rel=1e-12, abs=1e-15)
    assert dp.cost <= S and gr.cost <= S
    assert dp.cost == int((dp.bits * kept).sum())
    assert gr.lower_bound <= dp.error + 1e-12
    assert dp.error - 1e-12 <= gr.error <= dp.error + gr.gap_bound + 1e-12
    assert choose_bits(E, kept, S).method == "dp"


def test_mckp_infeasible_and_bad_input():
    E = np.ones((2, 8))
    with pytest.raises(ValueError, match="smallest feasible size 20 bits"):
        choose_bits(E, [10, 10], 19)
    with pytest.raises(ValueError, match="shape"):
        choose_bits(np.ones((2, 3)), [1, 1], 10)
    with pytest.raises(ValueError, match="method"):
        choose_bits(E, [1, 1], 10, method="lp")


# --------------------------------------------------------------------------------------
# joint projection, budget and plan
# --------------------------------------------------------------------------------------

def test_project_budget_codebooks_and_plan_round_trip():
    rng = np.random.default_rng(5)
    w = {"conv": rng.laplace(size=(8, 3, 3, 3)).astype(np.float32) * 0.1,
         "fc1": rng.laplace(size=(32, 72)).astype(np.float32) * 0.05,
         "fc2": rng.laplace(size=(10, 32)).astype(np.float32) * 0.2}
    S = annc_budget(w, rate=40)
    assert S == math.floor(32 * sum(v.size for v in w.values()) / 40)
    p = project(w, S, iterations=3)
    assert p.size_bits <= S
    plan = annc_plan(w, p.masks, p.codebooks, p.bits, budget_bits=S)
    assert plan.method == "annc" and plan.success and plan.size_bits == p.size_bits <= S
    assert plan.paper_rate >= 40
    assert Plan.from_json(plan.to_json()) == plan
    deq = plan.apply(w, masks=p.masks)
    V = p.apply(w)
    for n, lp in zip(plan.names, plan.layers):
        assert lp.grid == "codebook" and lp.kept == int(p.masks[n].sum())
        assert lp.codebook.size <= 2 ** lp.bits
        assert np.array_equal(deq[n], V[n])
        assert np.all(deq[n][~p.masks[n]] == 0)
        assert np.all(np.isin(deq[n][p.masks[n]].astype(np.float64), lp.codebook))
        err = float(np.sum((w[n].astype(np.float64) - deq[n]) ** 2))
        assert lp.predicted_error == pytest.approx(err, rel=1e-9)


def test_quantize_projection_respects_budget_and_empty_layer():
    w = {"a": np.array([[-1.0, 0.5, 0.6, 2.0]]), "b": np.zeros((2, 2))}
    m = {"a": np.ones((1, 4), bool), "b": np.zeros((2, 2), bool)}
    q = quantize_projection(w, m, 4)
    assert q.bits.tolist() == [1, 1] and q.size_bits == 4
    assert q.codebooks["b"].tolist() == [1.0]
    with pytest.raises(ValueError, match="masks: .*smallest feasible size 4 bits"):
        quantize_projection(w, m, 3)
    with pytest.raises(ValueError, match=r"masks\['a'\]: shape"):
        quantize_projection(w, {"a": np.ones(4, bool), "b": m["b"]}, 4)


@pytest.mark.parametrize("kw, msg", [
    ({"rate": 1.0}, "rate must be a finite number > 1"),
    ({"rate": 0.5}, "rate must be a finite number > 1"),
    ({"rate": float("nan")}, "rate must be"),
    ({"rate": 1e9}, r"below the smallest feasible budget 2 bits.*largest feasible rate is 480"),
    ({"budget_bits": 1}, "budget_bits=1 is below the smallest feasible budget 2 bits"),
    ({"budget_bits": -3}, "budget_bits must be"),
    ({}, "exactly one"),
])
def test_bad_budgets(kw, msg):
    w = {"a": np.zeros((5, 5)), "b": (5, 1)}
    with pytest.raises((ValueError, TypeError), match=msg):
        annc_budget(w, **kw)


def test_budget_helpers():
    w = {"a": np.zeros((5, 5)), "b": (5, 1)}
    assert min_budget_bits(w) == 2
    assert annc_budget(w, budget_bits=100.7) == 100


def test_annc_plan_validation():
    w = {"fc": np.array([[1.0, -1.0]], np.float32)}
    m = {"fc": np.array([[True, True]])}
    with pytest.raises(ValueError, match=r"codebooks\['fc'\]: 3 centroids do not fit bits=1"):
        annc_plan(w, m, {"fc": [-1.0, 0.5, 1.0]}, {"fc": 1})
    with pytest.raises(ValueError, match="float32"):
        annc_plan(w, m, {"fc": [-1.0, 0.1]}, {"fc": 1})
    with pytest.raises(ValueError, match=r"bits\['fc'\]"):
        annc_plan(w, m, {"fc": [-1.0, 1.0]}, {"fc": 0})
    p = annc_plan(w, m, {"fc": [-1.0, 1.0]}, {"fc": 1}, budget_bits=1)
    assert not p.success and p.status == 2 and "exceeds" in p.message


def _joint_error(p, w):
    """Pruning + quantization error of a projection, from the projected weights."""
    V = p.apply(w)
    return sum(float(np.sum((w[n] - V[n]) ** 2)) for n in p.names)


def test_project_rechooses_bits_when_weights_change_and_freeze_keeps_them():
    rng = np.random.default_rng(0)
    two = np.where(rng.random((16, 16)) < 0.5, -1.0, 1.0)  # exact at 1 bit
    spread = rng.normal(size=(16, 16))                      # wants many bits
    S = 2 * 256 * 3
    p1 = project({"a": two, "b": spread}, S)
    assert p1.bits["a"] < p1.bits["b"]
    # the layers swap roles: warm-started from p1's bits, the bits follow the weights
    w2 = {"a": spread, "b": two}
    p2 = project(w2, S, bits=p1.bits)
    assert p2.bits["a"] > p2.bits["b"]
    # frozen: exactly the given bit-widths, and a worse projection
    p3 = project(w2, S, bits=p1.bits, freeze_bits=True)
    assert p3.bits == p1.bits and p3.quant.choice.method == "fixed"
    assert _joint_error(p2, w2) < _joint_error(p3, w2)
    for p, w in ((p1, {"a": two, "b": spread}), (p2, w2), (p3, w2)):
        counted = sum(int(p.masks[n].sum()) * p.bits[n] for n in p.names)
        assert counted == p.size_bits <= S
        assert all(cb.size <= 2 ** p.bits[n] for n, cb in p.codebooks.items())
    with pytest.raises(ValueError, match="freeze_bits=True needs bits"):
        project(w2, S, freeze_bits=True)


def _total(p):
    """The objective the projection minimizes: pruning error + k-means error table."""
    return float(p.prune.pruning_error.sum()) + p.quant.choice.error


def test_project_warm_start_never_worse_than_cold_start():
    rng = np.random.default_rng(3)
    for _ in range(6):
        w = {f"l{i}": rng.laplace(size=(6, 12)) * rng.uniform(0.2, 3) for i in range(3)}
        S = int(rng.integers(150, 900))
        cold = project(w, S)
        for start in (1, 8, (1, 4, 8)):
            warm = project(w, S, bits=start)
            assert warm.size_bits <= S
            assert _total(warm) <= _total(cold)


def test_quantize_projection_layer_bits():
    w = {"a": np.array([[-1.0, 0.5, 0.6, 2.0]]), "b": np.array([[0.1, 0.2, 0.3, 0.4]])}
    m = {k: np.ones(v.shape, bool) for k, v in w.items()}
    q = quantize_projection(w, m, 12, layer_bits={"a": 1, "b": 2})
    assert q.bits.tolist() == [1, 2] and q.choice.method == "fixed" and q.size_bits == 12
    assert q.codebooks["a"].size <= 2 and q.codebooks["b"].size <= 4
    with pytest.raises(ValueError, match="layer_bits.*above budget_bits=11"):
        quantize_projection(w, m, 11, layer_bits={"a": 1, "b": 2})
    with pytest.raises(ValueError, match=r"layer_bits\['a'\]=3 is not one of"):
        quantize_projection(w, m, 100, bits=(1, 2), layer_bits=3)
