"""Argument checks shared by every public function of opq_core, and their message format.

Every message starts with the function (and, when known, the layer) and names the argument and
the value.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: The quantization grids, in the order of their integer ids in the kernels.
GRIDS = ("offset", "symmetric")
#: The bit-widths a layer may use.
BITS = tuple(range(1, 9))


def _fn(name, layer):
    """The label error messages start with: the function and, when known, the layer."""
    return name if layer is None else f"{name} (layer {layer!r})"


def _as_array(fn, name, a):
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(f"{fn}: {name} cannot be read as an array ({exc})") from None
    return a


def _check_float(fn, name, a, allow_half=False):
    a = _as_array(fn, name, a)
    ok = (np.float32, np.float64, np.float16) if allow_half else (np.float32, np.float64)
    if a.dtype.type not in ok:
        hint = ""
        if a.dtype == np.float16:
            hint = " (convert explicitly, e.g. .astype(np.float32))"
        allowed = "float16/float32/float64" if allow_half else "float32 or float64"
        raise TypeError(f"{fn}: {name} must be {allowed}, got dtype {a.dtype}{hint}")
    if allow_half and a.dtype == np.float16:
        a = a.astype(np.float32)  # exact
    return a


def _check_weight(fn, w, name="w", allow_half=False):
    w = _check_float(fn, name, w, allow_half)
    if w.ndim < 1:
        raise ValueError(f"{fn}: {name} must have ndim >= 1 (channels first), got a 0-d array")
    return np.ascontiguousarray(w)


def _check_bool(fn, name, a, shape):
    a = _as_array(fn, name, a)
    if a.dtype != np.bool_:
        raise TypeError(f"{fn}: {name} must be a bool array, got dtype {a.dtype}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} shape {a.shape} does not match {tuple(shape)}")
    return np.ascontiguousarray(a)


def _check_int(fn, name, v, lo=None, hi=None):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be an integer, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{fn}: {name} must be in {rng}, got {v}")
    return v


def _check_bits(fn, bits):
    return _check_int(fn, "bits", bits, 1, 8)


def _check_grid(fn, grid):
    if not isinstance(grid, str) or grid not in GRIDS:
        raise ValueError(f"{fn}: grid must be 'offset' or 'symmetric', got {grid!r}")
    return GRIDS.index(grid)


def _check_step(fn, step):
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: step must be a real number, got {step!r}")
    d = float(step)
    if not (math.isfinite(d) and d > 0.0):
        raise ValueError(f"{fn}: step must be finite and > 0, got {d!r}")
    return d


def _check_channels(fn, name, v, c, *, positive=False, nonneg=False, finite=True):
    """A per-channel float64 vector of length c (a scalar is broadcast)."""
    a = _as_array(fn, name, v)
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise TypeError(f"{fn}: {name} must be a real array, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 0:
        a = np.full(c, float(a), dtype=np.float64)
    if a.ndim != 1 or a.shape[0] != c:
        raise ValueError(f"{fn}: {name} must have shape ({c},) (one value per output channel), "
                         f"got shape {a.shape}")
    bad = np.zeros(c, dtype=bool)
    if finite:
        bad |= ~np.isfinite(a)
    else:
        bad |= np.isnan(a)
    if positive:
        bad |= ~(a > 0.0)
    if nonneg:
        bad |= ~(a >= 0.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        req = "finite and > 0" if positive else ("finite and >= 0" if nonneg else "finite")
        raise ValueError(f"{fn}: {name}[{i}] = {a[i]!r} must be {req}")
    return np.ascontiguousarray(a)


def _check_codes(fn, name, a, bits=None):
    a = _as_array(fn, name, a)
    if a.dtype not in (np.int8, np.int16):
        raise TypeError(f"{fn}: {name} must be an int8 or int16 array, got dtype {a.dtype}")
    if bits is not None and bits == 8 and a.dtype == np.int8:
        raise TypeError(f"{fn}: {name} has dtype int8, which cannot hold the codes of bits=8 "
                        f"(magnitude index up to 128); use int16 (code_dtype(8))")
    return np.ascontiguousarray(a)


def _check_buf(fn, name, buf):
    a = _as_array(fn, name, buf)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise TypeError(f"{fn}: {name} must be a 1-D uint8 array, got dtype {a.dtype} "
                        f"and shape {a.shape}")
    return np.ascontiguousarray(a)


def _where(name):
    return f" (layer {name!r})" if name is not None else ""


def _check_layer_weight(fn, w, name):
    """A float32/float64 weight array, ndim >= 1; messages name the layer after the argument."""
    try:
        x = np.asarray(w)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{fn}: w{_where(name)} cannot be read as an array ({exc})") from None
    if x.dtype.type not in (np.float32, np.float64):
        raise TypeError(f"{fn}: w{_where(name)} must be float32 or float64, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{fn}: w{_where(name)} must have ndim >= 1 (channels first), got a "
                         f"0-d array")
    return np.ascontiguousarray(x)


def _check_layer_mask(fn, mask, shape, name):
    """A bool mask of exactly ``shape``; messages name the layer after the argument."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"{fn}: mask{_where(name)} must be a bool array, got dtype {m.dtype}")
    if m.shape != tuple(shape):
        raise ValueError(f"{fn}: mask{_where(name)} shape {m.shape} does not match the "
                         f"weights' {tuple(shape)}")
    return np.ascontiguousarray(m)


def _check_model_bits(bits) -> None:
    """bits of the closed-form error model, 1..8 (the message names no function)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _check_budget(budget_bits):
    """A finite size budget in bits >= 0, floored to an int."""
    if isinstance(budget_bits, (bool, np.bool_)) or not isinstance(
            budget_bits, (int, float, np.integer, np.floating)):
        raise TypeError(f"budget_bits must be a number, got {budget_bits!r}")
    b = float(budget_bits)
    if not (math.isfinite(b) and b >= 0):
        raise ValueError(f"budget_bits must be a finite number >= 0, got {budget_bits!r}")
    return int(math.floor(b))


def _check_masks(masks, names, shapes):
    """One bool mask per named layer of the given shapes, as flat contiguous arrays."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool array, got {type(masks).__name__}")
    out = []
    for n, s in zip(names, shapes):
        if n not in masks:
            raise ValueError(f"masks: no mask for layer {n!r}")
        m = np.asarray(masks[n])
        if m.dtype != np.bool_:
            raise TypeError(f"masks[{n!r}] must be a bool array, got dtype {m.dtype}")
        if m.shape != s:
            raise ValueError(f"masks[{n!r}]: shape {m.shape} does not match the weights' {s}")
        out.append(np.ascontiguousarray(m).reshape(-1))
    return out


def _check_positive(fn, name, v, allow_zero=False):
    """A finite Python number > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (v < 0 if allow_zero else v <= 0):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: {name} must be a finite number {need}, got {v!r}")
