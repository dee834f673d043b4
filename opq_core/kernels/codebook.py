"""Non-uniform (codebook) quantizer of ANNC layers: nearest-centroid fake-quant and codes.

A codebook layer stores a sorted vector of ``K <= 256`` non-zero centroids
``c_0 < c_1 < ... < c_{K-1}`` (float64 values exactly representable in float32) in units of
the per-output-channel scales ``s_r > 0`` (all ones, i.e. absolute units, for ANNC layers;
the channel scales for an OPQ plan's ``grid="codebook"``) and a mask. A kept weight takes
the nearest centroid of its channel, decided by the float64 midpoints of neighbouring
centroids; a weight exactly on a midpoint takes the lower centroid:

.. math::

    m_j = \\frac{c_j + c_{j+1}}{2}, \\qquad
    i(w) = \\#\\{\\, j : m_j < w / s_r \\,\\}, \\qquad
    \\hat w = \\begin{cases} s_r c_{i(w)} & \\text{kept} \\\\ 0 & \\text{pruned,} \\end{cases}

``w / s_r`` and ``s_r c_i`` in float64, the product rounded once to the weight's dtype
(with ``s_r = 1`` both are exact: the absolute-unit rule).

The code of a kept weight is ``1 + i(w)`` (``int16``), ``0`` means pruned; on disk the
``bits``-bit symbol is ``i(w)``. The torch adapter implements the same rule
(``torch.bucketize(w.double() / s, m)``) and matches bit for bit.

Layers as in :mod:`opq_core.kernels`: private Numba kernels (no validation, write into
``out``), public NumPy functions that validate and allocate.
"""
from __future__ import annotations

import numpy as np

from .._check import _check_layer_mask as _check_mask, _check_layer_weight as _check_weight, _where
from .._jit import jit, prange, twins
from ._common import _finish, _index, _target, _use_parallel

__all__ = ["check_codebook", "check_codebook_scale", "midpoints", "fake_quant_codebook", "codebook_codes",
           "dequantize_codebook", "CODE_DTYPE", "MAX_CENTROIDS"]

#: dtype of codebook codes (``1 + index``; up to 256).
CODE_DTYPE = np.int16
#: At most ``2**8`` non-zero centroids (8 bits per kept weight).
MAX_CENTROIDS = 256


def check_codebook(codebook, *, fn="check_codebook", name=None) -> np.ndarray:
    """Validate a codebook; returns it as a contiguous float64 vector.

    It must be a 1-D real array of 1..256 finite, non-zero, strictly increasing values.

    >>> check_codebook([-0.5, 0.25]).tolist()
    [-0.5, 0.25]
    """
    try:
        c = np.asarray(codebook)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise TypeError(f"{fn}: codebook{_where(name)} cannot be read as an array ({exc})") from None
    if c.dtype.kind not in "fiu" or c.dtype == np.bool_:
        raise TypeError(f"{fn}: codebook{_where(name)} must be a real array, got dtype {c.dtype}")
    c = c.astype(np.float64)
    if c.ndim != 1 or not (1 <= c.size <= MAX_CENTROIDS):
        raise ValueError(f"{fn}: codebook{_where(name)} must be a 1-D array of 1..{MAX_CENTROIDS} "
                         f"centroids, got shape {c.shape}")
    bad = ~np.isfinite(c) | (c == 0.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{fn}: codebook{_where(name)}[{i}] = {c[i]!r} must be finite and "
                         f"non-zero (0 is reserved for pruned weights)")
    if c.size > 1 and not np.all(c[1:] > c[:-1]):
        i = int(np.flatnonzero(~(c[1:] > c[:-1]))[0])
        raise ValueError(f"{fn}: codebook{_where(name)} must be strictly increasing, got "
                         f"codebook[{i}] = {c[i]!r} >= codebook[{i + 1}] = {c[i + 1]!r}")
    return np.ascontiguousarray(c)


def check_codebook_scale(scale, channels, *, fn="check_codebook_scale", name=None):
    """Validate per-channel codebook scales (``None``: all ones); returns float64 (channels,).

    >>> check_codebook_scale(None, 2).tolist(), check_codebook_scale([0.5], 1).tolist()
    ([1.0, 1.0], [0.5])
    """
    if scale is None:
        return np.ones(channels)
    s = np.asarray(scale)
    if s.dtype.kind not in "fiu" or s.dtype == np.bool_:
        raise TypeError(f"{fn}: scale{_where(name)} must be a real array, got dtype {s.dtype}")
    s = np.ascontiguousarray(s, dtype=np.float64)
    if s.shape != (channels,):
        raise ValueError(f"{fn}: scale{_where(name)} must have one value per output channel "
                         f"({channels}), got shape {s.shape}")
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{fn}: scale{_where(name)}[{i}] = {float(s[i])!r} must be finite and > 0")
    return s


def midpoints(codebook) -> np.ndarray:
    """The ``K - 1`` float64 decision boundaries ``(c_j + c_{j+1}) / 2``."""
    c = np.asarray(codebook, dtype=np.float64)
    return (c[:-1] + c[1:]) / 2.0


@jit()
def _count_less(mid, v):
    # number of midpoints strictly less than v (binary search; mid is increasing)
    lo = 0
    hi = mid.shape[0]
    while lo < hi:
        h = (lo + hi) >> 1
        if mid[h] < v:
            lo = h + 1
        else:
            hi = h
    return lo


@jit()
def _cb_row(x, m, o, cd, want_codes, mid, cent, s):
    bad = 0
    for j in range(x.shape[0]):
        if m[j]:
            v = np.float64(x[j])
            if not np.isfinite(v):
                bad += 1
                o[j] = 0.0
                if want_codes:
                    cd[j] = 0
                continue
            i = _count_less(mid, v / s)
            o[j] = s * cent[i]
            if want_codes:
                cd[j] = i + 1
        else:
            o[j] = 0.0
            if want_codes:
                cd[j] = 0
    return bad


def _fake_quant_cb(x, m, o, cd, want_codes, mid, cent, scale, bad):
    for c in prange(x.shape[0]):
        cdc = cd[c] if want_codes else cd[0]
        bad[c] = _cb_row(x[c], m[c], o[c], cdc, want_codes, mid, cent, scale[c])


_fake_quant_cb, _fake_quant_cb_par = twins(_fake_quant_cb)


def _run(fn, w, mask, codebook, out, codes, name, scale):
    x = _check_weight(fn, w, name)
    c = int(x.shape[0])
    n = int(x.size // c) if c else 0
    m = _check_mask(fn, mask, x.shape, name)
    cb = check_codebook(codebook, fn=fn, name=name)
    s = check_codebook_scale(scale, c, fn=fn, name=name)
    mid = midpoints(cb)
    cent = cb  # float64: s * c is rounded once to the weight dtype
    o, o_user = _target(fn, "out", out, x.shape, x.dtype, (x, m), inplace_ok=x)
    want = codes is not None
    if want:
        if not isinstance(codes, np.ndarray):
            raise TypeError(f"{fn}: codes must be a numpy array, got {type(codes).__name__}")
        if codes.dtype != CODE_DTYPE:
            raise TypeError(f"{fn}: codes must have dtype int16, got {codes.dtype}")
        cd, cd_user = _target(fn, "codes", codes, x.shape, codes.dtype, ())
        if cd_user is None and any(np.may_share_memory(codes, a) for a in (x, m, o)):
            cd, cd_user = np.empty(x.shape, CODE_DTYPE), codes
        cd2 = cd.reshape(c, n)
    else:
        cd, cd_user = None, None
        cd2 = np.empty((1, 0), dtype=CODE_DTYPE)
    bad = np.zeros(c, dtype=np.int64)
    kern = _fake_quant_cb_par if _use_parallel(x.size) else _fake_quant_cb
    if x.size:
        kern(x.reshape(c, n), m.reshape(c, n), o.reshape(c, n), cd2, want, mid, cent, s, bad)
    if bad.any():
        flat = np.flatnonzero(~np.isfinite(x.reshape(-1)) & m.reshape(-1))
        i = int(flat[0])
        raise ValueError(f"{fn}: w{_where(name)} has a non-finite kept weight "
                         f"{x.reshape(-1)[i]!r} at index {_index(x.shape, i)}")
    if want:
        _finish(cd, cd_user)
    return _finish(o, o_user)


def fake_quant_codebook(w, mask, codebook, *, scale=None, out=None, codes=None, name=None):
    r"""Prune and quantize a weight tensor to a non-uniform codebook.

    .. math::

        m_j = (c_j + c_{j+1}) / 2 \text{ (float64)},\quad
        i = \#\{j : m_j < \operatorname{float64}(w)\},\quad
        \hat w = \operatorname{dtype}(c_i) \text{ if kept else } 0.

    Parameters
    ----------
    w : ndarray, float32 or float64, ndim >= 1
        Weights (output channels first).
    mask : bool ndarray, same shape
        True = kept.
    codebook : array_like (K,)
        Sorted non-zero centroids, ``1 <= K <= 256`` (see :func:`check_codebook`), in units
        of ``scale``.
    scale : array_like (channels,), optional
        Per-output-channel scales ``s_r > 0`` (default: ones, absolute units).
    out : ndarray, optional
        Receives ``w_hat`` (same shape and dtype as ``w``; may be ``w`` itself).
    codes : int16 ndarray, optional
        Receives the codes ``1 + i`` (``0`` = pruned).
    name : str, optional
        Layer name used in error messages.

    Returns
    -------
    ndarray
        ``w_hat``, same shape and dtype as ``w``.

    Raises
    ------
    ValueError
        A kept weight is NaN or infinite, or the codebook is malformed.

    Examples
    --------
    >>> w = np.array([[0.3, -1.0, 0.05, 0.0]], dtype=np.float32)
    >>> m = np.array([[True, True, False, True]])
    >>> cd = np.zeros(w.shape, np.int16)
    >>> fake_quant_codebook(w, m, [-0.75, 0.25, 0.5], codes=cd).tolist()
    [[0.25, -0.75, 0.0, 0.25]]
    >>> cd.tolist()
    [[2, 1, 0, 2]]
    >>> fake_quant_codebook(w, m, [-0.75, 0.25, 0.5], scale=[2.0]).tolist()
    [[0.5, -1.5, 0.0, 0.5]]
    """
    return _run("fake_quant_codebook", w, mask, codebook, out, codes, name, scale)


def codebook_codes(w, mask, codebook, *, scale=None, name=None) -> np.ndarray:
    """Codes (``int16``, ``1 + index``, ``0`` = pruned) of :func:`fake_quant_codebook`.

    >>> codebook_codes(np.array([0.1, -2.0]), np.array([True, True]), [-1.0, 1.0]).tolist()
    [2, 1]
    """
    x = np.asarray(w)
    codes = np.zeros(x.shape, dtype=CODE_DTYPE)
    _run("codebook_codes", w, mask, codebook, None, codes, name, scale)
    return codes


@jit()
def _deq_cb_rows(cd, o, cent, k, scale):
    bad = -1
    n = cd.shape[1]
    for r in range(cd.shape[0]):
        s = scale[r]
        for j in range(n):
            v = cd[r, j]
            if v == 0:
                o[r, j] = 0.0
            elif v >= 1 and v <= k:
                o[r, j] = s * cent[v - 1]
            else:
                o[r, j] = 0.0
                if bad < 0:
                    bad = r * n + j
    return bad


def dequantize_codebook(codes, codebook, dtype=np.float32, *, scale=None,
                        name=None) -> np.ndarray:
    """Weights from codes: ``0 -> 0.0``, ``k -> s_r * codebook[k - 1]`` (float64) cast to
    ``dtype``; ``scale`` as in :func:`fake_quant_codebook` (default ones).

    >>> dequantize_codebook(np.array([0, 1, 2], np.int16), [-0.5, 0.25]).tolist()
    [0.0, -0.5, 0.25]
    >>> dequantize_codebook(np.array([[1, 2]], np.int16), [-0.5, 0.25], scale=[4.0]).tolist()
    [[-2.0, 1.0]]
    """
    fn = "dequantize_codebook"
    cd = np.asarray(codes)
    if cd.dtype.kind not in "iu" or cd.dtype == np.bool_:
        raise TypeError(f"{fn}: codes{_where(name)} must be an integer array, got dtype {cd.dtype}")
    dt = np.dtype(dtype)
    if dt not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{fn}: dtype must be float16/float32/float64, got {dt}")
    cb = check_codebook(codebook, fn=fn, name=name)
    if scale is None:
        s = np.ones(1)
    else:
        if cd.ndim < 1:
            raise ValueError(f"{fn}: codes{_where(name)} must have ndim >= 1 with a scale")
        s = check_codebook_scale(scale, int(cd.shape[0]), fn=fn, name=name)
    rows = np.ascontiguousarray(cd).astype(np.int64).reshape(s.size, -1) if cd.size \
        else np.zeros((1, 0), np.int64)
    flat = rows.reshape(-1)
    o = np.empty(rows.shape, dtype=np.float64)
    if flat.size:
        bad = _deq_cb_rows(rows, o, cb, np.int64(cb.size), s)
        if bad >= 0:
            raise ValueError(f"{fn}: codes{_where(name)}[{_index(cd.shape, bad)}] = "
                             f"{int(flat[bad])} is outside 0..{cb.size} (codebook of "
                             f"{cb.size} centroids)")
    return o.astype(dt, copy=False).reshape(cd.shape)
