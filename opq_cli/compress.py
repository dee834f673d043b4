"""``opq compress``: plan and write a .opq file (or train under a budget with ANNC)."""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from ._common import (CliError, _check_paths, _check_plot, _dumps, _make_plan,
                      _progress, _weights_from, source_metadata)


def cmd_compress(args):
    from opq_core.format import LAYOUTS, write_opq
    if not args.output.endswith(".opq"):
        raise CliError(f"-o/--output: expected a .opq file name, got {args.output!r}")
    if args.layout not in LAYOUTS:  # pragma: no cover - argparse checks choices
        raise CliError(f"--layout: expected one of {LAYOUTS}, got {args.layout!r}")
    _check_paths([("-o/--output", args.output), ("--plot", args.plot)],
                 [("CHECKPOINT", args.checkpoint)])
    _check_plot(args.plot)
    meta = {"source": os.path.basename(os.path.normpath(args.checkpoint))}
    p_size = None
    if args.method == "annc" and getattr(args, "size", None) is not None:
        raise CliError("--size: --method annc trains under a budget in bits; give --rate or "
                       "--budget-bits")
    if args.method == "annc":
        f, acc = _compress_annc(args, meta)
    else:
        _check_no_annc_args(args)
        weights = _weights_from(args.checkpoint)
        meta.update(source_metadata(weights))
        p = _make_plan(args, weights, meta)
        if not p.success:
            raise CliError(f"planning failed: {p.message}")
        from opq_core._size import Subset
        other = Subset(weights, [k for k in weights if k not in p])
        f = write_opq(args.output, p, weights, other=other, layout=args.layout, metadata=meta,
                      progress=_progress(args))
        acc = None
        if p.budget_bytes is not None:
            p_size = p
            if f.file_bytes != p.predicted_bytes:  # pragma: no cover - the writer's own code
                print(f"warning: the file has {f.file_bytes} bytes, {p.predicted_bytes} were "
                      "predicted", file=sys.stderr)
    if args.json:
        d = f.to_dict()
        if p_size is not None:
            d["size"] = {"budget_bytes": p_size.budget_bytes,
                         "predicted_bytes": p_size.predicted_bytes, "written_bytes": f.file_bytes}
        print(_dumps(d))
    else:
        print(f.table())
        if p_size is not None:
            print(f"size: {p_size.predicted_bytes} bytes predicted, {f.file_bytes} bytes "
                  f"written, budget {p_size.budget_bytes} bytes "
                  f"({100 * f.file_bytes / p_size.budget_bytes:.2f} % of it)")
        if acc is not None:
            print(f"eval accuracy of the compressed model: {100 * acc:.2f} %")
        print(f"wrote {args.output}")
    if args.plot:
        from opq_core.plot import plot_file
        plot_file(f, args.plot)
    return 0


_ANNC_HOOK = ("ANNC trains the model, so it needs training data: pass --train MODULE:FUNCTION, "
              "a function called as FUNCTION(CHECKPOINT) that returns a dict with 'model' "
              "(an nn.Module holding the checkpoint's weights), 'train_loader' and optionally "
              "'eval_loader' (e.g. --train opq_torch.demo:digits_task for 'opq demo "
              "--save-dense' checkpoints)")


def _check_no_annc_args(args):
    for flag, dest in (("--train", "train"), ("--train-path", "train_path"),
                       ("--epochs-admm", "epochs_admm"),
                       ("--epochs-finetune", "epochs_finetune"), ("--lr", "lr"),
                       ("--threads", "threads")):
        if getattr(args, dest, None) is not None:
            raise CliError(f"{flag}: only for --method annc (got --method {args.method})")


def _training_hook(spec: str, train_path=None):
    """Import ``MODULE:FUNCTION`` as named: the current folder is not searched (a
    ``torch.py`` lying there must not shadow torch); ``train_path`` (``--train-path
    DIR``) is put first on the import path when the user's module lives there."""
    import importlib
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise CliError(f"--train: expected MODULE:FUNCTION (e.g. opq_torch.demo:digits_task), "
                       f"got {spec!r}")
    _drop_cwd_from_path()
    if train_path is not None:
        if not os.path.isdir(train_path):
            raise CliError(f"--train-path: {train_path!r} is not a folder")
        sys.path.insert(0, os.path.abspath(train_path))
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        hint = ("" if train_path is not None else
                "; for a module in a local folder give --train-path DIR")
        raise CliError(f"--train: cannot import module {module!r} ({exc}){hint}") from None
    fn = mod
    for part in func.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise CliError(f"--train: module {module!r} has no {func!r}")
    if not callable(fn):
        raise CliError(f"--train: {spec!r} is not callable")
    return fn


def _drop_cwd_from_path():
    """Remove the current folder ('' or its path, which ``python -m`` adds) from the
    import path, unless opq itself was loaded from it."""
    here = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if home == here:
        return
    sys.path[:] = [p for p in sys.path
                   if not (p in ("", ".") or os.path.realpath(p) == here)]


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
    hook = _training_hook(args.train, args.train_path)
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
    f = save(model, args.output, layout=args.layout, metadata=meta, progress=_progress(args))
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
                        exclude=tuple(args.exclude or ()), progress=_progress(args), **kw)
    acc = None
    if eval_loader is not None:
        acc = evaluate(model, eval_loader)
    return res, acc
