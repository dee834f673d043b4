"""Straight-through backward of the fake-quant, and the clip mask of its clipped variant."""
from __future__ import annotations

import numpy as np

from .._jit import jit, prange, twins
from .._check import _check_bool, _check_float, _fn
from ._common import _bounds, _BLOCK, _finish, _target, _use_parallel
from .quantize import _quant_args


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


def _ste(g, m, cl, o, use_clip):
    n = g.shape[0]
    nb = (n + _BLOCK - 1) // _BLOCK
    for b in prange(nb):
        lo, hi = _bounds(b, n)
        _ste_block(g, m, cl, o, lo, hi, use_clip)


_ste, _ste_par = twins(_ste)


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


def _clip_mask(x, m, o, grid, scale, threshold, step, kmax):
    for c in prange(x.shape[0]):
        _clip_row(x[c], m[c], o[c], grid, scale[c], threshold[c], step, kmax)


_clip_mask, _clip_mask_par = twins(_clip_mask)


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
