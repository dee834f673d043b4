"""``opq inspect``: sizes and rates of a .opq file."""
from __future__ import annotations

import json

from ._common import _progress


def cmd_inspect(args):
    from opq_core.format import read_opq
    f = read_opq(args.file, decode=args.verify, progress=_progress() and args.verify)
    if args.json:
        d = f.to_dict()
        d["plan"] = f.plan.to_dict()
        d["verified"] = bool(args.verify)
        d["exports"] = _exports(f)
        print(json.dumps(d))
    else:
        print(f.table())
        print(_exports_table(_exports(f)))
        if args.verify:
            print("verified: every layer decodes")
    if args.plot:
        from opq_core.plot import plot_file
        plot_file(f, args.plot)
    return 0


def _exports(f):
    from opq_core.export_onnx import exports_of
    return exports_of(f)


def _exports_table(rows) -> str:
    """What each export keeps compressed, per layer."""
    out = ["what the exports keep compressed (opq export -> ONNX; opq_torch.pack -> memory):",
           f"{'layer':32s} {'onnx (opq export)':>22s} {'onnx bytes':>10s} "
           f"{'opq_torch.pack':>24s}"]
    for r in rows:
        pk = r["pack"] or "mask: read with --verify"
        pk = f"{r['bits']}-bit codes + {pk}" if r["pack"] not in (None, "none") else (
            f"{r['bits']}-bit codes" if r["pack"] == "none" else pk)
        out.append(f"{r['name'][:32]:32s} {r['onnx']:>22s} {r['onnx_bytes']:10d} {pk:>24s}")
    return "\n".join(out)
