"""The one place that configures Numba for opq.

- ``fastmath`` stays off everywhere a value is rounded (an FMA can flip a .5 rounding).
- ``parallel`` kernels use ``prange`` only over independent rows (output channels).
- On-disk caching of compiled kernels is opt-in: set ``OPQ_NUMBA_CACHE=1``.
- ``NUMBA_DISABLE_JIT=1`` runs every kernel as plain Python (the test-suite does both).
"""
from __future__ import annotations

import os

import numba

CACHE = os.environ.get("OPQ_NUMBA_CACHE", "0").strip().lower() not in ("", "0", "false", "no")
JIT_DISABLED = bool(int(os.environ.get("NUMBA_DISABLE_JIT", "0") or "0"))

#: Tensors with fewer elements than this use the serial kernels.
PARALLEL_MIN_SIZE = 1 << 16

prange = numba.prange


def jit(*, parallel: bool = False, fastmath: bool = False):
    """Decorator: ``numba.njit`` with the project's settings."""
    return numba.njit(cache=CACHE, parallel=parallel, fastmath=fastmath, nogil=True)


def threading_layer_is_safe() -> bool:
    """True when the parallel kernels may be called from several Python threads at once.

    Numba's ``workqueue`` layer is not thread-safe; ``tbb`` and ``omp`` are. Until a
    parallel kernel has run, the layer is unknown and we answer False (use serial kernels
    from non-main threads).
    """
    try:
        layer = numba.threading_layer()
    except ValueError:
        return False
    return layer in ("tbb", "omp")
