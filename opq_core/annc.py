"""ANNC projections: knapsack pruning, zero-anchored 1-D k-means, multiple-choice knapsack.

ANNC (constrained sparsity-quantization joint learning) trains under the model-size
constraint

.. math::

    \\sum_l \\operatorname{nnz}(W_l)\\, b_l \\le S

by ADMM. Its two projections need no framework and live here (the training loop is in
``opq_torch.annc``):

* **pruning projection** (:func:`prune_to_budget`): with the bit-widths ``b_l`` fixed,
  keeping a weight ``w`` of layer ``l`` saves ``w^2`` of squared error and costs ``b_l``
  bits, a 0-1 knapsack. It is solved greedily in density order ``w^2 / b_l`` with an
  O(N) sampled band selection instead of a sort of all weights;
* **quantization projection** (:func:`quantize_projection`): with the masks fixed, every
  layer's kept weights are clustered for every bit-width ``b`` in 1..8 into ``2^b``
  non-zero centroids (:func:`kmeans_zero_anchored`), giving an error table
  ``E[l, b]``; one bit-width per layer is then chosen by a multiple-choice knapsack
  (:func:`choose_bits`).

:func:`project` alternates the two; :func:`annc_plan` turns the result into a
:class:`~opq_core.allocate.Plan` (``method="annc"``, ``grid="codebook"``) that the
kernels, the adapter and the file format consume like an OPQ plan.

Accounting: ``b`` bits per kept weight (paper rate ``32 N / sum_l b_l nnz_l``); a kept
weight takes one of the ``2^b`` non-zero centroids, the fixed zero centroid means pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ._jit import PARALLEL_MIN_SIZE, jit, prange
from .apply import compute_dtype
from .kernels.codebook import check_codebook, fake_quant_codebook

__all__ = [
    "BITS", "PruneResult", "prune_to_budget", "KMeansResult", "kmeans_zero_anchored",
    "BitChoice", "choose_bits", "QuantResult", "quantize_projection", "Projection",
    "project", "annc_budget", "min_budget_bits", "annc_plan",
]

#: The candidate bit-widths of the quantization projection.
BITS = tuple(range(1, 9))
_BLOCK = 1 << 16
_F32_TINY = float(np.nextafter(np.float32(0), np.float32(1)))


# ---------------------------------------------------------------------------
# input normalization
# ---------------------------------------------------------------------------

def _layers(weights, argument="weights"):
    """(names, flat float32/float64 contiguous arrays, shapes) of a mapping of tensors."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"{argument} must be a mapping name -> array, got "
                        f"{type(weights).__name__}")
    if not weights:
        raise ValueError(f"{argument}: the mapping is empty")
    names, flats, shapes = [], [], []
    for name, w in weights.items():
        if not isinstance(name, str):
            raise TypeError(f"{argument}: layer names must be strings, got {name!r}")
        a = np.asarray(w)
        if a.dtype.type not in (np.float16, np.float32, np.float64):
            raise TypeError(f"{argument}[{name!r}]: weights must be float16/float32/float64, "
                            f"got dtype {a.dtype}")
        if a.dtype == np.float16:
            a = a.astype(np.float32)
        names.append(name)
        shapes.append(tuple(int(s) for s in a.shape))
        flats.append(np.ascontiguousarray(a).reshape(-1))
    return names, flats, shapes


def _per_layer_int(value, names, argument, lo, hi):
    """An int, a sequence (network order) or a mapping name -> int, as an int64 array."""
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{argument}: no value for layer {missing[0]!r}")
        vals = [value[n] for n in names]
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        vals = [value] * len(names)
    else:
        vals = list(np.asarray(value).reshape(-1).tolist())
        if len(vals) != len(names):
            raise ValueError(f"{argument}: {len(vals)} values for {len(names)} layers")
    out = np.empty(len(names), dtype=np.int64)
    for i, (n, v) in enumerate(zip(names, vals)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{argument}[{n!r}] must be an integer, got {v!r}")
        if not lo <= int(v) <= hi:
            raise ValueError(f"{argument}[{n!r}] must be in {lo}..{hi}, got {int(v)}")
        out[i] = int(v)
    return out


def _check_budget(budget_bits):
    if isinstance(budget_bits, (bool, np.bool_)) or not isinstance(
            budget_bits, (int, float, np.integer, np.floating)):
        raise TypeError(f"budget_bits must be a number, got {budget_bits!r}")
    b = float(budget_bits)
    if not (math.isfinite(b) and b >= 0):
        raise ValueError(f"budget_bits must be a finite number >= 0, got {budget_bits!r}")
    return int(math.floor(b))


def _bad_weight(name, flat, shape, argument="weights"):
    bad = np.flatnonzero(~np.isfinite(flat.astype(np.float64) ** 2))
    if bad.size == 0:
        return ValueError(f"{argument}[{name!r}]: the sum of the squared weights overflows "
                          f"float64 (weights too large)")
    i = int(bad[0])
    idx = tuple(int(k) for k in np.unravel_index(i, shape)) if shape else ()
    return ValueError(f"{argument}[{name!r}]: weight {flat[i]!r} at index {idx} is not finite "
                      f"(or its square overflows)")


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


@jit(parallel=True)
def _band_par(x, b, t_hi, t_lo, mask, cd, ci, cap, above, band, sqa, sqt, mx):
    n = x.shape[0]
    for k in prange(above.shape[0]):
        s = k * _BLOCK
        e = min(n, s + _BLOCK)
        above[k], band[k], sqa[k], sqt[k], mx[k] = _band_block(
            x, b, t_hi, t_lo, mask, s, e, cd, ci, k * cap, cap)


@jit()
def _band_ser(x, b, t_hi, t_lo, mask, cd, ci, cap, above, band, sqa, sqt, mx):
    n = x.shape[0]
    for k in range(above.shape[0]):
        s = k * _BLOCK
        e = min(n, s + _BLOCK)
        above[k], band[k], sqa[k], sqt[k], mx[k] = _band_block(
            x, b, t_hi, t_lo, mask, s, e, cd, ci, k * cap, cap)


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
        rows = [f"{'layer':<28} {'n':>10} {'bits':>4} {'kept':>10} {'sparsity':>8}"]
        for i, name in enumerate(self.names):
            n = self.masks[name].size
            sp = 1.0 - self.kept[i] / n if n else 0.0
            rows.append(f"{name[-28:]:<28} {n:>10d} {int(self.bits[i]):>4d} "
                        f"{int(self.kept[i]):>10d} {sp:>8.4f}")
        rows.append(f"size_bits={self.size_bits} budget_bits={self.budget_bits} "
                    f"sparsity={self.sparsity:.4f} passes={self.passes}")
        return "PruneResult(\n" + "\n".join(rows) + "\n)"


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
            m = widen * (5.0 * math.sqrt(max(ns * p * (1 - p), 1.0)) / ns + margin) * total_est
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
def _count_le(a, t):
    lo = 0
    hi = a.shape[0]
    while lo < hi:
        h = (lo + hi) >> 1
        if a[h] <= t:
            lo = h + 1
        else:
            hi = h
    return lo


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
            p = _count_le(a, (c[i - 1] + c[i]) / 2.0)
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


# ---------------------------------------------------------------------------
# multiple-choice knapsack over bit-widths
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class BitChoice:
    """Outcome of :func:`choose_bits`.

    Attributes
    ----------
    bits : int64 chosen bit-width per layer.
    error : ``sum_l E[l, bits_l]``.
    cost : ``sum_l kept_l bits_l`` (``<= budget_bits``).
    method : ``"dp"`` (exact) or ``"greedy"``.
    lower_bound : the LP-relaxation optimum on the convex hulls, ``<=`` the exact optimum.
    gap_bound : the greedy's error exceeds the exact optimum by at most this (the value of
        the first hull step that did not fit; 0 when none).
    """

    bits: np.ndarray
    error: float
    cost: int
    budget_bits: int
    method: str
    lower_bound: float
    gap_bound: float

    def __repr__(self):
        return (f"BitChoice(method={self.method!r}, bits={self.bits.tolist()}, "
                f"error={self.error:.6g}, cost={self.cost}, budget_bits={self.budget_bits}, "
                f"lower_bound={self.lower_bound:.6g}, gap_bound={self.gap_bound:.6g})")


def _hull(costs, errs):
    """Indices of the lower convex hull from the cheapest point, error strictly falling."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], errs[i]))
    pts = []
    for i in order:
        if pts and costs[i] == costs[pts[-1]]:
            continue
        if pts and errs[i] >= errs[pts[-1]]:
            continue
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # drop b if it lies on or above the segment a -> i
            lhs = (errs[a] - errs[b]) * (costs[i] - costs[a])
            rhs = (errs[a] - errs[i]) * (costs[b] - costs[a])
            if lhs <= rhs:
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def _greedy_mckp(E, kept, choices, S):
    L = E.shape[0]
    c = np.asarray(choices, np.int64)
    sel = np.zeros(L, np.int64)  # index into choices
    steps = []
    for l in range(L):
        costs = [int(kept[l]) * int(x) for x in c]
        errs = [float(e) for e in E[l]]
        h = _hull(costs, errs)
        sel[l] = h[0]
        for t in range(1, len(h)):
            dc = costs[h[t]] - costs[h[t - 1]]
            de = errs[h[t - 1]] - errs[h[t]]
            steps.append((de / dc, l, t, h[t], dc, de))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    cost = int(sum(int(kept[l]) * int(c[sel[l]]) for l in range(L)))
    if cost > S:
        return None
    err = float(sum(E[l, sel[l]] for l in range(L)))
    frozen = np.zeros(L, bool)
    lower = None
    gap = 0.0
    room = S - cost
    for eff, l, t, idx, dc, de in steps:
        if frozen[l]:
            continue
        if dc <= room:
            room -= dc
            sel[l] = idx
        else:
            if lower is None:
                lower = float(sum(E[k, sel[k]] for k in range(L))) - de * room / dc
                gap = de
            frozen[l] = True
    err = float(sum(E[l, sel[l]] for l in range(L)))
    if lower is None:
        lower = err
    return sel, err, lower, gap


def _dp_mckp(E, kept, choices, S, max_states):
    L = E.shape[0]
    cost = np.zeros(1, np.int64)
    err = np.zeros(1)
    back = []
    for l in range(L):
        cc = (cost[:, None] + int(kept[l]) * np.asarray(choices, np.int64)[None, :]).ravel()
        ee = (err[:, None] + E[l][None, :]).ravel()
        par = np.repeat(np.arange(cost.size), len(choices))
        ch = np.tile(np.arange(len(choices)), cost.size)
        ok = cc <= S
        cc, ee, par, ch = cc[ok], ee[ok], par[ok], ch[ok]
        if cc.size == 0:
            return None
        o = np.lexsort((ee, cc))
        cc, ee, par, ch = cc[o], ee[o], par[o], ch[o]
        best = np.minimum.accumulate(ee)
        keep = np.ones(cc.size, bool)
        keep[1:] = ee[1:] < best[:-1]  # strictly better than every cheaper state
        cc, ee, par, ch = cc[keep], ee[keep], par[keep], ch[keep]
        if cc.size > max_states:
            return "too big"
        back.append((par, ch))
        cost, err = cc, ee
    i = int(np.argmin(err))  # first minimum = the cheapest optimal state
    best_err = float(err[i])
    sel = np.zeros(L, np.int64)
    for l in range(L - 1, -1, -1):
        par, ch = back[l]
        sel[l] = ch[i]
        i = int(par[i])
    return sel, best_err


def choose_bits(errors, kept, budget_bits, *, bits=BITS, method: str = "auto",
                max_states: int = 200_000) -> BitChoice:
    r"""Pick one bit-width per layer: a multiple-choice knapsack.

    .. math::

        \min_{b_l} \sum_l E[l, b_l] \quad\text{s.t.}\quad \sum_l n_l b_l \le S .

    ``"greedy"``: from the cheapest choice of every layer, walk the steps of every layer's
    lower convex hull of ``(n_l b, E[l, b])`` in order of error saved per bit; a step that
    no longer fits freezes its layer, the others go on. The first such step bounds the
    loss: ``exact <= greedy <= exact + gap_bound``, and ``lower_bound`` (the LP relaxation)
    ``<= exact``. ``"dp"``: exact dynamic program over the Pareto front of (cost, error)
    states, layer by layer. ``"auto"``: the DP while the front stays below ``max_states``
    states, else the greedy.

    Parameters
    ----------
    errors : array (L, len(bits))
        ``E[l, i]``: error of layer ``l`` at ``bits[i]``.
    kept : array (L,) of int
        ``n_l``: kept weights per layer (the cost of a bit).
    budget_bits : number
    bits : sequence of int
        The candidate bit-widths (columns of ``errors``).

    Examples
    --------
    >>> E = np.array([[4.0, 1.0, 0.5], [9.0, 2.0, 0.0]])
    >>> choose_bits(E, [10, 10], 50, bits=(1, 2, 3)).bits.tolist()
    [2, 3]
    """
    E = np.asarray(errors, dtype=np.float64)
    kept = np.asarray(kept)
    choices = tuple(int(x) for x in bits)
    if E.ndim != 2 or E.shape[1] != len(choices):
        raise ValueError(f"errors must have shape (layers, {len(choices)}), got {E.shape}")
    if kept.shape != (E.shape[0],) or kept.dtype.kind not in "iu" or np.any(kept < 0):
        raise ValueError(f"kept must be {E.shape[0]} non-negative integers, got {kept!r}")
    if not np.all(np.isfinite(E)):
        raise ValueError("errors: every entry must be finite")
    if method not in ("auto", "dp", "greedy"):
        raise ValueError(f"method must be 'auto', 'dp' or 'greedy', got {method!r}")
    S = _check_budget(budget_bits)
    kept = kept.astype(np.int64)
    g = _greedy_mckp(E, kept, choices, S)
    if g is None:
        need = int(kept.sum()) * min(choices)
        raise ValueError(f"budget_bits={budget_bits!r} is below the smallest feasible size "
                         f"{need} bits ({int(kept.sum())} kept weights at {min(choices)} bit)")
    sel, err, lower, gap = g
    used = "greedy"
    if method in ("auto", "dp"):
        d = _dp_mckp(E, kept, choices, S, max_states if method == "auto" else 1 << 62)
        if isinstance(d, tuple):
            sel, err = d
            used = "dp"
    b = np.array([choices[i] for i in sel], np.int64)
    return BitChoice(b, float(err), int((b * kept).sum()), S, used, float(lower), float(gap))


# ---------------------------------------------------------------------------
# quantization projection and the joint projection
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class QuantResult:
    """Outcome of :func:`quantize_projection` (network order).

    ``errors[l, i]``: k-means error of layer ``l`` at ``bits_choices[i]``; ``bits``: the
    chosen bit-widths; ``codebooks``: name -> sorted non-zero float32-exact centroids;
    ``choice``: the :class:`BitChoice`.
    """

    names: tuple
    bits: np.ndarray
    codebooks: dict
    errors: np.ndarray
    kept: np.ndarray
    bits_choices: tuple
    choice: BitChoice

    @property
    def size_bits(self) -> int:
        return int((self.bits * self.kept).sum())

    def __repr__(self):
        rows = [f"{'layer':<28} {'kept':>10} {'bits':>4} {'centroids':>9} {'error':>10}"]
        for i, n in enumerate(self.names):
            j = self.bits_choices.index(int(self.bits[i]))
            rows.append(f"{n[-28:]:<28} {int(self.kept[i]):>10d} {int(self.bits[i]):>4d} "
                        f"{self.codebooks[n].size:>9d} {self.errors[i, j]:>10.4g}")
        rows.append(f"size_bits={self.size_bits} method={self.choice.method}")
        return "QuantResult(\n" + "\n".join(rows) + "\n)"


def quantize_projection(weights: Mapping, masks: Mapping, budget_bits, *, bits=BITS,
                        exact_max: int = 2048, max_iter: int = 50,
                        method: str = "auto", layer_bits=None) -> QuantResult:
    """ANNC's quantization projection: per-layer codebooks and bit-widths under the budget.

    For every layer and every candidate ``b``, :func:`kmeans_zero_anchored` on the kept
    weights gives ``E[l, b]`` and a codebook; :func:`choose_bits` then picks one ``b`` per
    layer with ``sum_l kept_l b_l <= budget_bits``. A layer with nothing kept gets the
    codebook ``[1.0]`` and the smallest ``b`` (it costs nothing).

    ``layer_bits`` (int / sequence / mapping, optional): fix every layer's bit-width
    instead of choosing it (each must be one of ``bits``; ``choice.method == "fixed"``).

    Examples
    --------
    >>> w = {"fc": np.array([[-1.0, 0.5, 0.6, 2.0]])}
    >>> q = quantize_projection(w, {"fc": np.array([[True, True, True, True]])}, 8)
    >>> q.bits.tolist(), q.codebooks["fc"].tolist()
    ([2], [-1.0, 0.5, 0.6000000238418579, 2.0])
    """
    names, flats, shapes = _layers(weights)
    choices = tuple(int(x) for x in bits)
    if not choices or any(not 1 <= x <= 8 for x in choices):
        raise ValueError(f"bits must be integers in 1..8, got {bits!r}")
    ms = _check_masks(masks, names, shapes)
    L = len(names)
    fixed = None
    if layer_bits is not None:
        fixed = _per_layer_int(layer_bits, names, "layer_bits", 1, 8)
        for i, n in enumerate(names):
            if int(fixed[i]) not in choices:
                raise ValueError(f"layer_bits[{n!r}]={int(fixed[i])} is not one of the "
                                 f"candidate bits {choices}")
    E = np.zeros((L, len(choices)))
    books = []
    kept = np.zeros(L, np.int64)
    for i in range(L):
        v = flats[i][ms[i]]
        kept[i] = v.size
        if not np.all(np.isfinite(v)):
            raise _bad_weight(names[i], flats[i], shapes[i])
        if v.size == 0:
            books.append(tuple(np.array([1.0]) for _ in choices))
            continue
        r = kmeans_zero_anchored(v, choices, exact_max=exact_max, max_iter=max_iter)
        E[i] = r.errors
        books.append(r.codebooks)
    if fixed is not None:
        S = _check_budget(budget_bits)
        cost = int((fixed * kept).sum())
        if cost > S:
            raise ValueError(f"layer_bits: the masks at these bit-widths cost {cost} bits, "
                             f"above budget_bits={budget_bits!r}")
        err = float(sum(E[i, choices.index(int(fixed[i]))] for i in range(L)))
        ch = BitChoice(fixed.copy(), err, cost, S, "fixed", err, 0.0)
    else:
        try:
            ch = choose_bits(E, kept, budget_bits, bits=choices, method=method)
        except ValueError as exc:
            raise ValueError(f"masks: {exc}") from None
    cbs = {n: books[i][choices.index(int(ch.bits[i]))] for i, n in enumerate(names)}
    return QuantResult(tuple(names), ch.bits, cbs, E, kept, choices, ch)


def _check_masks(masks, names, shapes):
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool array, got {type(masks).__name__}")
    out = []
    for n, s in zip(names, shapes):
        if n not in masks:
            raise ValueError(f"masks: no mask for layer {n!r}")
        m = np.asarray(masks[n])
        if m.dtype != np.bool_:
            raise TypeError(f"masks[{n!r}] must be a bool array, got dtype {m.dtype}")
        if m.shape != s:
            raise ValueError(f"masks[{n!r}]: shape {m.shape} does not match the weights' {s}")
        out.append(np.ascontiguousarray(m).reshape(-1))
    return out


@dataclass(frozen=True, repr=False)
class Projection:
    """The joint ANNC projection: masks, codebooks and bit-widths within the budget."""

    names: tuple
    masks: dict
    codebooks: dict
    bits: dict
    kept: dict
    budget_bits: int
    errors: np.ndarray
    prune: PruneResult
    quant: QuantResult

    @property
    def size_bits(self) -> int:
        return int(sum(self.bits[n] * self.kept[n] for n in self.names))

    def apply(self, weights: Mapping) -> dict:
        """The projected weights ``V``: pruned and snapped to the codebooks (dtype kept)."""
        out = {}
        for n in self.names:
            w = np.asarray(weights[n])
            dt = compute_dtype(w.dtype)
            out[n] = fake_quant_codebook(w.astype(dt, copy=False), self.masks[n],
                                         self.codebooks[n], name=n).astype(w.dtype, copy=False)
        return out

    def __repr__(self):
        rows = [f"{'layer':<28} {'kept':>10} {'bits':>4} {'centroids':>9}"]
        for n in self.names:
            rows.append(f"{n[-28:]:<28} {self.kept[n]:>10d} {self.bits[n]:>4d} "
                        f"{self.codebooks[n].size:>9d}")
        rows.append(f"size_bits={self.size_bits} budget_bits={self.budget_bits}")
        return "Projection(\n" + "\n".join(rows) + "\n)"


def _lagrangian_bits(flats, tau, per_weight, choices):
    r"""Per layer, the bit-width minimizing pruning + quantization error + ``tau`` * bits.

    With the price ``tau`` (error per bit at the knapsack cut), layer ``l`` at ``b`` bits
    keeps the weights with ``w^2 > tau b + e_l(b)`` (``e_l(b)``: quantization error per kept
    weight) and costs

    .. math:: L_l(b) = \sum_{\text{pruned}} w^2 + n_l(b) \,(e_l(b) + \tau b).
    """
    out = np.empty(len(flats), np.int64)
    c = np.asarray(choices, np.float64)
    for i, f in enumerate(flats):
        v = f.astype(np.float64)
        sq = np.sort(v * v)
        pre = np.concatenate([[0.0], np.cumsum(sq)])
        t = tau * c + per_weight[i]
        cut = np.searchsorted(sq, t, side="right")
        nnz = sq.size - cut
        L = pre[cut] + nnz * (per_weight[i] + tau * c)
        out[i] = choices[int(np.argmin(L))]
    return out


def project(weights: Mapping, budget_bits, *, bits=None, freeze_bits: bool = False,
            iterations: int = 3, exact_max: int = 2048, max_iter: int = 50,
            method: str = "auto") -> Projection:
    r"""The joint projection: pruning and quantization projections, bit-widths re-chosen.

    Each round prunes with the current bit-widths (:func:`prune_to_budget`, whose cut
    density ``tau`` is the error a bit buys at the margin) and quantizes the kept weights
    (:func:`quantize_projection`: codebooks and a multiple-choice knapsack over the bits
    for these masks). The fixed-mask knapsack alone would never trade bits for weights, so
    between rounds every layer re-chooses its bit-width by the Lagrangian
    ``pruning error + quantization error + tau * bits`` (per-weight quantization errors from
    the k-means table). The round with the smallest total error

    .. math:: \sum_{\text{pruned}} w^2 + \sum_l E_l(b_l)

    is returned; every round fits ``budget_bits``.

    The rounds start from ``min(8, budget_bits // layers)`` bits in every layer (a cold
    start). With ``bits`` (int / sequence / mapping), for instance the bit-widths of the
    previous ADMM projection, the rounds also run from ``bits`` (a warm start) and the
    better of the two is returned: every layer stays free to change its bit-width, and
    the result is never worse than either start alone.

    ``freeze_bits=True`` (needs ``bits``) keeps ``bits`` exactly: one pruning projection
    at these bit-widths and the k-means codebooks at these bit-widths, no re-choice.

    >>> rng = np.random.default_rng(0)
    >>> w = {"a": rng.laplace(size=(8, 16)), "b": rng.laplace(size=(4, 8))}
    >>> p = project(w, 200)
    >>> p.size_bits <= 200
    True
    """
    names, flats, shapes = _layers(weights)
    S = _check_budget(budget_bits)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not isinstance(freeze_bits, (bool, np.bool_)):
        raise TypeError(f"freeze_bits must be True or False, got {freeze_bits!r}")
    ws = {n: f.reshape(s) for n, f, s in zip(names, flats, shapes)}
    if freeze_bits:
        if bits is None:
            raise ValueError("freeze_bits=True needs bits (the bit-widths to keep)")
        cur = _per_layer_int(bits, names, "bits", 1, 8)
        pr = prune_to_budget(ws, cur, S)
        q = quantize_projection(ws, pr.masks, S, exact_max=exact_max, max_iter=max_iter,
                                layer_bits=cur)
    else:
        cold = np.full(len(names), max(1, min(8, S // max(len(names), 1))), np.int64)
        starts = [cold]
        if bits is not None:
            warm = _per_layer_int(bits, names, "bits", 1, 8)
            if not np.array_equal(warm, cold):
                starts.insert(0, warm)
        best = None
        done = {}  # bit-widths -> (pruning, quantization), shared by the starts
        for cur in starts:
            path = set()
            for it in range(iterations):
                key = tuple(int(x) for x in cur)
                if key in path:
                    break
                path.add(key)
                if key not in done:
                    pr = prune_to_budget(ws, cur, S)
                    q = quantize_projection(ws, pr.masks, S, exact_max=exact_max,
                                            max_iter=max_iter, method=method)
                    done[key] = (pr, q)
                    total = float(pr.pruning_error.sum()) + q.choice.error
                    if best is None or total < best[0]:
                        best = (total, pr, q)
                pr, q = done[key]
                if it + 1 < iterations:
                    per_weight = q.errors / np.maximum(q.kept, 1)[:, None]
                    cur = _lagrangian_bits(flats, pr.threshold, per_weight, q.bits_choices)
        _, pr, q = best
    return Projection(tuple(names), pr.masks, q.codebooks,
                      {n: int(q.bits[i]) for i, n in enumerate(names)},
                      {n: int(q.kept[i]) for i, n in enumerate(names)}, S, q.errors, pr, q)


# ---------------------------------------------------------------------------
# budgets and the plan
# ---------------------------------------------------------------------------

def min_budget_bits(weights: Mapping) -> int:
    """Smallest feasible budget: 1 bit x 1 kept weight in every layer."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping name -> array")
    return len(weights)


def annc_budget(weights: Mapping, *, rate=None, budget_bits=None) -> int:
    r"""The budget ``S`` in bits from a paper rate (``S = floor(32 N / rate)``) or as given.

    ``N`` is the number of weights of the compressed layers (values or shapes). A budget
    below :func:`min_budget_bits` (1 bit x 1 weight per layer), a rate ``<= 1`` or a rate
    above ``32 N / layers`` is refused with the smallest feasible budget in the message.

    >>> annc_budget({"fc": np.zeros((10, 10))}, rate=32)
    100
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty mapping name -> array (or shape)")
    N = 0
    for n, w in weights.items():
        shp = w if isinstance(w, (tuple, list)) else np.shape(w)
        N += int(np.prod(tuple(int(s) for s in shp)))
    L = len(weights)
    if (rate is None) == (budget_bits is None):
        raise ValueError("give exactly one of rate= or budget_bits=")
    if rate is not None:
        if isinstance(rate, (bool, np.bool_)) or not isinstance(
                rate, (int, float, np.integer, np.floating)):
            raise TypeError(f"rate must be a number > 1, got {rate!r}")
        r = float(rate)
        if not (math.isfinite(r) and r > 1.0):
            raise ValueError(f"rate must be a finite number > 1 (32-bit floats are rate 1), "
                             f"got {rate!r}")
        S = int(math.floor(32.0 * N / r))
        if S < L:
            raise ValueError(
                f"rate={rate!r} gives budget_bits={S} for {N} weights, below the smallest "
                f"feasible budget {L} bits (1 bit x 1 weight in each of {L} layers); the "
                f"largest feasible rate is {32.0 * N / L:.6g}")
        return S
    S = _check_budget(budget_bits)
    if S < L:
        raise ValueError(f"budget_bits={budget_bits!r} is below the smallest feasible budget "
                         f"{L} bits (1 bit x 1 weight in each of {L} layers)")
    return S


def annc_plan(weights: Mapping, masks: Mapping, codebooks: Mapping, bits: Mapping, *,
              budget_bits=None, skipped=(), message: str | None = None):
    """A :class:`~opq_core.allocate.Plan` (``method="annc"``) from masks and codebooks.

    Every layer gets ``grid="codebook"``, its codebook and bit-width, ``channel_scale`` of
    ones, ``step = lam = score_q = 0``; ``kept`` is the mask count,
    ``pruning_error`` the sum of the squared pruned weights, ``predicted_error`` the
    *measured* squared error ``||w - fake_quant_codebook(w)||^2`` of the projection (pruning
    included) and ``quant_error`` its kept part per kept weight. ``success`` is False (status
    2) when ``sum bits * kept`` exceeds ``budget_bits``.

    >>> w = {"fc": np.array([[-1.0, 0.5, 0.0, 2.0]], np.float32)}
    >>> m = {"fc": np.array([[True, True, False, True]])}
    >>> p = annc_plan(w, m, {"fc": [-1.0, 0.5, 2.0]}, {"fc": 2}, budget_bits=6)
    >>> p.size_bits, p.method, p["fc"].grid
    (6, 'annc', 'codebook')
    """
    from .allocate import LayerPlan, Plan
    names, flats, shapes = _layers(weights)
    ms = _check_masks(masks, names, shapes)
    layers = []
    for i, n in enumerate(names):
        if n not in codebooks:
            raise ValueError(f"codebooks: no codebook for layer {n!r}")
        if n not in bits:
            raise ValueError(f"bits: no bit-width for layer {n!r}")
        b = bits[n]
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) \
                or not 1 <= int(b) <= 8:
            raise ValueError(f"bits[{n!r}] must be an integer in 1..8, got {b!r}")
        b = int(b)
        cb = check_codebook(codebooks[n], fn="annc_plan", name=n)
        if cb.size > (1 << b):
            raise ValueError(f"codebooks[{n!r}]: {cb.size} centroids do not fit bits={b} "
                             f"(at most {1 << b})")
        if not np.array_equal(cb.astype(np.float32).astype(np.float64), cb):
            raise ValueError(f"codebooks[{n!r}]: centroids must be exactly representable in "
                             f"float32, e.g. codebook[{int(np.flatnonzero(cb.astype(np.float32) != cb)[0])}]")
        w = np.asarray(weights[n])
        dt = w.dtype if w.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        x = flats[i].astype(dt, copy=False)
        m = ms[i]
        wh = fake_quant_codebook(x, m, cb, name=n)
        x64 = x.astype(np.float64)
        diff = x64 - wh.astype(np.float64)
        kept = int(np.count_nonzero(m))
        perr = float(np.dot(x64[~m], x64[~m]))
        qerr = float(np.dot(diff[m], diff[m]))
        layers.append(LayerPlan(
            name=n, shape=shapes[i], dtype=str(w.dtype), bits=b, grid="codebook", step=0.0,
            channel_scale=np.ones(shapes[i][0] if shapes[i] else 1), scale_dtype="float16",
            lam=0.0, score_q=0.0, quant_error=qerr / kept if kept else 0.0, kept=kept,
            predicted_sparsity=1.0 - kept / x.size if x.size else 0.0, pruning_error=perr,
            predicted_error=perr + qerr, codebook=cb))
    size = sum(lp.size_bits for lp in layers)
    S = None if budget_bits is None else _check_budget(budget_bits)
    ok = S is None or size <= S
    if message is None:
        message = (f"size {size} bits" + ("" if S is None else f" <= budget {S} bits")
                   if ok else f"size {size} bits exceeds the budget {S} bits")
    return Plan(layers=tuple(layers), method="annc", channelwise="layer", grid="codebook",
                error_model="empirical", target_sparsity=None,
                budget_bits=None if S is None else float(S), lam=0.0, skipped=tuple(skipped),
                success=ok, status=0 if ok else 2, message=message,
                min_budget_bits=float(len(layers)))
