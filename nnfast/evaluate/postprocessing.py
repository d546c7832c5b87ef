"""Postprocessing: decide from cross-validation results whether keeping only the largest connected component helps,
and apply that decision to new predictions.

nnU-Net rule (``nnunetv2/postprocessing/remove_connected_components.py::determine_postprocessing``, v2.8.1):

1. Remove every connected component of the union of all foreground labels except the largest one(s) (full
   connectivity, ties keep every largest component, removed voxels become background 0). Keep this step when the
   foreground mean Dice over the cases improves (strictly) and no label's/region's mean Dice gets worse.
2. With more than one label/region, then for each label/region in dataset.json order, on the result so far: the same
   removal for that label/region alone, kept when that label's/region's mean Dice improves (strictly).

nnU-Net writes every candidate folder to disk (NIfTI compression is most of its run time), re-reads and re-evaluates
it. Here each case is read once and every candidate is scored in memory from counts: with labels (not regions) the
per-label removals touch disjoint voxels, so a label's Dice after its own step depends only on whether step 1 was
kept; one pass per case computes the counts of the prediction, after step 1, and after each label's step with and
without step 1, and the decisions are made from those counts with the same comparisons nnU-Net makes. Regions
overlap, so region-based datasets are decided in rounds (one pass over the cases per step), like nnU-Net but without
writing files.

The decision is stored as JSON (``postprocessing.json``), never as a pickle; the file carries nnU-Net's own
``postprocessing.json`` keys (``postprocessing_fns``, ``postprocessing_kwargs``, ``input_folder``, ``postprocessed``),
so nnU-Net's JSON can be read back and applied by nnfast too. nnU-Net's ``postprocessing.pkl`` is read as well, through
the data-only unpickler (:mod:`nnfast.io.safe_pickle`): its references to nnU-Net's
``remove_all_but_largest_component_from_segmentation`` become that step, any other function is refused by name.

Axis order: label maps as read from files, (z, y, x).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import DatasetError
from .metrics import (
    EvaluationLabels,
    Summary,
    counts_from_histogram,
    label_key,
    list_segmentations,
    match_cases,
    pool_workers,
    read_pair,
    resolve_labels,
)

__all__ = ["KeepLargestStep", "Decision", "PostprocessingPlan", "determine_postprocessing", "apply_postprocessing",
           "PLAN_FILE", "POSTPROCESSING_POOL_MIN_VOXELS", "APPLY_POOL_MIN_VOXELS"]

log = logging.getLogger(__name__)

PLAN_FILE = "postprocessing.json"
#: Below this many prediction voxels the decision runs in this process whatever ``workers`` says (~8 ns per voxel
#: for reading and scoring every candidate, against seconds to start worker processes).
POSTPROCESSING_POOL_MIN_VOXELS = 500_000_000
#: The same for applying a plan, which also compresses and writes every case (~25 ns per voxel).
APPLY_POOL_MIN_VOXELS = 250_000_000
PLAN_SCHEMA_VERSION = 1
_NNUNET_FN = "remove_all_but_largest_component_from_segmentation"


_NNUNET_FN_MODULE = "nnunetv2.postprocessing.remove_connected_components"


def _read_nnunet_pkl(path: Path) -> dict:
    """nnU-Net's ``postprocessing.pkl`` (``(functions, kwargs)``) as the JSON form :meth:`PostprocessingPlan.from_json`
    reads. The functions are references to nnU-Net's code: its largest-component function is mapped to its name
    (nothing is imported), any other reference is refused by name (:mod:`nnfast.io.safe_pickle`)."""
    from ..io.safe_pickle import load_data_pickle

    data = load_data_pickle(
        path, stand_ins={(_NNUNET_FN_MODULE, _NNUNET_FN): _NNUNET_FN},
        refuse=lambda name: DatasetError(
            f"`{path}` refers to `{name}`; nnfast applies only nnU-Net's `{_NNUNET_FN_MODULE}.{_NNUNET_FN}` from a "
            "postprocessing.pkl and loads nothing else from it (it could run code)"),
        unreadable=lambda reason: DatasetError(f"`{path}` is not a readable nnU-Net postprocessing.pkl ({reason})"))
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DatasetError(f"`{path}` holds a {type(data).__name__}; nnU-Net's postprocessing.pkl holds the pair "
                           "(functions, kwargs)")
    return {"postprocessing_fns": list(data[0]), "postprocessing_kwargs": list(data[1])}


# --------------------------------------------------------------------------------------------- plan
def _flatten(x: Any) -> tuple[int, ...]:
    if isinstance(x, (list, tuple)):
        out: list[int] = []
        for v in x:
            out.extend(_flatten(v))
        return tuple(out)
    return (int(x),)


def _freeze(x: Any) -> Any:
    """JSON lists -> tuples (recursively), ints stay ints."""
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return int(x)


def _thaw(x: Any) -> Any:
    if isinstance(x, tuple):
        return [_thaw(v) for v in x]
    return int(x)


@dataclass(frozen=True)
class KeepLargestStep:
    """Keep the largest connected component(s) of the union of ``labels_or_regions``; the rest becomes 0.

    ``labels_or_regions`` is what nnU-Net passes as the keyword of the same name: a label (int), a region (tuple of
    labels), or a tuple of labels/regions (step 1: every foreground label). Only the union of the labels matters.
    """

    labels_or_regions: Any

    @property
    def values(self) -> tuple[int, ...]:
        """The label values whose union is filtered, sorted."""
        return tuple(sorted(set(_flatten(self.labels_or_regions))))

    def apply(self, seg: np.ndarray) -> int:
        """Apply in place to a label map (z, y, x) of integer dtype; returns the number of voxels set to 0."""
        from ..native.components import remove_all_but_largest_component

        return remove_all_but_largest_component(seg, self.values, 0)

    def describe(self) -> str:
        vals = self.values
        what = f"label {vals[0]}" if len(vals) == 1 else f"labels {', '.join(map(str, vals))}"
        return f"keep the largest component of {what}"


@dataclass(frozen=True)
class Decision:
    """One tested step: the mean Dice it was judged by, before and after, and whether it was kept."""

    step: KeepLargestStep
    target: str  # "foreground" or the label key of the label/region judged
    before: float
    after: float
    accepted: bool

    def to_json(self) -> dict:
        return {"labels_or_regions": _thaw(self.step.labels_or_regions), "judged_by": self.target,
                "dice_before": self.before, "dice_after": self.after, "accepted": self.accepted}


@dataclass(frozen=True)
class PostprocessingPlan:
    """Steps to apply to every predicted segmentation, in order, and what they did on the cross-validation.

    Attributes
    ----------
    steps : tuple of KeepLargestStep
        Empty when nothing helped.
    decisions : tuple of Decision
        Every tested step (accepted or not), in the order tested.
    before, after : dict or None
        ``{"foreground_mean": {...}, "mean": {label key: {...}}}`` of the predictions without / with the steps.
    """

    steps: tuple[KeepLargestStep, ...] = ()
    decisions: tuple[Decision, ...] = ()
    before: Mapping[str, Any] | None = field(default=None, compare=False)
    after: Mapping[str, Any] | None = field(default=None, compare=False)

    def apply(self, seg: np.ndarray) -> int:
        """Apply every step in place to a label map (z, y, x); returns the number of voxels set to 0."""
        return sum(step.apply(seg) for step in self.steps)

    @property
    def dice_before(self) -> float | None:
        return None if self.before is None else float(self.before["foreground_mean"]["Dice"])

    @property
    def dice_after(self) -> float | None:
        return None if self.after is None else float(self.after["foreground_mean"]["Dice"])

    def to_json(self) -> dict:
        """nnU-Net's ``postprocessing.json`` keys plus ``schema_version``, ``nnfast_version``, ``decisions``."""
        from .. import __version__

        d: dict[str, Any] = {
            "schema_version": PLAN_SCHEMA_VERSION,
            "nnfast_version": __version__,
            "postprocessing_fns": [_NNUNET_FN] * len(self.steps),
            "postprocessing_kwargs": [{"labels_or_regions": _thaw(s.labels_or_regions)} for s in self.steps],
            "decisions": [x.to_json() for x in self.decisions],
        }
        if self.before is not None:
            d["input_folder"] = dict(self.before)
        if self.after is not None:
            d["postprocessed"] = dict(self.after)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "postprocessing plan") -> "PostprocessingPlan":
        """Read nnfast's plan or nnU-Net's ``postprocessing.json``."""
        fns = d.get("postprocessing_fns")
        kwargs = d.get("postprocessing_kwargs")
        if not isinstance(fns, list) or not isinstance(kwargs, list) or len(fns) != len(kwargs):
            raise DatasetError(f"{where} needs lists `postprocessing_fns` and `postprocessing_kwargs` of equal "
                               f"length; found {fns!r} and {kwargs!r}")
        steps = []
        for fn, kw in zip(fns, kwargs):
            if fn != _NNUNET_FN:
                raise DatasetError(f"{where} uses the postprocessing function {fn!r}; nnfast implements only "
                                   f"{_NNUNET_FN!r} (nnU-Net's default)")
            if not isinstance(kw, Mapping) or "labels_or_regions" not in kw:
                raise DatasetError(f"{where}: every entry of `postprocessing_kwargs` needs `labels_or_regions`; "
                                   f"found {kw!r}")
            steps.append(KeepLargestStep(_freeze(kw["labels_or_regions"])))
        decisions = tuple(
            Decision(KeepLargestStep(_freeze(x["labels_or_regions"])), str(x["judged_by"]), float(x["dice_before"]),
                     float(x["dice_after"]), bool(x["accepted"]))
            for x in d.get("decisions", []))
        return cls(tuple(steps), decisions, d.get("input_folder"), d.get("postprocessed"))

    def write(self, path: Path | str) -> Path:
        from ..io.atomic import write_json_atomic

        write_json_atomic(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: Path | str) -> "PostprocessingPlan":
        from ..errors import CaseNotFoundError
        from ..io.atomic import read_json

        path = Path(path)
        if path.suffix == ".pkl":
            if not path.is_file():
                raise DatasetError(f"nnU-Net postprocessing pickle `{path}` does not exist (nnUNetv2_find_best_"
                                   "configuration writes postprocessing.pkl into the cross-validation folder)")
            return cls.from_json(_read_nnunet_pkl(path), where=f"`{path}`")
        if not path.is_file():
            raise CaseNotFoundError(f"postprocessing plan `{path}` does not exist; `nnfast find-best` writes one")
        return cls.from_json(read_json(path), where=f"`{path}`")

    def format(self) -> str:
        lines = []
        for x in self.decisions:
            verdict = "kept" if x.accepted else "rejected"
            lines.append(f"  {x.step.describe():<48} {x.target:>10} Dice {x.before:.5f} -> {x.after:.5f}  {verdict}")
        if not self.steps:
            lines.append("  no postprocessing step improved the results")
        if self.dice_before is not None and self.dice_after is not None:
            lines.append(f"  foreground mean Dice {self.dice_before:.5f} -> {self.dice_after:.5f}")
        return "\n".join(lines)


def _means(summary: Summary) -> dict:
    from .metrics import plain_metrics

    return {"foreground_mean": plain_metrics(summary.foreground_mean),
            "mean": {label_key(t): plain_metrics(m) for t, m in summary.mean.items()}}


# --------------------------------------------------------------------------------------------- per case
@dataclass(frozen=True)
class _CaseTask:
    case_id: str
    pred: str
    ref: str
    labels: EvaluationLabels
    applied: tuple[KeepLargestStep, ...] = ()
    candidate: KeepLargestStep | None = None


def _after_removal(hist: np.ndarray, ref: np.ndarray, seg: np.ndarray, runs: np.ndarray,
                   values: tuple[int, ...]) -> np.ndarray:
    """The joint histogram of ``(ref, seg)`` once the voxels of ``runs`` are set to 0, from ``hist`` (that of
    ``(ref, seg)``) and a histogram of the erased voxels only."""
    from ..native.confusion import joint_histogram_runs

    erased = joint_histogram_runs(ref, seg, runs, values)
    out = hist - erased
    out[:, values.index(0)] += erased.sum(axis=1)
    return out


def _label_mode_counts(task: _CaseTask) -> np.ndarray:
    """Counts (4, n_targets, 4) of one case: [prediction, after step 1, per-label step alone, step 1 + per-label step];
    rows 2 and 3 hold, for target k, the counts of target k after that target's own step.

    Every candidate is scored from the histogram of the prediction and histograms of the voxels it would erase; only
    the result of step 1 is materialised (the per-label steps are tried on it)."""
    from ..native.components import erase_runs, runs_outside_largest_component
    from ..native.confusion import joint_histogram

    pred, ref = read_pair(Path(task.pred), Path(task.ref), task.case_id)
    labels = task.labels
    values = labels.bin_values
    n_t = len(labels.targets)
    out = np.zeros((4, n_t, 4), np.int64)
    hist = joint_histogram(ref, pred, values)
    out[0] = counts_from_histogram(hist, values, labels)
    fg_runs = runs_outside_largest_component(pred, labels.foreground_labels)
    fg = None
    if len(fg_runs):
        hist_fg = _after_removal(hist, ref, pred, fg_runs, values)
        out[1] = counts_from_histogram(hist_fg, values, labels)
        fg = pred.copy()
        erase_runs(fg, fg_runs)
    else:
        out[1] = out[0]
    for k, t in enumerate(labels.targets):
        if n_t == 1:
            break
        members = KeepLargestStep(t).values
        runs = runs_outside_largest_component(pred, members)
        out[2, k] = counts_from_histogram(_after_removal(hist, ref, pred, runs, values), values, labels)[k] \
            if len(runs) else out[0, k]
        if fg is None:
            out[3, k] = out[2, k]
            continue
        runs = runs_outside_largest_component(fg, members)
        out[3, k] = counts_from_histogram(_after_removal(hist_fg, ref, fg, runs, values), values, labels)[k] \
            if len(runs) else out[1, k]
    return out


def _round_counts(task: _CaseTask) -> np.ndarray:
    """Counts (2, n_targets, 4) of one case: after the applied steps, and after those plus the candidate step."""
    from ..native.components import runs_outside_largest_component
    from ..native.confusion import joint_histogram

    pred, ref = read_pair(Path(task.pred), Path(task.ref), task.case_id)
    for step in task.applied:
        step.apply(pred)
    values = task.labels.bin_values
    hist = joint_histogram(ref, pred, values)
    runs = runs_outside_largest_component(pred, task.candidate.values)
    out = np.zeros((2, len(task.labels.targets), 4), np.int64)
    out[0] = counts_from_histogram(hist, values, task.labels)
    out[1] = counts_from_histogram(_after_removal(hist, ref, pred, runs, values), values, task.labels) \
        if len(runs) else out[0]
    return out


# --------------------------------------------------------------------------------------------- decisions
def _foreground_step_helps(base: Summary, pp: Summary) -> bool:
    """nnU-Net: foreground mean Dice strictly better and no label/region worse (NaN compares as False)."""
    if not pp.foreground_mean["Dice"] > base.foreground_mean["Dice"]:
        return False
    return not any(pp.mean[t]["Dice"] < base.mean[t]["Dice"] for t in base.labels.targets)


def determine_postprocessing(
    pred_dir: Path | str,
    ref_dir: Path | str,
    dataset_json: Mapping[str, Any] | Path | str | EvaluationLabels,
    workers: int = 1,
    *,
    output_file: Path | str | bool | None = True,
    write_postprocessed: bool = False,
    progress=None,
    _rounds: bool = False,
) -> PostprocessingPlan:
    """Decide nnU-Net's keep-the-largest-component postprocessing on the predictions in ``pred_dir``.

    Parameters
    ----------
    pred_dir, ref_dir : path
        Cross-validation predictions and the reference segmentations (same file names).
    dataset_json : dataset.json path or dict (or EvaluationLabels)
        Labels/regions, ignore label and file ending.
    workers : int
        Worker processes, one case each at a time (in this process below :data:`POSTPROCESSING_POOL_MIN_VOXELS`).
    output_file : path, True, or None/False
        Where to write the plan; True (default): ``pred_dir/postprocessing.json``. ``pred_dir/summary.json`` (the
        predictions' metrics) is written whenever the plan is.
    write_postprocessed : bool
        Also write the postprocessed segmentations and their ``summary.json`` to ``pred_dir/postprocessed`` (nnU-Net
        always does; nnfast needs no files to decide).
    progress : callable, optional
        ``progress(done, total, case_id)`` per case and pass.

    Returns
    -------
    PostprocessingPlan

    Raises
    ------
    CaseNotFoundError, GeometryError
        As :func:`nnfast.evaluate.metrics.evaluate_folder`.
    """
    from ..parallel import run_tasks

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    labels = resolve_labels(dataset_json)
    cases = match_cases(pred_dir, ref_dir, labels.file_ending)
    ids = tuple(c for c, _, _ in cases)
    refs = tuple(str(r) for _, _, r in cases)
    preds = tuple(str(p) for _, p, _ in cases)
    workers, sizes = pool_workers(workers, [p for _, p, _ in cases], POSTPROCESSING_POOL_MIN_VOXELS)

    def summary(counts) -> Summary:
        return Summary(labels, ids, refs, preds, counts)

    def run(func, applied=(), candidate=None) -> np.ndarray:
        tasks = [_CaseTask(c, p, r, labels, tuple(applied), candidate) for c, p, r in zip(ids, preds, refs)]
        return np.stack(run_tasks(func, tasks, workers=workers, keys=ids, sizes=sizes, progress=progress,
                                  desc="postprocessing"))

    fg_step = KeepLargestStep(labels.foreground_labels)
    target_steps = [KeepLargestStep(t) for t in labels.targets] if len(labels.targets) > 1 else []
    decisions: list[Decision] = []
    steps: list[KeepLargestStep] = []
    if labels.has_regions or _rounds:
        c = run(_round_counts, (), fg_step)
        base, pp = summary(c[:, 0]), summary(c[:, 1])
        original = base
        keep = _foreground_step_helps(base, pp)
        decisions.append(Decision(fg_step, "foreground", base.foreground_dice, pp.foreground_dice, keep))
        current = pp if keep else base
        if keep:
            steps.append(fg_step)
        for t, step in zip(labels.targets, target_steps):
            c = run(_round_counts, steps, step)
            src, pp = summary(c[:, 0]), summary(c[:, 1])
            keep = pp.dice(t) > src.dice(t)
            decisions.append(Decision(step, label_key(t), src.dice(t), pp.dice(t), keep))
            if keep:
                steps.append(step)
                current = pp
    else:
        c = run(_label_mode_counts)
        original, fg = summary(c[:, 0]), summary(c[:, 1])
        keep_fg = _foreground_step_helps(original, fg)
        decisions.append(Decision(fg_step, "foreground", original.foreground_dice, fg.foreground_dice, keep_fg))
        source = (c[:, 1] if keep_fg else c[:, 0]).copy()
        own_step = c[:, 3] if keep_fg else c[:, 2]
        if keep_fg:
            steps.append(fg_step)
        for k, (t, step) in enumerate(zip(labels.targets, target_steps)):
            src = summary(source)
            candidate = source.copy()
            candidate[:, k] = own_step[:, k]
            pp = summary(candidate)
            keep = pp.dice(t) > src.dice(t)
            decisions.append(Decision(step, label_key(t), src.dice(t), pp.dice(t), keep))
            if keep:
                steps.append(step)
                source = candidate
        current = summary(source)

    plan = PostprocessingPlan(tuple(steps), tuple(decisions), _means(original), _means(current))
    for x in decisions:
        log.info("%s (judged by %s): Dice %.5f -> %.5f, %s", x.step.describe(), x.target, x.before, x.after,
                 "kept" if x.accepted else "rejected")
    if output_file is True:
        output_file = pred_dir / PLAN_FILE
    if output_file:
        original.write(pred_dir / "summary.json")
        plan.write(output_file)
    if write_postprocessed:
        out = pred_dir / "postprocessed"
        written = apply_postprocessing(pred_dir, out, plan, workers, file_ending=labels.file_ending)
        Summary(labels, ids, refs, tuple(str(p) for p in written), current.counts).write(out / "summary.json")
    return plan


# --------------------------------------------------------------------------------------------- apply
@dataclass(frozen=True)
class _ApplyTask:
    src: str
    dst: str
    plan: PostprocessingPlan


def _apply_case(task: _ApplyTask) -> int:
    from ..io.atomic import atomic_target
    from ..io.image import file_suffix, read_label, write_segmentation

    if not task.plan.steps:
        with atomic_target(Path(task.dst), suffix=file_suffix(Path(task.dst))) as tmp:
            shutil.copyfile(task.src, tmp)
        return 0
    seg, geom = read_label(Path(task.src))
    removed = task.plan.apply(seg[0])
    write_segmentation(seg[0], geom, Path(task.dst))
    return removed


def apply_postprocessing(
    in_dir: Path | str,
    out_dir: Path | str,
    plan: PostprocessingPlan | Path | str,
    workers: int = 1,
    *,
    file_ending: str | None = None,
    progress=None,
) -> list[Path]:
    """Apply ``plan`` to every segmentation in ``in_dir`` and write the results with the same names and geometry to
    ``out_dir`` (nnU-Net's ``apply_postprocessing_to_folder``).

    Parameters
    ----------
    in_dir, out_dir : path
    plan : PostprocessingPlan or path of a ``postprocessing.json`` (nnfast's or nnU-Net's)
    workers : int
        Worker processes (in this process below :data:`APPLY_POOL_MIN_VOXELS`).
    file_ending : str, optional
        Which files to process (default: every known image ending).

    Returns
    -------
    list of Path
        The written files, in case order.
    """
    from ..parallel import run_tasks

    if not isinstance(plan, PostprocessingPlan):
        plan = PostprocessingPlan.load(plan)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if in_dir.resolve() == out_dir.resolve():
        raise DatasetError(f"input and output folder are the same (`{in_dir}`); write the postprocessed "
                           "segmentations to another folder")
    files = list_segmentations(in_dir, file_ending)
    if not files:
        raise DatasetError(f"no segmentations{f' ending in {file_ending}' if file_ending else ''} in `{in_dir}`")
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [_ApplyTask(str(p), str(out_dir / p.name), plan) for p in files.values()]
    workers, sizes = pool_workers(workers, list(files.values()), APPLY_POOL_MIN_VOXELS)
    removed = run_tasks(_apply_case, tasks, workers=workers, keys=list(files), progress=progress, sizes=sizes,
                        desc="apply postprocessing")
    log.info("postprocessed %d case(s) into %s (%d voxels set to background)", len(tasks), out_dir, sum(removed))
    return [Path(t.dst) for t in tasks]

