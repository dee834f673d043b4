r"""Compression methods of the quality benchmark and their byte accounting.

Every method compresses the same weights of a model (its *targets*: the ``weight`` of every
``Linear`` / ``Conv*`` / ``ConvTranspose*`` module with ``ndim >= 2``, as ``opq_torch.compress``
chooses them, minus the model's ``exclude`` list) and returns a :class:`Compressed`: a model
to evaluate plus the bytes of those weights, per layer.

Bytes
    * opq: the real bytes of the compressed layers in the written ``.opq`` file
      (``opq_torch.save``, entropy layout; ``CompressedFile.compressed_bytes``: codes, index,
      scales, codebooks and their header entries).
    * baselines, counted generously (the comparison is of allocation and quantizer, not of
      the entropy coder): per layer, the order-0 entropy of the histogram of the kept weights'
      codes times the kept count, plus the binary entropy of the mask density times the
      layer's size (zero for a dense layer), plus fp16 side information (a scale and a zero
      point, 2 bytes each, per output channel or per group):

      .. math:: B = \tfrac18\big(k\,H(\text{codes}) + n\,h(k/n)\big) + 4\,G.

Baselines (post-training, no data)
    * ``magnitude``: one global magnitude threshold over all targets (``sparsity`` of all
      target weights pruned), then per-output-channel asymmetric round-to-nearest (RTN) of the
      kept weights: range :math:`[r \min(w, 0), r \max(w, 0)]` over the channel's kept weights,
      :math:`2^b` levels, integer zero point, fp16 scale. ``clip=True``: the ratio
      :math:`r \in \{0.50, 0.525, \dots, 1.0\}` that minimizes the channel's squared error on
      its kept weights (a search on the weights only); ``clip=False``: :math:`r = 1`.
      Sparsity 0 is RTN alone.
    * ``hqq``: HQQ (``hqq.core.quantize.Quantizer``, half-quadratic proximal optimization of
      scale and zero, ``optimize=True``, ``round_zero`` at 4 bits as in HQQ's default config)
      on groups of 64 consecutive weights of the row-major weight (padded at the end by
      repeating its last value when the size is not a multiple of 64), fp16 scale and zero;
      with ``sparsity > 0`` the weights are first pruned by the global magnitude rule, HQQ
      quantizes the pruned tensor and the mask is applied again.
    * ``quanto``: optimum-quanto ``quantize(model, weights=qint4 / qint2)`` + ``freeze``
      (its default weight quantizer: affine, groups of 128 along the input axis); its
      dequantized weights are evaluated; codes = quanto's unpacked integer data.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

#: fp16 scale + fp16 zero point per channel / group
SIDE_BYTES = 4
CLIP_RATIOS = tuple(np.round(np.linspace(0.5, 1.0, 21), 4))


@dataclass(frozen=True)
class LayerBytes:
    name: str
    n: int
    kept: int
    bytes: float
    code_bits: float = 0.0
    mask_bits: float = 0.0
    side_bytes: float = 0.0


@dataclass
class Compressed:
    """A compressed model to evaluate, and the bytes of its compressed weights."""

    model: torch.nn.Module
    layers: list
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n(self):
        return sum(r.n for r in self.layers)

    @property
    def kept(self):
        return sum(r.kept for r in self.layers)

    @property
    def bytes(self):
        return float(sum(r.bytes for r in self.layers))

    def summary(self) -> dict:
        b = self.bytes
        return {"bytes": b, "n": self.n, "sparsity": 1.0 - self.kept / self.n,
                "bits_per_weight": 8.0 * b / self.n, "storage_rate": 4.0 * self.n / b,
                "seconds": self.seconds, **self.extra}


# --------------------------------------------------------------------------------------
# targets and accounting
# --------------------------------------------------------------------------------------

def targets(model, exclude=()) -> dict:
    """``{state_dict name: module}`` of the weights every method compresses."""
    from opq_torch.compress import COMPRESSIBLE
    out = {}
    for path, mod in model.named_modules():
        if (isinstance(mod, COMPRESSIBLE) and mod.weight is not None
                and mod.weight.dtype.is_floating_point and mod.weight.ndim >= 2
                and path not in exclude):
            out[f"{path}.weight" if path else "weight"] = mod
    return out


def entropy_bits(codes: np.ndarray) -> float:
    """``count * H(histogram)`` in bits (order-0 entropy of the integer codes)."""
    codes = np.asarray(codes).ravel()
    if codes.size == 0:
        return 0.0
    _, counts = np.unique(codes, return_counts=True)
    p = counts / codes.size
    return float(-(counts * np.log2(p)).sum())


def mask_bits(kept: int, n: int) -> float:
    """``n * h(kept / n)``: the ideal size of the sparsity pattern in bits."""
    if kept in (0, n):
        return 0.0
    p = kept / n
    return float(n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)))


def baseline_bytes(name, codes_kept, kept, n, groups) -> LayerBytes:
    cb, mb = entropy_bits(codes_kept), mask_bits(kept, n)
    side = SIDE_BYTES * groups
    return LayerBytes(name, n, kept, (cb + mb) / 8.0 + side, cb, mb, side)


def with_weights(model, new: dict):
    """A deep copy of ``model`` with the named weights replaced."""
    m = copy.deepcopy(model)
    sd = m.state_dict()
    for k, v in new.items():
        sd[k] = v.to(sd[k].dtype).reshape(sd[k].shape)
    m.load_state_dict(sd)
    return m.eval()


def global_masks(weights: dict, sparsity: float) -> dict:
    """One magnitude threshold over all tensors: the ``sparsity`` fraction of smallest |w|
    (ties at the threshold pruned) is pruned; ``{name: bool tensor}``."""
    if sparsity <= 0:
        return {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    k = int(round(sparsity * flat.numel()))
    if k >= flat.numel():
        raise ValueError(f"global_masks: sparsity={sparsity!r} prunes every weight")
    thr = torch.kthvalue(flat, k).values if k > 0 else flat.min() - 1
    return {name: w.detach().abs() > thr for name, w in weights.items()}


# --------------------------------------------------------------------------------------
# RTN with a clip search
# --------------------------------------------------------------------------------------

def _rtn_grid(lo, hi, r, levels):
    a, b = lo * r, hi * r
    scale = ((b - a) / levels).half().float()           # the fp16 scale actually stored
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-a / scale).clamp(0, levels)
    return scale[:, None], zero[:, None]


def rtn_fit(w: torch.Tensor, mask: torch.Tensor, bits: int, clip: bool):
    """Per-row asymmetric RTN grid of the kept entries of a 2-D ``w``: ``(scale (rows, 1),
    zero (rows, 1), clip ratio per row)``; ``clip=True`` searches the ratio that minimizes
    each row's squared error on its kept weights."""
    w = w.float()
    mf = mask.float()
    lo = torch.where(mask, w, torch.full_like(w, math.inf)).amin(1).clamp(max=0.0)
    hi = torch.where(mask, w, torch.full_like(w, -math.inf)).amax(1).clamp(min=0.0)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    levels = 2 ** bits - 1
    ratios = CLIP_RATIOS if clip else (1.0,)
    best_err, best_r = None, None
    if len(ratios) > 1:
        for r in ratios:
            scale, zero = _rtn_grid(lo, hi, r, levels)
            q = (torch.round(w / scale) + zero).clamp_(0, levels)
            err = ((q.sub_(zero).mul_(scale).sub_(w)).square_().mul_(mf)).sum(1, dtype=torch.float64)
            if best_err is None:
                best_err, best_r = err, torch.full_like(lo, r)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_r = torch.where(better, torch.full_like(lo, r), best_r)
    else:
        best_r = torch.full_like(lo, ratios[0])
    scale, zero = _rtn_grid(lo, hi, best_r, levels)
    return scale, zero, best_r


def rtn_apply(w: torch.Tensor, scale, zero, bits: int):
    """``(dequantized, codes (int64))`` of a 2-D ``w`` on a fixed per-row grid."""
    q = (torch.round(w.float() / scale) + zero).clamp_(0, 2 ** bits - 1)
    return (q - zero) * scale, q.long()


def rtn_channels(w: torch.Tensor, mask: torch.Tensor, bits: int, clip: bool):
    """Per-row asymmetric RTN of the kept entries of a 2-D ``w``.

    Returns ``(dequantized (masked), codes (int64, same shape), ratio per row)``.
    """
    scale, zero, ratio = rtn_fit(w, mask, bits, clip)
    deq, q = rtn_apply(w, scale, zero, bits)
    return deq * mask.float(), q, ratio


def pruned_targets(model, names, sparsity):
    """``(weights, masks)`` of the named targets under one global magnitude threshold."""
    mods = targets(model, ())
    weights = {k: mods[k].weight.detach() for k in names}
    return weights, global_masks(weights, sparsity)


def magnitude_rtn(model, names, *, sparsity=0.0, bits=4, clip=True) -> Compressed:
    t0 = time.perf_counter()
    weights, masks = pruned_targets(model, names, sparsity)
    new, layers = {}, []
    for k, w in weights.items():
        w2, m2 = w.reshape(w.shape[0], -1), masks[k].reshape(w.shape[0], -1)
        deq, q, _ = rtn_channels(w2, m2, bits, clip)
        new[k] = deq
        kept = int(m2.sum())
        groups = int(m2.any(1).sum())
        layers.append(baseline_bytes(k, q[m2].numpy(), kept, w.numel(), groups))
    return Compressed(with_weights(model, new), layers, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------
# HQQ
# --------------------------------------------------------------------------------------

def hqq_tensor(w: torch.Tensor, bits: int, group: int = 64):
    """HQQ on consecutive groups of the flattened ``w``: ``(dequantized, codes)``."""
    from hqq.core.quantize import Quantizer
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % group
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    wq, meta = Quantizer.quantize(flat.reshape(-1, group), nbits=bits, channel_wise=True,
                                  group_size=group, optimize=True, round_zero=(bits == 4),
                                  axis=1, bitpack=False, device="cpu",
                                  compute_dtype=torch.float32)
    scale = meta["scale"].half().float()                   # fp16 side information
    zero = meta["zero"].half().float()
    codes = wq.reshape(-1, group)
    deq = ((codes - zero) * scale).reshape(-1)[:n]
    return deq.reshape(w.shape), codes.reshape(-1)[:n].round().long().reshape(w.shape)


def hqq(model, names, *, bits=4, sparsity=0.0, group=64) -> Compressed:
    t0 = time.perf_counter()
    weights, masks = pruned_targets(model, names, sparsity)
    new, layers = {}, []
    for k, w in weights.items():
        m = masks[k]
        deq, codes = hqq_tensor(w * m, bits, group)
        new[k] = deq * m
        layers.append(baseline_bytes(k, codes[m].numpy(), int(m.sum()), w.numel(),
                                     math.ceil(w.numel() / group)))
    return Compressed(with_weights(model, new), layers, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------
# optimum-quanto
# --------------------------------------------------------------------------------------

_QUANTO = {}


def quanto_status():
    """``None`` when optimum-quanto imports and quantizes a small layer here, else the
    one-line reason."""
    if "status" not in _QUANTO:
        try:
            from optimum.quanto import freeze, qint2, qint4, quantize  # noqa: F401
            probe = torch.nn.Sequential(torch.nn.Linear(128, 8))
            quantize(probe, weights=qint4)
            freeze(probe)
            probe(torch.zeros(1, 128))
            _QUANTO["status"] = None
        except Exception as exc:
            _QUANTO["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return _QUANTO["status"]


def quanto(model, names, *, qtype="qint4") -> Compressed:
    from optimum.quanto import freeze, qint2, qint4, quantize
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    paths = [k[:-len(".weight")] for k in names]
    quantize(m, weights={"qint4": qint4, "qint2": qint2}[qtype], include=paths)
    freeze(m)
    mods = dict(m.named_modules())
    new, layers = {}, []
    for k, p in zip(names, paths):
        qw = mods[p].weight
        if not hasattr(qw, "_data"):
            raise RuntimeError(f"quanto left layer {k!r} unquantized")
        new[k] = qw.dequantize().detach().float()
        data = qw._data.unpack() if hasattr(qw._data, "unpack") else qw._data
        layers.append(baseline_bytes(k, data.numpy(), qw.numel(), qw.numel(),
                                     int(qw._scale.numel())))
    return Compressed(with_weights(model, new), layers, time.perf_counter() - t0,
                      {"group_size": int(getattr(qw, "_group_size", 0) or 0)})


# --------------------------------------------------------------------------------------
# opq
# --------------------------------------------------------------------------------------

def opq_file_bytes(model, names):
    """``([LayerBytes], CompressedFile)`` of a compressed model's written ``.opq`` file."""
    import opq_torch
    with tempfile.TemporaryDirectory() as d:
        cf = opq_torch.save(model, os.path.join(d, "model.opq"))
    recs = {r.name: r for r in cf.layers}
    # per layer: its blob + header share; what the file has beyond their sum (if anything)
    # is shared out by weight count, so the layers add up to compressed_bytes exactly
    total = cf.compressed_bytes
    layer_data = {n: float(recs[n].nbytes) for n in names}
    overhead = total - sum(layer_data.values())
    return [LayerBytes(n, int(recs[n].n), int(recs[n].kept),
                       layer_data[n] + overhead * recs[n].n / cf.n) for n in names], cf


def opq(model, names, *, exclude=(), **kw) -> Compressed:
    """``opq_torch.compress(copy, **kw)``, then the real bytes of its written .opq file."""
    import opq_torch
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    # the tensors no method compresses here (embeddings) stay float for opq too
    others = [k for k, v in m.state_dict().items()
              if v.is_floating_point() and v.ndim >= 2 and k not in names]
    plan = opq_torch.compress(m, exclude=(list(exclude) + others) or None, **kw)
    seconds = time.perf_counter() - t0
    if sorted(plan.names) != sorted(names):
        raise RuntimeError(f"opq compressed {sorted(plan.names)}, the benchmark's targets are "
                           f"{sorted(names)}")
    layers, cf = opq_file_bytes(m, names)
    bits = sorted({int(lp.bits) for lp in plan.layers})
    return Compressed(m.eval(), layers, seconds,
                      {"paper_rate": float(cf.paper_rate), "file_storage_rate":
                       float(cf.storage_rate), "layer_bits": bits,
                       "success": bool(getattr(plan, "success", True))})


#: method name -> function; every point of the benchmark is (method, settings)
METHODS = {"opq": opq, "magnitude": magnitude_rtn, "hqq": hqq, "quanto": quanto}
