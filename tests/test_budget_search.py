"""The compiled ratio bisection of the budget solver's exchange search against the plain bisection it
replaced (per layer searchsorted on the negated gains, 100 halvings)."""
from __future__ import annotations

import numpy as np
import pytest

from opq_core import _budget


def _python_counts(gains, b, base, S):
    L = len(gains)

    def counts(mu):
        return np.array([max(base[i], int(np.searchsorted(-gains[i], -mu * b[i], side="left")))
                         if gains[i].size else 0 for i in range(L)], dtype=np.int64)
    k = counts(0.0)
    if float(np.dot(k, b)) <= S:
        return k, False
    lo, hi = 0.0, max(float(gains[i][0] / b[i]) for i in range(L) if gains[i].size) * 2 + 1e-300
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if float(np.dot(counts(mid), b)) <= S:
            hi = mid
        else:
            lo = mid
    return counts(hi), True


@pytest.mark.parametrize("seed", range(8))
def test_ratio_counts_match_the_python_bisection(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 7))
    gains = [np.sort(rng.exponential(size=int(rng.integers(0, 40))) * 10 ** rng.uniform(-2, 1))[::-1]
             for _ in range(L)]
    if not any(g.size for g in gains):
        gains[0] = np.array([1.0])
    if seed % 3 == 0:  # ties across layers
        gains[0] = np.repeat(gains[0][:3], 3) if gains[0].size else gains[0]
    b = rng.choice([1.0, 2.0, 4.0, 8.0], size=L)
    base = np.array([int(g.size > 0) for g in gains], dtype=np.int64)
    total = sum(g.size * bi for g, bi in zip(gains, b))
    for S in (float(np.dot(base, b)), total * 0.3, total * 0.7, total + 5):
        want, bisected = _python_counts(gains, b, base, S)
        neg = np.concatenate([-g for g in gains])
        sz = np.array([g.size for g in gains], dtype=np.int64)
        st = np.concatenate(([0], np.cumsum(sz)[:-1])).astype(np.int64)
        k = np.empty(L, dtype=np.int64)
        got_bisected = _budget._ratio_counts(neg, st, sz, b, base, S, k)
        assert bool(got_bisected) == bisected
        assert np.array_equal(k, want)
