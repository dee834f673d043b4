"""Helpers of ``benchmarks/bench_quality.py``: models, evaluation tasks, compression methods,
byte accounting and the report (see that script's docstring)."""
