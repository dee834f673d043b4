"""The fitted error model: the quantizer step that minimizes the *measured* error of a
layer's kept, channel-normalized weights, found on the histogram of ``|u| = |w| / s_c``
that the statistics pass gathers (:func:`opq_core.stats.layer_stats` with
``histogram=True``), so fitting never reads the weights again.

Each histogram bin holds the count, the sum and the sum of squares of its ``|u|``, so the
squared error of a quantizer cell ``[a, b)`` with level ``L`` over whole bins is exact:

.. math:: \\sum_{a \\le u < b} (u - L)^2 = S_2 - 2 L S_1 + L^2 S_0.

Cell edges are rounded to the nearest bin edge (bins are ``HIST_RANGE / HIST_BINS = 1/256``
wide); a value that lands on the wrong side of an edge is about equally far from both
levels, so the estimate is off by a relative ``O((w / D)^2)``.

The kept set depends on the channel thresholds ``t_c = theta_c / s_c``. The layer's
channels are taken to share the pooled normalized distribution (the premise of a shared
normalized codebook); the kept error is the mixture over up to ``GROUPS`` representative
thresholds (quantile groups of the ``t_c``, each of mass ``m_g`` the share of its channels'
``s_c^2``, so that the error is weighed in the weights' own units):

.. math:: q = \\frac{\\sum_g m_g E(t_g, D)}{\\sum_g m_g N(t_g)},

``E`` the squared error of the histogram's values above ``t_g``, ``N`` their count. The
step minimizes ``q`` over a geometric grid around the Laplace optimum ``D*_B`` (a factor 8
either way) refined between the best grid point's neighbours. The Laplace step is kept
unless the fitted one is better by more than the resolution margin
``4 (w / D)^2 + 2e-4 + 2 / sqrt(n_kept)`` (relative: the histogram's resolution and the
sampling noise of an error measured on a pooled histogram), so that on layers of real size
the fitted quantizer does not do worse than the Laplace one; with no pruning the pooled
histogram is exactly the kept set and this holds up to the resolution. The histogram divides by the scales as the plan stores them (float16).
"""
from __future__ import annotations

import numpy as np

from ._jit import JIT_DISABLED, jit
from . import error_model as em
from .stats import HIST_BINS, HIST_RANGE

#: Representative thresholds per layer in the mixture.
GROUPS = 8
_W = HIST_RANGE / HIST_BINS


@jit()
def _mixture_errors(P, inv_w, t_g, m_g, K, symmetric, steps, out_err, out_n):
    nb = P.shape[0] - 1
    G = t_g.shape[0]
    for d in range(steps.shape[0]):
        D = steps[d]
        e_tot = 0.0
        n_tot = 0.0
        for g in range(G):
            t = t_g[g]
            lo = np.int64(np.floor(t * inv_w + 0.5))
            if lo >= nb - 1:
                # the threshold lies in the open last bin: its values are taken as pruned
                continue
            if lo < 0:
                lo = 0
            n_tot += m_g[g] * (P[nb, 0] - P[lo, 0])
            e = 0.0
            for k in range(1, K + 1):
                if k == K:
                    hi = nb
                else:
                    edge = (k + 0.5) * D if symmetric else t + k * D
                    hi = np.int64(np.floor(edge * inv_w + 0.5))
                    if hi > nb - 1:
                        hi = nb - 1
                    if hi < lo:
                        hi = lo
                if hi > lo:
                    L = k * D if symmetric else t + (k - 0.5) * D
                    s0 = P[hi, 0] - P[lo, 0]
                    s1 = P[hi, 1] - P[lo, 1]
                    s2 = P[hi, 2] - P[lo, 2]
                    e += s2 - 2.0 * L * s1 + L * L * s0
                lo = hi
                if lo >= nb:
                    break
            e_tot += m_g[g] * max(e, 0.0)
        out_err[d] = e_tot
        out_n[d] = n_tot


@jit()
def _running_sums(hist, P):
    # the same additions, in the same order, as np.cumsum(hist, axis=0, out=P[1:])
    for k in range(hist.shape[1]):
        acc = hist[0, k]
        P[1, k] = acc
        for b in range(1, hist.shape[0]):
            acc += hist[b, k]
            P[b + 1, k] = acc


def prefix(hist: np.ndarray) -> np.ndarray:
    """(bins + 1, 3) running sums of a (bins, 3) histogram."""
    hist = np.ascontiguousarray(hist, dtype=np.float64)
    P = np.zeros((hist.shape[0] + 1, hist.shape[1]))
    if JIT_DISABLED:  # the same sums, without a Python loop over the bins
        np.cumsum(hist, axis=0, out=P[1:])
    elif hist.shape[0]:
        _running_sums(hist, P)
    return P


#: The coarse step grid of :func:`fit_step`, relative to the Laplace step.
_COARSE = np.geomspace(0.125, 8.0, 97)


def threshold_groups(t: np.ndarray, weight=None, groups: int = GROUPS):
    """(representative thresholds, masses summing to 1) of per-channel thresholds ``t``,
    each channel counted with ``weight`` (default 1; the plan passes ``s_c^2``, so that the
    fit minimizes the error in the weights' own units)."""
    t = np.asarray(t, dtype=np.float64)
    if t.size == 0:
        return np.zeros(1), np.ones(1)
    wt = np.ones(t.size) if weight is None else np.asarray(weight, dtype=np.float64)
    lo, hi = float(t.min()), float(t.max())
    if hi - lo <= 1e-12 * max(1.0, hi) or t.size <= 1:
        return np.array([lo]), np.ones(1)
    order = np.argsort(t, kind="stable")
    ts, ws = t[order], wt[order]
    # the sections of np.array_split(order, g): the first n % g one longer
    g = min(groups, t.size)
    each, extra = divmod(t.size, g)
    ends = np.cumsum([each + 1] * extra + [each] * (g - extra)).tolist()
    mass = np.empty(g)
    rep = np.empty(g)
    a = 0
    for i, b in enumerate(ends):
        mass[i] = ws[a:b].sum()
        rep[i] = np.dot(ts[a:b], ws[a:b]) / max(mass[i], 1e-300)
        a = b
    tot = mass.sum()
    return rep, (mass / tot if tot > 0 else np.full(mass.size, 1.0 / mass.size))


def mixture_error(P, bits: int, grid: str, t_g, m_g, steps) -> tuple[np.ndarray, np.ndarray]:
    """Kept squared error and kept count (in histogram units) at every step of ``steps``."""
    steps = np.ascontiguousarray(steps, dtype=np.float64)
    err = np.empty(steps.size)
    n = np.empty(steps.size)
    _mixture_errors(P, 1.0 / _W, np.ascontiguousarray(t_g, dtype=np.float64),
                    np.ascontiguousarray(m_g, dtype=np.float64), em.levels(bits),
                    grid == "symmetric", steps, err, n)
    return err, n


def fit_step(P, bits: int, grid: str, t, weight=None) -> tuple[float, float]:
    """(step D, normalized mean squared error of a kept weight) fitted on the histogram
    prefix ``P`` for per-channel normalized thresholds ``t`` and channel weights ``weight``
    (see the module doc)."""
    t_g, m_g = threshold_groups(t, weight)
    t_mean = float(np.dot(t_g, m_g))
    d_lap = em.optimal_step(bits, grid, t_mean if grid == "symmetric" else 0.0)
    coarse = d_lap * _COARSE
    err, n = mixture_error(P, bits, grid, t_g, m_g, np.concatenate([[d_lap], coarse]))
    kept = float(n[0])
    if not kept > 0:
        return d_lap, em.quantization_constant(bits, grid, t_mean if grid == "symmetric" else 0.0)
    e_lap = float(err[0])
    j = int(np.argmin(err[1:]))
    a = coarse[max(j - 1, 0)]
    b = coarse[min(j + 1, coarse.size - 1)]
    fine = np.linspace(a, b, 33)
    err_f, _ = mixture_error(P, bits, grid, t_g, m_g, fine)
    k = int(np.argmin(err_f))
    d_fit, e_fit = float(fine[k]), float(err_f[k])
    if err[1 + j] < e_fit:
        d_fit, e_fit = float(coarse[j]), float(err[1 + j])
    # resolution of the histogram, and the sampling noise of an error measured on `kept`
    # values pooled over channels whose own kept sets differ (relative ~ 1 / sqrt(kept))
    margin = 4.0 * (_W / min(d_fit, d_lap)) ** 2 + 2e-4 + 2.0 / np.sqrt(kept)
    if e_fit < e_lap * (1.0 - margin):
        return d_fit, e_fit / kept
    return d_lap, e_lap / kept
