"""Packing: symbols, bit streams, codes of the kept weights."""
from __future__ import annotations

import numpy as np

from .._jit import jit, prange, twins
from .._check import _as_array, _check_bits, _check_bool, _check_codes, _check_int, _fn, _check_buf
from ._common import _BLOCK, _index, _use_parallel
from .quantize import code_dtype


# --------------------------------------------------------------------------------------
# packing: symbols, bit streams, masks
# --------------------------------------------------------------------------------------

@jit()
def _c2s_block(cd, sym, lo, hi, kbits, kmax):
    bad = 0
    cc = cd[lo:hi]
    ss = sym[lo:hi]
    for j in range(cc.shape[0]):
        ci = np.int64(cc[j])
        k = abs(ci)
        neg = 1 if ci < 0 else 0
        ss[j] = ((k - 1) | (neg << kbits)) & 0xFF
        bad += 1 if (k == 0 or k > kmax) else 0
    return bad


@jit()
def _codes_to_symbols(cd, sym, kbits, kmax):
    return _c2s_block(cd, sym, 0, cd.shape[0], kbits, kmax)


@jit()
def _s2c_block(sym, cd, lo, hi, kbits):
    bad = 0
    kmask = (1 << kbits) - 1
    ss = sym[lo:hi]
    cc = cd[lo:hi]
    for j in range(ss.shape[0]):
        sv = np.int64(ss[j])
        k = (sv & kmask) + 1
        cc[j] = -k if (sv >> kbits) & 1 else k
        bad += 1 if (sv >> (kbits + 1)) != 0 else 0
    return bad


@jit()
def _symbols_to_codes(sym, cd, kbits):
    return _s2c_block(sym, cd, 0, sym.shape[0], kbits)


def codes_to_symbols(codes_of_kept, bits):
    r"""Nonzero codes -> unsigned ``bits``-bit symbols: ``(k - 1) | (neg << (bits - 1))``.

    >>> codes_to_symbols(np.array([1, -1, 4, -3], np.int8), 3).tolist()
    [0, 4, 3, 6]
    """
    fn = "codes_to_symbols"
    b = _check_bits(fn, bits)
    cd = _check_codes(fn, "codes_of_kept", codes_of_kept, None)
    flat = cd.reshape(-1)
    sym = np.empty(flat.size, dtype=np.uint8)
    kmax = 1 << (b - 1)
    if _codes_to_symbols(flat, sym, b - 1, kmax):
        a = np.abs(flat.astype(np.int64))
        i = int(np.flatnonzero((a == 0) | (a > kmax))[0])
        raise ValueError(f"{fn}: codes_of_kept{_index(cd.shape, i)} = {int(flat[i])} is not a "
                         f"kept code for bits={b} (1 <= |code| <= {kmax})")
    return sym.reshape(cd.shape)


@jit()
def _scatter_codes(m, sym, cd, kbits):
    """Codes of a flat mask: the next symbol's code at each kept entry, 0 elsewhere (one
    pass). Returns the count of symbols that do not fit ``kbits + 1`` bits, or -1 when
    ``sym`` does not hold exactly one symbol per kept entry."""
    bad = 0
    kmask = (1 << kbits) - 1
    ns = sym.shape[0]
    last = ns - 1
    i = 0
    if ns == 0:
        for j in range(m.shape[0]):
            if m[j]:
                return -1
            cd[j] = 0
        return 0
    # branch-free (a kept entry takes symbol i, then i moves on): at ~50 % sparsity a
    # branch on the mask mispredicts every other entry
    for j in range(m.shape[0]):
        keep = np.int64(m[j])
        sv = np.int64(sym[min(i, last)])
        k = (sv & kmask) + 1
        c = -k if (sv >> kbits) & 1 else k
        cd[j] = c if keep else 0
        bad += keep & np.int64((sv >> (kbits + 1)) != 0)
        i += keep
    return bad if i == ns else -1


def symbols_to_codes(sym, bits, *, mask=None):
    r"""Inverse of :func:`codes_to_symbols`; codes of dtype :func:`code_dtype` (bits).

    With ``mask`` (bool array holding one True per symbol), the codes of the whole
    tensor in one pass: ``codes[mask] = symbols_to_codes(sym, bits)``, 0 elsewhere, in the
    mask's shape.

    >>> symbols_to_codes(np.array([0, 4, 3, 6], np.uint8), 3).tolist()
    [1, -1, 4, -3]
    >>> m = np.array([True, False, True, True, False, True])
    >>> symbols_to_codes(np.array([0, 4, 3, 6], np.uint8), 3, mask=m).tolist()
    [1, 0, -1, 4, 0, -3]
    """
    fn = "symbols_to_codes"
    b = _check_bits(fn, bits)
    s = _as_array(fn, "sym", sym)
    if s.dtype != np.uint8:
        raise TypeError(f"{fn}: sym must be a uint8 array, got dtype {s.dtype}")
    s = np.ascontiguousarray(s)
    flat = s.reshape(-1)
    if mask is not None:
        m = _check_bool(fn, "mask", mask, None)
        cd = np.empty(m.shape, dtype=code_dtype(b))
        bad = _scatter_codes(m.reshape(-1), flat, cd.reshape(-1), b - 1)
        if bad < 0:
            raise ValueError(f"{fn}: mask keeps {int(np.count_nonzero(m))} entries, sym holds "
                             f"{flat.size} symbols")
    else:
        cd = np.empty(flat.size, dtype=code_dtype(b))
        bad = _symbols_to_codes(flat, cd, b - 1)
    if bad:
        i = int(np.flatnonzero(flat >= (1 << b))[0])
        raise ValueError(f"{fn}: sym{_index(s.shape, i)} = {int(flat[i])} does not fit "
                         f"{b} bits")
    return cd if mask is not None else cd.reshape(s.shape)


@jit()
def _pack_group(sym, out, g, cnt, bits):
    """Pack sym[8g : 8g+cnt] (cnt <= 8) into out[g*bits : ...]; returns the bad count."""
    acc = 0
    bad = 0
    base = 8 * g
    for i in range(cnt):
        sv = np.int64(sym[base + i])
        bad += 1 if (sv >> bits) != 0 else 0
        acc |= sv << (bits * i)
    nbytes = (cnt * bits + 7) // 8
    ob = g * bits
    for b in range(nbytes):
        out[ob + b] = (acc >> (8 * b)) & 0xFF
    return bad


@jit()
def _pack_groups(sym, out, g0, g1, bits):
    """Full groups g0..g1-1 (8 symbols -> ``bits`` bytes); returns the bad-symbol count."""
    ss = sym[8 * g0:8 * g1]
    oo = out[bits * g0:bits * g1]
    bad = 0
    for g in range(g1 - g0):
        acc = 0
        hi = 0
        for i in range(8):
            sv = np.int64(ss[8 * g + i])
            hi |= sv
            acc |= sv << (bits * i)
        bad += 1 if (hi >> bits) != 0 else 0
        for b in range(bits):
            oo[bits * g + b] = (acc >> (8 * b)) & 0xFF
    return bad


def _pack_bits(sym, out, bits):
    # prange over blocks of groups (a prange over every group with a reduction is slow)
    n = sym.shape[0]
    ng = n // 8
    nb = (ng + _BLOCK - 1) // _BLOCK
    bads = np.zeros(nb + 1, np.int64)
    for b in prange(nb):
        g0 = b * _BLOCK
        bads[b] = _pack_groups(sym, out, g0, min(g0 + _BLOCK, ng), bits)
    if n - 8 * ng:
        bads[nb] = _pack_group(sym, out, ng, n - 8 * ng, bits)
    return bads.sum()


_pack_bits, _pack_bits_par = twins(_pack_bits)


@jit()
def _unpack_group(buf, out, g, cnt, bits):
    nbytes = (cnt * bits + 7) // 8
    ib = g * bits
    acc = 0
    for b in range(nbytes):
        acc |= np.int64(buf[ib + b]) << (8 * b)
    msk = (1 << bits) - 1
    base = 8 * g
    for i in range(cnt):
        out[base + i] = (acc >> (bits * i)) & msk


@jit()
def _unpack_groups(buf, out, g0, g1, bits):
    bb = buf[bits * g0:bits * g1]
    oo = out[8 * g0:8 * g1]
    msk = (1 << bits) - 1
    for g in range(g1 - g0):
        acc = 0
        for b in range(bits):
            acc |= np.int64(bb[bits * g + b]) << (8 * b)
        for i in range(8):
            oo[8 * g + i] = (acc >> (bits * i)) & msk


def _unpack_bits(buf, out, bits):
    n = out.shape[0]
    ng = n // 8
    nb = (ng + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        g0 = b * _BLOCK
        _unpack_groups(buf, out, g0, min(g0 + _BLOCK, ng), bits)
    if n - 8 * ng:
        _unpack_group(buf, out, ng, n - 8 * ng, bits)


_unpack_bits, _unpack_bits_par = twins(_unpack_bits)


def _packed_len(n, bits):
    return (n * bits + 7) // 8


def pack_bits(symbols, bits):
    r"""Pack ``bits``-bit symbols into an LSB-first bit stream.

    Symbol ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``; stream bit ``j`` is bit
    ``j % 8`` of byte ``j // 8``. Length ``ceil(n * bits / 8)``, padding bits zero.

    >>> pack_bits(np.array([1, 2, 3], np.uint8), 3).tolist()
    [209, 0]
    """
    fn = "pack_bits"
    b = _check_bits(fn, bits)
    s = _as_array(fn, "symbols", symbols)
    if s.dtype != np.uint8:
        raise TypeError(f"{fn}: symbols must be a uint8 array, got dtype {s.dtype}")
    flat = np.ascontiguousarray(s).reshape(-1)
    out = np.empty(_packed_len(flat.size, b), dtype=np.uint8)
    kern = _pack_bits_par if _use_parallel(flat.size) else _pack_bits
    if kern(flat, out, b):
        i = int(np.flatnonzero(flat >= (1 << b))[0])
        raise ValueError(f"{fn}: symbols[{i}] = {int(flat[i])} does not fit {b} bits")
    return out


def unpack_bits(buf, bits, count):
    r"""Inverse of :func:`pack_bits`: ``count`` symbols of ``bits`` bits (uint8).

    ``buf`` must be exactly ``ceil(count * bits / 8)`` bytes.

    >>> unpack_bits(np.array([209, 0], np.uint8), 3, 3).tolist()
    [1, 2, 3]
    """
    fn = "unpack_bits"
    b = _check_bits(fn, bits)
    count = _check_int(fn, "count", count, 0)
    bb = _check_buf(fn, "buf", buf)
    need = _packed_len(count, b)
    if bb.size != need:
        raise ValueError(f"{fn}: buf has {bb.size} bytes, {count} symbols of {b} bits need "
                         f"exactly {need}")
    out = np.empty(count, dtype=np.uint8)
    (_unpack_bits_par if _use_parallel(count) else _unpack_bits)(bb, out, b)
    return out


@jit()
def _count_block(m, lo, hi):
    c = 0
    mm = m[lo:hi]
    for j in range(mm.shape[0]):
        c += 1 if mm[j] else 0
    return c


def _mask_count(m, cnt):
    n = m.shape[0]
    for b in prange(cnt.shape[0]):
        lo = b * _BLOCK
        cnt[b] = _count_block(m, lo, min(lo + _BLOCK, n))


_mask_count, _mask_count_par = twins(_mask_count)


@jit()
def _compact_block(cd, m, lo, hi, at, cnt, kbits, kmax, sym, tmp):
    """Symbols of the ``cnt`` kept codes of elements [lo, hi) into ``sym[at:at + cnt]``;
    returns the number of positions where codes and mask disagree (or a code is out of
    range).

    Two loops: the first maps every code to its symbol in ``tmp`` (a block-sized scratch
    array) and counts bad positions, which vectorizes; the second moves ``tmp`` into
    ``sym`` branch-free: every symbol is stored at the running position, which only
    advances on kept ones, and the loop stops at the block's last kept element, so no
    store leaves the block's own range (``cnt`` comes from the mask). ``m`` is the mask
    viewed as uint8: on a bool array LLVM knows the values are 0/1 and turns the
    arithmetic back into (mispredicted) branches.
    """
    cc = cd[lo:hi]
    mm = m[lo:hi]
    nn = cc.shape[0]
    t = tmp[:nn]
    bad = 0
    for j in range(nn):
        ci = np.int32(cc[j])
        neg = 1 if ci < 0 else 0
        k = ci if ci >= 0 else -ci
        t[j] = np.uint8(((k - 1) | (neg << kbits)) & 0xFF)
        keep = 1 if mm[j] != 0 else 0
        nz = 1 if ci != 0 else 0
        bad += (keep ^ nz) | (1 if k > kmax else 0)
    ss = sym[at:at + cnt]
    last = nn - 1
    while last >= 0 and mm[last] == 0:
        last -= 1
    k = 0
    for j in range(last + 1):
        ss[k] = t[j]
        k += np.intp(mm[j])
    return bad


def _compact(cd, m, offsets, cnt, kbits, kmax, sym, bad):
    n = m.shape[0]
    for b in prange(offsets.shape[0]):
        lo = b * _BLOCK
        tmp = np.empty(_BLOCK, np.uint8)
        bad[b] = _compact_block(cd, m, lo, min(lo + _BLOCK, n), offsets[b], cnt[b], kbits,
                                kmax, sym, tmp)


_compact, _compact_par = twins(_compact)


@jit()
def _scatter_block(sym, m, cd, lo, hi, at, lut):
    """Codes of elements [lo, hi): ``lut[sym[at]]`` for the next symbol where the mask is
    True, 0 elsewhere. Branch-free (``m`` viewed as uint8, see :func:`_compact_block`);
    ``sym`` has one spare entry for the read after the last kept code."""
    mm = m[lo:hi]
    cc = cd[lo:hi]
    k = at
    for j in range(mm.shape[0]):
        kp = np.int64(mm[j])
        cc[j] = lut[sym[k]] * kp
        k += kp


def _scatter(sym, m, cd, offsets, lut):
    n = m.shape[0]
    for b in prange(offsets.shape[0]):
        lo = b * _BLOCK
        _scatter_block(sym, m, cd, lo, min(lo + _BLOCK, n), offsets[b], lut)


_scatter, _scatter_par = twins(_scatter)


_LUT_CACHE = {}


def _symbol_lut(bits):
    """int64 table: symbol (0..255) -> code, for ``bits``."""
    lut = _LUT_CACHE.get(bits)
    if lut is None:
        sym = np.arange(256, dtype=np.int64)
        kb = bits - 1
        k = (sym & ((1 << kb) - 1)) + 1
        lut = np.where((sym >> kb) & 1, -k, k)
        _LUT_CACHE[bits] = lut
    return lut


def pack_codes(codes, mask, bits, *, layer=None):
    r"""Pack the kept codes (flat order) at ``bits`` bits each.

    Equivalent to ``pack_bits(codes_to_symbols(codes[mask], bits), bits)``; ``codes`` must
    be nonzero exactly where ``mask`` is True.

    >>> c = np.array([[1, 0, -2], [0, 2, 0]], np.int8)
    >>> pack_codes(c, c != 0, 2).tolist()
    [28]
    """
    fn = _fn("pack_codes", layer)
    b = _check_bits(fn, bits)
    cd = _check_codes(fn, "codes", codes, None)
    m = _check_bool(fn, "mask", mask, cd.shape)
    cf = cd.reshape(-1)
    mf = m.reshape(-1)
    n = mf.size
    kmax = 1 << (b - 1)
    nb = (n + _BLOCK - 1) // _BLOCK
    cnt = np.empty(nb, np.int64)
    bad = np.empty(nb, np.int64)
    par = _use_parallel(n)
    (_mask_count_par if par else _mask_count)(mf, cnt)
    offsets = np.cumsum(cnt) - cnt
    n_kept = int(cnt.sum())
    sym = np.empty(n_kept, dtype=np.uint8)
    (_compact_par if par else _compact)(cf, mf.view(np.uint8), offsets, cnt, b - 1, kmax, sym,
                                        bad)
    if bad.any():
        ci = cf.astype(np.int64)
        wrong = (mf != (ci != 0)) | (np.abs(ci) > kmax)
        i = int(np.flatnonzero(wrong)[0])
        raise ValueError(f"{fn}: codes{_index(cd.shape, i)} = {int(cf[i])} with "
                         f"mask{_index(cd.shape, i)} = {bool(mf[i])}: codes must be nonzero "
                         f"exactly where mask is True, with |code| <= {kmax} for bits={b}")
    out = np.empty(_packed_len(n_kept, b), dtype=np.uint8)
    (_pack_bits_par if _use_parallel(n_kept) else _pack_bits)(sym, out, b)
    return out


def unpack_codes(buf, mask, bits, *, layer=None):
    r"""Inverse of :func:`pack_codes`: codes of ``mask``'s shape, dtype :func:`code_dtype`.

    ``buf`` must be exactly ``ceil(mask.sum() * bits / 8)`` bytes.

    >>> m = np.array([[True, False, True], [False, True, False]])
    >>> unpack_codes(np.array([28], np.uint8), m, 2).tolist()
    [[1, 0, -2], [0, 2, 0]]
    """
    fn = _fn("unpack_codes", layer)
    b = _check_bits(fn, bits)
    m = _check_bool(fn, "mask", mask, None)
    bb = _check_buf(fn, "buf", buf)
    mf = m.reshape(-1)
    n = mf.size
    nb = (n + _BLOCK - 1) // _BLOCK
    cnt = np.empty(nb, np.int64)
    par = _use_parallel(n)
    (_mask_count_par if par else _mask_count)(mf, cnt)
    n_kept = int(cnt.sum())
    need = _packed_len(n_kept, b)
    if bb.size != need:
        raise ValueError(f"{fn}: buf has {bb.size} bytes, {n_kept} kept codes of {b} bits "
                         f"need exactly {need}")
    offsets = np.cumsum(cnt) - cnt
    sym = np.empty(n_kept + 1, dtype=np.uint8)
    sym[n_kept] = 0
    (_unpack_bits_par if _use_parallel(n_kept) else _unpack_bits)(bb, sym[:n_kept], b)
    cd = np.empty(n, dtype=code_dtype(b))
    (_scatter_par if par else _scatter)(sym, mf.view(np.uint8), cd, offsets, _symbol_lut(b))
    return cd.reshape(m.shape)
