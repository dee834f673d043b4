"""The .opq file: bytes against the information-theoretic limit, rates, speed, memory.

For ResNet-50-shaped weights (Laplace draws, opq_core.synthetic) at sparsity 0.5 / 0.8 /
0.9 / 0.95 and 2 / 4 / 8 bits:

- file bits of the compressed layers against the limit of the same plan,
  ``sum_i n_i H(p_i) + nnz_i H(symbol histogram_i) + 16 bits per channel scale``
  (the side information a decoder cannot do without); ``entropy`` target: within 3 %;
- storage_rate and paper_rate of both layouts;
- encode (write_opq from codes) and decode (read_opq) throughput as a ratio to writing /
  reading the raw float32 tensors with safetensors in the same run;
- peak RSS of ``opq plan`` (a child process) on a generated safetensors checkpoint of
  4 GB (``--quick``: 256 MB), written tensor by tensor and deleted afterwards.

    python benchmarks/bench_format.py [--quick] [--no-rss]

Writes benchmarks/results/bench_format.json and .md (``--quick``: bench_format.quick.*).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, markdown_table  # noqa: E402

import opq_core  # noqa: E402
from opq_core.synthetic import laplace_weights  # noqa: E402
from opq_core._codec import _symbols  # noqa: E402
from opq_core.format import compress_weights, read_opq, write_opq  # noqa: E402
from opq_core.io import atomic_write  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _h2(p):
    return 0.0 if p <= 0 or p >= 1 else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def _hist_entropy(sym, nsym):
    c = np.bincount(sym, minlength=nsym).astype(np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    q = c / c.sum()
    return float(-(q * np.log2(q)).sum())


def limit_bits(plan, codes):
    """(total limit bits, of which side information bits)."""
    total = side = 0.0
    for lp in plan.layers:
        c = codes[lp.name]
        m = c != 0
        sym = _symbols(lp, c, m)
        total += lp.n * _h2(lp.kept / lp.n) + lp.kept * _hist_entropy(sym, 1 << lp.bits)
        side += 16.0 * lp.channels
    return total + side, side


def _timed(fn, repeat):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, out


def format_rows(arch, sparsities, bitss, repeat, folder):
    from safetensors.numpy import load_file, save_file
    w = laplace_weights(arch)
    n = sum(v.size for v in w.values())
    raw = os.path.join(folder, "raw.safetensors")
    t_raw_w, _ = _timed(lambda: save_file(w, raw), repeat)
    t_raw_r, _ = _timed(lambda: load_file(raw), repeat)
    os.unlink(raw)
    # compile the kernels (every code dtype, bitmask and gap) outside the timings
    x = {"x": w[max(w, key=lambda k: w[k].size)]}
    for bits in bitss:
        for sp in (0.5, 0.97):
            p0 = opq_core.plan(x, sparsity=sp, bits=bits)
            for layout in ("entropy", "packed"):
                write_opq(os.path.join(folder, "warm.opq"), p0, x, layout=layout)
                read_opq(os.path.join(folder, "warm.opq"))
    rows = []
    for sp in sparsities:
        for bits in bitss:
            p = opq_core.plan(w, sparsity=sp, bits=bits)
            codes = compress_weights(w, p)
            lim, side = limit_bits(p, codes)
            row = {"sparsity": sp, "bits": bits, "paper_rate": p.paper_rate,
                   "limit KiB": lim / 8 / 1024, "side KiB": side / 8 / 1024}
            for layout in ("entropy", "packed"):
                path = os.path.join(folder, f"{layout}.opq")
                tw, f = _timed(lambda: write_opq(path, p, codes=codes, layout=layout), repeat)
                tr, _ = _timed(lambda: read_opq(path), repeat)
                short = "ent" if layout == "entropy" else "pk"
                row[f"{short} KiB"] = f.compressed_bytes / 1024
                row[f"{short} / limit"] = 8 * f.compressed_bytes / lim
                row[f"{short} storage_rate"] = f.storage_rate
                row[f"{short} write / raw write"] = tw / t_raw_w
                row[f"{short} read / raw read"] = tr / t_raw_r
                os.unlink(path)
            rows.append(row)
    return {"arch": arch, "weights": int(n), "raw_write_s": t_raw_w, "raw_read_s": t_raw_r,
            "rows": rows}


def _write_big_safetensors(path, total_bytes, tensor_shape=(4096, 4096)):
    """A float32 safetensors file of about ``total_bytes``, written one tensor at a time."""
    per = int(np.prod(tensor_shape)) * 4
    count = max(1, total_bytes // per)
    header = {}
    for i in range(count):
        header[f"layer{i}.weight"] = {"dtype": "F32", "shape": list(tensor_shape),
                                      "data_offsets": [i * per, (i + 1) * per]}
    hj = json.dumps(header).encode()
    hj += b" " * (-len(hj) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for i in range(count):
            a = rng.laplace(size=tensor_shape).astype(np.float32)
            a *= np.float32(10.0 ** rng.uniform(-2, 0))
            f.write(a.tobytes())
            del a
    return count * per


def peak_rss_plan(total_bytes, folder):
    path = os.path.join(folder, "big.safetensors")
    try:
        size = _write_big_safetensors(path, total_bytes)
        largest = 4096 * 4096 * 4
        # VmHWM (peak RSS of this process image; ru_maxrss would include the parent's
        # memory inherited at fork)
        hwm = ("int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
               ".split()[1])")
        code = ("import sys, io, contextlib\n"
                "from opq_cli import main\n"
                "with contextlib.redirect_stdout(io.StringIO()):\n"
                f"    rc = main(['plan', {path!r}, '--sparsity', '0.9', '--bits', '4'])\n"
                f"print(rc, {hwm})")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        dt = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        rc, kib = r.stdout.split()
        base = subprocess.run([sys.executable, "-c",
                               "import opq_cli, opq_core.allocate, opq_core.select\n"
                               f"print({hwm})"], capture_output=True, text=True)
        return {"file_bytes": size, "largest_tensor_bytes": largest,
                "peak_rss_bytes": int(kib) * 1024, "import_rss_bytes": int(base.stdout) * 1024,
                "peak_rss / file": int(kib) * 1024 / size,
                "peak_rss / largest tensor": int(kib) * 1024 / largest,
                "plan_seconds": dt, "exit": int(rc)}
    finally:
        if os.path.exists(path):
            os.unlink(path)


def cli_throughput(folder, copies=2, repeat=3):
    """``opq decompress`` (to .safetensors) and ``opq inspect --verify`` on a synthetic
    model of ``copies`` x ResNet-50's weights (sparsity 0.5, 4 bits, entropy layout): float32
    bytes of output per second, against writing the same dense tensors from memory with
    the same safetensors writer (raw write) in the same run; and the decode alone, one
    tensor after the other and on ``OpqStream.decoded``'s threads."""
    from opq_cli.main import main as cli
    from opq_core import plan as make_plan
    from opq_core.format import OpqStream
    from opq_core._shards import write_safetensors_stream
    w = {}
    for k in range(copies):
        w.update({f"{name}.{k}": v for name, v in laplace_weights("resnet50", seed=k).items()})
    nbytes = sum(v.nbytes for v in w.values())
    p = make_plan(w, sparsity=0.5, bits=4)
    src = os.path.join(folder, "cli.opq")
    write_opq(src, p, w)
    dense = read_opq(src).weights
    del w
    out = os.path.join(folder, "cli_out.safetensors")
    specs = [(n, a.shape, "float32") for n, a in dense.items()]

    def raw():
        write_safetensors_stream(out, specs, dense.__getitem__)

    def decode():
        with OpqStream(src) as st:
            for n in st.names:
                st.tensor(n)

    def decode_threads():
        with OpqStream(src) as st:
            for _ in st.decoded():
                pass

    runs = {"raw write (baseline)": raw, "decode only": decode,
            "decode only, threads": decode_threads,
            "opq decompress": lambda: cli(["decompress", src, "-o", out, "-q"]),
            "opq inspect --verify": lambda: cli(["inspect", "--verify", "--json", src])}
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        for fn in runs.values():  # compile the kernels, warm the page cache
            fn()
        got = {k: min(_wall_and_cpu(fn) for _ in range(repeat)) for k, fn in runs.items()}
    t = {k: v[0] for k, v in got.items()}
    rows = [{"step": k, "s": v, "GB/s": nbytes / v / 1e9,
             "per raw write": v / t["raw write (baseline)"], "cpu s": got[k][1],
             "GB per cpu s": nbytes / got[k][1] / 1e9} for k, v in t.items()]
    return {"float32_bytes": nbytes, "file_bytes": os.path.getsize(src), "repeat": repeat,
            "cpus": os.cpu_count(),
            "statistic": "best of repeat", "rows": rows}


def _wall_and_cpu(fn):
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main_cli(args):
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=HERE) as folder:
        res = cli_throughput(folder, copies=1 if args.quick else 2)
    res.update(loadavg_before=load0, loadavg_after=os.getloadavg(), machine=machine())
    name = "bench_format.cli" + (".quick" if args.quick else "")
    md = [f"### {name}: opq decompress / inspect --verify throughput", "",
          f"Synthetic ResNet-50-shaped weights, {res['float32_bytes'] / 1e6:.0f} MB of float32 "
          f"({res['file_bytes'] / 1e6:.1f} MB .opq, sparsity 0.5, 4 bits, entropy layout); "
          f"best of {res['repeat']}, in-process, {res['cpus']} CPUs, output to the page cache; "
          "load average "
          f"{res['loadavg_before'][0]:.1f} before, {res['loadavg_after'][0]:.1f} after (the "
          "machine was shared). GB/s = float32 bytes / wall second; `cpu s` = this process's "
          "CPU time in the same (best wall) run, which other processes inflate less.", "",
          markdown_table(res["rows"], ["step", "s", "GB/s", "per raw write", "cpu s",
                                       "GB per cpu s"])]
    text = json.dumps(res, indent=1, default=float)
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, name + ".json"), lambda f: f.write(text + "\n"), mode="w")
    atomic_write(os.path.join(args.out, name + ".md"), lambda f: f.write("\n".join(md) + "\n"),
                 mode="w")
    print(text)
    print("\n".join(md))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="MobileNet-V1, sparsity 0.9 x bits 4, a 256 MB file for the RSS")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS measurement")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    ap.add_argument("--cli", action="store_true",
                    help="only the opq decompress / inspect --verify throughput "
                         "(bench_format.cli.json / .md)")
    args = ap.parse_args(argv)
    if args.cli:
        return main_cli(args)
    if args.quick:
        arch, sps, bitss, repeat, big = "mobilenet_v1", [0.9], [4], 1, 256 << 20
    else:
        arch, sps, bitss, repeat, big = "resnet50", [0.5, 0.8, 0.9, 0.95], [2, 4, 8], 2, 4 << 30
    with tempfile.TemporaryDirectory(dir=HERE) as folder:
        res = format_rows(arch, sps, bitss, repeat, folder)
        if not args.no_rss:
            res["plan_memory"] = peak_rss_plan(big, folder)
    res["machine"] = machine()
    name = "bench_format.quick" if args.quick else "bench_format"
    out = args.out
    os.makedirs(out, exist_ok=True)
    text = json.dumps(res, indent=1, default=float)
    cols = ["sparsity", "bits", "paper_rate", "limit KiB", "side KiB", "ent KiB", "ent / limit",
            "pk / limit", "ent storage_rate", "pk storage_rate", "ent write / raw write",
            "ent read / raw read", "pk write / raw write", "pk read / raw read"]
    md = [f"### {name}: {arch} ({res['weights']} weights)", "",
          markdown_table(res["rows"], cols), "",
          f"Raw float32 safetensors: write {res['raw_write_s'] * 1e3:.0f} ms, read "
          f"{res['raw_read_s'] * 1e3:.0f} ms (the baseline of the throughput ratios)."]
    if "plan_memory" in res:
        m = res["plan_memory"]
        md += ["", f"`opq plan` on a {m['file_bytes'] / 2**30:.2f} GiB safetensors file: peak RSS "
               f"{m['peak_rss_bytes'] / 2**20:.0f} MiB ({m['peak_rss / file']:.3f} of the file, "
               f"{m['peak_rss / largest tensor']:.2f}x the largest tensor; imports alone "
               f"{m['import_rss_bytes'] / 2**20:.0f} MiB), {m['plan_seconds']:.0f} s."]
    mdtext = "\n".join(md) + "\n"
    with open(os.path.join(out, name + ".json"), "w") as f:
        f.write(text)
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write(mdtext)
    print(text)
    print()
    print(mdtext)


if __name__ == "__main__":
    main()
