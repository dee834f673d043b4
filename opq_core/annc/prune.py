"""ANNC pruning projection: the 0-1 knapsack (keep by w^2 / bits until the budget is used),
solved greedily in density order with an O(N) sampled band selection."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .._jit import PARALLEL_MIN_SIZE, jit, prange, twins
from .._results import table_repr
from ..select import band_half_width
from ._common import _BLOCK, _bad_weight, _check_budget, _layers, _per_layer_int

# ---------------------------------------------------------------------------
# pruning projection: kernels
# ---------------------------------------------------------------------------

@jit()
def _band_block(x, b, t_hi, t_lo, mask, s, e, cd, ci, base, cap):
    # density d = w^2 / b; mask = d > hi  <=>  w^2 > t_hi; the band lo <= d <= hi (d > 0)
    # <=> t_lo <= w^2 <= t_hi is copied into cd/ci[base : base + cap] (counted beyond cap:
    # the caller retries with more room). The division happens only in the band.
    # (a NaN or an infinite square makes sqt non-finite: the caller refuses the layer)
    above = 0
    band = 0
    sqa = 0.0
    sqt = 0.0
    mx = 0.0
    for j in range(s, e):
        v = np.float64(x[j])
        sq = v * v
        a = sq > t_hi
        mask[j] = a
        above += 1 if a else 0
        sqa += sq if a else 0.0
        sqt += sq
        mx = max(mx, sq)
        inb = (sq >= t_lo) & (sq > 0.0) & (not a)
        if inb:
            if band < cap:
                cd[base + band] = sq / b
                ci[base + band] = j
            band += 1
    return above, band, sqa, sqt, mx


def _sq_cuts(b, lo, hi):
    """Thresholds on ``w^2`` equivalent to the density tests ``w^2 / b > hi`` and
    ``w^2 / b >= lo`` (the rounded division is monotone in ``w^2``)."""
    b = float(b)
    if math.isinf(hi):
        t_hi = math.inf
    else:
        t = hi * b  # largest t with fl(t / b) <= hi
        while t / b > hi:
            t = float(np.nextafter(t, -math.inf))
        while True:
            u = float(np.nextafter(t, math.inf))
            if u / b <= hi:
                t = u
            else:
                break
        t_hi = t
    if lo <= 0.0:
        t_lo = 0.0
    else:
        t = lo * b  # smallest t with fl(t / b) >= lo
        while t / b < lo:
            t = float(np.nextafter(t, math.inf))
        while True:
            u = float(np.nextafter(t, -math.inf))
            if u / b >= lo:
                t = u
            else:
                break
        t_lo = t
    return t_hi, t_lo


def _band_ser(x, b, t_hi, t_lo, mask, cd, ci, cap, above, band, sqa, sqt, mx):
    n = x.shape[0]
    for k in prange(above.shape[0]):
        s = k * _BLOCK
        e = min(n, s + _BLOCK)
        above[k], band[k], sqa[k], sqt[k], mx[k] = _band_block(
            x, b, t_hi, t_lo, mask, s, e, cd, ci, k * cap, cap)


_band_ser, _band_par = twins(_band_ser)


@jit()
def _greedy_fill(cost, skip, room, take):
    # density order is the array order: take every item that still fits
    first_miss = -1
    for i in range(cost.shape[0]):
        if skip[i]:
            continue
        c = cost[i]
        if c <= room:
            take[i] = True
            room -= c
        elif first_miss < 0:
            first_miss = i
    return room, first_miss


@dataclass
class _Pass:
    above: int
    band: int
    sq_above: float
    sq_total: float
    argmax: int
    cd: np.ndarray
    ci: np.ndarray


def _band_pass(x, b, lo, hi, mask, frac):
    """One pass over a flat layer: masks above the band, band candidates, sums.
    None when a weight is not finite."""
    n = x.shape[0]
    nb = max(1, -(-n // _BLOCK))
    blk = min(n, _BLOCK)
    cap = int(min(blk, math.ceil(3.0 * frac * blk) + 256))
    above = np.zeros(nb, np.int64)
    band = np.zeros(nb, np.int64)
    sqa = np.zeros(nb)
    sqt = np.zeros(nb)
    mx = np.zeros(nb)
    kern = _band_par if n >= PARALLEL_MIN_SIZE else _band_ser
    t_hi, t_lo = _sq_cuts(b, lo, hi)
    while True:
        cd = np.empty(nb * cap)
        ci = np.empty(nb * cap, np.int64)
        if n:
            kern(x, float(b), t_hi, t_lo, mask, cd, ci, cap, above, band, sqa, sqt, mx)
        if not np.all(np.isfinite(sqt)):
            return None
        if int(band.max()) <= cap:
            break
        cap = int(band.max())  # exact room now known
    take = np.concatenate([np.arange(k * cap, k * cap + band[k]) for k in range(nb)])
    arg = -1
    if n and mx.max() > 0.0:
        k = int(np.argmax(mx))  # first block holding the largest square
        s = k * _BLOCK
        v = x[s:min(n, s + _BLOCK)].astype(np.float64)
        arg = s + int(np.argmax(v * v))
    return _Pass(int(above.sum()), int(band.sum()), float(sqa.sum()),
                 float(sqt.sum()), arg, cd[take], ci[take])


# ---------------------------------------------------------------------------
# pruning projection: public function
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class PruneResult:
    """Outcome of :func:`prune_to_budget` (per-layer arrays in network order).

    Attributes
    ----------
    names : layer names.
    masks : dict name -> bool array (True = kept), shaped like the weights.
    bits : int64 bit-widths used for the costs.
    kept : int64 kept counts.
    pruning_error : float64 sums of the squared pruned weights.
    size_bits : ``sum_l bits_l kept_l`` (never above ``budget_bits``).
    budget_bits : the budget.
    threshold : density ``w^2 / b`` of the first item the greedy could not take
        (``0.0`` when everything non-zero fits).
    passes : band passes over the weights (1 unless the sampled band missed).
    """

    names: tuple
    masks: dict
    bits: np.ndarray
    kept: np.ndarray
    pruning_error: np.ndarray
    size_bits: int
    budget_bits: int
    threshold: float
    passes: int

    @property
    def n(self) -> int:
        return int(sum(m.size for m in self.masks.values()))

    @property
    def sparsity(self) -> float:
        return 1.0 - int(self.kept.sum()) / self.n if self.n else 0.0

    def __repr__(self):
        nw = max([28] + [len(n) for n in self.names])  # names are never cut

        def row(i):
            name = self.names[i]
            n = self.masks[name].size
            sp = 1.0 - self.kept[i] / n if n else 0.0
            return (f"{name:<{nw}} {n:>10d} {int(self.bits[i]):>4d} "
                    f"{int(self.kept[i]):>10d} {sp:>8.4f}")
        return table_repr("PruneResult",
                          f"{'layer':<{nw}} {'n':>10} {'bits':>4} {'kept':>10} {'sparsity':>8}",
                          range(len(self.names)), row,
                          f"size_bits={self.size_bits} budget_bits={self.budget_bits} "
                          f"sparsity={self.sparsity:.4f} passes={self.passes}")


def prune_to_budget(weights: Mapping, bits, budget_bits, *, min_kept: int = 1,
                    sample_size: int = 100_000, margin: float = 0.002) -> PruneResult:
    r"""ANNC's pruning projection: keep weights by ``w^2 / b_l`` until the budget is used.

    Keeping weight ``w`` of layer ``l`` is a 0-1 knapsack item of value ``w^2`` (the
    squared error it saves) and cost ``b_l`` bits:

    .. math::

        \max_{m} \sum_l \sum_{j} m_{lj} w_{lj}^2 \quad\text{s.t.}\quad
        \sum_l b_l \sum_j m_{lj} \le S .

    Solved by the greedy in density order: items sorted by ``w^2 / b_l`` descending (ties:
    earlier layer, then earlier flat index first) are taken whenever they still fit, so
    after the first item that does not fit the leftover budget (``< 8`` bits) is filled by
    the next cheaper items. This is optimal when every layer has the same ``b``; otherwise
    its kept value is within one item's value of the 0-1 optimum (the classical greedy
    bound). Exact zeros are never kept (value 0). With ``min_kept = 1`` (default) the
    largest ``|w|`` of every layer with a non-zero weight is kept first, so that no layer
    dies.

    The order is found without sorting all weights: a strided sample of the densities
    locates a density band around the cut; one parallel pass over each layer writes the
    masks of the items above the band and copies the band (about one per cent of the
    weights) into per-block buffers; only the band is sorted. A band that misses the cut is widened, ending with the full
    range, so the answer always equals the full-sort greedy.

    Parameters
    ----------
    weights : mapping name -> float array
        The (latent) weights of the compressed layers, in network order.
    bits : int, sequence or mapping name -> int
        Bit-width ``b_l`` in 1..8 of every layer.
    budget_bits : number
        ``S``; the result satisfies ``sum_l b_l nnz_l <= S``.
    min_kept : {0, 1}
        Keep the largest weight of every non-zero layer first.

    Returns
    -------
    PruneResult

    Raises
    ------
    ValueError
        Non-finite weights, bits outside 1..8, or a budget below the forced minimum.

    Examples
    --------
    >>> w = {"a": np.array([3.0, -1.0, 0.5]), "b": np.array([2.0, 0.0, -2.5])}
    >>> r = prune_to_budget(w, {"a": 2, "b": 4}, 11)
    >>> r.masks["a"].tolist(), r.masks["b"].tolist(), r.size_bits
    ([True, False, False], [True, False, True], 10)
    """
    names, flats, shapes = _layers(weights)
    L = len(names)
    b = _per_layer_int(bits, names, "bits", 1, 8)
    S = _check_budget(budget_bits)
    if min_kept not in (0, 1):
        raise ValueError(f"min_kept must be 0 or 1, got {min_kept!r}")
    sizes = np.array([f.size for f in flats], np.int64)
    N = int(sizes.sum())

    # 1. a strided sample: estimated cost above each sampled density
    per = [max(64, int(sample_size * s / max(N, 1))) for s in sizes]
    sd, sw = [], []
    for f, bl, p in zip(flats, b, per):
        if f.size == 0:
            continue
        stride = max(1, f.size // p)
        v = f[::stride].astype(np.float64)
        d = (v * v) / float(bl)
        d[~np.isfinite(d)] = 0.0
        sd.append(d)
        sw.append(np.where(d > 0, float(bl) * f.size / v.size, 0.0))
    sd = np.concatenate(sd) if sd else np.zeros(0)
    sw = np.concatenate(sw) if sw else np.zeros(0)
    order = np.argsort(-sd, kind="stable")
    sd_o = sd[order]
    cum = np.cumsum(sw[order])
    total_est = float(cum[-1]) if cum.size else 0.0
    R_est = S - (int(b.sum()) if min_kept else 0)
    ns = max(sd.size, 1)
    p = min(1.0, max(0.0, R_est / total_est)) if total_est > 0 else 1.0

    # 2. one pass per layer: masks above the band, the band's candidates; widen on a miss
    masks = [np.zeros(s, dtype=np.bool_) for s in sizes]
    widen = 1.0
    passes = 0
    while True:
        if widen > 64 or total_est <= 0:
            lo, hi = 0.0, math.inf
        else:
            m = band_half_width(ns, p, margin, widen) * total_est
            i_hi = int(np.searchsorted(cum, R_est - m, side="left")) - 1
            i_lo = int(np.searchsorted(cum, R_est + m, side="right")) + 1
            hi = math.inf if i_hi < 0 else float(sd_o[i_hi])
            lo = 0.0 if i_lo >= sd.size else float(sd_o[i_lo])
        frac = float(np.count_nonzero((sd >= lo) & (sd <= hi) & (sd > 0))) / ns
        passes += 1
        res = []
        for i in range(L):
            r = _band_pass(flats[i], b[i], lo, hi, masks[i], frac)
            if r is None:
                raise _bad_weight(names[i], flats[i], shapes[i])
            res.append(r)
        forced = np.full(L, -1, np.int64)
        f_where = np.zeros(L, np.int64)  # +1 above hi, 0 in band, -1 below lo
        f_sq = np.zeros(L)
        if min_kept:
            for i, r in enumerate(res):
                if r.argmax >= 0:
                    forced[i] = r.argmax
                    v = float(flats[i][r.argmax])
                    f_sq[i] = v * v
                    d = (v * v) / float(b[i])
                    f_where[i] = 1 if d > hi else (0 if d >= lo else -1)
        has_f = forced >= 0
        need = int(b[has_f].sum())
        room = S - need
        if room < 0:
            raise ValueError(
                f"budget_bits={budget_bits!r} is below the smallest feasible budget at these "
                f"bit-widths: {need} bits (one weight in each of {int(has_f.sum())} "
                f"layers); lower the bits or raise the budget")
        cost_above = sum(int(b[i]) * (r.above - int(has_f[i] and f_where[i] == 1))
                         for i, r in enumerate(res))
        cost_band = sum(int(b[i]) * (r.band - int(has_f[i] and f_where[i] == 0))
                        for i, r in enumerate(res))
        full = lo == 0.0 and math.isinf(hi)
        if full or (cost_above <= room and (cost_above + cost_band > room or lo == 0.0)):
            break
        widen *= 8.0

    # 3. the band in density order (ties: earlier layer, earlier index); the greedy on it
    cd = np.concatenate([r.cd for r in res])
    ci = np.concatenate([r.ci for r in res])
    cl = np.concatenate([np.full(r.cd.size, i, np.int64) for i, r in enumerate(res)])
    o = np.lexsort((ci, cl, -cd))
    cd, ci, cl = cd[o], ci[o], cl[o]
    take = np.zeros(cd.size, np.bool_)
    room_left, miss = _greedy_fill(b[cl], ci == forced[cl], room - cost_above, take)
    threshold = float(cd[miss]) if miss >= 0 else 0.0
    kept_sq = np.array([r.sq_above for r in res])
    kept_sq += np.where(has_f & (f_where != 1), f_sq, 0.0)
    chosen = [(cl[take], ci[take])]
    for i in range(L):
        if has_f[i]:
            masks[i][forced[i]] = True

    # 4. fill below the band (rare: the leftover budget fits an item of a cheap layer
    #    whose next items all lie below the band)
    # items below the band (zeros included: the fill below skips them)
    below = np.array([sizes[i] - r.above - r.band - int(has_f[i] and f_where[i] == -1)
                      for i, r in enumerate(res)])
    if lo > 0.0 and room_left > 0 and np.any((b <= room_left) & (below > 0)):
        fd, fi, fl = [], [], []
        for i in range(L):
            if b[i] > room_left or below[i] <= 0:
                continue
            v = flats[i].astype(np.float64)
            d = (v * v) / float(b[i])
            idx = np.flatnonzero((d < lo) & (d > 0.0))
            if has_f[i]:
                idx = idx[idx != forced[i]]
            mtop = min(idx.size, int(room_left // b[i]))
            if mtop == 0:
                continue
            dv = d[idx]
            kth = np.partition(dv, dv.size - mtop)[dv.size - mtop]
            pick = idx[dv >= kth]  # ties at kth included; the sort below decides
            fd.append(d[pick])
            fi.append(pick)
            fl.append(np.full(pick.size, i, np.int64))
        if fd:
            fd, fi, fl = np.concatenate(fd), np.concatenate(fi), np.concatenate(fl)
            o = np.lexsort((fi, fl, -fd))
            fd, fi, fl = fd[o], fi[o], fl[o]
            t2 = np.zeros(fd.size, np.bool_)
            room_left, miss2 = _greedy_fill(b[fl], np.zeros(fd.size, np.bool_), room_left, t2)
            if miss < 0 and miss2 >= 0:
                threshold = float(fd[miss2])
            chosen.append((fl[t2], fi[t2]))
    for lay, idx in chosen:
        o = np.argsort(lay, kind="stable")
        lay, idx = lay[o], idx[o]
        cuts = np.searchsorted(lay, np.arange(L + 1))
        for i in range(L):
            sel = idx[cuts[i]:cuts[i + 1]]
            if sel.size:
                masks[i][sel] = True
                v = flats[i][sel].astype(np.float64)
                kept_sq[i] += float(np.dot(v, v))

    kept = np.array([r.above for r in res], np.int64)
    kept += np.array([int(has_f[i] and f_where[i] != 1) for i in range(L)], np.int64)
    for lay, _ in chosen:
        kept += np.bincount(lay, minlength=L).astype(np.int64)
    perr = np.maximum(np.array([r.sq_total for r in res]) - kept_sq, 0.0)
    size = int((kept * b).sum())
    if size > S:  # pragma: no cover - guarded by construction
        raise RuntimeError(f"pruning projection exceeded the budget: {size} > {S}")
    return PruneResult(tuple(names), {n: m.reshape(s) for n, m, s in zip(names, masks, shapes)},
                       b, kept, perr, size, S, threshold, passes)
