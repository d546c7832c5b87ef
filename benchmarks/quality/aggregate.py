"""Pure parts of the quality harness: Dice per label over seeds, the differences between arms, the verdict, tables.

A *row* is one (dataset, arm, seed, label) result: ``{"dataset", "arm", "seed", "label", "dice", "wall_s",
"loader_wait_s"}`` where ``dice`` is the mean Dice of that label over the held-out cases (nnU-Net's
``compute_metrics_on_folder``, its ``mean`` entry) and ``label`` is a label name or ``"foreground mean"``.

The verdict (issue 15): the difference of an arm's mean Dice to arm A's, ``diff = mean(X) - mean(A)``, is *inside*
when ``|diff| <= max(tolerance, spread)``, with ``tolerance`` one Dice point (0.01) and ``spread`` the seed spread,
the larger of the two arms' standard deviations over seeds (``ddof=1``; with one seed there is no spread and only
the tolerance counts).

No imports beyond the standard library here (matplotlib only inside :func:`plot_dice`), so the unit test is fast.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

TOLERANCE = 0.01
ARM_NAMES = {"A": "nnU-Net trainer + nnU-Net loader", "B": "nnU-Net trainer + nnfast loader", "C": "nnfast train"}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; NaN for fewer than 2 values), NaNs ignored."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else float("nan"))


def summarize(rows: Iterable[Mapping]) -> dict[tuple[str, str, str], dict]:
    """``(dataset, arm, label) -> {"mean", "sd", "n", "values" (by seed order)}`` of the rows' Dice."""
    groups: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        groups[(str(r["dataset"]), str(r["arm"]), str(r["label"]))].append((int(r["seed"]), float(r["dice"])))
    out = {}
    for key, pairs in groups.items():
        pairs.sort()
        values = [d for _, d in pairs]
        m, s = mean_sd(values)
        out[key] = {"mean": m, "sd": s, "n": len(values), "values": values, "seeds": [s_ for s_, _ in pairs]}
    return out


def differences(summary: Mapping[tuple[str, str, str], Mapping], reference: str = "A",
                tolerance: float = TOLERANCE) -> list[dict]:
    """Every other arm against ``reference``, per dataset and label: ``diff``, ``spread``, ``limit`` and ``inside``
    (see the module docstring). Labels the reference arm lacks are skipped."""
    out = []
    for (ds, arm, label), s in sorted(summary.items()):
        if arm == reference or (ds, reference, label) not in summary:
            continue
        ref = summary[(ds, reference, label)]
        diff = s["mean"] - ref["mean"]
        sds = [x for x in (ref["sd"], s["sd"]) if not math.isnan(x)]
        spread = max(sds) if sds else float("nan")
        limit = max(tolerance, spread) if sds else tolerance
        out.append({"dataset": ds, "label": label, "arm": arm, "reference": reference, "diff": diff,
                    "spread": spread, "limit": limit,
                    "inside": bool(not math.isnan(diff) and abs(diff) <= limit)})
    return out


def timings(runs: Iterable[Mapping]) -> dict[tuple[str, str], dict]:
    """``(dataset, arm) -> mean/sd of wall_s and loader_wait_s`` over runs (one entry per run, not per label)."""
    groups: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for r in runs:
        groups[(str(r["dataset"]), str(r["arm"]))].append(r)
    out = {}
    for key, rs in groups.items():
        w = mean_sd([r["wall_s"] for r in rs])
        q = mean_sd([r["loader_wait_s"] for r in rs])
        out[key] = {"wall_mean": w[0], "wall_sd": w[1], "wait_mean": q[0], "wait_sd": q[1], "n": len(rs)}
    return out


def _pm(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def label_cell(label: str, shares: Mapping[str, float] | None) -> str:
    """``label`` with its share of the held-out voxels, the dataset's smallest foreground label marked."""
    if not shares or label not in shares:
        return label
    smallest = min(shares, key=lambda k: shares[k])
    return f"{label} ({100 * shares[label]:.2g} % of voxels{', smallest' if label == smallest else ''})"


def markdown_table(summary: Mapping, diffs: Sequence[Mapping], times: Mapping | None = None,
                   arms: Sequence[str] = ("A", "B", "C"),
                   label_shares: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """One markdown table: a row per (dataset, label) with each arm's Dice (mean ± sd over seeds) and B−A, C−A
    (``inside``/``OUTSIDE`` the limit); then a row per dataset of training wall time and loader wait.
    ``label_shares`` (dataset -> label -> share of the held-out voxels) adds each label's size, the smallest one
    marked: a label too small to be learnt at the budget has Dice 0 in every arm, which says nothing."""
    by = {(d["dataset"], d["label"], d["arm"]): d for d in diffs}
    others = [a for a in arms if a != "A"]
    head = ["dataset", "label"] + [f"{a} Dice" for a in arms] + [f"{a}−A (limit)" for a in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(ds, label) for ds, _, label in summary}, key=lambda k: (k[0], k[1] == "foreground mean", k[1]))
    for ds, label in keys:
        cells = [ds, label_cell(label, (label_shares or {}).get(ds))]
        for a in arms:
            s = summary.get((ds, a, label))
            cells.append(_pm(s["mean"], s["sd"]) + f" (n={s['n']})" if s else "")
        for a in others:
            d = by.get((ds, label, a))
            cells.append(f"{d['diff']:+.3f} ({d['limit']:.3f}) {'inside' if d['inside'] else '**OUTSIDE**'}"
                         if d else "")
        lines.append("| " + " | ".join(cells) + " |")
    if times:
        lines += ["", "| dataset | " + " | ".join(f"{a} train s (loader wait s)" for a in arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for ds in sorted({k[0] for k in times}):
            cells = [ds]
            for a in arms:
                t = times.get((ds, a))
                cells.append(f"{_pm(t['wall_mean'], t['wall_sd'], 0)} ({_pm(t['wait_mean'], t['wait_sd'], 1)})"
                             if t else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_csv(rows: Sequence[Mapping]) -> str:
    """The rows as CSV text (columns: the union of the rows' keys, in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in cols})
    return buf.getvalue()


def plot_dice(rows: Sequence[Mapping], path, arms: Sequence[str] = ("A", "B", "C")) -> bool:
    """Dice per arm and label, one panel per dataset, seeds as dots and the mean as a bar; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    colours = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green"}
    for ax, ds in zip(axes[0], datasets):
        labels = sorted({r["label"] for r in rows if r["dataset"] == ds}, key=lambda x: (x == "foreground mean", x))
        width = 0.8 / max(1, len(arms))
        for j, arm in enumerate(arms):
            for i, label in enumerate(labels):
                vals = [float(r["dice"]) for r in rows if r["dataset"] == ds and r["arm"] == arm and r["label"] == label]
                if not vals:
                    continue
                x = i + (j - (len(arms) - 1) / 2) * width
                m, _ = mean_sd(vals)
                ax.bar(x, m, width * 0.9, color=colours.get(arm, "grey"), alpha=0.35,
                       label=f"{arm}: {ARM_NAMES.get(arm, arm)}" if i == 0 else None)
                ax.scatter([x] * len(vals), vals, color=colours.get(arm, "grey"), s=14, zorder=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(ds)
        ax.set_ylabel("Dice (held-out cases)")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return True
