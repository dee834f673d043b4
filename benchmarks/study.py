"""The study: one-shot allocation + fine-tuning vs the alternatives at equal size, on real data.

Data generated locally or shipped with the packages (scikit-learn's 8x8 digits, MNIST-1D);
models trained here from scratch (a CNN and a ResNet-style CNN with batch norm for digits, a
1-D CNN for MNIST-1D). Every method compresses the same trained models to the same
``paper_rate`` targets; each is evaluated right after compression (post-training) and after
the same fine-tuning budget in epochs. Per cell: test accuracy (mean +- std over seeds),
paper_rate, storage_rate of the written ``.opq`` file, allocation time, fine-tuning time.

Ablations: unified channel-wise vs layer-wise scales vs per-channel steps (emulated: one
pseudo-layer per output channel); offset vs symmetric grid; the fixed bit-width (2, 3, 4) at
the same rate; predicted vs measured per-layer error on the trained models.

    python benchmarks/study.py [--quick] [--seed 0] [--out benchmarks/results]
    python benchmarks/study.py --from-json benchmarks/results/study.json   # re-render only

Writes ``<name>.json``, ``<name>.md``, ``<name>_accuracy.png`` and ``<name>_error.png`` into
``--out`` (``name`` is ``study``, or ``study_quick`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_methods as sm  # noqa: E402
import study_report as sr  # noqa: E402
from _common import machine  # noqa: E402


@dataclass(frozen=True)
class Config:
    """What the study runs. The defaults are the full study (< 30 min on 2 idle cores)."""

    name: str = "study"
    models: tuple = ("digits_cnn", "digits_resnet", "mnist1d_cnn")
    seeds: tuple = (0, 1, 2)
    rates: tuple = (20.0, 50.0, 100.0, 200.0)
    methods: tuple = tuple(sm.METHODS)
    bits: int = 4
    ft_epochs: int = 4
    ft_lr: float = 1e-3
    dense_epochs: float = 1.0           # multiple of each model's converging epoch count
    ablation_rates: tuple = (50.0, 100.0)
    ablations: bool = True
    threads: int = 1
    data_limit: int | None = None       # use only the first n training samples (tests)
    progress: bool = True

    @classmethod
    def quick(cls, seed: int = 0) -> "Config":
        return cls(name="study_quick", models=("digits_cnn",), seeds=(seed, seed + 1),
                   rates=(20.0, 100.0), ft_epochs=2, dense_epochs=1.0,
                   ablation_rates=(50.0,))


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------

def _limit(data, n):
    from opq_torch.demo import examples as ex
    if n is None:
        return data
    return ex.Data(data.name, data.x_train[:n], data.y_train[:n], data.x_test,
                   data.y_test, data.num_classes)


def _warm_up(bits):
    """Compile the JIT kernels once so allocation times exclude compilation."""
    rng = np.random.default_rng(0)
    w = {"a.weight": rng.laplace(size=(8, 4, 3, 3)).astype(np.float32),
         "b.weight": rng.laplace(size=(10, 32)).astype(np.float32)}
    t0 = time.perf_counter()
    for m in sm.METHODS:
        a = sm.allocate(m, w, 20.0, bits)
        sm.dequantized(a, w)
        sm.storage_rate(a.plan, w, a.masks, {})
    for grid in ("offset", "symmetric"):
        sm.allocate("opq", w, 20.0, bits, grid=grid, error_model="empirical").plan.apply(w)
    # the straight-through kernels of the torch adapter (offset, symmetric, codebook)
    import copy
    import torch
    import opq_torch
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(),
                              torch.nn.Linear(32, 10))
    wn = sm.weights_of(net)
    for method, kw in (("opq", {}), ("opq", {"grid": "symmetric"}), ("annc", {})):
        a = sm.allocate(method, wn, 20.0, bits, **kw)
        m = copy.deepcopy(net)
        opq_torch.compress(m, a.plan, masks=a.masks)
        m(torch.zeros(2, 4, 4, 4)).sum().backward()
    return time.perf_counter() - t0


def _dense(cfg, name, seed, data_cache):
    from opq_torch.demo import examples as ex
    spec = ex.MODELS[name]
    if spec.dataset not in data_cache:
        data_cache[spec.dataset] = _limit(ex.load_data(spec.dataset), cfg.data_limit)
    data = data_cache[spec.dataset]
    model = ex.make_model(name, seed=seed)
    train, test = ex.loaders(data, batch_size=spec.batch_size, seed=seed)
    epochs = max(1, int(round(spec.epochs * cfg.dense_epochs)))
    h = ex.train_dense(model, train, test, epochs=epochs, lr=spec.lr, seed=seed)
    return model, data, h


def _cell(cfg, method, model, data, rate, seed, dense_acc, weights, others):
    from opq_torch.demo import examples as ex
    row = {"method": method, "rate_target": rate, "seed": seed, "dense_acc": dense_acc}
    a = sm.allocate(method, weights, rate, cfg.bits)
    _, test = ex.loaders(data, seed=seed)
    row["alloc_s"] = a.seconds
    row["paper_rate"] = float(a.plan.paper_rate)
    row["acc_post"] = ex.evaluate(sm.with_weights(model, sm.dequantized(a, weights)), test)
    row["layer_sparsity"] = {lp.name: round(lp.sparsity, 5) for lp in a.plan.layers}
    row["layer_bits"] = {lp.name: int(lp.bits) for lp in a.plan.layers}
    st = sm.storage_rate(a.plan, weights, a.masks, others)
    row["storage_rate_post"] = st[0]
    if cfg.ft_epochs > 0:
        train, _ = ex.loaders(data, batch_size=_batch(data), seed=seed + 1000)
        t = sm.finetune(method, model, a, train, rate=rate, bits=cfg.bits,
                        epochs=cfg.ft_epochs, lr=cfg.ft_lr, seed=seed)
        row["ft_s"] = t.seconds
        row["acc_ft"] = ex.evaluate(t.model, test)
        st = sm.tuned_storage(t, others)
        row["storage_rate"], row["paper_rate_ft"], row["file_bytes"] = st
        row["ft_note"] = t.note
    else:
        row["storage_rate"] = row["storage_rate_post"]
    return row


def _batch(data):
    return 100 if data.name == "mnist1d" else 64


def _ablation_cells(cfg, model, data, rate, seed, weights):
    """Unified vs layer vs per-channel steps (post-training); offset vs symmetric grid and
    bit-widths 2 and 3 against the default (post-training and fine-tuned)."""
    from opq_torch.demo import examples as ex
    _, test = ex.loaders(data, seed=seed)
    rows = []

    def post(label, deq, secs, plan):
        acc = ex.evaluate(sm.with_weights(model, deq), test)
        err = sum(float(np.sum((weights[n].astype(np.float64) - deq[n]) ** 2)) for n in weights)
        rows.append({"variant": label, "rate_target": rate, "seed": seed, "acc_post": acc,
                     "weight_error": err, "alloc_s": secs,
                     "paper_rate": float(plan.paper_rate)})
        return rows[-1]

    for label, kw in (("unified (laplace)", {}), ("layer (laplace)", {"channelwise": "layer"}),
                      ("unified (empirical)", {"error_model": "empirical"}),
                      ("layer (empirical)", {"channelwise": "layer", "error_model": "empirical"})):
        a = sm.allocate("opq", weights, rate, cfg.bits, **kw)
        post(label, sm.dequantized(a, weights), a.seconds, a.plan)
    p, deq, secs = sm.per_channel_plan(weights, rate, cfg.bits)
    post("per-channel steps (empirical)", deq, secs, p)
    tuned = [(f"grid {grid}", {"grid": grid}, cfg.bits) for grid in ("offset", "symmetric")]
    tuned += [(f"bits {b}", {}, b) for b in (2, 3) if b != cfg.bits]
    for label, kw, bits in tuned:
        a = sm.allocate("opq", weights, rate, bits, **kw)
        r = post(label, sm.dequantized(a, weights), a.seconds, a.plan)
        if cfg.ft_epochs > 0:
            train, _ = ex.loaders(data, batch_size=_batch(data), seed=seed + 1000)
            t = sm.finetune_plan(model, a, train, epochs=cfg.ft_epochs, lr=cfg.ft_lr, seed=seed)
            r["acc_ft"] = ex.evaluate(t.model, test)
            r["ft_s"] = t.seconds
            r["storage_rate"] = sm.tuned_storage(t, sm.others_of(model, weights))[0]
    return rows


def run(cfg: Config) -> dict:
    """Run the study; return the JSON-able result (cells, aggregates, ablations)."""
    import numba
    import torch
    from opq_torch.demo import examples as ex

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    torch.set_num_threads(cfg.threads)
    try:
        numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # pragma: no cover - numba without threading layer
        pass
    compile_s = _warm_up(cfg.bits)
    data_cache = {}
    cells, ablations, errors, dense = [], [], [], []
    total = len(cfg.models) * len(cfg.seeds) * len(cfg.rates) * len(cfg.methods)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="study", unit="cell")
    for name in cfg.models:
        for seed in cfg.seeds:
            model, data, h = _dense(cfg, name, seed, data_cache)
            acc = ex.evaluate(model, ex.loaders(data, seed=seed)[1])
            dense.append({"model": name, "seed": seed, "acc": acc, "train_s": h.seconds,
                          "epochs": len(h.loss),
                          "weights": int(sum(w.size for w in sm.weights_of(model).values()))})
            weights = sm.weights_of(model)
            others = sm.others_of(model, weights)
            for rate in cfg.rates:
                for method in cfg.methods:
                    try:
                        row = _cell(cfg, method, model, data, rate, seed, acc, weights, others)
                    except Exception as exc:  # one failing method must not sink the study
                        row = {"method": method, "rate_target": rate, "seed": seed,
                               "error": f"{type(exc).__name__}: {exc}"}
                    row["model"] = name
                    cells.append(row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(model=name, seed=seed, rate=rate, method=method)
            if cfg.ablations:
                for rate in cfg.ablation_rates:
                    for r in _ablation_cells(cfg, model, data, rate, seed, weights):
                        r["model"] = name
                        ablations.append(r)
                # Fig. 3 analogue: predicted vs measured per-layer error (first seed only)
                if seed == cfg.seeds[0]:
                    for em_name in ("laplace", "empirical"):
                        for rate in cfg.ablation_rates:
                            a = sm.allocate("opq", weights, rate, cfg.bits, error_model=em_name)
                            for layer, d in sm.measured_errors(a.plan, weights).items():
                                errors.append(dict(d, model=name, layer=layer, rate_target=rate,
                                                   error_model=em_name))
    if bar is not None:
        bar.close()
    result = {
        "config": asdict(cfg),
        "machine": machine(),
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - cpu_start,
        "dense": dense,
        "cells": cells,
        "summary": summarize(cells),
        "ablations": ablations,
        "ablation_summary": summarize_ablations(ablations),
        "errors": errors,
        "annc_driver": sm.annc_driver() is not None,
    }
    return result


# ---------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------

def _ms(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _groups(rows, kind):
    """Rows grouped by (model, ``kind``, rate_target), in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r[kind], r["rate_target"]), []).append(r)
    return groups.items()


def _mean_std(s, rows, keys):
    """``s[key]``, ``s[key + "_std"]``: mean and std of ``row[key]`` over ``rows``."""
    for key in keys:
        s[key], s[key + "_std"] = _ms([r.get(key) for r in rows])


def summarize(cells) -> list:
    """One row per (model, method, rate): mean and std over seeds of every figure."""
    out = []
    for (model, method, rate), rows in _groups(cells, "method"):
        ok = [r for r in rows if "error" not in r]
        s = {"model": model, "method": method, "rate_target": rate, "seeds": len(ok),
             "failed": len(rows) - len(ok)}
        if not ok:
            s["error"] = rows[0].get("error")
            out.append(s)
            continue
        _mean_std(s, ok, ("acc_post", "acc_ft", "paper_rate", "storage_rate", "alloc_s", "ft_s",
                          "dense_acc"))
        notes = sorted({r.get("ft_note", "") for r in ok} - {""})
        if notes:
            s["ft_note"] = "; ".join(notes)
        out.append(s)
    return out


def summarize_ablations(rows) -> list:
    out = []
    for (model, variant, rate), rs in _groups(rows, "variant"):
        s = {"model": model, "variant": variant, "rate_target": rate, "seeds": len(rs)}
        _mean_std(s, rs, ("acc_post", "acc_ft", "weight_error", "paper_rate", "alloc_s",
                          "storage_rate"))
        out.append(s)
    return out


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def write(result: dict, out_dir: str) -> dict:
    """Write JSON, markdown and the plots; return ``{kind: path}``."""
    from opq_core.io import atomic_write
    name = result["config"]["name"]
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, name + ".json"),
             "md": os.path.join(out_dir, name + ".md"),
             "accuracy_png": os.path.join(out_dir, name + "_accuracy.png"),
             "error_png": os.path.join(out_dir, name + "_error.png")}
    text = json.dumps(result, indent=1, default=_json_default, allow_nan=False)
    _atomic_text(atomic_write, paths["json"], text)
    _atomic_text(atomic_write, paths["md"], sr.markdown(result))
    sr.plot_accuracy(result, paths["accuracy_png"])
    if result["errors"]:
        sr.plot_errors(result, paths["error_png"])
    else:
        paths.pop("error_png")
    return paths


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def _atomic_text(atomic_write, path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _clean(o):
    """Replace non-finite floats (JSON has none) by None, recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size (< 3 min)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (seeds are consecutive)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs")
    ap.add_argument("--models", default=None, help="comma-separated model names")
    ap.add_argument("--methods", default=None, help="comma-separated method names")
    ap.add_argument("--rates", default=None, help="comma-separated paper_rate targets")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="rewrite the markdown and the plots from a result file, run nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        paths = write(result, args.out)
        print(json.dumps({"files": paths}, indent=1))
        return result
    cfg = Config.quick(args.seed) if args.quick else Config()
    n_seeds = args.seeds if args.seeds is not None else len(cfg.seeds)
    cfg = replace(cfg, seeds=tuple(range(args.seed, args.seed + n_seeds)),
                  progress=not args.no_progress)
    if args.epochs is not None:
        cfg = replace(cfg, ft_epochs=args.epochs)
    if args.models:
        cfg = replace(cfg, models=tuple(args.models.split(",")))
    if args.methods:
        bad = [m for m in args.methods.split(",") if m not in sm.METHODS]
        if bad:
            ap.error(f"--methods: unknown {bad}; choose from {list(sm.METHODS)}")
        cfg = replace(cfg, methods=tuple(args.methods.split(",")))
    if args.rates:
        cfg = replace(cfg, rates=tuple(float(r) for r in args.rates.split(",")))
    if args.no_ablations:
        cfg = replace(cfg, ablations=False)
    result = _clean(run(cfg))
    paths = write(result, args.out)
    print(sr.markdown(result))
    print(json.dumps({"wall_s": result["wall_s"], "files": paths}, indent=1))
    return result


if __name__ == "__main__":
    main()
