"""``opq decompress``: the dense weights of a .opq file, in the input's dtype.

Tensors are decoded and written one at a time for ``.safetensors`` (optionally in shards
with a Hugging Face index) and ``.npz``, the next ones decoding on threads meanwhile, so
memory stays at about one tensor per CPU core (at most 8); ``.pt`` and
``.onnx`` are written whole. Tensors that were bfloat16 in the compressed checkpoint are
written as bfloat16 again (the decoded float32 values rounded to nearest even, as a
bfloat16 PyTorch model rounds its fake-quantized weights).
"""
from __future__ import annotations

import json
import os
import re
import zipfile

import numpy as np

from ._common import CliError, _check_paths, _dumps, _progress

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10,
          "MIB": 2 ** 20, "GIB": 2 ** 30}


def _size_arg(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise CliError(f"--max-shard-size: expected a size such as 500MB or 2GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _meta_json(f, key):
    raw = f.metadata.get(key)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except ValueError:
        raise CliError(f"FILE.opq: unreadable {key!r} metadata in {f.path!r}") from None
    return d if isinstance(d, dict) else {}


def cmd_decompress(args):
    from opq_core.format import OpqStream
    from opq_core.io import FORMATS, save_weights, write_safetensors_stream
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in FORMATS:
        raise CliError(f"-o/--output: unknown extension {ext!r} of {args.output!r}; use one "
                       f"of {', '.join(sorted(FORMATS))}")
    fmt = FORMATS[ext]
    if fmt == "onnx" and not args.template:
        raise CliError("--template: writing .onnx needs the original .onnx model "
                       "(--template model.onnx) whose initializers are replaced")
    shard = None
    if args.max_shard_size is not None:
        if fmt != "safetensors":
            raise CliError(f"--max-shard-size: only for .safetensors output, got {args.output!r}")
        shard = _size_arg(args.max_shard_size)
    if args.template and fmt != "onnx":
        raise CliError(f"--template: only for .onnx output (got -o {args.output!r})")
    _check_paths([("-o/--output", args.output)],
                 [("FILE.opq", args.file), ("--template", args.template)])
    progress = _progress(args)
    with OpqStream(args.file) as s:
        f = s.file
        src = _meta_json(f, "source_dtypes")
        aliases = _meta_json(f, "aliases")
        names = s.names
        n_layers = len(f.plan.names)

        def out_dtype(name):
            shape, dt = s.info(name)
            if src.get(name) == "bfloat16" and dt.kind == "f":
                return "bfloat16"
            return np.dtype(dt).name

        written = [args.output]
        produce = _in_order(s.decoded(names))
        if fmt == "safetensors":
            specs = [(n, s.info(n)[0], out_dtype(n)) for n in names]
            written = write_safetensors_stream(args.output, specs, produce,
                                               max_shard_bytes=shard, progress=progress)
        elif fmt == "npz":
            _write_npz(args.output, names, produce)
        else:
            tensors = {n: produce(n) for n in names}
            if fmt == "pt":
                _write_pt(args.output, tensors, {n: out_dtype(n) for n in names}, aliases)
            else:
                save_weights(args.output, tensors, template=args.template)
    extra = ""
    if aliases and fmt != "pt":
        extra = f"; {len(aliases)} tied name(s) not repeated: {', '.join(sorted(aliases))}"
    if args.json:
        print(_dumps({"output": args.output, "files": written, "tensors": len(names),
                          "compressed_layers": n_layers,
                          "bfloat16": sorted(n for n in names if out_dtype(n) == "bfloat16")}))
    else:
        print(f"wrote {len(names)} tensors ({n_layers} decompressed layers) to "
              f"{args.output}" + (f" ({len(written) - 1} shards + index)" if shard else "")
              + extra)
    return 0


def _in_order(pairs):
    """``produce(name)`` over an iterator of ``(name, array)`` that the writers call in
    the same order (tensors decode ahead on threads, see ``OpqStream.decoded``)."""
    it = iter(pairs)

    def produce(name):
        got, a = next(it)
        if got != name:  # pragma: no cover - the writers keep the order of names
            raise AssertionError(f"tensor {name!r} asked for, {got!r} decoded")
        return a
    return produce


def _write_npz(path, names, produce):
    from opq_core.io import atomic_write

    def write(fh):
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as z:
            for n in names:
                a = np.ascontiguousarray(produce(n))
                with z.open(n + ".npy", "w", force_zip64=True) as g:
                    np.lib.format.write_array(g, a, allow_pickle=False)
                del a
    atomic_write(path, write)


def _write_pt(path, tensors, dtypes, aliases):
    import io

    import torch

    from opq_core.io import atomic_write
    out = {}
    for n, a in tensors.items():
        t = torch.from_numpy(np.ascontiguousarray(a).copy())
        out[n] = t.to(torch.bfloat16) if dtypes[n] == "bfloat16" else t
    for alias, name in aliases.items():  # tied names share one tensor (stored once)
        if name in out and alias not in out:
            out[alias] = out[name]
    buf = io.BytesIO()
    torch.save(out, buf)
    atomic_write(path, lambda fh: fh.write(buf.getvalue()))
