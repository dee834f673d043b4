"""Markdown tables and PNG plots of the study's result (see ``study.py``)."""
from __future__ import annotations

import io

import numpy as np

import study_methods as sm


def _pm(m, s, fmt="{:.3f}"):
    if m is None:
        return "n/a"
    if s is None:
        return fmt.format(m)
    return (fmt + " ± " + fmt).format(m, s)


def _num(v, fmt="{:.1f}"):
    return "n/a" if v is None else fmt.format(v)


def _table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# {cfg['name']}: one-shot allocation + fine-tuning vs the alternatives", ""]
    lines.append(
        f"Models {', '.join(cfg['models'])}; seeds {list(cfg['seeds'])}; paper_rate targets "
        f"{[int(r) if float(r).is_integer() else r for r in cfg['rates']]}; fixed-bit methods "
        f"use {cfg['bits']} bits per kept weight; fine-tuning: {cfg['ft_epochs']} epochs of "
        f"Adam (lr {cfg['ft_lr']:g}, cosine) for every method. Wall time "
        f"{result['wall_s']:.0f} s, CPU time {result.get('cpu_s') or 0:.0f} s "
        f"({cfg['threads']} thread(s); JIT compile "
        f"{result['compile_s']:.1f} s, excluded from allocation times). Machine: "
        f"{result['machine']}.")
    lines.append("")
    lines.append("Accuracy: top-1 on the held-out test split, mean ± std over seeds (one "
                 "trained model per seed). `post` = right after compression, `ft` = after "
                 "fine-tuning. storage_rate = float32 bytes of the compressed layers / their "
                 "bytes in the written `.opq` file (entropy layout), after fine-tuning.")
    lines.append("")
    lines.append("## Methods")
    lines.append("")
    for k in cfg["methods"]:
        label, desc = sm.METHODS[k]
        lines.append(f"- `{k}` ({label}): {desc}.")
    if not result.get("annc_driver", False) and "annc" in cfg["methods"]:
        lines.append("- Note: the ANNC ADMM training driver was not available in this run; "
                     "`annc` fine-tuned = ANNC's one-shot projection + the same STE "
                     "fine-tuning as the others.")
    lines.append("")
    lines.append("## Dense models")
    lines.append("")
    rows = []
    for model in cfg["models"]:
        d = [x for x in result["dense"] if x["model"] == model]
        if not d:
            continue
        m = np.mean([x["acc"] for x in d])
        s = np.std([x["acc"] for x in d], ddof=1) if len(d) > 1 else 0.0
        rows.append([model, len(d), _pm(m, s), d[0]["weights"], d[0]["epochs"],
                     _num(np.mean([x["train_s"] for x in d]))])
    lines.append(_table(["model", "seeds", "test accuracy", "conv/linear weights", "epochs",
                         "train s"], rows))
    lines.append("")
    summary = result["summary"]
    lines.append("## Accuracy after fine-tuning (post-training in parentheses)")
    lines.append("")
    for model in cfg["models"]:
        rows = []
        for method in cfg["methods"]:
            r = [f"`{method}`"]
            for rate in cfg["rates"]:
                s = _find(summary, model, method, rate)
                if s is None or s.get("acc_post") is None:
                    r.append("failed" if s else "")
                    continue
                ft = s.get("acc_ft")
                r.append(f"{_pm(ft, s.get('acc_ft_std'))} ({s['acc_post']:.3f})"
                         if ft is not None else f"({s['acc_post']:.3f})")
            rows.append(r)
        best = _best(summary, model, cfg)
        lines.append(f"### {model}")
        lines.append("")
        lines.append(_table(["method"] + [f"{_rate_label(x)}x" for x in cfg["rates"]], rows))
        if best:
            lines.append("")
            lines.append("Best after fine-tuning: " + "; ".join(
                f"{_rate_label(rate)}x: `{m}`" for rate, m in best))
        lines.append("")
    lines.append("## All figures per cell")
    lines.append("")
    rows = []
    for s in summary:
        if s.get("acc_post") is None:
            rows.append([s["model"], s["method"], _rate_label(s["rate_target"]),
                         "failed: " + str(s.get("error", ""))[:80], "", "", "", "", ""])
            continue
        ref = _find(summary, s["model"], "opq", s["rate_target"])
        ratio = (s["ft_s"] / ref["ft_s"] if ref and ref.get("ft_s") and s.get("ft_s")
                 else None)
        rows.append([s["model"], f"`{s['method']}`", _rate_label(s["rate_target"]),
                     _num(s.get("paper_rate")), _num(s.get("storage_rate")),
                     _pm(s.get("acc_post"), s.get("acc_post_std")),
                     _pm(s.get("acc_ft"), s.get("acc_ft_std")),
                     _num(None if s.get("alloc_s") is None else 1e3 * s["alloc_s"]),
                     _num(s.get("ft_s")), _num(ratio, "{:.2f}")])
    lines.append(_table(["model", "method", "target", "paper_rate", "storage_rate",
                         "acc post", "acc ft", "alloc ms", "ft s", "ft s / OPQ ft s"], rows))
    lines.append("")
    if result.get("ablation_summary"):
        lines.append("## Ablations (OPQ)")
        lines.append("")
        lines.append("Scales: `unified` = one scale per output channel, one normalized "
                     "codebook per layer (absolute steps scale with the channel); `layer` = one "
                     "scale per layer. Per-channel steps are not a plan option: they are "
                     "emulated by planning every output channel as its own layer (own scale, "
                     "own step from its measured error, one global multiplier); "
                     "post-training only, since the adapter installs per-layer plans. "
                     "`grid` and `bits` rows are OPQ (unified, Laplace) at the same rate, "
                     "fine-tuned like the main table (`bits B`: sparsity re-solved for the "
                     "rate). weight error = sum over layers of ||w - Q(w)||^2.")
        lines.append("")
        rows = []
        for s in result["ablation_summary"]:
            rows.append([s["model"], _rate_label(s["rate_target"]), s["variant"],
                         _pm(s.get("acc_post"), s.get("acc_post_std")),
                         _pm(s.get("acc_ft"), s.get("acc_ft_std")),
                         _num(s.get("weight_error"), "{:.4g}"), _num(s.get("storage_rate")),
                         _num(None if s.get("alloc_s") is None else 1e3 * s["alloc_s"])])
        lines.append(_table(["model", "target", "variant", "acc post", "acc ft",
                             "weight error", "storage_rate", "alloc ms"], rows))
        lines.append("")
    if result.get("errors"):
        lines.append("## Predicted vs measured per-layer error")
        lines.append("")
        lines.append("Per layer of the trained models, the plan's prediction against the "
                     "measurement. q ratio = predicted / measured quantization error of the "
                     "kept weights (the part a model must predict; the pruning error is "
                     "the exact sum of the pruned squares in both); total ratio = predicted / "
                     "measured ||w - Q(w)||^2 over all layers (pruning included); sparsity "
                     "gap = |analytic Laplace sparsity - realized sparsity| of a layer. "
                     "Plot: `" + cfg["name"] + "_error.png`.")
        lines.append("")
        rows = []
        keys = sorted({(e["model"], e["error_model"], e["rate_target"])
                       for e in result["errors"]})
        for model, em, rate in keys:
            es = [e for e in result["errors"] if (e["model"], e["error_model"],
                                                  e["rate_target"]) == (model, em, rate)]
            ratio = [e["q_predicted"] / e["q_measured"] for e in es if e["q_measured"] > 0]
            tot_p = sum(e["predicted"] for e in es)
            tot_m = sum(e["measured"] for e in es)
            sp = [abs(e["predicted_sparsity"] - e["sparsity"]) for e in es]
            rows.append([model, em, _rate_label(rate), len(es),
                         _num(min(ratio), "{:.3f}") if ratio else "n/a",
                         _num(float(np.median(ratio)), "{:.3f}") if ratio else "n/a",
                         _num(max(ratio), "{:.3f}") if ratio else "n/a",
                         _num(tot_p / tot_m if tot_m else None, "{:.3f}"),
                         _num(max(sp), "{:.3f}") if em == "laplace" else ""])
        lines.append(_table(["model", "error model", "target", "layers",
                             "min q ratio", "median q ratio", "max q ratio",
                             "total ratio", "max abs sparsity gap"], rows))
        lines.append("")
    return "\n".join(lines)


def _rate_label(r):
    r = float(r)
    return str(int(r)) if r.is_integer() else f"{r:g}"


def _find(summary, model, method, rate):
    for s in summary:
        if s["model"] == model and s["method"] == method and s["rate_target"] == rate:
            return s
    return None


def _best(summary, model, cfg):
    out = []
    for rate in cfg["rates"]:
        cand = [(s["acc_ft"], s["method"]) for s in summary
                if s["model"] == model and s["rate_target"] == rate
                and s.get("acc_ft") is not None]
        if cand:
            out.append((rate, max(cand)[1]))
    return out


def _save(fig, path):
    from opq_core.io import atomic_write
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def plot_accuracy(result: dict, path: str) -> None:
    """Accuracy vs paper_rate, one line per method; top row post-training, bottom row
    fine-tuned; one column per model; the dense accuracy as a dotted line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = result["config"]
    models = cfg["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7.2), squeeze=False)
    for j, model in enumerate(models):
        dense = [x["acc"] for x in result["dense"] if x["model"] == model]
        for i, (key, title) in enumerate((("acc_post", "post-training"),
                                          ("acc_ft", f"fine-tuned ({cfg['ft_epochs']} ep)"))):
            ax = axes[i][j]
            for method in cfg["methods"]:
                pts = sorted((s["paper_rate"], s[key], s.get(key + "_std") or 0.0)
                             for s in result["summary"]
                             if s["model"] == model and s["method"] == method
                             and s.get(key) is not None and s.get("paper_rate") is not None)
                if not pts:
                    continue
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, label=method)
            if dense:
                ax.axhline(float(np.mean(dense)), color="k", ls=":", lw=1, label="dense")
            ax.set_xscale("log")
            ax.set_xticks([float(r) for r in cfg["rates"]])
            ax.set_xticklabels([_rate_label(r) for r in cfg["rates"]])
            ax.minorticks_off()
            ax.set_ylim(0.0, 1.02)
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.set_xlabel("paper_rate (x)")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_errors(result: dict, path: str) -> None:
    """The Fig. 3 analogue, per layer of every trained model: predicted vs measured
    quantization error of the kept weights, the same with pruning included, and the
    Laplace model's analytic sparsity vs the realized one (log-log / linear)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    errs = result["errors"]
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.6))
    colors = {"laplace": "tab:blue", "empirical": "tab:orange"}
    markers = dict(zip(sorted({e["model"] for e in errs}), "osd^v<>"))
    panels = (("q_measured", "q_predicted", "quantization error of kept weights", True),
              ("measured", "predicted", "total error (pruning + quantization)", True),
              ("sparsity", "predicted_sparsity", "layer sparsity (analytic vs realized)",
               False))
    for ax, (xk, yk, title, log) in zip(axes, panels):
        vals = []
        for em in ("laplace", "empirical"):
            if xk == "sparsity" and em != "laplace":
                continue
            for model, mk in markers.items():
                sel = [e for e in errs if e["error_model"] == em and e["model"] == model
                       and (not log or (e.get(xk, 0) > 0 and e.get(yk, 0) > 0))]
                if not sel:
                    continue
                x = [e[xk] for e in sel]
                y = [e[yk] for e in sel]
                vals += x + y
                ax.scatter(x, y, s=16, marker=mk, color=colors[em], alpha=0.75,
                           label=f"{model} ({em})")
        if vals:
            lo, hi = min(vals), max(vals)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("measured" if xk != "sparsity" else "realized")
        ax.set_ylabel("predicted")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
