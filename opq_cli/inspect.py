"""``opq inspect``: sizes and rates of a .opq file."""
from __future__ import annotations


from ._common import _check_paths, _check_plot, _dumps, _progress


def cmd_inspect(args):
    from opq_core.format import read_opq
    _check_paths([("--plot", args.plot)], [("FILE.opq", args.file)])
    _check_plot(args.plot)
    f = read_opq(args.file, decode=args.verify, progress=_progress() and args.verify)
    if args.json:
        d = f.to_dict()
        d["plan"] = f.plan.to_dict()
        d["verified"] = bool(args.verify)
        print(_dumps(d))
    else:
        print(f.table())
        if args.verify:
            print("verified: every layer decodes")
    if args.plot:
        from opq_core.plot import plot_file
        plot_file(f, args.plot)
    return 0
