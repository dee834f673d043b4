r"""Install an opq plan into a PyTorch model with ``torch.nn.utils.parametrize``.

After :func:`compress`, every compressed layer's ``weight`` is computed on access from an
ordinary latent Parameter (``<module>.parametrizations.weight.original``) by a
:class:`QuantizedWeight` parametrization:

.. math:: W_{\text{eff}} = [\text{mask}] \cdot Q(W_{\text{latent}})

with a straight-through gradient (:mod:`opq_torch.ste`). Any optimizer, scheduler, AMP or
DistributedDataParallel works unchanged. The mask, the channel scales and the thresholds
are buffers, and the rest of the layer's plan (bits, grid, step, codebook) is the
parametrization's extra state, so ``state_dict()`` holds everything a fresh model needs.

Layer names are the ``state_dict`` names of the original model's weights (e.g.
``"features.0.weight"``). Compressed modules: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (grouped and
depthwise included) and ``nn.ConvTranspose1d/2d/3d`` with a floating weight of ``ndim >= 2``.
Every weight is planned as it is stored, with ``shape[0]`` as the channel axis of the scales:
for convolutions and linear layers that is the output channel; for a transposed convolution,
whose weight is ``(in, out / groups, *kernel)``, it is the *input* channel. Every other tensor
(embeddings, norms, biases, other parameters) is left alone and listed in ``Plan.skipped``.

Restoring a checkpoint into a fresh model
-----------------------------------------
A state_dict of a compressed model loads into a model compressed with the same plan and
masks. :func:`restore` does both from the state_dict alone::

    sd = model.state_dict()                 # or torch.load(...)
    fresh = Net()
    opq_torch.restore(fresh, sd)            # compress(fresh, plan, masks=...) + load_state_dict

or by hand: ``compress(fresh, plan_of(model), masks=masks_of(model))`` then
``fresh.load_state_dict(sd)``.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

import opq_core
from opq_core.allocate import LayerPlan, Plan
from opq_core.apply import layer_mask

from . import calibrate as _cal

from .ste import CodebookSTE, FakeQuantSTE

__all__ = ["compress", "restore", "quantizers", "is_compressed", "plan_of", "masks_of", "compressed_weights",
           "strip", "plan_from_state_dict", "QuantizedWeight", "COMPRESSIBLE"]

#: Module types whose ``weight`` is compressed.
COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_STATE_VERSION = 1
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _plan_meta(plan: Plan) -> dict:
    d = plan.to_dict()
    d.pop("layers", None)
    d.pop("totals", None)
    return d


class QuantizedWeight(nn.Module):
    r"""The parametrization of one compressed weight: mask + fake-quant, straight-through.

    Buffers (in ``state_dict``): ``mask`` (bool, the weight's shape), ``scale`` and
    ``threshold`` (float64, one per channel: :math:`s_c`, :math:`\theta_c`), ``codebook``
    (float64; empty unless ``grid == "codebook"``). Extra state: the layer's
    :class:`~opq_core.LayerPlan` and the plan's totals. The float64 buffers keep their dtype
    through ``model.half()`` / ``model.to(dtype)``.

    Parameters
    ----------
    layer : LayerPlan
    mask : bool Tensor of the layer's shape
    meta : dict
        The plan's fields other than its layers (method, lam, skipped, ...).
    index : int
        Position of the layer in the plan.
    """

    def __init__(self, layer: LayerPlan, mask: torch.Tensor, meta: dict | None = None,
                 index: int = 0):
        super().__init__()
        dev = mask.device
        self.register_buffer("mask", mask.to(torch.bool).contiguous())
        self.register_buffer("scale", torch.empty(0, dtype=torch.float64, device=dev))
        self.register_buffer("threshold", torch.empty(0, dtype=torch.float64, device=dev))
        self.register_buffer("codebook", torch.empty(0, dtype=torch.float64, device=dev))
        self.meta = dict(meta or {})
        self.index = int(index)
        self._set_layer(layer)

    # ---- state -------------------------------------------------------------------------
    def _set_layer(self, layer: LayerPlan, *, buffers: bool = True):
        self.layer = layer
        self.name = layer.name
        self.bits = int(layer.bits)
        self.grid = str(layer.grid)
        self.step = float(layer.step)
        if buffers:
            self._reset_buffers()

    def _exact_buffers(self):
        lp = self.layer
        if lp.grid == "codebook":
            s = np.zeros(0)
            th = np.zeros(0)
            cb = np.asarray(lp.codebook if lp.codebook is not None else [], dtype=np.float64)
        else:
            s = lp.kernel_scale  # dead channels: scale 1 (pruned whole, decode to 0)
            th = lp.thresholds
            cb = np.zeros(0)
        return s, th, cb

    def _reset_buffers(self):
        dev = self.mask.device
        s, th, cb = self._exact_buffers()
        self.scale = torch.tensor(s, dtype=torch.float64, device=dev)
        self.threshold = torch.tensor(th, dtype=torch.float64, device=dev)
        self.codebook = torch.tensor(cb, dtype=torch.float64, device=dev)

    def _apply(self, fn, recurse=True):
        # Module.half()/.to(dtype) would round the float64 quantizer state: move it, keep it.
        keep = {k: getattr(self, k) for k in ("scale", "threshold", "codebook")}
        out = super()._apply(fn, recurse)
        dev = self.mask.device
        for k, v in keep.items():
            setattr(self, k, v.to(device=dev))
        return out

    def get_extra_state(self):
        return {"version": _STATE_VERSION, "index": self.index,
                "layer": self.layer.to_dict(), "plan": dict(self.meta)}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "layer" not in state:
            raise ValueError(f"layer {self.name!r}: the state_dict holds no opq layer plan "
                             f"(got {type(state).__name__})")
        if int(state.get("version", 1)) > _STATE_VERSION:
            raise ValueError(f"layer {self.name!r}: opq state version {state['version']} is "
                             f"newer than this opq_torch ({_STATE_VERSION})")
        layer = LayerPlan.from_dict(state["layer"])
        if tuple(layer.shape) != tuple(self.mask.shape):
            raise ValueError(f"layer {self.name!r}: the state_dict's plan has shape "
                             f"{tuple(layer.shape)}, this model's weight {tuple(self.mask.shape)}")
        self.meta = dict(state.get("plan", {}))
        self.index = int(state.get("index", self.index))
        # the buffers come with the same state_dict; they are loaded as they are
        self._set_layer(layer, buffers=False)

    def update(self, layer: LayerPlan | None = None, mask=None):
        """Replace the layer's plan and/or mask in place (e.g. a training-time method that
        moves masks and codebooks); the latent weight is not touched.

        ``mask`` (bool array or tensor of the weight's shape) is copied onto the buffer's
        device; ``layer`` must have the same name and shape.
        """
        if layer is not None:
            if not isinstance(layer, LayerPlan):
                raise TypeError(f"update: layer must be a LayerPlan, got {type(layer).__name__}")
            if layer.name != self.name or tuple(layer.shape) != tuple(self.mask.shape):
                raise ValueError(f"update: layer {layer.name!r} with shape {tuple(layer.shape)} "
                                 f"does not fit {self.name!r} with shape "
                                 f"{tuple(self.mask.shape)}")
        if mask is not None:
            m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
            if m.dtype != torch.bool or tuple(m.shape) != tuple(self.mask.shape):
                raise ValueError(f"update: mask of layer {self.name!r} must be a bool array of "
                                 f"shape {tuple(self.mask.shape)}, got {m.dtype} "
                                 f"{tuple(m.shape)}")
            with torch.no_grad():
                self.mask.copy_(m)
        if layer is not None:
            self._set_layer(layer)

    # ---- forward -----------------------------------------------------------------------
    def forward(self, w):
        if self.grid == "codebook":
            return CodebookSTE.apply(w, self.mask, self.codebook)
        return FakeQuantSTE.apply(w, self.mask, self.scale, self.threshold, self.step,
                                  self.bits, self.grid)

    def extra_repr(self):
        lp = self.layer
        return (f"name={self.name!r}, bits={self.bits}, grid={self.grid!r}, "
                f"sparsity={lp.sparsity:.4f}")


# --------------------------------------------------------------------------------------
# finding the layers
# --------------------------------------------------------------------------------------

def _check_model(model, fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def _ours(module):
    """The QuantizedWeight of a module's weight, or None."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    for p in plist:
        if isinstance(p, QuantizedWeight):
            return p
    return None


def _compressed_modules(model):
    """[(module path, module, QuantizedWeight)] in module order."""
    out = []
    for path, mod in model.named_modules():
        q = _ours(mod)
        if q is not None:
            out.append((path, mod, q))
    return out


def is_compressed(model) -> bool:
    """True when some layer of ``model`` carries an opq parametrization.

    >>> is_compressed(torch.nn.Linear(2, 2))
    False
    """
    _check_model(model, "is_compressed")
    return bool(_compressed_modules(model))


def _candidates(model):
    """Compressible weights: {state_dict name: (module, module path)}."""
    chosen = {}
    seen = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, COMPRESSIBLE):
            continue
        w = mod._parameters.get("weight") if "weight" in mod._parameters else None
        if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT or w.dim() < 2:
            continue
        if w.numel() == 0:
            continue
        name = f"{path}.weight" if path else "weight"
        if id(w) in seen:  # a weight shared by several modules stays float
            chosen.pop(seen[id(w)], None)
            continue
        seen[id(w)] = name
        chosen[name] = (mod, path)
    return chosen


def _numpy_weight(w):
    t = w.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


# --------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------

def compress(model, plan=None, *, sparsity=None, bits=4, rate=None, budget_bits=None,
             method="opq", channelwise="unified", grid="offset", error_model="laplace",
             exclude=None, masks=None, sensitivity="auto", calibration=None,
             compensate=None, example=None) -> Plan:
    r"""Plan (or take a plan) and install it: prune + quantize every conv/linear weight.

    The latent weights stay the model's Parameters (now at
    ``<module>.parametrizations.weight.original``); every access to ``<module>.weight``
    returns the pruned, fake-quantized weight with a straight-through gradient. The plan
    (masks, scales, thresholds, steps) is fixed: only the latent weights train.

    Parameters
    ----------
    model : nn.Module
        Modified in place (not yet compressed).
    plan : opq_core.Plan, optional
        A plan for this model (layer names = ``state_dict`` names of the weights, shapes
        must match). When omitted it is computed from the model's weights by
        :func:`opq_core.plan` with the keyword arguments below.
    sparsity, bits, rate, budget_bits, method, channelwise, grid, error_model
        As in :func:`opq_core.plan`. ``bits`` is 4 by default; in budget mode
        (``rate``/``budget_bits``) pass a set of candidates, or ``bits=None`` to let every
        layer choose among 1..8.
    exclude : str or sequence of str, optional
        Module names (``"classifier.2"``) or weight names (``"classifier.2.weight"``) to
        leave alone.
    masks : dict name -> bool array, optional
        Masks to install instead of those derived from the plan and the weights (needed for
        codebook layers, and for a fresh model that will load a checkpoint).
    sensitivity : "auto" (default), None, or a mapping
        The ``importance=`` of :func:`opq_core.plan` (ignored when ``plan`` is given).
        ``"auto"``, data-free: ``g_c = (gamma_c / sqrt(var_c + eps))^2`` for a layer
        followed by a BatchNorm, ``h_j = gamma_j^2 + beta_j^2`` for a layer fed by a
        LayerNorm/BatchNorm (module graph by torch.fx, or hooks on ``example``); with
        ``calibration``, ``h_j = E[x_j^2]`` measured on the layer's inputs instead. Each
        vector is divided by its mean (importance reweighs the weights within a layer; the
        balance between layers stays the plan's). None: the unweighted rule. A mapping:
        passed as is to :func:`opq_core.plan`, unnormalized.
        See :mod:`opq_torch.calibrate`.
    calibration : iterable of batches, optional
        A few batches (128-256 samples; tensors, ``(input, target)`` pairs or keyword
        dicts) of unlabeled inputs, e.g. with the training transform. One no-grad pass of
        the dense model gives every layer's input statistics; then the kept weights are
        compensated (``compensate``) and BatchNorm statistics re-estimated on the compressed
        model (:func:`opq_torch.recalibrate`). The plan, hence the file size, is the same.
    compensate : bool, optional
        OBS/GPTQ error compensation of the kept weights on the plan's masks and grids
        (:func:`opq_core.compensate.compensate_layer`); default True when ``calibration``
        is given. Layers wider than ``opq_torch.calibrate.MAX_HESSIAN`` unfolded inputs and
        grouped convolutions are left as planned.
    example : one input batch, optional
        Used by ``sensitivity="auto"`` when torch.fx cannot trace the model.

    Returns
    -------
    opq_core.Plan
        The installed plan; ``plan.skipped`` lists every other ``state_dict`` entry when the
        plan was computed here.

    Raises
    ------
    ValueError
        The model is already compressed; an ``exclude`` name is not in the model; a plan
        layer is missing from the model or has another shape; a mask has the wrong shape.

    Examples
    --------
    >>> import torch, opq_torch
    >>> torch.manual_seed(0) and None
    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> p = opq_torch.compress(net, sparsity=0.9, bits=4)
    >>> p.names, p.skipped
    (['0.weight', '2.weight'], ('0.bias', '2.bias'))
    >>> int((net[0].weight == 0).sum() + (net[2].weight == 0).sum()) == round(0.9 * (2048 + 640))
    True
    """
    fn = "compress"
    _check_model(model, fn)
    done = _compressed_modules(model)
    if done:
        path, _, q = done[0]
        raise ValueError(f"{fn}: model is already compressed (layer {q.name!r} at module "
                         f"{path!r} has an opq parametrization); compress a fresh model, or "
                         f"strip() this one first")
    cal_stats = None
    if calibration is not None:
        calibration = list(calibration)
        if not calibration:
            raise ValueError(f"{fn}: calibration is empty (give a few batches, or None)")
    if compensate and calibration is None:
        raise ValueError(f"{fn}: compensate=True needs calibration= batches")
    chosen = _candidates(model)
    module_names = {p for p, _ in model.named_modules()}
    sd_names = set(model.state_dict().keys())

    # ---- exclude ----
    if exclude is None:
        excl = []
    elif isinstance(exclude, str):
        excl = [exclude]
    else:
        excl = list(exclude)
    drop = set()
    for e in excl:
        if not isinstance(e, str):
            raise TypeError(f"{fn}: exclude must hold layer names (str), got {e!r}")
        if e in chosen or e in sd_names:
            drop.add(e)
        elif e in module_names:
            drop.add(f"{e}.weight" if e else "weight")
        else:
            raise ValueError(f"{fn}: exclude names layer {e!r}, which is neither a module nor a "
                             f"state_dict entry of this model")

    # ---- the plan ----
    if plan is None:
        weights = {n: _numpy_weight(mod.weight) for n, (mod, _) in chosen.items()
                   if n not in drop}
        if not weights:
            raise ValueError(f"{fn}: model has no compressible layer (Linear, Conv*, "
                             f"ConvTranspose* with a floating weight) left after exclude={excl}")
        kw = {} if bits is None else {"bits": bits}
        if calibration is not None:
            cal_stats = _cal.calibration_stats(model, calibration, weights)
        importance = _importance_for(model, weights, sensitivity, example, cal_stats, method)
        plan = opq_core.plan(weights, sparsity=sparsity, rate=rate, budget_bits=budget_bits,
                             method=method, channelwise=channelwise, grid=grid,
                             error_model=error_model, importance=importance, **kw)
        planned = set(plan.names)
        plan = replace(plan, skipped=tuple(k for k in model.state_dict() if k not in planned))
    else:
        if not isinstance(plan, Plan):
            raise TypeError(f"{fn}: plan must be an opq_core.Plan, got {type(plan).__name__}")
        if drop & set(plan.names):
            keep = tuple(lp for lp in plan.layers if lp.name not in drop)
            if not keep:
                raise ValueError(f"{fn}: exclude={excl} removes every layer of the plan")
            plan = replace(plan, layers=keep,
                           skipped=tuple(plan.skipped) + tuple(n for n in plan.names if n in drop))
        for lp in plan.layers:
            if lp.name not in chosen:
                what = ("is not a weight of a Linear/Conv/ConvTranspose module"
                        if lp.name in sd_names else "is not in this model")
                raise ValueError(f"{fn}: plan layer {lp.name!r} {what} (a plan for another model?)")
            shape = tuple(chosen[lp.name][0].weight.shape)
            if shape != tuple(lp.shape):
                raise ValueError(f"{fn}: plan layer {lp.name!r} has shape {tuple(lp.shape)}, the "
                                 f"model's weight has shape {shape} (a plan for another model?)")

    if calibration is not None and cal_stats is None:
        cal_stats = _cal.calibration_stats(model, calibration, set(plan.names))

    # ---- masks ----
    masks = {} if masks is None else dict(masks)
    for name in masks:
        if name not in plan:
            raise ValueError(f"{fn}: masks has an entry for {name!r}, which is not a plan layer")
    installed = {}
    for lp in plan.layers:
        mod = chosen[lp.name][0]
        w = mod.weight
        if lp.name in masks:
            m = masks[lp.name]
            m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
            if m.dtype != np.bool_:
                raise TypeError(f"{fn}: masks[{lp.name!r}] must be boolean, got dtype {m.dtype}")
            if tuple(m.shape) != tuple(lp.shape):
                raise ValueError(f"{fn}: masks[{lp.name!r}] has shape {tuple(m.shape)}, the "
                                 f"layer has shape {tuple(lp.shape)}")
        elif lp.grid == "codebook":
            raise ValueError(f"{fn}: layer {lp.name!r} is a codebook (ANNC) layer; its mask "
                             f"cannot be derived from the plan, pass masks={{{lp.name!r}: ...}}")
        else:
            try:
                m = layer_mask(lp, _numpy_weight(w))
            except ValueError as exc:
                raise ValueError(f"{fn}: {exc}. To install a plan on other weights (e.g. a "
                                 f"fresh model that will load a checkpoint) pass masks= "
                                 f"(masks_of(model)) or use restore()") from None
        installed[lp.name] = torch.from_numpy(np.ascontiguousarray(m)).to(w.device)

    # ---- install ----
    for name in installed:
        mod = chosen[name][0]
        if parametrize.is_parametrized(mod, "weight"):
            raise ValueError(f"{fn}: layer {name!r} already has a parametrization on its "
                             f"weight ({type(mod.parametrizations.weight[0]).__name__}); "
                             f"opq cannot stack on it")
    meta = _plan_meta(plan)
    for i, lp in enumerate(plan.layers):
        mod = chosen[lp.name][0]
        # an importance-weighted layer is installed with its mask and without its importance
        # (what the .opq file stores too); the returned plan keeps it (plan.masks works)
        lp = replace(lp, importance_out=None, importance_in=None)
        q = QuantizedWeight(lp, installed[lp.name], meta, index=i)
        parametrize.register_parametrization(mod, "weight", q)

    # ---- calibration: compensation, then BatchNorm statistics ----
    if compensate is None:
        compensate = calibration is not None
    if compensate:
        _cal.compensate(model, cal_stats)
    if calibration is not None:
        _cal.recalibrate(model, calibration)
    return plan


def _unit_mean(v):
    """``v / mean(v)``; None when that is constant (a fresh norm: the unweighted rule)."""
    if v is None:
        return None
    u = v / float(np.mean(v))
    return None if float(u.max() - u.min()) <= 1e-12 else u


def _importance_for(model, weights, sensitivity, example, cal_stats, method):
    """The ``importance=`` of opq_core.plan for compress(sensitivity=...)."""
    if sensitivity is None or method == "uniform":
        return None
    if isinstance(sensitivity, str):
        if sensitivity != "auto":
            raise ValueError(f"compress: sensitivity must be 'auto', None or a mapping, got "
                             f"{sensitivity!r}")
        imp = _cal.sensitivity(model, weights, example)
        if cal_stats:
            for name, st in cal_stats.items():
                g = imp.get(name, (None, None))[0]
                h = _cal._positive(st.moment)
                if g is not None or h is not None:
                    imp[name] = (g, h)
        # each layer's importance averages 1: it redistributes the error within a layer and
        # leaves the balance between layers to the plan (absolute gains, in the units of
        # each norm, collapsed CREPE-tiny at sparsity 0.75 / 3 bits: benchmarks/results)
        imp = {k: tuple(_unit_mean(v) for v in gh) for k, gh in imp.items()}
        imp = {k: gh for k, gh in imp.items() if gh[0] is not None or gh[1] is not None}
        return imp or None
    return sensitivity


# --------------------------------------------------------------------------------------
# queries
# --------------------------------------------------------------------------------------

def _require(model, fn):
    _check_model(model, fn)
    mods = _compressed_modules(model)
    if not mods:
        raise ValueError(f"{fn}: model is not compressed (no layer has an opq parametrization)")
    return mods


def quantizers(model) -> dict:
    """``{layer name: QuantizedWeight}`` of a compressed model (to inspect or
    :meth:`~QuantizedWeight.update` a layer)."""
    return {q.name: q for _, _, q in _require(model, "quantizers")}


def plan_of(model) -> Plan:
    """The plan installed in ``model`` (as restored by ``load_state_dict``, if it was).

    Works through wrappers such as DistributedDataParallel: layer names are the names
    given at :func:`compress` time.
    """
    mods = _require(model, "plan_of")
    qs = sorted((q for _, _, q in mods), key=lambda q: q.index)
    return _plan_from(qs[0].meta, [q.layer for q in qs])


def _plan_from(meta, layers):
    d = dict(meta)
    d["layers"] = [lp.to_dict() for lp in layers]
    if "lam" not in d:
        d.update(method="opq", channelwise="unified", grid=layers[0].grid,
                 error_model="laplace", target_sparsity=None, budget_bits=None,
                 lam=float(layers[0].lam))
    return Plan.from_dict(d)


def masks_of(model) -> dict:
    """``{layer name: bool ndarray}`` (copies on the CPU) of a compressed model."""
    mods = _require(model, "masks_of")
    return {q.name: q.mask.detach().cpu().numpy().copy() for _, _, q in mods}


def compressed_weights(model) -> dict:
    """``{layer name: ndarray}``: the effective (pruned, dequantized) weights on the CPU.

    Same dtype as the weights (bfloat16, which NumPy lacks, comes back as float32).
    """
    mods = _require(model, "compressed_weights")
    out = {}
    with torch.no_grad():
        for _, mod, q in mods:
            out[q.name] = _numpy_weight(mod.weight).copy()
    return out


def strip(model) -> nn.Module:
    """A deep copy of ``model`` whose weights are plain Parameters holding the compressed
    values (for inference, TorchScript or ONNX export); ``model`` is left untouched."""
    _require(model, "strip")
    out = copy.deepcopy(model)
    for _, mod, q in _compressed_modules(out):
        plist = mod.parametrizations.weight
        if len(plist) != 1:
            raise ValueError(f"strip: layer {q.name!r} has {len(plist)} parametrizations on "
                             f"its weight; only opq's can be removed")
        # a deep copy shares the parametrized class with the original module, and removing
        # a parametrization deletes the property from that class: give the copy its own.
        cls = type(mod)
        ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        mod.__class__ = type(cls.__name__, cls.__bases__, ns)
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return out


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------

_MARK = ".parametrizations.weight.0._extra_state"


def _opq_entries(state_dict):
    """[(module path, extra state)] of the opq layers of a state_dict."""
    out = []
    for k, v in state_dict.items():
        if k.endswith(_MARK) and isinstance(v, dict) and "layer" in v:
            out.append((k[: -len(_MARK)], v))
        elif k == _MARK[1:] and isinstance(v, dict) and "layer" in v:
            out.append(("", v))
    return out


def plan_from_state_dict(state_dict) -> tuple:
    """``(plan, masks)`` stored in the state_dict of a compressed model.

    ``masks`` maps layer names to bool ndarrays. The plan's layer names are the names
    given at :func:`compress` time.
    """
    entries = _opq_entries(state_dict)
    if not entries:
        raise ValueError("plan_from_state_dict: the state_dict holds no opq layer "
                         f"(no key ending in {_MARK!r}); was it saved from a compressed model?")
    entries.sort(key=lambda e: int(e[1].get("index", 0)))
    layers, masks = [], {}
    for path, st in entries:
        lp = LayerPlan.from_dict(st["layer"])
        key = (path + "." if path else "") + "parametrizations.weight.0.mask"
        if key not in state_dict:
            raise ValueError(f"plan_from_state_dict: layer {lp.name!r} has no mask ({key!r})")
        m = state_dict[key]
        masks[lp.name] = (m.detach().cpu().numpy() if isinstance(m, torch.Tensor)
                          else np.asarray(m)).astype(bool, copy=True)
        layers.append(lp)
    return _plan_from(entries[0][1].get("plan", {}), layers), masks


def restore(model, state_dict, *, strict: bool = True) -> Plan:
    """Compress a fresh ``model`` as the state_dict's model was, then load the state_dict.

    Equivalent to ``plan, masks = plan_from_state_dict(sd)``,
    ``compress(model, plan, masks=masks)``, ``model.load_state_dict(sd, strict=strict)``.
    Returns the plan.
    """
    _check_model(model, "restore")
    plan, masks = plan_from_state_dict(state_dict)
    compress(model, plan, masks=masks)
    model.load_state_dict(state_dict, strict=strict)
    return plan
