"""The shared non-uniform codebook of an OPQ layer (``plan(grid="codebook")``) and the
per-layer choice between it and the fitted uniform grid (``plan(grid="auto")``).

A codebook layer keeps the OPQ plan's mask (the rule ``w^2 - q_c < lambda`` with the
uniform grid's ``q``, so both grids see the same kept weights) and quantizes every kept
weight of channel ``c`` to the nearest of ``s_c * codebook``: one codebook of ``2^B``
non-zero levels, ``2^(B-1)`` magnitudes mirrored for the two signs (0 stays the code of
the pruned weights), shared by the layer's channels in normalized units. The magnitudes
are a weighted Lloyd-Max quantizer of the kept normalized magnitudes ``|u| = |w| / s_c``,
each weighted by ``s_c^2`` (so that it minimizes the error in the weights' own units):

.. math::

    \\min_{c_1 < \\dots < c_K} \\sum_{\\text{kept}} s_c^2 \\, \\min_k (|u| - c_k)^2 ,

fitted on at most :data:`SAMPLE` kept weights of the layer (a seeded sample of a big
layer), started from equal-mass and equal-width cells (the better result is kept) and
iterated until the cells stop moving. Its error is then *measured* on every kept weight.

``grid="auto"`` keeps the codebook for a layer only when it wins with its own bytes
counted: the ``32 K`` bits of its float32 levels (what the file stores) spent instead on
the uniform grid, ``f = 32 K / kept`` more bits per kept weight, would lower the uniform
error ``E_u`` at most to ``E_u (1 - 3 f / 4)`` (a fraction ``f`` of the weights one bit
wider, each bit dividing the error by 4 at high rate: a generous allowance), so the
codebook is chosen iff

.. math:: E_{cb} < E_u \\, \\max(0, 1 - 3 f / 4).

In the size-budget mode the codebooks' bits are taken off the budget before the bits and
masks are solved again (:func:`solve_budget_with_codebooks`), so that
``sum_i (B_i nnz_i + side_i)`` never exceeds it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ._plan import apply_layer, layer_mask
from .annc.kmeans import _round_codebook
from .stats import as_matrix

#: Kept weights a codebook is fitted on at most (a seeded sample of a bigger layer).
SAMPLE = 1 << 16
#: Lloyd iterations at most.
MAX_ITER = 100


def _cells_error(S0, S1, S2, pos, c):
    e = 0.0
    for i in range(c.size):
        a, b = pos[i], pos[i + 1]
        s0, s1, s2 = S0[b] - S0[a], S1[b] - S1[a], S2[b] - S2[a]
        e += s2 - 2.0 * c[i] * s1 + c[i] * c[i] * s0
    return max(e, 0.0)


def _lloyd(a, S0, S1, S2, c, max_iter=MAX_ITER):
    """Weighted Lloyd-Max on sorted ``a`` (prefix sums S0/S1/S2 of weight, weight * a,
    weight * a^2) from increasing levels ``c``; ties on a midpoint go to the lower level
    (the kernels' rule). Returns (levels, error); the error never increases."""
    c = np.array(c, dtype=np.float64)
    pos = None
    for _ in range(max_iter):
        new = np.concatenate([[0], np.searchsorted(a, (c[:-1] + c[1:]) / 2.0, side="right"),
                              [a.size]])
        if pos is not None and np.array_equal(new, pos):
            break
        pos = new
        m0 = S0[pos[1:]] - S0[pos[:-1]]
        m1 = S1[pos[1:]] - S1[pos[:-1]]
        full = m0 > 0
        c[full] = m1[full] / m0[full]
        c = np.sort(c)
    pos = np.concatenate([[0], np.searchsorted(a, (c[:-1] + c[1:]) / 2.0, side="right"),
                          [a.size]])
    return c, _cells_error(S0, S1, S2, pos, c)


def fit_magnitudes(a, weight, levels: int) -> np.ndarray:
    """Weighted Lloyd-Max levels (increasing, float64) of magnitudes ``a >= 0``.

    >>> fit_magnitudes(np.array([1.0, 1.0, 3.0, 3.0]), np.ones(4), 2).tolist()
    [1.0, 3.0]
    """
    a = np.asarray(a, dtype=np.float64)
    wt = np.asarray(weight, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    a, wt = a[order], wt[order]
    uniq = np.unique(a)
    if uniq.size <= levels:
        return uniq
    S0 = np.concatenate([[0.0], np.cumsum(wt)])
    S1 = np.concatenate([[0.0], np.cumsum(wt * a)])
    S2 = np.concatenate([[0.0], np.cumsum(wt * a * a)])
    # equal-mass cells: each level the weighted mean of its share of the mass
    edges = np.searchsorted(S0, np.linspace(0.0, S0[-1], levels + 1)[1:-1], side="left")
    pos = np.concatenate([[0], np.clip(edges, 0, a.size), [a.size]])
    m0 = S0[pos[1:]] - S0[pos[:-1]]
    q = np.where(m0 > 0, (S1[pos[1:]] - S1[pos[:-1]]) / np.where(m0 > 0, m0, 1.0), np.nan)
    q = np.where(np.isnan(q), np.linspace(a[0], a[-1], levels), q)
    width = a[0] + (a[-1] - a[0]) * (np.arange(levels) + 0.5) / levels
    best = None
    for start in (np.sort(q), width):
        c, e = _lloyd(a, S0, S1, S2, start)
        if best is None or e < best[1]:
            best = (c, e)
    return best[0]


def fit_layer_codebook(w, mask, scale, bits: int, *, sample: int = SAMPLE) -> np.ndarray:
    """The layer's codebook: ``2^(bits-1)`` Lloyd-Max magnitudes of its kept normalized
    weights, mirrored (sorted, non-zero, float32-exact; :func:`opq_core.kernels.codebook.
    check_codebook` accepts it). ``scale``: the positive per-channel scales (dead
    channels 1).

    >>> w = np.array([[-2.0, -1.0, 1.0, 2.0]]); m = np.ones((1, 4), bool)
    >>> fit_layer_codebook(w, m, np.ones(1), 2).tolist()
    [-2.0, -1.0, 1.0, 2.0]
    """
    x = as_matrix(np.asarray(w))
    m = np.asarray(mask, dtype=bool).reshape(x.shape)
    s = np.asarray(scale, dtype=np.float64)
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        return np.array([-1.0, 1.0])
    if rows.size > sample:
        pick = np.sort(np.random.default_rng(0).choice(rows.size, sample, replace=False))
        rows, cols = rows[pick], cols[pick]
    a = np.abs(x[rows, cols].astype(np.float64)) / s[rows]
    mags = fit_magnitudes(a, s[rows] * s[rows], 1 << (int(bits) - 1))
    mags = _round_codebook(np.abs(mags))
    mags = mags[mags > 0]
    return np.unique(np.concatenate([-mags[::-1], mags]))


def _kept_error(lp, w, mask) -> float:
    """Squared error of the kept weights of ``w`` quantized by ``lp`` on ``mask``."""
    x = np.asarray(w)
    d = x.astype(np.float64) - apply_layer(lp, x, mask=mask).astype(np.float64)
    d = d[mask]
    return float(np.dot(d, d))


def codebook_layer(lp, w, mask=None):
    """(codebook LayerPlan, its measured kept error, the uniform one's) of uniform ``lp``:
    same mask rule, bits and scales, the fitted codebook in place of the step."""
    x = np.asarray(w)
    m = layer_mask(lp, x) if mask is None else np.asarray(mask, dtype=bool)
    cb = fit_layer_codebook(x, m, lp.kernel_scale, lp.bits)
    cl = replace(lp, grid="codebook", step=0.0, codebook=cb, rule_mask=True)
    e_cb = _kept_error(cl, x, m)
    e_u = _kept_error(lp, x, m)
    kept_s2 = float(np.sum(m.reshape(m.shape[0], -1).sum(axis=1)
                           * np.asarray(lp.channel_scale, dtype=np.float64) ** 2))
    qn = e_cb / kept_s2 if kept_s2 > 0 else 0.0
    cl = replace(cl, quant_error=qn, predicted_error=lp.pruning_error + e_cb)
    return cl, e_cb, e_u


def codebook_wins(e_cb: float, e_u: float, side_bits: int, kept: int) -> bool:
    """The ``grid="auto"`` rule (module doc): the codebook's error beats the uniform one's
    even after its side bits are spent on the uniform grid instead."""
    if kept <= 0:
        return False
    f = side_bits / kept
    return e_cb < e_u * max(0.0, 1.0 - 0.75 * f)


def choose_grids(layers, weights, grid: str, allowed=None):
    """The plan's layers with codebooks: every layer (``grid="codebook"``) or those where
    :func:`codebook_wins` (``"auto"``). ``allowed``: optional per-layer cap on the side
    bits (budget mode); a layer whose codebook needs more stays uniform."""
    out = []
    for i, lp in enumerate(layers):
        cap = None if allowed is None else allowed[i]
        if cap is not None and 32 * (1 << lp.bits) > cap:
            out.append(lp)
            continue
        cl, e_cb, e_u = codebook_layer(lp, weights[lp.name])
        use = grid == "codebook" or codebook_wins(e_cb, e_u, cl.side_bits, lp.kept)
        out.append(cl if use else lp)
    return out


def solve_budget_with_codebooks(solve, ctx, budget_bits: float, bits_set, grid: str):
    """The size-budget solve (``solve(ctx, ("bits", S), bits_set)``, the uniform solver)
    with the codebooks' bits counted: solve, pick the codebooks, take their bits off the
    budget and solve again (twice at most); a layer whose codebook would need more bits
    than were set aside for it stays uniform, so the budget is never exceeded."""
    first = solve(ctx, ("bits", budget_bits), bits_set)
    layers, lam, status, message, min_budget = first
    if status >= 2:
        return first
    chosen = choose_grids(layers, ctx.arrays, grid)
    reserve = [lp.side_bits for lp in chosen]
    for _ in range(2):
        side = float(sum(reserve))
        if side == 0:
            return (chosen, lam, status, message, min_budget)
        again = solve(ctx, ("bits", budget_bits - side), bits_set)
        if again[2] >= 2:  # the codebooks do not fit next to the floor: no codebooks
            return first[0], first[1], first[2], first[3] + "; no room for codebooks", min_budget
        layers, lam, status, message, min_budget = again
        chosen = choose_grids(layers, ctx.arrays, grid, allowed=reserve)
        need = [lp.side_bits for lp in chosen]
        if all(n <= r for n, r in zip(need, reserve)) and (
                grid == "auto" or all(lp.grid == "codebook" for lp in chosen)):
            break
        reserve = [max(r, 32 * (1 << lp.bits)) if grid == "codebook" else r
                   for r, lp in zip(reserve, layers)]
    side = sum(lp.side_bits for lp in chosen)
    n_cb = sum(lp.grid == "codebook" for lp in chosen)
    message += (f"; {n_cb} codebook layer(s), {side} bits of codebooks counted in the "
                "budget")
    return chosen, lam, status, message, min_budget
