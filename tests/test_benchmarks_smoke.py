"""Smoke runs of every benchmark's ``--quick`` mode: each runs to the end in a subprocess and
writes its JSON and markdown into a temporary folder (never over the committed results)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytest.importorskip("torch")

CASES = {
    "bench_allocate": lambda out: ["--quick", "--json", str(out / "bench_allocate.json")],
    "bench_annc": lambda out: ["--quick", "--out", str(out)],
    "bench_format": lambda out: ["--quick", "--no-rss", "--out", str(out)],
    "bench_kernels": lambda out: ["--quick", "--repeat", "1", "--out", str(out)],
    "bench_train": lambda out: ["--quick", "--rounds", "1", "--out", str(out)],
}


#: Each of these compiles most kernels again in a fresh process (30-50 s on 2 cores): run
#: them with ``-m slow``; the other two run in every suite.
SLOW = {"bench_annc", "bench_kernels", "bench_train"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(CASES)])
def test_benchmark_quick_mode_runs(name, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    before = {p.name: p.stat().st_mtime_ns for p in (BENCH / "results").iterdir()}
    r = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *CASES[name](tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written, f"{name} wrote no JSON into {tmp_path}"
    for p in tmp_path.glob("*.json"):
        json.loads(p.read_text())
    after = {p.name: p.stat().st_mtime_ns for p in (BENCH / "results").iterdir()}
    assert after == before, "a --quick run changed the committed results"
