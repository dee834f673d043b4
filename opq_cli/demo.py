"""``opq demo``: train, compress and reload a small CNN."""
from __future__ import annotations


from ._common import CliError, _check_paths, _dumps, _progress


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
    _check_paths([("-o/--output", args.output), ("--save-dense", args.save_dense)], [],
                 folders=False)  # run_demo checks the folders and extensions itself
    res = run_demo(method=args.method, epochs=args.epochs,
                   finetune_epochs=args.finetune_epochs, admm_epochs=args.admm_epochs,
                   sparsity=args.sparsity, bits=args.bits, rate=args.rate, layout=args.layout,
                   output=args.output, save_dense=args.save_dense, quick=args.quick,
                   seed=args.seed, progress=not args.json and _progress(args),
                   verbose=not args.json)
    if args.json:
        print(_dumps(res))
    return 0
