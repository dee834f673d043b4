"""The ``opq`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _weights_from(source: str):
    from .io import open_weights
    if source.startswith("example:"):
        from .examples import ARCHITECTURES, laplace_weights
        arch = source.split(":", 1)[1]
        if arch not in ARCHITECTURES:
            raise CliError(f"CHECKPOINT: unknown example {arch!r}; choose one of "
                           + ", ".join(f"example:{a}" for a in sorted(ARCHITECTURES)))
        return laplace_weights(arch)
    return open_weights(source)


def _add_plan_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("what to plan (give --sparsity, or --rate / --budget-bits)")
    g.add_argument("--sparsity", type=float, help="global fraction of weights to prune, in [0, 1)")
    g.add_argument("--bits", type=str, default=None,
                   help="bits per kept weight, 1..8 (default 4); with --rate a comma list of "
                        "candidates (default 1..8, chosen per layer)")
    g.add_argument("--rate", type=float, help="target paper_rate (32 N / sum bits*nnz), > 1")
    g.add_argument("--budget-bits", type=float, help="size budget in bits (sum bits*nnz)")
    p.add_argument("--method", default="opq", choices=["opq", "global", "uniform"],
                   help="allocation rule (default opq)")
    p.add_argument("--channelwise", default="unified", choices=["unified", "layer"])
    p.add_argument("--grid", default="offset", choices=["offset", "symmetric"])
    p.add_argument("--error-model", default="laplace", choices=["laplace", "empirical"])
    p.add_argument("--exclude", action="append", default=None, metavar="NAME",
                   help="tensor to leave uncompressed (repeatable)")


def _bits_arg(text, budget_mode):
    if text is None:
        return None
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--bits: expected an integer or a comma list, got {text!r}") from None
    if len(vals) == 1 and not budget_mode:
        return vals[0]
    if len(vals) == 1:
        return vals[0]
    return tuple(vals)


def _make_plan(args, weights):
    from .allocate import plan
    budget_mode = args.rate is not None or args.budget_bits is not None
    kw = dict(sparsity=args.sparsity, rate=args.rate, budget_bits=args.budget_bits,
              method=args.method, channelwise=args.channelwise, grid=args.grid,
              error_model=args.error_model, exclude=args.exclude)
    bits = _bits_arg(args.bits, budget_mode)
    if bits is not None:
        kw["bits"] = bits
    return plan(weights, **kw)


def cmd_plan(args):
    weights = _weights_from(args.checkpoint)
    p = _make_plan(args, weights)
    if args.output:
        from .io import atomic_write
        data = p.to_json(indent=1).encode()
        atomic_write(args.output, lambda f: f.write(data))
    if args.json:
        print(p.to_json())
    else:
        print(p.table())
    if args.plot:
        from .plot import plot_plan
        plot_plan(p, args.plot)
    return 0 if p.success else 1


def _progress() -> bool:
    return sys.stderr.isatty()


class _Subset(Mapping):
    """A read-only view of some names of a (lazy) weight mapping."""

    def __init__(self, weights, names):
        self._w = weights
        self._names = list(names)

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._w[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _same_file(a, b) -> bool:
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:  # pragma: no cover
        return False


def _check_output(out, source, arg="-o/--output"):
    if _same_file(out, source):
        raise CliError(f"{arg}: {out!r} is the input file; choose another output path")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise CliError(f"{arg}: folder {folder!r} does not exist")


def cmd_compress(args):
    from .format import LAYOUTS, write_opq
    if not args.output.endswith(".opq"):
        raise CliError(f"-o/--output: expected a .opq file name, got {args.output!r}")
    if args.layout not in LAYOUTS:  # pragma: no cover - argparse checks choices
        raise CliError(f"--layout: expected one of {LAYOUTS}, got {args.layout!r}")
    _check_output(args.output, args.checkpoint)
    weights = _weights_from(args.checkpoint)
    p = _make_plan(args, weights)
    if not p.success:
        raise CliError(f"planning failed: {p.message}")
    other = _Subset(weights, [k for k in weights if k not in p])
    meta = {"source": os.path.basename(args.checkpoint)}
    f = write_opq(args.output, p, weights, other=other, layout=args.layout, metadata=meta,
                  progress=_progress())
    if args.json:
        print(json.dumps(f.to_dict()))
    else:
        print(f.table())
        print(f"wrote {args.output}")
    if args.plot:
        from .plot import plot_file
        plot_file(f, args.plot)
    return 0


def cmd_inspect(args):
    from .format import read_opq
    f = read_opq(args.file, decode=args.verify, progress=_progress() and args.verify)
    if args.json:
        d = f.to_dict()
        d["plan"] = f.plan.to_dict()
        d["verified"] = bool(args.verify)
        print(json.dumps(d))
    else:
        print(f.table())
        if args.verify:
            print("verified: every layer decodes")
    if args.plot:
        from .plot import plot_file
        plot_file(f, args.plot)
    return 0


def cmd_decompress(args):
    from .format import read_opq
    from .io import FORMATS, save_weights
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in FORMATS:
        raise CliError(f"-o/--output: unknown extension {ext!r} of {args.output!r}; use one "
                       f"of {', '.join(sorted(FORMATS))}")
    if FORMATS[ext] == "onnx" and not args.template:
        raise CliError("--template: writing .onnx needs the original .onnx model "
                       "(--template model.onnx) whose initializers are replaced")
    _check_output(args.output, args.file)
    f = read_opq(args.file, progress=_progress())
    tensors = dict(f.other)
    tensors.update(f.weights)
    save_weights(args.output, tensors, template=args.template)
    if args.json:
        print(json.dumps({"output": args.output, "tensors": len(tensors),
                          "compressed_layers": len(f.weights)}))
    else:
        print(f"wrote {len(tensors)} tensors ({len(f.weights)} decompressed layers) to "
              f"{args.output}")
    return 0


def cmd_demo(args):
    try:
        from opq_torch.demo import run_demo
    except ImportError as exc:
        raise CliError(f"the demo needs PyTorch and scikit-learn ({exc}); "
                       "pip install 'opq[torch]' scikit-learn") from None
    res = run_demo(epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                   sparsity=args.sparsity, bits=args.bits, layout=args.layout,
                   output=args.output, quick=args.quick, seed=args.seed,
                   progress=not args.json and _progress(), verbose=not args.json)
    if args.json:
        print(json.dumps(res))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_EPILOG = """\
Examples:
  opq plan model.safetensors --sparsity 0.9 --bits 4      # print the per-layer plan
  opq plan example:resnet50 --rate 100 --json              # size budget, bits per layer
  opq compress model.pt -o model.opq --sparsity 0.9        # write the compressed file
  opq inspect model.opq                                    # sizes and rates per layer
  opq decompress model.opq -o dense.safetensors            # dense fake-quant weights
  opq demo                                                 # train, compress, reload (~1 min)

CHECKPOINT is a .pt/.pth/.bin state_dict, .safetensors, .npz or .onnx file, or
example:resnet50|alexnet|mobilenet_v1 (random Laplace weights of that shape).
Rates: paper_rate = 32 N / sum(bits * kept) (the papers' figure); storage_rate = float32
bytes of the compressed layers / their bytes in the .opq file (what the disk sees).
"""


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="opq",
        description="One-shot pruning + quantization of neural networks: per-layer sparsity "
                    "and bits chosen from the weights alone, stored in a .opq file that is "
                    "really that small.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("plan", help="compute and print a compression plan",
                       description="Plan per-layer sparsity, bits and quantizer steps of every "
                                   "conv/linear weight of CHECKPOINT (.pt/.pth, .safetensors, "
                                   ".npz, .onnx, or example:resnet50|alexnet|mobilenet_v1).")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    _add_plan_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("-o", "--output", help="also write the plan as JSON to this file")
    p.add_argument("--plot", metavar="FILE.png", help="per-layer chart (needs matplotlib)")
    p.set_defaults(func=cmd_plan)

    c = sub.add_parser("compress", help="prune + quantize a checkpoint into a .opq file",
                       description="Post-training, data-free: plan CHECKPOINT (as 'opq plan') "
                                   "and write the compressed weights, with every other tensor "
                                   "(biases, norms) as it was, to OUT.opq. Tensors are read one "
                                   "at a time.",
                       epilog="Example: opq compress model.safetensors -o model.opq "
                              "--sparsity 0.9 --bits 4")
    c.add_argument("checkpoint", metavar="CHECKPOINT")
    c.add_argument("-o", "--output", required=True, metavar="OUT.opq", help="file to write")
    _add_plan_args(c)
    c.add_argument("--layout", default="entropy", choices=["entropy", "packed"],
                   help="entropy: smallest (ANS-coded codes and mask, default); packed: "
                        "bits per kept weight + bitmask/gap index, random access")
    c.add_argument("--json", action="store_true", help="print the file's accounting as JSON")
    c.add_argument("--plot", metavar="FILE.png", help="per-layer chart (needs matplotlib)")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="sizes and rates of a .opq file",
                       description="Check a .opq file (format version, checksum) and print per "
                                   "layer: shape, bits, sparsity, mask coding, bytes, "
                                   "paper_rate and storage_rate.")
    i.add_argument("file", metavar="FILE.opq")
    i.add_argument("--json", action="store_true", help="print as JSON (with the plan)")
    i.add_argument("--verify", action="store_true", help="also decode every layer")
    i.add_argument("--plot", metavar="FILE.png", help="per-layer chart (needs matplotlib)")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("decompress", help="write the dense weights of a .opq file",
                       description="Decode FILE.opq to dense weights (bit for bit the plan's "
                                   "fake-quant weights) plus the other tensors, as .npz, "
                                   ".safetensors, .pt or .onnx (by the extension of -o).")
    d.add_argument("file", metavar="FILE.opq")
    d.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="OUT.npz, OUT.safetensors, OUT.pt or OUT.onnx")
    d.add_argument("--template", metavar="MODEL.onnx",
                   help="for .onnx output: the original model whose initializers are replaced")
    d.add_argument("--json", action="store_true", help="print a JSON summary")
    d.set_defaults(func=cmd_decompress)

    m = sub.add_parser("demo", help="train, compress and reload a small CNN (about a minute)",
                       description="Train a small CNN on scikit-learn's digits (fixed seed, "
                                   "held-out test split), plan OPQ, fine-tune, write demo.opq, "
                                   "reload it into a fresh model and compare accuracies and "
                                   "rates. Needs PyTorch and scikit-learn.")
    m.add_argument("--json", action="store_true",
                   help="print one JSON object (dense_accuracy, compressed_accuracy, "
                        "paper_rate, storage_rate, seconds, ...)")
    m.add_argument("--epochs", type=int, default=None, help="dense training epochs")
    m.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs")
    m.add_argument("--sparsity", type=float, default=0.9, help="default 0.9")
    m.add_argument("--bits", type=int, default=4, help="default 4")
    m.add_argument("--layout", default="entropy", choices=["entropy", "packed"])
    m.add_argument("-o", "--output", default="demo.opq", help="default ./demo.opq")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--quick", action="store_true", help="a shorter run (for tests)")
    m.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"opq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"opq {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
