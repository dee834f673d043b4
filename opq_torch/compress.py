r"""Install an opq plan into a PyTorch model with ``torch.nn.utils.parametrize``.

After :func:`compress`, every compressed layer's ``weight`` is computed on access from an
ordinary latent Parameter (``<module>.parametrizations.weight.original``) by a
:class:`QuantizedWeight` parametrization:

.. math:: W_{\text{eff}} = [\text{mask}] \cdot Q(W_{\text{latent}})

with a straight-through gradient (:mod:`opq_torch.ste`). Any optimizer, scheduler, AMP or
DistributedDataParallel works unchanged. The mask, the channel scales and the thresholds
are buffers, and the rest of the layer's plan (bits, grid, step, codebook) is the
parametrization's extra state, so ``state_dict()`` holds everything a fresh model needs.

Layer names are the ``state_dict`` names of the original model's tensors (e.g.
``"features.0.weight"``). Compressible: every floating ``state_dict`` tensor with
``ndim >= 2``, whatever module owns it (Linear, Conv*, ConvTranspose*, Embedding, Hugging
Face Conv1D, bare Parameters such as ``in_proj_weight``, persistent buffers): the rule of
the command line, so a ``.opq`` file written by ``opq compress`` loads into the model.
Every tensor is planned as it is stored, with ``shape[0]`` as the channel axis of the
scales (the input channel for ConvTranspose* and Conv1D, see :mod:`opq_torch._layers`).
A tensor shared by several modules (tied embeddings) is compressed once, under its first
``state_dict`` name, and every owner reads the same compressed tensor (the other owners'
entries leave the ``state_dict``, as ``save_pretrained`` drops tied names). Every other
tensor (norms, biases, integer buffers) is left alone and listed in ``Plan.skipped``.

Hugging Face: ``save_pretrained`` and ``Trainer`` checkpoints of a compressed model hold
the latent weights, the masks, the quantizer buffers and the plan (a uint8 tensor of
JSON per layer); :func:`opq_torch.load_pretrained` reads such a folder back into a freshly
built model.

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
import re
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

import opq_core
from opq_core.allocate import LayerPlan, Plan
from opq_core.apply import layer_mask

from . import calibrate as _cal
from ._layers import discover
from ._numpy import to_numpy as _numpy_weight
from .parametrize import _STATE_VERSION, QuantizedWeight, _decode_state, _plan_meta  # noqa: F401

__all__ = ["compress", "restore", "quantizers", "is_compressed", "plan_of", "masks_of", "compressed_weights",
           "strip", "plan_from_state_dict", "QuantizedWeight", "COMPRESSIBLE"]

#: Module types whose ``weight`` was compressed by opq 0.1 (kept for old imports; every
#: floating tensor with ndim >= 2 is compressible now, see :mod:`opq_torch._layers`).
COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)



# --------------------------------------------------------------------------------------
# finding the layers
# --------------------------------------------------------------------------------------

def _check_model(model, fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def _ours(module):
    """[(tensor name, QuantizedWeight)] of a module's opq parametrizations."""
    plists = getattr(module, "parametrizations", None)
    if plists is None:
        return []
    out = []
    for attr, plist in plists.items():
        for p in plist:
            if isinstance(p, QuantizedWeight):
                out.append((attr, p))
    return out


def _compressed_modules(model):
    """[(module path, module, tensor name, QuantizedWeight)] in module order."""
    out = []
    for path, mod in model.named_modules():
        for attr, q in _ours(mod):
            out.append((path, mod, attr, q))
    return out


def is_compressed(model) -> bool:
    """True when some layer of ``model`` carries an opq parametrization.

    >>> is_compressed(torch.nn.Linear(2, 2))
    False
    """
    _check_model(model, "is_compressed")
    return bool(_compressed_modules(model))


# ---- shared tensors: the other owners read the first owner's (compressed) tensor ----------

def _tie(mod, attr, primary, pattr):
    """Make ``mod.<attr>`` a read-only view of ``primary.<pattr>`` (its compressed value)."""
    kind = "parameter" if attr in mod._parameters else "buffer"
    if kind == "parameter":
        del mod._parameters[attr]
    else:
        del mod._buffers[attr]
    ties = mod.__dict__.setdefault("_opq_ties", {})
    ties[attr] = (primary, pattr, kind)
    cls = type(mod)
    if not cls.__dict__.get("_opq_tied_class", False):
        cls = type(cls.__name__, (cls,), {"_opq_tied_class": True})
        mod.__class__ = cls

    def get(self, _a=attr):
        owner, name, _ = self.__dict__["_opq_ties"][_a]
        return getattr(owner, name)

    setattr(cls, attr, property(get, doc=f"opq: tied to {pattr!r} of another module"))


def _untie(mod):
    """Undo :func:`_tie`: ``mod`` holds its owner's current tensor again (the tie kept)."""
    ties = mod.__dict__.pop("_opq_ties")
    mod.__class__ = type(mod).__bases__[0]
    for attr, (owner, name, kind) in ties.items():
        t = getattr(owner, name)
        (mod._parameters if kind == "parameter" else mod._buffers)[attr] = t


# --------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------

def compress(model, plan=None, *, sparsity=None, bits=4, rate=None, budget_bits=None,
             size_bytes=None, layout="entropy", method="opq", channelwise="unified",
             grid="offset", error_model="fitted",
             exclude=None, masks=None, sensitivity=None, calibration=None,
             compensate=None, example=None, channel_axis="stored") -> Plan:
    r"""Plan (or take a plan) and install it: prune + quantize every compressible tensor.

    ``channel_axis="output"`` plans the channel scales of Hugging Face ``Conv1D`` and
    ungrouped ``ConvTranspose*`` weights (stored ``[in, out, ...]``) along their output
    channels (``LayerPlan.channel_axis = 1``, recorded in the plan and the .opq file);
    the default ``"stored"`` plans every tensor along ``shape[0]``, as the command line
    does (see :mod:`opq_torch._layers`).

    Compressible (:mod:`opq_torch._layers`): every floating ``state_dict`` tensor with
    ``ndim >= 2``, whatever module owns it (Linear, Conv*, ConvTranspose*, Embedding,
    Hugging Face Conv1D, bare Parameters such as ``nn.MultiheadAttention.in_proj_weight``),
    the same tensors that ``opq compress`` selects in the model's checkpoint. A tensor
    shared by several modules (tied embeddings) is one layer named by its first
    ``state_dict`` name; every owner reads the same compressed tensor.

    The latent weights stay the model's Parameters (now at
    ``<module>.parametrizations.<name>.original``); every access to ``<module>.<name>``
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
    size_bytes : int, optional
        A budget in bytes of the file :func:`opq_torch.save` writes right after this call
        (with ``layout`` and no metadata): every other ``state_dict`` tensor and the side
        information count; ``plan.predicted_bytes`` is that file's exact size, never more
        than ``size_bytes`` (:func:`opq_core.plan`). Compensation (``calibration``) and
        fine-tuning keep the plan but change the codes, hence the entropy-coded size
        (``layout="packed"`` stays within a few bytes: the header).
    layout : {"entropy", "packed"}
        With ``size_bytes``: the layout the budget counts.
    exclude : str or sequence of str, optional
        Module names (``"classifier.2"``, everything under it) or ``state_dict`` names
        (``"classifier.2.weight"``) to leave alone.
    masks : dict name -> bool array, optional
        Masks to install instead of those derived from the plan and the weights (needed for
        codebook layers, and for a fresh model that will load a checkpoint).
    sensitivity : None (default), "auto", or a mapping
        The ``importance=`` of :func:`opq_core.plan` (ignored when ``plan`` is given).
        ``"auto"``, data-free: ``g_c = (gamma_c / sqrt(var_c + eps))^2`` for a layer
        followed by a BatchNorm, ``h_j = gamma_j^2 + beta_j^2`` for a layer fed by a
        LayerNorm/BatchNorm (module graph by torch.fx, or hooks on ``example``); with
        ``calibration``, ``h_j = E[x_j^2]`` measured on the layer's inputs instead. Each
        vector is divided by its mean. A mapping is passed as is to :func:`opq_core.plan`.
        Off by default: on the pretrained CREPE-tiny, ``"auto"`` lowered the pitch accuracy
        at sparsity 0.75 / 3 bits from 0.843 to 0.558 (``benchmarks/results``).
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
    if calibration is not None:
        calibration = list(calibration)
        if not calibration:
            raise ValueError(f"{fn}: calibration is empty (give a few batches, or None)")
    if compensate and calibration is None:
        raise ValueError(f"{fn}: compensate=True needs calibration= batches")
    cal = {}
    plan, layers, installed = _prepare(model, plan, fn=fn, sparsity=sparsity, bits=bits,
                                       rate=rate, budget_bits=budget_bits,
                                       size_bytes=size_bytes, layout=layout, method=method,
                                       channelwise=channelwise, grid=grid,
                                       error_model=error_model, exclude=exclude, masks=masks,
                                       sensitivity=sensitivity, calibration=calibration,
                                       example=example, cal=cal, channel_axis=channel_axis)
    _install(plan, layers, installed)
    # ---- calibration: compensation, then BatchNorm statistics ----
    if calibration is not None:
        stats = cal.get("stats")
        if stats is None:
            stats = _cal.calibration_stats(model, calibration, set(plan.names))
        if compensate is None or compensate:
            _cal.compensate(model, stats)
        _cal.recalibrate(model, calibration)
    return plan


def _prepare(model, plan=None, *, fn, sparsity=None, bits=4, rate=None, budget_bits=None,
             size_bytes=None, layout="entropy", method="opq", channelwise="unified",
             grid="offset", error_model="laplace",
             exclude=None, masks=None, sensitivity=None, calibration=None, example=None,
             cal=None, channel_axis="stored"):
    """Every check of :func:`compress`, nothing changed: ``(plan, layers, masks)``
    (the calibration statistics of a planned model go into ``cal["stats"]``)."""
    _check_model(model, fn)
    done = _compressed_modules(model)
    if done:
        path, _, _, q = done[0]
        raise ValueError(f"{fn}: model is already compressed (layer {q.name!r} at module "
                         f"{path!r} has an opq parametrization); compress a fresh model, or "
                         f"strip() this one first")
    layers = discover(model, () if exclude is None else exclude, fn=fn)
    chosen = layers.slots
    drop = set(layers.excluded)
    excl = [exclude] if isinstance(exclude, str) else list(exclude or ())

    # ---- the plan ----
    if plan is None:
        if channel_axis not in ("stored", "output"):
            raise ValueError(f"{fn}: channel_axis must be 'stored' or 'output', got "
                             f"{channel_axis!r}")
        # "output": planned with the output channels first (Slot.axis), moved back when
        # installed
        axis = {n: sl.axis if channel_axis == "output" else 0 for n, sl in chosen.items()}
        weights = {n: np.ascontiguousarray(np.moveaxis(_numpy_weight(sl.tensor), axis[n], 0))
                   for n, sl in chosen.items()}
        if not weights:
            raise ValueError(f"{fn}: model has no compressible tensor (a floating tensor with "
                             f"ndim >= 2) left after exclude={excl}")
        kw = {} if bits is None else {"bits": bits}
        stats = None
        if calibration is not None:
            stats = _cal.calibration_stats(model, calibration, weights)
            if cal is not None:
                cal["stats"] = stats
        importance = _cal.importance_for(model, weights, sensitivity, example, stats, method)
        if importance:
            kw["importance"] = importance

        def finish(p):
            planned = set(p.names)
            return replace(p, skipped=tuple(k for k in layers.names
                                            if k not in planned and k not in layers.aliases),
                           layers=tuple(replace(lp, channel_axis=axis[lp.name])
                                        for lp in p.layers))

        if size_bytes is not None:
            if sparsity is not None or rate is not None or budget_bits is not None:
                raise ValueError(f"{fn}: give size_bytes= or sparsity=/rate=/budget_bits=, "
                                 "not several")
            from opq_core._size import plan_for_size
            from .io import _other_tensors
            other = {k: v for k, v in _other_tensors(model).items() if k not in weights}
            plan = plan_for_size(weights, size_bytes, planner=opq_core.plan, layout=layout,
                                 other=other, finish=finish,
                                 method=method, channelwise=channelwise, grid=grid,
                                 error_model=error_model, **kw)
        else:
            plan = finish(opq_core.plan(weights, sparsity=sparsity, rate=rate,
                                        budget_bits=budget_bits, method=method,
                                        channelwise=channelwise, grid=grid,
                                        error_model=error_model, **kw))
    else:
        if not isinstance(plan, Plan):
            raise TypeError(f"{fn}: plan must be an opq_core.Plan, got {type(plan).__name__}")
        dropped = [lp.name for lp in plan.layers
                   if lp.name in drop or layers.aliases.get(lp.name) in drop]
        if dropped:
            keep = tuple(lp for lp in plan.layers if lp.name not in dropped)
            if not keep:
                raise ValueError(f"{fn}: exclude={excl} removes every layer of the plan")
            plan = replace(plan, layers=keep, skipped=tuple(plan.skipped) + tuple(dropped))
        seen = set()
        for lp in plan.layers:
            if lp.name not in chosen:
                if lp.name in layers.aliases:
                    what = (f"is tied to {layers.aliases[lp.name]!r} in this model; name the "
                            f"shared tensor by its first state_dict name")
                elif lp.name in layers.names:
                    what = "is not a floating tensor with ndim >= 2 in this model"
                else:
                    what = "is not in this model"
                raise ValueError(f"{fn}: plan layer {lp.name!r} {what} (a plan for another model?)")
            if lp.name in seen:
                raise ValueError(f"{fn}: plan layer {lp.name!r} appears twice")
            seen.add(lp.name)
            shape = tuple(chosen[lp.name].tensor.shape)
            if shape != lp.stored_shape:
                raise ValueError(f"{fn}: plan layer {lp.name!r} has shape {lp.stored_shape}, the "
                                 f"model's weight has shape {shape} (a plan for another model?)")

    # ---- masks ----
    masks = {} if masks is None else dict(masks)
    for name in masks:
        if name not in plan:
            raise ValueError(f"{fn}: masks has an entry for {name!r}, which is not a plan layer")
    installed = {}
    for lp in plan.layers:
        w = chosen[lp.name].tensor
        if lp.name in masks:
            m = masks[lp.name]
            m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
            if m.dtype != np.bool_:
                raise TypeError(f"{fn}: masks[{lp.name!r}] must be boolean, got dtype {m.dtype}")
            if tuple(m.shape) != tuple(lp.shape):
                raise ValueError(f"{fn}: masks[{lp.name!r}] has shape {tuple(m.shape)}, the "
                                 f"layer has shape {tuple(lp.shape)}")
        elif lp.mask_stored_only:
            raise ValueError(f"{fn}: layer {lp.name!r} is a codebook (ANNC) layer; its mask "
                             f"cannot be derived from the plan, pass masks={{{lp.name!r}: ...}}")
        else:
            try:
                m = layer_mask(lp, lp.from_stored(_numpy_weight(w)))
            except ValueError as exc:
                raise ValueError(f"{fn}: {exc}. To install a plan on other weights (e.g. a "
                                 f"fresh model that will load a checkpoint) pass masks= "
                                 f"(masks_of(model)) or use restore()") from None
        installed[lp.name] = torch.from_numpy(np.ascontiguousarray(m)).to(w.device)

    for name in installed:
        sl = chosen[name]
        for mod, path, attr in ((sl.module, sl.path, sl.attr),) + sl.aliases:
            if parametrize.is_parametrized(mod, attr):
                raise ValueError(f"{fn}: layer {name!r} already has a parametrization on "
                                 f"{attr!r} of module {path!r}; opq cannot stack on it")
    return plan, layers, installed


def _install(plan, layers, installed):
    meta = _plan_meta(plan)
    for i, lp in enumerate(plan.layers):
        sl = layers.slots[lp.name]
        # an importance-weighted layer is installed with its mask and without its importance
        # (what the .opq file stores too); the returned plan keeps it (plan.masks works)
        lp = replace(lp, importance_out=None, importance_in=None)
        q = QuantizedWeight(lp, installed[lp.name], meta, index=i)
        parametrize.register_parametrization(sl.module, sl.attr, q)
        for mod, _, attr in sl.aliases:
            _tie(mod, attr, sl.module, sl.attr)


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
    return {q.name: q for _, _, _, q in _require(model, "quantizers")}


def plan_of(model) -> Plan:
    """The plan installed in ``model`` (as restored by ``load_state_dict``, if it was).

    Works through wrappers such as DistributedDataParallel: layer names are the names
    given at :func:`compress` time.
    """
    mods = _require(model, "plan_of")
    qs = sorted((q for _, _, _, q in mods), key=lambda q: q.index)
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
    return {q.name: q.mask.detach().cpu().numpy().copy() for _, _, _, q in mods}


def compressed_weights(model) -> dict:
    """``{layer name: ndarray}``: the effective (pruned, dequantized) weights on the CPU.

    Same dtype as the weights (bfloat16, which NumPy lacks, comes back as float32).
    """
    mods = _require(model, "compressed_weights")
    out = {}
    with torch.no_grad():
        for _, mod, attr, q in mods:
            out[q.name] = _numpy_weight(getattr(mod, attr)).copy()
    return out


def strip(model) -> nn.Module:
    """A deep copy of ``model`` whose weights are plain Parameters holding the compressed
    values (for inference, TorchScript or ONNX export); ``model`` is left untouched.
    Shared (tied) tensors stay shared in the copy."""
    _require(model, "strip")
    out = copy.deepcopy(model)
    done = set()
    for _, mod, attr, q in _compressed_modules(out):
        plist = mod.parametrizations[attr]
        if len(plist) != 1:
            raise ValueError(f"strip: layer {q.name!r} has {len(plist)} parametrizations on "
                             f"{attr!r}; only opq's can be removed")
        # a deep copy shares the parametrized class with the original module, and removing
        # a parametrization deletes the property from that class: give the copy its own.
        if id(mod) not in done:
            done.add(id(mod))
            cls = type(mod)
            ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            mod.__class__ = type(cls.__name__, cls.__bases__, ns)
        parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
    for mod in out.modules():
        if "_opq_ties" in mod.__dict__:
            _untie(mod)
    return out


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------

_MARK = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.0\._extra_state$")


def _opq_entries(state_dict):
    """[(module path, tensor name, extra state dict)] of the opq layers of a state_dict."""
    out = []
    for k, v in state_dict.items():
        m = _MARK.match(k) if isinstance(k, str) else None
        if m is None:
            continue
        st = _decode_state(v)
        if st is not None:
            out.append((m.group(1) or "", m.group(2), st))
    return out


def plan_from_state_dict(state_dict) -> tuple:
    """``(plan, masks)`` stored in the state_dict of a compressed model.

    ``masks`` maps layer names to bool ndarrays. The plan's layer names are the names
    given at :func:`compress` time.
    """
    entries = _opq_entries(state_dict)
    if not entries:
        raise ValueError("plan_from_state_dict: the state_dict holds no opq layer "
                         "(no key '<module>.parametrizations.<name>.0._extra_state'); was it "
                         "saved from a compressed model?")
    entries.sort(key=lambda e: int(e[2].get("index", 0)))
    layers, masks, seen = [], {}, set()
    for path, attr, st in entries:
        lp = LayerPlan.from_dict(st["layer"])
        if lp.name in seen:  # a module reached under two paths: the same layer twice
            continue
        seen.add(lp.name)
        key = (path + "." if path else "") + f"parametrizations.{attr}.0.mask"
        if key not in state_dict:
            raise ValueError(f"plan_from_state_dict: layer {lp.name!r} has no mask ({key!r})")
        m = state_dict[key]
        masks[lp.name] = (m.detach().cpu().numpy() if isinstance(m, torch.Tensor)
                          else np.asarray(m)).astype(bool, copy=True)
        layers.append(lp)
    return _plan_from(entries[0][2].get("plan", {}), layers), masks


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
