r"""Importance-weighted allocation: the OPQ rule with the diagonal of each layer's
output-error metric.

The error that matters is that of a layer's output, not of its weights. With a weight
:math:`g_c > 0` per output channel (e.g. the squared gain of a BatchNorm that follows) and
:math:`h_j > 0` per input channel (e.g. :math:`E[x_j^2]` from calibration data, or the
second moment of a LayerNorm's output), the output error of a layer is, on the diagonal,

.. math::

    E \approx \sum_{c, j} g_c h_j (w_{cj} - \hat w_{cj})^2,

so pruning :math:`w_{cj}` costs :math:`g_c h_j (w_{cj}^2 - q_c)` and one global multiplier
still decides every weight of the network:

.. math::

    \text{prune } w_{cj} \iff g_c h_j (w_{cj}^2 - q_c) < \lambda .

All ones is the paper's rule. For a convolution, :math:`h_j` is per input channel and
applies to every kernel position of that channel.

A weighted layer's mask can no longer be derived from per-channel magnitude thresholds: the
:class:`~opq_core.LayerPlan` keeps ``importance_out`` / ``importance_in`` so that
:meth:`~opq_core.Plan.masks` reproduces the masks, and the ``.opq`` file relies on the
masks it stores (its header does not repeat the importance). The offset grid of a weighted
layer starts at ``theta_c = sqrt(max(0, offset_lam + q_c))``, where ``offset_lam`` is the
smallest unweighted score ``w^2 - q_c`` among the layer's kept weights, so that every kept
weight lies on or above its channel's first level, as in unweighted plans.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .kernels import mask_from_scores
from .stats import as_matrix

__all__ = ["check_importance", "weight_importance", "weighted_scores", "offset_lam"]


def _vector(name, which, v, n, layer_shape):
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or a.size != n:
        raise ValueError(f"importance[{name!r}]: {which} must be a 1-D array of {n} values "
                         f"for a layer of shape {tuple(layer_shape)}, got shape {a.shape}")
    bad = ~np.isfinite(a) | (a <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"importance[{name!r}]: {which}[{i}] = {float(a[i])!r} must be finite and > 0")
    return a.copy()


def check_importance(importance, names, shapes) -> dict:
    """Validate ``plan(importance=)``: ``{layer: (out or None, in or None)}`` in float64.

    Each entry is a pair ``(out, in)`` or a dict with keys ``"out"`` / ``"in"``; ``out`` has
    one value per output channel (``shape[0]``), ``in`` one per input channel
    (``shape[1]``). Vectors of all ones are dropped (they are the identity), as are layers
    left with neither; the result is ``{}`` when nothing is weighted.
    """
    if importance is None:
        return {}
    if not isinstance(importance, Mapping):
        raise TypeError(f"importance must be a mapping layer name -> (out, in), got "
                        f"{type(importance).__name__}")
    known = dict(zip(names, shapes))
    out = {}
    for name, entry in importance.items():
        if name not in known:
            raise ValueError(f"importance: {name!r} is not a compressed layer of the plan")
        shape = known[name]
        if isinstance(entry, Mapping):
            extra = set(entry) - {"out", "in"}
            if extra:
                raise ValueError(f"importance[{name!r}]: unknown keys {sorted(extra)} "
                                 "(expected 'out' and/or 'in')")
            g, h = entry.get("out"), entry.get("in")
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            g, h = entry
        else:
            raise TypeError(f"importance[{name!r}]: expected a pair (out, in) or a dict with "
                            f"'out'/'in', got {type(entry).__name__}")
        if g is not None:
            g = _vector(name, "out", g, int(shape[0]), shape)
            g = None if np.all(g == 1.0) else g
        if h is not None:
            h = _vector(name, "in", h, int(shape[1]), shape)
            h = None if np.all(h == 1.0) else h
        if g is not None or h is not None:
            out[name] = (g, h)
    return out


def weight_importance(shape, g, h) -> np.ndarray:
    """The per-weight importance ``g_c h_j`` as a ``(C, fan_in)`` float64 matrix (a
    convolution's ``h_j`` repeated over the kernel positions of input channel ``j``)."""
    C = int(shape[0])
    fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    col = np.ones(fan) if h is None else np.repeat(np.asarray(h, np.float64),
                                                   fan // int(shape[1]))
    row = np.ones(C) if g is None else np.asarray(g, np.float64)
    return row[:, None] * col[None, :]


def weighted_scores(w, score_q, channel_scale, g, h) -> np.ndarray:
    """Flat float64 scores ``g_c h_j (w^2 - q_c)`` of one layer (dead channels ``-inf``).

    >>> weighted_scores(np.array([[0.5, -2.0]]), 1.0, [1.0], None, np.array([2.0, 1.0]))
    array([-1.5,  3. ])
    """
    from ._plan import opq_scores
    base = opq_scores(w, score_q, channel_scale)
    if g is None and h is None:
        return base
    wt = weight_importance(np.shape(w), g, h).reshape(-1)
    return base * wt


def offset_lam(w, score_q, channel_scale, mask) -> float:
    """Smallest unweighted score ``w^2 - q_c`` among the kept weights of live channels
    (``-inf`` when none): the offset grid's ``lam`` for a weighted layer."""
    from ._plan import opq_scores
    s = np.asarray(channel_scale, dtype=np.float64)
    sc = opq_scores(w, score_q, s).reshape(np.shape(mask)[0], -1)
    m = np.asarray(mask, dtype=bool).reshape(sc.shape) & (s > 0)[:, None]
    return float(sc[m].min()) if m.any() else -np.inf


# ---------------------------------------------------------------------------
# hooks used by the solvers (allocate, _solver, _budget) when importance is given
# ---------------------------------------------------------------------------

def layer_scores(ctx, i, score_q) -> np.ndarray:
    """Scores of layer ``i`` of a solver context: weighted when the layer has importance."""
    name = ctx.names[i]
    g, h = ctx.importance.get(name, (None, None)) if ctx.importance else (None, None)
    return weighted_scores(ctx.arrays[name], score_q, ctx.scales[i], g, h)


def realize_sparsity(ctx, sparsity: float, score_q):
    """Exact-count weighted masks over the network; same return values as
    :func:`opq_core.allocate._realize_sparsity` (kept, lam per layer, global lam, pruning
    error, pruned ``s_c^2``). Ties at ``lam`` are pruned from the end of the network first,
    and within a layer the later ones first (what :func:`opq_core._plan.layer_mask_from`
    reproduces)."""
    L = len(ctx.names)
    sizes = ctx.sizes
    scs = [layer_scores(ctx, i, float(score_q[i])) for i in range(L)]
    N = int(sizes.sum())
    n_dead = sum(int(np.count_nonzero(np.isneginf(s))) for s in scs)
    k = max(round(sparsity * N), n_dead)
    if ctx.method == "uniform":
        raise ValueError("importance= is not used by method='uniform' (a per-layer baseline)")
    kept = sizes.copy()
    lam = -np.inf
    if k > 0:
        allsc = np.concatenate(scs)
        lam = float(np.partition(allsc, k - 1)[k - 1])
        below = np.array([int(np.count_nonzero(s < lam)) for s in scs])
        ties = np.array([int(np.count_nonzero(s == lam)) for s in scs])
        left = k - int(below.sum())
        pruned = below.copy()
        for i in range(L - 1, -1, -1):  # later ties pruned first
            t = min(left, int(ties[i]))
            pruned[i] += t
            left -= t
        kept = sizes - pruned
    perr = np.zeros(L)
    ps2 = np.zeros(L)
    for i in range(L):
        m = mask_from_scores(scs[i], lam, int(kept[i])).reshape(-1)
        w = as_matrix(ctx.arrays[ctx.names[i]]).astype(np.float64).reshape(-1)
        perr[i] = float(np.sum(np.where(m, 0.0, w * w)))
        s = ctx.scales[i]
        s2 = np.repeat(s * s, sizes[i] // max(len(s), 1))
        ps2[i] = float(np.sum(np.where(m, 0.0, s2)))
    return kept, np.full(L, lam), lam, perr, ps2


def layer_constants(ctx, i, bits, lam, score_q):
    """(step D, normalized error) of a weighted layer, measured on its kept weights under
    the weighted rule, each weight's error counted with its importance (empirical model)."""
    from . import error_model as em
    from ._plan import channel_thresholds
    grid = ctx.grid
    name = ctx.names[i]
    s = ctx.scales[i]
    live = s > 0
    if not live.any():
        return em.optimal_step(bits, grid), em.quantization_constant(bits, grid)
    m = as_matrix(ctx.arrays[name]).astype(np.float64)
    g, h = ctx.importance[name]
    wt = weight_importance(ctx.stats[i].shape, g, h)
    sc = layer_scores(ctx, i, score_q).reshape(m.shape)
    keep = (sc >= (-np.inf if lam is None else lam)) & live[:, None]
    if not keep.any():
        return em.optimal_step(bits, grid), em.quantization_constant(bits, grid)
    olam = offset_lam(m, score_q, s, keep)
    u = np.abs(m) / np.where(live, s, 1.0)[:, None]
    theta = (channel_thresholds(olam, score_q, s) / np.where(live, s, 1.0))[:, None]
    x = np.maximum(u - theta, 0.0)[keep] if grid == "offset" else u[keep]
    wk = wt[keep]
    wk = wk / wk.mean()
    return _weighted_step(x, wk, bits, grid)


def _weighted_step(x, wt, bits, grid, max_samples=1_000_000):
    from . import error_model as em
    if x.size > max_samples:
        idx = np.linspace(0, x.size - 1, max_samples).astype(np.int64)
        x, wt = x[idx], wt[idx]
    K = em.levels(bits)

    def fun(D):
        if grid == "offset":
            k = np.clip(np.floor(x / D) + 1.0, 1.0, K)
            e = x - (k - 0.5) * D
        else:
            k = np.clip(np.rint(x / D), 1.0, K)
            e = x - k * D
        return float(np.mean(wt * e * e))

    d0 = em.optimal_step(bits, grid) * max(float(np.mean(x)), 1e-12)
    best = (d0, fun(d0))
    for lo, hi, n in ((d0 / 8.0, d0 * 8.0, 80), (d0 / 1.25, d0 * 1.25, 40)):
        cand = em._minimize_1d(fun, lo, hi, n=n)
        if cand[1] < best[1]:
            best = cand
        d0 = best[0]
    return best


def _sorted_gains(ctx, i, score_q):
    key = ("imp", i, float(score_q))
    if key not in ctx._sorted:
        sc = layer_scores(ctx, i, score_q)
        sc = sc[np.isfinite(sc)]
        gains = np.sort(sc)[::-1]
        pre = np.zeros(gains.size + 1)
        np.cumsum(gains, out=pre[1:])
        ctx._sorted[key] = (gains, pre)
    return ctx._sorted[key]


def lagrangian(ctx, qn_table, bits_set, mu):
    """Weighted version of :func:`opq_core._budget._lagrangian`: per layer, the width
    minimizing ``sum_pruned g h w^2 + sum_kept (g h q + mu b)``, i.e. keeping the weights
    of weighted score ``> mu b``. Returns (width index, kept count, error part)."""
    choice, kept_out, err_out = [], [], []
    for i in range(len(ctx.names)):
        name = ctx.names[i]
        g, h = ctx.importance.get(name, (None, None))
        w = as_matrix(ctx.arrays[name]).astype(np.float64)
        total = float(np.sum(weight_importance(ctx.stats[i].shape, g, h) * w * w)) if (g is not None or h is not None) \
            else float(np.sum(w * w))
        best = None
        for j, b in enumerate(bits_set):
            gains, pre = _sorted_gains(ctx, i, float(qn_table[i, j]))
            k = int(np.searchsorted(-gains, -mu * b, side="left"))  # gains > mu b
            err = total - pre[k]
            val = err + mu * b * k
            if best is None or val < best[0]:
                best = (val, j, k, err)
        choice.append(best[1])
        kept_out.append(best[2])
        err_out.append(best[3])
    return np.array(choice), np.array(kept_out, dtype=np.int64), np.array(err_out)


def max_gain(ctx) -> float:
    """An upper bound of every weighted ``g h w^2`` (the budget bisection's bracket)."""
    hi = 0.0
    for i, name in enumerate(ctx.names):
        g, h = ctx.importance.get(name, (None, None))
        w = as_matrix(ctx.arrays[name]).astype(np.float64)
        hi = max(hi, float(np.max(weight_importance(ctx.stats[i].shape, g, h) * w * w)))
    return hi


def finish_layers(ctx, layers):
    """Attach the importance and the offset grid's ``offset_lam`` to the weighted layers."""
    from dataclasses import replace
    from ._plan import layer_mask
    out = []
    for lp in layers:
        if lp.name not in ctx.importance:
            out.append(lp)
            continue
        g, h = ctx.importance[lp.name]
        lp = replace(lp, importance_out=g, importance_in=h)
        w = ctx.arrays[lp.name]
        mask = layer_mask(lp, w)
        lp = replace(lp, offset_lam=offset_lam(w, lp.score_q, lp.channel_scale, mask))
        out.append(lp)
    return out
