"""What every subcommand shares: the error type, reading a checkpoint, the plan arguments."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _weights_from(source: str):
    from opq_core.io import open_weights
    if source.startswith("example:"):
        from opq_core.synthetic import ARCHITECTURES, laplace_weights
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
    p.add_argument("--method", default="opq", choices=["opq", "global", "uniform", "annc"],
                   help="allocation rule (default opq); annc: training-time, only for "
                        "'opq compress' with --train")
    p.add_argument("--channelwise", default="unified", choices=["unified", "layer"])
    p.add_argument("--grid", default="offset", choices=["offset", "symmetric"])
    p.add_argument("--error-model", default="fitted", choices=["fitted", "laplace", "empirical"])
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
    from opq_core.allocate import plan
    if args.method == "annc":
        raise CliError("--method annc learns sparsity and bits while training: use "
                       "'opq compress CHECKPOINT -o OUT.opq --method annc --rate R --train "
                       "MODULE:FUNCTION'")
    budget_mode = args.rate is not None or args.budget_bits is not None
    kw = dict(sparsity=args.sparsity, rate=args.rate, budget_bits=args.budget_bits,
              method=args.method, channelwise=args.channelwise, grid=args.grid,
              error_model=args.error_model, exclude=args.exclude)
    bits = _bits_arg(args.bits, budget_mode)
    if bits is not None:
        kw["bits"] = bits
    return plan(weights, **kw)


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

    def tensor_info(self, name):
        from opq_core.io import tensor_info
        if name not in self._names:
            raise KeyError(name)
        return tensor_info(self._w, name)

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
