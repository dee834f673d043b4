"""Input normalization shared by the ANNC projections."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .._check import _check_budget  # noqa: F401 (re-exported for the projections)

_BLOCK = 1 << 16
_F32_TINY = float(np.nextafter(np.float32(0), np.float32(1)))


# ---------------------------------------------------------------------------
# input normalization
# ---------------------------------------------------------------------------

def _layers(weights, argument="weights"):
    """(names, flat float32/float64 contiguous arrays, shapes) of a mapping of tensors."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"{argument} must be a mapping name -> array, got "
                        f"{type(weights).__name__}")
    if not weights:
        raise ValueError(f"{argument}: the mapping is empty")
    names, flats, shapes = [], [], []
    for name, w in weights.items():
        if not isinstance(name, str):
            raise TypeError(f"{argument}: layer names must be strings, got {name!r}")
        a = np.asarray(w)
        if a.dtype.type not in (np.float16, np.float32, np.float64):
            raise TypeError(f"{argument}[{name!r}]: weights must be float16/float32/float64, "
                            f"got dtype {a.dtype}")
        if a.dtype == np.float16:
            a = a.astype(np.float32)
        names.append(name)
        shapes.append(tuple(int(s) for s in a.shape))
        flats.append(np.ascontiguousarray(a).reshape(-1))
    return names, flats, shapes


def _per_layer_int(value, names, argument, lo, hi):
    """An int, a sequence (network order) or a mapping name -> int, as an int64 array."""
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{argument}: no value for layer {missing[0]!r}")
        vals = [value[n] for n in names]
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        vals = [value] * len(names)
    else:
        vals = list(np.asarray(value).reshape(-1).tolist())
        if len(vals) != len(names):
            raise ValueError(f"{argument}: {len(vals)} values for {len(names)} layers")
    out = np.empty(len(names), dtype=np.int64)
    for i, (n, v) in enumerate(zip(names, vals)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{argument}[{n!r}] must be an integer, got {v!r}")
        if not lo <= int(v) <= hi:
            raise ValueError(f"{argument}[{n!r}] must be in {lo}..{hi}, got {int(v)}")
        out[i] = int(v)
    return out


def _bad_weight(name, flat, shape, argument="weights"):
    bad = np.flatnonzero(~np.isfinite(flat.astype(np.float64) ** 2))
    if bad.size == 0:
        return ValueError(f"{argument}[{name!r}]: the sum of the squared weights overflows "
                          f"float64 (weights too large)")
    i = int(bad[0])
    idx = tuple(int(k) for k in np.unravel_index(i, shape)) if shape else ()
    return ValueError(f"{argument}[{name!r}]: weight {flat[i]!r} at index {idx} is not finite "
                      f"(or its square overflows)")
