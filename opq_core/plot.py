"""Per-layer charts of a plan or a ``.opq`` file (PNG, PDF or SVG by the extension;
matplotlib is an optional extra)."""
from __future__ import annotations

import io as _io
import math
import re

import numpy as np

__all__ = ["plot_plan", "plot_file", "plot_format", "FORMATS"]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'opq[plot]')") from None
    return plt


#: Chart formats by file extension.
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def plot_format(path) -> str:
    """The chart format of ``path`` by its extension; ValueError for any other."""
    import os
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"path: {str(path)!r}: a chart is written as "
                         f"{', '.join(FORMATS)} by the extension, not {ext or '(none)'!r}")
    return FORMATS[ext]


def _save(fig, path, plt):
    from .io import atomic_write
    fmt = plot_format(path)
    buf = _io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def _axes(plt, nrows, nlayers):
    width = min(24.0, max(6.0, 0.22 * nlayers + 2.0))
    fig, axes = plt.subplots(nrows, 1, figsize=(width, 2.2 * nrows + 1.0), sharex=True)
    return fig, np.atleast_1d(axes)


def natural_key(name: str):
    """Sort key that orders numbers by value: ``h.2`` before ``h.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _natural(items, name):
    return sorted(items, key=lambda it: natural_key(name(it)))


def _names(ax, names):
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)


def _layer_figure(path, rows):
    """Three stacked panels over ``rows`` (layers, by name in natural order); the first is
    labelled sparsity (0..1), the second shows the bits. Returns (plt, fig, axes, x, rows)."""
    plot_format(path)
    plt = _pyplot()
    rows = _natural(rows, lambda r: r.name)
    x = np.arange(len(rows))
    fig, axes = _axes(plt, 3, len(rows))
    axes[0].set_ylabel("sparsity")
    axes[0].set_ylim(0, 1)
    axes[1].bar(x, [r.bits for r in rows], color="tab:green")
    axes[1].set_ylabel("bits")
    return plt, fig, axes, x, rows


def plot_plan(plan, path) -> None:
    """Bar charts per layer: sparsity (realized and Laplace-predicted), bits, predicted
    error, written to ``path`` (PNG, PDF or SVG by the extension)."""
    plt, fig, (a, b, c), x, layers = _layer_figure(path, plan.layers)
    a.bar(x - 0.2, [lp.sparsity for lp in layers], 0.4, label="realized")
    a.bar(x + 0.2, [lp.predicted_sparsity for lp in layers], 0.4, label="predicted")
    a.legend(fontsize=7)
    a.set_title(f"{plan.method}: sparsity {plan.sparsity:.3f}, "
                f"paper_rate {plan.paper_rate:.1f}x")
    err = [max(lp.predicted_error, 1e-30) for lp in layers]
    c.bar(x, err, color="tab:red")
    c.set_yscale("log")
    c.set_ylabel("predicted error")
    _names(c, [r.name for r in layers])
    _save(fig, path, plt)


def plot_file(cf, path) -> None:
    """Bar charts per layer of a written file: sparsity, bits, paper_rate and
    storage_rate, written to ``path`` (PNG, PDF or SVG by the extension)."""
    plt, fig, (a, b, c), x, recs = _layer_figure(path, cf.layers)
    a.bar(x, [r.sparsity for r in recs])
    a.set_title(f"{cf.layout} layout: paper_rate {cf.paper_rate:.1f}x, "
                f"storage_rate {cf.storage_rate:.1f}x")

    def fin(v):
        return v if math.isfinite(v) else np.nan

    c.bar(x - 0.2, [fin(r.paper_rate) for r in recs], 0.4, label="paper_rate")
    c.bar(x + 0.2, [fin(r.storage_rate) for r in recs], 0.4, label="storage_rate")
    c.set_yscale("log")
    c.set_ylabel("rate (x)")
    c.legend(fontsize=7)
    _names(c, [r.name for r in recs])
    _save(fig, path, plt)
