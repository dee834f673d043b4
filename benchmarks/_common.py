"""Shared helpers of the benchmarks: timing, JSON + markdown output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time


def timeit(fn, *, repeat=5, warmup=1, best=False):
    """Wall time of ``fn()`` over ``repeat`` runs after ``warmup`` runs: the median, or with
    ``best=True`` the smallest (on a shared machine other processes only ever add time, so
    the minimum is the least noisy estimate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def machine():
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count()}


def markdown_table(rows, columns):
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    out = [head, sep]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def emit(name, result, rows, columns, json_path=None):
    """Print JSON and a markdown table; also write JSON when ``json_path`` is given."""
    result = dict(result, machine=machine())
    text = json.dumps(result, indent=1, default=float)
    print(text)
    print()
    print(f"### {name}")
    print()
    print(markdown_table(rows, columns))
    if json_path:
        with open(json_path, "w") as f:
            f.write(text)


def write_report(out_dir, stem, result, md):
    """Print ``result`` as JSON and the markdown ``md``; write both, atomically, as
    ``out_dir/stem.json`` and ``out_dir/stem.md``."""
    from opq_core.io import atomic_write

    text = json.dumps(result, indent=1, default=float)
    print(text)
    print()
    print(md)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, f"{stem}.json"), lambda f: f.write(text), mode="w")
    atomic_write(os.path.join(out_dir, f"{stem}.md"), lambda f: f.write(md), mode="w")
