"""``summary.png``: the picture of an evaluation, written by ``nnfast evaluate`` beside ``summary.json``.

One column per evaluated label (or region): a dot per case at its Dice (the colour of the label in the overlay
pictures, :data:`nnfast.visualize.overlay.PALETTE`), a box of the cases' Dice (median, quartiles, whiskers at 1.5
IQR), the mean as a black triangle, and the ``worst`` lowest cases below the median named beside their dots. Cases where the label is
absent from both reference and prediction have no Dice (NaN, nnU-Net's rule); their count is written under the
column. The title gives the number of cases and the foreground mean Dice (the number ``find-best`` ranks by).

matplotlib's Agg canvas is used directly (no pyplot), imported inside :func:`plot_summary` only.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..labels import label_key

__all__ = ["plot_summary", "summary_plot_path"]


def summary_plot_path(summary_file: Path | str) -> Path:
    """Where the picture of ``summary_file`` goes: the same name with ``.png`` (``summary.json`` -> ``summary.png``)."""
    return Path(summary_file).with_suffix(".png")


def plot_summary(summary, path: Path | str, *, worst: int = 3) -> Path:
    """Draw the Dice of every case and label of ``summary`` and write it as a PNG (atomically).

    Parameters
    ----------
    summary : nnfast.evaluate.metrics.Summary
    path : path
        The PNG to write.
    worst : int
        How many of the lowest-Dice cases of each label are named.

    Returns
    -------
    Path
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io.atomic import atomic_target
    from .overlay import PALETTE

    targets = list(summary.labels.targets)
    names = summary.labels.names
    n_cases = len(summary.case_ids)
    dice = np.array([[float(summary.metric_per_case[i][t]["Dice"]) for t in targets] for i in range(n_cases)],
                    dtype=np.float64).reshape(n_cases, len(targets))
    fig_w = max(6.0, 1.6 * len(targets) + 2.0)
    fig = Figure(figsize=(fig_w, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # jitter of the dots: the same picture every time
    ticks = []
    for k, t in enumerate(targets):
        color = [c / 255 for c in PALETTE[k % len(PALETTE)]]
        col = dice[:, k]
        ok = np.isfinite(col)
        if ok.any():
            ax.boxplot([col[ok]], positions=[k], widths=0.5, showfliers=False, patch_artist=True,
                       boxprops=dict(facecolor=(*color, 0.15), edgecolor="0.3"), medianprops=dict(color="0.2"),
                       whiskerprops=dict(color="0.3"), capprops=dict(color="0.3"))
            x = k + rng.uniform(-0.15, 0.15, ok.sum())
            ax.scatter(x, col[ok], s=22, color=color, edgecolors="black", linewidths=0.4, zorder=3)
            ax.scatter([k + 0.33], [float(np.mean(col[ok]))], marker="<", s=40, color="black", zorder=4)
            below = col[ok] < np.median(col[ok])  # only cases below the median are named (no pile at Dice 1)
            order = [j for j in np.argsort(col[ok], kind="stable")[:max(0, worst)] if below[j]]
            ids = np.asarray(summary.case_ids)[ok]
            for j in order:
                ax.annotate(str(ids[j]), (x[j], col[ok][j]), xytext=(6, -3), textcoords="offset points",
                            fontsize=7, color="0.15")
        name = names.get(label_key(t), "")
        absent = int((~ok).sum())
        tick = f"{name} ({label_key(t)})" if name else label_key(t)
        if absent:
            tick += f"\n{absent} case(s) without Dice"
        ticks.append(tick)
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels(ticks, fontsize=9)
    ax.set_xlim(-0.6, len(targets) - 0.4)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", color="0.9")
    fg = summary.foreground_mean.get("Dice", float("nan"))
    fg_text = "n/a" if fg is None or math.isnan(fg) else f"{fg:.4f}"
    ax.set_title(f"Dice per case and label: {n_cases} case(s), foreground mean Dice {fg_text}\n"
                 f"(dots: cases, box: quartiles, \u25c0: mean; lowest cases named)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
