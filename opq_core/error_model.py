"""Closed-form and empirical error models of pruning and quantization.

All quantities are in *normalized units*: a weight ``w`` of output channel ``c`` is
divided by the channel's Laplace scale ``s_c = mean |w_c|``, so that under the model its
magnitude ``u = |w| / s`` is standard exponential, ``u ~ Exp(1)``.

These formulas are derived by us from the OPQ method's description (Laplace prior,
Lagrangian over pruning + quantization error); the test-suite checks every one of them
against Monte Carlo and against the empirical model on Laplace draws.

Pruning at a normalized threshold ``t`` (prune ``u < t``):

.. math::

    \\Pr[u < t] = 1 - e^{-t}, \\qquad
    P(t) = E[u^2 \\mathbf{1}\\{u < t\\}] = 2\\,[1 - e^{-t}(1 + t + t^2 / 2)].

Offset grid with ``K = 2^{B-1}`` magnitude levels: given ``u > t``, ``x = u - t`` is again
``Exp(1)`` (memorylessness) and is coded on levels ``(k - 1/2) D``, ``k = 1..K``. Its mean
squared error ``q_B(D)`` does not depend on ``t``; ``c_B = min_D q_B(D)``.

Symmetric grid: levels ``k D``, ``k = clip(round(u / D), 1, K)``; the error of a kept
weight depends on ``t`` and is integrated over the tail ``u > t``.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import optimize

__all__ = [
    "BITS_RANGE",
    "GRIDS",
    "pruned_fraction",
    "pruning_error",
    "offset_error",
    "symmetric_error",
    "optimal_step",
    "quantization_constant",
    "empirical_quant_error",
    "empirical_optimal_step",
]

BITS_RANGE = range(1, 9)
from ._check import GRIDS  # noqa: E402,F401 (one definition)
from ._check import _check_model_bits as _check_bits  # noqa: E402


def levels(bits: int) -> int:
    """Number of magnitude levels of a ``bits``-bit code (one bit is the sign)."""
    return 1 << (int(bits) - 1)


def pruned_fraction(t):
    """Fraction of a Laplace(0, 1) population with ``|u| < t``: ``1 - exp(-t)``."""
    t = np.asarray(t, dtype=np.float64)
    return -np.expm1(-t)


def pruning_error(t):
    """Mean squared error per element of pruning ``|u| < t`` under Laplace(0, 1).

    .. math:: P(t) = 2\\,[1 - e^{-t}(1 + t + t^2/2)]

    >>> float(pruning_error(0.0))
    0.0
    >>> round(float(pruning_error(50.0)), 6)   # -> E[u^2] = 2
    2.0
    """
    t = np.asarray(t, dtype=np.float64)
    # 1 - e^-t (1 + t + t^2/2) written to keep precision for small t
    return 2.0 * (-np.expm1(-t) - np.exp(-t) * (t + 0.5 * t * t))


def _moment(a, b, c, shift=0.0):
    """``e^{shift} * integral_a^b (x - c)^2 e^{-x} dx`` (``b`` may be ``inf``)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)

    def antider(x):
        d = x - c
        return np.exp(shift - x) * (d * d + 2.0 * d + 2.0)

    fa = antider(a)
    with np.errstate(invalid="ignore", over="ignore"):
        fb = np.where(np.isinf(b), 0.0, antider(np.where(np.isinf(b), a, b)))
    return fa - fb


def offset_error(bits: int, step: float) -> float:
    """Mean squared error ``q_B(D)`` of the offset grid for ``x ~ Exp(1)``.

    .. math:: q_B(D) = \\sum_{k=1}^{K} \\int_{(k-1)D}^{kD\\,(\\infty \\text{ for } k=K)}
              (x - (k - \\tfrac12) D)^2 e^{-x}\\,dx

    >>> round(offset_error(1, 2.0), 12)   # one level at D/2 = 1 = E[x]: the variance
    1.0
    """
    K = levels(bits)
    D = float(step)
    k = np.arange(1, K + 1, dtype=np.float64)
    lo = (k - 1.0) * D
    hi = k * D
    hi[-1] = np.inf
    return float(np.sum(_moment(lo, hi, (k - 0.5) * D)))


def symmetric_error(bits: int, step: float, t: float = 0.0) -> float:
    """Mean squared error of a kept weight on the symmetric grid, ``u ~ Exp(1) | u > t``.

    Levels ``k D``, ``k = clip(round(u / D), 1, K)``.

    .. math:: q^{sym}_B(D, t) = e^{t} \\sum_k \\int_{\\max(t, (k - 1/2) D)}^{(k + 1/2) D}
              (u - kD)^2 e^{-u}\\,du

    (bin 1 starts at ``t``, bin ``K`` ends at infinity).

    >>> round(symmetric_error(1, 1.0, 0.0), 12)   # one level at 1 = E[u]
    1.0
    """
    K = levels(bits)
    D = float(step)
    t = float(t)
    k = np.arange(1, K + 1, dtype=np.float64)
    lo = (k - 0.5) * D
    hi = (k + 0.5) * D
    lo[0] = -np.inf
    hi[-1] = np.inf
    lo = np.maximum(lo, t)
    ok = hi > lo
    if not np.any(ok):
        return 0.0
    return float(np.sum(_moment(lo[ok], hi[ok], k[ok] * D, shift=t)))


def _minimize_1d(fun, lo: float, hi: float, n: int = 200) -> tuple[float, float]:
    grid = np.geomspace(lo, hi, n)
    vals = np.array([fun(g) for g in grid])
    i = int(np.argmin(vals))
    a = grid[max(i - 1, 0)]
    b = grid[min(i + 1, n - 1)]
    if b <= a:
        return float(grid[i]), float(vals[i])
    res = optimize.minimize_scalar(fun, bounds=(a, b), method="bounded",
                                   options={"xatol": 1e-12 * max(1.0, b)})
    if res.fun <= vals[i]:
        return float(res.x), float(res.fun)
    return float(grid[i]), float(vals[i])


@functools.lru_cache(maxsize=None)
def _offset_opt(bits: int) -> tuple[float, float]:
    return _minimize_1d(lambda d: offset_error(bits, d), 1e-4, 20.0)


@functools.lru_cache(maxsize=4096)
def _symmetric_opt(bits: int, t_key: float) -> tuple[float, float]:
    return _minimize_1d(lambda d: symmetric_error(bits, d, t_key), 1e-4, 40.0)


def optimal_step(bits: int, grid: str = "offset", t: float = 0.0) -> float:
    """Normalized step ``D*`` minimizing the kept-weight error (Laplace model).

    For the offset grid the answer does not depend on ``t``.

    >>> 1.5 < optimal_step(2) < 1.6
    True
    """
    return _laplace_opt(bits, grid, t)[0]


def quantization_constant(bits: int, grid: str = "offset", t: float = 0.0) -> float:
    """``c_B``: the minimal normalized mean squared error of a kept weight.

    >>> 0.39 < quantization_constant(2) < 0.40
    True
    """
    return _laplace_opt(bits, grid, t)[1]


def _laplace_opt(bits, grid, t):
    """``(D*, c_B)`` of the Laplace model: the optimal step and its error."""
    _check_bits(bits)
    if grid == "offset":
        return _offset_opt(int(bits))
    if grid == "symmetric":
        return _symmetric_opt(int(bits), round(float(t), 4))
    raise ValueError(f"grid must be 'offset' or 'symmetric', got {grid!r}")


# ---------------------------------------------------------------------------
# Empirical model: the same quantities measured on real normalized weights.
# ---------------------------------------------------------------------------

def empirical_quant_error(excess, bits: int, step: float, grid: str = "offset") -> float:
    """Mean squared quantization error measured on normalized kept magnitudes.

    ``excess`` is ``|u| - t`` for the offset grid and ``|u|`` for the symmetric grid
    (normalized units). Returns 0 for an empty input.
    """
    x = np.asarray(excess, dtype=np.float64).ravel()
    if x.size == 0:
        return 0.0
    err = _residual(x, bits, step, grid)
    return float(np.mean(err * err))


def _residual(x, bits, D, grid):
    """``x`` minus its reconstruction on the grid of step ``D`` (normalized units)."""
    K = levels(bits)
    D = float(D)
    if grid == "offset":
        k = np.clip(np.floor(x / D) + 1.0, 1.0, K)
        return x - (k - 0.5) * D
    k = np.clip(np.rint(x / D), 1.0, K)
    return x - k * D


def empirical_optimal_step(excess, bits: int, grid: str = "offset",
                           max_samples: int = 1_000_000) -> tuple[float, float]:
    """Step ``D`` minimizing :func:`empirical_quant_error`, and that error.

    Uses a fixed, evenly spaced subsample of at most ``max_samples`` values (deterministic).
    """
    x = np.asarray(excess, dtype=np.float64).ravel()
    if x.size == 0:
        return optimal_step(bits, grid), 0.0
    if x.size > max_samples:
        x = np.sort(x)[np.linspace(0, x.size - 1, max_samples).astype(np.int64)]
    fun = lambda d: empirical_quant_error(x, bits, d, grid)  # noqa: E731
    return _refine_step(fun, x, bits, grid)


def _refine_step(fun, x, bits, grid):
    """Minimize ``fun(D)`` around the Laplace optimum at the sample ``x``'s own scale;
    returns the best ``(D, fun(D))`` found (the Laplace start included)."""
    d0 = optimal_step(bits, grid) * max(float(np.mean(x)), 1e-12)
    best = (d0, fun(d0))
    for lo, hi, n in ((d0 / 8.0, d0 * 8.0, 80), (d0 / 1.25, d0 * 1.25, 40)):
        cand = _minimize_1d(fun, lo, hi, n=n)
        if cand[1] < best[1]:
            best = cand
        d0 = best[0]
    return best
