"""The ``opq`` command line."""
from __future__ import annotations

import argparse
import json
import sys

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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="opq",
        description="One-shot pruning + quantization of neural networks: per-layer sparsity "
                    "and bits chosen from the weights alone.",
        epilog="Examples:\n  opq plan model.safetensors --sparsity 0.9 --bits 4\n"
               "  opq plan example:resnet50 --rate 100 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
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
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"opq {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
