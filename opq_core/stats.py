"""Per-layer and per-output-channel statistics in one pass over each tensor."""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from ._jit import PARALLEL_MIN_SIZE, jit, prange, twins

__all__ = ["LayerStats", "layer_stats", "magnitude_histogram", "as_matrix", "check_weight",
           "HIST_BINS", "HIST_RANGE"]

#: Bins of the histogram of normalized magnitudes ``|u| = |w| / s_c`` gathered in the
#: statistics pass (linear on ``[0, HIST_RANGE)``; the last bin also takes everything
#: beyond). Each bin holds (count, sum u, sum u^2), every value weighted by its channel's
#: s_c^2 (so that an error measured on it is in the weights' own units, s_c^2 (u - u_hat)^2),
#: and the error of a quantizer cell that covers whole bins is exact.
HIST_BINS = 8192
HIST_RANGE = 32.0

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one weight tensor viewed as (channels, fan_in).

    ``channel_scale[c] = mean_j |w_cj|`` (the Laplace scale of channel c),
    ``scale = mean |w|`` over the whole layer.
    """

    name: str
    shape: tuple
    channel_scale: np.ndarray  # float64, (C,)
    scale: float
    #: (HIST_BINS, 3) float64: count, sum |u|, sum u^2 of ``|u| = |w| / s_c`` per bin, each
    #: value weighted by s_c^2 at the stored (float16) scale (``None`` unless asked for);
    #: all-zero channels are left out.
    histogram: np.ndarray | None = None

    @property
    def n(self) -> int:
        return math.prod(int(d) for d in self.shape)

    @property
    def channels(self) -> int:
        return int(self.shape[0])


@jit()
def _abs_sum_row(xc):
    """(sum of |w|, count of non-finite values) of one row, summed in order."""
    acc = 0.0
    bad = 0
    for j in range(xc.shape[0]):
        v = np.float64(xc[j])
        if not np.isfinite(v):
            bad += 1
        acc += abs(v)
    return acc, bad


def _abs_sum_rows(x, out_sum, out_bad):
    for c in prange(x.shape[0]):
        acc, bad = _abs_sum_row(x[c])
        out_sum[c] = acc
        out_bad[c] = bad


_abs_sum_rows, _abs_sum_rows_par = twins(_abs_sum_rows)


@jit()
def _stored_scale(s):
    # the scale as the plan stores it (opq_core._solver._round_scales): float16 when it is
    # a normal float16 number (11 significant bits, ties to even), else float32 (24 bits)
    m, e = math.frexp(s)
    if 6.103515625e-05 <= s <= 32752.0:
        return math.ldexp(np.rint(m * 2048.0) / 2048.0, e)
    return math.ldexp(np.rint(m * 16777216.0) / 16777216.0, e)


@jit()
def _hist_row(xc, r, g, inv_w, h):
    """Add one row's ``u = |w| r`` (weight ``g``) to the (bins, 3) histogram ``h``."""
    nb = h.shape[0]
    for j in range(xc.shape[0]):
        u = abs(np.float64(xc[j])) * r
        b = np.int64(u * inv_w)
        if b >= nb:
            b = nb - 1
        h[b, 0] += g
        h[b, 1] += g * u
        h[b, 2] += g * (u * u)


def _abs_sum_hist_rows(x, rows_per_chunk, inv_w, out_sum, out_bad, hist):
    # One pass: each row's |w| sum (its Laplace scale), then, with the row still in cache,
    # the histogram of |w| / s_c into the chunk's own (bins, 3) slice.
    C = x.shape[0]
    fan = x.shape[1]
    for ch in prange(hist.shape[0]):
        r0 = ch * rows_per_chunk
        r1 = min(C, r0 + rows_per_chunk)
        for c in range(r0, r1):
            acc, bad = _abs_sum_row(x[c])
            out_sum[c] = acc
            out_bad[c] = bad
            if bad > 0 or acc <= 0.0:
                continue
            ss = _stored_scale(acc / fan)
            r = 1.0 / ss
            g = ss * ss
            _hist_row(x[c], r, g, inv_w, hist[ch])


_abs_sum_hist_rows, _abs_sum_hist_rows_par = twins(_abs_sum_hist_rows)


def _hist_rows(x, rows_per_chunk, inv_w, scale, hist):
    # the histogram of |w| / scale[c] for given scales (channelwise="layer")
    C = x.shape[0]
    for ch in prange(hist.shape[0]):
        r0 = ch * rows_per_chunk
        r1 = min(C, r0 + rows_per_chunk)
        for c in range(r0, r1):
            if scale[c] <= 0.0:
                continue
            r = 1.0 / scale[c]
            g = scale[c] * scale[c]
            _hist_row(x[c], r, g, inv_w, hist[ch])


_hist_rows, _hist_rows_par = twins(_hist_rows)


def _chunks(m):
    n = m.size
    C = m.shape[0]
    nchunk = int(max(1, min(C, 4, n // PARALLEL_MIN_SIZE)))
    rows = -(-C // nchunk)
    return -(-C // rows), rows


def magnitude_histogram(w, scale) -> np.ndarray:
    """(HIST_BINS, 3) histogram (count, sum, sum of squares) of ``u = |w_cj| / scale[c]``,
    each value weighted by ``scale[c]**2`` (rows of the (channels, fan-in) view; channels
    with ``scale <= 0`` left out).

    >>> h = magnitude_histogram(np.array([[1.0, -3.0]]), np.array([2.0]))
    >>> float(h[:, 0].sum()), float(h[:, 1].sum()), float(h[:, 2].sum())
    (8.0, 8.0, 10.0)
    """
    m = as_matrix(np.asarray(w))
    if m.dtype == np.float16:
        m = m.astype(np.float32)
    nchunk, rows = _chunks(m)
    hist = np.zeros((nchunk, HIST_BINS, 3))
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    fn = _hist_rows_par if nchunk > 1 else _hist_rows
    fn(m, rows, HIST_BINS / HIST_RANGE, scale, hist)
    return hist.sum(axis=0) if nchunk > 1 else hist[0]


def check_weight(name, w, argument="weights"):
    """Validate one tensor: a float array with ndim >= 1. Returns it as an ndarray."""
    if not isinstance(name, str):
        raise TypeError(f"{argument}: layer names must be strings, got {name!r}")
    try:
        arr = np.asarray(w)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{argument}[{name!r}]: cannot be read as an array ({exc})") from None
    if arr.dtype.kind != "f" or arr.dtype.type not in _FLOAT_DTYPES:
        raise TypeError(
            f"{argument}[{name!r}]: weights must be float16/float32/float64, got dtype {arr.dtype}")
    return arr


def as_matrix(w: np.ndarray) -> np.ndarray:
    """View a weight tensor as (output channels, fan-in); copies only if it must."""
    if w.ndim == 0:
        return w.reshape(1, 1)
    return w.reshape(w.shape[0], -1)


def layer_stats(name: str, w, *, argument: str = "weights", histogram: bool = False) -> LayerStats:
    """Channel scales of one tensor; rejects NaN/inf naming the layer and the position.

    >>> s = layer_stats("fc", np.array([[1.0, -3.0], [0.0, 2.0]]))
    >>> s.channel_scale.tolist(), s.scale
    ([2.0, 1.0], 1.5)
    """
    arr = check_weight(name, w, argument)
    m = as_matrix(arr)
    if m.dtype == np.float16:
        m = m.astype(np.float32)
    sums = np.empty(m.shape[0], dtype=np.float64)
    bad = np.empty(m.shape[0], dtype=np.int64)
    hist = None
    if histogram:
        nchunk, rows = _chunks(m)
        h = np.zeros((nchunk, HIST_BINS, 3))
        fn = _abs_sum_hist_rows_par if nchunk > 1 else _abs_sum_hist_rows
        fn(m, rows, HIST_BINS / HIST_RANGE, sums, bad, h)
        hist = h.sum(axis=0) if nchunk > 1 else h[0]
    elif m.size >= PARALLEL_MIN_SIZE:
        _abs_sum_rows_par(m, sums, bad)
    else:
        _abs_sum_rows(m, sums, bad)
    if bad.any():
        flat = np.asarray(arr, dtype=np.float64).ravel()
        i = int(np.flatnonzero(~np.isfinite(flat))[0])
        idx = np.unravel_index(i, arr.shape)
        raise ValueError(
            f"{argument}[{name!r}]: non-finite weight {flat[i]!r} at index {tuple(int(k) for k in idx)}")
    fan = m.shape[1] if m.shape[0] else 0
    ch = sums / max(fan, 1)
    scale = float(sums.sum() / max(m.size, 1))
    return LayerStats(name=name, shape=tuple(int(s) for s in arr.shape), channel_scale=ch,
                      scale=scale, histogram=hist)
