"""``opq inspect``: sizes and rates of a .opq file."""
from __future__ import annotations


import json

from ._common import _check_paths, _check_plot, _dumps, _progress

_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def input_rates(f) -> dict:
    """Rates against the input's own dtype (bfloat16 inputs are stored as float32 in the
    plan): input bytes of the compressed layers over their bytes in the file."""
    try:
        src = json.loads(f.metadata.get("source_dtypes") or "{}")
    except ValueError:
        src = {}
    in_bytes = 0
    dtypes = set()
    for lp in f.plan.layers:
        dt = src.get(lp.name, lp.dtype)
        dtypes.add(dt)
        in_bytes += _BYTES.get(dt, 4) * lp.n
    comp = f.compressed_bytes
    return {"input_dtypes": sorted(dtypes), "input_bytes": in_bytes,
            "storage_rate_vs_input": in_bytes / comp if comp else None}


def cmd_inspect(args):
    from opq_core.format import OpqStream, read_opq
    _check_paths([("--plot", args.plot)], [("FILE.opq", args.file)])
    _check_plot(args.plot)
    costs = {}
    if args.verify:  # decode every layer, one at a time (memory: one layer)
        from opq_core.kernels import mask_coding_cost
        with OpqStream(args.file) as s:
            f = s.file
            # every blob decoded and checked in full (layers on threads); its mask is where
            # the weights are nonzero (a kept weight never decodes to 0), without
            # dequantizing them
            layers = s.decoded(f.plan.names, masks=True)
            if _progress(args):
                from tqdm import tqdm
                layers = tqdm(layers, total=len(f.plan.names), desc="verify", unit="layer",
                              leave=False)
            for name, mask in layers:
                costs[name] = mask_coding_cost(mask)
    else:
        f = read_opq(args.file, decode=False)
    rates = input_rates(f)
    if args.json:
        d = f.to_dict()
        d["plan"] = f.plan.to_dict()
        d["verified"] = bool(args.verify)
        d.update(rates)
        d["exports"] = _exports(f, costs)
        print(_dumps(d))
    else:
        print(f.table())
        r = rates["storage_rate_vs_input"]
        if rates["input_dtypes"] != ["float32"] and r is not None:
            print(f"against the input dtype ({', '.join(rates['input_dtypes'])}: "
                  f"{rates['input_bytes']} bytes): storage_rate={r:.2f}x "
                  f"(the rates above are against float32)")
        print(_exports_table(_exports(f, costs)))
        if args.verify:
            print("verified: every layer decodes")
    if args.plot:
        from opq_core.plot import plot_file
        plot_file(f, args.plot)
    return 0


def _exports(f, costs=None):
    from opq_core.export_onnx import exports_of
    return exports_of(f, costs)


def _exports_table(rows) -> str:
    """What each export keeps compressed, per layer."""
    # layer names are never cut (BERT's layer 0 and layer 1 rows must differ)
    nw = max([32] + [len(r["name"]) for r in rows])
    out = ["what the exports keep compressed (opq export -> ONNX; opq_torch.pack -> memory):",
           f"{'layer':{nw}s} {'onnx (opq export)':>22s} {'onnx bytes':>10s} "
           f"{'opq_torch.pack':>24s}"]
    for r in rows:
        pk = r["pack"] or "mask: read with --verify"
        pk = f"{r['bits']}-bit codes + {pk}" if r["pack"] not in (None, "none") else (
            f"{r['bits']}-bit codes" if r["pack"] == "none" else pk)
        out.append(f"{r['name']:{nw}s} {r['onnx']:>22s} {r['onnx_bytes']:10d} {pk:>24s}")
    return "\n".join(out)
