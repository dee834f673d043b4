"""Applying a plan: realized masks and dequantized (fake-quant) weights of one layer."""
from __future__ import annotations

import numpy as np


__all__ = ["layer_mask", "layer_mask_from", "apply_layer", "compute_dtype"]


def compute_dtype(dtype) -> np.dtype:
    """The float dtype the kernels compute a layer in: float32/float64 as given, float16
    (and anything else) in float32; results are cast back to the layer's dtype."""
    dt = np.dtype(dtype)
    return dt if dt in (np.float32, np.float64) else np.dtype(np.float32)


def layer_mask_from(score: np.ndarray, lam: float, kept: int, name: str = "?") -> np.ndarray:
    """Flat mask keeping every score > lam, then the first (flat order) ties == lam up
    to exactly ``kept`` kept entries (the kernel :func:`opq_core.kernels.mask_from_scores`)."""
    from .kernels import mask_from_scores
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    try:
        return mask_from_scores(score, lam, kept)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc} (weights differ from the planned ones?)") from None


def layer_mask(lp, w) -> np.ndarray:
    """The realized boolean mask (shape of the layer) of plan layer ``lp``."""
    from .allocate import score_layer
    score = score_layer(w, lp.score_q, lp.channel_scale)
    return layer_mask_from(score, lp.lam, lp.kept, lp.name).reshape(lp.shape)


def apply_layer(lp, w, mask=None) -> np.ndarray:
    """Dequantized weights of one layer (same dtype as ``w``)."""
    from .kernels import fake_quant
    w = np.asarray(w)
    if mask is None:
        if lp.grid == "codebook":
            raise ValueError(f"layer {lp.name!r}: a codebook (ANNC) layer needs its stored mask; "
                             "pass masks=")
        mask = layer_mask(lp, w)
    dtype = compute_dtype(w.dtype)
    if lp.grid == "codebook":
        from .codebook import fake_quant_codebook
        out = fake_quant_codebook(w.astype(dtype, copy=False), np.asarray(mask, dtype=bool),
                                  lp.codebook)
        return out.astype(w.dtype, copy=False)
    out = fake_quant(w.astype(dtype, copy=False), np.asarray(mask, dtype=bool), lp.kernel_scale,
                     lp.thresholds, lp.step, lp.bits, lp.grid, layer=lp.name)
    return out.astype(w.dtype, copy=False)
