"""``opq plan``: compute and print a compression plan."""
from __future__ import annotations

from ._common import _check_paths, _check_plot, _dumps, _make_plan, _weights_from


def plan_json(p, **kw) -> str:
    """The plan as strict JSON (what ``opq plan --json`` prints and ``-o`` writes)."""
    return _dumps(p.to_dict(), **kw)


def cmd_plan(args):
    _check_paths([("-o/--output", args.output), ("--plot", args.plot)],
                 [("CHECKPOINT", args.checkpoint)])
    _check_plot(args.plot)
    weights = _weights_from(args.checkpoint)
    meta = None
    if args.size is not None:  # the file 'opq compress' would write: its metadata counts
        import os
        from ._common import source_metadata
        meta = {"source": os.path.basename(os.path.normpath(args.checkpoint))}
        meta.update(source_metadata(weights))
    p = _make_plan(args, weights, meta)
    if args.output:
        from opq_core.io import atomic_write
        data = plan_json(p, indent=1).encode()
        atomic_write(args.output, lambda f: f.write(data))
    if args.json:
        print(plan_json(p))
    else:
        print(p.table())
    if args.plot:
        from opq_core.plot import plot_plan
        plot_plan(p, args.plot)
    return 0 if p.success else 1
