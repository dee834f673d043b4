"""``opq decompress``: the dense weights of a .opq file."""
from __future__ import annotations

import os

from ._common import CliError, _check_paths, _dumps, _progress


def cmd_decompress(args):
    from opq_core.format import read_opq
    from opq_core.io import FORMATS, save_weights
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in FORMATS:
        raise CliError(f"-o/--output: unknown extension {ext!r} of {args.output!r}; use one "
                       f"of {', '.join(sorted(FORMATS))}")
    if FORMATS[ext] == "onnx" and not args.template:
        raise CliError("--template: writing .onnx needs the original .onnx model "
                       "(--template model.onnx) whose initializers are replaced")
    if args.template and FORMATS[ext] != "onnx":
        raise CliError(f"--template: only for .onnx output (got -o {args.output!r})")
    _check_paths([("-o/--output", args.output)],
                 [("FILE.opq", args.file), ("--template", args.template)])
    f = read_opq(args.file, progress=_progress())
    tensors = dict(f.other)
    tensors.update(f.weights)
    save_weights(args.output, tensors, template=args.template)
    if args.json:
        print(_dumps({"output": args.output, "tensors": len(tensors),
                          "compressed_layers": len(f.weights)}))
    else:
        print(f"wrote {len(tensors)} tensors ({len(f.weights)} decompressed layers) to "
              f"{args.output}")
    return 0
