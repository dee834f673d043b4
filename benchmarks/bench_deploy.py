"""Running compressed models: the packed sparse low-bit kernel and the ONNX export.

Packed layers (opq_core._packed, the kernel behind opq_torch.pack):

- a 4096 x 4096 linear layer (Laplace weights), 4 bits, sparsity 0.5 / 0.8 / 0.9:
  batch-1 and batch-16 latency of ``packed_matmul`` (serial and parallel over row blocks)
  and of ``PackedLinear`` against dense float32 ``torch.nn.functional.linear`` timed in
  the same run (speedup = dense time / packed time; > 1 is faster);
- bytes the packed layer holds against the layer's bytes in a packed ``.opq`` file written
  in the same run (target <= 1.2) and against dense float32.

ONNX export (opq_torch.export_onnx) of a transformer-like MLP stack (Linear + LayerNorm,
d=512, 4 blocks) at sparsity 0.8, 4 bits, offset grid:

- file bytes against the dense ONNX (the template) and the .opq file (packed and entropy);
- onnxruntime (CPU) session creation and inference latency (batch 1 and 16, sequence 8)
  as ratios to the dense ONNX model, same run; max |output - compressed torch model|.

Loading (an MLP stack, d=1024, hidden 4096, 4 blocks, sparsity 0.8, 4 bits) into a fresh
model, each way in a process of its own: ``opq_torch.load`` (dense latent weights),
``load`` then ``pack(inplace=True)``, and ``opq_torch.load_packed`` (packed straight from
the file's codes): peak and final resident memory above the built model, and time.

    python benchmarks/bench_deploy.py [--quick]

Writes benchmarks/results/bench_deploy.json and .md (``--quick``: bench_deploy.quick.*).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, markdown_table, timeit  # noqa: E402

import torch  # noqa: E402

import opq_core  # noqa: E402
import opq_torch  # noqa: E402
from opq_core._packed import pack_layer, packed_matmul  # noqa: E402
from opq_core.format import layer_codes, read_opq, write_opq  # noqa: E402
from opq_torch.packing import PackedLinear  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_packed(n, sparsities, bits, repeat, tmp):
    rng = np.random.default_rng(0)
    w = (rng.laplace(size=(n, n)) * 0.02).astype(np.float32)
    wt = torch.from_numpy(w)
    rows = []
    for sp in sparsities:
        p = opq_core.plan({"fc": w}, sparsity=sp, bits=bits)
        lp = p.layers[0]
        m = p.masks({"fc": w})["fc"]
        cd = layer_codes(lp, w, m)
        pl = pack_layer(lp, cd, m)
        path = os.path.join(tmp, f"fc{sp}.opq")
        write_opq(path, p, codes={"fc": cd}, masks={"fc": m}, layout="packed")
        rec = read_opq(path, decode=False).layers[0]
        mod = PackedLinear(pl, None)
        wq = torch.from_numpy(pl.decode())
        for batch in (1, 16):
            x = rng.standard_normal((batch, n)).astype(np.float32)
            xt = torch.from_numpy(x)
            with torch.no_grad():
                dense = timeit(lambda: torch.nn.functional.linear(xt, wt), repeat=repeat,
                               warmup=2)
                ser = timeit(lambda: packed_matmul(pl, x, parallel=False), repeat=repeat,
                             warmup=2)
                par = timeit(lambda: packed_matmul(pl, x, parallel=True), repeat=repeat,
                             warmup=2)
                mod.small_batch = batch
                modt = timeit(lambda: mod(xt), repeat=repeat, warmup=2)
                dense2 = timeit(lambda: torch.nn.functional.linear(xt, wt), repeat=repeat,
                                warmup=1)
                err = float((mod(xt) - torch.nn.functional.linear(xt, wq)).abs().max())
            d = min(dense, dense2)
            rows.append({"sparsity": sp, "batch": batch, "index": pl.index,
                         "dense_ms": d * 1e3, "speedup_serial": d / ser,
                         "speedup_parallel": d / par, "speedup_PackedLinear": d / modt,
                         "held_vs_packed_file": pl.nbytes / rec.nbytes,
                         "held_vs_dense": pl.nbytes / w.nbytes, "max_abs_err": err})
        del wq, mod
        gc.collect()
    return rows


class MLPStack(torch.nn.Module):
    def __init__(self, d=512, hidden=2048, blocks=4):
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(torch.nn.ModuleDict({
                "ln": torch.nn.LayerNorm(d), "up": torch.nn.Linear(d, hidden),
                "down": torch.nn.Linear(hidden, d)}))
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](b["ln"](x))))
        return self.head(x.mean(dim=1))


def bench_onnx(d, hidden, blocks, repeat, tmp):
    import onnxruntime as ort
    from opq_torch.export import onnx_template
    torch.manual_seed(0)
    net = MLPStack(d, hidden, blocks).eval()
    ex = torch.randn(1, 8, d)
    dense_path = os.path.join(tmp, "dense.onnx")
    kw = dict(input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    with open(dense_path, "wb") as f:
        f.write(onnx_template(net, ex, **kw))
    opq_torch.compress(net, sparsity=0.8, bits=4)
    out_path = os.path.join(tmp, "opq.onnx")
    rep = opq_torch.export_onnx(net, ex, out_path, **kw)
    f_packed = opq_torch.save(net, os.path.join(tmp, "m.packed.opq"), layout="packed")
    f_entropy = opq_torch.save(net, os.path.join(tmp, "m.entropy.opq"))
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def session(path):
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    load_dense = timeit(lambda: session(dense_path), repeat=3, warmup=1)
    load_opq = timeit(lambda: session(out_path), repeat=3, warmup=1)
    sd, so_ = session(dense_path), session(out_path)
    rows = []
    for batch in (1, 16):
        x = torch.randn(batch, 8, d)
        feed = {"x": x.numpy()}
        t_dense = timeit(lambda: sd.run(None, feed), repeat=repeat, warmup=3)
        t_opq = timeit(lambda: so_.run(None, feed), repeat=repeat, warmup=3)
        with torch.no_grad():
            want = net(x).numpy()
        err = float(np.abs(so_.run(None, feed)[0] - want).max())
        rows.append({"batch": batch, "dense_onnx_ms": t_dense * 1e3,
                     "latency_vs_dense_onnx": t_opq / t_dense, "max_abs_err": err})
    sizes = {"onnx_bytes": os.path.getsize(out_path),
             "dense_onnx_bytes": os.path.getsize(dense_path),
             "opq_packed_bytes": f_packed.file_bytes, "opq_entropy_bytes": f_entropy.file_bytes,
             "onnx_vs_dense_onnx": os.path.getsize(out_path) / os.path.getsize(dense_path),
             "onnx_vs_opq_packed": os.path.getsize(out_path) / f_packed.file_bytes,
             "onnx_vs_opq_entropy": os.path.getsize(out_path) / f_entropy.file_bytes,
             "session_load_vs_dense": load_opq / load_dense,
             "encodings": sorted({e.encoding for e in rep.layers})}
    return rows, sizes


_LOAD_CHILD = r"""
import gc, json, sys, time
import torch, opq_torch
sys.path.insert(0, sys.argv[4])
from bench_deploy import MLPStack

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def run(mode, path, net):
    if mode == "load_packed":
        opq_torch.load_packed(path, net)
    else:
        opq_torch.load(path, net)
        if mode == "load+pack":
            opq_torch.pack(net, inplace=True)

mode, path, dims = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run(mode, path, MLPStack(*dims).eval())  # every kernel compiled (the parallel ones too)
gc.collect()
torch.manual_seed(1)
net = MLPStack(*dims).eval()
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size restarts from here
base = rss()
t = time.perf_counter()
run(mode, path, net)
sec = time.perf_counter() - t
gc.collect()
print(json.dumps({"mode": mode, "seconds": sec, "peak_above_model": peak() - base,
                  "held_above_model": rss() - base}))
"""


def bench_load(d, hidden, blocks, tmp):
    """Loading a compressed file into a fresh model, each way in its own process: peak and
    final resident memory above the freshly built (dense) model, and the time."""
    import subprocess
    torch.manual_seed(0)
    net = MLPStack(d, hidden, blocks).eval()
    dense_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    opq_torch.compress(net, sparsity=0.8, bits=4)
    path = os.path.join(tmp, "load.opq")
    f = opq_torch.save(net, path)
    packed_bytes = opq_torch.save(net, os.path.join(tmp, "load.packed.opq"),
                                  layout="packed").file_bytes
    del net
    gc.collect()
    rows = []
    for mode in ("load", "load+pack", "load_packed"):
        out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, mode, path,
                              json.dumps([d, hidden, blocks]), HERE],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"mode": mode, "seconds": r["seconds"],
                     "peak_MB_above_model": r["peak_above_model"] / 2**20,
                     "peak_vs_dense_weights": r["peak_above_model"] / dense_bytes,
                     "held_MB_above_model": r["held_above_model"] / 2**20})
    base = rows[1]["seconds"]
    for r in rows:
        r["time_vs_load+pack"] = r["seconds"] / base
    return rows, {"dense_weight_bytes": dense_bytes, "opq_entropy_bytes": f.file_bytes,
                  "opq_packed_bytes": packed_bytes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024 x 1024, fewer repeats")
    args = ap.parse_args(argv)
    n = 1024 if args.quick else 4096
    repeat = 5 if args.quick else 15
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        packed = bench_packed(n, (0.5, 0.8, 0.9), 4, repeat, tmp)
        load_rows, load_sizes = bench_load(512 if args.quick else 1024,
                                           1024 if args.quick else 4096, 4, tmp)
        onnx_rows, sizes = bench_onnx(256 if args.quick else 512, 1024 if args.quick else 2048,
                                      2 if args.quick else 4, repeat, tmp)
    result = {"packed_layer": {"shape": [n, n], "bits": 4, "rows": packed},
              "onnx": {"rows": onnx_rows, **sizes},
              "load": {"rows": load_rows, **load_sizes}, "torch_threads": torch.get_num_threads(),
              "seconds": time.time() - t0, "machine": machine()}
    name = "bench_deploy" + (".quick" if args.quick else "")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    jpath = os.path.join(HERE, "results", name + ".json")
    with open(jpath + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=float)
    os.replace(jpath + ".tmp", jpath)
    cols = ["sparsity", "batch", "index", "dense_ms", "speedup_serial", "speedup_parallel",
            "speedup_PackedLinear", "held_vs_packed_file", "held_vs_dense", "max_abs_err"]
    md = [f"### Packed {n} x {n} linear layer, 4 bits (speedup = dense float32 "
          "F.linear time / packed time, same run)", "", markdown_table(packed, cols), "",
          f"### ONNX export: MLP stack (Linear + LayerNorm), sparsity 0.8, 4 bits", "",
          markdown_table([sizes], ["onnx_vs_dense_onnx", "onnx_vs_opq_packed",
                                   "onnx_vs_opq_entropy", "session_load_vs_dense",
                                   "onnx_bytes", "dense_onnx_bytes", "opq_packed_bytes",
                                   "opq_entropy_bytes"]), "",
          markdown_table(onnx_rows, ["batch", "dense_onnx_ms", "latency_vs_dense_onnx",
                                     "max_abs_err"]), "",
          f"### Loading a .opq file (MLP stack, {load_sizes['dense_weight_bytes'] / 2**20:.0f} MB "
          "of float32 weights, sparsity 0.8, 4 bits, entropy layout) into a freshly built "
          "model, each way in its own process: memory above the built model", "",
          markdown_table(load_rows, ["mode", "seconds", "time_vs_load+pack",
                                     "peak_MB_above_model", "peak_vs_dense_weights",
                                     "held_MB_above_model"]), "",
          f"File bytes: entropy {load_sizes['opq_entropy_bytes']}, packed "
          f"{load_sizes['opq_packed_bytes']}.", "",
          f"torch threads {torch.get_num_threads()}, {machine()['cpus']} CPUs; "
          f"{result['seconds']:.0f} s."]
    mpath = os.path.join(HERE, "results", name + ".md")
    with open(mpath + ".tmp", "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(mpath + ".tmp", mpath)
    print("\n".join(md))


if __name__ == "__main__":
    main()
