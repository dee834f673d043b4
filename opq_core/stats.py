"""Per-layer and per-output-channel statistics in one pass over each tensor."""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from ._jit import PARALLEL_MIN_SIZE, prange, twins

__all__ = ["LayerStats", "layer_stats", "as_matrix", "check_weight"]

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

    @property
    def n(self) -> int:
        return math.prod(int(d) for d in self.shape)

    @property
    def channels(self) -> int:
        return int(self.shape[0])


def _abs_sum_rows(x, out_sum, out_bad):
    for c in prange(x.shape[0]):
        acc = 0.0
        bad = 0
        for j in range(x.shape[1]):
            v = np.float64(x[c, j])
            if not np.isfinite(v):
                bad += 1
            acc += abs(v)
        out_sum[c] = acc
        out_bad[c] = bad


_abs_sum_rows, _abs_sum_rows_par = twins(_abs_sum_rows)


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


def layer_stats(name: str, w, *, argument: str = "weights") -> LayerStats:
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
    if m.size >= PARALLEL_MIN_SIZE:
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
    return LayerStats(name=name, shape=tuple(int(s) for s in arr.shape), channel_scale=ch, scale=scale)
