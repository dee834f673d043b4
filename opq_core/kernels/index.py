"""The two index codes of a sparsity mask: bitmask and gap (varint) code, and their cost."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._jit import jit, prange, twins
from .._check import _check_bool, _check_buf, _check_int
from ._common import _BLOCK, _use_parallel


@jit()
def _pack_mask_bytes(m, out, lo, hi):
    mm = m[8 * lo:min(8 * hi, m.shape[0])]
    oo = out[lo:hi]
    n = mm.shape[0]
    full = n // 8
    for i in range(full):
        acc = 0
        for t in range(8):
            acc |= (1 if mm[8 * i + t] else 0) << t
        oo[i] = acc
    if full < oo.shape[0]:
        acc = 0
        for t in range(n - 8 * full):
            acc |= (1 if mm[8 * full + t] else 0) << t
        oo[full] = acc


def _byte_blocks(kernel, a, b, nbytes):
    """``kernel(a, b, lo, hi)`` over the blocks ``[lo, hi)`` of :data:`_BLOCK` bytes of a
    bitmask of ``nbytes`` bytes."""
    nb = (nbytes + _BLOCK - 1) // _BLOCK
    for blk in prange(nb):
        lo = blk * _BLOCK
        kernel(a, b, lo, min(lo + _BLOCK, nbytes))


_byte_blocks, _byte_blocks_par = twins(_byte_blocks)


def pack_mask(mask):
    r"""Bitmask of a bool array in flat order, little bit order (``np.packbits(...,
    bitorder="little")``): ``ceil(n / 8)`` bytes.

    >>> pack_mask(np.array([True, False, True, True, False, False, False, False, True])).tolist()
    [13, 1]
    """
    fn = "pack_mask"
    m = _check_bool(fn, "mask", mask, None).reshape(-1)
    out = np.empty((m.size + 7) // 8, dtype=np.uint8)
    (_byte_blocks_par if _use_parallel(m.size) else _byte_blocks)(_pack_mask_bytes, m, out,
                                                                 out.shape[0])
    return out


def unpack_mask(buf, n):
    r"""Inverse of :func:`pack_mask`: a flat bool array of length ``n``.

    ``buf`` must be exactly ``ceil(n / 8)`` bytes with zero padding bits.

    >>> unpack_mask(np.array([13, 1], np.uint8), 9).astype(int).tolist()
    [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    fn = "unpack_mask"
    n = _check_int(fn, "n", n, 0)
    bb = _check_buf(fn, "buf", buf)
    if bb.size != (n + 7) // 8:
        raise ValueError(f"{fn}: buf has {bb.size} bytes, a mask of {n} entries needs exactly "
                         f"{(n + 7) // 8}")
    if n % 8 and int(bb[-1]) >> (n % 8):
        raise ValueError(f"{fn}: padding bits after entry {n} are set (corrupt buffer)")
    # NumPy's table-driven unpack: 0/1 bytes, which are the bools' bytes
    m = np.unpackbits(bb, count=n, bitorder="little").view(np.bool_)
    return m


@jit()
def _varint_len(g):
    n = 1
    while g >= 128:
        g >>= 7
        n += 1
    return n


#: Multiplier that gathers the low bits of the 8 bytes of a word into its top byte.
_GATHER = np.uint64(0x0102040810204080)


@jit()
def _pattern(x):
    """The 8 entries of a word of bool bytes as the bits of one byte (entry t = bit t):
    the partial products of ``x * _GATHER`` land on distinct bits, so nothing carries."""
    return (x * _GATHER) >> np.uint64(56)


def _pattern_tables():
    """Per 8-bit pattern of kept entries (entry t = bit t): their count, the first and last
    one, their positions (``positions[8 p + i]``, the i-th lowest, for ``i < count[p]``),
    and the gaps between consecutive ones (each below 7, one varint byte) as the bytes of a
    uint64, the first gap in the low byte. Pattern 0 has count 0 and first/last 0."""
    count = np.zeros(256, np.int64)
    low = np.zeros(256, np.int64)
    high = np.zeros(256, np.int64)
    positions = np.zeros(256 * 8, np.int64)
    inner = np.zeros(256, np.uint64)
    for p in range(1, 256):
        pos = [t for t in range(8) if p >> t & 1]
        count[p], low[p], high[p] = len(pos), pos[0], pos[-1]
        positions[8 * p:8 * p + len(pos)] = pos
        inner[p] = sum((b - a - 1) << (8 * i) for i, (a, b) in enumerate(zip(pos, pos[1:])))
    return count, low, high, positions, inner


#: The byte-pattern tables of :func:`_pattern_tables` (also read by the packed matmul and
#: the entropy decoder, which expand bitmask bytes).
_P_COUNT, _P_LOW, _P_HIGH, _P_POS, _P_INNER = _pattern_tables()


@jit()
def _gap_scan_block(m, words, lo, hi, first, last, cnt, nbytes, b):
    """First/last kept position of the block, its kept count, and the varint bytes of the
    gaps of its kept positions, the first one counted from the block's start (corrected
    in :func:`_gap_offsets`). Eight entries at a time: within a word every kept entry but
    the first has a gap below 8 (one byte), so a word costs a multiply and table reads."""
    run = 0  # pruned entries since the last kept one (or the block's start)
    c = 0
    nby = 0
    f = -1
    la = -1
    w_end = hi // 8  # blocks start at multiples of 8; only the last one has a tail
    for wi in range(lo // 8, min(w_end, words.shape[0])):
        x = words[wi]
        if x == 0:
            run += 8
            continue
        p = _pattern(x)
        k = _P_COUNT[p]
        i0 = _P_LOW[p]
        h = _P_HIGH[p]
        c += k
        nby += _varint_len(run + i0) + (k - 1)
        if f < 0:
            f = 8 * wi + i0
        la = 8 * wi + h
        run = 7 - h
    for j in range(8 * min(w_end, words.shape[0]), hi):  # the tail after the last word
        if m[j]:
            nby += _varint_len(run)
            c += 1
            if f < 0:
                f = j
            la = j
            run = 0
        else:
            run += 1
    first[b] = f
    last[b] = la
    cnt[b] = c
    nbytes[b] = nby


def _gap_scan(m, words, first, last, cnt, nbytes):
    n = m.shape[0]
    for b in prange(first.shape[0]):
        lo = b * _BLOCK
        _gap_scan_block(m, words, lo, min(lo + _BLOCK, n), first, last, cnt, nbytes, b)


_gap_scan, _gap_scan_par = twins(_gap_scan)


@jit()
def _gap_offsets(first, last, nbytes, lead, offsets, block):
    """Serial prefix over blocks: the gap leading each block's first kept position, and
    the byte offset where the block writes. Returns the total byte count."""
    prev = -1
    at = 0
    for b in range(first.shape[0]):
        offsets[b] = at
        if first[b] < 0:
            lead[b] = -1
            continue
        g = first[b] - prev - 1
        lead[b] = g
        # the scan counted the first gap from the block's start
        at += _varint_len(g) + nbytes[b] - _varint_len(first[b] - b * block)
        prev = last[b]
    return at


@jit()
def _put_varint(out, at, g):
    while g >= 128:
        out[at] = (g & 0x7F) | 0x80
        g >>= 7
        at += 1
    out[at] = g
    return at + 1


@jit()
def _gap_write_block(m, words, lo, hi, first, lead, at, end, out):
    """Varints of the kept positions of the block, eight entries at a time.

    A word's varints are the gap before its first kept entry, then the gaps between its
    kept entries (one byte each, from :data:`_P_INNER`). With 8 bytes of room before the
    block's ``end`` all 8 bytes are stored unconditionally and ``at`` moves by the kept
    count only: the bytes past it land where the block writes next (or on the room)."""
    if lead < 0:
        return
    prev = first - lead - 1  # the previous kept position (global), or -1
    nw = min(hi // 8, words.shape[0])
    for wi in range(lo // 8, nw):
        x = words[wi]
        if x == 0:
            continue
        p = _pattern(x)
        base = 8 * wi
        k = _P_COUNT[p]
        inner = _P_INNER[p]
        g = base + _P_LOW[p] - prev - 1
        if g < 128 and at + 8 <= end:
            o = out[at:at + 8]
            o[0] = np.uint8(g)
            o[1] = np.uint8(inner & np.uint64(0xFF))
            o[2] = np.uint8((inner >> np.uint64(8)) & np.uint64(0xFF))
            o[3] = np.uint8((inner >> np.uint64(16)) & np.uint64(0xFF))
            o[4] = np.uint8((inner >> np.uint64(24)) & np.uint64(0xFF))
            o[5] = np.uint8((inner >> np.uint64(32)) & np.uint64(0xFF))
            o[6] = np.uint8((inner >> np.uint64(40)) & np.uint64(0xFF))
            o[7] = np.uint8(inner >> np.uint64(48))
            at += k
        else:
            at = _put_varint(out, at, g)
            for t in range(k - 1):
                out[at] = np.uint8((inner >> np.uint64(8 * t)) & np.uint64(0xFF))
                at += 1
        prev = base + _P_HIGH[p]
    for j in range(8 * nw, hi):
        if m[j]:
            at = _put_varint(out, at, j - prev - 1)
            prev = j


def _gap_write(m, words, first, lead, offsets, out):
    n = m.shape[0]
    nb = lead.shape[0]
    for b in prange(nb):
        lo = b * _BLOCK
        end = offsets[b + 1] if b + 1 < nb else out.shape[0]
        _gap_write_block(m, words, lo, min(lo + _BLOCK, n), first[b], lead[b], offsets[b],
                         end, out)


_gap_write, _gap_write_par = twins(_gap_write)


def _words(m):
    """The whole 8-entry words of a flat bool array as uint64 (a view when aligned)."""
    nw = m.shape[0] // 8
    head = m[:8 * nw]
    if head.ctypes.data % 8:
        head = head.copy()
    return head.view(np.uint64)


def _gap_plan(m):
    nb = (m.size + _BLOCK - 1) // _BLOCK
    first = np.empty(nb, np.int64)
    last = np.empty(nb, np.int64)
    cnt = np.empty(nb, np.int64)
    nbytes = np.empty(nb, np.int64)
    par = _use_parallel(m.size)
    words = _words(m)
    with np.errstate(over="ignore"):  # uint64 products wrap on purpose (no-JIT runs)
        (_gap_scan_par if par else _gap_scan)(m, words, first, last, cnt, nbytes)
    lead = np.empty(nb, np.int64)
    offsets = np.empty(nb, np.int64)
    total = int(_gap_offsets(first, last, nbytes, lead, offsets, _BLOCK))
    return lead, offsets, first, words, total, par, int(cnt.sum())


def gap_encode(mask):
    r"""Gap code of the kept positions of a bool array (flat order).

    For kept positions :math:`p_0 < p_1 < \dots` the gaps :math:`p_0` and
    :math:`p_i - p_{i-1} - 1` (the number of pruned entries before each kept one) are
    written as LEB128 varints (7 bits per byte, high bit = more bytes follow). An empty
    mask gives an empty buffer; the length ``n`` is stored elsewhere.

    >>> gap_encode(np.array([False, True, True] + [False] * 200 + [True])).tolist()
    [1, 0, 200, 1]
    """
    fn = "gap_encode"
    m = _check_bool(fn, "mask", mask, None).reshape(-1)
    lead, offsets, first, words, total, par, _ = _gap_plan(m)
    out = np.empty(total, dtype=np.uint8)
    with np.errstate(over="ignore"):
        (_gap_write_par if par else _gap_write)(m, words, first, lead, offsets, out)
    return out


@jit()
def _get_varint(buf, i):
    """The LEB128 varint at ``buf[i]`` (the one reader of the varints :func:`_put_varint`
    writes) and the index after it; the index is -1 when the buffer ends inside it and -2
    when it runs past 9 bytes."""
    nb = buf.shape[0]
    g = 0
    shift = 0
    while True:
        if i >= nb:
            return g, -1
        if shift > 56:
            return g, -2
        byte = np.int64(buf[i])
        i += 1
        g |= (byte & 0x7F) << shift
        shift += 7
        if byte < 128:
            return g, i


@jit()
def _gap_decode(buf, m):
    """Returns 0 when fine, else an error code: 1 truncated varint, 2 position >= n,
    3 varint longer than 9 bytes."""
    n = m.shape[0]
    i = 0
    pos = -1
    while i < buf.shape[0]:
        g = np.int64(buf[i])
        if g < 128:  # most gaps fit one byte
            i += 1
        else:
            g, i = _get_varint(buf, i)
            if i < 0:
                return 1 if i == -1 else 3
        if g >= n - pos - 1:
            return 2
        pos += g + 1
        m[pos] = True
    return 0


def gap_decode(buf, n):
    r"""Inverse of :func:`gap_encode`: a flat bool array of length ``n``.

    Raises ValueError on a truncated buffer or a position beyond ``n``.

    >>> gap_decode(np.array([1, 0, 200, 1], np.uint8), 204).nonzero()[0].tolist()
    [1, 2, 203]
    """
    fn = "gap_decode"
    n = _check_int(fn, "n", n, 0)
    bb = _check_buf(fn, "buf", buf)
    m = np.zeros(n, dtype=np.bool_)
    err = _gap_decode(bb, m)
    if err == 1:
        raise ValueError(f"{fn}: buf is truncated (its last varint has no end)")
    if err == 2:
        raise ValueError(f"{fn}: buf encodes a position beyond n={n} (corrupt buffer or wrong n)")
    if err == 3:
        raise ValueError(f"{fn}: buf holds a varint longer than 9 bytes (corrupt buffer)")
    return m


@dataclass(frozen=True)
class MaskCodingCost:
    """Bytes of the two index codes of a mask, and the cheaper one.

    ``best`` is ``"gap"`` only when strictly smaller (a bitmask decodes faster);
    ``nbytes`` is its size. ``cost["gap"]`` reads like a dict.
    """

    n: int
    kept: int
    bitmask: int
    gap: int

    @property
    def best(self) -> str:
        return "gap" if self.gap < self.bitmask else "bitmask"

    @property
    def nbytes(self) -> int:
        return min(self.bitmask, self.gap)

    def __getitem__(self, key):
        if key not in ("bitmask", "gap"):
            raise KeyError(key)
        return getattr(self, key)

    def __repr__(self):
        return (f"MaskCodingCost(n={self.n}, kept={self.kept}, bitmask={self.bitmask} B, "
                f"gap={self.gap} B, best={self.best!r})")


def mask_coding_cost(mask):
    r"""Bytes of the two index codes of a mask (:func:`pack_mask`, :func:`gap_encode`),
    without writing either; the cheaper one is what a container should store.

    >>> mask_coding_cost(np.array([False, True, True] + [False] * 200 + [True]))
    MaskCodingCost(n=204, kept=3, bitmask=26 B, gap=4 B, best='gap')
    """
    fn = "mask_coding_cost"
    m = _check_bool(fn, "mask", mask, None).reshape(-1)
    _, _, _, _, total, _, kept = _gap_plan(m)
    return MaskCodingCost(n=int(m.size), kept=kept, bitmask=(m.size + 7) // 8, gap=total)
