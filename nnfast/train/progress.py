"""Per-epoch training records: the logging history, its files (``progress.json``, ``progress.csv``,
``training_log.txt``) and the ``progress.png`` plot (nnU-Net's ``nnunet_logger.LocalLogger``).

The history holds one value per epoch and key. The pseudo-Dice EMA follows nnU-Net: ``ema = 0.9 * previous +
0.1 * mean_fg_dice`` (the first epoch's EMA is its mean). Deviation: an epoch whose mean pseudo-Dice is NaN (no
foreground class present or predicted in any validation patch, or no validation) keeps the previous EMA instead of
turning it, and every later one, into NaN.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.atomic import atomic_target, write_json_atomic

__all__ = ["EpochRecord", "TrainingHistory", "plot_progress", "write_progress_files", "TrainingLogFile",
           "EMA_DECAY"]

EMA_DECAY = 0.9

#: History keys, one list entry per epoch.
_KEYS = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "dice_per_class", "lrs",
         "epoch_start_timestamps", "epoch_end_timestamps", "train_wait_s", "train_s", "val_s")


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch produced (times in seconds; losses and Dice as floats, NaN when not computed)."""

    epoch: int
    num_epochs: int
    train_loss: float
    val_loss: float
    dice_per_class: tuple[float, ...]
    mean_fg_dice: float
    ema_fg_dice: float
    lr: float
    epoch_time: float
    train_wait_s: float
    new_best: bool = False


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


@dataclass
class TrainingHistory:
    """Per-epoch lists (see ``_KEYS``); serialisable with :meth:`to_dict` (plain lists of floats)."""

    data: dict[str, list] = field(default_factory=lambda: {k: [] for k in _KEYS})

    def __len__(self) -> int:
        return len(self.data["train_losses"])

    @property
    def last_ema(self) -> float | None:
        """The EMA of the last epoch (None before the first one or while it is NaN)."""
        v = self.data["ema_fg_dice"][-1] if self.data["ema_fg_dice"] else None
        return None if v is None or math.isnan(v) else float(v)

    def append(self, *, train_loss: float, val_loss: float, dice_per_class: Sequence[float], lr: float,
               start: float, end: float, train_wait_s: float = 0.0, train_s: float = 0.0,
               val_s: float = 0.0) -> tuple[float, float]:
        """Record one epoch; returns ``(mean_fg_dice, ema_fg_dice)`` (NaN-ignoring mean over classes)."""
        dice = [_f(v) for v in dice_per_class]
        finite = [v for v in dice if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        prev = self.last_ema
        if math.isnan(mean):
            ema = float("nan") if prev is None else prev
        else:
            ema = mean if prev is None else EMA_DECAY * prev + (1 - EMA_DECAY) * mean
        values = dict(train_losses=_f(train_loss), val_losses=_f(val_loss), mean_fg_dice=mean, ema_fg_dice=ema,
                      dice_per_class=dice, lrs=float(lr), epoch_start_timestamps=float(start),
                      epoch_end_timestamps=float(end), train_wait_s=float(train_wait_s), train_s=float(train_s),
                      val_s=float(val_s))
        for k, v in values.items():
            self.data[k].append(v)
        return mean, ema

    def truncate(self, n_epochs: int) -> None:
        """Keep the first ``n_epochs`` entries (a resumed run drops epochs its checkpoint does not hold)."""
        for k in self.data:
            del self.data[k][n_epochs:]

    def to_dict(self) -> dict[str, list]:
        return {k: [list(v) if isinstance(v, (list, tuple)) else v for v in vals] for k, vals in self.data.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence]) -> "TrainingHistory":
        h = cls()
        n = len(d.get("train_losses", []))
        for k in _KEYS:
            vals = list(d.get(k, []))
            if len(vals) != n:  # a key added in a later version: pad so every list has one entry per epoch
                vals = (vals + [float("nan")] * n)[:n] if k != "dice_per_class" else (vals + [[]] * n)[:n]
            h.data[k] = [[_f(x) for x in v] if k == "dice_per_class" else _f(v) for v in vals]
        return h

    def epoch_times(self) -> list[float]:
        return [e - s for s, e in zip(self.data["epoch_start_timestamps"], self.data["epoch_end_timestamps"])]


# ------------------------------------------------------------------------------------------------ files
def _csv_text(history: TrainingHistory) -> str:
    d = history.data
    n_cls = max((len(v) for v in d["dice_per_class"]), default=0)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", "train_loss", "val_loss", "mean_fg_dice", "ema_fg_dice", "lr", "epoch_time_s",
                "train_wait_s", "train_s", "val_s"] + [f"dice_class_{c + 1}" for c in range(n_cls)])
    times = history.epoch_times()
    for i in range(len(history)):
        dice = list(d["dice_per_class"][i]) + [float("nan")] * (n_cls - len(d["dice_per_class"][i]))
        row = [i, d["train_losses"][i], d["val_losses"][i], d["mean_fg_dice"][i], d["ema_fg_dice"][i], d["lrs"][i],
               times[i], d["train_wait_s"][i], d["train_s"][i], d["val_s"][i]] + dice
        w.writerow([r if isinstance(r, int) else ("" if math.isnan(r) else f"{r:.6g}") for r in row])
    return buf.getvalue()


def write_progress_files(folder: Path | str, history: TrainingHistory) -> None:
    """Write ``progress.json`` (the history, NaN as null) and ``progress.csv`` (one row per epoch) atomically."""
    folder = Path(folder)
    clean = {k: [[None if math.isnan(x) else x for x in v] if isinstance(v, list) else
                 (None if math.isnan(v) else v) for v in vals] for k, vals in history.data.items()}
    write_json_atomic(folder / "progress.json", {"epochs": len(history), **clean})
    with atomic_target(folder / "progress.csv") as tmp:
        tmp.write_text(_csv_text(history), encoding="utf-8")


def plot_progress(history: TrainingHistory, path: Path | str) -> None:
    """Draw nnU-Net's ``progress.png``: losses with pseudo-Dice and its EMA, epoch time, learning rate.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch); written atomically.

    Raises
    ------
    MissingDependencyError
        matplotlib is not installed (``pip install "nnfast[plot]"``).
    """
    from ..extras import require

    require("matplotlib", "drawing progress.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = history.data
    x = list(range(len(history)))
    fig = Figure(figsize=(12, 14), dpi=80)
    FigureCanvasAgg(fig)
    ax_loss, ax_time, ax_lr = fig.subplots(3, 1)
    ax_loss.plot(x, d["train_losses"], color="b", ls="-", label="loss_tr", linewidth=2)
    ax_loss.plot(x, d["val_losses"], color="r", ls="-", label="loss_val", linewidth=2)
    ax_dice = ax_loss.twinx()
    ax_dice.plot(x, d["mean_fg_dice"], color="g", ls="dotted", label="pseudo dice", linewidth=2)
    ax_dice.plot(x, d["ema_fg_dice"], color="g", ls="-", label="pseudo dice (mov. avg.)", linewidth=2)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_dice.set_ylabel("pseudo dice")
    h1, l1 = ax_loss.get_legend_handles_labels()
    h2, l2 = ax_dice.get_legend_handles_labels()
    ax_loss.legend(h1 + h2, l1 + l2, loc=(0, 1.02), ncol=4)
    ax_time.plot(x, history.epoch_times(), color="b", ls="-", label="epoch duration", linewidth=2)
    ax_time.plot(x, d["train_wait_s"], color="orange", ls="-", label="waiting for data", linewidth=2)
    ax_time.set_xlabel("epoch")
    ax_time.set_ylabel("time [s]")
    ax_time.legend(loc=(0, 1.02), ncol=2)
    ax_lr.plot(x, d["lrs"], color="b", ls="-", label="learning rate", linewidth=2)
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend(loc=(0, 1.02))
    fig.tight_layout()
    with atomic_target(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


class TrainingLogFile:
    """``training_log.txt``: timestamped lines appended (and flushed) as training goes."""

    def __init__(self, path: Path | str, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, *lines: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(f"{stamp}: {line}\n")

    def epoch(self, rec: EpochRecord) -> None:
        dice = ", ".join("nan" if math.isnan(v) else f"{v:.4f}" for v in rec.dice_per_class)
        lines = [f"Epoch {rec.epoch}", f"learning rate: {rec.lr:.5g}", f"train_loss {rec.train_loss:.4f}",
                 f"val_loss {rec.val_loss:.4f}", f"pseudo dice [{dice}] (EMA {rec.ema_fg_dice:.4f})",
                 f"epoch time: {rec.epoch_time:.2f} s (waiting for data {rec.train_wait_s:.2f} s)"]
        if rec.new_best:
            lines.append(f"new best EMA pseudo Dice: {rec.ema_fg_dice:.4f}")
        self.write(*lines)
