"""The plan: pure data (per-layer bits, grid, steps, scales, thresholds, masks), the OPQ
rule that every part of opq shares (:func:`opq_scores`, :func:`channel_thresholds`), and
applying a plan to weights (realized masks, dequantized fake-quant weights).

A plan is plain data (``to_dict`` / ``to_json`` / ``from_dict``): any framework can call the
core and apply it. The solver that produces one is :func:`opq_core.plan`
(:mod:`opq_core.allocate`). (This module is ``_plan`` so that its name never shadows that
function on the package.)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ._results import layer_table, shape_text, total
from .kernels import fake_quant, mask_from_scores, scores
from .kernels.codebook import fake_quant_codebook
from .stats import check_weight

__all__ = ["LayerPlan", "Plan", "opq_scores", "channel_thresholds", "layer_mask",
           "layer_mask_from", "apply_layer", "compute_dtype", "PLAN_VERSION", "paper_rate",
           "rate_budget_bits"]

#: Version of the plan's dict/JSON form.
PLAN_VERSION = 1


def paper_rate(n: int, size_bits: float) -> float:
    """The papers' compression figure ``32 N / sum_i bits_i nnz_i`` of ``n`` weights stored
    in ``size_bits`` bits (no index, no codebook; ``inf`` for 0 bits).

    >>> paper_rate(1000, 4000), paper_rate(10, 0)
    (8.0, inf)
    """
    return 32.0 * n / size_bits if size_bits else math.inf


def rate_budget_bits(n: int, rate: float) -> float:
    """The size budget in bits that gives ``n`` weights the paper_rate ``rate``
    (the inverse of :func:`paper_rate`).

    >>> rate_budget_bits(1000, 8.0)
    4000.0
    """
    return 32.0 * n / rate

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
    grid : ``"offset"``, ``"symmetric"`` or ``"codebook"``.
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
    codebook : ``None`` for the uniform grids; for ``grid == "codebook"`` (a non-uniform
        quantizer shared by the layer's channels) the sorted non-zero centroids in units of
        ``channel_scale`` (float64 values exactly representable in float32, at most
        ``2**bits`` of them): a kept weight of channel c takes the nearest of
        ``channel_scale[c] * codebook``; its code is ``1 + index`` (0 = pruned), packed as
        the ``bits``-bit symbol ``index``. ``step`` is unused by the quantizer then. ANNC
        layers have ``channel_scale`` of ones (absolute units) and a stored mask.
    rule_mask : for a codebook layer, True when its mask is the OPQ rule's (``lam``,
        ``score_q``, ``channel_scale``, as on the uniform grids: an OPQ plan's
        ``grid="codebook"``/``"auto"``); False (ANNC) when the mask must be stored.
    importance_out, importance_in : ``None`` unless the plan was weighted
        (``plan(importance=)``): the per-output-channel ``g_c`` and per-input-channel
        ``h_j`` of the rule ``prune iff g_c h_j (w^2 - score_q s_c^2) < lam``
        (:mod:`opq_core._importance`).
    offset_lam : ``None`` for unweighted layers; for a weighted layer the ``lam`` of its
        offset-grid thresholds ``sqrt(max(0, offset_lam + score_q s_c^2))`` (the smallest
        unweighted score of its kept weights). A weighted layer read from a file carries
        ``offset_lam`` but not the importance: its mask is the stored one.
    channel_axis : the axis of the stored tensor that holds its output channels (0 unless
        the PyTorch adapter knew better: Hugging Face ``Conv1D`` and ``ConvTranspose*``
        store ``[in, out, ...]``, axis 1). The plan (``shape``, ``channel_scale``, masks,
        codes, decoded weights) is of ``np.moveaxis(stored, channel_axis, 0)``;
        :meth:`to_stored` turns an array of the plan's layout back, exactly. The command
        line plans every tensor as stored (axis 0), since a checkpoint file does not say
        which module owns a tensor.
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
    importance_out: np.ndarray | None = None
    importance_in: np.ndarray | None = None
    offset_lam: float | None = None
    rule_mask: bool = False
    channel_axis: int = 0

    @property
    def stored_shape(self) -> tuple:
        """The shape of the tensor as stored (``shape`` with ``channel_axis`` moved back)."""
        return tuple(self.to_stored(np.empty(self.shape, np.bool_)).shape)

    def to_stored(self, a):
        """An array of the plan's layout (channels first) in the stored tensor's layout."""
        return np.moveaxis(a, 0, self.channel_axis) if self.channel_axis else a

    def from_stored(self, a):
        """An array of the stored tensor's layout in the plan's (channels first)."""
        return np.moveaxis(a, self.channel_axis, 0) if self.channel_axis else a

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
        """Per-channel magnitude thresholds ``theta_c = sqrt(max(0, lam + score_q s_c^2))``
        (``offset_lam`` in place of ``lam`` for a weighted layer)."""
        lam = self.lam if self.offset_lam is None else self.offset_lam
        return channel_thresholds(lam, self.score_q, self.channel_scale)

    @property
    def size_bits(self) -> int:
        """Paper accounting: ``bits * kept``."""
        return int(self.bits) * int(self.kept)

    @property
    def side_bits(self) -> int:
        """Bits of the codebook in the file (float32 centroids; 0 for the uniform grids)."""
        return 32 * len(self.codebook) if self.grid == "codebook" and self.codebook is not None \
            else 0

    @property
    def mask_stored_only(self) -> bool:
        """True when the mask cannot be derived from the plan (an ANNC codebook layer)."""
        return self.grid == "codebook" and not self.rule_mask

    def to_dict(self) -> dict:
        d = {
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
        # weighted layers only, so that unweighted plans keep their exact form
        for key in ("importance_out", "importance_in"):
            v = getattr(self, key)
            if v is not None:
                d[key] = [float(x) for x in v]
        if self.offset_lam is not None:
            d["offset_lam"] = float(self.offset_lam)
        if self.rule_mask:
            d["rule_mask"] = True
        if self.channel_axis:
            d["channel_axis"] = int(self.channel_axis)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerPlan":
        d = dict(d)
        d["shape"] = tuple(int(s) for s in d["shape"])
        d["channel_scale"] = np.asarray(d["channel_scale"], dtype=np.float64)
        if d.get("codebook") is not None:
            d["codebook"] = np.asarray(d["codebook"], dtype=np.float64)
        for key in ("importance_out", "importance_in"):
            if d.get(key) is not None:
                d[key] = np.asarray(d[key], dtype=np.float64)
        if d.get("offset_lam") is not None:
            d["offset_lam"] = float(d["offset_lam"])
        d["rule_mask"] = bool(d.get("rule_mask", False))
        d["bits"] = int(d["bits"])
        d["kept"] = int(d["kept"])
        d["channel_axis"] = int(d.get("channel_axis", 0))
        if not 0 <= d["channel_axis"] < max(len(d["shape"]), 1):
            raise ValueError(f"layer {d.get('name')!r}: channel_axis {d['channel_axis']} is "
                             f"not an axis of shape {d['shape']}")
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
    """The OPQ rule as magnitude thresholds: ``sqrt(max(0, lam + score_q * s^2))`` per
    channel (float64); a weight is kept iff ``|w| >= threshold`` (see :func:`opq_scores`)."""
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
    A plan made for a budget in bytes (``plan(size_bytes=)``) carries it in
    ``budget_bytes`` and the exact size of its ``.opq`` file in ``predicted_bytes``.
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
    version: int = PLAN_VERSION
    budget_bytes: int | None = None
    predicted_bytes: int | None = None

    # ---- totals -----------------------------------------------------------------
    n = total("n")
    kept = total("kept")

    @property
    def sparsity(self) -> float:
        n = self.n
        return 1.0 - self.kept / n if n else 0.0

    size_bits = total("size_bits", doc="``sum_i bits_i * nnz_i`` over the compressed layers.")

    @property
    def paper_rate(self) -> float:
        """``32 N / sum_i bits_i nnz_i`` (no index, no codebook): the papers' figure."""
        return paper_rate(self.n, self.size_bits)

    predicted_error = total("predicted_error", float)
    pruning_error = total("pruning_error", float)

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
        return {lp.name: layer_mask(lp, self._weight(weights, lp)) for lp in self.layers}

    def apply(self, weights: Mapping, *, masks: Mapping | None = None) -> dict:
        """Dequantized (fake-quant) weights: every compressed layer pruned and quantized,
        every other tensor returned as it was."""
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
            "budget_bytes": self.budget_bytes, "predicted_bytes": self.predicted_bytes,
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
        version = int(d.get("version", PLAN_VERSION))
        if version > PLAN_VERSION:
            raise ValueError(f"plan: version {version} is newer than this opq ({PLAN_VERSION})")
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

    # how long planning took is reported, not part of what a plan is (nor of the file)
    _TIMINGS = ("stats_seconds", "solve_seconds", "select_seconds")

    def _identity(self) -> str:
        d = self.to_dict()
        for key in self._TIMINGS:
            d.pop(key)
        return json.dumps(d, sort_keys=True)

    def __eq__(self, other):
        if not isinstance(other, Plan):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self):
        return hash((self.method, len(self.layers), self.kept))

    # ---- display -------------------------------------------------------------------
    def table(self, *, max_rows: int | None = None) -> str:
        """The per-layer table with totals (plain text); layer names are never cut."""
        return layer_table(
            self.layers,
            lambda nw: (f"{'layer':<{nw}} {'shape':<18} {'n':>10} {'scale':>9} {'sparsity':>8} "
                        f"{'pred.sp':>7} {'kept':>10} {'bits':>4} {'step':>8} {'pred.err':>10}"),
            lambda lp, nw: (
                f"{lp.name:<{nw}} {shape_text(lp.shape, 18):<18} {lp.n:>10d} {lp.scale:>9.3g} "
                f"{lp.sparsity:>8.4f} {lp.predicted_sparsity:>7.4f} {lp.kept:>10d} "
                f"{lp.bits:>4d} {_step_cell(lp):>8} {lp.predicted_error:>10.4g}"),
            lambda nw: (
                f"{'total':<{nw}} {len(self.layers):>3d} layers{'':<8} {self.n:>10d} {'':>9} "
                f"{self.sparsity:>8.4f} {'':>7} {self.kept:>10d} {'':>4} {'':>8} "
                f"{self.predicted_error:>10.4g}"),
            [f"method={self.method} channelwise={self.channelwise} grid={self.grid} "
             f"error_model={self.error_model} paper_rate={self.paper_rate:.2f}x "
             f"size={self.size_bits / 8 / 1024:.1f} KiB stats={self.stats_seconds * 1e3:.1f} ms "
             f"solve={self.solve_seconds * 1e3:.1f} ms select={self.select_seconds * 1e3:.1f} ms",
             f"success={self.success} status={self.status}: {self.message}"],
            max_rows)

    def __repr__(self):
        return f"Plan(\n{self.table(max_rows=40)}\n)"


def _step_cell(lp) -> str:
    """The step, or ``cb:K`` for a codebook layer of K levels."""
    if lp.grid == "codebook":
        return f"cb:{0 if lp.codebook is None else len(lp.codebook)}"
    return f"{lp.step:.4f}"


# ---------------------------------------------------------------------------
# the OPQ rule
# ---------------------------------------------------------------------------

def opq_scores(w, score_q: float, channel_scale) -> np.ndarray:
    r"""The OPQ rule's score of every weight of one layer (flat, float64).

    Pruning a weight :math:`w` of output channel :math:`c` changes the layer's squared error
    by :math:`w^2 - q_c`, where :math:`q_c = c_B s_c^2` (``score_q * channel_scale**2``) is
    the quantization error the weight would cost if kept. One global multiplier
    :math:`\lambda` (the realized score quantile) then decides every weight of the network:

    .. math::

        \text{prune } w \iff w^2 - q_c < \lambda
        \iff |w| < \theta_c = \sqrt{\max(0, \lambda + q_c)}.

    ``score_q = 0`` gives global magnitude pruning. Channels with scale 0 score ``-inf``
    (always pruned). This is the one definition the solvers, :meth:`Plan.masks`, the format
    and the tests use (computed by the kernel :func:`opq_core.kernels.scores`);
    :func:`channel_thresholds` is the same rule as a per-channel magnitude threshold.

    >>> opq_scores(np.array([[0.5, -2.0]]), 1.0, [1.0])
    array([-0.75,  3.  ])
    """
    s = np.asarray(channel_scale, dtype=np.float64)
    return scores(np.asarray(w), float(score_q) * (s * s), s <= 0)


#: Former name of :func:`opq_scores`.
score_layer = opq_scores


# ---------------------------------------------------------------------------
# applying a plan
# ---------------------------------------------------------------------------


def compute_dtype(dtype) -> np.dtype:
    """The float dtype the kernels compute a layer in: float32/float64 as given, float16
    (and anything else) in float32; results are cast back to the layer's dtype."""
    dt = np.dtype(dtype)
    return dt if dt in (np.float32, np.float64) else np.dtype(np.float32)


def layer_mask_from(score: np.ndarray, lam: float, kept: int, name: str = "?") -> np.ndarray:
    """Flat mask keeping every score > lam, then the first (flat order) ties == lam up
    to exactly ``kept`` kept entries (the kernel :func:`opq_core.kernels.mask_from_scores`)."""
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    try:
        return mask_from_scores(score, lam, kept)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc} (weights differ from the planned ones?)") from None


def layer_mask(lp, w) -> np.ndarray:
    """The realized boolean mask (shape of the layer) of plan layer ``lp``."""
    g = getattr(lp, "importance_out", None)
    h = getattr(lp, "importance_in", None)
    if g is not None or h is not None:
        from ._importance import weighted_scores
        score = weighted_scores(w, lp.score_q, lp.channel_scale, g, h)
        return layer_mask_from(score, lp.lam, lp.kept, lp.name).reshape(lp.shape)
    if getattr(lp, "offset_lam", None) is not None:
        raise ValueError(f"layer {lp.name!r}: an importance-weighted layer without its "
                         "importance (read from a file?) needs its stored mask; pass masks=")
    score = score_layer(w, lp.score_q, lp.channel_scale)
    return layer_mask_from(score, lp.lam, lp.kept, lp.name).reshape(lp.shape)


def apply_layer(lp, w, mask=None) -> np.ndarray:
    """Dequantized weights of one layer (same dtype as ``w``)."""
    w = np.asarray(w)
    if mask is None:
        if getattr(lp, "mask_stored_only", lp.grid == "codebook"):
            raise ValueError(f"layer {lp.name!r}: a codebook (ANNC) layer needs its stored mask; "
                             "pass masks=")
        mask = layer_mask(lp, w)
    dtype = compute_dtype(w.dtype)
    if lp.grid == "codebook":
        out = fake_quant_codebook(w.astype(dtype, copy=False), np.asarray(mask, dtype=bool),
                                  lp.codebook, scale=lp.kernel_scale, name=lp.name)
        return out.astype(w.dtype, copy=False)
    out = fake_quant(w.astype(dtype, copy=False), np.asarray(mask, dtype=bool), lp.kernel_scale,
                     lp.thresholds, lp.step, lp.bits, lp.grid, layer=lp.name)
    return out.astype(w.dtype, copy=False)
