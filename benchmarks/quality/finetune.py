r"""Fine-tuned comparison on ResNet-20: opq's plan + fine-tuning vs magnitude + RTN + the same.

At a few matched sizes, both methods start from their post-training compression of the same
pretrained ResNet-20 and get the same short fine-tuning (:func:`opq_torch.finetune`: SGD,
lr 0.005, momentum 0.9, weight decay 1e-4, constant rate; the same batches in the same
order, random crop + flip), then top-1 on the 5,000 held-out images.

* opq: ``opq_torch.compress(model, rate=r, bits=None)`` (the data-free size-budget plan);
  the plan (masks, scales, steps) stays fixed, the latent weights train through the
  straight-through estimator.
* baseline: one global magnitude threshold + per-channel RTN with the clip search
  (:func:`quality.methods.magnitude_rtn`), at the sparsity whose bytes equal opq's
  (bisection, same byte accounting as the post-training rows). Its bit-width (2, 3 or 4) is
  the one with the best post-training accuracy on 2,000 *training* images that the
  fine-tuning never sees (never the reported images). Fine-tuning keeps its masks and its
  per-channel grids (scale, zero) fixed: :class:`FixedRTN` fake-quantizes the latent weight
  with a straight-through gradient.

Bytes are measured again after fine-tuning (opq: the written ``.opq`` file; baseline: the
entropy of its final codes), since the codes move.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import methods as Q

#: the fine-tuning pool: CIFAR training images minus the validation images below
VALIDATION_IMAGES = 2000
BASELINE_BITS = (2, 3, 4)
#: a baseline candidate whose bytes miss opq's by more than this is not a matched size
BYTES_TOLERANCE = 0.01


class FixedRTN(nn.Module):
    """``mask * RTN(w)`` on a fixed per-row grid, straight-through gradient (masked)."""

    def __init__(self, mask, scale, zero, bits):
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bits = int(bits)

    def forward(self, w):
        w2 = w.reshape(w.shape[0], -1)
        deq, _ = Q.rtn_apply(w2.detach(), self.scale, self.zero, self.bits)
        out = (w2 + (deq - w2).detach()) * self.mask.reshape(w2.shape)
        return out.reshape(w.shape)

    def codes(self, w):
        return Q.rtn_apply(w.detach().reshape(w.shape[0], -1), self.scale, self.zero,
                           self.bits)[1]


def install_baseline(model, names, sparsity, bits):
    """Magnitude masks + clip-searched RTN grids installed as :class:`FixedRTN`
    parametrizations on ``model`` (in place); ``{name: FixedRTN}``."""
    weights, masks = Q.pruned_targets(model, names, sparsity)
    mods = Q.targets(model, ())
    out = {}
    for k in names:
        w = weights[k]
        m2 = masks[k].reshape(w.shape[0], -1)
        scale, zero, _ = Q.rtn_fit(w.reshape(w.shape[0], -1), m2, bits, clip=True)
        fq = FixedRTN(m2.reshape(w.shape), scale, zero, bits)
        parametrize.register_parametrization(mods[k], "weight", fq)
        out[k] = fq
    return out


def baseline_layers(model, installed):
    """The byte accounting of :func:`quality.methods.magnitude_rtn` on the current codes."""
    mods = Q.targets(model, ())
    layers = []
    for k, fq in installed.items():
        w = mods[k].parametrizations.weight.original
        m2 = fq.mask.bool().reshape(w.shape[0], -1)
        q = fq.codes(w)
        layers.append(Q.baseline_bytes(k, q[m2].numpy(), int(m2.sum()), w.numel(),
                                       int(m2.any(1).sum())))
    return layers


def matched_sparsity(model, names, bits, target_bytes, iters=16):
    """The global sparsity at which magnitude + RTN-clip ``bits`` takes ``target_bytes``
    (bisection; bytes fall as sparsity rises), or None when even sparsity 0 is smaller."""
    def size(s):
        return Q.magnitude_rtn(model, names, sparsity=s, bits=bits, clip=True).bytes

    if size(0.0) < target_bytes * (1 - BYTES_TOLERANCE):
        return None
    lo, hi = 0.0, 0.995
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if size(mid) > target_bytes:
            lo = mid
        else:
            hi = mid
    return hi


@torch.no_grad()
def accuracy(model, x, y, batch=500):
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
               for i in range(0, len(y), batch))
    return hits / len(y)


class EpochBatches:
    """``images_per_epoch`` images drawn afresh every epoch from the pool (seeded), augmented,
    in batches; iterating twice with the same seed gives the same batches."""

    def __init__(self, x, y, images_per_epoch, batch, seed, augment):
        self.x, self.y = x, y
        self.n = min(int(images_per_epoch), len(y))
        self.batch, self.seed, self.augment = batch, seed, augment
        self.epoch = 0

    def __len__(self):
        return -(-self.n // self.batch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        idx = torch.randperm(len(self.y), generator=g)[:self.n]
        for i in range(0, self.n, self.batch):
            j = idx[i:i + self.batch]
            yield self.augment(self.x[j], generator=g), self.y[j]


def run(model, data, rates=(16.0, 32.0), *, epochs=2, images_per_epoch=45000, batch=128,
        seed=0, log=print):
    """The comparison at every opq size-budget target in ``rates``; a JSON-able dict."""
    import opq_torch
    cifar, x_train, y_train, x_test, y_test = data
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
    val, pool = perm[:VALIDATION_IMAGES], perm[VALIDATION_IMAGES:]
    xv, yv = x_train[val], y_train[val]
    xp, yp = x_train[pool], y_train[pool]
    names = list(Q.targets(model))
    dense = accuracy(model, x_test, y_test)
    rows = []
    t_all = time.perf_counter()

    def tune(m):
        loader = EpochBatches(xp, yp, images_per_epoch, batch, seed + 1, cifar.augment)
        torch.manual_seed(seed)
        t = time.perf_counter()
        h = opq_torch.finetune(m, loader, epochs=epochs, progress=False)
        return time.perf_counter() - t, [float(v) for v in h.train_loss]

    for r in rates:
        # ---- opq ----
        m = copy.deepcopy(model)
        opq_torch.compress(m, rate=r, bits=None)
        before, _ = Q.opq_file_bytes(m, names)
        b_opq = sum(x.bytes for x in before)
        ptq_opq = accuracy(m, x_test, y_test)
        secs_opq, loss_opq = tune(m)
        after, _ = Q.opq_file_bytes(m, names)
        ft_opq = accuracy(m, x_test, y_test)
        n = sum(x.n for x in after)
        log(f"[finetune] opq rate={r:g}: {4 * n / b_opq:.2f}x, top1 {ptq_opq:.4f} -> "
            f"{ft_opq:.4f} ({secs_opq:.0f} s)")
        # ---- the baseline at opq's bytes: bits chosen on validation images ----
        cands = []
        for bits in BASELINE_BITS:
            s = matched_sparsity(model, names, bits, b_opq)
            if s is None:
                continue
            c = Q.magnitude_rtn(model, names, sparsity=s, bits=bits, clip=True)
            if abs(c.bytes / b_opq - 1) > BYTES_TOLERANCE:
                continue
            cands.append({"bits": bits, "sparsity": s, "bytes": c.bytes,
                          "validation_top1": accuracy(c.model, xv, yv)})
        best = max(cands, key=lambda c: c["validation_top1"])
        mb = copy.deepcopy(model)
        inst = install_baseline(mb, names, best["sparsity"], best["bits"])
        b_base = sum(x.bytes for x in baseline_layers(mb, inst))
        ptq_base = accuracy(mb, x_test, y_test)
        secs_base, loss_base = tune(mb)
        b_base_after = sum(x.bytes for x in baseline_layers(mb, inst))
        ft_base = accuracy(mb, x_test, y_test)
        log(f"[finetune] magnitude s={best['sparsity']:.3f} + RTN-clip {best['bits']}b: "
            f"{4 * n / b_base:.2f}x, top1 {ptq_base:.4f} -> {ft_base:.4f} ({secs_base:.0f} s)")
        rows.append({
            "rate": r,
            "opq": {"bytes_before": b_opq, "bytes_after": sum(x.bytes for x in after),
                    "storage_rate_before": 4 * n / b_opq,
                    "storage_rate_after": 4 * n / sum(x.bytes for x in after),
                    "top1_post_training": ptq_opq, "top1_finetuned": ft_opq,
                    "seconds": secs_opq, "train_loss": loss_opq},
            "baseline": {"label": f"magnitude s={best['sparsity']:.3f} + RTN-clip "
                                  f"{best['bits']}b",
                         "bits": best["bits"], "sparsity": best["sparsity"],
                         "bytes_before": b_base, "bytes_after": b_base_after,
                         "storage_rate_before": 4 * n / b_base,
                         "storage_rate_after": 4 * n / b_base_after,
                         "top1_post_training": ptq_base, "top1_finetuned": ft_base,
                         "seconds": secs_base, "train_loss": loss_base,
                         "candidates": cands}})
        del m, mb
    return {"dense_top1": dense, "epochs": epochs, "images_per_epoch": min(images_per_epoch,
                                                                          len(pool)),
            "pool_images": len(pool), "validation_images": VALIDATION_IMAGES, "batch": batch,
            "optimizer": "SGD lr 0.005 momentum 0.9 weight decay 1e-4 (opq_torch.finetune "
                         "defaults), constant rate",
            "augmentation": "random crop (pad 4) + horizontal flip", "seed": seed,
            "rows": rows, "seconds": time.perf_counter() - t_all}


def markdown(ft):
    lines = ["## ResNet-20: post-training + the same short fine-tuning", "",
             f"Both methods fine-tuned {ft['epochs']} epoch(s) of {ft['images_per_epoch']:,} "
             f"training images each (drawn afresh per epoch from a pool of "
             f"{ft['pool_images']:,}; batch {ft['batch']}; {ft['optimizer']}; "
             f"{ft['augmentation']}); the same batches for both. opq: its data-free "
             f"size-budget plan, fixed; baseline: global magnitude + RTN-clip at opq's bytes, "
             f"masks and grids fixed, straight-through fake-quant; its bit-width chosen on "
             f"{ft['validation_images']:,} training images outside the fine-tuning pool. "
             f"Top-1 on the 5,000 held-out images (dense {ft['dense_top1']:.4f}). Storage rate "
             f"after fine-tuning (the codes move).", "",
             "| opq target | opq storage rate | opq post-training | opq fine-tuned | baseline "
             "| its storage rate | baseline post-training | baseline fine-tuned | "
             "fine-tuned: opq - baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ft["rows"]:
        o, b = r["opq"], r["baseline"]
        lines.append(f"| rate={r['rate']:g} | {o['storage_rate_after']:.4g} | "
                     f"{o['top1_post_training']:.4f} | {o['top1_finetuned']:.4f} | "
                     f"{b['label']} | {b['storage_rate_after']:.4g} | "
                     f"{b['top1_post_training']:.4f} | {b['top1_finetuned']:.4f} | "
                     f"{o['top1_finetuned'] - b['top1_finetuned']:+.4f} |")
    lines += ["", f"Wall time {ft['seconds']:.0f} s.", ""]
    return lines


def load_data():
    """``((cifar module, x_train, y_train, x_test, y_test), None)`` (normalized tensors) or
    ``(None, reason)``."""
    from . import models as M
    loaded, why = M.cifar_loaded()
    if loaded is None:
        return None, why
    cifar, xtr, ytr, mean, std, xte, yte = loaded
    return (cifar, cifar.to_tensor(xtr, mean, std), torch.as_tensor(ytr, dtype=torch.long),
            xte, yte), None
