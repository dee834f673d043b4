"""What the solvers of :mod:`opq_core.allocate` and :mod:`opq_core._budget` share: the
per-layer context and constants, predicted sparsity, and building the plan's layers."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np


from . import error_model as em
from ._plan import LayerPlan, channel_thresholds, layer_mask_from, score_layer
from .io import LazyWeights, tensor_info
from .stats import as_matrix, check_weight, magnitude_histogram
from ._fit import fit_step, prefix

_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
_F16_MAX = float(np.finfo(np.float16).max)


def _is_lazy(weights) -> bool:

    return isinstance(weights, LazyWeights)


class _Reread(Mapping):
    """name -> validated array, read again from a lazy source on every access."""

    def __init__(self, source):
        self._src = source

    def __getitem__(self, name):
        return check_weight(name, self._src[name])

    def __iter__(self):
        return iter(self._src)

    def __len__(self):
        return len(self._src)


class _LazyList(Sequence):
    """The arrays of ``names`` in order, fetched from ``arrays`` on each access."""

    def __init__(self, arrays, names):
        self._arrays = arrays
        self._names = list(names)

    def __getitem__(self, i):
        return self._arrays[self._names[i]]

    def __len__(self):
        return len(self._names)


def _select_layers(weights, exclude):
    exclude = [] if exclude is None else list([exclude] if isinstance(exclude, str) else exclude)
    for name in exclude:
        if name not in weights:
            raise ValueError(f"exclude: no tensor named {name!r} in weights")
    names, skipped = [], []
    for name in weights:
        if not isinstance(name, str):
            raise TypeError(f"weights: layer names must be strings, got {name!r}")
        if name in exclude:  # before any look at the tensor: an excluded name is kept as is
            skipped.append(name)
            continue
        shape, dtype = tensor_info(weights, name)
        ndim, size = len(shape), math.prod(int(d) for d in shape)
        # integer/bool tensors (position ids, masks) are kept as they are, like 1-D ones
        if ndim >= 2 and dtype.kind == "f" and size > 0:
            names.append(name)
        else:
            skipped.append(name)
    if not names:
        raise ValueError(
            "weights: no compressible layer (float tensors with ndim >= 2 and not excluded); "
            f"got {len(weights)} tensor(s): {list(weights)[:8]}")
    return names, skipped


def _kth_smallest(x: np.ndarray, k: int) -> float:
    """k-th smallest (1-based) of x by O(N) selection."""
    return float(np.partition(x, k - 1)[k - 1])


def _round_scales(s: np.ndarray) -> np.ndarray:
    """Round scales to float16 (what the file stores) when every one is a normal float16."""
    s = np.asarray(s, dtype=np.float64)
    pos = s[s > 0]
    if pos.size == 0 or (pos.min() >= _F16_MIN_NORMAL and pos.max() <= _F16_MAX / 2):
        r = s.astype(np.float16).astype(np.float64)
        # a positive scale must stay positive
        return np.where((s > 0) & (r <= 0), _F16_MIN_NORMAL, r)
    return s.astype(np.float32).astype(np.float64)


def _scale_dtype(s: np.ndarray) -> str:
    return "float16" if np.array_equal(s.astype(np.float16).astype(np.float64), s) else "float32"


# ---------------------------------------------------------------------------
# the solvers
# ---------------------------------------------------------------------------

@dataclass
class _Context:
    names: list
    arrays: dict
    stats: list
    scales: list
    grid: str
    error_model: str
    method: str
    dtypes: list
    _sorted: dict = field(default_factory=dict)
    _prefix: dict = field(default_factory=dict)
    select_seconds: float = 0.0
    #: {layer: (g or None, h or None)} of the weighted layers (opq_core._importance)
    importance: dict = field(default_factory=dict)

    @property
    def sizes(self):
        return np.array([st.n for st in self.stats], dtype=np.int64)


def _layer_constants(ctx: _Context, i: int, bits: int, t_norm: float | None,
                     lam: float | None, score_q: float) -> tuple[float, float]:
    """(step D, normalized kept-weight error) of layer i at its current threshold."""
    grid = ctx.grid
    if ctx.error_model == "empirical" and ctx.names[i] in ctx.importance:
        from . import _importance_solver as _importance
        return _importance.layer_constants(ctx, i, bits, lam, score_q)
    if ctx.error_model == "fitted":
        s = ctx.scales[i]
        live = s > 0
        if not live.any():
            return em.optimal_step(bits, grid), em.quantization_constant(bits, grid)
        t = channel_thresholds(-np.inf if lam is None else lam, score_q, s[live]) / s[live]
        return fit_step(_hist_prefix(ctx, i), bits, grid, t, s[live] * s[live])
    if ctx.error_model == "laplace":
        t = 0.0 if t_norm is None else t_norm
        return em.optimal_step(bits, grid, t), em.quantization_constant(bits, grid, t)
    # empirical: measure on the kept normalized magnitudes at the current thresholds
    s = ctx.scales[i]
    m = as_matrix(ctx.arrays[ctx.names[i]]).astype(np.float64)
    live = s > 0
    if not live.any():
        return em.optimal_step(bits, grid), em.quantization_constant(bits, grid)
    u = np.abs(m[live]) / s[live, None]
    theta = channel_thresholds(-np.inf if lam is None else lam, score_q, s[live])[:, None] / s[live, None]
    keep = u >= theta
    x = (u - theta)[keep] if grid == "offset" else u[keep]
    return em.empirical_optimal_step(x, bits, grid)


def _hist_prefix(ctx, i):
    """Running sums of layer i's |u| histogram (gathered in the statistics pass in
    "unified" mode; one extra pass at the rounded layer scale in "layer" mode)."""
    if i not in ctx._prefix:
        h = ctx.stats[i].histogram
        if h is None:
            h = magnitude_histogram(ctx.arrays[ctx.names[i]], ctx.scales[i])
        ctx._prefix[i] = prefix(h)
    return ctx._prefix[i]


def _mean_threshold(ctx, i, lam, score_q):
    """Kept-weighted mean normalized threshold of layer i (symmetric-grid step)."""
    s = ctx.scales[i]
    live = s > 0
    if not live.any():
        return 0.0
    t = channel_thresholds(lam, score_q, s[live]) / s[live]
    w = np.exp(-t)
    return float(np.sum(t * w) / max(np.sum(w), 1e-300))


def _channel_table(ctx, qn):
    """Concatenated per-channel (scale, fan-in, q_c, layer index) of the live channels."""
    s_all, fan_all, q_all, lid = [], [], [], []
    for i, st in enumerate(ctx.stats):
        s = ctx.scales[i]
        live = s > 0
        s_all.append(s[live])
        fan_all.append(np.full(int(live.sum()), st.n // max(st.channels, 1), dtype=np.float64))
        q_all.append(qn[i] * s[live] ** 2)
        lid.append(np.full(int(live.sum()), i, dtype=np.int64))
    return (np.concatenate(s_all), np.concatenate(fan_all), np.concatenate(q_all),
            np.concatenate(lid))


def _pruned_per_channel(s, q, lam):
    with np.errstate(invalid="ignore"):
        v = lam + q
    t = np.sqrt(np.maximum(np.where(np.isnan(v), 0.0, v), 0.0)) / s
    return -np.expm1(-t)


def _predicted_sparsity_lam(ctx, qn, lam):
    """Laplace-predicted pruned fraction of each layer at multiplier ``lam``
    (all-zero channels count as pruned)."""
    s, fan, q, lid = _channel_table(ctx, qn)
    pruned = np.bincount(lid, weights=fan * _pruned_per_channel(s, q, lam),
                         minlength=len(ctx.stats))
    sizes = ctx.sizes.astype(np.float64)
    live_n = np.bincount(lid, weights=fan, minlength=len(ctx.stats))
    return (pruned + (sizes - live_n)) / sizes


def _layer_scores(ctx, i, score_q):
    """Scores of layer i (importance-weighted when the layer has importance)."""
    if ctx.importance:
        from . import _importance_solver as _importance
        return _importance.layer_scores(ctx, i, score_q)
    return score_layer(ctx.arrays[ctx.names[i]], score_q, ctx.scales[i])


def _dead(ctx, i):
    return ctx.scales[i] <= 0


def _build_layers(ctx, bits, steps, qn, score_q, lams, kept, pred, errors=None):
    """LayerPlan rows. ``errors`` = (pruning error, pruned s_c^2 sum) per layer when the
    selection measured them; otherwise they are measured on the realized masks."""
    layers = []
    for i, name in enumerate(ctx.names):
        st = ctx.stats[i]
        s = ctx.scales[i]
        fan = st.n // max(st.channels, 1)
        if errors is not None:
            prune_err = float(errors[0][i])
            kept_s2 = float(fan * np.sum(s * s) - errors[1][i])
        else:
            arr = ctx.arrays[name]
            sc = _layer_scores(ctx, i, score_q[i])
            mask = layer_mask_from(sc, float(lams[i]), int(kept[i]), name)
            w = as_matrix(arr).astype(np.float64)
            mk = mask.reshape(w.shape)
            prune_err = float(np.sum(np.where(mk, 0.0, w * w)))
            kept_s2 = float(np.sum(mk.sum(axis=1) * (s * s)))
        quant_err = float(qn[i] * max(kept_s2, 0.0))
        layers.append(LayerPlan(
            name=name, shape=st.shape, dtype=ctx.dtypes[i], bits=int(bits[i]),
            grid=ctx.grid, step=float(steps[i]), channel_scale=s.copy(),
            scale_dtype=_scale_dtype(s), lam=float(lams[i]), score_q=float(score_q[i]),
            quant_error=float(qn[i]), kept=int(kept[i]),
            predicted_sparsity=float(pred[i]), pruning_error=prune_err,
            predicted_error=prune_err + quant_err))
    if ctx.importance:
        from . import _importance_solver as _importance
        layers = _importance.finish_layers(ctx, layers)
    return layers


