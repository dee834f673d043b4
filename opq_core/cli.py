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
    p.add_argument("--method", default="opq", choices=["opq", "global", "uniform", "annc"],
                   help="allocation rule (default opq); annc: training-time, only for "
                        "'opq compress' with --train")
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

    def tensor_info(self, name):
        from .io import tensor_info
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


def cmd_compress(args):
    from .format import LAYOUTS, write_opq
    if not args.output.endswith(".opq"):
        raise CliError(f"-o/--output: expected a .opq file name, got {args.output!r}")
    if args.layout not in LAYOUTS:  # pragma: no cover - argparse checks choices
        raise CliError(f"--layout: expected one of {LAYOUTS}, got {args.layout!r}")
    _check_output(args.output, args.checkpoint)
    meta = {"source": os.path.basename(args.checkpoint)}
    if args.method == "annc":
        f, acc = _compress_annc(args, meta)
    else:
        _check_no_annc_args(args)
        weights = _weights_from(args.checkpoint)
        p = _make_plan(args, weights)
        if not p.success:
            raise CliError(f"planning failed: {p.message}")
        other = _Subset(weights, [k for k in weights if k not in p])
        f = write_opq(args.output, p, weights, other=other, layout=args.layout, metadata=meta,
                      progress=_progress())
        acc = None
    if args.json:
        print(json.dumps(f.to_dict()))
    else:
        print(f.table())
        if acc is not None:
            print(f"eval accuracy of the compressed model: {100 * acc:.2f} %")
        print(f"wrote {args.output}")
    if args.plot:
        from .plot import plot_file
        plot_file(f, args.plot)
    return 0


_ANNC_HOOK = ("ANNC trains the model, so it needs training data: pass --train MODULE:FUNCTION, "
              "a function called as FUNCTION(CHECKPOINT) that returns a dict with 'model' "
              "(an nn.Module holding the checkpoint's weights), 'train_loader' and optionally "
              "'eval_loader' (e.g. --train opq_torch.demo:digits_task for 'opq demo "
              "--save-dense' checkpoints)")


def _check_no_annc_args(args):
    for flag, dest in (("--train", "train"), ("--epochs-admm", "epochs_admm"),
                       ("--epochs-finetune", "epochs_finetune"), ("--lr", "lr"),
                       ("--threads", "threads")):
        if getattr(args, dest, None) is not None:
            raise CliError(f"{flag}: only for --method annc (got --method {args.method})")


def _training_hook(spec: str):
    """Import ``MODULE:FUNCTION`` (the current folder is searched too)."""
    import importlib
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise CliError(f"--train: expected MODULE:FUNCTION (e.g. opq_torch.demo:digits_task), "
                       f"got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CliError(f"--train: cannot import module {module!r} ({exc})") from None
    fn = mod
    for part in func.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise CliError(f"--train: module {module!r} has no {func!r}")
    if not callable(fn):
        raise CliError(f"--train: {spec!r} is not callable")
    return fn


def _compress_annc(args, meta):
    """``opq compress --method annc``: the training hook, compress_annc, opq_torch.save."""
    if args.sparsity is not None:
        raise CliError(f"--sparsity: ANNC chooses every layer's sparsity itself under a size "
                       f"budget; give --rate or --budget-bits instead (got --sparsity "
                       f"{args.sparsity:g})")
    if args.bits is not None:
        raise CliError(f"--bits: ANNC chooses every layer's bit-width (1..8) itself; give "
                       f"--rate or --budget-bits instead (got --bits {args.bits})")
    if args.train is None:
        raise CliError(_ANNC_HOOK)
    if args.rate is None and args.budget_bits is None:
        raise CliError("--rate: ANNC needs a size budget: give --rate R (target paper_rate) "
                       "or --budget-bits S")
    if args.rate is not None and args.budget_bits is not None:
        raise CliError(f"--budget-bits: give --rate or --budget-bits, not both (got --rate "
                       f"{args.rate:g} and --budget-bits {args.budget_bits:g})")
    for flag, v in (("--epochs-admm", args.epochs_admm),
                    ("--epochs-finetune", args.epochs_finetune)):
        if v is not None and v < 0:
            raise CliError(f"{flag}: expected an integer >= 0, got {v}")
    if args.lr is not None and not args.lr > 0:
        raise CliError(f"--lr: expected a number > 0, got {args.lr:g}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads: expected an integer >= 1, got {args.threads}")
    if not os.path.exists(args.checkpoint):
        raise CliError(f"CHECKPOINT: no such file {args.checkpoint!r}")
    hook = _training_hook(args.train)
    try:
        import torch
        from opq_torch.io import save
    except ImportError as exc:
        raise CliError(f"--method annc needs PyTorch ({exc}); pip install 'opq[torch]'") from None
    task = hook(args.checkpoint)
    if not isinstance(task, Mapping) or "model" not in task or "train_loader" not in task:
        got = sorted(task) if isinstance(task, Mapping) else type(task).__name__
        raise CliError(f"--train: {args.train!r} must return a dict with 'model' and "
                       f"'train_loader' (and optionally 'eval_loader'), got {got}")
    model = task["model"]
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--train: {args.train!r} returned model of type "
                       f"{type(model).__name__}, expected a torch.nn.Module")
    eval_loader = task.get("eval_loader")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        res, acc = _run_annc(args, model, task["train_loader"], eval_loader)
    finally:
        torch.set_num_threads(threads)
    meta = dict(meta, method="annc", budget_bits=str(int(res.plan.budget_bits)))
    f = save(model, args.output, layout=args.layout, metadata=meta, progress=_progress())
    return f, acc


def _run_annc(args, model, train_loader, eval_loader):
    from opq_torch.annc import compress_annc
    from opq_torch.finetune import evaluate
    kw = {}
    if args.epochs_admm is not None:
        kw["epochs_admm"] = args.epochs_admm
    if args.epochs_finetune is not None:
        kw["epochs_finetune"] = args.epochs_finetune
    if args.lr is not None:
        kw["lr"] = args.lr
    res = compress_annc(model, train_loader, rate=args.rate,
                        budget_bits=args.budget_bits, eval_loader=eval_loader,
                        exclude=tuple(args.exclude or ()), progress=_progress(), **kw)
    acc = None
    if eval_loader is not None:
        acc = evaluate(model, eval_loader)
    return res, acc


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
    if args.method == "annc" and args.sparsity is not None:
        raise CliError(f"--sparsity: ANNC chooses every layer's sparsity itself under a size "
                       f"budget; give --rate instead (got --sparsity {args.sparsity:g})")
    if args.method == "annc" and args.bits is not None:
        raise CliError(f"--bits: ANNC chooses every layer's bit-width itself; give --rate "
                       f"instead (got --bits {args.bits})")
    if args.method != "annc" and args.admm_epochs is not None:
        raise CliError(f"--admm-epochs: only for --method annc (got --method {args.method})")
    if args.rate is not None and not args.rate > 1:
        raise CliError(f"--rate: expected a paper_rate > 1, got {args.rate:g}")
    if args.method == "opq" and args.rate is not None and args.sparsity is not None:
        raise CliError("--sparsity: give --sparsity or --rate, not both")
    res = run_demo(method=args.method, epochs=args.epochs,
                   finetune_epochs=args.finetune_epochs, admm_epochs=args.admm_epochs,
                   sparsity=args.sparsity, bits=args.bits, rate=args.rate, layout=args.layout,
                   output=args.output, save_dense=args.save_dense, quick=args.quick,
                   seed=args.seed, progress=not args.json and _progress(),
                   verbose=not args.json)
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
  opq demo --method annc --rate 80                         # the same with ANNC (ADMM)
  opq demo --save-dense digits_cnn.pt                      # also keep the dense weights
  opq compress digits_cnn.pt -o annc.opq --method annc --rate 50 \\
      --train opq_torch.demo:digits_task                   # ANNC: train under a budget

ANNC (--method annc) trains, so 'opq compress' needs a training-data hook: --train
MODULE:FUNCTION, called as FUNCTION(CHECKPOINT), returns dict(model=, train_loader=,
eval_loader=) (see 'opq compress --help').

CHECKPOINT is a .pt/.pth/.bin state_dict, .safetensors, .npz or .onnx file, or
example:resnet50|alexnet|mobilenet_v1 (random Laplace weights of that shape).
Rates: paper_rate = 32 N / sum(bits * kept) (the papers' figure); storage_rate = float32
bytes of the compressed layers / their bytes in the .opq file (what the disk sees).
"""


_COMPRESS_EPILOG = """\
Examples:
  opq compress model.safetensors -o model.opq --sparsity 0.9 --bits 4
  opq compress digits_cnn.pt -o annc.opq --method annc --rate 50 \\
      --train opq_torch.demo:digits_task

--train MODULE:FUNCTION is imported (the current folder is searched too) and
called as FUNCTION(CHECKPOINT); it returns a dict with 'model' (an nn.Module
holding the checkpoint's weights), 'train_loader' and optionally 'eval_loader'
(evaluated after every epoch and at the end).
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
                                   "at a time. With --method annc: train under a size budget "
                                   "(ADMM, then fine-tuning with fixed masks and codebooks) on "
                                   "the data that --train MODULE:FUNCTION provides.",
                       epilog=_COMPRESS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("checkpoint", metavar="CHECKPOINT")
    c.add_argument("-o", "--output", required=True, metavar="OUT.opq", help="file to write")
    _add_plan_args(c)
    c.add_argument("--layout", default="entropy", choices=["entropy", "packed"],
                   help="entropy: smallest (ANS-coded codes and mask, default); packed: "
                        "bits per kept weight + bitmask/gap index, random access")
    a = c.add_argument_group("ANNC (--method annc)")
    a.add_argument("--train", metavar="MODULE:FUNCTION",
                   help="training-data hook, called as FUNCTION(CHECKPOINT) -> dict(model=, "
                        "train_loader=, eval_loader=)")
    a.add_argument("--epochs-admm", type=int, default=None, metavar="N",
                   help="ADMM epochs (default 5)")
    a.add_argument("--epochs-finetune", type=int, default=None, metavar="M",
                   help="fine-tuning epochs with fixed masks and codebooks (default 5)")
    a.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.01)")
    a.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads while training (default: torch's own; 1 is often "
                        "fastest for small models on a busy machine)")
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
                                   "held-out test split), compress it (OPQ plan, or ANNC "
                                   "training under a size budget), fine-tune, write demo.opq, "
                                   "reload it into a fresh model and compare accuracies and "
                                   "rates. Needs PyTorch and scikit-learn.")
    m.add_argument("--json", action="store_true",
                   help="print one JSON object (dense_accuracy, compressed_accuracy, "
                        "paper_rate, storage_rate, seconds, ...)")
    m.add_argument("--epochs", type=int, default=None, help="dense training epochs")
    m.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs")
    m.add_argument("--method", default="opq", choices=["opq", "annc"],
                   help="opq: one-shot plan + fine-tuning (default); annc: ADMM under a size "
                        "budget + fine-tuning")
    m.add_argument("--sparsity", type=float, default=None, help="OPQ: default 0.9")
    m.add_argument("--bits", type=int, default=None, help="OPQ: default 4")
    m.add_argument("--rate", type=float, default=None,
                   help="target paper_rate; ANNC: default 80 (= sparsity 0.9 at 4 bits); "
                        "OPQ: a size budget instead of --sparsity")
    m.add_argument("--admm-epochs", type=int, default=None, help="ANNC: ADMM epochs "
                                                                   "(default 5)")
    m.add_argument("--save-dense", metavar="FILE",
                   help="also save the dense trained weights (.pt, .safetensors or .npz), "
                        "e.g. for 'opq compress FILE --method annc --train "
                        "opq_torch.demo:digits_task'")
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
