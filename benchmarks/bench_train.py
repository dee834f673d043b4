"""Training-step cost of a compressed model: opq_torch vs uncompressed vs pure-torch fake-quant.

A ResNet-style CNN (CIFAR-sized input, batch 64) on the CPU, 4 bits, sparsity 0.9. One
training step (forward, backward, SGD with momentum and weight decay) of

- the uncompressed model (the baseline, ratio 1.0),
- the model compressed by :func:`opq_torch.compress` (Numba kernel through NumPy views),
- the same masks with a pure-torch quantizer in a parametrization:
  ``torch.fake_quantize_per_channel_affine(w, ...) * mask``,

timed in the same run, interleaved (one step of each variant per round) so that machine load
hits all three alike; the ratios use the best step of each variant (medians are reported too:
on a shared machine they mostly measure the other processes). Also the quantizer alone (every compressed weight forward + backward,
no convolution) for both quantizers, as a ratio to the opq one.

    python benchmarks/bench_train.py [--quick] [--rounds N] [--threads T] [--clock thread]

Writes ``benchmarks/results/bench_train.json`` and ``.md`` (``bench_train.thread.*`` with
``--clock thread``: one torch thread, CPU time of that thread, which other processes on a
shared machine do not inflate).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, markdown_table, write_report  # noqa: E402

import opq_torch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (y + (x if self.short is None else self.short(x))).relu()


class ResNet(nn.Module):
    """ResNet for 32x32 inputs: a stem, three stages of ``blocks`` basic blocks."""

    def __init__(self, widths=(32, 64, 128), blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


class TorchFakeQuant(nn.Module):
    """The pure-torch baseline: per-channel affine fake-quant times the mask."""

    def __init__(self, w, mask, bits):
        super().__init__()
        qmax = (1 << (bits - 1)) - 1
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-8)
        self.register_buffer("scale", (amax / qmax).float())
        self.register_buffer("zero_point", torch.zeros(w.shape[0], dtype=torch.int32))
        self.register_buffer("mask", mask.to(w.dtype))
        self.qmin, self.qmax = -qmax - 1, qmax

    def forward(self, w):
        q = torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, 0,
                                                   self.qmin, self.qmax)
        return q * self.mask


def make_models(widths, blocks, sparsity, bits):
    torch.manual_seed(0)
    dense = ResNet(widths, blocks)
    opq = ResNet(widths, blocks)
    opq.load_state_dict(dense.state_dict())
    t = time.perf_counter()
    plan = opq_torch.compress(opq, sparsity=sparsity, bits=bits)
    compress_s = time.perf_counter() - t
    masks = opq_torch.masks_of(opq)
    base = ResNet(widths, blocks)
    base.load_state_dict(dense.state_dict())
    for name, m in masks.items():
        mod = base.get_submodule(name.rsplit(".", 1)[0])
        parametrize.register_parametrization(
            mod, "weight", TorchFakeQuant(mod.weight, torch.from_numpy(m), bits))
    return {"uncompressed": dense, "opq": opq, "torch fake-quant": base}, plan, compress_s


def quantizer_only(model):
    """Every parametrized weight: forward + backward of the quantizer alone."""
    mods = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]

    grads = [torch.ones_like(m.weight) for m in mods]

    def run():
        torch.autograd.backward([m.weight for m in mods], grads)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a narrower network, fewer rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per variant")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall: perf_counter; thread: CPU time of the calling thread with one "
                         "torch thread (insensitive to other processes on a shared machine)")
    ap.add_argument("--out", default=RESULTS, help="folder of bench_train[.thread].json/.md")
    args = ap.parse_args(argv)
    if args.clock == "thread":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    widths, blocks = ((16, 32, 64), 1) if args.quick else ((32, 64, 128), 2)
    rounds = args.rounds or (5 if args.quick else 15)
    sparsity, bits = 0.9, 4
    models, plan, compress_s = make_models(widths, blocks, sparsity, bits)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            for k, m in models.items()}

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(models[k](x), y).backward()
        opts[k].step()

    names = list(models)
    for k in names:  # warm-up (JIT compile, allocator)
        step(k)
        step(k)
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            t = clock()
            step(k)
            times[k].append(clock() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    qrun = {k: quantizer_only(models[k]) for k in ("opq", "torch fake-quant")}
    qt = {k: [] for k in qrun}
    for k in qrun:
        qrun[k]()
    for r in range(max(2 * rounds, 20)):
        for k in qrun:
            t = clock()
            qrun[k]()
            qt[k].append(clock() - t)
    qmed = {k: statistics.median(v) for k, v in qt.items()}
    qbest = {k: min(v) for k, v in qt.items()}
    base = best["uncompressed"]
    rows = []
    for k in names:
        rows.append({"variant": k, "step ms (best)": 1e3 * best[k],
                     "step ms (median)": 1e3 * med[k], "vs uncompressed": best[k] / base,
                     "vs torch fake-quant": best[k] / best["torch fake-quant"],
                     "median vs uncompressed": med[k] / med["uncompressed"],
                     "quantizer ms (best)": 1e3 * qbest[k] if k in qbest else "",
                     "quantizer vs opq": qbest[k] / qbest["opq"] if k in qbest else ""})
    result = {
        "benchmark": "bench_train", "clock": args.clock, "quick": bool(args.quick),
        "batch": args.batch,
        "input": [3, 32, 32], "widths": list(widths), "blocks_per_stage": blocks,
        "sparsity": sparsity, "bits": bits, "rounds": rounds,
        "threads": torch.get_num_threads(), "compressed_layers": len(plan.layers),
        "compressed_weights": plan.n, "paper_rate": plan.paper_rate,
        "compress_seconds": compress_s,
        "statistic": "best of the interleaved rounds (ratios); medians given too",
        "step_seconds_best": best, "step_seconds_median": med,
        "step_seconds_all": times,
        "quantizer_seconds_best": qbest, "quantizer_seconds_median": qmed,
        "ratio_opq_vs_uncompressed": best["opq"] / base,
        "ratio_opq_vs_torch_fakequant": best["opq"] / best["torch fake-quant"],
        "ratio_torch_fakequant_vs_uncompressed": best["torch fake-quant"] / base,
        "ratio_median_opq_vs_uncompressed": med["opq"] / med["uncompressed"],
        "ratio_median_opq_vs_torch_fakequant": med["opq"] / med["torch fake-quant"],
        "ratio_quantizer_torch_vs_opq": qbest["torch fake-quant"] / qbest["opq"],
        "machine": machine(), "torch": torch.__version__,
    }
    cols = ["variant", "step ms (best)", "step ms (median)", "vs uncompressed",
            "vs torch fake-quant", "median vs uncompressed", "quantizer ms (best)",
            "quantizer vs opq"]
    md = (f"### bench_train: one training step, ResNet-style CNN {list(widths)} x {blocks} "
          f"blocks/stage, batch {args.batch}, 3x32x32, CPU ({torch.get_num_threads()} threads, "
          f"{args.clock} clock), "
          f"{bits} bits, sparsity {sparsity}\n\n{markdown_table(rows, cols)}\n\n"
          f"{len(plan.layers)} compressed layers, {plan.n} weights, paper_rate "
          f"{plan.paper_rate:.1f}x; {rounds} interleaved steps per variant; ratios of the best "
          f"step (robust to other processes' load), medians alongside.\n")
    write_report(args.out, "bench_train" if args.clock == "wall" else "bench_train.thread",
                 result, md)
    return result


if __name__ == "__main__":
    main()
