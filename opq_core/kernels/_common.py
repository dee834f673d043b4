"""What every kernel module shares: parallel dispatch, output buffers, error labels."""
from __future__ import annotations

import threading

import numpy as np

from .._jit import PARALLEL_MIN_SIZE, jit, threading_layer_is_safe

#: Block length of the flat (1-D) parallel kernels.
_BLOCK = 1 << 15


@jit()
def _bounds(b, n):
    """``[lo, hi)`` of block ``b`` of a flat array of ``n`` entries."""
    lo = b * _BLOCK
    return lo, min(lo + _BLOCK, n)


def _use_parallel(n: int) -> bool:
    """Parallel kernels for big arrays, from the main thread or a thread-safe layer."""
    if n < PARALLEL_MIN_SIZE:
        return False
    if threading.current_thread() is threading.main_thread():
        return True
    return threading_layer_is_safe()


def _rows(shape):
    """(C, M) of a tensor viewed as (output channels, fan-in)."""
    c = int(shape[0])
    m = 1
    for d in shape[1:]:
        m *= int(d)
    return c, m


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
