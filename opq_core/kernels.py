"""JIT kernels: fused prune + fake-quant, straight-through backward, mask realization, packing.

Every op comes in two layers (see DESIGN.md, house style):

- a private Numba kernel (``_name``) that validates nothing and writes into ``out``;
- a public NumPy function that validates its arguments (errors name the argument and the
  value), normalizes dtype and contiguity once, picks the parallel or the serial kernel and
  allocates the result.

A weight tensor of any ``ndim >= 1`` is viewed as ``(C, -1)`` with ``C = shape[0]`` output
channels; per-channel vectors (``scale``, ``threshold``, ``q``) have length ``C``.
Parallel kernels use ``prange`` over independent rows (output channels, or fixed-size blocks
of a flat array); tensors smaller than :data:`opq_core._jit.PARALLEL_MIN_SIZE`, and calls from
non-main Python threads while Numba's threading layer is not known to be thread-safe, use
the serial kernels. ``fastmath`` is off: the rounding must agree bit for bit with
``tests/reference.py``.

Compile time: every kernel compiles on its first call with new argument types (about
0.5-3 s each; :func:`opq_core._jit.compile_timer` measures it apart). Set
``OPQ_NUMBA_CACHE=1`` to cache compiled kernels on disk (``NUMBA_CACHE_DIR`` picks the
folder); later processes then load them in milliseconds. ``NUMBA_DISABLE_JIT=1`` runs the
same code as plain Python.

Speed notes: loops run over slices from index 0 (a loop over ``lo..hi`` of a whole array
does not vectorize), and data-dependent choices on a random mask are arithmetic on the
mask viewed as ``uint8`` (on a bool array LLVM knows the 0/1 range and emits branches).

Codes are signed integers: ``0`` = pruned, ``+k`` / ``-k`` = magnitude index ``k`` in
``1..K`` (``K = 2**(bits - 1)``) with the sign of the weight. ``int8`` holds them for
``bits <= 7``; ``bits = 8`` has ``K = 128`` and needs ``int16`` (see :func:`code_dtype`).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from ._jit import PARALLEL_MIN_SIZE, jit, prange, threading_layer_is_safe

__all__ = [
    "GRIDS",
    "code_dtype",
    "fake_quant",
    "dequantize",
    "ste_backward",
    "clip_mask",
    "scores",
    "mask_from_scores",
    "select_smallest",
    "topk_mask_by_magnitude",
    "mask_from_threshold",
    "codes_to_symbols",
    "symbols_to_codes",
    "pack_bits",
    "unpack_bits",
    "pack_mask",
    "unpack_mask",
    "gap_encode",
    "gap_decode",
    "mask_coding_cost",
    "MaskCodingCost",
    "pack_codes",
    "unpack_codes",
]

#: The quantization grids, in the order of their integer ids in the kernels.
GRIDS = ("offset", "symmetric")
_OFFSET = 0
_SYMMETRIC = 1

#: Block length of the flat (1-D) parallel kernels.
_BLOCK = 1 << 15
#: Arrays at least this long use the sampled candidate band in :func:`select_smallest`.
_SELECT_MIN = 1 << 16
_SELECT_SAMPLE = 1 << 15
_SELECT_SEED = 0x5EED


# --------------------------------------------------------------------------------------
# argument checks (shared by the public functions)
# --------------------------------------------------------------------------------------

def _fn(name, layer):
    """The label error messages start with: the function and, when known, the layer."""
    return name if layer is None else f"{name} (layer {layer!r})"


def _use_parallel(n: int) -> bool:
    """Parallel kernels for big arrays, from the main thread or a thread-safe layer."""
    if n < PARALLEL_MIN_SIZE:
        return False
    if threading.current_thread() is threading.main_thread():
        return True
    return threading_layer_is_safe()


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


def _rows(shape):
    """(C, M) of a tensor viewed as (output channels, fan-in)."""
    c = int(shape[0])
    m = 1
    for d in shape[1:]:
        m *= int(d)
    return c, m


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


def _index(shape, flat_i):
    return tuple(int(k) for k in np.unravel_index(int(flat_i), shape))


def _target(fn, name, out, shape, dtype, inputs, inplace_ok=None):
    """Where a kernel writes: ``out`` itself when it is C-contiguous and does not overlap
    an input (except as the very same buffer as ``inplace_ok``), else a fresh array that
    is copied into ``out`` afterwards. Returns (array to write, array to copy into or None).
    """
    if out is None:
        return np.empty(shape, dtype=dtype), None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} shape {out.shape} does not match {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} dtype {out.dtype} does not match {np.dtype(dtype)}")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only")
    direct = out.flags.c_contiguous
    if direct:
        for a in inputs:
            if a is None or not np.may_share_memory(out, a):
                continue
            same = (a is inplace_ok and a.flags.c_contiguous and a.dtype == out.dtype
                    and a.shape == out.shape
                    and a.__array_interface__["data"][0] == out.__array_interface__["data"][0])
            if not same:
                direct = False
                break
    if direct:
        return out, None
    return np.empty(shape, dtype=dtype), out


def _finish(buf, user):
    if user is None:
        return buf
    np.copyto(user, buf)
    return user


def code_dtype(bits: int):
    """The integer dtype of the codes of a ``bits``-bit quantizer.

    ``int8`` for ``bits <= 7``; ``int16`` for ``bits = 8`` (``K = 128``, and ``+128``
    does not fit an ``int8``).

    >>> code_dtype(4), code_dtype(8)
    (<class 'numpy.int8'>, <class 'numpy.int16'>)
    """
    b = _check_bits("code_dtype", bits)
    return np.int16 if b == 8 else np.int8


# --------------------------------------------------------------------------------------
# forward: fused prune + fake-quant
# --------------------------------------------------------------------------------------

@jit()
def _fq_row(x, m, o, cd, want_codes, grid, s, theta, step, kmax):
    """One output channel; returns the number of kept NaN weights."""
    sd = s * step
    bad = 0
    n = x.shape[0]
    if grid == 0:
        if want_codes:
            for j in range(n):
                v = np.float64(x[j])
                kf = np.floor((abs(v) - theta) / sd) + 1.0
                if kf > kmax:
                    kf = kmax
                if not kf >= 1.0:
                    kf = 1.0
                level = theta + s * ((kf - 0.5) * step)
                k = np.int64(kf)
                keep = m[j]
                pos = v >= 0.0
                val = level if pos else -level
                o[j] = val if keep else 0.0
                cd[j] = (k if pos else -k) if keep else 0
                bad += 1 if (keep and v != v) else 0
        else:
            for j in range(n):
                v = np.float64(x[j])
                kf = np.floor((abs(v) - theta) / sd) + 1.0
                if kf > kmax:
                    kf = kmax
                if not kf >= 1.0:
                    kf = 1.0
                level = theta + s * ((kf - 0.5) * step)
                keep = m[j]
                val = level if v >= 0.0 else -level
                o[j] = val if keep else 0.0
                bad += 1 if (keep and v != v) else 0
    else:
        if want_codes:
            for j in range(n):
                v = np.float64(x[j])
                kf = np.rint(abs(v) / sd)
                if kf > kmax:
                    kf = kmax
                if not kf >= 1.0:
                    kf = 1.0
                level = kf * sd
                k = np.int64(kf)
                keep = m[j]
                pos = v >= 0.0
                val = level if pos else -level
                o[j] = val if keep else 0.0
                cd[j] = (k if pos else -k) if keep else 0
                bad += 1 if (keep and v != v) else 0
        else:
            for j in range(n):
                v = np.float64(x[j])
                kf = np.rint(abs(v) / sd)
                if kf > kmax:
                    kf = kmax
                if not kf >= 1.0:
                    kf = 1.0
                level = kf * sd
                keep = m[j]
                val = level if v >= 0.0 else -level
                o[j] = val if keep else 0.0
                bad += 1 if (keep and v != v) else 0
    return bad


@jit()
def _fake_quant(x, m, o, cd, want_codes, grid, scale, threshold, step, kmax, bad):
    for c in range(x.shape[0]):
        cdc = cd[c] if want_codes else cd[0]
        bad[c] = _fq_row(x[c], m[c], o[c], cdc, want_codes, grid, scale[c], threshold[c], step, kmax)


@jit(parallel=True)
def _fake_quant_par(x, m, o, cd, want_codes, grid, scale, threshold, step, kmax, bad):
    for c in prange(x.shape[0]):
        cdc = cd[c] if want_codes else cd[0]
        bad[c] = _fq_row(x[c], m[c], o[c], cdc, want_codes, grid, scale[c], threshold[c], step, kmax)


def _quant_args(fn, w, mask, scale, threshold, step, bits, grid):
    x = _check_weight(fn, w)
    c, n = _rows(x.shape)
    m = _check_bool(fn, "mask", mask, x.shape)
    s = _check_channels(fn, "scale", scale, c, positive=True)
    th = _check_channels(fn, "threshold", threshold, c, nonneg=True)
    d = _check_step(fn, step)
    b = _check_bits(fn, bits)
    g = _check_grid(fn, grid)
    sd = s * d
    under = ~(sd > 0.0) | ~np.isfinite(sd)
    if under.any():
        i = int(np.flatnonzero(under)[0])
        raise ValueError(f"{fn}: scale[{i}] * step = {s[i]!r} * {d!r} = {sd[i]!r} is not a "
                         f"finite positive step")
    return x, m, s, th, d, b, g, c, n


def fake_quant(w, mask, scale, threshold, step, bits, grid="offset", *, out=None, codes=None,
               layer=None):
    r"""Prune and fake-quantize a weight tensor in one pass.

    Kept weights (``mask`` True) of output channel ``c`` are rounded to the channel's
    codebook, pruned ones become exactly ``0.0``. All arithmetic is float64 in this order;
    the result is cast to ``w.dtype`` at the very end.

    .. math::

        a &= |w|,\quad \delta_c = s_c D,\quad K = 2^{B-1} \\
        \text{offset:}\quad k &= \operatorname{clip}(\lfloor (a - \theta_c)/\delta_c \rfloor
            + 1, 1, K),\quad \ell = \theta_c + s_c ((k - \tfrac12) D) \\
        \text{symmetric:}\quad k &= \operatorname{clip}(\operatorname{rint}(a/\delta_c), 1, K),
            \quad \ell = k \delta_c \\
        \hat w &= \ell \text{ if } w \ge 0 \text{ else } -\ell
            \quad(\text{so } \operatorname{sign}(\pm 0) = +1)

    Parameters
    ----------
    w : ndarray, float32 or float64, ndim >= 1
        Latent weights, output channels first. float16 is refused (convert explicitly).
    mask : bool ndarray, same shape
        True = kept.
    scale : array_like (C,)
        Channel scales ``s_c > 0``.
    threshold : array_like (C,)
        Channel thresholds ``theta_c >= 0`` in absolute units.
    step : float
        Normalized step ``D > 0`` of the layer.
    bits : int
        ``B`` in 1..8 (sign + ``B - 1`` magnitude bits).
    grid : {"offset", "symmetric"}
    out : ndarray, optional
        Receives ``w_hat`` (same shape and dtype as ``w``; may be ``w`` itself).
    codes : ndarray of int8 / int16, optional
        Receives the codes (0 = pruned, ``+-k``); ``int16`` is needed for ``bits = 8``.
    layer : str, optional
        Layer name quoted by error messages.

    Returns
    -------
    ndarray
        ``w_hat``, same shape and dtype as ``w`` (``out`` when given).

    Raises
    ------
    ValueError
        A kept weight is NaN (``out`` / ``codes`` are then partly written), or an argument
        is out of range.

    Examples
    --------
    >>> w = np.array([[0.3, -1.0, 0.05, 0.0]])
    >>> m = np.array([[True, True, False, True]])
    >>> c = np.zeros(w.shape, np.int8)
    >>> fake_quant(w, m, [1.0], [0.1], 0.5, 2, codes=c).tolist()
    [[0.35, -0.85, 0.0, 0.35]]
    >>> c.tolist()
    [[1, -2, 0, 1]]
    """
    fn = _fn("fake_quant", layer)
    x, m, s, th, d, b, g, c, n = _quant_args(fn, w, mask, scale, threshold, step, bits, grid)
    kmax = float(1 << (b - 1))
    o, o_user = _target(fn, "out", out, x.shape, x.dtype, (x, m), inplace_ok=x)
    want = codes is not None
    if want:
        if not isinstance(codes, np.ndarray):
            raise TypeError(f"{fn}: codes must be a numpy array, got {type(codes).__name__}")
        _check_codes(fn, "codes", np.empty(0, codes.dtype), b)
        cd, cd_user = _target(fn, "codes", codes, x.shape, codes.dtype, (x, m, o))
        cd2 = cd.reshape(c, n)
    else:
        cd, cd_user = None, None
        cd2 = np.empty((1, 0), dtype=np.int8)
    bad = np.zeros(c, dtype=np.int64)
    kern = _fake_quant_par if _use_parallel(x.size) else _fake_quant
    kern(x.reshape(c, n), m.reshape(c, n), o.reshape(c, n), cd2, want, g, s, th, d, kmax, bad)
    if bad.any():
        flat = np.flatnonzero(np.isnan(x.reshape(-1)) & m.reshape(-1))
        raise ValueError(f"{fn}: w has a NaN at kept index {_index(x.shape, flat[0])}")
    if want:
        _finish(cd, cd_user)
    return _finish(o, o_user)


# --------------------------------------------------------------------------------------
# dequantize
# --------------------------------------------------------------------------------------

@jit()
def _deq_row(cd, o, grid, s, theta, step, kmax):
    sd = s * step
    bad = 0
    if grid == 0:
        for j in range(cd.shape[0]):
            ci = np.int64(cd[j])
            kf = np.float64(abs(ci))
            level = theta + s * ((kf - 0.5) * step)
            val = level if ci > 0 else -level
            o[j] = val if ci != 0 else 0.0
            bad += 1 if kf > kmax else 0
    else:
        for j in range(cd.shape[0]):
            ci = np.int64(cd[j])
            kf = np.float64(abs(ci))
            level = kf * sd
            val = level if ci > 0 else -level
            o[j] = val if ci != 0 else 0.0
            bad += 1 if kf > kmax else 0
    return bad


@jit()
def _dequantize(cd, o, grid, scale, threshold, step, kmax, bad):
    for c in range(cd.shape[0]):
        bad[c] = _deq_row(cd[c], o[c], grid, scale[c], threshold[c], step, kmax)


@jit(parallel=True)
def _dequantize_par(cd, o, grid, scale, threshold, step, kmax, bad):
    for c in prange(cd.shape[0]):
        bad[c] = _deq_row(cd[c], o[c], grid, scale[c], threshold[c], step, kmax)


def dequantize(codes, scale, threshold, step, bits, grid="offset", dtype=np.float32, *,
               layer=None):
    r"""Dense weights from codes; bit for bit what :func:`fake_quant` returned with them.

    ``0 -> 0.0``; ``+-k -> +-level_k`` with the level formula of :func:`fake_quant`.

    Parameters
    ----------
    codes : int8 or int16 ndarray, ndim >= 1
        Codes, output channels first (``int16`` for ``bits = 8``); ``|code| <= 2**(bits-1)``.
    scale, threshold, step, bits, grid
        As in :func:`fake_quant`.
    dtype : float32 or float64
    layer : str, optional
        Layer name quoted by error messages.

    Examples
    --------
    >>> dequantize(np.array([[1, -2, 0]], np.int8), [1.0], [0.1], 0.5, 2).tolist()
    [[0.3499999940395355, -0.8500000238418579, 0.0]]
    """
    fn = _fn("dequantize", layer)
    cd = _check_codes(fn, "codes", codes, None)
    if cd.ndim < 1:
        raise ValueError(f"{fn}: codes must have ndim >= 1 (channels first), got a 0-d array")
    dt = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{fn}: dtype must be float32 or float64, got {dt}")
    c, n = _rows(cd.shape)
    s = _check_channels(fn, "scale", scale, c, positive=True)
    th = _check_channels(fn, "threshold", threshold, c, nonneg=True)
    d = _check_step(fn, step)
    b = _check_bits(fn, bits)
    g = _check_grid(fn, grid)
    kmax = float(1 << (b - 1))
    o = np.empty(cd.shape, dtype=dt)
    bad = np.zeros(c, dtype=np.int64)
    kern = _dequantize_par if _use_parallel(cd.size) else _dequantize
    kern(cd.reshape(c, n), o.reshape(c, n), g, s, th, d, kmax, bad)
    if bad.any():
        i = int(np.flatnonzero(np.abs(cd.reshape(-1).astype(np.int64)) > int(kmax))[0])
        raise ValueError(f"{fn}: codes{_index(cd.shape, i)} = {int(cd.reshape(-1)[i])} is out of "
                         f"range for bits={b} (|code| <= {int(kmax)})")
    return o


# --------------------------------------------------------------------------------------
# backward: straight-through estimator
# --------------------------------------------------------------------------------------

@jit()
def _ste_block(g, m, cl, o, lo, hi, use_clip):
    # slice first: loops over 0..len vectorize, loops over lo..hi of the whole array do not
    gg = g[lo:hi]
    mm = m[lo:hi]
    oo = o[lo:hi]
    if use_clip:
        cc = cl[lo:hi]
        for j in range(gg.shape[0]):
            oo[j] = gg[j] if (mm[j] and not cc[j]) else 0.0
    else:
        for j in range(gg.shape[0]):
            oo[j] = gg[j] if mm[j] else 0.0


@jit()
def _ste(g, m, cl, o, use_clip):
    _ste_block(g, m, cl, o, 0, g.shape[0], use_clip)


@jit(parallel=True)
def _ste_par(g, m, cl, o, use_clip):
    n = g.shape[0]
    nb = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        _ste_block(g, m, cl, o, lo, hi, use_clip)


def ste_backward(grad, mask, *, out=None, clip=None, layer=None):
    r"""Straight-through gradient of :func:`fake_quant`: ``grad`` where kept, ``0.0`` elsewhere.

    .. math:: \frac{\partial L}{\partial w} = \frac{\partial L}{\partial \hat w}
              \cdot [\text{mask}] \cdot [\lnot\,\text{clip}]

    Masked positions are exactly ``+0.0`` (not ``-0.0``, even for a NaN gradient), kept
    ones are ``grad`` unchanged.

    Parameters
    ----------
    grad : float32 or float64 ndarray
    mask : bool ndarray, same shape
    out : ndarray, optional
        Same shape and dtype as ``grad``; may be ``grad`` itself (in place).
    clip : bool ndarray, optional
        Where True the gradient is zeroed too (clipped STE, see :func:`clip_mask`).

    Examples
    --------
    >>> g = np.array([1.0, -2.0, 3.0])
    >>> ste_backward(g, np.array([True, False, True]), clip=np.array([False, False, True]))
    array([1., 0., 0.])
    """
    fn = _fn("ste_backward", layer)
    g = np.ascontiguousarray(_check_float(fn, "grad", grad))
    m = _check_bool(fn, "mask", mask, g.shape)
    use_clip = clip is not None
    cl = _check_bool(fn, "clip", clip, g.shape) if use_clip else np.empty(0, dtype=np.bool_)
    o, o_user = _target(fn, "out", out, g.shape, g.dtype, (g, m, cl if use_clip else None),
                        inplace_ok=g)
    kern = _ste_par if _use_parallel(g.size) else _ste
    kern(g.reshape(-1), m.reshape(-1), cl.reshape(-1), o.reshape(-1), use_clip)
    return _finish(o, o_user)


@jit()
def _clip_row(x, m, o, grid, s, theta, step, kmax):
    sd = s * step
    if grid == 0:
        for j in range(x.shape[0]):
            a = abs(np.float64(x[j]))
            o[j] = m[j] and (np.floor((a - theta) / sd) + 1.0 > kmax)
    else:
        for j in range(x.shape[0]):
            a = abs(np.float64(x[j]))
            o[j] = m[j] and (np.rint(a / sd) > kmax)


@jit()
def _clip_mask(x, m, o, grid, scale, threshold, step, kmax):
    for c in range(x.shape[0]):
        _clip_row(x[c], m[c], o[c], grid, scale[c], threshold[c], step, kmax)


@jit(parallel=True)
def _clip_mask_par(x, m, o, grid, scale, threshold, step, kmax):
    for c in prange(x.shape[0]):
        _clip_row(x[c], m[c], o[c], grid, scale[c], threshold[c], step, kmax)


def clip_mask(w, mask, scale, threshold, step, bits, grid="offset", *, layer=None):
    r"""Kept weights whose magnitude index is clipped at ``K`` (for the clipped STE).

    offset: :math:`\lfloor (|w| - \theta_c)/(s_c D) \rfloor + 1 > K`;
    symmetric: :math:`\operatorname{rint}(|w|/(s_c D)) > K`. Arguments as in
    :func:`fake_quant`.

    >>> clip_mask(np.array([[0.3, -5.0, 5.0]]), np.array([[True, True, False]]),
    ...           [1.0], [0.1], 0.5, 2).tolist()
    [[False, True, False]]
    """
    fn = _fn("clip_mask", layer)
    x, m, s, th, d, b, g, c, n = _quant_args(fn, w, mask, scale, threshold, step, bits, grid)
    o = np.empty(x.shape, dtype=np.bool_)
    kern = _clip_mask_par if _use_parallel(x.size) else _clip_mask
    kern(x.reshape(c, n), m.reshape(c, n), o.reshape(c, n), g, s, th, d, float(1 << (b - 1)))
    return o


# --------------------------------------------------------------------------------------
# mask realization
# --------------------------------------------------------------------------------------

@jit()
def _scores_row(x, o, q, dead):
    bad = 0
    if dead:
        for j in range(x.shape[0]):
            v = np.float64(x[j])
            o[j] = -np.inf
            bad += 0 if abs(v) < np.inf else 1
    else:
        for j in range(x.shape[0]):
            v = np.float64(x[j])
            o[j] = v * v - q
            bad += 0 if abs(v) < np.inf else 1
    return bad


@jit()
def _scores(x, o, q, dead, bad):
    for c in range(x.shape[0]):
        bad[c] = _scores_row(x[c], o[c], q[c], dead[c])


@jit(parallel=True)
def _scores_par(x, o, q, dead, bad):
    for c in prange(x.shape[0]):
        bad[c] = _scores_row(x[c], o[c], q[c], dead[c])


def scores(w, q_c, dead=None, out=None, *, layer=None):
    r"""Pruning scores of one layer, flattened: :math:`w^2 - q_c` (float64).

    Pruning a kept weight of channel ``c`` changes the error by ``w**2 - q_c`` (see
    DESIGN.md); the network keeps the largest scores. Channels marked ``dead`` (scale 0)
    score ``-inf`` and go first.

    Parameters
    ----------
    w : float16/32/64 ndarray, ndim >= 1 (non-finite weights are refused)
    q_c : array_like (C,)
        Predicted quantization MSE of a kept weight per channel (finite).
    dead : bool array (C,), optional
    out : float64 ndarray (w.size,), optional

    >>> scores(np.array([[1.0, -2.0], [3.0, 0.5]]), [0.5, 1.0], dead=np.array([False, True]))
    array([ 0.5,  3.5, -inf, -inf])
    """
    fn = _fn("scores", layer)
    x = _check_weight(fn, w, allow_half=True)
    c, n = _rows(x.shape)
    q = _check_channels(fn, "q_c", q_c, c)
    if dead is None:
        dd = np.zeros(c, dtype=np.bool_)
    else:
        dd = _check_bool(fn, "dead", dead, (c,))
    o, o_user = _target(fn, "out", out, (x.size,), np.float64, (x,))
    bad = np.zeros(c, dtype=np.int64)
    kern = _scores_par if _use_parallel(x.size) else _scores
    kern(x.reshape(c, n), o.reshape(c, n), q, dd, bad)
    if bad.any():
        flat = x.reshape(-1)
        i = int(np.flatnonzero(~np.isfinite(flat))[0])
        raise ValueError(f"{fn}: w has a non-finite value {float(flat[i])!r} at index "
                         f"{_index(x.shape, i)}")
    return _finish(o, o_user)


@jit()
def _mfs_block(s, m, lam, lo, hi):
    gt = 0
    eq = 0
    nan = 0
    ss = s[lo:hi]
    mm = m[lo:hi]
    for j in range(ss.shape[0]):
        v = ss[j]
        mm[j] = v > lam
        gt += 1 if v > lam else 0
        eq += 1 if v == lam else 0
        nan += 1 if v != v else 0
    return gt, eq, nan


@jit(parallel=True)
def _mfs_pass1_par(s, m, lam, gt, eq, nan):
    n = s.shape[0]
    for b in prange(gt.shape[0]):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        gt[b], eq[b], nan[b] = _mfs_block(s, m, lam, lo, hi)


@jit()
def _mfs_pass1(s, m, lam, gt, eq, nan):
    n = s.shape[0]
    for b in range(gt.shape[0]):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        gt[b], eq[b], nan[b] = _mfs_block(s, m, lam, lo, hi)


@jit()
def _mfs_take(s, m, lam, take):
    """Keep, in each block, its first take[b] entries equal to lam."""
    n = s.shape[0]
    for b in range(take.shape[0]):
        t = take[b]
        if t == 0:
            continue
        j = b * _BLOCK
        hi = min(j + _BLOCK, n)
        while t > 0 and j < hi:
            if s[j] == lam:
                m[j] = True
                t -= 1
            j += 1


def mask_from_scores(score, lam, kept):
    r"""Keep every score > ``lam``, then the first (flat order) scores equal to ``lam``
    until exactly ``kept`` are kept.

    With ``lam`` the realized score quantile (:func:`select_smallest`) this prunes exactly
    the smallest scores with deterministic ties (earlier positions are kept first).

    Parameters
    ----------
    score : float64 ndarray (any shape; NaN refused)
    lam : float (may be ``-inf``; not NaN)
    kept : int, 0..score.size

    Returns
    -------
    bool ndarray, shape of ``score``

    Raises
    ------
    ValueError
        More than ``kept`` scores exceed ``lam``, or too few are ``>= lam``.

    >>> mask_from_scores(np.array([3.0, 1.0, 2.0, 1.0, 1.0]), 1.0, 3).tolist()
    [True, True, True, False, False]
    """
    fn = "mask_from_scores"
    s = _as_array(fn, "score", score)
    if s.dtype != np.float64:
        raise TypeError(f"{fn}: score must be float64, got dtype {s.dtype}")
    s = np.ascontiguousarray(s)
    if isinstance(lam, (bool, np.bool_)) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: lam must be a real number, got {lam!r}")
    lam = float(lam)
    if math.isnan(lam):
        raise ValueError(f"{fn}: lam must not be NaN")
    n = s.size
    kept = _check_int(fn, "kept", kept, 0, n)
    flat = s.reshape(-1)
    m = np.empty(n, dtype=np.bool_)
    nb = (n + _BLOCK - 1) // _BLOCK
    gt = np.zeros(nb, np.int64)
    eq = np.zeros(nb, np.int64)
    nan = np.zeros(nb, np.int64)
    (_mfs_pass1_par if _use_parallel(n) else _mfs_pass1)(flat, m, lam, gt, eq, nan)
    if nan.any():
        i = int(np.flatnonzero(np.isnan(flat))[0])
        raise ValueError(f"{fn}: score has a NaN at index {_index(s.shape, i)}")
    n_gt = int(gt.sum())
    n_eq = int(eq.sum())
    if n_gt > kept:
        raise ValueError(f"{fn}: {n_gt} scores are > lam={lam!r}, more than kept={kept}")
    need = kept - n_gt
    if need > n_eq:
        raise ValueError(f"{fn}: only {n_gt + n_eq} scores are >= lam={lam!r}, fewer than "
                         f"kept={kept}")
    if need:
        before = np.cumsum(eq) - eq
        take = np.clip(need - before, 0, eq)
        _mfs_take(flat, m, lam, take)
    return m.reshape(s.shape)


@jit()
def _band_block(x, lo_v, hi_v, lo, hi):
    below = 0
    band = 0
    nan = 0
    xx = x[lo:hi]
    for j in range(xx.shape[0]):
        v = xx[j]
        below += 1 if v < lo_v else 0
        band += 1 if (v >= lo_v and v <= hi_v) else 0
        nan += 1 if v != v else 0
    return below, band, nan


@jit(parallel=True)
def _band_count_par(x, lo_v, hi_v, below, band, nan):
    n = x.shape[0]
    for b in prange(below.shape[0]):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        below[b], band[b], nan[b] = _band_block(x, lo_v, hi_v, lo, hi)


@jit()
def _band_count(x, lo_v, hi_v, below, band, nan):
    n = x.shape[0]
    for b in range(below.shape[0]):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        below[b], band[b], nan[b] = _band_block(x, lo_v, hi_v, lo, hi)


@jit()
def _band_collect_block(x, lo_v, hi_v, cand, at, lo, hi):
    xx = x[lo:hi]
    for j in range(xx.shape[0]):
        v = xx[j]
        if v >= lo_v and v <= hi_v:
            cand[at] = v
            at += 1


@jit(parallel=True)
def _band_collect_par(x, lo_v, hi_v, offsets, cand):
    n = x.shape[0]
    for b in prange(offsets.shape[0]):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        _band_collect_block(x, lo_v, hi_v, cand, offsets[b], lo, hi)


@jit()
def _band_collect(x, lo_v, hi_v, offsets, cand):
    n = x.shape[0]
    for b in range(offsets.shape[0]):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        _band_collect_block(x, lo_v, hi_v, cand, offsets[b], lo, hi)


def _select_full(x, k):
    """Fallback: np.partition of the whole array (O(N), extra memory)."""
    v = np.partition(x, k - 1)[k - 1]
    return float(v), int(np.count_nonzero(x < v)), int(np.count_nonzero(x == v))


def _select_band(x, k, sample=None, slack=None):
    """k-th smallest of a flat finite-or-inf float64 array by a sampled candidate band.

    A fixed-seed sample locates a value band ``[lo, hi]`` around the k/N quantile; one
    pass counts the values below it and inside it, a second copies the candidates, and
    the selection runs on the candidates only. When the band misses the k-th value (rare:
    ``slack`` is six standard deviations of the sample rank), :func:`_select_full` is used.
    Returns ``(v, n_less, n_equal, path)``, or None when ``x`` holds a NaN.
    """
    n = x.shape[0]
    if sample is None:
        sample = _SELECT_SAMPLE
    rng = np.random.default_rng(_SELECT_SEED)
    smp = np.sort(x[rng.integers(0, n, size=sample)])
    q = k / n
    r = q * sample
    if slack is None:
        slack = 6.0 * math.sqrt(sample * q * (1.0 - q)) + 16.0
    i_lo = min(int(math.floor(r - slack)) - 1, sample - 1)
    i_hi = max(int(math.ceil(r + slack)), 0)
    lo_v = -np.inf if i_lo < 0 else float(smp[i_lo])
    hi_v = np.inf if i_hi >= sample else float(smp[i_hi])
    nb = (n + _BLOCK - 1) // _BLOCK
    below = np.zeros(nb, np.int64)
    band = np.zeros(nb, np.int64)
    nan = np.zeros(nb, np.int64)
    par = _use_parallel(n)
    (_band_count_par if par else _band_count)(x, lo_v, hi_v, below, band, nan)
    if nan.any():
        return None
    n_below = int(below.sum())
    n_band = int(band.sum())
    if not (n_below < k <= n_below + n_band):
        v, nl, ne = _select_full(x, k)
        return v, nl, ne, "full"
    if lo_v == hi_v:
        return float(lo_v), n_below, n_band, "band"
    offsets = np.cumsum(band) - band
    cand = np.empty(n_band, dtype=np.float64)
    (_band_collect_par if par else _band_collect)(x, lo_v, hi_v, offsets, cand)
    r_in = k - n_below
    v = np.partition(cand, r_in - 1)[r_in - 1]
    return (float(v), n_below + int(np.count_nonzero(cand < v)),
            int(np.count_nonzero(cand == v)), "band")


def select_smallest(score, k):
    r"""The ``k``-th smallest value (1-based) of a float64 array by O(N) selection.

    Returns ``(v, n_less, n_equal)``: ``v == np.sort(score.ravel())[k - 1]``,
    ``n_less`` values are ``< v`` and ``n_equal`` are ``== v`` (so
    ``n_less < k <= n_less + n_equal``). Large arrays use a sampled candidate band (two
    parallel passes, selection on ~2 % of the values) with a deterministic fixed-seed
    sample; small ones ``np.partition``. NaN is refused; ``+-inf`` are ordinary values.

    >>> select_smallest(np.array([5.0, 1.0, 3.0, 3.0, 2.0]), 3)
    (3.0, 2, 2)
    """
    fn = "select_smallest"
    s = _as_array(fn, "score", score)
    if s.dtype != np.float64:
        raise TypeError(f"{fn}: score must be float64, got dtype {s.dtype}")
    x = np.ascontiguousarray(s).reshape(-1)
    n = x.size
    if n == 0:
        raise ValueError(f"{fn}: score is empty")
    k = _check_int(fn, "k", k, 1, n)
    if n < _SELECT_MIN:
        if np.isnan(x).any():
            i = int(np.flatnonzero(np.isnan(x))[0])
            raise ValueError(f"{fn}: score has a NaN at index {_index(s.shape, i)}")
        return _select_full(x, k)
    res = _select_band(x, k)
    if res is None:
        i = int(np.flatnonzero(np.isnan(x))[0])
        raise ValueError(f"{fn}: score has a NaN at index {_index(s.shape, i)}")
    return res[:3]


@jit()
def _abs_row(x, o):
    for j in range(x.shape[0]):
        o[j] = abs(np.float64(x[j]))


@jit(parallel=True)
def _abs_flat_par(x, o):
    n = x.shape[0]
    for b in prange((n + _BLOCK - 1) // _BLOCK):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, n)
        _abs_row(x[lo:hi], o[lo:hi])


def topk_mask_by_magnitude(w, kept, *, layer=None):
    r"""Per-layer magnitude baseline: keep the ``kept`` largest ``|w|``.

    Ties at the cut are kept first in flat order. NaN weights are refused.

    >>> topk_mask_by_magnitude(np.array([[0.5, -2.0], [0.5, 1.0]]), 3).tolist()
    [[True, True], [False, True]]
    """
    fn = _fn("topk_mask_by_magnitude", layer)
    x = _check_weight(fn, w, allow_half=True)
    n = x.size
    kept = _check_int(fn, "kept", kept, 0, n)
    flat = x.reshape(-1)
    a = np.empty(n, dtype=np.float64)
    if _use_parallel(n):
        _abs_flat_par(flat, a)
    else:
        _abs_row(flat, a)
    if kept == 0:
        if n and np.isnan(a).any():
            i = int(np.flatnonzero(np.isnan(a))[0])
            raise ValueError(f"{fn}: w has a NaN at index {_index(x.shape, i)}")
        return np.zeros(x.shape, dtype=np.bool_)
    try:
        v = select_smallest(a, n - kept + 1)[0]
    except ValueError:
        i = int(np.flatnonzero(np.isnan(a))[0])
        raise ValueError(f"{fn}: w has a NaN at index {_index(x.shape, i)}") from None
    return mask_from_scores(a, v, kept).reshape(x.shape)


@jit()
def _thr_row(x, o, theta):
    for j in range(x.shape[0]):
        o[j] = abs(np.float64(x[j])) >= theta


@jit()
def _mask_from_threshold(x, o, threshold):
    for c in range(x.shape[0]):
        _thr_row(x[c], o[c], threshold[c])


@jit(parallel=True)
def _mask_from_threshold_par(x, o, threshold):
    for c in prange(x.shape[0]):
        _thr_row(x[c], o[c], threshold[c])


def mask_from_threshold(w, threshold, *, layer=None):
    r"""Per-channel magnitude mask :math:`|w_{cj}| \ge \theta_c` (NaN -> pruned).

    >>> mask_from_threshold(np.array([[0.5, -2.0], [0.5, 1.0]]), [1.0, 0.5]).tolist()
    [[False, True], [True, True]]
    """
    fn = _fn("mask_from_threshold", layer)
    x = _check_weight(fn, w, allow_half=True)
    c, n = _rows(x.shape)
    th = _check_channels(fn, "threshold", threshold, c, finite=False)
    o = np.empty(x.shape, dtype=np.bool_)
    kern = _mask_from_threshold_par if _use_parallel(x.size) else _mask_from_threshold
    kern(x.reshape(c, n), o.reshape(c, n), th)
    return o


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


def symbols_to_codes(sym, bits):
    r"""Inverse of :func:`codes_to_symbols`; codes of dtype :func:`code_dtype` (bits).

    >>> symbols_to_codes(np.array([0, 4, 3, 6], np.uint8), 3).tolist()
    [1, -1, 4, -3]
    """
    fn = "symbols_to_codes"
    b = _check_bits(fn, bits)
    s = _as_array(fn, "sym", sym)
    if s.dtype != np.uint8:
        raise TypeError(f"{fn}: sym must be a uint8 array, got dtype {s.dtype}")
    s = np.ascontiguousarray(s)
    flat = s.reshape(-1)
    cd = np.empty(flat.size, dtype=code_dtype(b))
    if _symbols_to_codes(flat, cd, b - 1):
        i = int(np.flatnonzero(flat >= (1 << b))[0])
        raise ValueError(f"{fn}: sym{_index(s.shape, i)} = {int(flat[i])} does not fit "
                         f"{b} bits")
    return cd.reshape(s.shape)


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
def _pack_bits(sym, out, bits):
    n = sym.shape[0]
    ng = n // 8
    bad = _pack_groups(sym, out, 0, ng, bits)
    if n - 8 * ng:
        bad += _pack_group(sym, out, ng, n - 8 * ng, bits)
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


@jit(parallel=True)
def _pack_bits_par(sym, out, bits):
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
def _unpack_bits(buf, out, bits):
    n = out.shape[0]
    ng = n // 8
    _unpack_groups(buf, out, 0, ng, bits)
    if n - 8 * ng:
        _unpack_group(buf, out, ng, n - 8 * ng, bits)


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


@jit(parallel=True)
def _unpack_bits_par(buf, out, bits):
    n = out.shape[0]
    ng = n // 8
    nb = (ng + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        g0 = b * _BLOCK
        _unpack_groups(buf, out, g0, min(g0 + _BLOCK, ng), bits)
    if n - 8 * ng:
        _unpack_group(buf, out, ng, n - 8 * ng, bits)


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


def _check_buf(fn, name, buf):
    a = _as_array(fn, name, buf)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise TypeError(f"{fn}: {name} must be a 1-D uint8 array, got dtype {a.dtype} "
                        f"and shape {a.shape}")
    return np.ascontiguousarray(a)


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


@jit()
def _pack_mask(m, out):
    _pack_mask_bytes(m, out, 0, out.shape[0])


@jit(parallel=True)
def _pack_mask_par(m, out):
    nbytes = out.shape[0]
    nb = (nbytes + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        lo = b * _BLOCK
        _pack_mask_bytes(m, out, lo, min(lo + _BLOCK, nbytes))


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


@jit()
def _unpack_mask(buf, m):
    _unpack_mask_bytes(buf, m, 0, buf.shape[0])


@jit(parallel=True)
def _unpack_mask_par(buf, m):
    nbytes = buf.shape[0]
    nb = (nbytes + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        lo = b * _BLOCK
        _unpack_mask_bytes(buf, m, lo, min(lo + _BLOCK, nbytes))


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
def _gap_scan_block(m, lo, hi, first, last, cnt, nbytes, b):
    """First/last kept position of the block, its kept count, and the varint bytes of the
    gaps inside the block (not the gap to the previous block)."""
    f = -1
    p = -1
    c = 0
    nby = 0
    mm = m[lo:hi]
    for j in range(mm.shape[0]):
        if mm[j]:
            if p >= 0:
                nby += _varint_len(j - p - 1)
            else:
                f = j
            p = j
            c += 1
    first[b] = f + lo if f >= 0 else -1
    last[b] = p + lo if p >= 0 else -1
    cnt[b] = c
    nbytes[b] = nby


@jit()
def _gap_scan(m, first, last, cnt, nbytes):
    n = m.shape[0]
    for b in range(first.shape[0]):
        lo = b * _BLOCK
        _gap_scan_block(m, lo, min(lo + _BLOCK, n), first, last, cnt, nbytes, b)


@jit(parallel=True)
def _gap_scan_par(m, first, last, cnt, nbytes):
    n = m.shape[0]
    for b in prange(first.shape[0]):
        lo = b * _BLOCK
        _gap_scan_block(m, lo, min(lo + _BLOCK, n), first, last, cnt, nbytes, b)


@jit()
def _gap_offsets(first, last, nbytes, lead, offsets):
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
        at += _varint_len(g) + nbytes[b]
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
def _gap_write_block(m, lo, hi, lead, at, out):
    if lead < 0:
        return
    p = -1
    mm = m[lo:hi]
    for j in range(mm.shape[0]):
        if mm[j]:
            if p < 0:
                at = _put_varint(out, at, lead)
            else:
                at = _put_varint(out, at, j - p - 1)
            p = j


@jit()
def _gap_write(m, lead, offsets, out):
    n = m.shape[0]
    for b in range(lead.shape[0]):
        lo = b * _BLOCK
        _gap_write_block(m, lo, min(lo + _BLOCK, n), lead[b], offsets[b], out)


@jit(parallel=True)
def _gap_write_par(m, lead, offsets, out):
    n = m.shape[0]
    for b in prange(lead.shape[0]):
        lo = b * _BLOCK
        _gap_write_block(m, lo, min(lo + _BLOCK, n), lead[b], offsets[b], out)


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
    total = int(_gap_offsets(first, last, nbytes, lead, offsets))
    return lead, offsets, total, par, int(cnt.sum())


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
    lead, offsets, total, par, _ = _gap_plan(m)
    out = np.empty(total, dtype=np.uint8)
    (_gap_write_par if par else _gap_write)(m, lead, offsets, out)
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
    _, _, total, _, kept = _gap_plan(m)
    return MaskCodingCost(n=int(m.size), kept=kept, bitmask=(m.size + 7) // 8, gap=total)


@jit()
def _count_block(m, lo, hi):
    c = 0
    mm = m[lo:hi]
    for j in range(mm.shape[0]):
        c += 1 if mm[j] else 0
    return c


@jit()
def _mask_count(m, cnt):
    n = m.shape[0]
    for b in range(cnt.shape[0]):
        lo = b * _BLOCK
        cnt[b] = _count_block(m, lo, min(lo + _BLOCK, n))


@jit(parallel=True)
def _mask_count_par(m, cnt):
    n = m.shape[0]
    for b in prange(cnt.shape[0]):
        lo = b * _BLOCK
        cnt[b] = _count_block(m, lo, min(lo + _BLOCK, n))


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


@jit()
def _compact(cd, m, offsets, cnt, kbits, kmax, sym, bad):
    n = m.shape[0]
    tmp = np.empty(_BLOCK, np.uint8)
    for b in range(offsets.shape[0]):
        lo = b * _BLOCK
        bad[b] = _compact_block(cd, m, lo, min(lo + _BLOCK, n), offsets[b], cnt[b], kbits,
                                kmax, sym, tmp)


@jit(parallel=True)
def _compact_par(cd, m, offsets, cnt, kbits, kmax, sym, bad):
    n = m.shape[0]
    for b in prange(offsets.shape[0]):
        lo = b * _BLOCK
        tmp = np.empty(_BLOCK, np.uint8)
        bad[b] = _compact_block(cd, m, lo, min(lo + _BLOCK, n), offsets[b], cnt[b], kbits,
                                kmax, sym, tmp)


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


@jit()
def _scatter(sym, m, cd, offsets, lut):
    n = m.shape[0]
    for b in range(offsets.shape[0]):
        lo = b * _BLOCK
        _scatter_block(sym, m, cd, lo, min(lo + _BLOCK, n), offsets[b], lut)


@jit(parallel=True)
def _scatter_par(sym, m, cd, offsets, lut):
    n = m.shape[0]
    for b in prange(offsets.shape[0]):
        lo = b * _BLOCK
        _scatter_block(sym, m, cd, lo, min(lo + _BLOCK, n), offsets[b], lut)


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
