"""Hypothesis strategies and seeded settings profiles shared by the kernel tests.

Profiles (pick one with ``HYPOTHESIS_PROFILE``; the default is ``ci``, or ``nojit`` when
``NUMBA_DISABLE_JIT=1``):

- ``ci``: derandomized (the same examples on every run), modest ``max_examples``;
- ``nojit``: the same with fewer examples, for the plain-Python run of the kernels;
- ``dev``: random and longer, for local bug hunting.

The profiles are registered but not loaded globally: tests take :data:`SETTINGS` (or
:func:`examples`) as a decorator, so other test modules keep their own settings.
"""
from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

JIT_DISABLED = os.environ.get("NUMBA_DISABLE_JIT", "0").strip() not in ("", "0")

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=60, derandomize=True, **_COMMON)
settings.register_profile("nojit", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=500, **_COMMON)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("nojit" if JIT_DISABLED else "ci")
SETTINGS = settings.get_profile(PROFILE)


def examples(n: int):
    """Settings of the active profile with ``n`` examples for ``ci`` (scaled for the others)."""
    factor = {"ci": 1.0, "nojit": 0.34, "dev": 8.0}.get(PROFILE, 1.0)
    return settings(SETTINGS, max_examples=max(3, int(round(n * factor))))


GRIDS = ("offset", "symmetric")
FLOATS = (np.float32, np.float64)


@st.composite
def shapes(draw, max_side: int = 7, max_size: int = 400):
    """Weight shapes, output channels first: 1-D..4-D, one element, depthwise (C, 1, 3, 3)."""
    kind = draw(st.sampled_from(["any", "any", "any", "one", "depthwise", "conv"]))
    if kind == "one":
        return draw(st.sampled_from([(1,), (1, 1), (1, 1, 1, 1)]))
    if kind == "depthwise":
        return (draw(st.integers(1, 8)), 1, 3, 3)
    if kind == "conv":
        return (draw(st.integers(1, 5)), draw(st.integers(1, 4)), 3, 3)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=max_side))
    while int(np.prod(shape)) > max_size:
        shape = shape[:-1] if len(shape) > 1 else (max_size,)
    return tuple(int(d) for d in shape)


def layout(a: np.ndarray, how: str) -> np.ndarray:
    """The same values as ``a`` in another memory layout ("contig", "strided", "fortran")."""
    if how == "contig":
        return np.ascontiguousarray(a)
    if how == "fortran":
        return np.asfortranarray(a)
    base = np.zeros((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
    view = base[::2]
    view[...] = a
    return view


layouts = st.sampled_from(["contig", "strided", "fortran"])


@st.composite
def quant_params(draw, channels: int):
    """(scale, threshold, step, bits, grid): dyadic values (exact boundaries in float32)
    or arbitrary ones."""
    bits = draw(st.integers(1, 8))
    grid = draw(st.sampled_from(GRIDS))
    c = channels
    if draw(st.booleans()):
        step = draw(st.integers(1, 64)) / 32.0
        scale = np.array([draw(st.integers(1, 16)) * 2.0 ** draw(st.integers(-6, 3))
                          for _ in range(min(c, 4))])
        scale = np.resize(scale, c)
        threshold = np.resize(np.array([draw(st.integers(0, 64)) / 32.0
                                        for _ in range(min(c, 4))]), c) * scale
    else:
        step = draw(st.floats(1e-3, 2.0))
        el = st.floats(1e-3, 8.0)
        scale = draw(hnp.arrays(np.float64, (c,), elements=el))
        frac = draw(hnp.arrays(np.float64, (c,), elements=st.floats(0.0, 3.0)))
        threshold = frac * scale
    return scale, threshold, float(step), bits, grid


def boundary_values(rng, scale, threshold, step, bits, grid, shape):
    """Weights of ``shape`` with many entries exactly on rounding boundaries:
    ``theta + s D j`` (offset), ``s D j`` and ``s D (j + 1/2)`` (symmetric), the threshold,
    signed zeros and, rarely, infinities."""
    c = shape[0]
    n = int(np.prod(shape)) // c
    s = scale[:, None]
    th = threshold[:, None]
    sd = s * step
    K = 2 ** (bits - 1)
    w = rng.laplace(size=(c, n)) * s * (1.0 + K * step / 2)
    j = rng.integers(0, K + 2, size=(c, n)).astype(np.float64)
    kind = rng.integers(0, 8, size=(c, n))
    edge = th + sd * j if grid == "offset" else sd * j
    half = th + sd * (j + 0.5) if grid == "offset" else sd * (j + 0.5)
    w = np.where(kind == 0, edge, w)
    w = np.where(kind == 1, half, w)
    w = np.where(kind == 2, np.broadcast_to(th, (c, n)), w)
    w = np.where(kind == 3, 0.0, w)
    sign = np.where(rng.random((c, n)) < 0.5, -1.0, 1.0)
    w = np.where(kind <= 3, sign * w, w)
    if rng.random() < 0.1:
        w.reshape(-1)[rng.integers(0, w.size)] = rng.choice([np.inf, -np.inf])
    return w.reshape(shape)


@st.composite
def quant_problems(draw, dtypes=FLOATS, max_size: int = 400):
    """A full fake-quant problem: dict with w, mask, scale, threshold, step, bits, grid."""
    shape = draw(shapes(max_size=max_size))
    dtype = draw(st.sampled_from(dtypes))
    scale, threshold, step, bits, grid = draw(quant_params(shape[0]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    w = boundary_values(rng, scale, threshold, step, bits, grid, shape).astype(dtype)
    keep = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    mask = rng.random(shape) < keep
    return dict(w=w, mask=mask, scale=scale, threshold=threshold, step=step, bits=bits,
                grid=grid)


@st.composite
def masks(draw, max_size: int = 3000):
    """Bool arrays: dense, sparse, all-False/all-True, long runs (varints of 2+ bytes)."""
    n = draw(st.integers(0, max_size))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(["p", "p", "none", "all", "runs"]))
    if kind == "none":
        return np.zeros(n, bool)
    if kind == "all":
        return np.ones(n, bool)
    if kind == "runs":
        m = np.zeros(n, bool)
        if n:
            m[rng.integers(0, n, size=rng.integers(0, 6))] = True
        return m
    return rng.random(n) < draw(st.sampled_from([0.01, 0.1, 0.5, 0.9]))
