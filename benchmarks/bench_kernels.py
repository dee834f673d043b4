"""Kernel speed: fused prune + fake-quant, STE backward, packing, against a memory copy.

Every figure is a ratio to baselines timed in the same run on the same arrays:

- ``copy``: a parallel Numba copy kernel written like the others (``prange`` over output
  channels) — this machine's memory roofline for one read + one write stream;
- ``reference``: the NumPy oracle of ``tests/reference.py``;
- ``torch``: ``torch.fake_quantize_per_channel_affine`` followed by a mask multiply
  (forward), ``grad * mask`` (backward); skipped when torch is not installed.

Shapes: a 25.5 M-weight tensor (ResNet-50's total, as 25 500 channels of 1 000),
(512, 512, 3, 3), (2048, 1024), (1000, 2048) and a depthwise (1024, 1, 3, 3); float32,
4 bits (2 and 8 bits too on the big tensor). Weights are Laplace draws, channel scale
``s = mean|w|``, threshold ``0.6 s`` (about 55 % kept), offset grid. Compile time (first
calls) is measured apart and reported per kernel. Median of ``--repeat`` runs after a
warm-up.

    python benchmarks/bench_kernels.py [--quick] [--repeat N] [--threads T] [--out DIR]

``--quick`` uses a 2.55 M-weight "big" tensor and fewer repeats (a smoke run).
Results go to ``DIR/bench_kernels.json`` and ``.md`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
from _common import machine, markdown_table, timeit  # noqa: E402

import numba  # noqa: E402

from opq_core import _jit, kernels as K  # noqa: E402
from opq_core.io import atomic_write  # noqa: E402

try:
    import reference as ref  # noqa: E402
except ImportError:  # pragma: no cover - benchmarks run from a source checkout
    ref = None
try:
    import torch  # noqa: E402
except ImportError:  # pragma: no cover
    torch = None

STEP = {1: 2.0, 2: 1.538, 3: 1.034, 4: 0.652, 5: 0.396, 6: 0.24, 7: 0.14, 8: 0.0776}


@_jit.jit(parallel=True)
def _copy_rows(x, o):
    for c in _jit.prange(x.shape[0]):
        xr = x[c]
        orow = o[c]
        for j in range(xr.shape[0]):
            orow[j] = xr[j]


def median_time(fn, repeat, warmup=1):
    return timeit(fn, repeat=repeat, warmup=warmup)


def best_time(fn, repeat, warmup=1):
    return timeit(fn, repeat=repeat, warmup=warmup, best=True)


def problem(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=shape).astype(np.float32)
    w *= rng.uniform(0.2, 2.0, size=(shape[0],) + (1,) * (len(shape) - 1)).astype(np.float32)
    c = shape[0]
    s = np.abs(w.reshape(c, -1)).mean(axis=1, dtype=np.float64)
    th = 0.6 * s
    m = K.mask_from_threshold(w, th)
    g = rng.standard_normal(shape).astype(np.float32)
    return w, m, s, th, g


def bench_shape(label, shape, bits_list, repeat, use_torch, use_ref, rows):
    w, m, s, th, g = problem(shape)
    c = shape[0]
    x2 = w.reshape(c, -1)
    o = np.empty_like(w)
    o2 = o.reshape(c, -1)
    t_copy = median_time(lambda: _copy_rows(x2, o2), repeat)
    base = dict(shape=label, weights=int(w.size), kept=float(m.mean()))
    rows.append(dict(base, bits="-", op="copy (roofline)", ms=t_copy * 1e3, per_copy=1.0,
                     gbps=2 * w.nbytes / t_copy / 1e9))
    if use_torch:
        wt = torch.from_numpy(w)
        mt = torch.from_numpy(m.astype(np.float32))
        gt = torch.from_numpy(g)
        zp = torch.zeros(c, dtype=torch.int32)
    for bits in bits_list:
        d = STEP[bits]
        cd = np.empty(shape, dtype=K.code_dtype(bits))
        t_fwd = median_time(lambda: K.fake_quant(w, m, s, th, d, bits, out=o), repeat)
        t_fwdc = median_time(lambda: K.fake_quant(w, m, s, th, d, bits, out=o, codes=cd),
                             repeat)
        row = dict(base, bits=bits, op="forward", ms=t_fwd * 1e3, per_copy=t_fwd / t_copy)
        rowc = dict(base, bits=bits, op="forward + codes", ms=t_fwdc * 1e3,
                    per_copy=t_fwdc / t_copy)
        if use_ref:
            r = 1 if w.size > 5_000_000 else 3
            t_ref = median_time(lambda: ref.fake_quant(w, m, s, th, d, bits), r, warmup=0)
            row["ref_per_op"] = t_ref / t_fwd
            rowc["ref_per_op"] = t_ref / t_fwdc
        if use_torch:
            # a symmetric integer grid with the same number of levels (torch has no offset
            # grid); only the speed is compared
            st = torch.from_numpy((s * d).astype(np.float32))
            qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if bits == 1:
                qmin, qmax = -1, 0

            def tfwd():
                return torch.fake_quantize_per_channel_affine(wt, st, zp, 0, qmin, qmax) * mt
            t_t = median_time(tfwd, repeat)
            row["torch_per_op"] = t_t / t_fwd
            rowc["torch_per_op"] = t_t / t_fwdc
            row["torch_ms"] = t_t * 1e3
        rows += [row, rowc]
        buf = K.pack_codes(cd, m, bits)
        t_pack = median_time(lambda: K.pack_codes(cd, m, bits), repeat)
        t_unpack = median_time(lambda: K.unpack_codes(buf, m, bits), repeat)
        rows.append(dict(base, bits=bits, op="pack_codes", ms=t_pack * 1e3,
                         per_copy=t_pack / t_copy, out_bytes=int(buf.size)))
        rows.append(dict(base, bits=bits, op="unpack_codes", ms=t_unpack * 1e3,
                         per_copy=t_unpack / t_copy))
    og = np.empty_like(g)
    t_bwd = median_time(lambda: K.ste_backward(g, m, out=og), repeat)
    row = dict(base, bits="-", op="ste_backward", ms=t_bwd * 1e3, per_copy=t_bwd / t_copy)
    if use_ref:
        t_ref = median_time(lambda: ref.ste_backward(g, m), 3, warmup=0)
        row["ref_per_op"] = t_ref / t_bwd
    if use_torch:
        t_t = median_time(lambda: gt * mt, repeat)
        row["torch_per_op"] = t_t / t_bwd
        row["torch_ms"] = t_t * 1e3
    rows.append(row)
    for name, fn in (("pack_mask", K.pack_mask), ("gap_encode", K.gap_encode),
                     ("mask_coding_cost", K.mask_coding_cost)):
        t = median_time(lambda: fn(m), repeat)
        rows.append(dict(base, bits="-", op=name, ms=t * 1e3, per_copy=t / t_copy))
    bm = K.pack_mask(m)
    gap = K.gap_encode(m)
    rows.append(dict(base, bits="-", op="unpack_mask",
                     ms=1e3 * (t := median_time(lambda: K.unpack_mask(bm, m.size), repeat)),
                     per_copy=t / t_copy))
    rows.append(dict(base, bits="-", op="gap_decode (serial)",
                     ms=1e3 * (t := median_time(lambda: K.gap_decode(gap, m.size), repeat)),
                     per_copy=t / t_copy))


def _float64_formula(w, mask, scale, threshold, step, bits):
    """The torch-ops formula as it was before the blocks (whole-tensor float64), for the
    memory comparison only."""
    x = w.to(torch.float64)
    s = scale.reshape(-1, *([1] * (w.dim() - 1)))
    th = threshold.reshape(-1, *([1] * (w.dim() - 1)))
    kmax = float(1 << (bits - 1))
    sd = s * step
    kf = torch.floor((x.abs() - th) / sd) + 1.0
    kf = torch.where(kf > kmax, kmax, kf)
    kf = torch.where(kf >= 1.0, kf, 1.0)
    level = th + s * ((kf - 0.5) * step)
    val = torch.where(x >= 0.0, level, -level)
    val = torch.where(torch.isnan(x), x, val)
    return torch.where(mask, val, 0.0).to(w.dtype)


def bench_adapter(shape, repeat, rows):
    """Through opq_torch (autograd Function, reused buffers, per-call threads) on one big
    float32 layer, against a parallel copy, torch's fake-quant + mask, and itself with one
    thread; the torch-ops (non-CPU) formula's time and peak extra memory on the CPU."""
    from opq_torch import _buffers, ste
    from torch_memory import peak_extra_bytes
    w, m, s, th, g = problem(shape)
    c = shape[0]
    bits, d = 4, STEP[4]
    x2 = w.reshape(c, -1)
    o = np.empty_like(w)
    copy = lambda: _copy_rows(x2, o.reshape(c, -1))  # noqa: E731
    wt = torch.from_numpy(w).requires_grad_(True)
    mt = torch.from_numpy(m)
    mf = mt.to(torch.float32)
    st, tht = torch.from_numpy(s), torch.from_numpy(th)
    gt = torch.from_numpy(g)
    sc = torch.from_numpy((s * d).astype(np.float32))
    zp = torch.zeros(c, dtype=torch.int32)

    class _Ctx:
        saved_tensors = (mt,)

    def fwd():
        return ste.fake_quant_ste(wt, mt, st, tht, d, bits)

    def bwd():
        return ste.FakeQuantSTE.backward(_Ctx, gt)[0]

    def tq():
        return torch.fake_quantize_per_channel_affine(wt.detach(), sc, zp, 0, -8, 7) * mf

    ob = np.empty_like(w)
    og = np.empty_like(g)

    def kfwd():  # the bare kernels on the same arrays, into held outputs
        return K.fake_quant(w, m, s, th, d, bits, out=ob)

    def kbwd():
        return K.ste_backward(g, m, out=og)

    label = f"{w.size / 1e6:.1f}M {shape}"
    t = {}
    for name, fn in (("copy", copy), ("kernel forward", kfwd), ("forward", fwd),
                     ("kernel backward", kbwd), ("backward", bwd), ("torch", tq)):
        t[name] = best_time(fn, repeat)
    old = ste.KERNEL_THREADS
    try:
        ste.KERNEL_THREADS = 1
        t["forward 1 thread"] = best_time(fwd, repeat)
    finally:
        ste.KERNEL_THREADS = old
    _buffers.clear()
    fresh = {"forward fresh output": lambda: (_buffers.clear(), fwd())}
    t["forward fresh output"] = best_time(fresh["forward fresh output"], repeat)
    t["torch-ops formula"] = best_time(
        lambda: ste.fake_quant_torch(wt.detach(), mt, st, tht, d, bits), max(2, repeat // 3))
    wd = wt.detach()
    peak_new = peak_extra_bytes(lambda: ste.fake_quant_torch(wd, mt, st, tht, d, bits))[0]
    peak_old = peak_extra_bytes(lambda: _float64_formula(wd, mt, st, tht, d, bits))[0]
    for op in ("kernel forward", "forward", "kernel backward", "backward", "forward 1 thread",
               "forward fresh output", "torch", "torch-ops formula"):
        rows.append(dict(shape=label, op=f"adapter: {op}", ms=t[op] * 1e3,
                         per_copy=t[op] / t["copy"], threads=ste.kernel_threads(w.size)))
    summary = {
        "forward_per_copy": t["forward"] / t["copy"],
        "backward_per_copy": t["backward"] / t["copy"],
        "forward_per_kernel": t["forward"] / t["kernel forward"],
        "backward_per_kernel": t["backward"] / t["kernel backward"],
        "torch_fakequant_per_opq_forward": t["torch"] / t["forward"],
        "torch_ops_formula_per_opq_forward": t["torch-ops formula"] / t["forward"],
        "torch_ops_peak_extra_per_weight_bytes": peak_new / w.nbytes,
        "old_float64_formula_peak_extra_per_weight_bytes": peak_old / w.nbytes,
        "kernel_threads": ste.kernel_threads(w.size),
    }
    # the thread rule: one thread vs all threads through the adapter, by size
    sweep = []
    for n in (1 << 18, 1 << 20, 1 << 22):
        ws, ms_, ss, ths, _ = problem((n // 1024, 1024), seed=1)
        wts, mts = torch.from_numpy(ws), torch.from_numpy(ms_)
        sst, thst = torch.from_numpy(ss), torch.from_numpy(ths)
        f = lambda: ste.fake_quant_ste(wts, mts, sst, thst, d, bits)  # noqa: E731
        res = {}
        for k in (1, numba.config.NUMBA_NUM_THREADS):
            ste.KERNEL_THREADS = k
            try:
                res[k] = best_time(f, repeat * 3)
            finally:
                ste.KERNEL_THREADS = old
        sweep.append(dict(elements=n, rule_threads=ste.kernel_threads(n),
                          all_threads_per_one=res[numba.config.NUMBA_NUM_THREADS] / res[1]))
    summary["thread_sweep"] = sweep
    return summary


def targets(rows, big):
    def get(op, bits):
        return next(r for r in rows if r["shape"] == big and r["op"] == op and r["bits"] == bits)
    fwd, bwd = get("forward", 4), get("ste_backward", "-")
    out = {
        "forward <= 1.5x copy": [fwd["per_copy"], fwd["per_copy"] <= 1.5],
        "ste_backward <= 1.5x copy": [bwd["per_copy"], bwd["per_copy"] <= 1.5],
        "pack_codes <= 3x copy": [get("pack_codes", 4)["per_copy"],
                                  get("pack_codes", 4)["per_copy"] <= 3.0],
        "unpack_codes <= 3x copy": [get("unpack_codes", 4)["per_copy"],
                                    get("unpack_codes", 4)["per_copy"] <= 3.0],
    }
    if "torch_per_op" in fwd:
        out["forward >= 10x faster than torch"] = [fwd["torch_per_op"], fwd["torch_per_op"] >= 10]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2.55 M big tensor, 3 repeats")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per figure")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch column")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for Numba and torch (default: Numba's default)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    ap.add_argument("--adapter-only", action="store_true",
                    help="only the opq_torch section (bench_kernels.adapter.json / .md)")
    args = ap.parse_args(argv)
    if args.adapter_only:
        return main_adapter(args)
    repeat = args.repeat or (3 if args.quick else 9)
    big = "25.5M (25500, 1000)" if not args.quick else "2.55M (2550, 1000)"
    shapes = [(big, (25_500, 1000) if not args.quick else (2_550, 1000), [4, 2, 8]),
              ("(512, 512, 3, 3)", (512, 512, 3, 3), [4]),
              ("(2048, 1024)", (2048, 1024), [4]),
              ("(1000, 2048)", (1000, 2048), [4]),
              ("depthwise (1024, 1, 3, 3)", (1024, 1, 3, 3), [4])]
    if args.threads:
        numba.set_num_threads(args.threads)
    use_torch = torch is not None and not args.no_torch
    if use_torch:
        torch.set_num_threads(numba.get_num_threads())
    load0 = os.getloadavg()

    # compile time, apart: the first calls on a small tensor, both serial and parallel paths
    with _jit.compile_timer() as log:
        t0 = time.perf_counter()
        for shape in ((64, 64), (512, 256)):          # below / above PARALLEL_MIN_SIZE
            w, m, s, th, g = problem(shape)
            for bits in (4, 8):
                cd = np.empty(shape, K.code_dtype(bits))
                K.fake_quant(w, m, s, th, STEP[bits], bits, codes=cd)
                K.unpack_codes(K.pack_codes(cd, m, bits), m, bits)
            K.fake_quant(w, m, s, th, 0.65, 4)
            K.ste_backward(g, m)
            K.gap_decode(K.gap_encode(m), m.size)
            K.unpack_mask(K.pack_mask(m), m.size)
            K.mask_coding_cost(m)
            _copy_rows(w.reshape(shape[0], -1), np.empty_like(w).reshape(shape[0], -1))
        first_calls = time.perf_counter() - t0
    compile_s = _jit.compile_seconds(log)

    rows = []
    for label, shape, bits_list in shapes:
        bench_shape(label, shape, bits_list, repeat, use_torch, ref is not None, rows)
        print(f"# {label}: done", file=sys.stderr)
    load1 = os.getloadavg()
    tg = targets(rows, big)
    result = {
        "benchmark": "bench_kernels", "quick": args.quick, "repeat": repeat,
        "threads": numba.get_num_threads(), "threading_layer": numba.threading_layer(),
        "torch": torch.__version__ if use_torch else None,
        "loadavg_before": load0, "loadavg_after": load1,
        "first_calls_seconds": first_calls,
        "compile_seconds_total": sum(compile_s.values()),
        "compile_seconds": compile_s,
        "targets": tg, "rows": rows, "machine": machine(),
    }
    cols = ["shape", "bits", "op", "ms", "per_copy", "torch_per_op", "ref_per_op"]
    md = [f"### bench_kernels{' (quick)' if args.quick else ''}", "",
          f"float32, offset grid, {result['threads']} threads ({result['threading_layer']}), "
          f"median of {repeat}; load average {load0[0]:.1f} before, {load1[0]:.1f} after. "
          "`per_copy` = op time / parallel copy time (lower is better); `torch_per_op`, "
          "`ref_per_op` = baseline time / op time (higher is better).", "",
          markdown_table(rows, cols), "",
          "| target (big tensor, 4 bits) | measured | met |", "|---|---|---|"]
    md += [f"| {k} | {v[0]:.3g} | {'yes' if v[1] else 'no'} |" for k, v in tg.items()]
    md += ["", f"Compile (first calls, measured apart): {first_calls:.1f} s wall, "
           f"{result['compile_seconds_total']:.1f} s compiling; largest: "
           + ", ".join(f"{k} {v:.2f} s" for k, v in list(compile_s.items())[:6]) + "."]
    text = json.dumps(result, indent=1, default=float)
    print(text)
    print()
    print("\n".join(md))
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "bench_kernels.json"),
                 lambda f: f.write(text + "\n"), mode="w")
    atomic_write(os.path.join(args.out, "bench_kernels.md"),
                 lambda f: f.write("\n".join(md) + "\n"), mode="w")


def main_adapter(args):
    if torch is None:
        raise SystemExit("bench_kernels --adapter-only needs torch")
    repeat = args.repeat or (3 if args.quick else 7)
    if args.threads:
        numba.set_num_threads(args.threads)
    torch.set_num_threads(numba.get_num_threads())
    shape = (2_550, 1000) if args.quick else (25_500, 1000)
    load0 = os.getloadavg()
    rows = []
    summary = bench_adapter(shape, repeat, rows)
    load1 = os.getloadavg()
    tg = {
        "adapter forward <= 2x copy": [summary["forward_per_copy"],
                                       summary["forward_per_copy"] <= 2.0],
        "adapter backward <= 2x copy": [summary["backward_per_copy"],
                                        summary["backward_per_copy"] <= 2.0],
        "torch fake-quant + mask >= 5x opq forward": [
            summary["torch_fakequant_per_opq_forward"],
            summary["torch_fakequant_per_opq_forward"] >= 5.0],
        "torch-ops formula peak extra <= 2x weight bytes": [
            summary["torch_ops_peak_extra_per_weight_bytes"],
            summary["torch_ops_peak_extra_per_weight_bytes"] <= 2.0],
    }
    result = {"benchmark": "bench_kernels --adapter-only", "quick": args.quick,
              "repeat": repeat, "statistic": "best of repeat",
              "threads": numba.get_num_threads(), "threading_layer": numba.threading_layer(),
              "torch": torch.__version__, "loadavg_before": load0, "loadavg_after": load1,
              "summary": summary, "targets": tg, "rows": rows, "machine": machine()}
    md = [f"### bench_kernels --adapter-only{' (quick)' if args.quick else ''}", "",
          f"float32, offset grid, 4 bits, {result['threads']} threads "
          f"({result['threading_layer']}); best of {repeat} (the machine was shared: load "
          f"average {load0[0]:.1f} before, {load1[0]:.1f} after). `per_copy` = time / a "
          "parallel copy of the same weight timed in the same run.", "",
          markdown_table(rows, ["shape", "op", "threads", "ms", "per_copy"]), "",
          "| target | measured | met |", "|---|---|---|"]
    md += [f"| {k} | {v[0]:.3g} | {'yes' if v[1] else 'no'} |" for k, v in tg.items()]
    md += ["", f"Peak extra memory of the torch-ops formula (torch.profiler, CPU): "
           f"{summary['torch_ops_peak_extra_per_weight_bytes']:.2f}x the weight's bytes "
           f"(the whole-tensor float64 formula it replaces: "
           f"{summary['old_float64_formula_peak_extra_per_weight_bytes']:.1f}x); its time "
           f"{summary['torch_ops_formula_per_opq_forward']:.1f}x opq's forward.", "",
           f"Adapter overhead over the bare kernels on the same arrays: forward "
           f"{summary['forward_per_kernel']:.2f}x, backward "
           f"{summary['backward_per_kernel']:.2f}x the kernel's time.", "",
           "Thread rule (adapter forward, all threads / one thread, best of "
           f"{3 * repeat}; below 1 = more threads faster):", "",
           markdown_table(summary["thread_sweep"],
                          ["elements", "rule_threads", "all_threads_per_one"])]
    text = json.dumps(result, indent=1, default=float)
    print(text)
    print("\n".join(md))
    os.makedirs(args.out, exist_ok=True)
    suffix = ".quick" if args.quick else ""
    atomic_write(os.path.join(args.out, f"bench_kernels.adapter{suffix}.json"),
                 lambda f: f.write(text + "\n"), mode="w")
    atomic_write(os.path.join(args.out, f"bench_kernels.adapter{suffix}.md"),
                 lambda f: f.write("\n".join(md) + "\n"), mode="w")


if __name__ == "__main__":
    main()
