"""Exact-count score selection over a whole network in about one pass over the weights.

The OPQ masks prune the ``k`` weights of smallest score ``w^2 - q_c`` over all layers.
Sorting 25 M scores costs seconds; instead:

1. a deterministic strided sample of the scores gives a band ``[lo, hi]`` that contains the
   k-th smallest score with overwhelming probability (binomial margin);
2. one parallel pass over the weights counts, per layer, the scores below ``lo`` (with the
   sum of their ``w^2`` and ``s_c^2``) and copies the scores inside the band (a few per
   cent) into per-chunk candidate buffers;
3. the k-th smallest is selected among the candidates (``np.partition``), ties resolved by
   position (the later weights in network order are pruned first).

If the band misses (k-th score outside it) or a buffer overflows, the pass is repeated
with a wider band; the last resort is the whole score range, so the answer is always
exact. The result carries per-layer kept counts, pruning error and pruned ``s_c^2`` sums,
which is everything the plan needs without materializing masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._jit import prange, twins
from .stats import as_matrix

__all__ = ["Selection", "select_global", "recount", "sample_scores", "band_half_width"]


def band_half_width(n_samples: int, p: float, margin: float, widen: float = 1.0) -> float:
    """Half-width of the candidate band around the quantile ``p``, as a fraction of the
    population, from a sample of ``n_samples``: five binomial standard deviations of the
    sample's rank plus ``margin``, times ``widen`` (doubled after every miss). Shared by
    this selection and ANNC's pruning projection.

    >>> round(band_half_width(10_000, 0.5, 0.002), 6)
    0.027
    """
    n = max(int(n_samples), 1)
    return widen * (5.0 * math.sqrt(max(n * p * (1.0 - p), 1.0)) / n + margin)


def _band_chunks(x, qc, s2, dead, lo, hi, running, rows_per_chunk, cap, c_score, c_sq, c_s2,
                 c_idx, c_count, b_count, b_sq, b_s2, overflow):
    # One scan of a layer's scores ``w^2 - qc[c]`` in chunks of rows: the scores below
    # ``lo`` are counted (with the sums of their w^2 and s_c^2), the ones inside [lo, hi]
    # copied into the chunk's candidate buffer. ``running``: the sums are accumulated
    # weight by weight into the chunk's totals (the size-budget solver's order); otherwise
    # per row, then added (the selection's order).
    C = x.shape[0]
    fan = x.shape[1]
    # the in-band test is one well-predicted branch on a slightly widened interval, then
    # the exact test (scores beyond +-1e300 are never candidates)
    lo_f = max(lo, -1e300)
    hi_f = min(hi, 1e300)
    mid = 0.5 * lo_f + 0.5 * hi_f
    half = 0.5 * hi_f - 0.5 * lo_f
    half = half + 8.0 * 2.220446049250313e-16 * (abs(mid) + half) + 1e-300
    for ch in prange(c_count.shape[0]):
        r0 = ch * rows_per_chunk
        r1 = min(C, r0 + rows_per_chunk)
        base = ch * cap
        n = 0
        nb = 0
        sqb = 0.0
        s2b = 0.0
        over = False
        for c in range(r0, r1):
            sc2 = s2[c]
            if dead[c]:
                # an all-zero channel: every score is -inf, every w^2 is 0; always counted
                # below the band (never copied: memory does not depend on how many weights
                # are zero; select_global handles k <= the dead count without a pass)
                nb += fan
                s2b += sc2 * fan
                continue
            q = qc[c]
            # branch-free counting (the below/above test is a coin flip near the median)
            nrow = 0.0
            sqrow = sqb if running else 0.0
            s2row = s2b
            for j in range(fan):
                v = np.float64(x[c, j])
                sq = v * v
                score = sq - q
                b = 1.0 if score < lo else 0.0
                nrow += b
                sqrow += sq * b
                if running:
                    s2row += sc2 * b
                if abs(score - mid) <= half:
                    if score >= lo and score <= hi:
                        if n < cap:
                            c_score[base + n] = score
                            c_sq[base + n] = sq
                            c_s2[base + n] = sc2
                            c_idx[base + n] = c * fan + j
                            n += 1
                        else:
                            over = True
            nb += np.int64(nrow)
            if running:
                sqb = sqrow
                s2b = s2row
            else:
                sqb += sqrow
                s2b += sc2 * nrow
        c_count[ch] = n
        b_count[ch] = nb
        b_sq[ch] = sqb
        b_s2[ch] = s2b
        overflow[ch] = over


_band_chunks, _band_chunks_par = twins(_band_chunks)


def _matrix(w):
    m = as_matrix(np.asarray(w))
    if m.dtype == np.float16:
        m = m.astype(np.float32)
    return np.ascontiguousarray(m)


def sample_scores(w, qc, dead, max_samples: int):
    """Deterministic strided sample of one layer's scores (float64)."""
    m = _matrix(w)
    n = m.size
    if n == 0:
        return np.empty(0)
    stride = max(1, n // max(1, max_samples))
    idx = np.arange(0, n, stride, dtype=np.int64)
    flat = m.reshape(-1)[idx].astype(np.float64)
    rows = idx // m.shape[1]
    sc = flat * flat - qc[rows]
    sc[dead[rows]] = -np.inf
    return sc


@dataclass
class _BandPass:
    """One layer's band scan: ``n`` weights, ``below`` of them scoring under ``lo`` (with the
    sums of their ``w^2`` and ``s_c^2``), and the candidates inside the band (score,
    ``w^2``, ``s_c^2``, flat index)."""

    n: int
    lo: float
    below: int
    below_sq: float
    below_s2: float
    score: np.ndarray
    sq: np.ndarray
    s2: np.ndarray
    idx: np.ndarray

    @property
    def above(self):
        return self.n - self.below - self.score.size


def band_scan(w, qc, s2, dead, lo, hi, frac_hint, *, running=False, parallel=True):
    """Scan one layer's scores ``w^2 - qc[c]`` once against the band ``[lo, hi]`` (a
    :class:`_BandPass`). ``frac_hint``, the expected fraction of candidates, sizes the
    buffers (on an overflow they grow and the scan is repeated); ``running``: the sums in
    the size-budget solver's order (see ``_band_chunks``); ``parallel``: the parallel
    kernel when the layer has more than one chunk of rows."""
    m = _matrix(w)
    C, fan = m.shape
    n = m.size
    nchunk = int(min(C, max(1, n // 32768)))
    rows = -(-C // nchunk)
    nchunk = -(-C // rows)
    chunk_elems = rows * fan
    cap = int(min(chunk_elems, math.ceil(frac_hint * chunk_elems * 3) + 256))
    kern = _band_chunks_par if parallel and nchunk > 1 else _band_chunks
    while True:
        size = nchunk * cap
        c_score, c_sq, c_s2 = np.empty(size), np.empty(size), np.empty(size)
        c_idx = np.empty(size, dtype=np.int64)
        c_count = np.zeros(nchunk, dtype=np.int64)
        b_count = np.zeros(nchunk, dtype=np.int64)
        b_sq, b_s2 = np.zeros(nchunk), np.zeros(nchunk)
        overflow = np.zeros(nchunk, dtype=np.bool_)
        kern(m, qc, s2, dead, float(lo), float(hi), bool(running), rows, cap, c_score, c_sq,
             c_s2, c_idx, c_count, b_count, b_sq, b_s2, overflow)
        if not overflow.any():
            break
        cap = min(chunk_elems, cap * 4)
    take = np.concatenate([np.arange(i * cap, i * cap + c_count[i]) for i in range(nchunk)])
    return _BandPass(n, float(lo), int(b_count.sum()), float(b_sq.sum()), float(b_s2.sum()),
                     c_score[take], c_sq[take], c_s2[take], c_idx[take])


@dataclass
class Selection:
    """Outcome of an exact-count selection (per layer arrays, network order)."""

    lam: float            # the largest pruned score (-inf when nothing is pruned)
    pruned: np.ndarray    # int64 per layer
    pruning_error: np.ndarray  # sum of pruned w^2 per layer
    pruned_s2: np.ndarray      # sum of s_c^2 over pruned weights per layer
    passes: int           # passes over the weights made by the band search
    #: the last band pass, one entry per layer (``keep_band=True``; see :func:`recount`)
    band: list | None = None


def select_global(weights, qcs, s2s, deads, k: int, *, sample_size: int | None = None,
                  margin: float = 0.002, sizes=None, keep_band: bool = False) -> Selection:
    """Prune exactly ``k`` weights of smallest score over all layers (see module doc).

    ``weights``: a sequence of arrays (it may fetch each array on access: every array
    is used in turn and dropped, so a lazy sequence bounds memory); ``sizes``: their
    element counts when known (saves fetching them); ``qcs``: per-channel score offsets ``q_c`` (score =
    ``w^2 - q_c``); ``s2s``: per-channel ``s_c^2``; ``deads``: per-channel bool (score
    ``-inf``). ``keep_band``: keep the last band pass in ``Selection.band``.
    """
    L = len(weights)
    if sizes is None:
        sizes = np.array([int(np.prod(np.shape(w))) for w in weights], dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    N = int(sizes.sum())
    pruned = np.zeros(L, dtype=np.int64)
    perr = np.zeros(L)
    ps2 = np.zeros(L)
    if k <= 0:
        return Selection(-math.inf, pruned, perr, ps2, 0)
    if k > N:
        raise ValueError(f"k: cannot prune {k} of {N} weights")
    # dead (all-zero) channels score -inf: they are the first pruned, and are only counted
    n_dead = np.zeros(L, dtype=np.int64)
    for i, d in enumerate(deads):
        d = np.asarray(d, dtype=bool)
        if d.size:
            n_dead[i] = int(np.count_nonzero(d)) * (int(sizes[i]) // d.size)
    if k <= int(n_dead.sum()):
        return _select_dead(deads, s2s, sizes, n_dead, k)
    # 1. band from a stratified sample
    if sample_size is None:
        # 100k samples up to 25.6M weights, then N/256 (at most 4M): the candidate band,
        # whose buffers are what the selection holds across layers, shrinks as sqrt(1/n)
        sample_size = int(min(max(100_000, N // 256), 4_000_000))
    per = max(1, sample_size // max(L, 1))
    samples = [sample_scores(w, q, d, max(per, int(sample_size * s / N)))
               for w, q, d, s in zip(weights, qcs, deads, sizes)]
    weights_s = np.concatenate([np.full(s.size, sz / max(s.size, 1)) for s, sz in zip(samples, sizes)])
    allsamp = np.concatenate(samples)
    if weights_s.size and np.all(weights_s == weights_s[0]):
        # every sample stands for as many weights (one layer): the ranks do not depend
        # on the order, and sorting the values is enough
        srt = np.sort(allsamp)
        cum = np.cumsum(weights_s)
    else:
        order = np.argsort(allsamp)
        srt = allsamp[order]
        cum = np.cumsum(weights_s[order])  # estimated rank of each sample value
    p = k / N
    passes = 0
    widen = 1.0
    while True:
        if widen > 64:
            lo, hi = -math.inf, math.inf
        else:
            m = band_half_width(allsamp.size, p, margin, widen) * N
            i_lo = int(np.searchsorted(cum, k - m, side="left")) - 1
            i_hi = int(np.searchsorted(cum, k + m, side="left")) + 1
            lo = -math.inf if i_lo < 0 else float(srt[i_lo])
            hi = math.inf if i_hi >= allsamp.size else float(srt[i_hi])
        frac = min(1.0, 2.5 * widen * 2 * band_half_width(allsamp.size, p, margin))
        res = [band_scan(w, q, s2, d, lo, hi, frac) for w, q, s2, d in zip(weights, qcs, s2s, deads)]
        passes += 1
        below = sum(r.below for r in res)
        ncand = sum(r.score.size for r in res)
        if below < k <= below + ncand:
            break
        if math.isinf(lo) and math.isinf(hi):  # pragma: no cover - cannot happen
            raise RuntimeError("selection failed with the full band")
        widen *= 8.0
    v, pruned, perr, ps2 = _select_in_band(res, k, below)
    return Selection(v, pruned, perr, ps2, passes, band=res if keep_band else None)


def _select_in_band(res, k: int, below: int):
    """Step 3: the exact selection among the candidates of the band passes ``res`` (the
    k-th smallest score lies in the band): (lam, pruned, pruning error, pruned s^2)."""
    L = len(res)
    pruned = np.zeros(L, dtype=np.int64)
    perr = np.zeros(L)
    ps2 = np.zeros(L)
    cand = np.concatenate([r.score for r in res])
    need = k - below
    v = float(np.partition(cand, need - 1)[need - 1])
    tie_budget = need - int(np.count_nonzero(cand < v))
    # ties: the later ones in network order are pruned first
    for i in range(L - 1, -1, -1):
        r = res[i]
        less = r.score < v
        eq = np.flatnonzero(r.score == v)
        take = min(eq.size, tie_budget)
        tie_budget -= take
        sel = less.copy()
        if take:
            # the `take` largest flat indices among the ties of this layer
            eq_sorted = eq[np.argsort(r.idx[eq], kind="stable")]
            sel[eq_sorted[eq.size - take:]] = True
        pruned[i] = r.below + int(sel.sum())
        perr[i] = r.below_sq + float(r.sq[sel].sum())
        ps2[i] = r.below_s2 + float(r.s2[sel].sum())
    if int(pruned.sum()) != k:  # an internal invariant, not a user error
        raise RuntimeError(f"select_global: pruned {int(pruned.sum())} weights, wanted {k}")
    return v, pruned, perr, ps2


def recount(band, k: int):
    """Pruned weights per layer when exactly ``k`` are pruned over the layers of ``band``
    (a sequence of entries of ``Selection.band``, network order kept), or ``None`` when the
    k-th smallest score lies outside that band (then a new selection is needed). The
    counts are the ones :func:`select_global` gives on these layers alone (the selection
    is unique, ties included); its sums may round differently, so they are not returned.
    """
    below = sum(r.below for r in band)
    if not below < k <= below + sum(r.score.size for r in band):
        return None
    return _select_in_band(band, k, below)[1]


def _select_dead(deads, s2s, sizes, n_dead, k: int) -> Selection:
    """Prune ``k`` weights, all of them in dead channels (score ``-inf``, ``w^2 = 0``):
    ties resolved as in :func:`select_global` (later weights in network order first)."""
    L = len(deads)
    pruned = np.zeros(L, dtype=np.int64)
    perr = np.zeros(L)
    ps2 = np.zeros(L)
    budget = k
    for i in range(L - 1, -1, -1):
        if budget <= 0:
            break
        d = np.asarray(deads[i], dtype=bool)
        if not n_dead[i]:
            continue
        fan = int(sizes[i]) // d.size
        s2 = np.asarray(s2s[i], dtype=np.float64)
        for c in np.flatnonzero(d)[::-1]:
            take = min(fan, budget)
            pruned[i] += take
            ps2[i] += float(s2[c]) * take
            budget -= take
            if budget <= 0:
                break
    return Selection(-math.inf, pruned, perr, ps2, 0)
