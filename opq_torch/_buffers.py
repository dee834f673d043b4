"""Reusable output buffers of the CPU kernels called from autograd.

A fresh 100 MB output costs more than the kernel that fills it: the allocator maps new
pages for every large block, and the first write to each page faults (about 5x a copy of
the same bytes on a two-core machine). Training calls the quantizer on the same shapes every
step, so the adapter keeps the NumPy arrays it wrote and hands one out again once nobody
uses it any more.

"Nobody uses it" is decided by the array's reference count: a tensor made by
``torch.from_numpy(a)`` keeps ``a`` alive through its storage, and so does every view, every
tensor autograd saved for the backward pass and a parameter's ``.grad`` that autograd took
over. When only the pool holds ``a``, no tensor can see the buffer, and writing into it is
safe. Small tensors (below :data:`MIN_NUMEL`) come from the allocator's free lists cheaply and
are not pooled.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

#: Tensors with fewer elements are allocated fresh.
MIN_NUMEL = 1 << 16

#: Most buffers kept per (shape, dtype); more live outputs of one shape are allocated fresh.
PER_KEY = 4

_local = threading.local()


def _pool() -> dict:
    p = getattr(_local, "pool", None)
    if p is None:
        p = _local.pool = {}
    return p


def _refs(a) -> int:
    return sys.getrefcount(a)


def take(shape, dtype) -> np.ndarray:
    """A C-contiguous array of ``shape``/``dtype`` that no live tensor shares.

    The caller fills it completely and wraps it with ``torch.from_numpy``.
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    n = 1
    for s in shape:
        n *= s
    if n < MIN_NUMEL:
        return np.empty(shape, dtype=dtype)
    entries = _pool().setdefault((shape, dtype.str), [])
    for e in entries:
        if _refs(e[0]) <= e[1]:
            return e[0]
    if len(entries) >= PER_KEY:
        return np.empty(shape, dtype=dtype)
    entry = [np.empty(shape, dtype=dtype), 0]
    entries.append(entry)
    entry[1] = _refs(entry[0])  # the pool's own references, counted as in the loop above
    return entry[0]


def clear() -> None:
    """Release the buffers of this thread (they are freed once no tensor uses them)."""
    _pool().clear()


def pooled_bytes() -> int:
    """Bytes held by this thread's pool (in use or free)."""
    return sum(e[0].nbytes for entries in _pool().values() for e in entries)
