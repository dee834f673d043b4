"""The size-budget solver: bits (1..8 per layer) and sparsity under a budget in bits.

Keeping a weight costs ``B_i`` bits and saves ``w^2 - q_ic(B_i)`` error, so for a multiplier
``mu`` a weight is kept iff ``w^2 > q_ic(B_i) + mu B_i``, and each layer takes the ``B_i``
minimizing its own Lagrangian; an outer bisection on ``mu`` meets the budget.

Memory and time are bounded by a per-layer *sample*, not by the model:

1. one read of every layer takes a strided sub-grid of it (every weight of a small layer;
   at most about ``SAMPLE_TOTAL`` values over the model), sorted per output channel;
2. the Lagrangian of every (layer, width) at a multiplier is one compiled pass over the
   sampled rows (a binary search per row and width), scaled by the layer's sampling
   factor; the bisection on ``mu`` and the widths come from it;
3. on small models (every layer sampled whole) a bounded number of single-layer width
   changes, ranked by their Lagrangian loss at the current price, are tried exactly;
4. at the chosen widths one more read of every layer realizes the budget exactly: the
   weights of ratio ``score / B_i`` above a band (estimated from the sample) are kept, the
   ones inside it are collected, and a greedy fill by ratio over them meets the budget
   without exceeding it; the same candidates give each layer's exact threshold, pruning
   error and pruned ``s_c^2`` (ties broken as the masks break them).
"""
from __future__ import annotations

import numpy as np

from ._jit import prange, twins
from . import error_model as em
from ._plan import paper_rate, rate_budget_bits
from ._solver import (_Context, _build_layers, _channel_table, _layer_constants,
                      _mean_threshold, _pruned_per_channel)
from .stats import as_matrix
from ._budget_exchange import _counts_at, _exchange, _ratio_counts  # noqa: F401
from ._budget_realize import _realize

#: Sampled values over the whole model (a layer gets its share, at least SAMPLE_MIN).
SAMPLE_TOTAL = 1 << 19
SAMPLE_MIN = 1 << 13
#: Up to this many (weights x candidate widths) the width-exchange search runs (exact).
EXCHANGE_MAX = 1 << 20


# ---------------------------------------------------------------------------
# the per-layer sample (sorted rows)
# ---------------------------------------------------------------------------

class _Sample:
    """Sorted sampled rows of every layer, concatenated (see the module doc)."""

    def __init__(self, ctx):
        L = len(ctx.names)
        N = int(ctx.sizes.sum())
        sq_parts, pre_parts, s2_parts, len_parts, lay_parts = [], [], [], [], []
        self.omega = np.ones(L)
        self.exact = True
        for i, name in enumerate(ctx.names):
            m = as_matrix(np.asarray(ctx.arrays[name]))
            C, f = m.shape
            n = C * f
            cap = max(SAMPLE_MIN, int(SAMPLE_TOTAL * n / max(N, 1)))
            s = ctx.scales[i]
            if n <= cap:
                rows = np.arange(C)
                sub = m.astype(np.float64)
            else:
                self.exact = False
                rows = np.arange(C) if C <= cap else np.unique(
                    np.linspace(0, C - 1, cap).astype(np.int64))
                fp = min(f, max(1, cap // rows.size))
                stride = f // fp
                off = (rows * 7919) % stride  # a different column phase per row
                cols = off[:, None] + stride * np.arange(fp)[None, :]
                sub = m[rows[:, None], cols].astype(np.float64)
            del m
            sq = np.sort(sub * sub, axis=1)
            pre = np.zeros((sq.shape[0], sq.shape[1] + 1))
            np.cumsum(sq, axis=1, out=pre[:, 1:])
            self.omega[i] = n / sq.size
            sq_parts.append(sq.reshape(-1))
            pre_parts.append(pre.reshape(-1))
            s2 = s[rows] ** 2
            s2_parts.append(np.where(s[rows] > 0, s2, 0.0))
            len_parts.append(np.full(rows.size, sq.shape[1], dtype=np.int64))
            lay_parts.append(np.full(rows.size, i, dtype=np.int64))
        self.sq = np.concatenate(sq_parts)
        self.pre = np.concatenate(pre_parts)
        self.rs2 = np.concatenate(s2_parts)
        self.rlen = np.concatenate(len_parts)
        self.rlayer = np.concatenate(lay_parts)
        self.rstart = np.zeros(self.rlen.size, dtype=np.int64)
        np.cumsum(self.rlen[:-1], out=self.rstart[1:])
        self.lrows = np.zeros(L + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.rlayer, minlength=L), out=self.lrows[1:])

    def lagrangian(self, qn, bits, mu):
        """(value, kept) per (layer, width) at multiplier mu, in weights (scaled)."""
        L, nb = qn.shape
        out_L = np.zeros((L, nb))
        out_K = np.zeros((L, nb))
        kern = _sample_rows_par if self.sq.size * nb >= (1 << 18) else _sample_rows
        kern(self.sq, self.pre, self.rstart, self.rlen, self.rs2, self.lrows,
             np.ascontiguousarray(qn, dtype=np.float64),
             np.ascontiguousarray(bits, dtype=np.float64), float(mu), out_L, out_K)
        return out_L * self.omega[:, None], out_K * self.omega[:, None]


def _sample_rows(sq, pre, rstart, rlen, rs2, lrows, qn, bits, mu, out_L, out_K):
    # For every layer i, width b: sum_w min(w^2, q_cb + mu B) over the sampled rows of
    # the layer (rows ascending, prefix per row), and the count of w^2 above it.
    L, nb = qn.shape
    for i in prange(L):
        for r in range(lrows[i], lrows[i + 1]):
            s2 = rs2[r]
            if s2 <= 0.0:  # a dead channel: pruned, no cost, no error
                continue
            st = rstart[r]
            m = rlen[r]
            ps = st + r  # prefix rows are one longer
            for b in range(nb):
                T = qn[i, b] * s2 + mu * bits[i, b]
                lo = 0
                hi = m
                while lo < hi:  # number of entries <= T
                    mid = (lo + hi) >> 1
                    if sq[st + mid] <= T:
                        lo = mid + 1
                    else:
                        hi = mid
                out_L[i, b] += pre[ps + lo] + (m - lo) * T
                out_K[i, b] += m - lo


_sample_rows, _sample_rows_par = twins(_sample_rows)


# ---------------------------------------------------------------------------
# the solver
# ---------------------------------------------------------------------------

def _solve_budget(ctx: _Context, budget, bits_set):
    L = len(ctx.names)
    N = int(ctx.sizes.sum())
    S = rate_budget_bits(N, budget[1]) if budget[0] == "rate" else budget[1]
    floors = _budget_floors(ctx)
    min_feasible = float(int(floors.sum()) * min(bits_set))
    use_q = ctx.method == "opq"
    # normalized constants per layer and width (Laplace: the same for all layers)
    qn_table = np.array([[em.quantization_constant(b, ctx.grid, 0.0) for b in bits_set]] * L)
    step_table = np.array([[em.optimal_step(b, ctx.grid, 0.0) for b in bits_set]] * L)
    if S < min_feasible:
        msg = (f"infeasible: budget {S:.0f} bits is below the smallest feasible "
               f"{min_feasible:.0f} bits ({int(floors.sum())} {min(bits_set)}-bit weights: the floor "
               "of kept weights per layer, min_density)")
        layers = _empty_layers(ctx, bits_set, step_table, qn_table, use_q)
        return layers, np.inf, 2, msg, min_feasible
    n_iter = 1 if (ctx.grid == "offset" and ctx.error_model == "laplace") else 2
    # "fitted": the first bisection runs on the Laplace constants (nothing pruned), the
    # second on the constants fitted at the thresholds of the first
    sample = None if ctx.importance else _Sample(ctx)
    exact = N * len(bits_set) <= EXCHANGE_MAX and (sample is None or sample.exact)
    for it in range(n_iter):
        score_tab = qn_table if use_q else np.zeros_like(qn_table)
        choice, mu = _bisect_mu(ctx, sample, score_tab, bits_set, S, exact)
        if it == n_iter - 1:
            break
        for i in range(L):
            lam_i = mu * bits_set[choice[i]]
            sq_i = score_tab[i, choice[i]]
            t_mean = _mean_threshold(ctx, i, lam_i, sq_i)
            for j, bb in enumerate(bits_set):
                step_table[i, j], qn_table[i, j] = _layer_constants(ctx, i, bb, t_mean, lam_i, sq_i)
    score_tab = qn_table if use_q else np.zeros_like(qn_table)
    if exact:
        choice = _exchange(ctx, bits_set, score_tab, choice, S, _live_floors(ctx))
    choice = _fit_floors(choice, bits_set, _live_floors(ctx), S)
    bits = [bits_set[j] for j in choice]
    qn = np.array([qn_table[i, choice[i]] for i in range(L)])
    steps = np.array([step_table[i, choice[i]] for i in range(L)])
    score_q = qn.copy() if use_q else np.zeros(L)
    kept, lams, perr, ps2 = _realize(ctx, sample, bits, score_q, S, exact, _live_floors(ctx))
    for i in range(L):
        if ctx.error_model == "fitted":  # refit at the realized thresholds (masks stay)
            steps[i], qn[i] = _layer_constants(ctx, i, bits[i], None, lams[i], score_q[i])
    pred = _predicted_sparsity_layers(ctx, score_q, lams)
    layers = _build_layers(ctx, bits, steps, qn, score_q, lams, kept, pred, errors=(perr, ps2))
    used = sum(b * int(k) for b, k in zip(bits, kept))
    msg = f"size {used} bits of a budget of {S:.0f} bits (paper_rate {paper_rate(N, max(used, 1)):.2f}x)"
    return layers, mu, 0, msg, min_feasible


def _lagrangian(ctx, sample, qn_table, bits_set, mu):
    """Per layer: chosen width index and (estimated) kept count at multiplier mu."""
    if sample is None:
        from . import _importance_solver as _importance
        choice, kept, _ = _importance.lagrangian(ctx, qn_table, bits_set, mu)
        return choice, kept.astype(np.float64)
    L = len(ctx.names)
    bits = np.broadcast_to(np.array(bits_set, dtype=np.float64), qn_table.shape)
    val, K = sample.lagrangian(qn_table, bits, mu)
    choice = np.argmin(val, axis=1)  # ties -> the smaller width (bits_set ascending)
    return choice, K[np.arange(L), choice]


def _bisect_mu(ctx, sample, score_tab, bits_set, S, exact):
    """Smallest multiplier mu whose Lagrangian solution fits in S bits (the widths)."""
    bs = np.array(bits_set, dtype=np.float64)

    def cost(mu):
        choice, kept = _lagrangian(ctx, sample, score_tab, bits_set, mu)
        return float(np.dot(bs[choice], kept)), choice

    c0, ch0 = cost(0.0)
    if c0 <= S:
        return ch0, 0.0
    if sample is None:
        from . import _importance_solver as _importance
        hi = _importance.max_gain(ctx)
    else:
        hi = float(sample.sq.max()) if sample.sq.size else 0.0
    hi = max(hi, 1e-300) / min(bits_set) * 2.0 + 1e-300
    _, ch = cost(hi)
    lo = 0.0
    rtol = 0.0 if exact else 1e-7  # estimates: no need for the last bits of mu
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi or hi - lo <= rtol * hi:
            break
        c, chm = cost(mid)
        if c <= S:
            hi, ch = mid, chm
        else:
            lo = mid
    return ch, hi


def _fit_floors(choice, bits_set, floors, S):
    """Narrow the widths (the largest floor cost first) until the floors fit in S."""
    choice = np.asarray(choice, dtype=np.int64).copy()
    bs = np.array(bits_set, dtype=np.float64)
    while float(np.dot(bs[choice], floors)) > S:
        cost = np.where(choice > 0, bs[choice] * floors, -1.0)
        choice[int(np.argmax(cost))] -= 1
    return choice


def _budget_floors(ctx):
    """Budget mode keeps at least one weight per layer, and the min_density floor."""
    f = getattr(ctx, "floors", None)
    f = np.zeros(len(ctx.names), dtype=np.int64) if f is None else f
    return np.maximum(f, 1)


def _live_floors(ctx):
    """The floors of kept weights, 0 for a layer without a live (non-zero) channel."""
    fl = _budget_floors(ctx)
    live = np.array([bool(np.any(s > 0)) for s in ctx.scales])
    return np.where(live, fl, 0).astype(np.int64)


def _empty_layers(ctx, bits_set, step_table, qn_table, use_q):
    L = len(ctx.names)
    b = min(bits_set)
    j = bits_set.index(b)
    qn = qn_table[:, j]
    steps = step_table[:, j]
    score_q = qn.copy() if use_q else np.zeros(L)
    kept = np.zeros(L, dtype=np.int64)
    lams = np.full(L, np.inf)
    return _build_layers(ctx, [b] * L, steps, qn, score_q, lams, kept, np.ones(L))


def _predicted_sparsity_layers(ctx, qn, lams):
    """Laplace-predicted pruned fraction of each layer at its own threshold ``lams[i]``."""
    s, fan, q, lid = _channel_table(ctx, qn)
    with np.errstate(invalid="ignore"):
        pruned = np.bincount(lid, weights=fan * _pruned_per_channel(s, q, lams[lid]),
                             minlength=len(ctx.stats))
    sizes = ctx.sizes.astype(np.float64)
    live_n = np.bincount(lid, weights=fan, minlength=len(ctx.stats))
    return (pruned + (sizes - live_n)) / sizes


