"""The parametrization that makes a weight compressed: :class:`QuantizedWeight` holds a layer's
fixed plan (scales, thresholds, step, bits, grid or codebook) and mask, and computes the
pruned + quantized weight with a straight-through gradient in every forward pass."""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from opq_core._plan import LayerPlan, Plan

from .ste import CodebookSTE, FakeQuantSTE

__all__ = ["QuantizedWeight"]

#: Version of a QuantizedWeight's extra state.
_STATE_VERSION = 1


def _decode_state(v):
    """The extra state of a QuantizedWeight: a uint8 tensor of JSON (or the dict of
    checkpoints written by opq 0.1)."""
    if isinstance(v, dict):
        return v if "layer" in v else None
    if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1:
        try:
            d = json.loads(bytes(v.cpu().numpy().tobytes()).decode())
        except (UnicodeDecodeError, ValueError):
            return None
        return d if isinstance(d, dict) and "layer" in d else None
    return None


def _plan_meta(plan: Plan) -> dict:
    d = plan.to_dict()
    d.pop("layers", None)
    d.pop("totals", None)
    return d


class QuantizedWeight(nn.Module):
    r"""The parametrization of one compressed weight: mask + fake-quant, straight-through.

    Buffers (in ``state_dict``): ``mask`` (bool, the layer plan's shape: the weight's, or
    with ``layer.channel_axis`` moved first), ``scale`` and
    ``threshold`` (float64, one per channel: :math:`s_c`, :math:`\theta_c`), ``codebook``
    (float64; empty unless ``grid == "codebook"``, whose levels are in units of ``scale``;
    ``threshold`` is empty then). Extra state: the layer's
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
            s = lp.kernel_scale  # the codebook's units (ones for ANNC layers)
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
        # a uint8 tensor of JSON, not a dict: save_pretrained / safetensors / Trainer
        # checkpoints store only tensors
        st = {"version": _STATE_VERSION, "index": self.index,
              "layer": self.layer.to_dict(), "plan": dict(self.meta)}
        data = json.dumps(st, separators=(",", ":")).encode()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def set_extra_state(self, state):
        got = state
        state = _decode_state(state)
        if state is None:
            raise ValueError(f"layer {self.name!r}: the state_dict holds no opq layer plan "
                             f"(got {type(got).__name__})")
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
        a = self.layer.channel_axis
        if a:  # planned with the output channels first: the same view, moved back
            return self._forward(w.movedim(a, 0)).movedim(0, a)
        return self._forward(w)

    def _forward(self, w):
        if self.grid == "codebook":
            return CodebookSTE.apply(w, self.mask, self.codebook, self.scale)
        return FakeQuantSTE.apply(w, self.mask, self.scale, self.threshold, self.step,
                                  self.bits, self.grid)

    def extra_repr(self):
        lp = self.layer
        return (f"name={self.name!r}, bits={self.bits}, grid={self.grid!r}, "
                f"sparsity={lp.sparsity:.4f}")
