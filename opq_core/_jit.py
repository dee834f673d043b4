"""The one place that configures Numba for opq.

- ``fastmath`` stays off everywhere a value is rounded (an FMA can flip a .5 rounding).
- ``parallel`` kernels use ``prange`` only over independent rows (output channels) or
  fixed-size blocks of a flat array.
- ``NUMBA_DISABLE_JIT=1`` runs every kernel as plain Python (the test-suite does both).

Compile time and the on-disk cache
----------------------------------
Each kernel compiles on its first call with a new argument type (dtype, code dtype,
serial or parallel variant): about 0.5-3 s each, some 30-40 s of CPU for every variant the
test-suite touches. :func:`compile_timer` measures it apart from the run time
(``benchmarks/bench_kernels.py`` reports it per kernel).

Set ``OPQ_NUMBA_CACHE=1`` to keep compiled kernels on disk between processes (Numba's
``cache=True``); they go to ``__pycache__`` next to the sources, or under
``NUMBA_CACHE_DIR`` when that is set (use it when the package folder is read-only). A
process that finds them loads a kernel in milliseconds instead of compiling it. The cache
is off by default because a stale or shared cache folder is a classic source of confusion.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numba


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


# Threading layer. Numba's "omp" layer shares the OpenMP runtime's thread-count setting
# with PyTorch: every parallel launch resets it, so a process that called
# torch.set_num_threads(k) silently trains with Numba's thread count after the first kernel.
# Unless the user chose a layer, prefer tbb (when installed), then Numba's own workqueue.
if "NUMBA_THREADING_LAYER" not in os.environ and \
        "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]

CACHE = _env_flag("OPQ_NUMBA_CACHE")
JIT_DISABLED = _env_flag("NUMBA_DISABLE_JIT")

#: Tensors with fewer elements than this use the serial kernels.
PARALLEL_MIN_SIZE = 1 << 16

prange = numba.prange


def jit(*, parallel: bool = False, fastmath: bool = False):
    """Decorator: ``numba.njit`` with the project's settings (cache opt-in, nogil)."""
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


@dataclass(frozen=True)
class CompileRecord:
    """One compilation: the kernel's name, its argument types, and seconds spent on it
    (``seconds`` excludes kernels it called that compiled meanwhile, ``inclusive`` not)."""

    name: str
    signature: str
    seconds: float
    inclusive: float

    def __repr__(self):
        return f"CompileRecord({self.name}, {self.seconds:.3f} s, inclusive {self.inclusive:.3f} s)"


@contextlib.contextmanager
def compile_timer():
    """Record every Numba compilation inside the ``with`` block.

    Yields a list that is filled with :class:`CompileRecord` on exit (empty when the
    kernels came from the disk cache or the JIT is disabled).

    >>> with compile_timer() as log:
    ...     pass
    >>> log
    []
    """
    from numba.core import event

    records: list = []
    with event.install_recorder("numba:compile") as rec:
        yield records
    stack = []
    for ts, ev in rec.buffer:
        if ev.is_start:
            stack.append([ts, 0.0])
            continue
        t0, child = stack.pop()
        dur = ts - t0
        if stack:
            stack[-1][1] += dur
        disp = ev.data.get("dispatcher")
        name = getattr(getattr(disp, "py_func", None), "__name__", str(disp))
        records.append(CompileRecord(name, str(ev.data.get("args")), dur - child, dur))


def compile_seconds(records) -> dict:
    """Exclusive compile seconds per kernel name, summed over signatures, largest first."""
    tot: dict = {}
    for r in records:
        tot[r.name] = tot.get(r.name, 0.0) + r.seconds
    return dict(sorted(tot.items(), key=lambda kv: -kv[1]))


def twins(fn):
    """Compile one kernel body twice: a serial copy (``prange`` runs as ``range``) and a
    parallel one. Returns ``(serial, parallel)``.

    The parallel copy is a new function object named ``<name>_par`` (also in its
    ``__qualname__``): Numba's on-disk cache (``OPQ_NUMBA_CACHE=1``) keys entries by the
    function's qualified name and line, not by the ``parallel`` flag, so compiling the very
    same function twice would load the serial machine code for the parallel dispatcher.

    >>> def _add_one(x):
    ...     for i in prange(x.shape[0]):
    ...         x[i] += 1.0
    >>> serial, parallel = twins(_add_one)
    >>> import numpy as np
    >>> a = np.zeros(3); serial(a); parallel(a); a
    array([2., 2., 2.])
    """
    import types
    par = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_par",
                             fn.__defaults__, fn.__closure__)
    par.__qualname__ = fn.__qualname__ + "_par"
    par.__module__ = fn.__module__
    par.__doc__ = fn.__doc__
    return jit()(fn), jit(parallel=True)(par)
