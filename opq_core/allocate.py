"""Allocation: from the weights alone, per-layer sparsity, masks and quantizer steps.

The OPQ rule (one global Lagrange multiplier for the joint pruning + quantization error):
pruning a weight ``w`` of channel ``(i, c)`` changes the total squared error by
``w^2 - q_ic``, where ``q_ic = c_{B_i} s_ic^2`` is the predicted quantization error of that
weight if it were kept. Minimizing the total error under a global sparsity target therefore
prunes exactly the weights with the smallest *score* ``w^2 - q_ic``:

.. math::

    \\text{prune } w \\iff w^2 < \\lambda + q_{ic}, \\qquad
    \\theta_{ic} = \\sqrt{\\max(0, \\lambda + q_{ic})}.

See :func:`plan`.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize

from . import error_model as em
from ._jit import jit, prange
from .io import tensor_info
from .stats import as_matrix, check_weight, layer_stats

__all__ = ["LayerPlan", "Plan", "plan", "METHODS", "CHANNELWISE", "ERROR_MODELS"]

METHODS = ("opq", "global", "uniform")
CHANNELWISE = ("unified", "layer")
ERROR_MODELS = ("laplace", "empirical")
FORMAT_VERSION = 1

_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
_F16_MAX = float(np.finfo(np.float16).max)


# ---------------------------------------------------------------------------
# result objects
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class LayerPlan:
    """The plan of one compressed layer (pure data).

    Attributes
    ----------
    name, shape, dtype : the tensor.
    bits : bits per kept weight (sign + ``bits - 1`` magnitude bits).
    grid : ``"offset"`` or ``"symmetric"``.
    step : normalized quantizer step ``D`` (absolute step of channel c is ``scale[c] * step``).
    channel_scale : per-output-channel scale ``s_c`` (float64 values exactly representable in
        ``scale_dtype``).
    scale_dtype : ``"float16"`` when every scale is a normal float16 number, else ``"float32"``.
    lam : the score threshold: a weight is pruned when ``w^2 - score_q * s_c^2 < lam``.
    score_q : normalized quantization error used in the score (``c_B`` for "opq", 0 for the
        magnitude baselines).
    quant_error : predicted normalized mean squared error of a kept weight (``c_B``).
    kept : number of kept weights.
    predicted_sparsity : sparsity the Laplace model predicts for this layer.
    pruning_error : sum of the squared pruned weights (measured).
    predicted_error : ``pruning_error + sum_kept quant_error * s_c^2``.
    codebook : ``None`` for the uniform grids; for ``grid == "codebook"`` (ANNC's
        non-uniform quantizer) the sorted non-zero centroids in absolute units (float64
        values exactly representable in float32, at most ``2**bits`` of them). A kept weight
        takes the nearest centroid; its code is ``1 + index`` (0 = pruned), packed as the
        ``bits``-bit symbol ``index``. ``channel_scale``, ``step`` and ``lam`` are unused
        by the quantizer then, and the mask must be stored (it is not derived from a score).
    """

    name: str
    shape: tuple
    dtype: str
    bits: int
    grid: str
    step: float
    channel_scale: np.ndarray
    scale_dtype: str
    lam: float
    score_q: float
    quant_error: float
    kept: int
    predicted_sparsity: float
    pruning_error: float
    predicted_error: float
    codebook: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    @property
    def channels(self) -> int:
        return int(self.shape[0])

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.n if self.n else 0.0

    @property
    def scale(self) -> float:
        """Layer scale: the mean of the channel scales weighted by channel size."""
        return float(np.mean(self.channel_scale)) if self.channel_scale.size else 0.0

    @property
    def kernel_scale(self) -> np.ndarray:
        """``channel_scale`` with the all-zero ("dead") channels' 0 replaced by 1.

        Dead channels are pruned whole, so any positive scale decodes them to 0.0; the
        kernels require positive scales."""
        s = np.asarray(self.channel_scale, dtype=np.float64)
        return np.where(s > 0, s, 1.0)

    @property
    def thresholds(self) -> np.ndarray:
        """Per-channel magnitude thresholds ``theta_c = sqrt(max(0, lam + score_q s_c^2))``."""
        return channel_thresholds(self.lam, self.score_q, self.channel_scale)

    @property
    def size_bits(self) -> int:
        """Paper accounting: ``bits * kept``."""
        return int(self.bits) * int(self.kept)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype,
            "bits": int(self.bits), "grid": self.grid, "step": float(self.step),
            "channel_scale": [float(v) for v in self.channel_scale],
            "scale_dtype": self.scale_dtype, "lam": float(self.lam),
            "score_q": float(self.score_q), "quant_error": float(self.quant_error),
            "kept": int(self.kept), "predicted_sparsity": float(self.predicted_sparsity),
            "pruning_error": float(self.pruning_error),
            "predicted_error": float(self.predicted_error),
            "codebook": (None if self.codebook is None
                         else [float(v) for v in self.codebook]),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerPlan":
        d = dict(d)
        d["shape"] = tuple(int(s) for s in d["shape"])
        d["channel_scale"] = np.asarray(d["channel_scale"], dtype=np.float64)
        if d.get("codebook") is not None:
            d["codebook"] = np.asarray(d["codebook"], dtype=np.float64)
        d["bits"] = int(d["bits"])
        d["kept"] = int(d["kept"])
        for k in ("step", "lam", "score_q", "quant_error", "predicted_sparsity",
                  "pruning_error", "predicted_error"):
            d[k] = float(d[k])
        return cls(**d)

    def __eq__(self, other):
        if not isinstance(other, LayerPlan):
            return NotImplemented
        a, b = self.to_dict(), other.to_dict()
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    def __hash__(self):
        return hash((self.name, self.shape, self.bits, self.kept))

    def __repr__(self):
        return (f"LayerPlan({self.name!r}, shape={self.shape}, bits={self.bits}, "
                f"sparsity={self.sparsity:.4f}, kept={self.kept})")


def channel_thresholds(lam: float, score_q: float, channel_scale) -> np.ndarray:
    """``sqrt(max(0, lam + score_q * s^2))`` per channel (float64)."""
    s = np.asarray(channel_scale, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        v = lam + score_q * (s * s)
    v = np.where(np.isnan(v), 0.0, v)
    return np.sqrt(np.maximum(v, 0.0))


@dataclass(frozen=True, repr=False)
class Plan:
    """A compression plan: one :class:`LayerPlan` per compressed layer plus totals.

    Like :class:`scipy.optimize.OptimizeResult` it carries ``success``, ``status`` (0: the
    target was met; 1: met with a documented deviation; 2: infeasible) and ``message``.
    """

    layers: tuple
    method: str
    channelwise: str
    grid: str
    error_model: str
    target_sparsity: float | None
    budget_bits: float | None
    lam: float
    skipped: tuple = ()
    success: bool = True
    status: int = 0
    message: str = ""
    min_budget_bits: float | None = None
    stats_seconds: float = 0.0
    solve_seconds: float = 0.0
    select_seconds: float = 0.0
    version: int = FORMAT_VERSION

    # ---- totals -----------------------------------------------------------------
    @property
    def n(self) -> int:
        return sum(layer.n for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        n = self.n
        return 1.0 - self.kept / n if n else 0.0

    @property
    def size_bits(self) -> int:
        """``sum_i bits_i * nnz_i`` over the compressed layers."""
        return sum(layer.size_bits for layer in self.layers)

    @property
    def paper_rate(self) -> float:
        """``32 N / sum_i bits_i nnz_i`` (no index, no codebook): the papers' figure."""
        b = self.size_bits
        return 32.0 * self.n / b if b else math.inf

    @property
    def predicted_error(self) -> float:
        return float(sum(layer.predicted_error for layer in self.layers))

    @property
    def pruning_error(self) -> float:
        return float(sum(layer.pruning_error for layer in self.layers))

    @property
    def seconds(self) -> float:
        """Wall time of :func:`plan`: statistics + solve + mask selection."""
        return self.stats_seconds + self.solve_seconds + self.select_seconds

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"plan has no layer {name!r}")

    def __contains__(self, name) -> bool:
        return any(layer.name == name for layer in self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    @property
    def names(self) -> list:
        return [layer.name for layer in self.layers]

    # ---- applying ------------------------------------------------------------------
    def masks(self, weights: Mapping) -> dict:
        """Realized boolean masks (True = kept), one per compressed layer."""
        from .apply import layer_mask
        return {lp.name: layer_mask(lp, self._weight(weights, lp)) for lp in self.layers}

    def apply(self, weights: Mapping, *, masks: Mapping | None = None) -> dict:
        """Dequantized (fake-quant) weights: every compressed layer pruned and quantized,
        every other tensor returned as it was."""
        from .apply import apply_layer
        out = {}
        names = set(self.names)
        for name, w in weights.items():
            if name in names:
                lp = self[name]
                m = None if masks is None else masks[name]
                out[name] = apply_layer(lp, self._weight(weights, lp), mask=m)
            else:
                out[name] = w
        missing = names - set(out)
        if missing:
            raise ValueError(f"weights: missing compressed layer(s) {sorted(missing)}")
        return out

    def _weight(self, weights: Mapping, lp: LayerPlan) -> np.ndarray:
        if lp.name not in weights:
            raise ValueError(f"weights: the plan's layer {lp.name!r} is missing")
        w = check_weight(lp.name, weights[lp.name])
        if tuple(w.shape) != tuple(lp.shape):
            raise ValueError(
                f"weights[{lp.name!r}]: shape {tuple(w.shape)} does not match the plan's "
                f"{tuple(lp.shape)} (a plan for another model?)")
        return w

    # ---- serialization -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version, "method": self.method,
            "channelwise": self.channelwise, "grid": self.grid,
            "error_model": self.error_model, "target_sparsity": self.target_sparsity,
            "budget_bits": self.budget_bits, "lam": float(self.lam),
            "skipped": list(self.skipped), "success": bool(self.success),
            "status": int(self.status), "message": self.message,
            "min_budget_bits": self.min_budget_bits,
            "stats_seconds": float(self.stats_seconds),
            "solve_seconds": float(self.solve_seconds),
            "select_seconds": float(self.select_seconds),
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": {"n": self.n, "kept": self.kept, "sparsity": self.sparsity,
                       "size_bits": self.size_bits, "paper_rate": self.paper_rate,
                       "predicted_error": self.predicted_error},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Plan":
        d = dict(d)
        d.pop("totals", None)
        version = int(d.get("version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(f"plan: version {version} is newer than this opq ({FORMAT_VERSION})")
        d["version"] = version
        d["layers"] = tuple(LayerPlan.from_dict(x) for x in d["layers"])
        d["skipped"] = tuple(d.get("skipped", ()))
        d["lam"] = float(d["lam"])
        return cls(**d)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other):
        if not isinstance(other, Plan):
            return NotImplemented
        return self.to_json(sort_keys=True) == other.to_json(sort_keys=True)

    def __hash__(self):
        return hash((self.method, len(self.layers), self.kept))

    # ---- display -------------------------------------------------------------------
    def table(self, *, max_rows: int | None = None) -> str:
        """The per-layer table with totals (plain text)."""
        head = (f"{'layer':<28} {'shape':<18} {'n':>10} {'scale':>9} {'sparsity':>8} "
                f"{'pred.sp':>7} {'kept':>10} {'bits':>4} {'step':>7} {'pred.err':>10}")
        rows = [head, "-" * len(head)]
        layers = self.layers if max_rows is None else self.layers[:max_rows]
        for lp in layers:
            shape = "x".join(str(s) for s in lp.shape)
            rows.append(
                f"{_clip(lp.name, 28):<28} {_clip(shape, 18):<18} {lp.n:>10d} {lp.scale:>9.3g} "
                f"{lp.sparsity:>8.4f} {lp.predicted_sparsity:>7.4f} {lp.kept:>10d} "
                f"{lp.bits:>4d} {lp.step:>7.4f} {lp.predicted_error:>10.4g}")
        if max_rows is not None and len(self.layers) > max_rows:
            rows.append(f"... {len(self.layers) - max_rows} more layers")
        rows.append("-" * len(head))
        rows.append(
            f"{'total':<28} {len(self.layers):>3d} layers{'':<8} {self.n:>10d} {'':>9} "
            f"{self.sparsity:>8.4f} {'':>7} {self.kept:>10d} {'':>4} {'':>7} "
            f"{self.predicted_error:>10.4g}")
        rows.append(
            f"method={self.method} channelwise={self.channelwise} grid={self.grid} "
            f"error_model={self.error_model} paper_rate={self.paper_rate:.2f}x "
            f"size={self.size_bits / 8 / 1024:.1f} KiB stats={self.stats_seconds * 1e3:.1f} ms "
            f"solve={self.solve_seconds * 1e3:.1f} ms select={self.select_seconds * 1e3:.1f} ms")
        rows.append(f"success={self.success} status={self.status}: {self.message}")
        return "\n".join(rows)

    def __repr__(self):
        return f"Plan(\n{self.table(max_rows=40)}\n)"


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


# ---------------------------------------------------------------------------
# kernels used by the solver
# ---------------------------------------------------------------------------

def score_layer(w, score_q: float, channel_scale) -> np.ndarray:
    """Flat scores ``w^2 - score_q * s_c^2`` of one layer (``-inf`` where ``s_c = 0``).

    The one definition used by the solver, by :meth:`Plan.masks` and by the tests
    (computed by the kernel :func:`opq_core.kernels.scores`).
    """
    from .kernels import scores
    s = np.asarray(channel_scale, dtype=np.float64)
    return scores(np.asarray(w), float(score_q) * (s * s), s <= 0)


def _kth_smallest(x: np.ndarray, k: int) -> float:
    """k-th smallest (1-based) of x by O(N) selection."""
    return float(np.partition(x, k - 1)[k - 1])


# ---------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------

_UNSET = object()


def plan(weights: Mapping, *, sparsity: float | None = None, bits=_UNSET,
         rate: float | None = None, budget_bits: float | None = None,
         method: str = "opq", channelwise: str = "unified", grid: str = "offset",
         error_model: str = "laplace", exclude: Sequence[str] | None = None) -> Plan:
    """Plan pruning + quantization of every compressible layer from the weights alone.

    Parameters
    ----------
    weights : mapping name -> array
        Every float tensor with ``ndim >= 2`` is compressed (conv, linear); other tensors
        (biases, norms, integer buffers) are listed in ``Plan.skipped`` and left alone.
    sparsity : float in [0, 1)
        Global fraction of the compressed weights to prune (sparsity mode).
    bits : int in 1..8, or a sequence of candidates
        Bits per kept weight. In sparsity mode an int (default 4). In budget mode
        (``rate``/``budget_bits``) the default is every width 1..8, chosen per layer; an int
        fixes it.
    rate : float > 1
        Target ``paper_rate = 32 N / sum_i bits_i nnz_i``; same as
        ``budget_bits = 32 N / rate``.
    method : "opq" | "global" | "uniform"
        "opq": prune the smallest scores ``w^2 - q_ic`` over the whole network (one global
        multiplier). "global": one magnitude threshold (``q := 0``). "uniform": the same
        sparsity in every layer, magnitude within the layer. All share the quantizer.
    channelwise : "unified" | "layer"
        Per-channel scales ``s_c = mean|w_c|`` (one normalized codebook per layer), or one
        scale per layer.
    grid : "offset" | "symmetric"
    error_model : "laplace" | "empirical"
        Closed-form Laplace constants, or the same quantities measured on the weights.
    exclude : names of tensors not to compress.

    Returns
    -------
    Plan

    Notes
    -----
    The OPQ rule prunes the weights of smallest score; the realized masks prune exactly
    ``round(sparsity * N)`` weights (ties broken by position: among equal scores the later
    ones are pruned first), and ``lam`` is the largest pruned score:

    .. math:: \\text{keep } w \\iff w^2 - c_{B} s_{c}^2 > \\lambda \\;(\\text{or a kept tie})

    The analytic sparsity of layer ``i`` under the Laplace model is
    ``p_i = sum_c n_ic (1 - exp(-theta_ic / s_ic)) / n_i`` with the multiplier solved by
    root finding on ``sum_i n_i p_i = p N``. Channels whose weights are all zero are
    pruned whole (they cost nothing and have no scale).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> w = {"fc1": rng.laplace(size=(64, 32)), "fc2": 0.1 * rng.laplace(size=(10, 64))}
    >>> p = plan(w, sparsity=0.8, bits=4)
    >>> p.kept == round(0.2 * (64 * 32 + 10 * 64))
    True
    """
    t0 = time.perf_counter()
    sparsity, bits_set, budget = _check_args(weights, sparsity, bits, rate, budget_bits,
                                             method, channelwise, grid, error_model)
    names, skipped = _select_layers(weights, exclude)
    # A lazy source (a file opened with opq_core.open_weights) is read again tensor by
    # tensor on every pass instead of being held: peak memory is bounded by the largest
    # tensor, not the model (sparsity mode; budget mode keeps sorted copies).
    lazy = _is_lazy(weights)
    arrays = _Reread(weights) if lazy else {}
    stats = []
    dtypes = []
    for name in names:
        arr = check_weight(name, weights[name])
        if not lazy:
            arrays[name] = arr
        dtypes.append(str(np.dtype(arr.dtype)))
        stats.append(layer_stats(name, arr))
        del arr
    t1 = time.perf_counter()
    scales = [_round_scales(st.channel_scale if channelwise == "unified"
                            else np.full(st.channels, st.scale)) for st in stats]
    ctx = _Context(names, arrays, stats, scales, grid, error_model, method, dtypes)
    if budget is None:
        layers, lam, status, message = _solve_sparsity(ctx, sparsity, bits_set[0])
        min_budget = None
    else:
        layers, lam, status, message, min_budget = _solve_budget(ctx, budget, bits_set)
    t2 = time.perf_counter()
    if budget is not None:
        budget = budget[1] if budget[0] == "bits" else 32.0 * int(ctx.sizes.sum()) / budget[1]
    return Plan(layers=tuple(layers), method=method, channelwise=channelwise, grid=grid,
                error_model=error_model, target_sparsity=sparsity,
                budget_bits=None if budget is None else float(budget), lam=float(lam),
                skipped=tuple(skipped), success=status < 2, status=status, message=message,
                min_budget_bits=min_budget, stats_seconds=t1 - t0,
                solve_seconds=t2 - t1 - ctx.select_seconds, select_seconds=ctx.select_seconds)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _check_args(weights, sparsity, bits, rate, budget_bits, method, channelwise, grid,
                error_model):
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError("weights: the mapping is empty")
    for arg, val, allowed in (("method", method, METHODS), ("channelwise", channelwise, CHANNELWISE),
                              ("grid", grid, em.GRIDS), ("error_model", error_model, ERROR_MODELS)):
        if val not in allowed:
            raise ValueError(f"{arg} must be one of {allowed}, got {val!r}")
    budget_mode = rate is not None or budget_bits is not None
    if rate is not None and budget_bits is not None:
        raise ValueError("give rate= or budget_bits=, not both")
    if budget_mode and sparsity is not None:
        raise ValueError("give sparsity= (sparsity mode) or rate=/budget_bits= (budget mode), not both")
    if not budget_mode and sparsity is None:
        raise ValueError("give sparsity= (e.g. 0.9) or rate= (e.g. 100) or budget_bits=")
    if budget_mode and method == "uniform":
        raise ValueError("method='uniform' takes sparsity=, not a size budget")
    if bits is _UNSET:
        bits_set = tuple(range(1, 9)) if budget_mode else (4,)
    elif isinstance(bits, (list, tuple, range)):
        if not budget_mode:
            raise ValueError(f"bits: a set of candidates {tuple(bits)} needs rate= or budget_bits=")
        bits_set = tuple(bits)
        if not bits_set:
            raise ValueError("bits: empty set of candidates")
    else:
        bits_set = (bits,)
    for b in bits_set:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= int(b) <= 8:
            raise ValueError(f"bits must be integers in 1..8, got {b!r}")
    bits_set = tuple(sorted(set(int(b) for b in bits_set)))
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
            raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        sparsity = float(sparsity)
        if not (0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    budget = None
    if rate is not None:
        rate = float(rate)
        if not (rate > 1.0) or not math.isfinite(rate):
            raise ValueError(f"rate must be a finite number > 1 (32-bit floats are rate 1), got {rate!r}")
        budget = ("rate", rate)
    if budget_bits is not None:
        bb = float(budget_bits)
        if not math.isfinite(bb) or bb < 0:
            raise ValueError(f"budget_bits must be a finite number >= 0, got {budget_bits!r}")
        budget = ("bits", bb)
    return sparsity, bits_set, budget


def _is_lazy(weights) -> bool:
    from .io import LazyWeights
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
        shape, dtype = tensor_info(weights, name)
        ndim, size = len(shape), math.prod(int(d) for d in shape)
        if ndim >= 2 and dtype.kind != "f":
            raise TypeError(
                f"weights[{name!r}]: a {ndim}-D tensor must be float16/32/64 to be "
                f"compressed, got dtype {dtype} (exclude it to leave it alone)")
        if ndim >= 2 and name not in exclude and size > 0:
            names.append(name)
        else:
            skipped.append(name)
    if not names:
        raise ValueError(
            "weights: no compressible layer (float tensors with ndim >= 2 and not excluded); "
            f"got {len(weights)} tensor(s): {list(weights)[:8]}")
    return names, skipped


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
    select_seconds: float = 0.0

    @property
    def sizes(self):
        return np.array([st.n for st in self.stats], dtype=np.int64)


def _layer_constants(ctx: _Context, i: int, bits: int, t_norm: float | None,
                     lam: float | None, score_q: float) -> tuple[float, float]:
    """(step D, normalized kept-weight error) of layer i at its current threshold."""
    grid = ctx.grid
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


def _analytic_lambda(ctx, qn, target):
    """Root of sum_i n_i p_i(lambda) = target * N (Laplace model)."""
    if target <= 0:
        return -np.inf
    s, fan, q, _ = _channel_table(ctx, qn)
    N = float(ctx.sizes.sum())
    goal = target * N - (N - float(fan.sum()))  # all-zero channels are pruned anyway
    if s.size == 0 or goal <= 0:
        return -np.inf

    def f(lam):
        return float(np.dot(fan, _pruned_per_channel(s, q, lam))) - goal

    lo = -float(np.max(q)) if q.size else 0.0
    if f(lo) >= 0:
        return lo
    hi = max(1e-30, float(np.max(s)) ** 2)
    for _ in range(400):
        if f(hi) >= 0:
            break
        hi *= 2.0
    return optimize.brentq(f, lo, hi, xtol=1e-15 * hi, rtol=4 * np.finfo(float).eps, maxiter=500)


def _solve_sparsity(ctx: _Context, sparsity: float, bits: int):
    L = len(ctx.names)
    qn = np.full(L, em.quantization_constant(bits, ctx.grid, 0.0))
    steps = np.full(L, em.optimal_step(bits, ctx.grid, 0.0))
    use_q = ctx.method == "opq"
    score_q = qn if use_q else np.zeros(L)
    lams = np.full(L, -np.inf)
    n_iter = 1 if (ctx.grid == "offset" and ctx.error_model == "laplace") else 3
    for it in range(n_iter):
        kept, lams, glam, perr, ps2 = _realize_sparsity(ctx, sparsity, score_q)
        if it == n_iter - 1:
            break
        # refine the per-layer constants at the realized thresholds
        for i in range(L):
            t_mean = _mean_threshold(ctx, i, lams[i], score_q[i])
            steps[i], qn[i] = _layer_constants(ctx, i, bits, t_mean, lams[i], score_q[i])
        score_q = qn if use_q else np.zeros(L)
    if ctx.method == "uniform":
        pred = np.full(L, float(sparsity))
    else:
        alam = _analytic_lambda(ctx, score_q, sparsity)
        pred = _predicted_sparsity_lam(ctx, score_q, alam)
    layers = _build_layers(ctx, [bits] * L, steps, qn, score_q, lams, kept, pred,
                           errors=(perr, ps2))
    total_pruned = int(ctx.sizes.sum() - sum(kept))
    want = round(sparsity * int(ctx.sizes.sum()))
    status, msg = 0, f"pruned {total_pruned} of {int(ctx.sizes.sum())} weights (target {want})"
    if ctx.method == "uniform" and total_pruned != want:
        status = 1
        msg += "; the uniform baseline rounds per layer"
    elif total_pruned != want:
        status = 1
        msg += "; all-zero channels are pruned whole, beyond the target"
    emptied = [lp.name for lp, st in zip(layers, ctx.stats) if lp.kept == 0 and st.scale > 0]
    if emptied:
        # the global rule may empty a layer whose weights are all small: legal, but it cuts
        # the network's signal path, so say it (exclude= keeps such a layer dense)
        names = ", ".join(emptied[:5]) + (f" and {len(emptied) - 5} more" if len(emptied) > 5 else "")
        msg += f"; layers pruned entirely: {names}"
        warnings.warn(f"plan: the global rule prunes every weight of {names}; exclude them "
                      "or lower the sparsity to keep them", UserWarning, stacklevel=3)
    return layers, glam, status, msg


def _dead(ctx, i):
    return ctx.scales[i] <= 0


def _realize_sparsity(ctx: _Context, sparsity: float, score_q: np.ndarray):
    """Exact-count masks: (kept, lam per layer, global lam, pruning error, pruned s^2)."""
    from .select import select_global
    L = len(ctx.names)
    sizes = ctx.sizes
    ws = _LazyList(ctx.arrays, ctx.names) if isinstance(ctx.arrays, _Reread) else \
        [ctx.arrays[n] for n in ctx.names]
    s2s = [ctx.scales[i] * ctx.scales[i] for i in range(L)]
    qcs = [float(score_q[i]) * s2s[i] for i in range(L)]
    deads = [_dead(ctx, i) for i in range(L)]
    n_dead = np.array([int(np.count_nonzero(d)) * (sizes[i] // max(len(d), 1))
                       for i, d in enumerate(deads)], dtype=np.int64)
    if ctx.method == "uniform":
        kept = np.zeros(L, dtype=np.int64)
        lams = np.full(L, -np.inf)
        perr = np.zeros(L)
        ps2 = np.zeros(L)
        for i in range(L):
            k = max(round(sparsity * int(sizes[i])), int(n_dead[i]))
            t0 = time.perf_counter()
            sel = select_global([ws[i]], [qcs[i]], [s2s[i]], [deads[i]], k,
                                sizes=sizes[i:i + 1])
            ctx.select_seconds += time.perf_counter() - t0
            kept[i] = sizes[i] - k
            lams[i] = sel.lam
            perr[i] = sel.pruning_error[0]
            ps2[i] = sel.pruned_s2[0]
        return kept, lams, -np.inf, perr, ps2
    N = int(sizes.sum())
    k = max(round(sparsity * N), int(n_dead.sum()))
    t0 = time.perf_counter()
    sel = select_global(ws, qcs, s2s, deads, k, sizes=sizes)
    ctx.select_seconds += time.perf_counter() - t0
    kept = sizes - sel.pruned
    lams = np.full(L, sel.lam)
    return kept, lams, sel.lam, sel.pruning_error, sel.pruned_s2


def _build_layers(ctx, bits, steps, qn, score_q, lams, kept, pred, errors=None):
    """LayerPlan rows. ``errors`` = (pruning error, pruned s_c^2 sum) per layer when the
    selection measured them; otherwise they are measured on the realized masks."""
    from .apply import layer_mask_from
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
            sc = score_layer(arr, score_q[i], s)
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
    return layers


# ---------------------------------------------------------------------------
# budget mode
# ---------------------------------------------------------------------------

@jit(parallel=True)
def _lagrangian_rows(sorted_sq, prefix, s2, bits_c, mu, out_L, out_kept):
    # For every channel c and candidate width b:  sum_w min(w^2, q_cb + mu * b)
    # where q_cb = bits_c[b] * s2[c]; sorted_sq rows ascending, prefix[c, j] = sum of first j.
    C, m = sorted_sq.shape
    nb = bits_c.shape[0]
    for c in prange(C):
        for b in range(nb):
            T = bits_c[b, 0] * s2[c] + mu * bits_c[b, 1]
            lo = 0
            hi = m
            while lo < hi:  # number of entries <= T
                mid = (lo + hi) >> 1
                if sorted_sq[c, mid] <= T:
                    lo = mid + 1
                else:
                    hi = mid
            out_L[c, b] = prefix[c, lo] + (m - lo) * T
            out_kept[c, b] = m - lo


def _sorted_layer(ctx, i):
    if i not in ctx._sorted:
        w = as_matrix(ctx.arrays[ctx.names[i]]).astype(np.float64)
        sq = np.sort(w * w, axis=1)
        pre = np.zeros((sq.shape[0], sq.shape[1] + 1))
        np.cumsum(sq, axis=1, out=pre[:, 1:])
        ctx._sorted[i] = (sq, pre)
    return ctx._sorted[i]


def _lagrangian(ctx, qn_table, bits_set, mu):
    """Per layer: chosen width index, kept count, objective (error part) at multiplier mu."""
    choice, kept_out, err_out = [], [], []
    bits_arr = np.array(bits_set, dtype=np.float64)
    for i in range(len(ctx.names)):
        sq, pre = _sorted_layer(ctx, i)
        s = ctx.scales[i]
        s2 = np.where(s > 0, s * s, 0.0)
        bc = np.stack([qn_table[i], bits_arr], axis=1)
        C = sq.shape[0]
        Lc = np.empty((C, len(bits_set)))
        Kc = np.empty((C, len(bits_set)), dtype=np.int64)
        _lagrangian_rows(sq, pre, s2, bc, float(mu), Lc, Kc)
        dead = s <= 0
        if dead.any():  # dead channels: all zero, pruned, no cost, no error
            Lc[dead] = 0.0
            Kc[dead] = 0
        Lb = Lc.sum(axis=0)
        j = int(np.argmin(Lb))  # ties -> the smaller width (bits_set ascending)
        k = int(Kc[:, j].sum())
        choice.append(j)
        kept_out.append(k)
        err_out.append(float(Lb[j] - mu * bits_set[j] * k))
    return np.array(choice), np.array(kept_out, dtype=np.int64), np.array(err_out)


def _solve_budget(ctx: _Context, budget, bits_set):
    L = len(ctx.names)
    N = int(ctx.sizes.sum())
    S = 32.0 * N / budget[1] if budget[0] == "rate" else budget[1]
    min_feasible = float(L * min(bits_set))
    use_q = ctx.method == "opq"
    # normalized constants per layer and width (Laplace: the same for all layers)
    qn_table = np.array([[em.quantization_constant(b, ctx.grid, 0.0) for b in bits_set]] * L)
    step_table = np.array([[em.optimal_step(b, ctx.grid, 0.0) for b in bits_set]] * L)
    if S < min_feasible:
        msg = (f"infeasible: budget {S:.0f} bits is below the smallest feasible "
               f"{min_feasible:.0f} bits (one {min(bits_set)}-bit weight per layer)")
        layers = _empty_layers(ctx, bits_set, step_table, qn_table, use_q)
        return layers, np.inf, 2, msg, min_feasible
    n_iter = 1 if (ctx.grid == "offset" and ctx.error_model == "laplace") else 2
    for it in range(n_iter):
        score_tab = qn_table if use_q else np.zeros_like(qn_table)
        choice, kept, mu = _bisect_mu(ctx, score_tab, bits_set, S)
        if it == n_iter - 1:
            break
        for i in range(L):
            b = bits_set[choice[i]]
            lam_i = mu * b
            for j, bb in enumerate(bits_set):
                t_mean = _mean_threshold(ctx, i, lam_i, score_tab[i, choice[i]])
                step_table[i, j], qn_table[i, j] = _layer_constants(
                    ctx, i, bb, t_mean, lam_i, score_tab[i, choice[i]])
    refined = _local_search(ctx, bits_set, qn_table if use_q else np.zeros_like(qn_table),
                            choice, S)
    if refined is not None:
        choice, kept = refined
    bits = [bits_set[j] for j in choice]
    qn = np.array([qn_table[i, choice[i]] for i in range(L)])
    steps = np.array([step_table[i, choice[i]] for i in range(L)])
    score_q = qn if use_q else np.zeros(L)
    if refined is None:
        kept = _fill_budget(ctx, bits, score_q, kept, S)
    lams = np.empty(L)
    for i in range(L):
        sc = score_layer(ctx.arrays[ctx.names[i]], score_q[i], ctx.scales[i])
        n_pruned = int(ctx.sizes[i] - kept[i])
        lams[i] = -np.inf if n_pruned == 0 else _kth_smallest(sc, n_pruned)
    pred = np.array([_predicted_sparsity_lam(ctx, score_q, lams[i])[i] for i in range(L)])
    layers = _build_layers(ctx, bits, steps, qn, score_q, lams, kept, pred)
    used = sum(b * k for b, k in zip(bits, kept))
    msg = f"size {used} bits of a budget of {S:.0f} bits (paper_rate {32.0 * N / max(used, 1):.2f}x)"
    return layers, mu, 0, msg, min_feasible


def _bisect_mu(ctx, score_tab, bits_set, S):
    """Smallest multiplier mu whose Lagrangian solution fits in S bits."""

    def cost(mu):
        choice, kept, _ = _lagrangian(ctx, score_tab, bits_set, mu)
        return sum(bits_set[j] * k for j, k in zip(choice, kept)), choice, kept

    c0, ch0, k0 = cost(0.0)
    if c0 <= S:
        return ch0, k0, 0.0
    hi = max(float(np.max(_sorted_layer(ctx, i)[0][:, -1])) for i in range(len(ctx.names)))
    hi = max(hi, 1e-300) / min(bits_set) * 2.0 + 1e-300
    ch, kp = None, None
    c_hi, ch, kp = cost(hi)
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        c, chm, kpm = cost(mid)
        if c <= S:
            hi, ch, kp = mid, chm, kpm
        else:
            lo = mid
    return ch, kp, hi


def _fill_budget(ctx, bits, score_q, kept, S):
    """Greedy repair/fill at fixed widths: at least one weight per layer, then add the
    best remaining weights (largest (w^2 - q) / bits) while they fit; never exceed S."""
    L = len(ctx.names)
    kept = kept.copy()
    for i in range(L):
        if kept[i] == 0 and np.any(ctx.scales[i] > 0):
            kept[i] = 1
    used = sum(b * k for b, k in zip(bits, kept))
    # remove from the widest layers if the forced weights overflow
    order = np.argsort([-b for b in bits], kind="stable")
    while used > S:
        for i in order:
            if kept[i] > 1:
                kept[i] -= 1
                used -= bits[i]
                break
        else:
            break
    room = S - used
    if room < min(bits):
        return kept
    # candidates: the next weights of every layer in score order, ratio (w^2 - q)/b
    cands = []
    for i in range(L):
        sc = score_layer(ctx.arrays[ctx.names[i]], score_q[i], ctx.scales[i])
        n_pruned = int(ctx.sizes[i] - kept[i])
        take = int(min(n_pruned, room // bits[i]))
        if take <= 0:
            continue
        # the `take` largest scores among the pruned ones
        top = np.partition(sc, [n_pruned - take, n_pruned - 1])[n_pruned - take:n_pruned]
        top = top[np.isfinite(top) & (top > 0)]
        cands.append(np.stack([top / bits[i], np.full(top.size, i)], axis=1))
    if not cands:
        return kept
    allc = np.concatenate(cands)
    allc = allc[np.lexsort((allc[:, 1], -allc[:, 0]))]
    for r, i in allc:
        i = int(i)
        if bits[i] <= room:
            kept[i] += 1
            room -= bits[i]
            if room < min(bits):
                break
    return kept


def _empty_layers(ctx, bits_set, step_table, qn_table, use_q):
    L = len(ctx.names)
    b = min(bits_set)
    j = bits_set.index(b)
    qn = qn_table[:, j]
    steps = step_table[:, j]
    score_q = qn if use_q else np.zeros(L)
    kept = np.zeros(L, dtype=np.int64)
    lams = np.full(L, np.inf)
    return _build_layers(ctx, [b] * L, steps, qn, score_q, lams, kept, np.ones(L))


#: Above this many (weights x candidate widths) the budget solver skips the local search.
LOCAL_SEARCH_MAX = 20_000_000


def _local_search(ctx, bits_set, score_tab, choice, S, max_passes: int = 4):
    """Improve the Lagrangian widths by single-layer width changes (small models only).

    For fixed widths the best kept set is found greedily on exact per-layer sorted scores
    (every weight of a layer costs the same bits, so the top scores of each layer are
    kept); a width change is accepted when it lowers the objective within the budget.
    Returns (choice, kept) or None when the model is too large for the search.
    """
    L = len(ctx.names)
    N = int(ctx.sizes.sum())
    if N * len(bits_set) > LOCAL_SEARCH_MAX:
        return None
    gains = []  # gains[i][j]: descending positive scores (error saved per kept weight)
    live = []
    for i in range(L):
        row = []
        for j in range(len(bits_set)):
            sc = score_layer(ctx.arrays[ctx.names[i]], score_tab[i, j], ctx.scales[i])
            sc = np.sort(sc[np.isfinite(sc)])[::-1]
            row.append(sc)
        gains.append(row)
        live.append(bool(np.any(ctx.scales[i] > 0)))

    def solve(ch):
        b = np.array([bits_set[j] for j in ch], dtype=np.float64)
        g = [gains[i][ch[i]] for i in range(L)]
        base = np.array([1 if (live[i] and g[i].size) else 0 for i in range(L)], dtype=np.int64)
        if float(np.dot(base, b)) > S:
            return None
        # ratio threshold by bisection: keep gains / b > mu (positive gains only)
        def counts(mu):
            return np.array([max(base[i], int(np.searchsorted(-g[i], -mu * b[i], side="left")))
                             if g[i].size else 0 for i in range(L)], dtype=np.int64)
        k = counts(0.0)
        if float(np.dot(k, b)) > S:
            lo, hi = 0.0, max(float(g[i][0] / b[i]) for i in range(L) if g[i].size) * 2 + 1e-300
            for _ in range(100):
                mid = 0.5 * (lo + hi)
                if not lo < mid < hi:
                    break
                if float(np.dot(counts(mid), b)) <= S:
                    hi = mid
                else:
                    lo = mid
            k = counts(hi)
            room = S - float(np.dot(k, b))
            # greedy fill with the next items by ratio
            heads = [(-(g[i][k[i]] / b[i]), i) for i in range(L) if k[i] < g[i].size and g[i][k[i]] > 0]
            heads.sort()
            import heapq
            heapq.heapify(heads)
            while heads and room >= b.min():
                r, i = heapq.heappop(heads)
                if b[i] <= room:
                    k[i] += 1
                    room -= b[i]
                    if k[i] < g[i].size and g[i][k[i]] > 0:
                        heapq.heappush(heads, (-(g[i][k[i]] / b[i]), i))
        err = -sum(float(np.sum(g[i][:k[i]])) for i in range(L))
        return err, k

    ch = list(int(c) for c in choice)
    cur = solve(ch)
    if cur is None:
        return None
    for _ in range(max_passes):
        improved = False
        for i in range(L):
            for j in range(len(bits_set)):
                if j == ch[i]:
                    continue
                trial = ch.copy()
                trial[i] = j
                res = solve(trial)
                if res is not None and res[0] < cur[0] - 1e-12 * abs(cur[0]):
                    ch, cur, improved = trial, res, True
        if not improved:
            break
    return np.array(ch), cur[1]
