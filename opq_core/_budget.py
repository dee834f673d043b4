"""The size-budget solver: bits (1..8 per layer) and sparsity under a budget in bits.

Keeping a weight costs ``B_i`` bits and saves ``w^2 - q_ic(B_i)`` error, so for a multiplier
``mu`` a weight is kept iff ``w^2 > q_ic(B_i) + mu B_i``, and each layer takes the ``B_i``
minimizing its own Lagrangian; an outer bisection on ``mu`` meets the budget, a greedy repair
makes sure it is never exceeded, and a local search improves small models.
"""
from __future__ import annotations

import numpy as np

from ._jit import jit, prange, twins
from . import error_model as em
from ._plan import paper_rate, rate_budget_bits
from ._solver import (_Context, _build_layers, _kth_smallest, _layer_constants, _layer_scores,
                      _mean_threshold, _predicted_sparsity_lam)
from .stats import as_matrix

def _lagrangian_rows(sorted_sq, prefix, s2, bits_c, mu, out_L, out_kept):
    # For every channel c and candidate width b:  sum_w min(w^2, q_cb + mu * b)
    # where q_cb = bits_c[b] * s2[c]; sorted_sq rows ascending, prefix[c, j] = sum of first j.
    C, m = sorted_sq.shape
    nb = bits_c.shape[0]
    for c in prange(C):
        for b in range(nb):
            T = bits_c[b, 0] * s2[c] + mu * bits_c[b, 1]
            lo = 0
            hi = m
            while lo < hi:  # number of entries <= T
                mid = (lo + hi) >> 1
                if sorted_sq[c, mid] <= T:
                    lo = mid + 1
                else:
                    hi = mid
            out_L[c, b] = prefix[c, lo] + (m - lo) * T
            out_kept[c, b] = m - lo


# a binary search per (channel, width): the serial twin for all but huge layers, where
# waking the thread pool (once per layer and bisection step) costs more than the search
_lagrangian_rows, _lagrangian_rows_par = twins(_lagrangian_rows)


#: (channels x widths) from which the Lagrangian of a layer runs on the thread pool.
_PAR_ROWS = 1 << 15


def _sorted_layer(ctx, i):
    if i not in ctx._sorted:
        w = as_matrix(ctx.arrays[ctx.names[i]]).astype(np.float64)
        sq = np.sort(w * w, axis=1)
        pre = np.zeros((sq.shape[0], sq.shape[1] + 1))
        np.cumsum(sq, axis=1, out=pre[:, 1:])
        ctx._sorted[i] = (sq, pre)
    return ctx._sorted[i]


def _lagrangian(ctx, qn_table, bits_set, mu):
    """Per layer: chosen width index, kept count, objective (error part) at multiplier mu."""
    if ctx.importance:
        from . import _importance_solver as _importance
        return _importance.lagrangian(ctx, qn_table, bits_set, mu)
    choice, kept_out, err_out = [], [], []
    bits_arr = np.array(bits_set, dtype=np.float64)
    for i in range(len(ctx.names)):
        sq, pre = _sorted_layer(ctx, i)
        s = ctx.scales[i]
        s2 = np.where(s > 0, s * s, 0.0)
        bc = np.stack([qn_table[i], bits_arr], axis=1)
        C = sq.shape[0]
        Lc = np.empty((C, len(bits_set)))
        Kc = np.empty((C, len(bits_set)), dtype=np.int64)
        kern = _lagrangian_rows_par if C * len(bits_set) >= _PAR_ROWS else _lagrangian_rows
        kern(sq, pre, s2, bc, float(mu), Lc, Kc)
        dead = s <= 0
        if dead.any():  # dead channels: all zero, pruned, no cost, no error
            Lc[dead] = 0.0
            Kc[dead] = 0
        Lb = Lc.sum(axis=0)
        j = int(np.argmin(Lb))  # ties -> the smaller width (bits_set ascending)
        k = int(Kc[:, j].sum())
        choice.append(j)
        kept_out.append(k)
        err_out.append(float(Lb[j] - mu * bits_set[j] * k))
    return np.array(choice), np.array(kept_out, dtype=np.int64), np.array(err_out)


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
    if ctx.error_model == "fitted":  # start from the fit with nothing pruned
        for i in range(L):
            for j, bb in enumerate(bits_set):
                step_table[i, j], qn_table[i, j] = _layer_constants(ctx, i, bb, None, None, 0.0)
    for it in range(n_iter):
        score_tab = qn_table if use_q else np.zeros_like(qn_table)
        choice, kept, mu = _bisect_mu(ctx, score_tab, bits_set, S)
        if it == n_iter - 1:
            break
        for i in range(L):
            b = bits_set[choice[i]]
            lam_i = mu * b
            for j, bb in enumerate(bits_set):
                t_mean = _mean_threshold(ctx, i, lam_i, score_tab[i, choice[i]])
                step_table[i, j], qn_table[i, j] = _layer_constants(
                    ctx, i, bb, t_mean, lam_i, score_tab[i, choice[i]])
    refined = _local_search(ctx, bits_set, qn_table if use_q else np.zeros_like(qn_table),
                            choice, S)
    if refined is not None:
        choice, kept = refined
    bits = [bits_set[j] for j in choice]
    qn = np.array([qn_table[i, choice[i]] for i in range(L)])
    steps = np.array([step_table[i, choice[i]] for i in range(L)])
    score_q = qn.copy() if use_q else np.zeros(L)
    if refined is None:
        kept = _fill_budget(ctx, bits, score_q, kept, S)
    lams = np.empty(L)
    for i in range(L):
        sc = _layer_scores(ctx, i, score_q[i])
        n_pruned = int(ctx.sizes[i] - kept[i])
        lams[i] = -np.inf if n_pruned == 0 else _kth_smallest(sc, n_pruned)
        if ctx.error_model == "fitted":  # refit at the realized thresholds (masks stay)
            steps[i], qn[i] = _layer_constants(ctx, i, bits[i], None, lams[i], score_q[i])
    pred = np.array([_predicted_sparsity_lam(ctx, score_q, lams[i])[i] for i in range(L)])
    layers = _build_layers(ctx, bits, steps, qn, score_q, lams, kept, pred)
    used = sum(b * k for b, k in zip(bits, kept))
    msg = f"size {used} bits of a budget of {S:.0f} bits (paper_rate {paper_rate(N, max(used, 1)):.2f}x)"
    return layers, mu, 0, msg, min_feasible


def _bisect_mu(ctx, score_tab, bits_set, S):
    """Smallest multiplier mu whose Lagrangian solution fits in S bits."""

    def cost(mu):
        choice, kept, _ = _lagrangian(ctx, score_tab, bits_set, mu)
        return sum(bits_set[j] * k for j, k in zip(choice, kept)), choice, kept

    c0, ch0, k0 = cost(0.0)
    if c0 <= S:
        return ch0, k0, 0.0
    if ctx.importance:
        from . import _importance_solver as _importance
        hi = _importance.max_gain(ctx)
    else:
        hi = max(float(np.max(_sorted_layer(ctx, i)[0][:, -1])) for i in range(len(ctx.names)))
    hi = max(hi, 1e-300) / min(bits_set) * 2.0 + 1e-300
    ch, kp = None, None
    c_hi, ch, kp = cost(hi)
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        c, chm, kpm = cost(mid)
        if c <= S:
            hi, ch, kp = mid, chm, kpm
        else:
            lo = mid
    return ch, kp, hi


def _fill_budget(ctx, bits, score_q, kept, S):
    """Greedy repair/fill at fixed widths: at least one weight per layer, then add the
    best remaining weights (largest (w^2 - q) / bits) while they fit; never exceed S."""
    L = len(ctx.names)
    kept = kept.copy()
    floors = _budget_floors(ctx)
    for i in range(L):
        if np.any(ctx.scales[i] > 0):
            kept[i] = max(kept[i], floors[i])
    used = sum(b * k for b, k in zip(bits, kept))
    # remove from the widest layers if the forced weights overflow
    order = np.argsort([-b for b in bits], kind="stable")
    while used > S:
        for i in order:
            if kept[i] > floors[i]:
                kept[i] -= 1
                used -= bits[i]
                break
        else:
            break
    room = S - used
    if room < min(bits):
        return kept
    # candidates: the next weights of every layer in score order, ratio (w^2 - q)/b
    cands = []
    for i in range(L):
        sc = _layer_scores(ctx, i, score_q[i])
        n_pruned = int(ctx.sizes[i] - kept[i])
        take = int(min(n_pruned, room // bits[i]))
        if take <= 0:
            continue
        # the `take` largest scores among the pruned ones
        top = np.partition(sc, [n_pruned - take, n_pruned - 1])[n_pruned - take:n_pruned]
        top = top[np.isfinite(top) & (top > 0)]
        cands.append(np.stack([top / bits[i], np.full(top.size, i)], axis=1))
    if not cands:
        return kept
    allc = np.concatenate(cands)
    allc = allc[np.lexsort((allc[:, 1], -allc[:, 0]))]
    for r, i in allc:
        i = int(i)
        if bits[i] <= room:
            kept[i] += 1
            room -= bits[i]
            if room < min(bits):
                break
    return kept


def _budget_floors(ctx):
    """Budget mode keeps at least one weight per layer, and the min_density floor."""
    f = getattr(ctx, "floors", None)
    f = np.zeros(len(ctx.names), dtype=np.int64) if f is None else f
    return np.maximum(f, 1)


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


@jit()
def _counts_at(neg_all, st, sz, b, base, mu, k):
    """Per layer the number of gains with ``g > mu b`` (at least ``base``); returns the bits."""
    cost = 0.0
    for i in range(st.shape[0]):
        lo = st[i]
        hi = lo + sz[i]
        v = -mu * b[i]
        while lo < hi:  # first index with neg >= v
            mid = (lo + hi) >> 1
            if neg_all[mid] < v:
                lo = mid + 1
            else:
                hi = mid
        c = lo - st[i]
        if sz[i] == 0:
            c = 0
        elif c < base[i]:
            c = base[i]
        k[i] = c
        cost += c * b[i]
    return cost


@jit()
def _ratio_counts(neg_all, st, sz, b, base, S, k):
    """Counts ``k`` at the smallest ratio threshold (bisection) whose bits fit in ``S``;
    returns True when a bisection was needed (then some room may be left to fill)."""
    if _counts_at(neg_all, st, sz, b, base, 0.0, k) <= S:
        return False
    top = 0.0
    for i in range(st.shape[0]):
        if sz[i]:
            top = max(top, -neg_all[st[i]] / b[i])
    lo = 0.0
    hi = top * 2 + 1e-300
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if not (lo < mid and mid < hi):
            break
        if _counts_at(neg_all, st, sz, b, base, mid, k) <= S:
            hi = mid
        else:
            lo = mid
    _counts_at(neg_all, st, sz, b, base, hi, k)
    return True


#: Above this many (weights x candidate widths) the budget solver skips the local search.
LOCAL_SEARCH_MAX = 20_000_000


def _local_search(ctx, bits_set, score_tab, choice, S, max_passes: int = 4):
    """Improve the Lagrangian widths by single-layer width changes (small models only).

    For fixed widths the best kept set is found greedily on exact per-layer sorted scores
    (every weight of a layer costs the same bits, so the top scores of each layer are
    kept); a width change is accepted when it lowers the objective within the budget.
    Returns (choice, kept) or None when the model is too large for the search.
    """
    L = len(ctx.names)
    N = int(ctx.sizes.sum())
    if N * len(bits_set) > LOCAL_SEARCH_MAX:
        return None
    floors = _budget_floors(ctx)
    gains = []  # gains[i][j]: descending positive scores (error saved per kept weight)
    live = []
    for i in range(L):
        row = []
        for j in range(len(bits_set)):
            sc = _layer_scores(ctx, i, score_tab[i, j])
            sc = np.sort(sc[np.isfinite(sc)])[::-1]
            row.append(sc)
        gains.append(row)
        live.append(bool(np.any(ctx.scales[i] > 0)))

    # every (layer, width) row of ascending negated gains in one array, made once: a trial
    # is then one compiled bisection over the layers (_ratio_counts), not Python loops
    nb = len(bits_set)
    start = np.zeros((L, nb), dtype=np.int64)
    size = np.zeros((L, nb), dtype=np.int64)
    parts, at = [], 0
    for i in range(L):
        for j in range(nb):
            start[i, j], size[i, j] = at, gains[i][j].size
            parts.append(-gains[i][j])
            at += gains[i][j].size
    neg_all = np.concatenate(parts) if parts else np.zeros(0)
    csum = [[np.concatenate(([0.0], np.cumsum(row))) for row in gains[i]] for i in range(L)]
    rows = np.arange(L)

    def solve(ch):
        cj = np.asarray(ch, dtype=np.int64)
        b = np.array([bits_set[j] for j in ch], dtype=np.float64)
        g = [gains[i][ch[i]] for i in range(L)]
        st, sz = start[rows, cj], size[rows, cj]
        base = np.array([min(int(floors[i]), int(sz[i])) if live[i] else 0 for i in range(L)],
                        dtype=np.int64)
        if float(np.dot(base, b)) > S:
            return None
        k = np.empty(L, dtype=np.int64)
        # ratio threshold by bisection: keep gains / b > mu (positive gains only)
        if _ratio_counts(neg_all, st, sz, b, base, float(S), k):
            room = S - float(np.dot(k, b))
            # greedy fill with the next items by ratio
            heads = [(-(g[i][k[i]] / b[i]), i) for i in range(L) if k[i] < g[i].size and g[i][k[i]] > 0]
            heads.sort()
            import heapq
            heapq.heapify(heads)
            while heads and room >= b.min():
                r, i = heapq.heappop(heads)
                if b[i] <= room:
                    k[i] += 1
                    room -= b[i]
                    if k[i] < g[i].size and g[i][k[i]] > 0:
                        heapq.heappush(heads, (-(g[i][k[i]] / b[i]), i))
        err = -sum(float(csum[i][ch[i]][k[i]]) for i in range(L))
        return err, k

    ch = list(int(c) for c in choice)
    cur = solve(ch)
    if cur is None:
        return None
    for _ in range(max_passes):
        improved = False
        for i in range(L):
            for j in range(len(bits_set)):
                if j == ch[i]:
                    continue
                trial = ch.copy()
                trial[i] = j
                res = solve(trial)
                if res is not None and res[0] < cur[0] - 1e-12 * abs(cur[0]):
                    ch, cur, improved = trial, res, True
        if not improved:
            break
    return np.array(ch), cur[1]
