"""Zero-anchored 1-D k-means (exact dynamic programme on small sets, DP + Lloyd above)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._check import BITS
from .._jit import jit
from ._common import _F32_TINY

# ---------------------------------------------------------------------------
# zero-anchored 1-D k-means
# ---------------------------------------------------------------------------

@jit()
def _prefix(a):
    n = a.shape[0]
    s1 = np.zeros(n + 1)
    s2 = np.zeros(n + 1)
    for i in range(n):
        v = a[i]
        s1[i + 1] = s1[i] + v
        s2[i + 1] = s2[i] + v * v
    return s1, s2


@jit()
def _sse(s1, s2, i, j):
    # squared error of the sorted segment a[i:j] around its mean
    n = j - i
    if n <= 0:
        return 0.0
    s = s1[j] - s1[i]
    v = (s2[j] - s2[i]) - s * s / n
    return v if v > 0.0 else 0.0


@jit()
def _dp_table(s1, s2, P, kmax):
    """Optimal k-means of sorted values for k = 1..kmax, cluster boundaries restricted to
    the increasing positions ``P`` (``P[0] = 0``, ``P[-1] = n``; every position = exact).

    ``s1``/``s2``: prefix sums of the values and their squares. Divide-and-conquer rows:
    the smallest optimal split is monotone in the right end."""
    M = P.shape[0] - 1
    D = np.full((kmax + 1, M + 1), np.inf)
    A = np.zeros((kmax + 1, M + 1), np.int64)
    D[0, 0] = 0.0
    for j in range(1, M + 1):
        D[1, j] = _sse(s1, s2, 0, P[j])
    stack = np.empty((4 * (M + 2) + 8, 4), np.int64)
    for k in range(2, kmax + 1):
        # D[k, j] = min_{k-1 <= i < j} D[k-1, i] + sse(P[i], P[j]) for j = k..M
        stack[0, 0] = k
        stack[0, 1] = M
        stack[0, 2] = k - 1
        stack[0, 3] = M - 1
        top = 1
        while top > 0:
            top -= 1
            jlo = stack[top, 0]
            jhi = stack[top, 1]
            olo = stack[top, 2]
            ohi = stack[top, 3]
            if jlo > jhi:
                continue
            mid = (jlo + jhi) >> 1
            best = np.inf
            bi = olo
            hi_i = min(ohi, mid - 1)
            pm = P[mid]
            for i in range(olo, hi_i + 1):
                v = D[k - 1, i] + _sse(s1, s2, P[i], pm)
                if v < best:
                    best = v
                    bi = i
            D[k, mid] = best
            A[k, mid] = bi
            stack[top, 0] = jlo
            stack[top, 1] = mid - 1
            stack[top, 2] = olo
            stack[top, 3] = bi
            top += 1
            stack[top, 0] = mid + 1
            stack[top, 1] = jhi
            stack[top, 2] = bi
            stack[top, 3] = ohi
            top += 1
    return D, A


def _dp_centroids(A, s1, P, k):
    M = P.size - 1
    cuts = [M]
    j = M
    for kk in range(k, 0, -1):
        i = int(A[kk, j]) if kk > 1 else 0
        cuts.append(i)
        j = i
    cuts = [int(P[c]) for c in cuts[::-1]]
    return np.array([(s1[cuts[t + 1]] - s1[cuts[t]]) / (cuts[t + 1] - cuts[t])
                     for t in range(k)])


@jit()
def _lloyd(a, s1, s2, c0, max_iter):
    """Lloyd iterations on sorted ``a`` from centroids ``c0`` (increasing): assign by
    midpoints (ties to the lower centroid), move to the means; ``O(k log n)`` per
    iteration with prefix sums. The error never increases."""
    n = a.shape[0]
    k = c0.shape[0]
    c = c0.copy()
    pos = np.zeros(k + 1, np.int64)
    pos[k] = n
    for it in range(max_iter):
        changed = False
        for i in range(1, k):
            p = np.searchsorted(a, (c[i - 1] + c[i]) / 2.0, side="right")
            if p < pos[i - 1]:
                p = pos[i - 1]
            if p != pos[i]:
                changed = True
                pos[i] = p
        for i in range(k):
            m = pos[i + 1] - pos[i]
            if m > 0:
                c[i] = (s1[pos[i + 1]] - s1[pos[i]]) / m
        if not changed and it > 0:
            break
    err = 0.0
    for i in range(k):
        err += _sse(s1, s2, pos[i], pos[i + 1])
    return c, err


class _Side:
    """Clusterings of one sign's magnitudes (sorted ascending) for any number k.

    At most ``exact_max`` values: the exact DP. More: the DP with boundaries restricted
    to ``exact_max`` candidate positions (half equal-count, half equal-width cuts), then
    Lloyd iterations from its centroids (which can only lower the error)."""

    def __init__(self, a, exact_max, max_iter):
        self.a = a
        self.n = a.size
        self.exact = self.n <= max(exact_max, 0)
        self.max_iter = max_iter
        self._cache = {}
        if not self.n:
            return
        self.s1, self.s2 = _prefix(a)
        if self.exact:
            self.P = np.arange(self.n + 1, dtype=np.int64)
        else:
            half = max(256, exact_max // 2)
            cnt = np.linspace(0, self.n, half + 1).round().astype(np.int64)
            wid = np.searchsorted(a, np.linspace(a[0], a[-1], half + 1), side="right")
            self.P = np.unique(np.concatenate([cnt, wid, [0, self.n]])).astype(np.int64)
        self.kmax = min(self.P.size - 1, 256)
        self.D, self.A = _dp_table(self.s1, self.s2, self.P, self.kmax)

    def error(self, k):
        """The DP error with k clusters (an upper bound when not exact)."""
        if k <= 0:
            return 0.0 if self.n == 0 else math.inf
        if k >= self.n:
            return 0.0
        return float(self.D[min(k, self.kmax), -1])

    def get(self, k):
        """(error, centroids ascending) with k clusters (k >= n: every value its own)."""
        if k <= 0:
            return (0.0, np.zeros(0)) if self.n == 0 else (math.inf, None)
        if k >= self.n:
            return 0.0, np.unique(self.a)
        if k in self._cache:
            return self._cache[k]
        kk = min(k, self.kmax)
        c = _dp_centroids(self.A, self.s1, self.P, kk)
        if self.exact:
            r = float(self.D[kk, -1]), c
        else:
            c, e = _lloyd(self.a, self.s1, self.s2, c, self.max_iter)
            r = float(e), c
        self._cache[k] = r
        return r


def _round_codebook(c):
    """Centroids -> sorted unique float64 values exact in float32, none of them zero."""
    c32 = np.asarray(c, np.float64).astype(np.float32).astype(np.float64)
    zero = c32 == 0.0
    if zero.any():
        c32[zero] = np.where(np.asarray(c)[zero] < 0, -_F32_TINY, _F32_TINY)
    return np.unique(c32)


@dataclass(frozen=True, repr=False)
class KMeansResult:
    """Zero-anchored clusterings of one set of kept weights, one per bit-width.

    ``errors[i]``: squared error with ``2**bits[i]`` non-zero centroids (float64
    centroids); ``codebooks[i]``: those centroids sorted and rounded to float32 values
    (at most ``2**bits[i]``, none zero); ``exact``: the dynamic program was used
    (otherwise Lloyd iterations).
    """

    bits: tuple
    errors: np.ndarray
    codebooks: tuple
    exact: bool

    def __repr__(self):
        e = ", ".join(f"{b}:{v:.4g}" for b, v in zip(self.bits, self.errors))
        return f"KMeansResult(exact={self.exact}, errors={{{e}}})"


def kmeans_zero_anchored(values, bits=BITS, *, exact_max: int = 2048,
                         max_iter: int = 50) -> KMeansResult:
    r"""1-D k-means of kept weights with ``2^b`` non-zero centroids and 0 as fixed anchor.

    Zero is the fixed centroid of the *pruned* weights; a kept weight takes one of the
    ``K = 2^b`` free centroids, none of which is zero. No cluster straddles 0: the
    negative and the positive kept weights are clustered apart (zeros count as positive),
    with ``k_-`` and ``K - k_-`` centroids, so every centroid has the sign of its members:

    .. math::

        E(b) = \min_{k_-} \; E_-(k_-) + E_+(2^b - k_-), \qquad
        E_\pm(k) = \min_{\text{k contiguous groups}} \sum_g \sum_{x \in g} (x - \bar x_g)^2 .

    A side of at most ``exact_max`` values is solved exactly by the dynamic program over
    its sorted values (prefix sums, divide-and-conquer rows, all ``k <= 256`` at once).
    A larger side runs the same program with cluster boundaries restricted to
    ``exact_max`` candidate positions (equal-count and equal-width cuts), then Lloyd
    iterations from its centroids (prefix sums + binary search: ``O(k log n)`` per
    iteration; the error only falls). Every split ``k_-`` is tried on the program's errors.
    The error is made monotone in ``b`` (a wider code may reuse a narrower codebook).

    Parameters
    ----------
    values : array_like of float
        The kept weights (any shape; NaN/inf refused).
    bits : sequence of int in 1..8

    Returns
    -------
    KMeansResult

    Examples
    --------
    >>> r = kmeans_zero_anchored([-2.0, -1.0, 1.0, 3.0, 5.0], bits=(1, 2))
    >>> r.codebooks[0].tolist(), float(r.errors[0])
    ([-1.5, 3.0], 8.5)
    >>> r.codebooks[1].tolist(), float(r.errors[1])
    ([-1.5, 1.0, 3.0, 5.0], 0.5)
    """
    v = np.asarray(values)
    if v.dtype.kind != "f":
        v = v.astype(np.float64)
    v = v.astype(np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise ValueError(f"values: non-finite value {v[i]!r} at index {i}")
    bits = tuple(int(b) for b in bits)
    for bb in bits:
        if not 1 <= bb <= 8:
            raise ValueError(f"bits must be integers in 1..8, got {bb!r}")
    neg = np.sort(-v[v < 0])
    pos = np.sort(v[v >= 0])
    sn = _Side(neg, exact_max, max_iter)
    sp = _Side(pos, exact_max, max_iter)
    nn, npos = neg.size, pos.size
    errs, books = [], []
    best_prev = None
    for bb in sorted(set(bits)):
        K = 1 << bb
        if nn + npos == 0:
            e, cb = 0.0, np.zeros(0)
        elif nn + npos <= K:
            e, cb = 0.0, np.unique(v)
        else:
            lo = 1 if nn else 0
            hi = min(nn, K - (1 if npos else 0))
            best, kbest = math.inf, lo
            for kn in range(lo, hi + 1):  # every split, on the DP errors
                tot = sn.error(kn) + sp.error(K - kn if npos else 0)
                if tot < best:
                    best, kbest = tot, kn
            en, cn = sn.get(kbest)
            ep, cp = sp.get(K - kbest if npos else 0)
            e, cb = en + ep, np.concatenate([-cn[::-1], cp])
        if best_prev is not None and best_prev[0] <= e:
            e, cb = best_prev
        best_prev = (e, cb)
        errs.append(e)
        books.append(cb)
    lookup = {bb: (e, cb) for bb, e, cb in zip(sorted(set(bits)), errs, books)}
    errors = np.array([lookup[bb][0] for bb in bits], dtype=np.float64)
    codebooks = tuple(_round_codebook(lookup[bb][1]) for bb in bits)
    return KMeansResult(bits, errors, codebooks, bool(sn.exact and sp.exact))
