"""The one-pass exact-count selection against a full sort."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from opq_core.select import band_scan, recount, select_global

import reference


def oracle(ws, qcs, s2s, deads, k):
    """Full sort of all scores in network order; ties: later ones pruned first."""
    scores, sq, s2, lid = [], [], [], []
    for i, (w, q, s, d) in enumerate(zip(ws, qcs, s2s, deads)):
        m = np.asarray(w, np.float64).reshape(w.shape[0], -1)
        sc = m * m - q[:, None]
        sc[d] = -np.inf
        scores.append(sc.ravel())
        sq.append((m * m).ravel())
        s2.append(np.broadcast_to(s[:, None], m.shape).ravel())
        lid.append(np.full(m.size, i))
    sc = np.concatenate(scores)
    pos = np.arange(sc.size)
    order = np.lexsort((-pos, sc))  # ascending score, later position first
    pr = order[:k]
    lid = np.concatenate(lid)
    L = len(ws)
    pruned = np.bincount(lid[pr], minlength=L)
    perr = np.bincount(lid[pr], weights=np.concatenate(sq)[pr], minlength=L)
    ps2 = np.bincount(lid[pr], weights=np.concatenate(s2)[pr], minlength=L)
    lam = sc[order[k - 1]] if k else -np.inf
    return lam, pruned, perr, ps2


def problem(rng, L, ties=False, dead=False):
    ws, qcs, s2s, deads = [], [], [], []
    for _ in range(L):
        C = int(rng.integers(1, 40))
        fan = int(rng.integers(1, 300))
        w = rng.laplace(size=(C, fan)) * 10 ** rng.uniform(-2, 0)
        if ties:
            w = np.round(w * 4) / 4
        w = w.astype(np.float32)
        s = np.abs(w).astype(np.float64).mean(1)
        d = s <= 0
        if dead and C > 1:
            w[0] = 0
            s[0] = 0
            d[0] = True
        q = 0.3 * s * s
        ws.append(w); qcs.append(q); s2s.append(s * s); deads.append(d)
    return ws, qcs, s2s, deads


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), L=st.integers(1, 5), frac=st.floats(0, 1),
       ties=st.booleans(), dead=st.booleans())
def test_selection_equals_full_sort(seed, L, frac, ties, dead):
    rng = np.random.default_rng(seed)
    ws, qcs, s2s, deads = problem(rng, L, ties, dead)
    N = sum(w.size for w in ws)
    k = int(round(frac * N))
    sel = select_global(ws, qcs, s2s, deads, k)
    lam, pruned, perr, ps2 = oracle(ws, qcs, s2s, deads, k)
    assert sel.lam == lam
    assert np.array_equal(sel.pruned, pruned)
    np.testing.assert_allclose(sel.pruning_error, perr, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(sel.pruned_s2, ps2, rtol=1e-12, atol=1e-300)


def test_band_miss_is_repaired():
    # a tiny sample and no margin make the first band miss; the answer stays exact
    rng = np.random.default_rng(3)
    ws, qcs, s2s, deads = problem(rng, 4)
    N = sum(w.size for w in ws)
    k = N // 3
    sel = select_global(ws, qcs, s2s, deads, k, sample_size=8, margin=0.0)
    lam, pruned, *_ = oracle(ws, qcs, s2s, deads, k)
    assert sel.lam == lam and np.array_equal(sel.pruned, pruned)


def test_large_layer_uses_one_pass():
    rng = np.random.default_rng(4)
    w = rng.laplace(size=(512, 2048)).astype(np.float32)
    s = np.abs(w).astype(np.float64).mean(1)
    sel = select_global([w], [0.05 * s * s], [s * s], [s <= 0], 900_000)
    lam, pruned, *_ = oracle([w], [0.05 * s * s], [s * s], [s <= 0], 900_000)
    assert sel.passes == 1 and sel.lam == lam and pruned[0] == sel.pruned[0]


def test_k_out_of_range():
    w = np.ones((2, 2), np.float32)
    s = np.ones(2)
    with pytest.raises(ValueError, match="cannot prune 5 of 4"):
        select_global([w], [s], [s], [s <= 0], 5)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), L=st.integers(2, 5), frac=st.floats(0.05, 0.95),
       shift=st.integers(-400, 400), ties=st.booleans(), dead=st.booleans())
def test_recount_on_a_subset_equals_the_selection(seed, L, frac, shift, ties, dead):
    """The counts of a subset of the layers, taken from a kept band pass, are those of a
    selection over that subset alone (the plan's floor rounds rely on it)."""
    rng = np.random.default_rng(seed)
    ws, qcs, s2s, deads = problem(rng, L, ties, dead)
    N = sum(w.size for w in ws)
    sel = select_global(ws, qcs, s2s, deads, int(round(frac * N)), keep_band=True)
    assume(sel.band is not None)  # no band pass when only all-zero channels are pruned
    drop = int(rng.integers(L))
    keep = [i for i in range(L) if i != drop]
    sub = [ws[i] for i in keep], [qcs[i] for i in keep], [s2s[i] for i in keep], \
        [deads[i] for i in keep]
    k = int(sel.pruned[keep].sum()) + shift
    k = min(max(k, 0), sum(w.size for w in sub[0]))
    got = recount([sel.band[i] for i in keep], k)
    _, want, *_ = oracle(*sub, k)
    if got is not None:
        assert np.array_equal(got, want)
    else:  # the k-th smallest score of the subset lies outside the band
        below = sum(sel.band[i].below for i in keep)
        assert not below < k <= below + sum(sel.band[i].score.size for i in keep)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31), ties=st.booleans(), dead=st.booleans(),
       running=st.booleans(), band=st.sampled_from(["inner", "all", "upper", "lower"]))
def test_band_scan_equals_the_oracle_bit_for_bit(seed, ties, dead, running, band):
    # the one band scan of the selection (per-row sums) and of the size-budget solver
    # (running sums): counts, sums and candidates, in order, equal to a loop over weights
    rng = np.random.default_rng(seed)
    (w,), (q,), (s2,), (d,) = problem(rng, 1, ties, dead)
    sc = np.asarray(w, np.float64) ** 2 - q[:, None]
    a, b = np.sort(rng.choice(sc.ravel(), 2))
    lo, hi = {"inner": (a, b), "all": (-np.inf, np.inf), "upper": (a, np.inf),
              "lower": (-np.inf, b)}[band]
    got = band_scan(w, q, s2, d, lo, hi, 0.01, running=running)
    want = reference.band_scan(w, q, s2, d, lo, hi, running)
    assert (got.below, got.below_sq, got.below_s2) == want[:3]
    for g, e in zip((got.score, got.sq, got.s2, got.idx), want[3:]):
        assert g.dtype == e.dtype and g.tobytes() == e.tobytes()
    assert got.above == w.size - want[0] - want[3].size
