"""The ``opq`` command line: the parser and the entry point."""
from __future__ import annotations

import argparse
import signal
import sys

from ._common import CliError, _add_plan_args
from .compress import cmd_compress
from .decompress import cmd_decompress
from .demo import cmd_demo
from .export import cmd_export
from .inspect import cmd_inspect
from .plan import cmd_plan

__all__ = ["main", "build_parser"]


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
  opq export model.opq -o model.onnx --template dense.onnx # ONNX, weights kept compressed
  opq demo                                                 # train, compress, reload (~10 s)
  opq demo --method annc --rate 80                         # the same with ANNC (ADMM)
  opq demo --save-dense digits_cnn.pt                      # also keep the dense weights
  opq compress digits_cnn.pt -o annc.opq --method annc --rate 50 \\
      --train opq_torch.demo:digits_task                   # ANNC: train under a budget

ANNC (--method annc) trains, so 'opq compress' needs a training-data hook: --train
MODULE:FUNCTION, called as FUNCTION(CHECKPOINT), returns dict(model=, train_loader=,
eval_loader=) (see 'opq compress --help').

CHECKPOINT is a .pt/.pth/.bin state_dict, .safetensors, .npz or .onnx file, a model
folder (model.safetensors, model.safetensors.index.json shards or pytorch_model.bin, read
as one model), or example:resnet50|alexnet|mobilenet_v1 (random Laplace weights of that
shape). Every floating tensor with ndim >= 2 is compressed (integer tensors are kept).
Rates: paper_rate = 32 N / sum(bits * kept) (the papers' figure); storage_rate = float32
bytes of the compressed layers / their bytes in the .opq file (what the disk sees).
"""


_COMPRESS_EPILOG = """\
Examples:
  opq compress model.safetensors -o model.opq --sparsity 0.9 --bits 4
  opq compress digits_cnn.pt -o annc.opq --method annc --rate 50 \\
      --train opq_torch.demo:digits_task

--train MODULE:FUNCTION is imported as named (the current folder is not searched;
give --train-path DIR for a module in a local folder) and called as
FUNCTION(CHECKPOINT); it returns a dict with 'model' (an nn.Module
holding the checkpoint's weights), 'train_loader' and optionally 'eval_loader'
(evaluated after every epoch and at the end).
"""


#: Per subcommand: its one-line help and its description (re-flowed to one paragraph).
_COMMANDS = {
    "plan": ("compute and print a compression plan", """\
    Plan per-layer sparsity, bits and quantizer steps of every conv/linear weight of
    CHECKPOINT (.pt/.pth, .safetensors, .npz, .onnx, or
    example:resnet50|alexnet|mobilenet_v1)."""),
    "compress": ("prune + quantize a checkpoint into a .opq file", """\
    Post-training, data-free: plan CHECKPOINT (as 'opq plan') and write the compressed
    weights, with every other tensor (biases, norms) as it was, to OUT.opq. Tensors are
    read one at a time. With --method annc: train under a size budget (ADMM, then
    fine-tuning with fixed masks and codebooks) on the data that --train MODULE:FUNCTION
    provides."""),
    "inspect": ("sizes and rates of a .opq file", """\
    Check a .opq file (format version, checksum) and print per layer: shape, bits,
    sparsity, mask coding, bytes, paper_rate and storage_rate."""),
    "decompress": ("write the dense weights of a .opq file", """\
    Decode FILE.opq to dense weights (bit for bit the plan's fake-quant weights) plus
    the other tensors, as .npz, .safetensors, .pt or .onnx (by the extension of -o)."""),
    "export": ("an ONNX model whose compressed weights stay compressed", """\
    Replace the compressed layers' float initializers of the dense ONNX model --template
    (initializers named as the .opq layers) by their codes, bitmask and a decode
    subgraph; other tensors are taken from FILE.opq."""),
    "demo": ("train, compress and reload a small CNN (about 10 s)", """\
    Train a small CNN on scikit-learn's digits (fixed seed, held-out test split),
    compress it (OPQ plan, or ANNC training under a size budget), fine-tune, write
    demo.opq, reload it into a fresh model and compare accuracies and rates. Needs
    PyTorch and scikit-learn."""),
}


def _command(sub, name, func, **kw):
    """Add the subcommand ``name`` (help and description from ``_COMMANDS``) run by ``func``."""
    help_, description = _COMMANDS[name]
    p = sub.add_parser(name, help=help_, description=" ".join(description.split()), **kw)
    p.set_defaults(func=func)
    return p


def _add_plot_arg(p):
    p.add_argument("--plot", metavar="FILE.png", help="per-layer chart, .png, .pdf or .svg by "
                                                      "the extension (needs matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="opq",
        description="One-shot pruning + quantization of neural networks: per-layer sparsity "
                    "and bits chosen from the weights alone, stored in a .opq file that is "
                    "really that small.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = _command(sub, "plan", cmd_plan)
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    _add_plan_args(p)
    p.add_argument("--layout", default="entropy", choices=["entropy", "packed"],
                   help="the .opq layout --size counts (as 'opq compress --layout')")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("-o", "--output", help="also write the plan as JSON to this file")
    _add_plot_arg(p)

    c = _command(sub, "compress", cmd_compress, epilog=_COMPRESS_EPILOG,
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
    a.add_argument("--train-path", metavar="DIR",
                   help="folder put first on the import path for --train (default: none; "
                        "the current folder is not searched)")
    a.add_argument("--epochs-admm", type=int, default=None, metavar="N",
                   help="ADMM epochs (default 5)")
    a.add_argument("--epochs-finetune", type=int, default=None, metavar="M",
                   help="fine-tuning epochs with fixed masks and codebooks (default 5)")
    a.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.01)")
    a.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads while training (default: torch's own; 1 is often "
                        "fastest for small models on a busy machine)")
    c.add_argument("--json", action="store_true", help="print the file's accounting as JSON")
    _add_plot_arg(c)

    i = _command(sub, "inspect", cmd_inspect)
    i.add_argument("file", metavar="FILE.opq")
    i.add_argument("--json", action="store_true", help="print as JSON (with the plan)")
    i.add_argument("--verify", action="store_true", help="also decode every layer")
    _add_plot_arg(i)
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    d = _command(sub, "decompress", cmd_decompress)
    d.add_argument("file", metavar="FILE.opq")
    d.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="OUT.npz, OUT.safetensors, OUT.pt or OUT.onnx")
    d.add_argument("--template", metavar="MODEL.onnx",
                   help="for .onnx output: the original model whose initializers are replaced")
    d.add_argument("--max-shard-size", metavar="SIZE",
                   help="for .safetensors output: shards of at most SIZE (e.g. 2GB) named "
                        "OUT-00001-of-0000N.safetensors plus OUT.safetensors.index.json")
    d.add_argument("--json", action="store_true", help="print a JSON summary")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    e = _command(sub, "export", cmd_export)
    e.add_argument("file", metavar="FILE.opq")
    e.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    e.add_argument("--template", required=True, metavar="DENSE.onnx",
                   help="the dense model exported to ONNX (e.g. torch.onnx.export with "
                        "do_constant_folding=False)")
    e.add_argument("--prefer", default="small", choices=["small", "qdq"],
                   help="small: each layer's smallest form; qdq: symmetric layers as int "
                        "initializers + DequantizeLinear")
    e.add_argument("--json", action="store_true", help="print a JSON summary")

    m = _command(sub, "demo", cmd_demo)
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
    return ap


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every temporary file is removed."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    """Run ``opq``; user errors print one line and return 2, Ctrl-C returns 130, SIGTERM
    143 (temporary files removed in both cases)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # pragma: no cover - not the main thread
        pass
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"opq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opq {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"opq {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except MemoryError:
        print(f"opq {args.command}: error: out of memory", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, KeyError, IndexError, ImportError,
            OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:
            msg = f"{type(exc).__name__}: {exc.args[0]!r}"
        print(f"opq {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
