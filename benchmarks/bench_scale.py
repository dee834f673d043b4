"""Scale: the command line on a GPT-2-medium-shaped bfloat16 checkpoint (random weights).

Generates ``model.safetensors`` (bfloat16, GPT-2-medium shapes: 24 blocks of width 1024,
vocabulary 50257, about 355 M weights, 0.71 GB; ``--quick``: a small model for a smoke
run) tensor by tensor, then runs every step in its own process and records its wall time
and peak resident memory (``getrusage`` of that process):

- ``read``: the baseline, every tensor read once (what any tool pays to look at the file);
- ``plan`` (sparsity mode), ``compress``, ``inspect --verify``, ``decompress`` (bfloat16
  shards), ``plan --rate 16`` (the size-budget mode, widths 2..6 chosen per layer).

Every figure is also given as a ratio: wall time over the ``read`` baseline's, peak
memory over the checkpoint's size, and the budget mode's time and peak memory over the
sparsity mode's (same run). ``--width``/``--layers`` change the shapes (``--width 1280``:
about 538 M weights). Writes ``benchmarks/results/bench_scale[.quick].json`` and ``.md``
(the load average of the machine before and after is recorded).

    python benchmarks/bench_scale.py [--quick] [--width W] [--layers L] [--no-budget] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import emit  # noqa: E402

FULL = dict(layers=24, width=1024, vocab=50257, positions=1024)
QUICK = dict(layers=2, width=256, vocab=4096, positions=256)


def shapes(layers, width, vocab, positions):
    """GPT-2 state_dict shapes (Hugging Face Conv1D weights are stored (in, out))."""
    out = [("transformer.wte.weight", (vocab, width)),
           ("transformer.wpe.weight", (positions, width))]
    for i in range(layers):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (width,)), (p + "ln_1.bias", (width,)),
                (p + "attn.c_attn.weight", (width, 3 * width)), (p + "attn.c_attn.bias", (3 * width,)),
                (p + "attn.c_proj.weight", (width, width)), (p + "attn.c_proj.bias", (width,)),
                (p + "ln_2.weight", (width,)), (p + "ln_2.bias", (width,)),
                (p + "mlp.c_fc.weight", (width, 4 * width)), (p + "mlp.c_fc.bias", (4 * width,)),
                (p + "mlp.c_proj.weight", (4 * width, width)), (p + "mlp.c_proj.bias", (width,))]
    out += [("transformer.ln_f.weight", (width,)), ("transformer.ln_f.bias", (width,))]
    return out


def generate(path, spec):
    from opq_core.io import write_safetensors_stream
    sh = dict(shapes(**spec))
    rng = np.random.default_rng(0)

    def produce(name):
        shape = sh[name]
        scale = 0.02 if len(shape) == 2 else 0.1
        return (rng.laplace(scale=scale, size=shape)).astype(np.float32)

    write_safetensors_stream(path, [(n, s, "bfloat16") for n, s in sh.items()], produce)
    return sum(int(np.prod(s)) for s in sh.values())


def _child(argv):
    """Run one step in this process; print its wall time and peak RSS as JSON."""
    t = time.perf_counter()
    if argv[0] == "read":
        from opq_core.io import open_weights
        total = 0
        with open_weights(argv[1]) as w:
            for k in w:
                total += int(np.asarray(w[k]).size)
        rc = 0
    else:
        from opq_cli.main import main
        with open(os.devnull, "w") as devnull:
            old = sys.stdout
            sys.stdout = devnull
            try:
                rc = main(argv)
            finally:
                sys.stdout = old
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss": rss}))


def step(argv):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv],
                       capture_output=True, text=True, env=env)
    total = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"step {argv} failed ({r.returncode}): {r.stderr[-2000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if d["rc"] not in (0,):
        raise RuntimeError(f"step {argv}: exit status {d['rc']}: {r.stderr[-2000:]}")
    d["process_s"] = total
    return d


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model (smoke run)")
    ap.add_argument("--no-budget", action="store_true",
                    help="leave out the size-budget mode (plan --rate 16)")
    ap.add_argument("--width", type=int, help="model width (default: 1024, --quick 256)")
    ap.add_argument("--layers", type=int, help="blocks (default: 24, --quick 2)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files")
    ap.add_argument("--json", metavar="FILE", help="write the JSON here (default: results/)")
    args = ap.parse_args()
    spec = dict(QUICK if args.quick else FULL)
    for key in ("width", "layers"):
        v = getattr(args, key)
        if v is not None:
            if v < 1:
                raise SystemExit(f"bench_scale: --{key} must be >= 1, got {v}")
            spec[key] = v
    load_before = os.getloadavg()
    work = args.keep or tempfile.mkdtemp(prefix="opq-scale-")
    os.makedirs(work, exist_ok=True)
    try:
        ckpt = os.path.join(work, "model.safetensors")
        t = time.perf_counter()
        n = generate(ckpt, spec)
        gen_s = time.perf_counter() - t
        size = os.path.getsize(ckpt)
        opq = os.path.join(work, "model.opq")
        out = os.path.join(work, "dense")
        os.makedirs(out, exist_ok=True)
        steps = [("read (baseline)", ["read", ckpt]),
                 ("plan --sparsity 0.9", ["plan", ckpt, "--sparsity", "0.9", "-q"]),
                 ("compress --sparsity 0.9", ["compress", ckpt, "-o", opq, "--sparsity", "0.9",
                                              "-q"]),
                 ("inspect --verify", ["inspect", opq, "--verify", "-q"]),
                 ("decompress (bf16 shards)", ["decompress", opq, "-o",
                                               os.path.join(out, "model.safetensors"),
                                               "--max-shard-size", "200MB", "-q"])]
        if not args.no_budget:
            steps.append(("plan --rate 16 (budget)",
                          ["plan", ckpt, "--rate", "16", "--bits", "2,3,4,5,6", "-q"]))
        rows = []
        base = None
        for label, argv in steps:
            d = step(argv)
            if base is None:
                base = d["wall_s"]
            rows.append({"step": label, "wall_s": d["wall_s"],
                         "x_read": d["wall_s"] / base if base else float("nan"),
                         "peak_rss_MB": d["peak_rss"] / 2 ** 20,
                         "rss_x_file": d["peak_rss"] / size})
            print(f"{label}: {d['wall_s']:.1f} s, peak {d['peak_rss'] / 2 ** 20:.0f} MiB",
                  file=sys.stderr)
        opq_size = os.path.getsize(opq)
        by = {r["step"]: r for r in rows}
        sp, bu = by["plan --sparsity 0.9"], by.get("plan --rate 16 (budget)")
        vs = None if bu is None else {"time": bu["wall_s"] / sp["wall_s"],
                                      "peak_rss": bu["peak_rss_MB"] / sp["peak_rss_MB"]}
        load = {"before": list(load_before), "after": list(os.getloadavg())}
        dense = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                    if f.endswith(".safetensors"))
        result = {"benchmark": "bench_scale", "quick": args.quick, "weights": n,
                  "checkpoint_bytes": size, "dtype": "bfloat16", "generate_s": gen_s,
                  "opq_bytes": opq_size, "decompressed_bytes": dense,
                  "decompressed_over_input": dense / size, "shape": spec, "rows": rows,
                  "cpus": os.cpu_count(), "budget_over_sparsity": vs, "loadavg": load}
        stem = "bench_scale.quick" if args.quick else "bench_scale"
        res_dir = os.path.join(HERE, "results")
        json_path = args.json or os.path.join(res_dir, stem + ".json")
        cols = ["step", "wall_s", "x_read", "peak_rss_MB", "rss_x_file"]
        emit(f"bench_scale ({n / 1e6:.0f} M bfloat16 weights, {size / 1e9:.2f} GB)", result,
             rows, cols, json_path=json_path)
        if not args.json:
            from _common import markdown_table
            with open(os.path.join(res_dir, stem + ".md"), "w") as f:
                f.write(f"### bench_scale: {n / 1e6:.1f} M bfloat16 weights "
                        f"({size / 1e6:.0f} MB), GPT-2 shapes {spec}\n\n")
                f.write(markdown_table(rows, cols) + "\n\n")
                f.write(f"x_read: wall time over reading every tensor once (same run); "
                        f"rss_x_file: peak resident memory over the checkpoint's size. "
                        f".opq: {opq_size / 1e6:.1f} MB; decompressed (bfloat16 shards): "
                        f"{dense / 1e6:.0f} MB = {dense / size:.3f}x the input.\n")
                if vs is not None:
                    f.write(f"\nSize-budget mode over sparsity mode (same run): "
                            f"{vs['time']:.2f}x the time, {vs['peak_rss']:.2f}x the peak "
                            "memory.\n")
                f.write(f"\nLoad average (1, 5, 15 min) on {os.cpu_count()} CPUs: "
                        f"{', '.join(f'{x:.1f}' for x in load['before'])} before, "
                        f"{', '.join(f'{x:.1f}' for x in load['after'])} after.\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
