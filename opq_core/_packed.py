r"""Packed layers: a compressed weight kept as the ``.opq`` "packed" layout, and sparse +
low-bit matrix products that read it directly.

A :class:`PackedLayer` holds exactly the parts the packed file stores for the layer: the
kept weights' ``bits``-bit symbols as one LSB-first bit stream
(:func:`opq_core.kernels.pack_bits`, flat row-major order), the sparsity pattern as the
cheaper of a bitmask (:func:`~opq_core.kernels.pack_mask`) and a LEB128 gap code
(:func:`~opq_core.kernels.gap_encode`), and the per-channel quantizer (scales and
thresholds, or the codebook). It adds a few checkpoints so that blocks of output rows can
be decoded independently (in parallel): for each block its first row, the index of its first
kept weight and, for the gap code, the byte offset and the flat position where the block's
gaps start (four ``int64`` per block, at most :data:`MAX_BLOCKS` blocks).

The weight is viewed as a matrix ``(shape[0], prod(shape[1:]))`` (output channels by
fan-in, as the kernels do). :meth:`PackedLayer.decode` returns the dense weights equal bit
for bit to the plan's fake-quant weights; :func:`packed_matmul` computes
:math:`Y = X W^T` for a small batch ``X`` reading one symbol and one index entry per kept
weight, never a dense row: memory traffic is the packed bytes, not ``4 n`` bytes. It works
row by row in chunks of up to :data:`_CHUNK` kept weights, in three tight loops: the
chunk's columns (the bitmask expanded a byte at a time through a table, or the gap code
decoded), their values (the symbols through the row's table), then the products.

.. math:: y_{bc} = \sum_{j:\,m_{cj}} x_{bj}\, \hat w_{cj}, \qquad
          \hat w_{cj} = \mathrm{lut}_c[\mathrm{sym}_{cj}]

with the per-row table :math:`\mathrm{lut}_c` of the ``2**bits`` values a symbol decodes to
(the quantizer's levels of channel ``c``, or the codebook), built per row in the kernel.

>>> import numpy as np
>>> from opq_core.allocate import plan
>>> w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
>>> p = plan({"fc": w}, sparsity=0.75, bits=4)
>>> from opq_core.format import layer_codes
>>> lp = p.layers[0]
>>> m = p.masks({"fc": w})["fc"]
>>> pl = pack_layer(lp, layer_codes(lp, w, m), m)
>>> bool(np.array_equal(pl.decode(), p.apply({"fc": w})["fc"]))
True
>>> x = np.ones((1, 16), np.float32)
>>> bool(np.allclose(packed_matmul(pl, x), x @ pl.decode().T, atol=1e-5))
True
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._jit import jit, prange, twins
from .kernels.index import _P_COUNT, _P_POS, _get_varint

__all__ = ["PackedLayer", "pack_layer", "packed_matmul", "INDEX_KINDS", "MAX_BLOCKS"]

#: How the sparsity pattern is held: every weight kept ("none"), a bitmask, a gap code.
INDEX_KINDS = ("none", "bitmask", "gap")
#: At most this many row blocks (checkpoints) per layer.
MAX_BLOCKS = 256
_GRIDS = {"offset": 0, "symmetric": 1, "codebook": 2}


def _fn_where(fn, name):
    return f"{fn}: layer {name!r}"


@dataclass(frozen=True, eq=False)
class PackedLayer:
    """One compressed weight in the packed layout (see the module docstring).

    Attributes
    ----------
    name, shape, dtype : the weight (``dtype`` is the dtype :meth:`decode` returns).
    bits, grid, step : the layer's quantizer; ``scale`` and ``threshold`` (float64, one per
        output channel) for the uniform grids, ``codebook`` (float64) for ``"codebook"``
        (with ``scale`` when its levels are in units of channel scales other than 1).
    kept : number of kept weights.
    index : ``"none"`` (every weight kept, or none), ``"bitmask"`` or ``"gap"``.
    index_bytes, code_bytes : uint8 arrays: the sparsity pattern and the symbol stream.
    block_row, block_sym, block_gap, block_pos : int64 checkpoints, one per block + 1.
    """

    # the weight and its sparsity pattern
    name: str
    shape: tuple
    dtype: str
    kept: int
    index: str
    # the quantizer
    bits: int
    grid: str
    step: float
    index_bytes: np.ndarray
    code_bytes: np.ndarray
    scale: np.ndarray
    threshold: np.ndarray
    codebook: np.ndarray
    block_row: np.ndarray
    block_sym: np.ndarray
    block_gap: np.ndarray
    block_pos: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def n(self) -> int:
        return self.rows * self.cols

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.n if self.n else 0.0

    @property
    def payload_bytes(self) -> int:
        """Bytes of the parts the packed ``.opq`` file stores too: index + symbols +
        quantizer (scales and thresholds as held here, float64)."""
        return int(self.index_bytes.nbytes + self.code_bytes.nbytes + self.scale.nbytes
                   + self.threshold.nbytes + self.codebook.nbytes)

    @property
    def nbytes(self) -> int:
        """Every byte the layer holds: payload + block checkpoints."""
        return self.payload_bytes + int(self.block_row.nbytes + self.block_sym.nbytes
                                        + self.block_gap.nbytes + self.block_pos.nbytes)

    def arrays(self) -> dict:
        """The held arrays by field name (to store them elsewhere, e.g. torch buffers)."""
        return {k: getattr(self, k) for k in _ARRAYS}

    def decode(self) -> np.ndarray:
        """Dense weights (shape and dtype of the layer), bit for bit the plan's
        fake-quant weights (what :func:`opq_core.format.decode_layer` returns)."""
        from .format import decode_layer
        return decode_layer(_DecodePlan(self), self.codes())

    def mask(self) -> np.ndarray:
        """The bool mask (the layer's shape)."""
        from .kernels import gap_decode, unpack_mask
        if self.index == "none":
            return np.full(self.shape, self.kept == self.n, dtype=bool)
        if self.index == "bitmask":
            return unpack_mask(self.index_bytes, self.n).reshape(self.shape)
        return gap_decode(self.index_bytes, self.n).reshape(self.shape)

    def codes(self) -> np.ndarray:
        """Integer codes (0 = pruned) as :func:`opq_core.format.layer_codes` gives them."""
        from .kernels import code_dtype, symbols_to_codes, unpack_bits
        m = self.mask()
        sym = unpack_bits(self.code_bytes, self.bits, self.kept)
        if self.grid == "codebook":
            out = np.zeros(self.shape, dtype=np.int16)
            out[m] = sym.astype(np.int16) + 1
        else:
            out = np.zeros(self.shape, dtype=code_dtype(self.bits))
            out[m] = symbols_to_codes(sym, self.bits)
        return out

    def __repr__(self):
        return (f"PackedLayer({self.name!r}, shape={tuple(self.shape)}, bits={self.bits}, "
                f"grid={self.grid!r}, sparsity={self.sparsity:.4f}, index={self.index!r}, "
                f"nbytes={self.nbytes})")


_ARRAYS = ("index_bytes", "code_bytes", "scale", "threshold", "codebook", "block_row",
           "block_sym", "block_gap", "block_pos")


class _DecodePlan:
    """The few LayerPlan fields :func:`opq_core.format.decode_layer` reads."""

    def __init__(self, pl: PackedLayer):
        self.name, self.dtype, self.bits, self.grid = pl.name, pl.dtype, pl.bits, pl.grid
        self.step = pl.step
        self.kernel_scale, self.thresholds = pl.scale, pl.threshold
        if pl.grid == "codebook" and not pl.scale.size:  # absolute units (ANNC)
            self.kernel_scale = None
        self.codebook = pl.codebook


def _varint_lengths(g: np.ndarray) -> np.ndarray:
    out = np.ones(g.shape, dtype=np.int64)
    t = g >> 7
    while np.any(t):
        out += t > 0
        t = t >> 7
    return out


def pack_layer(lp, codes, mask, *, index: str = "auto", blocks: int | None = None) -> PackedLayer:
    """Pack one layer from its plan (:class:`~opq_core.LayerPlan`), codes and mask.

    Parameters
    ----------
    lp : LayerPlan
    codes : integer array of the layer's shape (:func:`opq_core.format.layer_codes`)
    mask : bool array of the layer's shape
    index : {"auto", "bitmask", "gap"}
        ``"auto"`` takes the cheaper, as the packed file does.
    blocks : int, optional
        Number of row blocks (default ``min(rows, MAX_BLOCKS)``).
    """
    from .kernels import (codes_to_symbols, gap_encode, mask_coding_cost, pack_bits,
                          pack_mask)
    fn = "pack_layer"
    name = lp.name
    shape = tuple(int(s) for s in lp.shape)
    if len(shape) < 1 or int(np.prod(shape)) == 0:
        raise ValueError(f"{_fn_where(fn, name)} has shape {shape}; nothing to pack")
    m = np.asarray(mask)
    if m.dtype != np.bool_ or tuple(m.shape) != shape:
        raise ValueError(f"{_fn_where(fn, name)}: mask must be a bool array of shape {shape}, "
                         f"got dtype {m.dtype} and shape {tuple(m.shape)}")
    cd = np.asarray(codes)
    if cd.dtype.kind not in "iu" or tuple(cd.shape) != shape:
        raise ValueError(f"{_fn_where(fn, name)}: codes must be an integer array of shape "
                         f"{shape}, got dtype {cd.dtype} and shape {tuple(cd.shape)}")
    if index not in ("auto", "bitmask", "gap"):
        raise ValueError(f"{fn}: index must be 'auto', 'bitmask' or 'gap', got {index!r}")
    if lp.grid not in _GRIDS:
        raise ValueError(f"{_fn_where(fn, name)}: unknown grid {lp.grid!r}")
    m = np.ascontiguousarray(m)
    kept = int(np.count_nonzero(m))
    if kept != int(lp.kept):
        raise ValueError(f"{_fn_where(fn, name)}: mask keeps {kept} weights, the plan keeps "
                         f"{lp.kept}")
    if np.any((cd != 0) != m):
        raise ValueError(f"{_fn_where(fn, name)}: codes must be nonzero exactly where the "
                         "mask is True (codes and mask of different layers?)")
    rows = shape[0]
    cols = int(np.prod(shape[1:], dtype=np.int64))
    n = rows * cols
    kc = cd[m]
    if lp.grid == "codebook":
        cb = np.asarray(lp.codebook, dtype=np.float64)
        if kc.size and (int(kc.min()) < 1 or int(kc.max()) > cb.size):
            raise ValueError(f"{_fn_where(fn, name)}: a code is outside 1..{cb.size}")
        sym = (kc.astype(np.int64) - 1).astype(np.uint8)
        threshold = np.zeros(0)
        # levels in units of the channel scales (none stored when they are all 1: ANNC)
        ks = np.ascontiguousarray(lp.kernel_scale, dtype=np.float64)
        scale = ks if np.any(ks != 1.0) else np.zeros(0)
    else:
        sym = codes_to_symbols(kc, lp.bits) if kc.size else np.zeros(0, np.uint8)
        cb = np.zeros(0)
        scale = np.ascontiguousarray(lp.kernel_scale, dtype=np.float64)
        threshold = np.ascontiguousarray(lp.thresholds, dtype=np.float64)
    code_bytes = pack_bits(sym.reshape(-1), lp.bits)
    if kept in (0, n):
        kind, idx = "none", np.zeros(0, np.uint8)
    else:
        if index == "auto":
            cost = mask_coding_cost(m)
            index = "gap" if cost["gap"] < cost["bitmask"] else "bitmask"
        kind = index
        idx = gap_encode(m) if kind == "gap" else pack_mask(m)
    nb = min(rows, MAX_BLOCKS) if blocks is None else int(blocks)
    if not 1 <= nb <= rows:
        raise ValueError(f"{fn}: blocks must be in 1..{rows} for layer {name!r}, got {blocks}")
    block_row = (np.arange(nb + 1, dtype=np.int64) * rows) // nb
    per_row = m.reshape(rows, cols).sum(axis=1, dtype=np.int64)
    row_start = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    block_sym = row_start[block_row]
    block_gap = np.zeros(nb + 1, np.int64)
    block_pos = np.full(nb + 1, -1, np.int64)
    if kind == "gap":
        pos = np.flatnonzero(m.reshape(-1)).astype(np.int64)
        gaps = np.diff(np.concatenate([[-1], pos])) - 1
        byte_start = np.concatenate([[0], np.cumsum(_varint_lengths(gaps))]).astype(np.int64)
        block_gap = byte_start[block_sym]
        prev = block_sym - 1
        block_pos = np.where(prev >= 0, pos[np.maximum(prev, 0)], -1).astype(np.int64)
    return PackedLayer(name=name, shape=shape, dtype=str(np.dtype(lp.dtype)), bits=int(lp.bits),
                       grid=str(lp.grid), step=float(lp.step), kept=kept, index=kind,
                       index_bytes=idx, code_bytes=code_bytes, scale=scale,
                       threshold=threshold, codebook=cb, block_row=block_row,
                       block_sym=block_sym, block_gap=block_gap, block_pos=block_pos)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------

@jit()
def _fill_lut(lut, grid, s, theta, step, kbits, cb):
    """The values of the row's ``2**bits`` symbols (dequantize's arithmetic, float64)."""
    nsym = lut.shape[0]
    if grid == 2:
        for sv in range(nsym):
            lut[sv] = s * cb[sv] if sv < cb.shape[0] else 0.0
        return
    kmask = (1 << kbits) - 1
    sd = s * step
    for sv in range(nsym):
        kf = np.float64((sv & kmask) + 1)
        if grid == 0:
            level = theta + s * ((kf - 0.5) * step)
        else:
            level = kf * sd
        lut[sv] = -level if (sv >> kbits) & 1 else level


#: Kept weights decoded per chunk of a row (a multiple of the 4 accumulation lanes).
_CHUNK = 2048

@jit()
def _row_columns_bitmask(idx, rbase, j, cols, cidx, pos8, cnt8):
    """Columns of the set bits of row bits ``rbase + j ..`` into ``cidx`` (at most
    ``_CHUNK`` of them, whole bytes at a time); returns ``(count, next j)``.

    Four positions per byte are written unconditionally (at the sparsities that pick a
    bitmask, a byte has at most four set bits almost always), the other four only when
    the byte needs them: no branch per set bit."""
    nidx = idx.shape[0]
    n = 0
    if (rbase & 7) == 0:  # whole bytes of the bitmask (cols % 8 == 0, or row 0)
        q = np.uint64((rbase + j) >> 3)
        while n < _CHUNK and cols - j >= 8:
            v = idx[q]
            p = np.uint64(v) * np.uint64(8)
            nu = np.uint64(n)
            cidx[nu] = j + pos8[p]
            cidx[nu + np.uint64(1)] = j + pos8[p + np.uint64(1)]
            cidx[nu + np.uint64(2)] = j + pos8[p + np.uint64(2)]
            cidx[nu + np.uint64(3)] = j + pos8[p + np.uint64(3)]
            c = cnt8[v]
            if c > 4:
                for t in range(4, 8):
                    cidx[nu + np.uint64(t)] = j + pos8[p + np.uint64(t)]
            n += c
            j += 8
            q += np.uint64(1)
    while n < _CHUNK and j < cols:  # a row that starts inside a byte, and the row's tail
        bp = rbase + j
        q = bp >> 3
        v = np.int64(idx[q])
        if q + 1 < nidx:
            v |= np.int64(idx[q + 1]) << 8
        v = (v >> (bp & 7)) & 0xFF
        if cols - j < 8:
            v &= (1 << (cols - j)) - 1
        for t in range(cnt8[v]):
            cidx[n + t] = j + pos8[8 * v + t]
        n += cnt8[v]
        j += 8
    return n, j


@jit()
def _symbols(cbytes, s, n, bits, lut, vals):
    """``vals[k] = lut[symbol s + k]`` for ``k < n`` from the LSB-first ``bits``-bit stream."""
    if n <= 0:
        return
    smask = (1 << bits) - 1
    k = 0
    if bits == 8:
        for t in range(n):
            vals[t] = lut[cbytes[s + t]]
        return
    if bits == 4:
        if s & 1:
            vals[0] = lut[cbytes[s >> 1] >> 4]
            k = 1
        q0 = (s + k) >> 1
        half = (n - k) >> 1
        for q in range(half):
            b = cbytes[q0 + q]
            vals[k + 2 * q] = lut[b & 15]
            vals[k + 2 * q + 1] = lut[b >> 4]
        k += 2 * half
        if k < n:
            vals[k] = lut[cbytes[(s + k) >> 1] & 15]
        return
    bp = s * bits
    cp = bp >> 3
    rb = bp & 7
    sacc = 0
    sn = 0
    if rb:
        sacc = np.int64(cbytes[cp]) >> rb
        sn = 8 - rb
        cp += 1
    for t in range(n):
        if sn < bits:
            sacc |= np.int64(cbytes[cp]) << sn
            cp += 1
            sn += 8
        vals[t] = lut[sacc & smask]
        sacc >>= bits
        sn -= bits


@jit()
def _accumulate(acc, x64, cidx, vals, n):
    """``acc[lane, b] += x64[cidx[k], b] * vals[k]``, lane = k mod 4 (the k-th kept weight
    of the row, counted from a chunk start that is a multiple of 4).

    Indices read from data go through ``np.uint64``: Numba then skips its negative-index
    wraparound (a compare and a conditional move per access in the hot loop)."""
    nb = x64.shape[1]
    n4 = n & ~3
    if nb == 1:
        x = x64[:, 0]
        a0 = acc[0, 0]
        a1 = acc[1, 0]
        a2 = acc[2, 0]
        a3 = acc[3, 0]
        for k in range(0, n4, 4):
            a0 += x[np.uint64(cidx[k])] * vals[k]
            a1 += x[np.uint64(cidx[k + 1])] * vals[k + 1]
            a2 += x[np.uint64(cidx[k + 2])] * vals[k + 2]
            a3 += x[np.uint64(cidx[k + 3])] * vals[k + 3]
        acc[0, 0] = a0
        acc[1, 0] = a1
        acc[2, 0] = a2
        acc[3, 0] = a3
        for k in range(n4, n):
            acc[k & 3, 0] += x[np.uint64(cidx[k])] * vals[k]
        return
    for k in range(n):
        wv = vals[k]
        c = np.uint64(cidx[k])
        lane = k & 3
        for b in range(nb):
            acc[lane, b] += x64[c, b] * wv


@jit()
def _mm_block(x64, y, kind, idx, cbytes, bits, grid, scale, thr, step, cb, cols,
              r0, r1, s0, p0, g0, pos8, cnt8):
    """Rows r0..r1-1 of ``y = (W @ x64).T``; x64 is (cols, batch), y is (batch, rows).

    Row by row, chunk by chunk: the kept weights' columns (from the bitmask or the gap
    code), their values (symbols through the row's table), then four float64 lanes."""
    nb = x64.shape[1]
    levels = np.empty(1 << bits, np.float64)
    lut = np.empty(1 << bits, np.float64)
    cidx = np.empty(_CHUNK + 8, np.int64)
    vals = np.empty(_CHUNK + 8, np.float64)
    acc = np.zeros((4, nb), np.float64)
    kbits = bits - 1
    s = s0
    gp = g0
    pos = p0
    pend = -1  # gap code: a decoded position that belongs to a later row
    for row in range(r0, r1):
        if grid != 2 or row == r0 or scale.shape[0]:
            _fill_lut(levels, grid, scale[row] if scale.shape[0] else 1.0,
                      thr[row] if grid != 2 else 0.0, step, kbits, cb)
            for t in range(lut.shape[0]):  # the float32 weight, exactly, in float64
                lut[t] = np.float64(np.float32(levels[t]))
        for lane in range(4):
            for b in range(nb):
                acc[lane, b] = 0.0
        rbase = row * cols
        rend = rbase + cols
        j = 0
        while True:
            n = 0
            if kind == 0:
                while n < _CHUNK and j < cols:
                    cidx[n] = j
                    n += 1
                    j += 1
            elif kind == 1:
                n, j = _row_columns_bitmask(idx, rbase, j, cols, cidx, pos8, cnt8)
            else:
                if pend >= 0:
                    if pend < rend:
                        cidx[0] = pend - rbase
                        n = 1
                        pend = -1
                if pend < 0:
                    while n < _CHUNK and gp < idx.shape[0]:
                        g = np.int64(idx[gp])
                        if g < 128:  # most gaps fit one byte
                            gp += 1
                        else:  # checked when the layer was packed
                            g, gp = _get_varint(idx, gp)
                        pos += g + 1
                        if pos >= rend:
                            pend = pos
                            break
                        cidx[n] = pos - rbase
                        n += 1
            if n == 0:
                break
            _symbols(cbytes, s, n, bits, lut, vals)
            s += n
            _accumulate(acc, x64, cidx, vals, n)
            if n < _CHUNK:
                break
        for b in range(nb):
            y[b, row] = (acc[0, b] + acc[1, b]) + (acc[2, b] + acc[3, b])


def _mm(x64, y, kind, idx, cbytes, bits, grid, scale, thr, step, cb, cols,
        brow, bsym, bgap, bpos, pos8, cnt8):
    for k in prange(brow.shape[0] - 1):
        _mm_block(x64, y, kind, idx, cbytes, bits, grid, scale, thr, step, cb, cols,
                  brow[k], brow[k + 1], bsym[k], bpos[k], bgap[k], pos8, cnt8)


_mm, _mm_par = twins(_mm)


def packed_matmul(layer: PackedLayer, x, *, parallel: bool | None = None, out=None):
    r"""``x @ W.T`` for a packed layer ``W`` (rows, cols) and a small batch ``x``.

    Parameters
    ----------
    layer : PackedLayer
    x : float array (batch, cols) or (cols,)
        Read as float32. Each product ``float64(x) * float64(w)`` is exact; a row's
        products go, in the order of its kept weights, round-robin into four float64 sums
        (the k-th kept weight into sum ``k mod 4``: four independent additions in flight),
        and the row's result ``(s0 + s1) + (s2 + s3)`` is rounded to float32. The result
        does not depend on the batch size, the row blocks or ``parallel``.
    parallel : bool, optional
        Row blocks in parallel (default: when the layer has at least 2**16 weights).
    out : float32 array (batch, rows), optional

    Returns
    -------
    float32 array (batch, rows) (or (rows,) for a 1-D ``x``)
    """
    fn = "packed_matmul"
    if not isinstance(layer, PackedLayer):
        raise TypeError(f"{fn}: layer must be a PackedLayer, got {type(layer).__name__}")
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{fn}: x must be a float array, got dtype {a.dtype}")
    vec = a.ndim == 1
    a2 = a.reshape(1, -1) if vec else a
    if a2.ndim != 2 or a2.shape[1] != layer.cols:
        raise ValueError(f"{_fn_where(fn, layer.name)}: x must have shape (batch, "
                         f"{layer.cols}) or ({layer.cols},), got {tuple(a.shape)}")
    # the input rounded to float32, held in float64 (each product float64 x float64)
    x64 = np.ascontiguousarray(a2.T, dtype=np.float32).astype(np.float64)
    bsz = a2.shape[0]
    if out is None:
        y = np.empty((bsz, layer.rows), np.float32)
    else:
        y = out
        if not (isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape ==
                (bsz, layer.rows) and y.flags.c_contiguous):
            raise ValueError(f"{fn}: out must be a C-contiguous float32 array of shape "
                             f"{(bsz, layer.rows)}")
    if layer.kept == 0:
        y[...] = 0.0
        return y.reshape(-1) if vec else y
    if parallel is None:
        from ._jit import PARALLEL_MIN_SIZE
        parallel = layer.n >= PARALLEL_MIN_SIZE and layer.block_row.size > 2
    kern = _mm_par if parallel else _mm
    kern(x64, y, INDEX_KINDS.index(layer.index), layer.index_bytes, layer.code_bytes,
         layer.bits, _GRIDS[layer.grid], layer.scale, layer.threshold, layer.step,
         layer.codebook, layer.cols, layer.block_row, layer.block_sym, layer.block_gap,
         layer.block_pos, _P_POS, _P_COUNT)
    return y.reshape(-1) if vec else y
