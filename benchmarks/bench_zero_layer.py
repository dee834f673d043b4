"""Planner memory and time on an all-zero layer, as ratios to the same layer of random
weights.

Zero-initialised layers are common; the planner's memory must not depend on the
weights' values. Each run is a fresh process (peak RSS is per process) planning
``{"zero_or_random": (rows, cols), "fc": (256, 256) random}`` at sparsity 0.5, 4 bits;
the baseline is the random-weights layer of the same shape, timed in the same run
(alternating, medians of the repeats). JIT compile time is excluded (a warm-up plan on a
small model in the same process, before the measurement). Usage::

    python benchmarks/bench_zero_layer.py [--quick] [--mib 400]

Writes ``benchmarks/results/bench_zero_layer.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, markdown_table, write_report  # noqa: E402


_CHILD = r"""
import json, resource, sys, time
import numpy as np
import opq_core
kind, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
opq_core.plan({"a": rng.laplace(size=(64, 64)).astype(np.float32)}, sparsity=0.5, bits=4)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
big = np.empty((rows, cols), np.float32)  # every page touched: resident like real weights
for r0 in range(0, rows, 1024):
    big[r0:r0 + 1024] = 0.0 if kind == "zero" else rng.laplace(size=big[r0:r0 + 1024].shape)
w = {"big": big, "fc": rng.laplace(size=(256, 256)).astype(np.float32)}
after_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    p = opq_core.plan(w, sparsity=0.5, bits=4)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_mib": peak / 1024, "data_mib": big.nbytes / 2**20,
                  "planning_mib": (peak - after_data) / 1024, "kept": p.kept}))
"""


def _run(kind, rows, cols):
    r = subprocess.run([sys.executable, "-c", _CHILD, kind, str(rows), str(cols)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--mib", type=int, default=400, help="size of the layer (float32 MiB)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    args = ap.parse_args(argv)
    cols = 4096
    rows = args.mib * 2**20 // 4 // cols
    repeat = 1 if args.quick else 3
    runs = {"random": [], "zero": []}
    for _ in range(repeat):
        for kind in ("random", "zero"):
            runs[kind].append(_run(kind, rows, cols))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    rows_out = []
    for kind in ("random", "zero"):
        m = med[kind]
        rows_out.append({"layer": f"{kind} {rows}x{cols}", "seconds": m["seconds"],
                         "peak_MiB": m["peak_mib"], "planning_MiB": m["planning_mib"],
                         "seconds_vs_random": m["seconds"] / med["random"]["seconds"],
                         "peak_vs_random": m["peak_mib"] / med["random"]["peak_mib"]})
    result = {"machine": machine(), "layer_mib": args.mib, "shape": [rows, cols],
              "repeat": repeat, "runs": runs, "rows": rows_out}
    cols_md = ["layer", "seconds", "peak_MiB", "planning_MiB", "seconds_vs_random",
               "peak_vs_random"]
    md = ("# Planner on an all-zero layer vs random weights\n\n"
          f"Layer of {args.mib} MiB float32 ({rows}x{cols}) + a 256x256 random layer, "
          f"sparsity 0.5, 4 bits; fresh process per run, medians of {repeat}; peak = "
          "process max RSS (includes the weights themselves and imports); planning = peak "
          "minus the RSS after the weights were made.\n\n"
          + markdown_table(rows_out, cols_md) + "\n")
    write_report(args.out, "bench_zero_layer", result, md)


if __name__ == "__main__":
    main()
