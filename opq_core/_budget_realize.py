"""The size-budget solver's exact realization at fixed widths, in one read per layer.

Every layer ``i`` keeps its top scores, and across layers the greedy by ratio
``score / B_i`` fills the budget. A ratio band ``[t_lo, t_hi]`` around the threshold
(estimated on the solver's sample, with a binomial margin; the whole positive range on
small models) is scanned once per layer: weights above it are kept (counted), weights
below it pruned (counted, with their ``w^2`` and ``s_c^2`` sums and the largest score),
weights inside it copied as candidates. The greedy runs over the candidates only; if the
band missed (the kept weights above it overflow the budget, or the fill ran out of
candidates) it is widened and the scan repeated. The candidates also give each layer's
exact threshold ``lam_i`` (the largest pruned score, ties pruned from the end of the layer
as the masks do), pruning error and pruned ``s_c^2``; a layer held at its floor below the
band is selected on its own (:func:`opq_core.select.select_global`).
"""
from __future__ import annotations

import math

import numpy as np

from ._plan import layer_mask_from
from ._solver import _layer_scores
from .select import _BandPass, band_scan, select_global
from .stats import as_matrix


def _scan_layer(ctx, i, score_q, lo, hi, frac):
    s = ctx.scales[i]
    s2 = np.where(s > 0, s * s, 0.0)
    if ctx.importance:  # weighted scores (in memory: an importance plan is not streamed)
        sc = _layer_scores(ctx, i, score_q)
        w = as_matrix(np.asarray(ctx.arrays[ctx.names[i]])).astype(np.float64)
        sq = (w * w).reshape(-1)
        s2f = np.repeat(s2, w.shape[1])
        low = sc < lo
        band = ~low & (sc <= hi)
        return _BandPass(sc.size, float(lo), int(low.sum()), float(sq[low].sum()),
                         float(s2f[low].sum()), sc[band], sq[band], s2f[band],
                         np.flatnonzero(band))
    return band_scan(ctx.arrays[ctx.names[i]], float(score_q) * s2, s2, s <= 0, lo, hi, frac,
                     running=True)


def _estimate_band(sample, bits, score_q, S, floors, sizes, widen):
    """Ratio band [t_lo, t_hi] around the threshold, and the candidate fraction per layer,
    from the sample (a binomial margin on the kept count, times ``widen``)."""
    b = np.asarray(bits, dtype=np.float64)[:, None]
    qn = np.asarray(score_q, dtype=np.float64)[:, None]

    def kept(t):
        return sample.lagrangian(qn, b, t)[1][:, 0]

    def cost(t):
        return float(np.dot(b[:, 0], np.maximum(floors, kept(t))))

    def bisect(goal):  # smallest t >= 0 with cost(t) <= goal
        if cost(0.0) <= goal:
            return 0.0
        lo, hi = 0.0, max(float(sample.sq.max()), 1e-300) / float(b.min()) * 2.0 + 1e-300
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi or hi - lo <= 1e-7 * hi:
                break
            if cost(mid) <= goal:
                hi = mid
            else:
                lo = mid
        return hi

    t_star = bisect(S)
    n_kept = float(np.sum(kept(t_star) / sample.omega))
    delta = widen * (5.0 / math.sqrt(max(n_kept, 1.0)) + 0.002)
    t_hi = bisect(S * (1.0 - delta)) if delta < 1 else math.inf
    t_lo = bisect(S * (1.0 + delta))
    t_lo = 0.0 if t_lo <= 0.0 or cost(0.0) < S * (1.0 + delta) else t_lo
    k_lo, k_hi = kept(t_lo), (np.zeros(len(bits)) if math.isinf(t_hi) else kept(t_hi))
    frac = np.clip((k_lo - k_hi) / np.maximum(sizes, 1), 0.0, 1.0)
    return t_lo, t_hi, frac


def _greedy(bands, bits, floors, S, full):
    """Kept count per layer (None when the band missed), and the floor-bound layers;
    ``full``: the band reaches down to ratio 0 (every positive gain is a candidate)."""
    L = len(bands)
    b = np.asarray(bits, dtype=np.float64)
    pinned = np.array([bd.above + bd.score.size < floors[i] for i, bd in enumerate(bands)])
    base = np.array([floors[i] if pinned[i] else max(floors[i], bd.above)
                     for i, bd in enumerate(bands)], dtype=np.int64)
    room = S - float(np.dot(base, b))
    if room < 0:
        return None, pinned
    vals, lays = [], []
    for i, bd in enumerate(bands):
        if pinned[i] or bd.score.size == 0:
            continue
        g = -np.sort(-bd.score)[max(0, int(floors[i]) - bd.above):]
        g = g[g > 0]
        vals.append(g / b[i])
        lays.append(np.full(g.size, i, dtype=np.int64))
    taken = np.zeros(L, dtype=np.int64)
    if vals:
        ratio = np.concatenate(vals)
        lay = np.concatenate(lays)
        order = np.lexsort((lay, -ratio))
        bb = b[lay[order]]
        cum = np.cumsum(bb)
        p = int(np.searchsorted(cum, room, side="right"))
        picks = [order[:p]]
        if p:
            room -= float(cum[p - 1])
        if p == order.size and not full:
            return None, pinned  # every candidate fits: the threshold lies below the band
        pos = p
        while pos < order.size and room >= b.min():
            nz = np.flatnonzero(bb[pos:] <= room)
            if nz.size == 0:
                break
            j = pos + int(nz[0])
            picks.append(order[j:j + 1])
            room -= float(bb[j])
            pos = j + 1
        taken = np.bincount(lay[np.concatenate(picks)], minlength=L)
    elif not full:
        return None, pinned
    return base + taken, pinned


def _resolve(ctx, i, bd, kept, score_q):
    """(lam, pruning error, pruned s_c^2) of layer i keeping its top ``kept`` scores."""
    p = bd.n - int(kept)
    need = p - bd.below
    if p == 0:
        return -np.inf, 0.0, 0.0
    if not 0 <= need <= bd.score.size:
        return _exact_layer(ctx, i, score_q, p, kept)
    if need == 0:  # lam: the largest (finite) score below the band
        sc = _layer_scores(ctx, i, score_q)
        low = sc[(sc < bd.lo) & np.isfinite(sc)]
        return (float(low.max()) if low.size else -np.inf), bd.below_sq, bd.below_s2
    v = float(np.partition(bd.score, need - 1)[need - 1])
    sel = bd.score < v
    eq = np.flatnonzero(bd.score == v)
    take = need - int(sel.sum())
    if take:  # ties: the later weights of the layer are pruned first
        sel[eq[np.argsort(bd.idx[eq], kind="stable")][eq.size - take:]] = True
    return v, bd.below_sq + float(bd.sq[sel].sum()), bd.below_s2 + float(bd.s2[sel].sum())


def _exact_layer(ctx, i, score_q, p, kept):
    s = ctx.scales[i]
    s2 = np.where(s > 0, s * s, 0.0)
    w = ctx.arrays[ctx.names[i]]
    if ctx.importance:
        sc = _layer_scores(ctx, i, score_q)
        lam = float(np.partition(sc, p - 1)[p - 1])
        mask = layer_mask_from(sc, lam, int(kept), ctx.names[i])
        m = as_matrix(np.asarray(w)).astype(np.float64).reshape(-1)
        s2f = np.repeat(s2, sc.size // max(s.size, 1))
        return lam, float(np.sum(np.where(mask, 0.0, m * m))), float(np.sum(s2f[~mask]))
    sel = select_global([w], [float(score_q) * s2], [s2], [s <= 0], p,
                        sizes=ctx.sizes[i:i + 1])
    return sel.lam, float(sel.pruning_error[0]), float(sel.pruned_s2[0])


def _realize(ctx, sample, bits, score_q, S, exact, floors):
    """Exact kept counts, thresholds, pruning errors and pruned s_c^2 per layer at the
    widths ``bits`` within ``S`` bits (see the module doc)."""
    L = len(ctx.names)
    b = np.asarray(bits, dtype=np.float64)
    widen = 1.0
    while True:
        full = exact or sample is None or widen > 64
        if full:
            t_lo, t_hi, frac = 0.0, math.inf, np.ones(L)
        else:
            t_lo, t_hi, frac = _estimate_band(sample, bits, score_q, S, floors, ctx.sizes, widen)
        bands = [_scan_layer(ctx, i, score_q[i], t_lo * b[i], t_hi * b[i], frac[i])
                 for i in range(L)]
        kept, pinned = _greedy(bands, bits, floors, S, full or t_lo <= 0.0)
        if kept is not None:
            break
        widen *= 8.0
    if float(np.dot(kept, b)) > S:  # an internal invariant, not a user error
        raise RuntimeError(f"budget solver: {float(np.dot(kept, b))} bits over a budget of {S}")
    lams, perr, ps2 = np.empty(L), np.empty(L), np.empty(L)
    for i in range(L):
        lams[i], perr[i], ps2[i] = _resolve(ctx, i, bands[i], kept[i], score_q[i])
    return kept.astype(np.int64), lams, perr, ps2
