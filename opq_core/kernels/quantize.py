"""Fused prune + fake-quant of the offset and symmetric grids, and its inverse (dequantize)."""
from __future__ import annotations

import numpy as np

from .._jit import jit, prange, twins
from .._check import _check_bits, _check_bool, _check_channels, _check_codes, _check_grid, _check_step, _check_weight, _fn
from ._common import _finish, _index, _rows, _target, _use_parallel

_OFFSET = 0
_SYMMETRIC = 1


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
def _level(kf, grid, s, theta, step, sd):
    """The magnitude of level ``kf`` (a float index, 1..K) of one channel's grid."""
    if grid == 0:
        return theta + s * ((kf - 0.5) * step)
    return kf * sd


@jit()
def _fq_row(x, m, o, cd, want_codes, grid, s, theta, step, kmax):
    """One output channel; returns the number of kept NaN weights."""
    sd = s * step
    bad = 0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        if grid == 0:
            kf = np.floor((abs(v) - theta) / sd) + 1.0
        else:
            kf = np.rint(abs(v) / sd)
        if kf > kmax:
            kf = kmax
        if not kf >= 1.0:
            kf = 1.0
        level = _level(kf, grid, s, theta, step, sd)
        keep = m[j]
        pos = v >= 0.0
        val = level if pos else -level
        o[j] = val if keep else 0.0
        if want_codes:
            k = np.int64(kf)
            cd[j] = (k if pos else -k) if keep else 0
        bad += 1 if (keep and v != v) else 0
    return bad


def _fake_quant(x, m, o, cd, want_codes, grid, scale, threshold, step, kmax, bad):
    for c in prange(x.shape[0]):
        cdc = cd[c] if want_codes else cd[0]
        bad[c] = _fq_row(x[c], m[c], o[c], cdc, want_codes, grid, scale[c], threshold[c], step, kmax)


_fake_quant, _fake_quant_par = twins(_fake_quant)


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
    for j in range(cd.shape[0]):
        ci = np.int64(cd[j])
        kf = np.float64(abs(ci))
        level = _level(kf, grid, s, theta, step, sd)
        val = level if ci > 0 else -level
        o[j] = val if ci != 0 else 0.0
        bad += 1 if kf > kmax else 0
    return bad


def _dequantize(cd, o, grid, scale, threshold, step, kmax, bad):
    for c in prange(cd.shape[0]):
        bad[c] = _deq_row(cd[c], o[c], grid, scale[c], threshold[c], step, kmax)


_dequantize, _dequantize_par = twins(_dequantize)


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
