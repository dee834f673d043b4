"""Export a compressed PyTorch model to ONNX with its weights kept compressed.

:func:`export_onnx` exports the model's dense twin (:func:`opq_torch.strip`) with
``torch.onnx.export`` (``do_constant_folding=False``, so that every weight stays an
initializer under its ``state_dict`` name), then replaces every compressed weight by its
compressed form and decode subgraph (:func:`opq_core.export_onnx.compress_onnx`). The
result runs in onnxruntime with the compressed model's outputs.

>>> import torch, tempfile, os, opq_torch
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> _ = opq_torch.compress(net, sparsity=0.5, bits=4)
>>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
>>> rep = opq_torch.export_onnx(net, torch.randn(1, 16), path)
>>> [e.encoding for e in rep.layers]
['bitmask+codes-offset', 'bitmask+codes-offset']
"""
from __future__ import annotations

import io
import warnings

import torch

from opq_core.export_onnx import OnnxExport, compress_onnx, write_onnx
from opq_core.format import layer_codes

from .compress import _require, compressed_weights, masks_of, plan_of, strip

__all__ = ["export_onnx", "onnx_template"]

#: The highest opset torch's TorchScript exporter writes; the result is raised to 21.
_TEMPLATE_OPSET = 20


def onnx_template(model, example_input, **kwargs) -> bytes:
    """The dense ONNX model (bytes) of ``model`` as :func:`export_onnx` starts from it:
    every parameter an initializer under its ``state_dict`` name. ``kwargs`` go to
    ``torch.onnx.export`` (``input_names``, ``output_names``, ``dynamic_axes``, ...)."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    buf = io.BytesIO()
    kwargs.setdefault("opset_version", _TEMPLATE_OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, dynamo=False, do_constant_folding=False,
                          **kwargs)
    return buf.getvalue()


def export_onnx(model, example_input, path, *, prefer: str = "small", **kwargs) -> OnnxExport:
    """Write ``model`` (compressed by :func:`opq_torch.compress`) to ``path`` as ONNX.

    Parameters
    ----------
    model : compressed nn.Module (left untouched)
    example_input : Tensor or tuple of Tensors
    path : str or Path
        Written atomically.
    prefer : {"small", "qdq"}
        See :func:`opq_core.export_onnx.compress_onnx`.
    **kwargs
        Passed to ``torch.onnx.export`` (``input_names``, ``output_names``,
        ``dynamic_axes``, ...).

    Returns
    -------
    opq_core.export_onnx.OnnxExport
        Per layer what the file stores (``.table()``) and its bytes.

    Raises
    ------
    ValueError
        The model is not compressed, or a layer cannot be expressed (named, with why).
    """
    import onnx
    _require(model, "export_onnx")
    plan = plan_of(model)
    moved = [lp for lp in plan.layers if lp.channel_axis]
    if moved:
        raise ValueError(f"export_onnx: layer {moved[0].name!r} is planned along its stored "
                         f"axis {moved[0].channel_axis}; the ONNX decode subgraphs hold plans "
                         "along axis 0 (compress with a plan along axis 0, e.g. from the "
                         "command line, to export)")
    masks = masks_of(model)
    weights = compressed_weights(model)
    codes = {lp.name: layer_codes(lp, weights[lp.name], masks[lp.name]) for lp in plan.layers}
    dense = strip(model)
    was_training = dense.training
    dense.eval()
    template = onnx.load_from_string(onnx_template(dense, example_input, **kwargs))
    dense.train(was_training)
    out, rep = compress_onnx(template, plan, codes, masks, prefer=prefer,
                             where="the exported graph")
    write_onnx(out, path)
    return rep
