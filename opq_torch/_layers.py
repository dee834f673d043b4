"""The one discovery of a model's compressible tensors (used by compress, ANNC and load).

The rule is the command line's (:func:`opq_core.plan`), applied to ``model.state_dict()``:
every floating tensor with ``ndim >= 2`` and at least one element is compressible, whatever
module owns it: ``Linear``, ``Conv*``, ``ConvTranspose*``, ``Embedding``, Hugging Face's
``Conv1D``, a bare Parameter such as ``nn.MultiheadAttention.in_proj_weight``, or a
persistent buffer. Integer and bool tensors (position ids, masks) and 1-D tensors (biases,
norms) are not. So a ``.opq`` file written by ``opq compress`` from a model's checkpoint
selects exactly the tensors that :func:`opq_torch.compress` selects on the model.

Channel axis: the per-channel scales go along the output channels. For most owners that is
``shape[0]`` (``Linear``, ``Conv*``, the token of an ``Embedding``, bare Parameters);
Hugging Face ``Conv1D`` stores its weight ``[in, out]`` and ``ConvTranspose*`` (groups 1)
``[in, out, ...]``, so their :attr:`Slot.axis` is 1: with ``channel_axis="output"``
:func:`opq_torch.compress` plans the view with that axis moved first, records it in the plan (``LayerPlan.channel_axis``,
hence in the .opq file) and the parametrization moves it back, exactly. (A grouped
``ConvTranspose*`` keeps axis 0: its output channels are not one axis.) The command line
sees a checkpoint without its modules and plans every tensor as stored (axis 0);
:func:`opq_torch.load` installs such a file as written, so it loads into the model all
the same.

Shared (tied) tensors: a tensor reachable under several ``state_dict`` names (an
``lm_head`` tied to the input embedding, a module used twice) is one layer, named by its
first ``state_dict`` name (the one ``save_pretrained`` keeps); the other names are its
aliases. Compressing it compresses it once, and every owner reads the same compressed
tensor. Excluding any one of its names excludes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Slot", "Layers", "discover"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Slot:
    """One compressible tensor: its name, its owner ``(module, attribute)``, the other
    owners of the same tensor (aliases) and whether it is a buffer."""

    name: str
    module: nn.Module
    path: str
    attr: str
    aliases: tuple = ()        # ((module, path, attr), ...): other owners, same tensor
    alias_names: tuple = ()    # their state_dict names
    is_buffer: bool = False
    axis: int = 0              # the output-channel axis of the stored tensor

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


@dataclass(frozen=True)
class Layers:
    """What :func:`discover` finds: ``slots`` (name -> :class:`Slot`, the compressible
    tensors not excluded, in ``state_dict`` order), ``excluded`` (compressible names left
    alone), ``aliases`` (alias name -> primary name, for every shared tensor) and
    ``names`` (every ``state_dict`` name that holds a tensor)."""

    slots: dict
    excluded: tuple
    aliases: dict
    names: tuple


def _tensors(model):
    """[(state_dict name, module, module path, attr, tensor, is_buffer)] in state_dict order,
    every owner of a shared module or tensor included."""
    out = []
    for path, mod in model.named_modules(remove_duplicate=False):
        pre = f"{path}." if path else ""
        for attr, t in mod._parameters.items():
            if t is not None:
                out.append((pre + attr, mod, path, attr, t, False))
        for attr, t in mod._buffers.items():
            if t is not None and attr not in mod._non_persistent_buffers_set:
                out.append((pre + attr, mod, path, attr, t, True))
    return out


def channel_axis(module, attr, t) -> int:
    """The output-channel axis of ``module.<attr>``: 1 for the ``weight`` of Hugging Face
    ``Conv1D`` (``[in, out]``) and of an ungrouped ``ConvTranspose*`` (``[in, out, ...]``),
    else 0."""
    if attr != "weight" or t.dim() < 2:
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1 if module.groups == 1 else 0
    cls = type(module)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return 1
    return 0


def compressible(t) -> bool:
    """The selection rule: a floating tensor with ``ndim >= 2`` and at least one element."""
    return isinstance(t, torch.Tensor) and t.dtype in _FLOAT and t.dim() >= 2 and t.numel() > 0


def discover(model: nn.Module, exclude=(), *, fn: str = "compress") -> Layers:
    """Find the compressible tensors of ``model`` (see the module documentation).

    ``exclude``: module names (everything under that module) or ``state_dict`` names; an
    unknown name raises ``ValueError`` naming it.
    """
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = list(exclude or ())
    for e in exclude:
        if not isinstance(e, str):
            raise TypeError(f"{fn}: exclude must hold layer names (str), got {e!r}")
    entries = _tensors(model)
    names = tuple(e[0] for e in entries)
    module_names = {p for p, _ in model.named_modules(remove_duplicate=False)}
    name_set = set(names)
    for e in exclude:
        if e not in name_set and e not in module_names:
            raise ValueError(f"{fn}: exclude names layer {e!r}, which is neither a module nor a "
                             f"state_dict entry of this model")

    def excluded(name):
        return any(name == e or (e == "" or name.startswith(e + ".")) and e in module_names
                   for e in exclude)

    groups = {}   # id(tensor) -> [entries]
    order = []
    for ent in entries:
        key = id(ent[4])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(ent)
    slots, skipped_excl, aliases = {}, [], {}
    for key in order:
        group = groups[key]
        first = group[0]
        # distinct owners: a shared module reached under two paths is one owner
        owners, seen = [], set()
        for ent in group:
            if (id(ent[1]), ent[3]) not in seen:
                seen.add((id(ent[1]), ent[3]))
                owners.append(ent)
        for ent in group[1:]:
            aliases[ent[0]] = first[0]
        if not compressible(first[4]):
            continue
        if any(excluded(ent[0]) for ent in group):
            skipped_excl.append(first[0])
            continue
        slots[first[0]] = Slot(
            name=first[0], module=owners[0][1], path=owners[0][2], attr=owners[0][3],
            aliases=tuple((o[1], o[2], o[3]) for o in owners[1:]),
            alias_names=tuple(ent[0] for ent in group[1:]), is_buffer=first[5],
            axis=channel_axis(owners[0][1], owners[0][3], first[4]))
    return Layers(slots=slots, excluded=tuple(skipped_excl), aliases=aliases, names=names)
