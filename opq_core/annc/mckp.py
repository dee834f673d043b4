"""Multiple-choice knapsack over bit-widths: one bit-width per layer under the budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._check import BITS
from ._common import _check_budget

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
