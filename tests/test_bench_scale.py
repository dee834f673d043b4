"""Smoke run of benchmarks/bench_scale.py --quick (slow: every step is its own process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_scale_quick(tmp_path):
    out = tmp_path / "scale.json"
    # compiled kernels cached on disk: the steps after the first reuse them
    env = dict(os.environ, PYTHONPATH=ROOT, OPQ_NUMBA_CACHE="1",
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_scale.py"),
                    "--quick", "--json", str(out)], check=True, env=env, capture_output=True)
    d = json.loads(out.read_text())
    steps = [r["step"] for r in d["rows"]]
    assert steps[0] == "read (baseline)" and "inspect --verify" in steps
    assert all(r["wall_s"] > 0 and r["peak_rss_MB"] > 0 for r in d["rows"])
    # decompress writes bfloat16 back: the dense output is the input's size
    assert d["decompressed_over_input"] == pytest.approx(1.0, abs=0.02)
