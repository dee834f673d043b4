"""Decoding the entropy-coded streams of a .opq file without a Python call per symbol.

The streams are written by ``constriction``'s ``AnsCoder`` (range ANS: 64-bit state,
32-bit words, 24-bit probabilities) with ``Categorical(probs, perfect=False)`` models.
This module rebuilds that fixed-point model from the same float probabilities and
decodes in one Numba loop that releases the GIL, so that layers decode on several threads
and the dequantization can follow in the same pass. The tests hold it to constriction on
random tables and streams (symbol for symbol, and the same verdict on a stream's end).

The model: with ``n`` symbols and ``F = 2**24 - n`` free weight, symbol ``s`` starts at
``floor(P_s * F / total) + s`` where ``P_s`` is the float64 sum of the probabilities
before ``s`` (added left to right) and ``total`` their float64 sum; every symbol so gets
at least one unit. Decoding a symbol reads the low 24 bits ``q`` of the state, finds the
symbol whose range holds ``q``, and sets the state to ``(state >> 24) * width + q -
start``; the state takes the next 32-bit word (from the end of the stream) whenever it
falls below ``2**32``. A whole stream decodes to an empty coder: no word left and state 0.
"""
from __future__ import annotations

import numpy as np

from ._jit import jit
from .kernels.index import _P_LOW  # lowest set bit of a byte

PRECISION = 24
_LUT_BITS = 12  # a first guess of the symbol from the top bits of the quantile


def categorical_cdf(probs) -> np.ndarray:
    """``n + 1`` cumulative starts (uint32, the last ``2**24``) of the fixed-point model that
    ``constriction.stream.model.Categorical(probs, perfect=False)`` builds, or ValueError
    when it would refuse ``probs`` (fewer than 2, negative, non-finite or zero total)."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    n = p.size
    if n < 2 or n > (1 << PRECISION):
        raise ValueError(f"a categorical model needs 2..2**24 probabilities, got {n}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probabilities must be finite and non-negative")
    run = np.add.accumulate(p)  # left to right, as the encoder adds them
    total = float(run[-1])
    if not (np.isfinite(total) and total > 0.0 and total >= np.finfo(np.float64).tiny):
        raise ValueError(f"probabilities sum to {total}, not a positive normal number")
    scale = float((1 << PRECISION) - n) / total
    before = np.concatenate([[0.0], run[:-1]])
    cdf = np.empty(n + 1, dtype=np.uint64)
    cdf[:n] = np.floor(before * scale).astype(np.uint64) + np.arange(n, dtype=np.uint64)
    cdf[n] = 1 << PRECISION
    if np.any(cdf[1:] <= cdf[:-1]):
        raise ValueError("probabilities give an empty symbol range")  # pragma: no cover
    return cdf.astype(np.uint32)


def symbol_lut(cdf) -> np.ndarray:
    """For each of the ``2**12`` buckets of quantiles (their top 12 bits), as a uint64: the
    symbol holding the bucket's first quantile (bits 49..57), and when that symbol holds
    the whole bucket its start (bits 0..23) and width (bits 24..48); otherwise bit 63 is
    set and the decoder scans ``cdf`` forward from the symbol."""
    lo = np.arange(1 << _LUT_BITS, dtype=np.uint64) << np.uint64(PRECISION - _LUT_BITS)
    hi = lo + np.uint64((1 << (PRECISION - _LUT_BITS)) - 1)
    c = cdf.astype(np.uint64)
    sym = (np.searchsorted(c[:-1], lo, side="right") - 1).astype(np.uint64)
    start, end = c[sym], c[sym + np.uint64(1)]
    whole = hi < end
    e = (sym << np.uint64(49)) | np.where(
        whole, start | ((end - start) << np.uint64(24)), np.uint64(1) << np.uint64(63))
    return e.astype(np.uint64)


_LOW = np.uint64((1 << PRECISION) - 1)
_SHIFT = np.uint64(PRECISION - _LUT_BITS)
_WORD = np.uint64(32)
_REFILL = np.uint64(1 << 32)
_PREC = np.uint64(PRECISION)
_SYM = np.uint64(49)
_AMBIG = np.uint64(63)
_WIDTH = np.uint64(24)
_WMASK = np.uint64((1 << 25) - 1)


@jit()
def _start(words):
    """(words left, state) of a coder over ``words``; words left = -1 when the stream
    ends in a zero word (constriction refuses it)."""
    pos = words.shape[0]
    state = np.uint64(0)
    if pos > 0:
        pos -= 1
        if words[pos] == 0:
            return -1, state
        state = np.uint64(words[pos])
        if pos > 0:
            pos -= 1
            state = (state << _WORD) | np.uint64(words[pos])
    return pos, state



@jit()
def _step(state, cdf, lut):
    """The symbol at the coder's ``state`` and the state after it, before any refill (the
    caller refills: keeping the words left and the stream out of the returned tuple keeps
    the decoding loops at full speed)."""
    q = state & _LOW
    e = lut[q >> _SHIFT]
    s = np.int64(e >> _SYM) & 0x1FF
    if e >> _AMBIG:
        while np.uint64(cdf[s + 1]) <= q:
            s += 1
        c = np.uint64(cdf[s])
        f = np.uint64(cdf[s + 1]) - c
    else:
        c = e & _LOW
        f = (e >> _WIDTH) & _WMASK
    return s, (state >> _PREC) * f + (q - c)


@jit()
def _decode_symbols(words, cdf, lut, out):
    """Decode ``out.shape[0]`` symbols of a stream of uint32 ``words`` into ``out``.
    Returns 0 when the coder ends empty, 1 when data is left, 2 when the stream ends in a
    zero word."""
    pos, state = _start(words)
    if pos < 0:
        return 2
    for i in range(out.shape[0]):
        s, state = _step(state, cdf, lut)
        if state < _REFILL and pos > 0:
            pos -= 1
            state = (state << _WORD) | np.uint64(words[pos])
        out[i] = s
    return 0 if (pos == 0 and state == 0) else 1


@jit()
def _decode_dense(n, mwords, mcdf, mlut, all_kept, cwords, ccdf, clut, table, m_out, v_out):
    """One layer of the entropy layout in one pass: the mask's bytes from their stream
    (or every entry kept), and at each kept entry the next symbol of the codes' stream,
    looked up in ``table[channel, symbol]`` (the dequantized values; channel = flat index
    // row length) of a layer of ``n`` entries. Writes the mask into ``m_out`` and the
    values into ``v_out`` when they have the layer's size (empty: not wanted).

    Returns (kept, status): status 0 = both coders end empty, 1 = data left in the mask
    stream, 2 = in the codes' stream, 3 = a stream ends in a zero word, 4 = padding bits
    set after the last entry. ``kept`` counts the kept entries; at most ``kept`` symbols are
    decoded per kept entry (an exhausted stream keeps decoding from its state: no read past
    ``words``); the caller compares ``kept`` with the plan's."""
    want_m = m_out.shape[0] > 0
    want_v = v_out.shape[0] > 0
    row_len = n // table.shape[0] if table.shape[0] else n
    mpos, mstate = _start(mwords)
    cpos, cstate = _start(cwords)
    if mpos < 0 or cpos < 0:
        return 0, 3
    kept = 0
    row = 0
    col = 0  # of the byte's first entry
    nbytes = (n + 7) // 8
    for b in range(nbytes):
        base = 8 * b
        width = min(8, n - base)
        if all_kept:
            pat = (1 << width) - 1
        else:
            s, mstate = _step(mstate, mcdf, mlut)
            if mstate < _REFILL and mpos > 0:
                mpos -= 1
                mstate = (mstate << _WORD) | np.uint64(mwords[mpos])
            pat = np.int64(s)
        if width < 8:
            if pat >> width:
                return kept, 4
        if want_m:
            for t in range(width):
                m_out[base + t] = ((pat >> t) & 1) != 0
        if want_v:
            for t in range(width):
                v_out[base + t] = 0.0
        x = pat
        while x:
            t = _P_LOW[x]
            x &= x - 1
            s, cstate = _step(cstate, ccdf, clut)
            if cstate < _REFILL and cpos > 0:
                cpos -= 1
                cstate = (cstate << _WORD) | np.uint64(cwords[cpos])
            kept += 1
            if want_v:
                r = row
                cc = col + t
                while cc >= row_len:
                    cc -= row_len
                    r += 1
                v_out[base + t] = table[r, s]
        col += 8
        while col >= row_len and row_len > 0:
            col -= row_len
            row += 1
    if not (mpos == 0 and mstate == 0) and not all_kept:
        return kept, 1
    if not (cpos == 0 and cstate == 0):
        return kept, 2
    return kept, 0


def decode_symbols(words, cdf, count, out=None):
    """``count`` symbols (uint8 when the model has at most 256, else int32) of a stream of
    uint32 ``words`` with the model ``cdf`` of :func:`categorical_cdf`, and the status
    (0 empty at the end, 1 data left, 2 not a stream: it ends in a zero word)."""
    cdf = np.ascontiguousarray(cdf, dtype=np.uint32)
    if out is None:
        out = np.empty(int(count), dtype=np.uint8 if cdf.size <= 257 else np.int32)
    w = np.ascontiguousarray(words, dtype=np.uint32)
    status = int(_decode_symbols(w, cdf, symbol_lut(cdf), out))
    return out, status


def decode_dense(n, mask_words, mask_cdf, all_kept, code_words, code_cdf, table, mask_out,
                 values_out):
    """One entropy-coded layer of ``n`` entries into ``mask_out`` (bool) and ``values_out``
    (each of size n, or empty when not wanted) with the value ``table[channel, symbol]``; returns (kept, status) of
    :func:`_decode_dense` (status 0: both streams decoded and ended empty)."""
    mw = np.ascontiguousarray(mask_words, dtype=np.uint32)
    cw = np.ascontiguousarray(code_words, dtype=np.uint32)
    mcdf = np.ascontiguousarray(mask_cdf, dtype=np.uint32)
    ccdf = np.ascontiguousarray(code_cdf, dtype=np.uint32)
    kept, status = _decode_dense(int(n), mw, mcdf, symbol_lut(mcdf), bool(all_kept), cw, ccdf,
                                 symbol_lut(ccdf), table, mask_out, values_out)
    return int(kept), int(status)
