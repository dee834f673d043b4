"""The compression methods of the study, each a small adapter over the project's API.

Every method answers two questions for one trained model and one target ``paper_rate``:

* ``allocate``: masks + quantizer from the weights alone (post-training compression);
* ``finetune``: the same compression after a fixed budget of training epochs.

Methods with a fixed bit-width ``B`` reach a target rate ``R`` through the sparsity

.. math:: p = 1 - \\frac{32}{B R}, \\qquad \\text{paper\\_rate} = \\frac{32}{B (1 - p)} = R.

Methods with a size budget (``budget``, ``annc``) take ``budget_bits = 32 N / R`` directly.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import opq_core
from opq_torch.demo import examples as ex

#: name -> (label, description)
METHODS = {
    "opq": ("OPQ", "one-shot OPQ: unified channel-wise scales, offset grid, Laplace model"),
    "opq_layer": ("OPQ layer-wise", "one-shot OPQ with one scale per layer"),
    "opq_empirical": ("OPQ empirical", "one-shot OPQ with errors measured on the weights"),
    "global": ("global magnitude", "one global magnitude threshold, same quantizer"),
    "uniform": ("uniform sparsity", "the same sparsity in every layer, same quantizer"),
    "budget": ("size budget (mixed bits)", "one-shot bits 1..8 + sparsity per layer under "
               "the budget"),
    "annc": ("ANNC", "post-training: ANNC's joint projection; fine-tuned: ADMM training "
             "(or the projection + STE fine-tuning when the ADMM driver is missing)"),
    "dc": ("Deep Compression", "iterative magnitude pruning (per-layer std threshold) with "
           "retraining, then per-layer k-means codebooks"),
}
#: methods with a fixed bit-width (sparsity from the rate).
FIXED_BITS = ("opq", "opq_layer", "opq_empirical", "global", "uniform", "dc")
#: keyword arguments of opq_core.plan per method (sparsity mode).
PLAN_KW = {
    "opq": {},
    "opq_layer": {"channelwise": "layer"},
    "opq_empirical": {"error_model": "empirical"},
    "global": {"method": "global"},
    "uniform": {"method": "uniform"},
}


def sparsity_for(rate: float, bits: int) -> float:
    """Sparsity that gives ``paper_rate = rate`` at ``bits`` per kept weight."""
    p = 1.0 - 32.0 / (bits * rate)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"rate={rate!r} is not reachable with bits={bits!r} (sparsity {p:.4g})")
    return p


def weights_of(model) -> dict:
    """``{state_dict name: float32 ndarray}`` of the conv/linear weights (ndim >= 2)."""
    out = {}
    for name, t in model.state_dict().items():
        if t.dtype.is_floating_point and t.ndim >= 2:
            out[name] = t.detach().cpu().numpy().copy()
    return out


def others_of(model, names) -> dict:
    """Every other floating tensor of the state_dict (biases, norms), as ndarrays."""
    return {k: t.detach().cpu().numpy().copy() for k, t in model.state_dict().items()
            if k not in names and t.dtype.is_floating_point}


def with_weights(model, weights: dict):
    """A deep copy of ``model`` whose named weights are replaced by ``weights``."""
    m = copy.deepcopy(model)
    sd = m.state_dict()
    for k, v in weights.items():
        sd[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).reshape(sd[k].shape)
    m.load_state_dict(sd)
    return m


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

@dataclass
class Allocation:
    """Masks and quantizer of one compression (a plan; masks for codebook plans)."""

    plan: object
    masks: dict | None
    seconds: float
    note: str = ""


@dataclass
class Tuned:
    """A fine-tuned compressed model and what it cost."""

    model: object
    plan: object
    masks: dict
    seconds: float
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# allocation (post-training)
# ---------------------------------------------------------------------------

def dc_masks(weights: dict, sparsity: float) -> dict:
    """Deep-Compression-style pruning masks: prune ``|w| < q * std_layer`` with one quality
    factor ``q`` for the network, chosen so that exactly ``round(p N)`` weights go.

    Ties are broken by position (lower flat index kept first), as a stable sort does.
    """
    names = list(weights)
    norm = []
    for n in names:
        w = weights[n].astype(np.float64).reshape(-1)
        sd = float(w.std())
        norm.append(np.abs(w) / sd if sd > 0 else np.zeros_like(w))
    a = np.concatenate(norm)
    k = int(round(sparsity * a.size))
    prune = np.zeros(a.size, dtype=bool)
    if k > 0:
        prune[np.argsort(a, kind="stable")[:k]] = True
    out, o = {}, 0
    for n in names:
        size = weights[n].size
        out[n] = ~prune[o:o + size].reshape(weights[n].shape)
        o += size
    return out


def codebook_plan(weights: dict, masks: dict, bits: int, *, budget_bits=None):
    """A codebook plan: per-layer zero-anchored k-means (``2**bits`` centroids) of the kept
    weights (opq_core.annc's exact 1-D k-means)."""
    from opq_core import annc
    books = {}
    for n, w in weights.items():
        kept = w[masks[n]]
        books[n] = annc.kmeans_zero_anchored(kept, bits=(bits,)).codebooks[0] if kept.size \
            else np.array([1.0])
    return annc.annc_plan(weights, masks, books, {n: bits for n in weights},
                          budget_bits=budget_bits)


def allocate(method: str, weights: dict, rate: float, bits: int, **plan_kw) -> Allocation:
    """Post-training compression of ``weights`` at the target ``rate``."""
    t0 = time.perf_counter()
    if method in PLAN_KW:
        kw = dict(PLAN_KW[method], **plan_kw)
        p = opq_core.plan(weights, sparsity=sparsity_for(rate, bits), bits=bits, **kw)
        return Allocation(p, None, time.perf_counter() - t0)
    if method == "budget":
        p = opq_core.plan(weights, rate=rate, **plan_kw)
        return Allocation(p, None, time.perf_counter() - t0)
    if method == "annc":
        from opq_core import annc
        S = annc.annc_budget(weights, rate=rate)
        pr = annc.project(weights, S)
        p = annc.annc_plan(weights, pr.masks, pr.codebooks, pr.bits, budget_bits=S)
        return Allocation(p, pr.masks, time.perf_counter() - t0)
    if method == "dc":
        m = dc_masks(weights, sparsity_for(rate, bits))
        p = codebook_plan(weights, m, bits)
        return Allocation(p, m, time.perf_counter() - t0)
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")


def dequantized(alloc: Allocation, weights: dict) -> dict:
    return alloc.plan.apply(weights, masks=alloc.masks)


# ---------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------

def _adam_finetune(model, train_loader, epochs: int, lr: float, seed: int, step_hook=None):
    """The common fine-tuning recipe: Adam, cosine learning rate over the epochs."""
    import opq_torch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    with ex.deterministic(seed):
        return opq_torch.finetune(model, train_loader, epochs=epochs, optimizer=opt,
                                  scheduler=sched, step_hook=step_hook, progress=False)


def finetune_plan(model, alloc: Allocation, train_loader, *, epochs, lr, seed) -> Tuned:
    """Install the fixed plan (masks, scales, steps) and fine-tune the latent weights."""
    import opq_torch
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    opq_torch.compress(m, alloc.plan, masks=alloc.masks)
    _adam_finetune(m, train_loader, epochs, lr, seed)
    return Tuned(m, alloc.plan, opq_torch.masks_of(m), time.perf_counter() - t0)


def _mask_hook(masks: dict, params: dict):
    tensors = {n: torch.from_numpy(masks[n]) for n in masks}

    def hook(model, step):
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].mul_(t)
    return hook


def finetune_dc(model, train_loader, *, rate, bits, epochs, lr, seed, stages: int = 3) -> Tuned:
    """Deep Compression within ``epochs``: ``stages`` rounds of pruning (sparsity ramped
    linearly to the target) each followed by masked retraining, then per-layer k-means and
    the last ``max(1, epochs // 4)`` epochs fine-tuning the weights through the fixed
    codebooks (straight-through; the original fine-tunes the centroids instead)."""
    import opq_torch
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    target = sparsity_for(rate, bits)
    e_q = max(1, epochs // 4)
    e_p = epochs - e_q
    stages = max(1, min(stages, e_p)) if e_p > 0 else 1
    per = [e_p // stages + (1 if s < e_p % stages else 0) for s in range(stages)]
    params = dict(m.named_parameters())
    masks = None
    for s in range(stages):
        w = weights_of(m)
        masks = dc_masks(w, target * (s + 1) / stages)
        with torch.no_grad():
            for n, mk in masks.items():
                params[n].mul_(torch.from_numpy(mk))
        if per[s] > 0:
            _adam_finetune(m, train_loader, per[s], lr, seed + 101 * s,
                           step_hook=_mask_hook(masks, params))
    w = weights_of(m)
    p = codebook_plan(w, masks, bits)
    opq_torch.compress(m, p, masks=masks)
    _adam_finetune(m, train_loader, e_q, lr, seed + 7)
    return Tuned(m, p, opq_torch.masks_of(m), time.perf_counter() - t0,
                 note=f"{stages} prune stages {per} epochs + {e_q} codebook epochs")


def annc_driver():
    """The torch ANNC convenience function, or None while it is not available."""
    try:
        from opq_torch import annc as tannc
    except ImportError:
        return None
    return getattr(tannc, "compress_annc", None)


def finetune_annc(model, alloc: Allocation, train_loader, *, rate, epochs, lr, seed) -> Tuned:
    """ANNC with the same epoch budget: half ADMM, half fine-tuning after the final
    projection, with the driver's own optimizer settings (SGD, its default learning rate);
    falls back to the one-shot projection + STE fine-tuning without the driver."""
    import opq_torch
    drv = annc_driver()
    if drv is None:
        t = finetune_plan(model, alloc, train_loader, epochs=epochs, lr=lr, seed=seed)
        t.note = "ADMM driver unavailable: one-shot ANNC projection + STE fine-tuning"
        return t
    m = copy.deepcopy(model)
    e_admm = max(1, epochs // 2)
    e_ft = max(0, epochs - e_admm)
    t0 = time.perf_counter()
    with ex.deterministic(seed):
        out = drv(m, train_loader, rate=rate, epochs_admm=e_admm, epochs_finetune=e_ft,
                  progress=False)
    secs = time.perf_counter() - t0
    p = getattr(out, "plan", None) or opq_torch.plan_of(m)
    return Tuned(m, p, opq_torch.masks_of(m), secs,
                 note=f"ADMM {e_admm} epochs + fine-tuning {e_ft} epochs (SGD, driver defaults)")


def finetune(method: str, model, alloc: Allocation, train_loader, *, rate, bits, epochs, lr,
             seed) -> Tuned:
    if method == "dc":
        return finetune_dc(model, train_loader, rate=rate, bits=bits, epochs=epochs, lr=lr,
                           seed=seed)
    if method == "annc":
        return finetune_annc(model, alloc, train_loader, rate=rate, epochs=epochs, lr=lr,
                             seed=seed)
    return finetune_plan(model, alloc, train_loader, epochs=epochs, lr=lr, seed=seed)


# ---------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------

def storage_rate(plan, weights: dict, masks: dict | None, others: dict,
                 layout: str = "entropy") -> tuple:
    """Write the compressed model to a temporary ``.opq`` file; ``(storage_rate,
    paper_rate, file_bytes)`` measured on the written file."""
    from opq_core import format as fmt
    fd, path = tempfile.mkstemp(suffix=".opq")
    os.close(fd)
    try:
        cf = fmt.write_opq(path, plan, weights={n: weights[n] for n in plan.names},
                           masks=masks, other=others, layout=layout)
        return float(cf.storage_rate), float(cf.paper_rate), int(cf.file_bytes)
    finally:
        os.unlink(path)


def tuned_storage(t: Tuned, others: dict) -> tuple:
    import opq_torch
    return storage_rate(t.plan, opq_torch.compressed_weights(t.model), t.masks, others)


# ---------------------------------------------------------------------------
# ablations
# ---------------------------------------------------------------------------

def per_channel_plan(weights: dict, rate: float, bits: int, *, error_model="empirical",
                     grid="offset"):
    """Per-channel steps, emulated: every output channel becomes its own pseudo-layer
    (one scale and one step each, errors measured on that channel), one global multiplier.

    Returns ``(plan over pseudo-layers, dequantized weights reassembled per real layer)``.
    """
    parts = {}
    for n, w in weights.items():
        for c in range(w.shape[0]):
            parts[f"{n}#{c}"] = w[c:c + 1]
    t0 = time.perf_counter()
    p = opq_core.plan(parts, sparsity=sparsity_for(rate, bits), bits=bits,
                      channelwise="layer", error_model=error_model, grid=grid)
    secs = time.perf_counter() - t0
    deq = p.apply(parts)
    out = {n: np.concatenate([deq[f"{n}#{c}"] for c in range(w.shape[0])], axis=0)
           for n, w in weights.items()}
    return p, out, secs


def measured_errors(plan, weights: dict, masks=None) -> dict:
    """Per layer: the plan's predicted error against the error measured on the weights.

    ``measured = ||w - Q(w)||^2``; ``pruning`` = sum of the squared pruned weights (exact
    in both); the quantization error of the kept weights is ``measured - pruning``
    (``q_measured``) against ``predicted - pruning`` (``q_predicted``).
    """
    deq = plan.apply(weights, masks=masks)
    out = {}
    for lp in plan.layers:
        d = weights[lp.name].astype(np.float64) - deq[lp.name].astype(np.float64)
        meas = float(np.sum(d * d))
        out[lp.name] = {"measured": meas, "predicted": float(lp.predicted_error),
                        "pruning": float(lp.pruning_error),
                        "q_measured": meas - float(lp.pruning_error),
                        "q_predicted": float(lp.predicted_error) - float(lp.pruning_error),
                        "sparsity": float(lp.sparsity),
                        "predicted_sparsity": float(lp.predicted_sparsity),
                        "n": int(lp.n)}
    return out
