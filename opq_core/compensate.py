r"""Error compensation: update a layer's kept weights so that its *output* error is small,
on the plan's fixed masks and grid (Optimal Brain Surgeon column updates, as GPTQ and
SparseGPT do).

The output error of a layer with weights :math:`W` (``C x n``, a convolution unfolded to
``n = C_in k_h k_w`` columns) and inputs :math:`x` with second moment
:math:`H = E[x x^\top]` is

.. math::

    E(\hat W) = E\,\lVert (W - \hat W) x \rVert^2 = \operatorname{tr}\big((W - \hat W) H
        (W - \hat W)^\top\big).

Columns are quantized one at a time (mask and grid of the plan, unchanged); after column
:math:`j` is rounded, the error it leaves is spread over the columns not yet quantized,

.. math::

    \delta = \frac{w_{:j} - \hat w_{:j}}{U_{jj}}, \qquad
    w_{:k} \leftarrow w_{:k} - \delta\, U_{jk} \quad (k > j),

with :math:`U` the upper Cholesky factor of :math:`(H + \epsilon I)^{-1}`, which is the
OBS-optimal update of the remaining weights. Blocks of ``block`` columns are updated lazily
(one matrix product per block), in float64.

Damping: :math:`\epsilon = \text{damp} \cdot \operatorname{mean}(\operatorname{diag} H)`
(``damp = 0.1`` by default: GPTQ uses 0.01, but the masks here are fixed by the plan rather
than chosen by OBS, and the larger damping measured better on pruned layers); inputs that
are always zero (``H_jj = 0``) get ``H_jj = 1``. If the result had a larger undamped output
error than the plain plan (possible with very little calibration data), the layer's weights
are returned unchanged.

The plan (masks, bits, scales, thresholds, steps, codebooks) is not touched: the returned
latent weights quantize, under the same plan and mask, to the compensated weights, and the
written file has the same size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._plan import apply_layer, compute_dtype
from .kernels.codebook import fake_quant_codebook

__all__ = ["Compensation", "compensate_layer", "output_error"]


@dataclass(frozen=True, repr=False)
class Compensation:
    """Result of :func:`compensate_layer`.

    Attributes
    ----------
    weight : the new latent weights (shape and dtype of the input).
    error_before, error_after : output error ``tr(dW H dW^T)`` (undamped ``H``) of the plan
        on the original and on the new weights.
    used : False when the update did not lower the error and ``weight`` is the input.
    """

    weight: np.ndarray
    error_before: float
    error_after: float
    used: bool

    def __repr__(self):
        return (f"Compensation(error_before={self.error_before:.6g}, "
                f"error_after={self.error_after:.6g}, used={self.used})")


def output_error(w, w_hat, hessian) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` in float64 (``W`` flattened to ``C x n``)."""
    c = np.shape(w)[0]
    d = (np.asarray(w, np.float64).reshape(c, -1)
         - np.asarray(w_hat, np.float64).reshape(c, -1))
    return float(np.einsum("ij,jk,ik->", d, np.asarray(hessian, np.float64), d))


def _quantize_column(col, keep, s, theta, step, bits, grid):
    """The fake-quant of one column, vectorized over channels (the formula of
    :func:`opq_core.kernels.fake_quant`, float64, same order of operations)."""
    v = col.astype(np.float64)
    a = np.abs(v)
    kmax = float(1 << (bits - 1))
    sd = s * step
    with np.errstate(invalid="ignore"):
        if grid == "offset":
            kf = np.floor((a - theta) / sd) + 1.0
            kf = np.where(kf > kmax, kmax, kf)
            kf = np.where(kf >= 1.0, kf, 1.0)
            level = theta + s * ((kf - 0.5) * step)
        else:
            kf = np.rint(a / sd)
            kf = np.where(kf > kmax, kmax, kf)
            kf = np.where(kf >= 1.0, kf, 1.0)
            level = kf * sd
    return np.where(keep, np.where(v >= 0.0, level, -level), 0.0)


def _check(lp, w, hessian, mask, damp, block):
    w = np.asarray(w)
    if w.dtype.kind != "f":
        raise TypeError(f"compensate_layer: layer {lp.name!r}: weights must be float, got {w.dtype}")
    if tuple(w.shape) != tuple(lp.shape):
        raise ValueError(f"compensate_layer: layer {lp.name!r}: weight shape {tuple(w.shape)} "
                         f"does not match the plan's {tuple(lp.shape)}")
    n = int(np.prod(w.shape[1:])) if w.ndim > 1 else 1
    H = np.asarray(hessian, dtype=np.float64)
    if H.shape != (n, n):
        raise ValueError(f"compensate_layer: layer {lp.name!r}: hessian must be {n} x {n} "
                         f"(the unfolded input width), got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError(f"compensate_layer: layer {lp.name!r}: hessian has NaN or inf entries")
    m = np.asarray(mask)
    if m.dtype != np.bool_ or tuple(m.shape) != tuple(lp.shape):
        raise ValueError(f"compensate_layer: layer {lp.name!r}: mask must be a bool array of "
                         f"shape {tuple(lp.shape)}, got {m.dtype} {tuple(m.shape)}")
    if int(np.count_nonzero(m)) != lp.kept:
        raise ValueError(f"compensate_layer: layer {lp.name!r}: mask keeps "
                         f"{int(np.count_nonzero(m))} weights, the plan keeps {lp.kept}")
    if isinstance(damp, bool) or not (isinstance(damp, (int, float, np.floating)) and damp >= 0
                                      and np.isfinite(damp)):
        raise ValueError(f"compensate_layer: damp must be a finite number >= 0, got {damp!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"compensate_layer: block must be an integer >= 1, got {block!r}")
    return w, H, m


def compensate_layer(layer, w, hessian, mask, *, damp: float = 0.1,
                     block: int = 128) -> Compensation:
    r"""OBS / GPTQ-style compensation of one planned layer on its fixed mask and grid.

    Parameters
    ----------
    layer : LayerPlan
        The layer's plan (bits, grid, scales, thresholds, step or codebook): not changed.
    w : ndarray, the layer's shape
        Latent weights the plan was made from.
    hessian : ndarray (n, n)
        :math:`H = E[x x^\top]` of the layer's (unfolded) inputs, ``n = prod(shape[1:])``
        in the order of ``w.reshape(C, -1)`` (a convolution: ``C_in, k_h, k_w``).
    mask : bool ndarray, the layer's shape
        The realized mask (True = kept), e.g. ``plan.masks(weights)[name]``.
    damp : float
        Relative damping: :math:`H + \text{damp} \cdot \operatorname{mean}(\operatorname{diag}
        H)\, I`.
    block : int
        Columns per lazy block update.

    Returns
    -------
    Compensation
        ``weight``: latent weights with ``apply_layer(layer, weight, mask)`` the compensated
        fake-quant weights (same mask, same grid), and the output errors before and after.

    Examples
    --------
    >>> import opq_core
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(512, 16)) @ rng.normal(size=(16, 16))  # correlated inputs
    >>> w = {"fc": rng.normal(size=(8, 16))}
    >>> p = opq_core.plan(w, sparsity=0.5, bits=3)
    >>> m = p.masks(w)["fc"]
    >>> r = compensate_layer(p["fc"], w["fc"], x.T @ x / len(x), m)
    >>> r.used and r.error_after < r.error_before
    True
    >>> bool(np.array_equal(apply_layer(p["fc"], r.weight, m) != 0, m))
    True
    """
    lp = layer
    w, H, m = _check(lp, w, hessian, mask, damp, block)
    C = int(w.shape[0])
    W0 = w.reshape(C, -1)
    M = m.reshape(C, -1)
    n = W0.shape[1]
    dt = compute_dtype(w.dtype)
    base = apply_layer(lp, w, mask=m).reshape(C, -1)
    err0 = output_error(W0, base, H)
    if lp.kept == 0 or err0 == 0.0:
        return Compensation(w.copy(), err0, err0, False)

    Hd = H.copy()
    diag = np.diag(Hd).copy()
    dead = diag <= 0
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    Hd[dead, dead] = 1.0
    eps = float(damp) * float(np.mean(np.diag(Hd)))
    Hd[np.diag_indices(n)] += eps
    try:
        L = np.linalg.cholesky(Hd)
    except np.linalg.LinAlgError:
        return Compensation(w.copy(), err0, err0, False)
    Linv = np.linalg.solve(L, np.eye(n))          # L^-1, so Hd^-1 = L^-T L^-1
    Hinv = Linv.T @ Linv
    Hinv = 0.5 * (Hinv + Hinv.T)
    try:
        U = np.linalg.cholesky(Hinv).T           # upper: Hinv = U^T U
    except np.linalg.LinAlgError:
        return Compensation(w.copy(), err0, err0, False)

    Wk = W0.astype(np.float64).copy()
    latent = np.empty((C, n), dtype=dt)
    scale = lp.kernel_scale
    theta = lp.thresholds if lp.grid != "codebook" else None
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        W1 = Wk[:, i1:i2]
        E1 = np.zeros((C, i2 - i1))
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = W1[:, j].astype(dt)  # what the plan will read back
            mcol = M[:, i1 + j:i1 + j + 1]
            if lp.grid == "codebook":
                q = fake_quant_codebook(col[:, None], mcol, lp.codebook, scale=scale)[:, 0]
            else:
                q = _quantize_column(col, mcol[:, 0], scale, theta, lp.step, lp.bits, lp.grid)
            latent[:, i1 + j] = col
            e = (col.astype(np.float64) - q.astype(np.float64)) / U1[j, j]
            W1[:, j:] -= e[:, None] * U1[j, j:][None, :]
            E1[:, j] = e
        if i2 < n:
            Wk[:, i2:] -= E1 @ U[i1:i2, i2:]
    new = latent.reshape(w.shape).astype(w.dtype, copy=False)
    err1 = output_error(W0, apply_layer(lp, new, mask=m), H)
    if not err1 < err0:
        return Compensation(w.copy(), err0, err1, False)
    return Compensation(new, err0, err1, True)
