"""JIT kernels by family: fused prune + fake-quant (:mod:`.quantize`), straight-through backward
(:mod:`.ste`), mask realization (:mod:`.masks`), packing (:mod:`.pack`, :mod:`.index`), the
codebook quantizer (:mod:`.codebook`).

Every op comes in two layers (see docs/model.md, house style):

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
"""
from __future__ import annotations

from .._check import GRIDS
from .index import MaskCodingCost, gap_decode, gap_encode, mask_coding_cost, pack_mask, unpack_mask
from .masks import (mask_from_scores, mask_from_threshold, scores, select_smallest,
                    topk_mask_by_magnitude)
from .pack import (codes_to_symbols, pack_bits, pack_codes, symbols_to_codes, unpack_bits,
                   unpack_codes)
from .quantize import code_dtype, dequantize, fake_quant
from .ste import clip_mask, ste_backward

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
