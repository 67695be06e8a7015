"""PNG plots of an evaluation report (matplotlib, imported only here).

Figures are made with matplotlib's object API (`Figure` on an Agg canvas), not pyplot: no global
backend is selected and no figure is registered with pyplot, so a caller's matplotlib set-up (a
notebook's inline backend, an open GUI window) is left as it was.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(**kw) -> Figure:
    fig = Figure(**kw)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders PNG with Agg
    return fig


def plot_quality(report, path: Path) -> None:
    """One panel per task: headline metrics per method, with the 95% interval of the change vs raw."""
    tasks = list(dict.fromkeys(r["task"] for r in report.quality))
    fig = _figure(figsize=(6 * len(tasks), 4))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in report.quality if r["task"] == task]
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        width = 0.8 / len(methods)
        for i, meth in enumerate(methods):
            vals = [next(r for r in rows if r["method"] == meth and r["metric"] == m) for m in metrics]
            xs = [j + i * width for j in range(len(metrics))]
            err = [[v["delta"] - v["ci_low"] for v in vals], [v["ci_high"] - v["delta"] for v in vals]]
            ax.bar(xs, [v["value"] for v in vals], width, label=meth, yerr=err if meth != "raw" else None, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
        ax.set_title(f"{task} task (error bars: 95% CI of change vs raw)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_ann(report, path: Path) -> None:
    """10-recall@10 against queries per second for each method's sweep."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    for meth in dict.fromkeys(a["method"] for a in report.ann):
        pts = [a for a in report.ann if a["method"] == meth]
        ax.plot([a["10-recall@10"] for a in pts], [a["qps"] for a in pts], "o-", label=f"{meth} ({pts[0]['factory']})")
        for a in pts:
            ax.annotate(str(a["value"]), (a["10-recall@10"], a["qps"]), fontsize=6)
    ax.set_xlabel("10-recall@10 (vs exact search in the same space)")
    ax.set_ylabel("queries / s (refinement included)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
