"""ANNC projection time on ResNet-50-shaped weights, as ratios to a full np.sort.

Baseline (timed in the same run): ``np.sort`` of all weights of the compressed layers
concatenated (float32), timed alternately with each projection (medians; the ratio is
robust to a shared machine's varying load). Measured:

- pruning projection (:func:`opq_core.annc.prune_to_budget`) at a few budgets, with mixed
  per-layer bit-widths; target <= 0.5x the sort;
- quantization projection for the 8 bit-widths (:func:`opq_core.annc.quantize_projection`:
  zero-anchored k-means of every layer at b = 1..8 + the multiple-choice knapsack) on the
  masks of the pruning projection; target <= 10x the sort;
- the joint projection (:func:`opq_core.annc.project`, 3 rounds) for reference.

JIT compile time is measured apart (first call on a small problem). Usage::

    python benchmarks/bench_annc.py [--quick] [--arch resnet50]

Writes ``benchmarks/results/bench_annc.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, markdown_table, timeit, write_report  # noqa: E402

from opq_core.annc import annc_budget, project, prune_to_budget, quantize_projection  # noqa: E402
from opq_core.synthetic import laplace_weights  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, one budget")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    args = ap.parse_args(argv)
    repeat = 1 if args.quick else 3
    rates = (50.0,) if args.quick else (20.0, 50.0, 200.0)

    w = laplace_weights(args.arch)
    names = list(w)
    N = sum(v.size for v in w.values())
    rng = np.random.default_rng(0)
    mixed = {n: int(b) for n, b in zip(names, rng.integers(2, 9, size=len(names)))}

    # compile time, apart
    small = {"a": np.random.default_rng(1).laplace(size=(64, 300)).astype(np.float32),
             "b": np.random.default_rng(2).laplace(size=(300, 300)).astype(np.float32)}
    t0 = time.perf_counter()
    pr = prune_to_budget(small, 4, 100_000)
    quantize_projection(small, pr.masks, 100_000)
    project(small, 100_000)
    compile_s = time.perf_counter() - t0

    flat = np.concatenate([v.ravel() for v in w.values()])
    t_sort = timeit(lambda: np.sort(flat), repeat=repeat, warmup=1)

    def paired(fn):
        """Median times of np.sort and of fn, alternated (a shared machine's load varies)."""
        ts, tf = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            np.sort(flat)
            ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fn()
            tf.append(time.perf_counter() - t0)
        return float(np.median(ts)), float(np.median(tf))

    rows = []
    res = {"arch": args.arch, "n": int(N), "layers": len(names), "sort_seconds": t_sort,
           "compile_seconds": compile_s, "quick": bool(args.quick), "runs": []}
    for rate in rates:
        S = annc_budget(w, rate=rate)
        pr = prune_to_budget(w, mixed, S)  # warm-up
        ts_p, t_p = paired(lambda: prune_to_budget(w, mixed, S))
        out = {}
        ts_q, t_q = paired(lambda: out.update(q=quantize_projection(w, pr.masks, S)))
        q = out["q"]
        t0 = time.perf_counter()
        jp = project(w, S)
        t_j = time.perf_counter() - t0
        run = {"rate": rate, "budget_bits": S, "sort_seconds_paired": ts_p,
               "prune_seconds": t_p, "prune_ratio": t_p / ts_p,
               "prune_passes": pr.passes, "prune_size_bits": pr.size_bits,
               "prune_sparsity": pr.sparsity, "quant_seconds": t_q, "quant_ratio": t_q / ts_q,
               "quant_size_bits": q.size_bits, "quant_method": q.choice.method,
               "joint_seconds": t_j, "joint_ratio": t_j / t_sort,
               "joint_size_bits": jp.size_bits,
               "joint_bits_hist": np.bincount(list(jp.bits.values()), minlength=9)[1:].tolist()}
        res["runs"].append(run)
        rows.append({"rate": f"{rate:g}x", "budget (bits)": S, "passes": pr.passes,
                     "prune / sort": run["prune_ratio"], "quant(8 b) / sort": run["quant_ratio"],
                     "joint / sort": run["joint_ratio"], "sparsity": pr.sparsity,
                     "fits": jp.size_bits <= S and q.size_bits <= S and pr.size_bits <= S})
    res["targets"] = {"prune_ratio_max": 0.5, "quant_ratio_max": 10.0,
                      "prune_ok": all(r["prune_ratio"] <= 0.5 for r in res["runs"]),
                      "quant_ok": all(r["quant_ratio"] <= 10.0 for r in res["runs"])}
    res["machine"] = machine()
    cols = ["rate", "budget (bits)", "passes", "prune / sort", "quant(8 b) / sort",
            "joint / sort", "sparsity", "fits"]
    table = markdown_table(rows, cols)
    md = (f"### ANNC projections, {args.arch} ({N} weights, {len(names)} layers)\n\n"
          f"Baseline: np.sort of all weights = {t_sort:.3f} s (same run, also timed "
          f"alternately with each projection for the ratios); JIT compile "
          f"{compile_s:.1f} s apart. Targets: prune <= 0.5x, quantization (8 bit-widths) "
          f"<= 10x.\n\n{table}\n")
    write_report(args.out, "bench_annc", res, md)
    return res


if __name__ == "__main__":
    main()
