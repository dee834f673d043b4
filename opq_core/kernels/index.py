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


def _pack_mask(m, out):
    nbytes = out.shape[0]
    nb = (nbytes + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        lo = b * _BLOCK
        _pack_mask_bytes(m, out, lo, min(lo + _BLOCK, nbytes))


_pack_mask, _pack_mask_par = twins(_pack_mask)


@jit()
def _unpack_mask_bytes(buf, m, lo, hi):
    bb = buf[lo:hi]
    mm = m[8 * lo:min(8 * hi, m.shape[0])]
    n = mm.shape[0]
    full = n // 8
    for i in range(full):
        v = np.int64(bb[i])
        for t in range(8):
            mm[8 * i + t] = (v >> t) & 1 != 0
    if full < bb.shape[0]:
        v = np.int64(bb[full])
        for t in range(n - 8 * full):
            mm[8 * full + t] = (v >> t) & 1 != 0


def _unpack_mask(buf, m):
    nbytes = buf.shape[0]
    nb = (nbytes + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        lo = b * _BLOCK
        _unpack_mask_bytes(buf, m, lo, min(lo + _BLOCK, nbytes))


_unpack_mask, _unpack_mask_par = twins(_unpack_mask)


def pack_mask(mask):
    r"""Bitmask of a bool array in flat order, little bit order (``np.packbits(...,
    bitorder="little")``): ``ceil(n / 8)`` bytes.

    >>> pack_mask(np.array([True, False, True, True, False, False, False, False, True])).tolist()
    [13, 1]
    """
    fn = "pack_mask"
    m = _check_bool(fn, "mask", mask, None).reshape(-1)
    out = np.empty((m.size + 7) // 8, dtype=np.uint8)
    (_pack_mask_par if _use_parallel(m.size) else _pack_mask)(m, out)
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
    m = np.empty(n, dtype=np.bool_)
    (_unpack_mask_par if _use_parallel(n) else _unpack_mask)(bb, m)
    return m


@jit()
def _varint_len(g):
    n = 1
    while g >= 128:
        g >>= 7
        n += 1
    return n


@jit()
def _varint_len_nb(g):
    """Bytes of the varint of ``g >= 0``, without branches (g < 2**63)."""
    return (1 + (g >= 128) + (g >= 16384) + (g >= 2097152) + (g >= 268435456)
            + (g >= 34359738368) + (g >= 4398046511104) + (g >= 562949953421312)
            + (g >= 72057594037927936))


@jit()
def _gap_scan_block(m, lo, hi, first, last, cnt, nbytes, b):
    """First/last kept position of the block, its kept count, and the varint bytes of the
    gaps of its kept positions, the first one counted from the block's start (corrected
    in :func:`_gap_offsets`). Branch-free: ``run`` is the number of pruned entries since
    the last kept one (or the block's start)."""
    mm = m[lo:hi]
    run = 0
    c = 0
    nby = 0
    last_j = -1
    for j in range(mm.shape[0]):
        k = np.int64(mm[j])
        nby += k * _varint_len_nb(run)
        c += k
        last_j = j if k else last_j
        run = (run + 1) & (k - 1)
    f = -1
    if c:
        for j in range(mm.shape[0]):
            if mm[j]:
                f = j
                break
    first[b] = f + lo if f >= 0 else -1
    last[b] = last_j + lo if last_j >= 0 else -1
    cnt[b] = c
    nbytes[b] = nby


def _gap_scan(m, first, last, cnt, nbytes):
    n = m.shape[0]
    for b in prange(first.shape[0]):
        lo = b * _BLOCK
        _gap_scan_block(m, lo, min(lo + _BLOCK, n), first, last, cnt, nbytes, b)


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
def _gap_write_block(m, lo, last, lead, at, out):
    """Varints of the kept positions lo..last (inclusive, ``last`` kept). Short gaps take
    a branch-free path: the byte is stored at ``at`` whatever the entry, and ``at`` only
    moves on a kept one; stores for pruned entries land on a byte that a later kept entry
    of this block overwrites, since ``last`` is kept."""
    if lead < 0:
        return
    mm = m[lo:last + 1]
    # ``run`` = pruned entries since the previous kept one; before the first kept entry of
    # the block it continues the gap from the previous block
    first = 0
    while not mm[first]:
        first += 1
    run = lead - first
    for j in range(mm.shape[0]):
        k = np.int64(mm[j])
        g = run
        if g < 128:
            out[at] = np.uint8(g)
            at += k
        elif k:
            at = _put_varint(out, at, g)
        run = (run + 1) & (k - 1)


def _gap_write(m, lead, offsets, last, out):
    for b in prange(lead.shape[0]):
        lo = b * _BLOCK
        _gap_write_block(m, lo, last[b], lead[b], offsets[b], out)


_gap_write, _gap_write_par = twins(_gap_write)


def _gap_plan(m):
    nb = (m.size + _BLOCK - 1) // _BLOCK
    first = np.empty(nb, np.int64)
    last = np.empty(nb, np.int64)
    cnt = np.empty(nb, np.int64)
    nbytes = np.empty(nb, np.int64)
    par = _use_parallel(m.size)
    (_gap_scan_par if par else _gap_scan)(m, first, last, cnt, nbytes)
    lead = np.empty(nb, np.int64)
    offsets = np.empty(nb, np.int64)
    total = int(_gap_offsets(first, last, nbytes, lead, offsets, _BLOCK))
    return lead, offsets, last, total, par, int(cnt.sum())


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
    lead, offsets, last, total, par, _ = _gap_plan(m)
    out = np.empty(total, dtype=np.uint8)
    (_gap_write_par if par else _gap_write)(m, lead, offsets, last, out)
    return out


@jit()
def _gap_decode(buf, m):
    """Returns 0 when fine, else an error code: 1 truncated varint, 2 position >= n,
    3 varint longer than 9 bytes."""
    n = m.shape[0]
    i = 0
    pos = -1
    nb = buf.shape[0]
    while i < nb:
        g = 0
        shift = 0
        while True:
            if i >= nb:
                return 1
            if shift > 56:
                return 3
            byte = np.int64(buf[i])
            i += 1
            g |= (byte & 0x7F) << shift
            shift += 7
            if byte < 128:
                break
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
    _, _, _, total, _, kept = _gap_plan(m)
    return MaskCodingCost(n=int(m.size), kept=kept, bitmask=(m.size + 7) // 8, gap=total)
