"""The solvers' hooks for importance-weighted plans (:mod:`opq_core._importance`): weighted
scores, exact-count selection, measured steps and the size-budget Lagrangian."""
from __future__ import annotations

import numpy as np

from ._importance import offset_lam, weight_importance, weighted_scores
from .kernels import mask_from_scores
from .stats import as_matrix


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

    def fun(D):
        e = em._residual(x, bits, D, grid)
        return float(np.mean(wt * e * e))

    return em._refine_step(fun, x, bits, grid)


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
        key = ("imp-total", i)
        if key not in ctx._sorted:  # sum of g h w^2: everything pruned
            g, h = ctx.importance.get(name, (None, None))
            w = as_matrix(ctx.arrays[name]).astype(np.float64)
            ctx._sorted[key] = float(np.sum(weight_importance(ctx.stats[i].shape, g, h) * w * w))
        total = ctx._sorted[key]
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
