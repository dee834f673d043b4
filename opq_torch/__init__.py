"""opq_torch: the thin PyTorch adapter of opq.

Compress a trained model in one call, then keep training it with any loop, optimizer,
scheduler, AMP or DistributedDataParallel; every forward pass sees the pruned and quantized
weights, and the gradient reaches the latent weights straight through the quantizer.

>>> import torch, opq_torch
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> plan = opq_torch.compress(net, sparsity=0.8, bits=4)
>>> opq_torch.is_compressed(net), plan.kept == round(0.2 * (16 * 32 + 32 * 4))
(True, True)
>>> plain = opq_torch.strip(net)          # plain weights = the compressed ones
>>> opq_torch.is_compressed(plain)
False
"""
from .compress import (QuantizedWeight, compress, compressed_weights, is_compressed, masks_of,
                       plan_from_state_dict, plan_of, quantizers, restore, strip)
from .calibrate import recalibrate
from .finetune import EpochStats, History, finetune
from .ste import CodebookSTE, FakeQuantSTE, fake_quant_codebook_ste, fake_quant_ste

__all__ = ["compress", "restore", "is_compressed", "plan_of", "masks_of", "compressed_weights",
           "strip", "plan_from_state_dict", "quantizers", "finetune", "recalibrate", "History", "EpochStats", "save", "load",
           "FakeQuantSTE", "CodebookSTE", "fake_quant_ste", "fake_quant_codebook_ste",
           "QuantizedWeight", "load_pretrained", "pack", "load_packed", "export_onnx"]


def save(model, path, *args, **kwargs):
    """Write a compressed model to an .opq file (see :mod:`opq_torch.io`)."""
    from . import io
    return io.save(model, path, *args, **kwargs)


def load(path, model, *args, **kwargs):
    """Read an .opq file into ``model`` (see :mod:`opq_torch.io`)."""
    from . import io
    return io.load(path, model, *args, **kwargs)


def load_pretrained(folder, model):
    """Read a ``save_pretrained`` folder of a compressed model into a fresh ``model``
    (see :func:`opq_torch.io.load_pretrained`)."""
    from . import io
    return io.load_pretrained(folder, model)


def pack(model, *args, **kwargs):
    """Replace every compressed layer by a packed module (see :mod:`opq_torch.packing`)."""
    from .packing import pack as _pack
    return _pack(model, *args, **kwargs)


def load_packed(path, model, *args, **kwargs):
    """Read an .opq file into a fresh ``model`` with its compressed layers packed, straight
    from the file's codes (see :func:`opq_torch.packing.load_packed`)."""
    from .packing import load_packed as _load_packed
    return _load_packed(path, model, *args, **kwargs)


def export_onnx(model, example_input, path, *args, **kwargs):
    """Write an ONNX model that keeps the compressed weights compressed
    (see :mod:`opq_torch.export`)."""
    from .export import export_onnx as _export
    return _export(model, example_input, path, *args, **kwargs)
