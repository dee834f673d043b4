r"""Matched-size comparison, markdown tables and the figure of the quality benchmark.

Curves
    Every point belongs to a *curve* (one method with all settings fixed but the one that
    moves the size: the sparsity, the target rate, or the bit-width). A curve's metric at a
    storage rate :math:`R` is the linear interpolation of the metric in :math:`\log R`
    between its two neighbouring points; outside the curve's measured range it is undefined
    (no extrapolation).

Matched sizes
    At the storage rate of every opq point, the best baseline is the best interpolated value
    over all baseline curves whose range covers that rate, and, without interpolation, the
    best baseline point that is no larger than the opq point (storage rate >= opq's).
    Headline: at target storage rates (8x, 16x, 32x, 64x) every curve is interpolated, opq's
    size-budget mode, opq's best fixed-bit curve and the best baseline curve are compared.
"""
from __future__ import annotations

import json
import math

#: tolerance under which two metrics are a tie
TIE = 1e-9


def curves(points, family=None):
    out = {}
    for p in points:
        if family is None or p["family"] == family:
            out.setdefault(p["curve"], []).append(p)
    return {k: sorted(v, key=lambda p: p["storage_rate"]) for k, v in out.items()}


def interpolate(curve, rate, metric):
    """The curve's ``metric`` at storage rate ``rate`` (log-linear), or None out of range."""
    xs = [math.log(p["storage_rate"]) for p in curve]
    ys = [p["metrics"][metric] for p in curve]
    x = math.log(rate)
    if not xs or x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return None
    for i in range(len(xs) - 1):
        if xs[i] - 1e-12 <= x <= xs[i + 1] + 1e-12:
            if xs[i + 1] - xs[i] < 1e-12:
                return max(ys[i], ys[i + 1])
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return ys[i] + t * (ys[i + 1] - ys[i])
    return ys[0]


def _better(a, b, higher):
    return a > b if higher else a < b


def best_interpolated(points, family, rate, metric, higher):
    best = None
    for name, c in curves(points, family).items():
        v = interpolate(c, rate, metric)
        if v is not None and (best is None or _better(v, best[0], higher)):
            best = (v, name)
    return best


def verdict(ours, theirs, higher):
    if theirs is None:
        return "no baseline at this size"
    if abs(ours - theirs) <= TIE:
        return "tie"
    return "opq wins" if _better(ours, theirs, higher) else "opq loses"


def matched(points, metrics):
    """One row per opq point: the best baseline at its size, for every ``(metric, higher)``."""
    rows = []
    base = [p for p in points if p["family"] == "baseline"]
    for p in sorted((p for p in points if p["family"] == "opq"),
                    key=lambda p: (p["curve"], p["storage_rate"])):
        row = {"method": p["label"], "storage_rate": p["storage_rate"],
               "bits_per_weight": p["bits_per_weight"]}
        for metric, higher in metrics:
            ours = p["metrics"][metric]
            bi = best_interpolated(points, "baseline", p["storage_rate"], metric, higher)
            real = [q for q in base if q["storage_rate"] >= p["storage_rate"]]
            br = None
            for q in real:
                if br is None or _better(q["metrics"][metric], br["metrics"][metric], higher):
                    br = q
            row[metric] = ours
            row[f"{metric}_baseline"] = None if bi is None else bi[0]
            row[f"{metric}_baseline_curve"] = None if bi is None else bi[1]
            row[f"{metric}_verdict"] = verdict(ours, None if bi is None else bi[0], higher)
            row[f"{metric}_baseline_point"] = None if br is None else br["metrics"][metric]
            row[f"{metric}_baseline_point_label"] = None if br is None else br["label"]
            row[f"{metric}_baseline_point_rate"] = None if br is None else br["storage_rate"]
            row[f"{metric}_point_verdict"] = verdict(
                ours, None if br is None else br["metrics"][metric], higher)
        rows.append(row)
    return rows


#: the size-budget curve of the calibrated opq variant
CALIBRATED = "opq calibrated size budget"


def _curve_at(points, name, t, metric):
    c = [p for p in points if p["curve"] == name]
    return interpolate(sorted(c, key=lambda p: p["storage_rate"]), t, metric) if c else None


def headline(points, metric, higher, targets=(8.0, 16.0, 32.0, 64.0)):
    rows = []
    for t in targets:
        rm = _curve_at(points, "opq size budget", t, metric)
        cal = _curve_at(points, CALIBRATED, t, metric)
        fixed = best_interpolated([p for p in points if p["family"] == "opq"
                                   and not p["curve"].endswith("size budget")], "opq", t,
                                  metric, higher)
        bi = best_interpolated(points, "baseline", t, metric, higher)
        b = None if bi is None else bi[0]
        rows.append({"storage_rate": t, "opq_size_budget": rm,
                     "opq_calibrated": cal,
                     "opq_fixed_bits": None if fixed is None else fixed[0],
                     "opq_fixed_bits_curve": None if fixed is None else fixed[1],
                     "baseline": b,
                     "baseline_curve": None if bi is None else bi[1],
                     "verdict_size_budget": (verdict(rm, b, higher)
                                             if rm is not None else "opq out of range"),
                     "verdict_calibrated": (verdict(cal, b, higher)
                                            if cal is not None else "opq out of range")})
    return rows


def calibration_pairs(points, metrics):
    """One row per calibrated opq point: the data-free point of the same settings (the same
    plan), both at their own measured bytes."""
    free = {(p["curve"], json.dumps(p["settings"], sort_keys=True)): p for p in points
            if p["family"] == "opq" and p["curve"].startswith("opq ")
            and not p["curve"].startswith("opq calibrated")}
    rows = []
    for p in points:
        if not p["curve"].startswith("opq calibrated"):
            continue
        st = {k: v for k, v in p["settings"].items() if k not in ("calibration", "compensate")}
        q = free.get(("opq" + p["curve"][len("opq calibrated"):],
                      json.dumps(st, sort_keys=True)))
        if q is None:
            continue
        row = {"settings": p["label"][len("opq calibrated "):],
               "rate_free": q["storage_rate"], "rate_calibrated": p["storage_rate"],
               "seconds_free": q["seconds"], "seconds_calibrated": p["seconds"]}
        for m, higher in metrics:
            a, b = q["metrics"][m], p["metrics"][m]
            row[m + "_free"], row[m + "_calibrated"] = a, b
            row[m + "_gain"] = (b - a) if higher else (a - b)
        rows.append(row)
    return sorted(rows, key=lambda r: r["rate_free"])


def _f(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table(rows, columns):
    out = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_f(fn(r)) for _, fn in columns) + " |")
    return "\n".join(out)


def model_markdown(name, res):
    lines = [f"## {name}", ""]
    if res.get("skipped"):
        return lines + [f"Skipped: {res['skipped']}", ""]
    metric, others = res["metric"], res["secondary"]
    lines += [f"{res['description']}. Compressed: {res['n_weights']:,} weights in "
              f"{len(res['targets'])} layers ({res['targets_note']}). Primary metric: "
              f"{res['metric_label']}. Dense: " + ", ".join(
                  f"{k} {_f(v)}" for k, v in res["dense"].items()) + ".", ""]
    cols = [("method", lambda r: r["label"]), ("curve", lambda r: r["curve"]),
            ("sparsity", lambda r: r["sparsity"]),
            ("bits/weight", lambda r: r["bits_per_weight"]),
            ("storage rate", lambda r: r["storage_rate"]),
            (metric, lambda r: r["metrics"][metric])]
    cols += [(m, (lambda m: lambda r: r["metrics"][m])(m)) for m, _ in others]
    cols += [("s", lambda r: r["seconds"])]
    seen = {}
    for p in res["points"]:      # a point on two curves is listed once
        if p["label"] in seen:
            seen[p["label"]] = dict(seen[p["label"]],
                                    curve=seen[p["label"]]["curve"] + "; " + p["curve"])
        else:
            seen[p["label"]] = p
    pts = sorted(seen.values(), key=lambda p: (p["family"] != "opq", p["curve"],
                                               p["storage_rate"]))
    lines += [table(pts, cols), ""]
    lines += ["### Matched size: every opq point against the best baseline", "",
              "`baseline (interp.)`: best baseline curve interpolated at opq's storage rate "
              "(log-linear, no extrapolation); `best no larger`: the best measured baseline "
              "point with storage rate >= opq's.", ""]
    mcols = [("opq", lambda r: r["method"]), ("storage rate", lambda r: r["storage_rate"]),
             ("bits/weight", lambda r: r["bits_per_weight"])]
    for m, _ in [(metric, True)] + list(others):
        mcols += [(f"opq {m}", (lambda m: lambda r: r[m])(m)),
                  (f"baseline {m} (interp.)", (lambda m: lambda r: r[f"{m}_baseline"])(m)),
                  ("curve", (lambda m: lambda r: r[f"{m}_baseline_curve"])(m)),
                  ("verdict", (lambda m: lambda r: r[f"{m}_verdict"])(m))]
    mcols += [(f"best no larger ({metric})",
               lambda r: (None if r[f"{metric}_baseline_point"] is None else
                          f"{r[f'{metric}_baseline_point']:.4g} "
                          f"({r[f'{metric}_baseline_point_label']}, "
                          f"{r[f'{metric}_baseline_point_rate']:.3g}x)"))]
    lines += [table(res["matched"], mcols), ""]
    wins = {}
    for r in res["matched"]:
        wins[r[f"{metric}_verdict"]] = wins.get(r[f"{metric}_verdict"], 0) + 1
    real = {}
    for r in res["matched"]:
        v = r.get(f"{metric}_point_verdict", "-")
        real[v] = real.get(v, 0) + 1
    lines += ["On " + metric + ", against the interpolated baseline: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(wins.items()))
              + "; against the best measured baseline point no larger than opq's: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(real.items()))
              + f" (of {len(res['matched'])} opq points). Interpolation across a wide gap "
              "between two baseline points (e.g. where a curve falls off a cliff) is a "
              "guess; the second count uses measured points only.", ""]
    lines += ["### Headline: interpolated at target storage rates", ""]
    hcols = [("storage rate", lambda r: r["storage_rate"]),
             ("opq size budget", lambda r: r["opq_size_budget"]),
             ("opq calibrated", lambda r: r.get("opq_calibrated")),
             ("opq fixed bits (best)", lambda r: r["opq_fixed_bits"]),
             ("its curve", lambda r: r["opq_fixed_bits_curve"]),
             ("best baseline", lambda r: r["baseline"]),
             ("its curve", lambda r: r["baseline_curve"]),
             ("size budget vs baseline", lambda r: r["verdict_size_budget"]),
             ("calibrated vs baseline", lambda r: r.get("verdict_calibrated", "-"))]
    lines += [table(res["headline"], hcols), ""]
    pairs = calibration_pairs(res["points"], [(metric, res["higher_is_better"])]
                              + [tuple(m) for m in others])
    if pairs:
        lines += ["### Calibrated vs data-free opq (the same plan)", "",
                  "`opq calibrated`: `opq_torch.compress(..., calibration=batches)` with its "
                  "defaults (error compensation of the kept weights, then BatchNorm "
                  "statistics re-estimated), on calibration data disjoint from the reported "
                  "data; the plan and so the size are those of the data-free point (the "
                  "entropy-coded bytes move slightly with the compensated codes). gain: "
                  "calibrated minus data-free (for a lower-is-better metric, data-free minus "
                  "calibrated).", ""]
        pcols = [("settings", lambda r: r["settings"]),
                 ("storage rate (data-free / calibrated)",
                  lambda r: f"{r['rate_free']:.4g} / {r['rate_calibrated']:.4g}")]
        for m, _ in [(metric, True)] + list(others):
            pcols += [(f"{m} data-free", (lambda m: lambda r: r[m + "_free"])(m)),
                      (f"{m} calibrated", (lambda m: lambda r: r[m + "_calibrated"])(m)),
                      ("gain", (lambda m: lambda r: r[m + "_gain"])(m))]
        pcols += [("s (calibrated)", lambda r: r["seconds_calibrated"])]
        lines += [table(pairs, pcols), ""]
    return lines


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    done = [(k, v) for k, v in result["models"].items() if not v.get("skipped")]
    if not done:
        return False
    fig, axes = plt.subplots(1, len(done), figsize=(5.5 * len(done), 4.4), squeeze=False)
    for ax, (name, res) in zip(axes[0], done):
        metric = res["metric"]
        for cname, c in sorted(curves(res["points"]).items()):
            fam = c[0]["family"]
            ax.plot([p["storage_rate"] for p in c], [p["metrics"][metric] for p in c],
                    marker="o" if fam == "opq" else ".", lw=2.2 if fam == "opq" else 1.0,
                    ls="-" if fam == "opq" else "--", label=cname, ms=5 if fam == "opq" else 4)
        ax.axhline(res["dense"][metric], color="k", lw=0.7, ls=":", label="dense")
        ax.set_xscale("log")
        rates = [p["storage_rate"] for p in res["points"]]
        ticks = [t for t in (2, 4, 8, 16, 32, 64, 128, 256)
                 if min(rates) / 1.5 <= t <= max(rates) * 1.5]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("storage rate (float32 bytes / compressed bytes)")
        ax.set_ylabel(res["metric_label"])
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    import os
    os.replace(tmp, path)
    return True
