"""Slow, obviously-correct NumPy oracles of the kernels in :mod:`opq_core.kernels`.

Every oracle follows the formula of docs/model.md with the kernels' operation order: the
arithmetic is float64, element-wise in the order written, and the result is cast to the
output dtype at the very end. The kernels must equal these bit for bit.

Packing oracles work one bit or one symbol at a time with Python integers, so that they
share no code and no trick with the kernels.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "levels", "codebook", "fake_quant", "codes", "dequantize", "ste_backward", "clip_mask",
    "scores", "mask_from_scores", "topk_mask_by_magnitude", "mask_from_threshold",
    "symbol", "symbols", "code_of_symbol", "pack_bits", "unpack_bits", "pack_mask",
    "unpack_mask", "gap_encode", "gap_decode", "pack_codes", "unpack_codes",
    "packed_matmul", "band_scan",
]


def _rows(a):
    """View a tensor as (output channels, fan-in)."""
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1)


def _channel(v, c):
    v = np.asarray(v, dtype=np.float64)
    return np.full(c, float(v)) if v.ndim == 0 else v.reshape(c)


def _magnitude_index(a, grid, s, theta, step, bits):
    """float64 magnitude index k in 1..K of |w| = a (2-D, channels first)."""
    kmax = float(2 ** (bits - 1))
    sd = (s * step)[:, None]
    if grid == "offset":
        kf = np.floor((a - theta[:, None]) / sd) + 1.0
    elif grid == "symmetric":
        kf = np.rint(a / sd)
    else:
        raise ValueError(grid)
    kf = np.where(kf > kmax, kmax, kf)
    kf = np.where(kf >= 1.0, kf, 1.0)  # also maps NaN to 1
    return kf


def _level(kf, grid, s, theta, step):
    """float64 level of magnitude index kf (2-D, channels first)."""
    if grid == "offset":
        return theta[:, None] + s[:, None] * ((kf - 0.5) * step)
    return kf * (s * step)[:, None]


def levels(scale_c, threshold_c, step, bits, grid):
    """The K float64 levels of one channel, ascending."""
    kf = np.arange(1, 2 ** (bits - 1) + 1, dtype=np.float64)[None, :]
    s = np.array([float(scale_c)])
    th = np.array([float(threshold_c)])
    return _level(kf, grid, s, th, float(step))[0]


def codebook(scale_c, threshold_c, step, bits, grid, dtype):
    """Every value channel c may hold after fake_quant, cast to ``dtype``: 0 and +-levels."""
    lv = levels(scale_c, threshold_c, step, bits, grid)
    return np.concatenate([[0.0], lv, -lv]).astype(dtype)


def _quantize(w, mask, scale, threshold, step, bits, grid):
    """(x, mask, scale, threshold, magnitude index) of one tensor viewed as (C, -1)."""
    x = _rows(np.asarray(w)).astype(np.float64)
    m = _rows(mask).astype(bool)
    c = x.shape[0]
    s = _channel(scale, c)
    th = _channel(threshold, c)
    return x, m, s, th, _magnitude_index(np.abs(x), grid, s, th, float(step), bits)


def fake_quant(w, mask, scale, threshold, step, bits, grid="offset"):
    """Pruned + fake-quantized weights (dtype of w): the quantizer of docs/model.md, sign(0) = +1."""
    w = np.asarray(w)
    x, m, s, th, kf = _quantize(w, mask, scale, threshold, step, bits, grid)
    lv = _level(kf, grid, s, th, float(step))
    val = np.where(x >= 0.0, lv, -lv)
    out = np.where(m, val, 0.0)
    return out.astype(w.dtype).reshape(w.shape)


def codes(w, mask, scale, threshold, step, bits, grid="offset"):
    """Signed magnitude indices (int64): 0 pruned, +-k kept with the sign of w (0 -> +)."""
    w = np.asarray(w)
    x, m, _, _, kf = _quantize(w, mask, scale, threshold, step, bits, grid)
    k = kf.astype(np.int64)
    sk = np.where(x >= 0.0, k, -k)
    return np.where(m, sk, 0).reshape(w.shape)


def dequantize(cd, scale, threshold, step, bits, grid="offset", dtype=np.float32):
    """Dense values of codes with the level formula of :func:`fake_quant`."""
    cd = np.asarray(cd)
    ci = _rows(cd).astype(np.int64)
    c = ci.shape[0]
    s = _channel(scale, c)
    th = _channel(threshold, c)
    kf = np.abs(ci).astype(np.float64)
    lv = _level(kf, grid, s, th, float(step))
    out = np.where(ci > 0, lv, np.where(ci < 0, -lv, 0.0))
    return out.astype(dtype).reshape(cd.shape)


def clip_mask(w, mask, scale, threshold, step, bits, grid="offset"):
    """Kept entries whose unclipped magnitude index exceeds K."""
    w = np.asarray(w)
    a = np.abs(_rows(w).astype(np.float64))
    m = _rows(mask).astype(bool)
    c = a.shape[0]
    s = _channel(scale, c)
    th = _channel(threshold, c)
    sd = (s * float(step))[:, None]
    if grid == "offset":
        kf = np.floor((a - th[:, None]) / sd) + 1.0
    else:
        kf = np.rint(a / sd)
    return (m & (kf > float(2 ** (bits - 1)))).reshape(w.shape)


def ste_backward(grad, mask, clip=None):
    """grad where kept (and not clipped), +0.0 elsewhere."""
    g = np.asarray(grad)
    keep = np.asarray(mask, bool)
    if clip is not None:
        keep = keep & ~np.asarray(clip, bool)
    return np.where(keep, g, np.zeros((), g.dtype)).astype(g.dtype)


def scores(w, q_c, dead=None):
    """Flat float64 scores w^2 - q_c; dead channels -inf."""
    x = _rows(w).astype(np.float64)
    c = x.shape[0]
    q = _channel(q_c, c)
    sc = x * x - q[:, None]
    if dead is not None:
        sc[np.asarray(dead, bool)] = -np.inf
    return sc.reshape(-1)


def band_scan(w, q_c, s2, dead, lo, hi, running):
    """One layer's band scan, one weight at a time (rows in one chunk): (below count, below
    w^2 sum, below s_c^2 sum, candidate scores, w^2, s_c^2, flat indices), the candidates
    being the scores in [lo, hi]. The sums run in the scan's order: ``running``, every
    below weight added to the layer's totals in turn; otherwise a w^2 sum per row added to
    the total and the row's s_c^2 times its count; a dead channel adds ``s_c^2 * fan``."""
    x = _rows(w).astype(np.float64)
    nb, sqb, s2b = 0, 0.0, 0.0
    cand = ([], [], [], [])
    for c in range(x.shape[0]):
        fan = x.shape[1]
        if dead[c]:
            nb += fan
            s2b += s2[c] * fan
            continue
        nrow, sqrow = 0, 0.0
        for j in range(fan):
            sq = x[c, j] * x[c, j]
            score = sq - q_c[c]
            if score < lo:
                nrow += 1
                if running:
                    sqb += sq
                    s2b += s2[c]
                else:
                    sqrow += sq
            elif score <= hi:
                for out, v in zip(cand, (score, sq, s2[c], c * fan + j)):
                    out.append(v)
        nb += nrow
        if not running:
            sqb += sqrow
            s2b += s2[c] * float(nrow)
    return (nb, sqb, s2b, np.array(cand[0], np.float64), np.array(cand[1], np.float64),
            np.array(cand[2], np.float64), np.array(cand[3], np.int64))


def mask_from_scores(score, lam, kept):
    """Keep scores > lam, then the earliest scores == lam up to ``kept`` in all."""
    s = np.asarray(score, np.float64)
    flat = s.reshape(-1)
    m = flat > lam
    for i in np.flatnonzero(flat == lam):
        if m.sum() >= kept:
            break
        m[i] = True
    if m.sum() != kept:
        raise ValueError("infeasible")
    return m.reshape(s.shape)


def topk_mask_by_magnitude(w, kept):
    """Keep the ``kept`` largest |w|; among equal |w| the earlier flat position first."""
    a = np.abs(np.asarray(w).astype(np.float64)).reshape(-1)
    order = np.argsort(-a, kind="stable")
    m = np.zeros(a.size, bool)
    m[order[:kept]] = True
    return m.reshape(np.shape(w))


def mask_from_threshold(w, threshold):
    """|w| >= theta_c per channel (NaN -> False)."""
    w = np.asarray(w)
    a = np.abs(_rows(w).astype(np.float64))
    th = _channel(threshold, a.shape[0])
    return (a >= th[:, None]).reshape(w.shape)


def symbol(code, bits):
    """One nonzero code -> its unsigned symbol: (|k| - 1) | (sign << (bits - 1))."""
    k = abs(int(code))
    assert 1 <= k <= 2 ** (bits - 1)
    return (k - 1) + (2 ** (bits - 1) if int(code) < 0 else 0)


def symbols(cd, bits):
    return np.array([symbol(c, bits) for c in np.asarray(cd).reshape(-1)],
                    dtype=np.uint8).reshape(np.shape(cd))


def code_of_symbol(sym, bits):
    half = 2 ** (bits - 1)
    sym = int(sym)
    return -(sym - half + 1) if sym >= half else sym + 1


def pack_bits(syms, bits):
    """LSB-first bit stream: bit t of symbol i is stream bit i*bits + t."""
    syms = [int(v) for v in np.asarray(syms).reshape(-1)]
    nbits = len(syms) * bits
    out = bytearray((nbits + 7) // 8)
    for i, v in enumerate(syms):
        for t in range(bits):
            if (v >> t) & 1:
                j = i * bits + t
                out[j // 8] |= 1 << (j % 8)
    return np.frombuffer(bytes(out), dtype=np.uint8)


def unpack_bits(buf, bits, count):
    buf = [int(b) for b in np.asarray(buf)]
    out = []
    for i in range(count):
        v = 0
        for t in range(bits):
            j = i * bits + t
            v |= ((buf[j // 8] >> (j % 8)) & 1) << t
        out.append(v)
    return np.array(out, dtype=np.uint8)


def pack_mask(mask):
    """One bit per entry, flat order, bit j in byte j // 8 at position j % 8."""
    return pack_bits(np.asarray(mask, bool).reshape(-1).astype(np.uint8), 1)


def unpack_mask(buf, n):
    return unpack_bits(buf, 1, n).astype(bool)


def _varint(g):
    out = []
    while True:
        low = g % 128
        g //= 128
        if g:
            out.append(low + 128)
        else:
            out.append(low)
            return out


def gap_encode(mask):
    """LEB128 varints of the number of pruned entries before each kept one."""
    out = []
    prev = -1
    for p in np.flatnonzero(np.asarray(mask, bool).reshape(-1)):
        out += _varint(int(p) - prev - 1)
        prev = int(p)
    return np.array(out, dtype=np.uint8)


def gap_decode(buf, n):
    m = np.zeros(n, bool)
    pos, g, shift = -1, 0, 0
    for b in (int(v) for v in np.asarray(buf)):
        g += (b % 128) << shift
        shift += 7
        if b < 128:
            pos += g + 1
            m[pos] = True
            g, shift = 0, 0
    return m


def pack_codes(cd, mask, bits):
    cd = np.asarray(cd).reshape(-1)
    m = np.asarray(mask, bool).reshape(-1)
    return pack_bits(symbols(cd[m], bits), bits)


def unpack_codes(buf, mask, bits):
    m = np.asarray(mask, bool)
    syms = unpack_bits(buf, bits, int(m.sum()))
    out = np.zeros(m.size, dtype=np.int64)
    out[np.flatnonzero(m.reshape(-1))] = [code_of_symbol(s, bits) for s in syms]
    return out.reshape(m.shape)


def packed_matmul(x, codes, scale, threshold, step, bits, grid="offset", codebook=None):
    """``x @ W.T`` as :func:`opq_core._packed.packed_matmul` computes it: each kept weight
    decoded to float32 (the dequantize formula, or ``scale[c] * codebook[code - 1]``), each product
    ``float64(x) * float64(w)`` added, in row-major order of the kept weights, to one of four
    float64 sums that start at 0.0 (the row's k-th kept weight to sum ``k mod 4``), the row's
    result ``(s0 + s1) + (s2 + s3)`` rounded to float32."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    cd = _rows(codes).astype(np.int64)
    if grid == "codebook":  # levels in units of the channel scales: float32(s_c * c_k)
        cb = np.asarray(codebook, dtype=np.float64)
        sc = np.ones(cd.shape[0]) if scale is None else np.asarray(scale, np.float64)
        w = np.where(cd > 0, sc[:, None] * cb[np.maximum(cd, 1) - 1], 0.0).astype(np.float32)
    else:
        w = _rows(dequantize(cd, scale, threshold, step, bits, grid, np.float32))
    y = np.zeros((x.shape[0], cd.shape[0]), dtype=np.float32)
    for b in range(x.shape[0]):
        for c in range(cd.shape[0]):
            acc = [0.0, 0.0, 0.0, 0.0]
            k = 0
            for j in range(cd.shape[1]):
                if cd[c, j] != 0:
                    acc[k % 4] += float(x[b, j]) * float(w[c, j])
                    k += 1
            y[b, c] = np.float32((acc[0] + acc[1]) + (acc[2] + acc[3]))
    return y


def budget_objective_v1(w, S, bits_set, grid="offset", min_density=0.002):
    """The objective ``sum pruned w^2 + sum kept c_B s_c^2`` that the first size-budget
    solver reached (Laplace constants), by enumeration rather than by its bisections.

    Its start: the widths of the Lagrangian solution (each layer takes the (width, kept)
    option minimizing ``error + mu * bits``) at the smallest multiplier ``mu`` whose
    solution fits in ``S`` bits, taken just above it (ties: the narrower width); the
    solution only changes where two options of a layer cost the same, so those multipliers
    are enumerated. Then up to four first-improvement passes over every single-layer width
    change, each scored at fixed widths by the greedy fill by ratio ``gain / B`` (the
    floors first, then every positive gain in ratio order that still fits)."""
    from opq_core import error_model as em

    layers, total = [], 0.0
    for name in w:
        x = _rows(w[name]).astype(np.float64)
        s = np.abs(x).mean(axis=1).astype(np.float16).astype(np.float64)
        live = s > 0
        sq = x * x
        total += float(sq.sum())
        gains = []
        for b in bits_set:
            sc = sq - em.quantization_constant(b, grid, 0.0) * (s * s)[:, None]
            gains.append(np.sort(sc[live].ravel())[::-1])
        floor = max(1, math.ceil(min_density * x.size - 1e-9)) if live.any() else 0
        layers.append((gains, min(floor, int(live.sum()) * x.shape[1])))

    # every (width, kept) option of every layer: cost in bits, error saved, width index
    options = []
    for gains, _ in layers:
        cost = np.concatenate([b * np.arange(g.size + 1.0) for b, g in zip(bits_set, gains)])
        saved = np.concatenate([np.concatenate([[0.0], np.cumsum(g)]) for g in gains])
        width = np.concatenate([np.full(g.size + 1, j) for j, g in enumerate(gains)])
        options.append((cost, saved, width))

    def lagrangian(mu):
        choice, used = [], 0.0
        for cost, saved, width in options:
            v = mu * cost - saved
            best = np.flatnonzero(v == v.min())
            o = best[np.argmin(width[best])]
            choice.append(int(width[o]))
            used += cost[o]
        return choice, used

    choice, used = lagrangian(0.0)
    if used > S:
        events = []
        for cost, saved, _ in options:
            dc = cost[:, None] - cost[None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                mu = (saved[:, None] - saved[None, :]) / dc
            events.append(mu[(dc > 0) & (mu > 0) & np.isfinite(mu)])
        ev = np.unique(np.concatenate(events + [np.zeros(1)]))
        probes = np.append(0.5 * (ev[:-1] + ev[1:]), 2.0 * ev[-1] + 1.0)
        a, z = 0, probes.size - 1  # the first probe that fits (the cost falls with mu)
        while a < z:
            m = (a + z) // 2
            if lagrangian(probes[m])[1] <= S:
                z = m
            else:
                a = m + 1
        choice = lagrangian(probes[a])[0]

    def solve(ch):
        b = [bits_set[j] for j in ch]
        g = [gains[j] for (gains, _), j in zip(layers, ch)]
        k = [min(fl, gi.size) for (_, fl), gi in zip(layers, g)]
        room = S - sum(bi * ki for bi, ki in zip(b, k))
        if room < 0:
            return None
        items = sorted(((-(gi[j] / bi), i, j) for i, (gi, bi) in enumerate(zip(g, b))
                        for j in range(k[i], gi.size) if gi[j] > 0))
        for _, i, _ in items:
            if b[i] <= room:
                k[i] += 1
                room -= b[i]
        return total - sum(float(gi[:ki].sum()) for gi, ki in zip(g, k))

    cur = solve(choice)
    if cur is None:
        return None
    for _ in range(4):
        improved = False
        for i in range(len(layers)):
            for j in range(len(bits_set)):
                if j == choice[i]:
                    continue
                trial = list(choice)
                trial[i] = j
                res = solve(trial)
                if res is not None and res < cur - 1e-12 * abs(cur):
                    choice, cur, improved = trial, res, True
        if not improved:
            break
    return cur
