"""Save a compressed PyTorch model to a ``.opq`` file, and load one into a fresh model.

>>> import torch, tempfile, os, opq_torch
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> _ = opq_torch.compress(net, sparsity=0.8, bits=4)
>>> path = os.path.join(tempfile.mkdtemp(), "net.opq")
>>> f = opq_torch.save(net, path)
>>> fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> _ = opq_torch.load(path, fresh)
>>> x = torch.randn(3, 16)
>>> torch.equal(net(x), fresh(x))
True
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from opq_core.format import CompressedFile, read_opq, write_opq

from dataclasses import replace as dc_replace

from ._layers import discover
from ._numpy import to_numpy
from .compress import (_install, _opq_entries, _prepare, compress, compressed_weights, is_compressed,
                       masks_of, plan_from_state_dict, plan_of)

__all__ = ["save", "load", "load_pretrained"]

_PARAM = ".parametrizations."


def _saved_names(model, fn):
    """A function from a name as ``save_pretrained`` writes it to the model's own name.

    transformers renames the keys of some architectures when saving (ViT:
    ``vit.layers.0.attention.k_proj`` is saved as
    ``vit.encoder.layer.0.attention.attention.key``) and back when loading; this asks
    transformers for the saved name of every ``state_dict`` entry and maps each saved module
    prefix back, so the opq entries under a module follow it. The identity for other models.
    A conversion that merges or splits tensors is refused (``ValueError`` naming a tensor).
    """
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return lambda k: k
    if not isinstance(model, PreTrainedModel):
        return lambda k: k
    probe = {k: torch.empty(0) for k in model.state_dict()}
    model_of = {id(t): k for k, t in probe.items()}
    prefixes = {}
    for saved, t in revert_weight_conversion(model, dict(probe)).items():
        name = model_of.get(id(t))
        if name is None:
            raise ValueError(f"{fn}: transformers converts this model's tensors when saving "
                             f"(e.g. into {saved!r}), not only renames them; save the model's "
                             f"own state_dict (torch.save(model.state_dict()) or "
                             f"opq_torch.save) instead of save_pretrained")
        if saved != name:
            s_mod, _, s_attr = saved.rpartition(".")
            m_mod, _, m_attr = name.rpartition(".")
            if s_attr == m_attr:
                prefixes[s_mod] = m_mod
            else:
                prefixes[saved] = name
    if not prefixes:
        return lambda k: k

    def model_name(key):
        head, rest = key, ""
        while head:
            if head in prefixes:
                return prefixes[head] + rest
            head, dot, tail = head.rpartition(".")
            rest = dot + tail + rest
        return key
    return model_name


def _other_tensors(model) -> dict:
    """Every state_dict tensor that is not a compressed layer or opq's own bookkeeping."""
    out = {}
    aliases = discover(model, fn="save").aliases  # a tied tensor is stored once
    for k, v in model.state_dict().items():
        if _PARAM in k or k.startswith(_PARAM[1:]) or not isinstance(v, torch.Tensor):
            continue
        if k in aliases:
            continue
        out[k] = to_numpy(v, copy=True)
    return out


def save(model, path, *, layout: str = "entropy", metadata=None,
         progress: bool = False) -> CompressedFile:
    """Write a compressed model to ``path`` (atomically); return the file's accounting.

    The file holds the plan, the masks, the compressed weights (codes) of every compressed
    layer and every other ``state_dict`` tensor (biases, norms, buffers) as it is.
    bfloat16 tensors are stored as float32.

    Parameters
    ----------
    model : nn.Module compressed by :func:`opq_torch.compress`
    path : str or Path
    layout : {"entropy", "packed"}
    metadata : mapping str -> str, optional
    progress : bool
        A tqdm progress bar.

    Returns
    -------
    opq_core.format.CompressedFile
        ``paper_rate`` and ``storage_rate`` of the written file.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"save: model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_compressed(model):
        raise ValueError("save: model is not compressed; call opq_torch.compress(model, ...) "
                         "first (a dense model has nothing to store compactly)")
    plan = plan_of(model)
    masks = masks_of(model)
    # the effective weights are on the plan's grid: quantizing them again gives the same codes
    weights = compressed_weights(model)
    weights = {lp.name: lp.from_stored(weights[lp.name]) for lp in plan.layers}
    return write_opq(path, plan, weights, masks=masks, other=_other_tensors(model),
                     layout=layout, metadata=metadata, progress=progress)


def _match_file(model, layers, entries, compressed, where, fn):
    """The model's ``state_dict`` name of every tensor of a file: ``entries`` are the file's
    ``(name, shape, dtype)``, ``compressed`` its compressed layers' names, ``layers`` the
    model's :func:`discover`. Names saved by ``save_pretrained`` are mapped back and a tied
    tensor may be stored under any of its names. Returns ``({file name: model name},
    ignored)``: integer buffers the model does not hold (it builds them itself) are
    ignored; any other tensor the model lacks, a shape mismatch, a tie stored twice and a
    model entry the file lacks raise ``ValueError`` after ``where``."""
    sd = model.state_dict()
    renamed = _saved_names(model, fn)  # a save_pretrained folder's name -> the model's
    keys, ignored, taken = {}, [], set()
    for name, shape, dtype in entries:
        m = name if name in sd else renamed(name)
        key = layers.aliases.get(m, m)
        if key in taken:
            raise ValueError(f"{where}: the file stores {name!r} and {key!r}, which are one "
                             f"tied tensor in this model")
        if key not in sd:
            if np.dtype(dtype).kind in "iub" and name not in compressed:
                # integer buffers a checkpoint holds and the model builds itself (BERT's
                # position_ids is non-persistent in recent transformers): not loaded
                ignored.append(name)
                continue
            raise ValueError(f"{where}: the file has tensor {name!r} (shape {tuple(shape)}), "
                             "the model has no such entry (a file for another model?)")
        if tuple(sd[key].shape) != tuple(shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(shape)} in the "
                             f"file, {tuple(sd[key].shape)} in the model")
        keys[name] = key
        taken.add(key)
    missing = [k for k in sd if k not in taken and k not in layers.aliases]
    if missing:
        raise ValueError(f"{where}: the model's {missing[0]!r} is not in the file "
                         f"({len(missing)} missing)")
    return keys, ignored


def load(path, model, *, progress: bool = False) -> CompressedFile:
    """Compress ``model`` in place as the saved one was and load its weights.

    ``model`` must be a fresh (not compressed) instance of the saved architecture: the same
    ``state_dict`` names and shapes. Afterwards its outputs equal the saved model's, and it
    can be fine-tuned further. Files written by ``opq compress`` from the model's
    checkpoint load too (the same tensors are compressed). A tensor tied under several
    names may be stored under any one of them. Everything is checked before the model is
    touched: the model is left untouched when the file does not fit it.

    Returns
    -------
    opq_core.format.CompressedFile
        The file's plan, masks and accounting.

    Raises
    ------
    ValueError
        The file is corrupt or truncated, or was written for another model (a missing,
        extra or differently shaped tensor is named), or ``model`` is already compressed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load: model must be a torch.nn.Module, got {type(model).__name__}")
    if is_compressed(model):
        raise ValueError("load: model is already compressed; pass a freshly built model")
    cf = read_opq(path, progress=progress)
    where = f"load: {str(path)!r} does not fit this model"
    layers = discover(model, fn="load")
    sd = model.state_dict()
    stored = {lp.name: lp.to_stored(cf.weights[lp.name]) for lp in cf.plan.layers}
    arrays = dict(list(cf.other.items()) + list(stored.items()))
    keys, ignored = _match_file(model, layers, [(k, a.shape, a.dtype) for k, a in arrays.items()],
                                stored, where, "load")
    tensors = {keys[k]: a for k, a in arrays.items() if k in keys}
    # plan layers under the model's names (renamed or tied tensors)
    plan, masks = cf.plan, dict(cf.masks)
    if any(keys[lp.name] != lp.name for lp in plan.layers):
        plan = dc_replace(plan, layers=tuple(
            dc_replace(lp, name=keys[lp.name]) for lp in plan.layers))
        masks = {keys[k]: v for k, v in masks.items()}
    try:
        plan, layers, installed = _prepare(model, plan, fn="load", masks=masks)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix('load: ')}") from None
    new_sd = {}
    for k, v in sd.items():
        t = torch.from_numpy(np.ascontiguousarray(tensors[layers.aliases.get(k, k)]))
        new_sd[k] = t.to(dtype=v.dtype)
    # only now is the model changed
    model.load_state_dict(new_sd, strict=True)
    _install(plan, layers, installed)
    if ignored:
        warnings.warn(f"load: {str(path)!r}: integer tensor(s) the model does not hold were "
                      f"not loaded: {', '.join(ignored)}", UserWarning, stacklevel=2)
    return cf


def _read_state_dict(folder) -> dict:
    """A Hugging Face folder's state_dict as torch tensors (safetensors, shards, or
    pytorch_model.bin via weights_only)."""
    import json
    import os
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"load_pretrained: no such folder {folder!r}")
    files = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        ip = os.path.join(folder, index)
        if os.path.isfile(ip):
            with open(ip) as f:
                wm = json.load(f).get("weight_map")
            if not isinstance(wm, dict):
                raise ValueError(f"load_pretrained: {ip!r} has no weight_map")
            files = sorted(set(wm.values()))
            break
    else:
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(folder, single)):
                files = [single]
                break
    if not files:
        raise FileNotFoundError(f"load_pretrained: {folder!r} holds no model.safetensors, "
                                "model.safetensors.index.json or pytorch_model.bin")
    sd = {}
    for name in files:
        fp = os.path.join(folder, name)
        if os.path.basename(name) != name:
            raise ValueError(f"load_pretrained: shard name {name!r} leaves the folder")
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd.update(load_file(fp))
        else:
            sd.update(torch.load(fp, map_location="cpu", weights_only=True))
    return sd


def load_pretrained(folder, model):
    """Read a ``save_pretrained`` folder (or a Trainer checkpoint) of a compressed model
    into ``model``, a freshly built instance of the architecture (e.g.
    ``AutoModelForCausalLM.from_config(config)``): compress it as the saved one was and
    load every tensor. Returns the plan.

    ``from_pretrained`` alone does not know the opq tensors (it would report them as
    unexpected and the weights as missing); this is the supported path::

        model.save_pretrained(folder)                        # a compressed model
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        opq_torch.load_pretrained(folder, fresh)             # outputs equal, bit for bit
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load_pretrained: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    sd = _read_state_dict(folder)
    own = model.state_dict()
    renamed = _saved_names(model, "load_pretrained")
    sd = {(k if k in own else renamed(k)): v for k, v in sd.items()}
    aliases = discover(model, fn="load_pretrained").aliases
    # save_pretrained keeps one name of a tied tensor: give the model's other names the
    # same tensor (a compressed tied tensor has no other names in the compressed model)
    for alias, name in aliases.items():
        if alias not in sd and name in sd:
            sd[alias] = sd[name]
    for path, attr, st in _opq_entries(sd):
        saved = (path + "." if path else "") + attr
        name = st["layer"]["name"]
        if saved != name and name not in aliases and saved not in aliases:
            raise ValueError(
                f"load_pretrained: {str(folder)!r} stores layer {name!r} as {saved!r}: "
                "save_pretrained renamed the model's tensors (transformers converts the keys "
                "of some architectures when saving); save the compressed model with "
                "opq_torch.save or torch.save(model.state_dict()) and use opq_torch.load or "
                "opq_torch.restore instead")
    plan, masks = plan_from_state_dict(sd)
    compress(model, plan, masks=masks)
    want = set(model.state_dict())
    model.load_state_dict({k: v for k, v in sd.items() if k in want or k not in aliases},
                          strict=True)
    return plan
