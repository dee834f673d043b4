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

import numpy as np
import torch

from opq_core.format import CompressedFile, read_opq, write_opq

from .compress import compress, compressed_weights, is_compressed, masks_of, plan_of

__all__ = ["save", "load"]

_PARAM = ".parametrizations."


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()


def _other_tensors(model) -> dict:
    """Every state_dict tensor that is not a compressed layer or opq's own bookkeeping."""
    out = {}
    for k, v in model.state_dict().items():
        if _PARAM in k or k.startswith(_PARAM[1:]) or not isinstance(v, torch.Tensor):
            continue
        out[k] = _numpy(v)
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
    return write_opq(path, plan, weights, masks=masks, other=_other_tensors(model),
                     layout=layout, metadata=metadata, progress=progress)


def load(path, model, *, progress: bool = False) -> CompressedFile:
    """Compress ``model`` in place as the saved one was and load its weights.

    ``model`` must be a fresh (not compressed) instance of the saved architecture: the same
    ``state_dict`` names and shapes. Afterwards its outputs equal the saved model's, and it
    can be fine-tuned further. The model is left untouched when the file does not fit it.

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
    sd = model.state_dict()
    tensors = dict(cf.other)
    tensors.update(cf.weights)
    where = f"load: {str(path)!r} does not fit this model"
    for name, arr in tensors.items():
        if name not in sd:
            raise ValueError(f"{where}: the file has tensor {name!r} (shape {tuple(arr.shape)}), "
                             "the model has no such entry (a file for another model?)")
        if tuple(sd[name].shape) != tuple(arr.shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(arr.shape)} in the "
                             f"file, {tuple(sd[name].shape)} in the model")
    missing = [k for k in sd if k not in tensors]
    if missing:
        raise ValueError(f"{where}: the model's {missing[0]!r} is not in the file "
                         f"({len(missing)} missing)")
    new_sd = {}
    for k, v in sd.items():
        t = torch.from_numpy(np.ascontiguousarray(tensors[k]))
        new_sd[k] = t.to(dtype=v.dtype) if v.is_floating_point() else t.to(dtype=v.dtype)
    model.load_state_dict(new_sd, strict=True)
    compress(model, cf.plan, masks=cf.masks)
    return cf
