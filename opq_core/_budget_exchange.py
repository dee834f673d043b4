"""The size-budget solver's width-exchange search (small models, exact gains).

For fixed widths the best kept set keeps the top scores of every layer (every weight of a
layer costs the same bits): a bisection on the ratio ``gain / B_i`` then a greedy fill by
ratio, one compiled call over the layers. Each pass ranks every single-layer width change
by its Lagrangian loss at the current ratio price (a linear pass over layers and widths),
tries the ``EXCHANGE_TRIALS`` best exactly and keeps each that lowers the objective within
the budget; when none does, pairs of the ``EXCHANGE_PAIRS`` best changes (two layers at
once) are tried. The work per pass is linear in the number of layers.
"""
from __future__ import annotations

import numpy as np

from ._jit import jit
from ._solver import _layer_scores

#: Single-layer width changes tried per pass, the best-ranked changes paired when none
#: of them helps (pairs of two layers), and passes.
EXCHANGE_TRIALS = 64
EXCHANGE_PAIRS = 24
EXCHANGE_PASSES = 6


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
def _ratio_threshold(neg_all, st, sz, b, base, S, k):
    """Counts ``k`` at the smallest ratio threshold (bisection) whose bits fit in ``S``;
    returns the threshold, or -1.0 when every positive gain fits (no bisection)."""
    if _counts_at(neg_all, st, sz, b, base, 0.0, k) <= S:
        return -1.0
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
    return hi


@jit()
def _ratio_counts(neg_all, st, sz, b, base, S, k):
    """As :func:`_ratio_threshold`; True when a bisection was needed (then some room may
    be left to fill)."""
    return _ratio_threshold(neg_all, st, sz, b, base, S, k) >= 0.0


@jit()
def _fixed_solve(neg_all, pre_all, st, pst, sz, b, base, S, k):
    """Kept counts ``k`` at fixed widths: ratio bisection, then a greedy fill of the room
    by ratio (ties: the earlier layer). Returns (sum of kept gains, ratio price)."""
    L = st.shape[0]
    t = _ratio_threshold(neg_all, st, sz, b, base, S, k)
    if t >= 0.0:
        room = S
        minb = np.inf
        for i in range(L):
            room -= k[i] * b[i]
            minb = min(minb, b[i])
        while room >= minb:
            best = -1
            br = 0.0
            for i in range(L):
                if k[i] < sz[i] and b[i] <= room:
                    g = -neg_all[st[i] + k[i]]
                    if g > 0.0:
                        r = g / b[i]
                        if best < 0 or r > br:
                            best = i
                            br = r
            if best < 0:
                break
            k[best] += 1
            room -= b[best]
    gain = 0.0
    for i in range(L):
        gain += pre_all[pst[i] + k[i]]
    return gain, max(t, 0.0)


@jit()
def _values_at(neg_all, pre_all, start, size, bits, t, out):
    """Lagrangian ``-G + t B k`` of every (layer, width) at ratio price ``t`` (gains > t B)."""
    L, nb = start.shape
    for i in range(L):
        for j in range(nb):
            lo = start[i, j]
            c = np.searchsorted(neg_all[lo:lo + size[i, j]], -t * bits[j])
            out[i, j] = -pre_all[start[i, j] + i * nb + j + c] + t * bits[j] * c


def _exchange(ctx, bits_set, score_tab, choice, S, floors):
    """Improve the Lagrangian widths by single-layer width changes (see the module doc);
    returns the widths (indices into ``bits_set``)."""
    L = len(ctx.names)
    nb = len(bits_set)
    start = np.zeros((L, nb), dtype=np.int64)
    size = np.zeros((L, nb), dtype=np.int64)
    parts, pparts, at = [], [], 0
    for i in range(L):
        for j in range(nb):
            sc = _layer_scores(ctx, i, score_tab[i, j])
            g = np.sort(sc[np.isfinite(sc)])[::-1]
            start[i, j], size[i, j] = at, g.size
            parts.append(-g)
            pparts.append(np.concatenate(([0.0], np.cumsum(g))))
            at += g.size
    neg_all = np.concatenate(parts) if parts else np.zeros(0)
    pre_all = np.concatenate(pparts)
    rows = np.arange(L)
    bits_f = np.array(bits_set, dtype=np.float64)

    def solve(ch):
        st, sz = start[rows, ch], size[rows, ch]
        b = bits_f[ch]
        base = np.minimum(floors, sz).astype(np.int64)
        if float(np.dot(base, b)) > S:
            return None
        k = np.empty(L, dtype=np.int64)
        pst = st + rows * nb + ch  # prefix rows are one longer
        gain, t = _fixed_solve(neg_all, pre_all, st, pst, sz, b, base, float(S), k)
        return -gain, t

    ch = np.asarray(choice, dtype=np.int64).copy()
    cur = solve(ch)
    if cur is None:
        return ch
    vals = np.empty((L, nb))

    def ranked(ch, price, count):
        _values_at(neg_all, pre_all, start, size, bits_f, price, vals)
        loss = vals - vals[rows, ch][:, None]
        loss[rows, ch] = np.inf
        order = np.argsort(loss, axis=None, kind="stable")[:min(count, L * (nb - 1))]
        return [divmod(int(m), nb) for m in order]

    for _ in range(EXCHANGE_PASSES):
        improved = False
        for i, j in ranked(ch, cur[1], EXCHANGE_TRIALS):  # single-layer changes
            if j == ch[i]:
                continue
            trial = ch.copy()
            trial[i] = j
            res = solve(trial)
            if res is not None and res[0] < cur[0] - 1e-12 * abs(cur[0]):
                ch, cur, improved = trial, res, True
        if not improved:  # pairs of the best-ranked changes of two different layers
            moves = ranked(ch, cur[1], EXCHANGE_PAIRS)
            for a in range(len(moves)):
                for c in range(a + 1, len(moves)):
                    (i, j), (i2, j2) = moves[a], moves[c]
                    if i == i2 or j == ch[i] or j2 == ch[i2]:
                        continue
                    trial = ch.copy()
                    trial[i], trial[i2] = j, j2
                    res = solve(trial)
                    if res is not None and res[0] < cur[0] - 1e-12 * abs(cur[0]):
                        ch, cur, improved = trial, res, True
                        break
                if improved:
                    break
        if not improved:
            break
    return ch
