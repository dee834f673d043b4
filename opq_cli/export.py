"""``opq export``: an ONNX model that keeps the compressed weights compressed."""
from __future__ import annotations

import json
import os

from ._common import CliError, _check_output, _progress


def cmd_export(args):
    try:
        import onnx
    except ImportError:
        raise CliError("export needs onnx: pip install 'opq[onnx]'") from None
    from opq_core.export_onnx import compress_onnx, write_onnx
    from opq_core.format import layer_codes, read_opq
    if os.path.splitext(args.output)[1].lower() != ".onnx":
        raise CliError(f"-o/--output: {args.output!r} must end in .onnx")
    _check_output(args.output, args.file)
    _check_output(args.output, args.template, "-o/--output (it is the --template)")
    if not os.path.isfile(args.template):
        raise CliError(f"--template: {args.template!r} does not exist")
    try:
        template = onnx.load(args.template, load_external_data=True)
    except Exception as exc:
        raise CliError(f"--template: {args.template!r} is not a readable ONNX model "
                       f"({type(exc).__name__})") from None
    f = read_opq(args.file, progress=_progress())
    codes = {lp.name: layer_codes(lp, f.weights[lp.name], f.masks[lp.name])
             for lp in f.plan.layers}
    model, rep = compress_onnx(template, f.plan, codes, f.masks, other=f.other,
                               prefer=args.prefer, where=f"template {args.template!r}")
    size = write_onnx(model, args.output)
    dense = os.path.getsize(args.template)
    summary = {"output": args.output, "onnx_bytes": size, "opq_bytes": f.file_bytes,
               "opq_layout": f.layout, "template_bytes": dense, "opset": rep.opset,
               "updated_other": rep.updated,
               "layers": [{"name": e.name, "encoding": e.encoding, "bytes": e.onnx_bytes,
                           "dense_bytes": e.dense_bytes} for e in rep.layers]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(rep.table())
        print(f"wrote {args.output}: {size} bytes (the .opq file, {f.layout} layout: "
              f"{f.file_bytes} bytes; the dense template: {dense} bytes; "
              f"{rep.updated} other tensors taken from the .opq file)")
    return 0
