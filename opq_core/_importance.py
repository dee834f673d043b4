r"""Importance-weighted allocation: the OPQ rule with the diagonal of each layer's
output-error metric.

The error that matters is that of a layer's output, not of its weights. With a weight
:math:`g_c > 0` per output channel (e.g. the squared gain of a BatchNorm that follows) and
:math:`h_j > 0` per input channel (e.g. :math:`E[x_j^2]` from calibration data, or the
second moment of a LayerNorm's output), the output error of a layer is, on the diagonal,

.. math::

    E \approx \sum_{c, j} g_c h_j (w_{cj} - \hat w_{cj})^2,

so pruning :math:`w_{cj}` costs :math:`g_c h_j (w_{cj}^2 - q_c)` and one global multiplier
still decides every weight of the network:

.. math::

    \text{prune } w_{cj} \iff g_c h_j (w_{cj}^2 - q_c) < \lambda .

All ones is the paper's rule. For a convolution, :math:`h_j` is per input channel and
applies to every kernel position of that channel.

A weighted layer's mask can no longer be derived from per-channel magnitude thresholds: the
:class:`~opq_core.LayerPlan` keeps ``importance_out`` / ``importance_in`` so that
:meth:`~opq_core.Plan.masks` reproduces the masks, and the ``.opq`` file relies on the
masks it stores (its header does not repeat the importance). The offset grid of a weighted
layer starts at ``theta_c = sqrt(max(0, offset_lam + q_c))``, where ``offset_lam`` is the
smallest unweighted score ``w^2 - q_c`` among the layer's kept weights, so that every kept
weight lies on or above its channel's first level, as in unweighted plans.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .kernels import scores as _score_kernel


def _scores(w, score_q, channel_scale):
    """The unweighted OPQ score (what :func:`opq_core._plan.opq_scores` computes)."""
    s = np.asarray(channel_scale, dtype=np.float64)
    return _score_kernel(np.asarray(w), float(score_q) * (s * s), s <= 0)

__all__ = ["check_importance", "weight_importance", "weighted_scores", "offset_lam"]


def _vector(name, which, v, n, layer_shape):
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or a.size != n:
        raise ValueError(f"importance[{name!r}]: {which} must be a 1-D array of {n} values "
                         f"for a layer of shape {tuple(layer_shape)}, got shape {a.shape}")
    bad = ~np.isfinite(a) | (a <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"importance[{name!r}]: {which}[{i}] = {float(a[i])!r} must be finite and > 0")
    return a.copy()


def check_importance(importance, names, shapes) -> dict:
    """Validate ``plan(importance=)``: ``{layer: (out or None, in or None)}`` in float64.

    Each entry is a pair ``(out, in)`` or a dict with keys ``"out"`` / ``"in"``; ``out`` has
    one value per output channel (``shape[0]``), ``in`` one per input channel
    (``shape[1]``). Vectors of all ones are dropped (they are the identity), as are layers
    left with neither; the result is ``{}`` when nothing is weighted.
    """
    if importance is None:
        return {}
    if not isinstance(importance, Mapping):
        raise TypeError(f"importance must be a mapping layer name -> (out, in), got "
                        f"{type(importance).__name__}")
    known = dict(zip(names, shapes))
    out = {}
    for name, entry in importance.items():
        if name not in known:
            raise ValueError(f"importance: {name!r} is not a compressed layer of the plan")
        shape = known[name]
        if isinstance(entry, Mapping):
            extra = set(entry) - {"out", "in"}
            if extra:
                raise ValueError(f"importance[{name!r}]: unknown keys {sorted(extra)} "
                                 "(expected 'out' and/or 'in')")
            g, h = entry.get("out"), entry.get("in")
        elif isinstance(entry, (tuple, list)) and len(entry) == 2:
            g, h = entry
        else:
            raise TypeError(f"importance[{name!r}]: expected a pair (out, in) or a dict with "
                            f"'out'/'in', got {type(entry).__name__}")
        if g is not None:
            g = _vector(name, "out", g, int(shape[0]), shape)
            g = None if np.all(g == 1.0) else g
        if h is not None:
            h = _vector(name, "in", h, int(shape[1]), shape)
            h = None if np.all(h == 1.0) else h
        if g is not None or h is not None:
            out[name] = (g, h)
    return out


def weight_importance(shape, g, h) -> np.ndarray:
    """The per-weight importance ``g_c h_j`` as a ``(C, fan_in)`` float64 matrix (a
    convolution's ``h_j`` repeated over the kernel positions of input channel ``j``)."""
    C = int(shape[0])
    fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    col = np.ones(fan) if h is None else np.repeat(np.asarray(h, np.float64),
                                                   fan // int(shape[1]))
    row = np.ones(C) if g is None else np.asarray(g, np.float64)
    return row[:, None] * col[None, :]


def weighted_scores(w, score_q, channel_scale, g, h) -> np.ndarray:
    """Flat float64 scores ``g_c h_j (w^2 - q_c)`` of one layer (dead channels ``-inf``).

    >>> weighted_scores(np.array([[0.5, -2.0]]), 1.0, [1.0], None, np.array([2.0, 1.0]))
    array([-1.5,  3. ])
    """
    base = _scores(w, score_q, channel_scale)
    if g is None and h is None:
        return base
    wt = weight_importance(np.shape(w), g, h).reshape(-1)
    return base * wt


def offset_lam(w, score_q, channel_scale, mask) -> float:
    """Smallest unweighted score ``w^2 - q_c`` among the kept weights of live channels
    (``-inf`` when none): the offset grid's ``lam`` for a weighted layer."""
    s = np.asarray(channel_scale, dtype=np.float64)
    sc = _scores(w, score_q, s).reshape(np.shape(mask)[0], -1)
    m = np.asarray(mask, dtype=bool).reshape(sc.shape) & (s > 0)[:, None]
    return float(sc[m].min()) if m.any() else -np.inf


