"""Train the CIFAR ResNet-20 (``resnet20.py``) for the quality benchmarks.

Data: the 45,000 training images of ``cifar.py`` (CIFAR-10 training split minus the last 500
images of every class, which are held out as the test split). Recipe: SGD with Nesterov
momentum 0.9, weight decay 5e-4, batch 128 (last partial batch dropped), one-cycle learning
rate (``OneCycleLR``), label smoothing 0.1, random crop with 4-pixel padding + horizontal flip.

The run checkpoints after every epoch (model, optimizer, scheduler, epoch, RNG states, timings)
to ``<cache>/resnet20_train.pt`` and resumes from it when restarted with the same settings, so
it can run in chunks (``--stop-after``). The one-cycle schedule spans ``--epochs`` from the
start, so the total is fixed when a run begins. At the end it writes the float32 state_dict
(BatchNorm buffers included) to ``weights/resnet20_cifar10.safetensors`` and the settings,
timings and held-out test accuracy to ``weights/resnet20_cifar10.json``.

    python benchmarks/train_resnet20.py --time-steps 20   # seconds per step, nothing written
    python benchmarks/train_resnet20.py --epochs 10       # train (or resume) and export
    python benchmarks/train_resnet20.py --epochs 10 --export-now  # export the checkpoint as is
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar  # noqa: E402
from resnet20 import WEIGHTS, resnet20  # noqa: E402

CKPT_NAME = "resnet20_train.pt"
# Settings that must match between a checkpoint and the run that resumes it.
_FIXED = ("epochs", "max_lr", "batch", "weight_decay", "momentum", "label_smoothing", "seed",
          "pct_start", "div_factor", "final_div_factor")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12, help="total epochs of the one-cycle run")
    p.add_argument("--max-lr", type=float, default=0.15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--pct-start", type=float, default=0.25,
                   help="fraction of the steps spent raising the learning rate")
    p.add_argument("--div-factor", type=float, default=10.0, help="initial lr = max_lr / this")
    p.add_argument("--final-div-factor", type=float, default=100.0,
                   help="final lr = initial lr / this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep NCHW memory layout (channels_last is faster on CPU)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs in this invocation (0: run to the end)")
    p.add_argument("--time-steps", type=int, default=0,
                   help="only time this many training steps and print seconds per step/epoch")
    p.add_argument("--ckpt", default=None, help=f"checkpoint file (default <cache>/{CKPT_NAME})")
    p.add_argument("--out", default=WEIGHTS, help="weights file to write at the end")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--export-now", action="store_true",
                   help="export the checkpoint as it is, without training further (the JSON "
                        "then records the epochs completed out of the planned total)")
    a = p.parse_args(argv)
    for name in ("epochs", "batch", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    return a


def settings(a):
    return {"epochs": a.epochs, "max_lr": a.max_lr, "batch": a.batch,
            "weight_decay": a.weight_decay, "momentum": a.momentum, "nesterov": True,
            "label_smoothing": a.label_smoothing, "seed": a.seed, "pct_start": a.pct_start,
            "div_factor": a.div_factor, "final_div_factor": a.final_div_factor,
            "schedule": "OneCycleLR (cosine)", "augmentation": "random crop (pad 4) + hflip",
            "channels_last": not a.no_channels_last, "threads": a.threads}


def build(a, steps_per_epoch):
    model = resnet20()
    if not a.no_channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=a.max_lr / a.div_factor, momentum=a.momentum,
                          nesterov=True, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=a.max_lr, epochs=a.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=a.pct_start, div_factor=a.div_factor, final_div_factor=a.final_div_factor)
    return model, opt, sched


def evaluate(model, x, y, batch=500, channels_last=True):
    """Top-1 accuracy (fraction) of ``model`` in eval mode on normalized tensor ``x``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            correct += int((model(xb).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def _save_atomic_torch(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(model, path, meta):
    """Write the float32 state_dict as safetensors and ``meta`` as JSON next to it (atomic)."""
    from safetensors.torch import save_file

    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach())
             .contiguous().clone() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp, metadata={"model": "resnet20_cifar10",
                                    "mean": json.dumps(meta["normalization"]["mean"]),
                                    "std": json.dumps(meta["normalization"]["std"])})
    os.replace(tmp, path)
    jpath = os.path.splitext(path)[0] + ".json"
    tmp = f"{jpath}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    os.replace(tmp, jpath)
    return jpath


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.backends.mkldnn.enabled = True
    cl = not a.no_channels_last

    x_train, y_train, x_test, y_test = cifar.load_cifar10()
    mean, std = cifar.channel_stats(x_train)
    xt = cifar.to_tensor(x_train, mean, std)
    yt = torch.from_numpy(y_train)
    xe = cifar.to_tensor(x_test, mean, std)
    ye = torch.from_numpy(y_test)
    n = len(xt)
    steps = n // a.batch

    torch.manual_seed(a.seed)
    model, opt, sched = build(a, steps)
    gen = torch.Generator().manual_seed(a.seed)
    cfg = settings(a)

    ckpt = a.ckpt or os.path.join(cifar.cache_dir(), CKPT_NAME)
    start_epoch, history, train_seconds = 0, [], 0.0
    if a.time_steps == 0 and not a.fresh and os.path.isfile(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        diff = {k: (state["settings"][k], cfg[k]) for k in _FIXED
                if state["settings"].get(k) != cfg[k]}
        if diff:
            raise SystemExit(f"train_resnet20: checkpoint {ckpt} was made with other settings "
                             f"{diff} (checkpoint, now); pass --fresh to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        start_epoch, history = state["epoch"], state["history"]
        train_seconds = state["train_seconds"]
        print(f"resumed from {ckpt} after epoch {start_epoch}/{a.epochs}", flush=True)

    if a.time_steps:
        model.train()
        perm = torch.randperm(n, generator=gen)
        times = []
        for s in range(a.time_steps + 2):
            t0 = time.perf_counter()
            idx = perm[s * a.batch:(s + 1) * a.batch]
            train_step(model, opt, sched, xt[idx], yt[idx], gen, a.label_smoothing, cl)
            times.append(time.perf_counter() - t0)
        per_step = float(np.median(times[2:]))
        print(json.dumps({"threads": a.threads, "channels_last": cl, "seconds_per_step": per_step,
                          "steps_per_epoch": steps, "seconds_per_epoch": per_step * steps}))
        return None

    if a.export_now and start_epoch == 0:
        raise SystemExit(f"train_resnet20: --export-now needs a checkpoint, none at {ckpt}")
    epochs_run = 0
    for epoch in range(start_epoch, start_epoch if a.export_now else a.epochs):
        if a.stop_after and epochs_run >= a.stop_after:
            print(f"stopping after {epochs_run} epochs (--stop-after); rerun to resume",
                  flush=True)
            return None
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for s in range(steps):
            idx = perm[s * a.batch:(s + 1) * a.batch]
            loss, corr = train_step(model, opt, sched, xt[idx], yt[idx], gen,
                                    a.label_smoothing, cl)
            loss_sum += loss
            correct += corr
            if (s + 1) % 50 == 0:
                print(f"epoch {epoch + 1} step {s + 1}/{steps} loss {loss_sum / (s + 1):.4f} "
                      f"lr {sched.get_last_lr()[0]:.4f} {time.perf_counter() - t0:.0f}s",
                      flush=True)
        secs = time.perf_counter() - t0
        train_seconds += secs
        acc = evaluate(model, xe, ye, channels_last=cl)
        rec = {"epoch": epoch + 1, "seconds": round(secs, 1),
               "train_loss": round(loss_sum / steps, 4),
               "train_accuracy": round(correct / (steps * a.batch), 4),
               "test_accuracy": round(acc, 4)}
        history.append(rec)
        print(json.dumps(rec), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)
        _save_atomic_torch({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "generator": gen.get_state(),
                            "torch_rng": torch.get_rng_state(),
                            "numpy_rng": np.random.get_state(), "epoch": epoch + 1,
                            "history": history, "train_seconds": train_seconds,
                            "settings": cfg}, ckpt)
        epochs_run += 1

    test_acc = evaluate(model, xe, ye, channels_last=cl)
    meta = {
        "model": "ResNet-20 (He et al. 2016), option-A shortcuts, 3x3 basic blocks 16/32/64",
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {"train": f"{n} images: CIFAR-10 training split minus the last "
                          f"{cifar.TEST_PER_CLASS} images of every class (file name order)",
                 "test": f"{len(xe)} images held out from the CIFAR-10 training split "
                         f"(last {cifar.TEST_PER_CLASS} of every class); JPEG-compressed"},
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
                          "scale": "x / 255, then (x - mean) / std per RGB channel"},
        "settings": cfg,
        "steps_per_epoch": steps,
        "epochs": len(history),
        "completed": len(history) == a.epochs,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(train_seconds / max(len(history), 1), 1),
        "test_accuracy": round(test_acc, 4),
        "history": history,
        "torch": torch.__version__,
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count()},
    }
    jpath = export(model, a.out, meta)
    print(f"held-out test accuracy {test_acc:.4f}; wrote {a.out} and {jpath}", flush=True)
    return meta


def train_step(model, opt, sched, xb, yb, gen, label_smoothing, channels_last):
    xb = cifar.augment(xb, gen)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    out = model(xb)
    loss = F.cross_entropy(out, yb, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach()), int((out.detach().argmax(1) == yb).sum())


if __name__ == "__main__":
    main()
