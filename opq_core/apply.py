"""Deprecated import path: applying a plan lives in :mod:`opq_core._plan`."""
from ._plan import apply_layer, compute_dtype, layer_mask, layer_mask_from  # noqa: F401

__all__ = ["layer_mask", "layer_mask_from", "apply_layer", "compute_dtype"]
