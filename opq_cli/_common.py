"""What every subcommand shares: the error type, reading a checkpoint, the plan arguments."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
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
    g = p.add_argument_group("what to plan (give --sparsity, or --rate / --budget-bits / --size)")
    g.add_argument("--sparsity", type=float, help="global fraction of weights to prune, in [0, 1)")
    g.add_argument("--bits", type=str, default=None,
                   help="bits per kept weight, 1..8 (default 4); with --rate a comma list of "
                        "candidates (default 1..8, chosen per layer)")
    g.add_argument("--rate", type=float, help="target paper_rate (32 N / sum bits*nnz), > 1")
    g.add_argument("--budget-bits", type=float, help="size budget in bits (sum bits*nnz)")
    g.add_argument("--size", metavar="SIZE",
                   help="budget in bytes of the written .opq file, side information included "
                        "(never exceeded), e.g. 1.5MB: a number with an optional unit, B; "
                        "kB = KB = 1000 B, MB = 1000^2, GB = 1000^3 (decimal); "
                        "KiB = 1024 B, MiB = 1024^2, GiB = 1024^3 (binary)")
    p.add_argument("--method", default="opq", choices=["opq", "global", "uniform", "annc"],
                   help="allocation rule (default opq); annc: training-time, only for "
                        "'opq compress' with --train")
    p.add_argument("--channelwise", default="unified", choices=["unified", "layer"])
    p.add_argument("--grid", default="offset", choices=["offset", "symmetric"])
    p.add_argument("--error-model", default="fitted", choices=["fitted", "laplace", "empirical"])
    p.add_argument("--exclude", action="append", default=None, metavar="NAME",
                   help="tensor to leave uncompressed (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


#: Size units of --size: decimal (powers of 1000) and binary (powers of 1024).
SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
              "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}


def parse_size(text, arg="--size") -> int:
    """``"1.5MB"`` -> 1500000: a number and an optional unit (:data:`SIZE_UNITS`, any case,
    a space allowed between them), rounded down to whole bytes; a one-line CliError on a
    bad value.

    >>> parse_size("1.5MB"), parse_size("2 KiB"), parse_size("300")
    (1500000, 2048, 300)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None:
        raise CliError(f"{arg}: expected a size such as 1.5MB, 800kB or 2GiB, got {text!r}")
    unit = m.group(2).lower() or "b"
    if unit not in SIZE_UNITS:
        raise CliError(f"{arg}: unknown unit {m.group(2)!r} in {text!r}; use B, kB/KB, MB, GB "
                       "(decimal) or KiB, MiB, GiB (binary)")
    value = float(m.group(1)) * SIZE_UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise CliError(f"{arg}: expected at least 1 byte, got {text!r}")
    return int(math.floor(value))


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


_FLAGS = (("size_bytes", "--size"), ("budget_bits", "--budget-bits"), ("error_model", "--error-model"),
          ("channelwise", "--channelwise"), ("sparsity", "--sparsity"), ("rate", "--rate"),
          ("bits", "--bits"), ("method", "--method"), ("grid", "--grid"),
          ("exclude", "--exclude"))


def flag_names(msg: str) -> str:
    """A planner message in command-line terms: ``sparsity=`` -> ``--sparsity``."""
    for kw, flag in _FLAGS:
        msg = re.sub(rf"(?<![\w-]){kw}=(?=[\w'\".-])", f"{flag} ", msg)
        msg = re.sub(rf"(?<![\w-]){kw}=", flag, msg)
        msg = re.sub(rf"^{kw}\b", flag, msg)
    return msg


class _Reading(Mapping):
    """A weight mapping that ticks a progress bar on every tensor read (planning reads
    each tensor once for the statistics, once to realize the masks)."""

    def __init__(self, weights, bar):
        self._w = weights
        self._bar = bar

    def __getitem__(self, name):
        a = self._w[name]
        self._bar.update(1)
        return a

    def tensor_info(self, name):
        from opq_core.io import tensor_info
        return tensor_info(self._w, name)

    def __iter__(self):
        return iter(self._w)

    def __len__(self):
        return len(self._w)


def _make_plan(args, weights, metadata=None):
    from opq_core.allocate import plan
    if args.method == "annc":
        raise CliError("--method annc learns sparsity and bits while training: use "
                       "'opq compress CHECKPOINT -o OUT.opq --method annc --rate R --train "
                       "MODULE:FUNCTION'")
    size = getattr(args, "size", None)
    budget_mode = args.rate is not None or args.budget_bits is not None or size is not None
    kw = dict(sparsity=args.sparsity, rate=args.rate, budget_bits=args.budget_bits,
              method=args.method, channelwise=args.channelwise, grid=args.grid,
              error_model=args.error_model, exclude=args.exclude)
    if size is not None:
        kw.update(size_bytes=parse_size(size), layout=getattr(args, "layout", "entropy"),
                  metadata=metadata)
    bits = _bits_arg(args.bits, budget_mode)
    if bits is not None:
        kw["bits"] = bits
    bar = None
    if _progress(args):
        from tqdm import tqdm
        bar = tqdm(desc="plan: read tensors", unit="tensor", file=sys.stderr, leave=False,
                   mininterval=0.2)
        weights = _Reading(weights, bar)
    try:
        return plan(weights, **kw)
    except (ValueError, TypeError) as exc:
        raise CliError(flag_names(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)) from None
    finally:
        if bar is not None:
            bar.close()


def _progress(args=None) -> bool:
    """tqdm bars on stderr: only on a terminal, never with --quiet."""
    if args is not None and getattr(args, "quiet", False):
        return False
    return sys.stderr.isatty()


def source_metadata(weights) -> dict:
    """The input's dtypes NumPy lacks (bfloat16) and its tied names, for the .opq file's
    metadata: ``decompress`` writes them back, ``inspect`` reports rates against them."""
    import json
    meta = {}
    src = dict(getattr(weights, "source_dtypes", {}) or {})
    if src:
        meta["source_dtypes"] = json.dumps(src, separators=(",", ":"), sort_keys=True)
    aliases = dict(getattr(weights, "aliases", {}) or {})
    if aliases:
        meta["aliases"] = json.dumps(aliases, separators=(",", ":"), sort_keys=True)
    return meta


def _same_file(a, b) -> bool:
    """Whether two paths name the same file: the same resolved path (symlinks followed),
    or the same inode (hard links) when both exist."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except (OSError, ValueError):  # pragma: no cover - an unreadable path: not the same
        return False


def _check_paths(outputs, inputs, *, folders=True):
    """Refuse, before anything is written, an output path that is one of the inputs or
    another output (by path, symlink or hard link), or whose folder does not exist.

    ``outputs`` and ``inputs``: sequences of ``(argument, path)``; ``None`` paths and
    ``example:`` sources are skipped; ``folders=False`` leaves the folder checks to the
    callee."""
    outs = [(a, p) for a, p in outputs if p]
    ins = [(a, p) for a, p in inputs if p and not str(p).startswith("example:")]
    for i, (arg, out) in enumerate(outs):
        for iarg, src in ins:
            if _same_file(out, src):
                raise CliError(f"{arg}: {out!r} is the input {iarg} {src!r}; choose another "
                               "output path (inputs are never overwritten)")
        for arg2, out2 in outs[:i]:
            if _same_file(out, out2):
                raise CliError(f"{arg}: {out!r} is also the {arg2} output; choose two "
                               "different paths")
        folder = os.path.dirname(os.path.abspath(out))
        if not folders:
            continue
        if not os.path.isdir(folder):
            raise CliError(f"{arg}: folder {folder!r} does not exist")
        if os.path.isdir(out):
            raise CliError(f"{arg}: {out!r} is a directory")


def _check_output(out, source, arg="-o/--output"):
    _check_paths([(arg, out)], [("CHECKPOINT", source)])


PLOT_FORMATS = (".png", ".pdf", ".svg")


def _check_plot(path):
    """``--plot FILE``: the format follows the extension (.png, .pdf, .svg)."""
    if path is None:
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in PLOT_FORMATS:
        raise CliError(f"--plot: {path!r} has extension {ext or '(none)'!r}; the chart is "
                       f"written as {', '.join(PLOT_FORMATS)} by the extension")


def _json_safe(obj):
    """Non-finite floats as the strings "inf", "-inf", "nan" (strict JSON has no
    Infinity; ``Plan.from_dict`` reads the strings back with ``float``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _dumps(obj, **kw) -> str:
    """Strict JSON (no NaN/Infinity tokens) of a result."""
    return json.dumps(_json_safe(obj), allow_nan=False, **kw)
