r"""Sensitivity, calibration statistics, error compensation and BatchNorm recalibration.

- :func:`sensitivity` (data-free): for each compressed weight the diagonal of its output-error
  metric that the module graph reveals: a BatchNorm that directly follows a convolution (or
  linear layer) scales output channel :math:`c` by :math:`a_c = \gamma_c /
  \sqrt{\sigma^2_c + \epsilon}`, so :math:`g_c = a_c^2`; a LayerNorm or BatchNorm that directly
  feeds a layer produces inputs of second moment :math:`E[x_j^2] \approx \gamma_j^2 +
  \beta_j^2` (normalized inputs have mean 0 and variance 1), so :math:`h_j = \gamma_j^2 +
  \beta_j^2` (through a ReLU-like activation this is an approximation). The graph is read
  with ``torch.fx``, which follows channelwise operations (activations, pooling, padding,
  dropout) between the layer and the norm; when the model cannot be traced and an example
  input is given, forward hooks on one pass find the direct module-to-module pairs.
- :func:`calibration_stats` (with data): one forward pass of the dense model over a few
  batches gives every layer's input second moment :math:`H = E[x x^\top]` (a convolution's
  unfolded patches), whose diagonal, averaged over kernel positions, is :math:`h_j =
  E[x_j^2]`.
- :func:`compensate`: OBS / GPTQ column updates of the kept weights
  (:func:`opq_core.compensate.compensate_layer`) on the plan's masks and grids.
- :func:`recalibrate`: BatchNorm running statistics re-estimated on the compressed model.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._numpy import to_numpy

__all__ = ["sensitivity", "calibration_stats", "compensate", "recalibrate", "LayerStats"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM_IN = _BN + (nn.LayerNorm,)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Above this unfolded input width a layer gets only the diagonal of H (no compensation).
MAX_HESSIAN = 4096


def _bn_gain2(bn) -> np.ndarray:
    var = bn.running_var.detach().double().cpu().numpy() if bn.running_var is not None else None
    if var is None:
        return None
    gamma = (bn.weight.detach().double().cpu().numpy() if bn.weight is not None
             else np.ones_like(var))
    return gamma * gamma / (var + bn.eps)


def _norm_moment(norm) -> np.ndarray | None:
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is None or norm.weight.dim() != 1:
            return None
    elif norm.weight is None:
        return None
    g = norm.weight.detach().double().cpu().numpy()
    b = norm.bias.detach().double().cpu().numpy() if norm.bias is not None else 0.0
    return g * g + b * b


#: Channelwise operations a norm's gain passes through (ReLU-like activations are
#: positively homogeneous; pooling, padding and dropout keep channels apart).
_THROUGH_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
                    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Dropout, nn.Identity)
_THROUGH_NAMES = ("relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "hardswish",
                  "max_pool1d", "max_pool2d", "max_pool3d", "pad", "dropout")


def _through(node, mods):
    if node.op == "call_module":
        return isinstance(mods.get(node.target), _THROUGH_MODULES)
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name in _THROUGH_NAMES
    return False


def _pairs_fx(model):
    """[(kind, layer path, norm module)] from torch.fx: ("out", layer, bn) for a BatchNorm
    after a layer, ("in", layer, norm) for a norm feeding a layer, possibly through
    channelwise operations (activations, pooling, padding) used by nothing else."""
    from torch import fx
    gm = fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _LAYERS):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module" and isinstance(mods.get(nxt.target), _BN):
                pairs.append(("out", node.target, mods[nxt.target]))
                break
            if not _through(nxt, mods) or not nxt.args or nxt.args[0] is not cur:
                break
            cur = nxt
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node) and len(src.users) == 1:
            if src.op == "call_module" and isinstance(mods.get(src.target), _NORM_IN):
                pairs.append(("in", node.target, mods[src.target]))
                break
            if not _through(src, mods) or not src.args:
                break
            src = src.args[0]
    return pairs


def _pairs_hooks(model, example):
    """The same pairs from one forward pass: tensors passed from module to module."""
    made, order = {}, []
    handles = []
    path_of = {m: p for p, m in model.named_modules()}

    def hook(mod, inp, out):
        p = path_of[mod]
        x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
        order.append((p, mod, None if x is None else id(x), id(out)))
        made[id(out)] = (p, mod)

    for p, m in model.named_modules():
        if isinstance(m, _LAYERS + _NORM_IN):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            _forward(model, example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    outs = {}
    for p, m, xin, xout in order:
        if isinstance(m, _LAYERS):
            outs[xout] = p
            if xin in made and isinstance(made[xin][1], _NORM_IN):
                pairs.append(("in", p, made[xin][1]))
        elif isinstance(m, _BN) and xin in outs:
            pairs.append(("out", outs[xin], m))
    return pairs


def sensitivity_of(model, weights, example=None) -> dict:
    """Data-free importance ``{weight name: (g or None, h or None)}`` (see the module doc).

    ``weights``: the names of the weights to weigh (``"<module path>.weight"``).
    """
    try:
        pairs = _pairs_fx(model)
    except Exception as exc:  # untraceable control flow
        if example is None:
            warnings.warn(f"sensitivity: torch.fx cannot trace the model ({type(exc).__name__}); "
                          "pass example= (one input) to find norms with hooks, or "
                          "sensitivity=None", UserWarning, stacklevel=3)
            return {}
        pairs = _pairs_hooks(model, example)
    mods = dict(model.named_modules())
    out = {}
    for kind, path, norm in pairs:
        name = f"{path}.weight" if path else "weight"
        if name not in weights:
            continue
        layer = mods[path]
        g, h = out.get(name, (None, None))
        if kind == "out":
            v = _bn_gain2(norm)
            if v is not None and v.size == layer.weight.shape[0]:
                g = v
        else:
            v = _norm_moment(norm)
            groups = getattr(layer, "groups", 1)
            if v is not None and groups == 1 and v.size == layer.weight.shape[1]:
                h = v
        out[name] = (_positive(g), _positive(h))
    return {k: v for k, v in out.items() if v[0] is not None or v[1] is not None}



#: The data-free importance of every layer (the name ``compress(sensitivity=...)`` uses).
sensitivity = sensitivity_of

def _positive(v):
    """Finite, strictly positive importance (a tiny floor for zero entries)."""
    if v is None:
        return None
    v = np.asarray(v, dtype=np.float64)
    v = np.where(np.isfinite(v), v, 0.0)
    m = float(np.mean(v))
    if not m > 0:
        return None
    return np.maximum(v, 1e-6 * m)


# --------------------------------------------------------------------------------------
# calibration statistics
# --------------------------------------------------------------------------------------

class LayerStats:
    """Input statistics of one layer: ``hessian`` (n x n, float64, ``E[x x^T]`` of the
    unfolded inputs, or None beyond :data:`MAX_HESSIAN`), ``moment`` (``E[x_j^2]`` per
    input channel), ``count`` (number of input rows averaged)."""

    def __init__(self, n, c_in, full):
        self.sum = torch.zeros((n, n), dtype=torch.float64) if full else None
        self.diag = torch.zeros(n, dtype=torch.float64)
        self.count = 0
        self.n, self.c_in = n, c_in

    def add(self, rows):
        rows = rows.detach().to(torch.float32).cpu()
        if self.sum is not None:  # one float32 product per batch, summed in float64
            self.sum += (rows.T @ rows).to(torch.float64)
        self.diag += (rows * rows).sum(0, dtype=torch.float64)
        self.count += rows.shape[0]

    def add_moment(self, x):
        """Diagonal only (a layer too wide for H): ``E[x_j^2]`` per input channel from the
        input itself, every position counted once (kernel padding not modelled)."""
        x = x.detach().to(torch.float32).cpu()
        c = x.shape[1]
        per = x.transpose(0, 1).reshape(c, -1)
        k = self.n // self.c_in
        self.diag += (per * per).sum(1, dtype=torch.float64).repeat_interleave(k) / per.shape[1]
        self.count += 1

    @property
    def hessian(self):
        if self.sum is None or self.count == 0:
            return None
        return (self.sum / self.count).numpy()

    @property
    def moment(self):
        d = (self.diag / max(self.count, 1)).numpy()
        return d.reshape(self.c_in, -1).mean(axis=1)


def _rows(mod, x):
    """The layer's input as rows of its unfolded width (in ``weight.reshape(C, -1)`` order)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if getattr(mod, "padding_mode", "zeros") != "zeros" or isinstance(mod.padding, str):
        return None
    if isinstance(mod, nn.Conv1d):
        p = F.unfold(x.unsqueeze(-1), (mod.kernel_size[0], 1), dilation=(mod.dilation[0], 1),
                     padding=(mod.padding[0], 0), stride=(mod.stride[0], 1))
    elif isinstance(mod, nn.Conv2d):
        p = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                     stride=mod.stride)
    else:
        return None
    return p.transpose(1, 2).reshape(-1, p.shape[1])


def _batches(batches):
    for b in batches:
        yield b


def _forward(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def calibration_stats(model, batches: Iterable, weights) -> dict:
    """``{weight name: LayerStats}`` from one no-grad forward pass in eval mode over
    ``batches`` (tensors, ``(input, target)`` pairs, or keyword dicts)."""
    mods = dict(model.named_modules())
    stats, handles = {}, []
    for name in weights:
        path = name[:-len(".weight")] if name.endswith(".weight") else ""
        mod = mods.get(path)
        if not isinstance(mod, _LAYERS) or getattr(mod, "groups", 1) != 1:
            continue
        n = int(np.prod(mod.weight.shape[1:]))
        st = LayerStats(n, int(mod.weight.shape[1]), n <= MAX_HESSIAN)

        def hook(m, inp, st=st):
            if st.sum is None and not isinstance(m, nn.Linear):
                st.add_moment(inp[0])
                return
            r = _rows(m, inp[0])
            if r is not None and r.shape[1] == st.n:
                st.add(r)

        stats[name] = st
        handles.append(mod.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in _batches(batches):
                _forward(model, b)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: v for k, v in stats.items() if v.count > 0}


# --------------------------------------------------------------------------------------
# compensation and recalibration
# --------------------------------------------------------------------------------------

def compensate(model, stats: dict, *, damp: float = 0.1) -> dict:
    """Compensate every compressed layer that has calibration statistics, in place.

    The latent weight of each layer is replaced by the result of
    :func:`opq_core.compensate.compensate_layer` on its installed plan and mask (which stay
    as they are). Returns ``{layer: Compensation}``.
    """
    from opq_core.compensate import compensate_layer
    from .compress import _require
    out = {}
    for _, mod, attr, q in _require(model, "compensate"):
        st = stats.get(q.name)
        if st is None or st.hessian is None:
            continue
        orig = mod.parametrizations[attr].original
        w = to_numpy(orig)
        r = compensate_layer(q.layer, w, st.hessian, q.mask.cpu().numpy(), damp=damp)
        if r.used:
            with torch.no_grad():
                orig.copy_(torch.from_numpy(np.ascontiguousarray(r.weight)).to(orig))
        out[q.name] = r
    return out


def recalibrate(model, batches: Iterable) -> int:
    r"""Re-estimate every BatchNorm's running statistics on a few unlabeled batches.

    Running means and variances are reset and recomputed as the cumulative average over
    ``batches`` (``momentum=None``), with the rest of the model in eval mode (dropout off),
    under ``torch.no_grad()``: nothing else changes. Each module's train/eval mode and
    momentum are restored afterwards. Use the training transform's augmented images (or
    any unlabeled inputs from the training distribution); a few thousand images suffice.

    .. math:: \hat\mu = \frac{1}{T}\sum_{t=1}^{T} \mu_t, \qquad
              \hat\sigma^2 = \frac{1}{T}\sum_{t=1}^{T} \sigma^2_t
              \quad(\text{per-batch statistics } \mu_t, \sigma^2_t)

    Returns the number of batches seen (0 when the model has no BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    batches = list(batches)
    if not batches:
        raise ValueError("recalibrate: batches is empty")
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    moms = {m: m.momentum for m in bns}
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for b in _batches(batches):
                _forward(model, b)
                seen += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, mom in moms.items():
            m.momentum = mom
    return seen


def _unit_mean(v):
    """``v / mean(v)``; None when that is constant (a fresh norm: the unweighted rule)."""
    if v is None:
        return None
    u = v / float(np.mean(v))
    return None if float(u.max() - u.min()) <= 1e-12 else u


def importance_for(model, weights, sensitivity, example, cal_stats, method):
    """The ``importance=`` of :func:`opq_core.plan` for ``compress(sensitivity=...)``."""
    if sensitivity is None or method == "uniform":
        return None
    if isinstance(sensitivity, str):
        if sensitivity != "auto":
            raise ValueError(f"compress: sensitivity must be 'auto', None or a mapping, got "
                             f"{sensitivity!r}")
        imp = sensitivity_of(model, weights, example)
        if cal_stats:
            for name, st in cal_stats.items():
                g = imp.get(name, (None, None))[0]
                h = _positive(st.moment)
                if g is not None or h is not None:
                    imp[name] = (g, h)
        # each layer's importance averages 1: it redistributes the error within a layer and
        # leaves the balance between layers to the plan (absolute gains, in the units of
        # each norm, collapsed CREPE-tiny at sparsity 0.75 / 3 bits: benchmarks/results)
        imp = {k: tuple(_unit_mean(v) for v in gh) for k, gh in imp.items()}
        imp = {k: gh for k, gh in imp.items() if gh[0] is not None or gh[1] is not None}
        return imp or None
    return sensitivity
