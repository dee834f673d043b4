"""``opq plan``: compute and print a compression plan."""
from __future__ import annotations

from ._common import _make_plan, _weights_from


def cmd_plan(args):
    weights = _weights_from(args.checkpoint)
    p = _make_plan(args, weights)
    if args.output:
        from opq_core.io import atomic_write
        data = p.to_json(indent=1).encode()
        atomic_write(args.output, lambda f: f.write(data))
    if args.json:
        print(p.to_json())
    else:
        print(p.table())
    if args.plot:
        from opq_core.plot import plot_plan
        plot_plan(p, args.plot)
    return 0 if p.success else 1
