"""Segmentation metrics per case and per label/region, and folder evaluation with nnU-Net's ``summary.json``.

nnU-Net rule (``nnunetv2/evaluation/evaluate_predictions.py``, v2.8.1): for every label (or region = union of
labels) and case, count TP/FP/FN/TN over the voxels whose reference is not the ignore label;
``Dice = 2TP / (2TP + FP + FN)``, ``IoU = TP / (TP + FP + FN)``, both NaN when ``TP + FP + FN = 0`` (the structure
is absent from reference and prediction); also ``n_pred = TP + FP``, ``n_ref = TP + FN``. ``mean[label][metric]``
is ``np.nanmean`` over cases, ``foreground_mean[metric]`` the plain mean over labels other than 0 of those means.
The summary is written with sorted keys, labels as ``str(label)`` (``"1"``, ``"(1, 2)"`` for regions).

Here every count of a case comes from one joint histogram of (reference, prediction) values
(:func:`nnfast.native.confusion.joint_histogram`) instead of ~10 full-volume mask passes per label, and the folder
is evaluated on watched worker processes (:func:`nnfast.parallel.run_tasks`). Means use the same NumPy calls on the
same values in the same order as nnU-Net, so ``summary.json`` numbers are identical.

Axis order: label maps as read from files, (z, y, x) (a leading channel axis of 1 is accepted).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import numpy as np

from ..errors import CaseNotFoundError, DatasetError, GeometryError, SettingsError
from ..labels import LabelManager, LabelOrRegion, label_key, parse_label_key
from ..layout import SUMMARY_FILE, SUMMARY_PICTURE

__all__ = [
    "LabelOrRegion",
    "METRICS",
    "EvaluationLabels",
    "labels_from_dataset_json",
    "label_key",
    "parse_label_key",
    "count_matrix",
    "counts_from_histogram",
    "counts_to_metrics",
    "compute_metrics",
    "Summary",
    "evaluate_folder",
    "list_segmentations",
    "pool_workers",
    "EVALUATE_POOL_MIN_VOXELS",
]

log = logging.getLogger(__name__)

#: Metric names in nnU-Net's order.
METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")
SUMMARY_SCHEMA_VERSION = 1
_ENDINGS = (".nii.gz", ".nrrd.gz", ".nii", ".mha", ".mhd", ".nrrd", ".gipl", ".tif", ".tiff", ".png")
TP, FP, FN, TN = 0, 1, 2, 3
#: Folders with fewer prediction voxels than this are evaluated in this process whatever ``workers`` says: starting
#: worker processes (interpreter, imports, Numba cache) takes seconds, evaluating takes ~4 ns per voxel (two reads
#: and one histogram), so a pool only pays off for about a billion voxels (e.g. 150 cases of 512 x 512 x 25).
EVALUATE_POOL_MIN_VOXELS = 1_000_000_000


# --------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class EvaluationLabels:
    """What is evaluated: labels or regions (foreground only, in dataset.json order), the ignore label and names.

    A view of a :class:`nnfast.labels.LabelManager` (:meth:`from_label_manager`), or explicit labels/regions
    (:meth:`from_labels`, e.g. ``nnfast evaluate --labels``).

    ``targets`` holds ints for labels and tuples for regions (nnU-Net's ``foreground_labels`` /
    ``foreground_regions``); ``names[label_key(t)]`` is the dataset.json name of each target.
    """

    targets: tuple[LabelOrRegion, ...]
    ignore_label: int | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    has_regions: bool = False
    file_ending: str | None = None

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        """Every label value occurring in a target, without 0 (nnU-Net's ``foreground_labels``)."""
        vals: set[int] = set()
        for t in self.targets:
            vals.update(_members(t))
        return tuple(sorted(v for v in vals if v != 0))

    @property
    def bin_values(self) -> tuple[int, ...]:
        """Label values that the joint histogram keeps apart: 0, every target label and the ignore label."""
        vals = {0, *self.foreground_labels}
        for t in self.targets:
            vals.update(_members(t))
        if self.ignore_label is not None:
            vals.add(int(self.ignore_label))
        return tuple(sorted(vals))

    @classmethod
    def from_label_manager(cls, lm: LabelManager, file_ending: str | None = None) -> "EvaluationLabels":
        """What is evaluated for the dataset's labels: its foreground labels or regions, ignore label and names."""
        targets = lm.foreground_targets
        if not targets:
            raise DatasetError("dataset.json declares no foreground label; nothing to evaluate")
        return cls(targets, lm.ignore_label, lm.names, lm.has_regions, file_ending)

    @classmethod
    def from_labels(cls, labels: Sequence[LabelOrRegion], ignore_label: int | None = None,
                    file_ending: str | None = None) -> "EvaluationLabels":
        targets = tuple(_normalize_target(t) for t in labels)
        if not targets:
            raise DatasetError("nothing to evaluate: give at least one label or region")
        has_regions = any(isinstance(t, tuple) for t in targets)
        return cls(targets, None if ignore_label is None else int(ignore_label), {}, has_regions, file_ending)


def _normalize_target(t: Any) -> LabelOrRegion:
    if isinstance(t, (list, tuple)):
        return tuple(int(x) for x in t)
    return int(t)


def _members(t: LabelOrRegion) -> tuple[int, ...]:
    return t if isinstance(t, tuple) else (t,)


def labels_from_dataset_json(d: Mapping[str, Any]) -> EvaluationLabels:
    """The evaluated labels/regions of a dataset.json (:class:`nnfast.labels.LabelManager`'s foreground targets).

    Labels: every declared value (lists flattened) except background 0 and the ignore label, sorted. Regions (any
    label maps to a list of more than one value): every non-background entry except ``ignore`` in declaration
    order, lists as tuples.
    """
    return EvaluationLabels.from_label_manager(LabelManager.from_dataset_json(d), d.get("file_ending"))


# --------------------------------------------------------------------------------------------- counts
def _squeeze(seg: np.ndarray, what: str) -> np.ndarray:
    seg = np.asarray(seg)
    if seg.ndim == 4:
        if seg.shape[0] != 1:
            raise GeometryError(f"{what} has {seg.shape[0]} channels; a label map has one")
        seg = seg[0]
    return seg


def count_matrix(pred: np.ndarray, ref: np.ndarray, labels: EvaluationLabels) -> np.ndarray:
    """TP/FP/FN/TN of every target of ``labels`` for one case.

    Parameters
    ----------
    pred, ref : ndarray, (z, y, x) or (1, z, y, x) (2D arrays work too), integer dtypes, same shape
        Predicted and reference label maps.
    labels : EvaluationLabels

    Returns
    -------
    ndarray of int64, shape (n_targets, 4)
        Columns TP, FP, FN, TN; voxels whose reference is the ignore label are not counted.

    Raises
    ------
    GeometryError
        The shapes differ.
    """
    from ..native.confusion import joint_histogram

    pred = _squeeze(pred, "the prediction")
    ref = _squeeze(ref, "the reference")
    if pred.shape != ref.shape:
        raise GeometryError(f"prediction has shape {pred.shape} but the reference has {ref.shape}")
    values = labels.bin_values
    hist = joint_histogram(ref, pred, values)
    return counts_from_histogram(hist, values, labels)


def counts_from_histogram(hist: np.ndarray, values: Sequence[int], labels: EvaluationLabels) -> np.ndarray:
    """TP/FP/FN/TN per target from a joint histogram ``hist[bin(ref), bin(pred)]`` over ``values`` (+ other)."""
    n_bins = len(values) + 1
    index = {v: i for i, v in enumerate(values)}
    valid = np.ones(n_bins, bool)
    if labels.ignore_label is not None and labels.ignore_label in index:
        valid[index[labels.ignore_label]] = False
    out = np.zeros((len(labels.targets), 4), np.int64)
    for k, t in enumerate(labels.targets):
        inside = np.zeros(n_bins, bool)
        for v in _members(t):
            if v in index:
                inside[index[v]] = True
        rows_in = inside & valid
        rows_out = ~inside & valid
        out[k, TP] = hist[np.ix_(rows_in, inside)].sum()
        out[k, FN] = hist[np.ix_(rows_in, ~inside)].sum()
        out[k, FP] = hist[np.ix_(rows_out, inside)].sum()
        out[k, TN] = hist[np.ix_(rows_out, ~inside)].sum()
    return out


def counts_to_metrics(counts: np.ndarray) -> dict[str, Any]:
    """nnU-Net's per-case metric dict of one target from its ``(TP, FP, FN, TN)`` (NumPy scalars, as nnU-Net)."""
    tp, fp, fn, tn = (np.int64(c) for c in counts)
    if tp + fp + fn == 0:
        dice = iou = np.nan
    else:
        dice = 2 * tp / (2 * tp + fp + fn)
        iou = tp / (tp + fp + fn)
    return {"Dice": dice, "IoU": iou, "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}


def compute_metrics(pred: np.ndarray, ref: np.ndarray, labels_or_regions: Sequence[LabelOrRegion],
                    ignore_label: int | None = None) -> dict[LabelOrRegion, dict[str, Any]]:
    """nnU-Net's ``compute_metrics`` on arrays: ``{label_or_region: {"Dice", "IoU", "FP", "TP", "FN", "TN",
    "n_pred", "n_ref"}}``.

    Parameters
    ----------
    pred, ref : ndarray, (z, y, x) or (1, z, y, x), integer dtypes, same shape
    labels_or_regions : sequence of int or tuple of int
        Labels, or regions (tuples: the union of their labels).
    ignore_label : int, optional
        Reference voxels with this value are excluded from every count.

    Returns
    -------
    dict
        Dice/IoU are floats (NaN when the target is absent from both maps), counts are integers.
    """
    labels = EvaluationLabels.from_labels(labels_or_regions, ignore_label)
    counts = count_matrix(pred, ref, labels)
    return {t: plain_metrics(counts_to_metrics(counts[k])) for k, t in enumerate(labels.targets)}


def plain_metrics(d: dict) -> dict:
    """Metric values as plain Python ``float``/``int`` (JSON-ready); NumPy scalars converted."""
    return {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in d.items()}


# --------------------------------------------------------------------------------------------- summary
@dataclass(frozen=True, eq=False)
class Summary:
    """Metrics of a folder of predictions: per case, mean over cases, mean over foreground labels.

    Attributes
    ----------
    labels : EvaluationLabels
    case_ids : tuple of str
        Sorted by file name (nnU-Net's order).
    reference_files, prediction_files : tuple of str
    counts : ndarray of int64, shape (n_cases, n_targets, 4)
        TP, FP, FN, TN per case and target; every metric derives from these.
    """

    labels: EvaluationLabels
    case_ids: tuple[str, ...]
    reference_files: tuple[str, ...]
    prediction_files: tuple[str, ...]
    counts: np.ndarray
    # derived from counts by __post_init__ (not constructor arguments)
    _per_case: list[dict[LabelOrRegion, dict[str, Any]]] = field(init=False, repr=False, compare=False)
    _mean: dict[LabelOrRegion, dict[str, float]] = field(init=False, repr=False, compare=False)
    _fg: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, np.int64).reshape(len(self.case_ids), len(self.labels.targets), 4)
        object.__setattr__(self, "counts", counts)
        per_case, mean, fg = _aggregate(counts, self.labels.targets)
        object.__setattr__(self, "_per_case", per_case)
        object.__setattr__(self, "_mean", mean)
        object.__setattr__(self, "_fg", fg)

    @property
    def metric_per_case(self) -> list[dict[LabelOrRegion, dict[str, Any]]]:
        """Per case: ``{target: {metric: value}}``."""
        return self._per_case

    @property
    def mean(self) -> dict[LabelOrRegion, dict[str, float]]:
        """Per target: ``np.nanmean`` over cases of each metric."""
        return self._mean

    @property
    def foreground_mean(self) -> dict[str, float]:
        """Per metric: mean over targets other than 0 of :attr:`mean`."""
        return self._fg

    @property
    def foreground_dice(self) -> float:
        """``foreground_mean["Dice"]``, the number nnU-Net ranks configurations by."""
        return float(self._fg["Dice"])

    def dice(self, target: LabelOrRegion) -> float:
        """Mean Dice of one target."""
        return float(self._mean[target]["Dice"])

    def to_json(self) -> dict:
        """nnU-Net's ``summary.json`` content (labels as string keys) plus ``schema_version``/``nnfast_version``."""
        from .. import __version__

        per_case = []
        for i in range(len(self.case_ids)):
            per_case.append({
                "reference_file": self.reference_files[i],
                "prediction_file": self.prediction_files[i],
                "metrics": {label_key(t): plain_metrics(m) for t, m in self._per_case[i].items()},
            })
        return {
            "metric_per_case": per_case,
            "mean": {label_key(t): plain_metrics(m) for t, m in self._mean.items()},
            "foreground_mean": plain_metrics(self._fg),
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "nnfast_version": __version__,
        }

    def write(self, path: Path | str) -> Path:
        """Write :meth:`to_json` to ``path`` atomically, keys sorted like nnU-Net's ``save_summary_json``."""
        from ..io.atomic import write_json_atomic

        write_json_atomic(Path(path), self.to_json(), sort_keys=True)
        return Path(path)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], labels: EvaluationLabels | None = None) -> "Summary":
        """Rebuild a summary from ``summary.json`` content (nnfast's or nnU-Net's) via the stored counts."""
        cases = d.get("metric_per_case")
        if not isinstance(cases, list):
            raise DatasetError("summary.json has no `metric_per_case` list")
        if labels is None:
            keys = list(d.get("mean", {}).keys()) or (list(cases[0]["metrics"].keys()) if cases else [])
            labels = EvaluationLabels.from_labels([parse_label_key(k) for k in keys])
        counts = np.zeros((len(cases), len(labels.targets), 4), np.int64)
        for i, c in enumerate(cases):
            for k, t in enumerate(labels.targets):
                m = c["metrics"][label_key(t)]
                counts[i, k] = (m["TP"], m["FP"], m["FN"], m["TN"])
        refs = tuple(str(c.get("reference_file", "")) for c in cases)
        preds = tuple(str(c.get("prediction_file", "")) for c in cases)
        ids = tuple(_case_id(Path(p).name, labels.file_ending) for p in preds)
        # nnfast and nnU-Net write prediction files with a known ending, which _case_id strips; a hand-made
        # summary.json naming a file without one would put None here (kept as it was)
        return cls(labels, cast(tuple[str, ...], ids), refs, preds, counts)

    def format(self) -> str:
        """A readable table: per target mean Dice / IoU, cases where it is absent (NaN), mean voxel counts."""
        rows = [("label", "name", "Dice", "IoU", "NaN cases", "n_ref", "n_pred")]
        for k, t in enumerate(self.labels.targets):
            m = self._mean[t]
            n_nan = int(np.sum(self.counts[:, k, TP] + self.counts[:, k, FP] + self.counts[:, k, FN] == 0))
            rows.append((label_key(t), self.labels.names.get(label_key(t), ""), _fmt(m["Dice"]), _fmt(m["IoU"]),
                         f"{n_nan}/{len(self.case_ids)}", f"{m['n_ref']:.0f}" if not math.isnan(m["n_ref"]) else "-",
                         f"{m['n_pred']:.0f}" if not math.isnan(m["n_pred"]) else "-"))
        rows.append(("foreground", "mean", _fmt(self._fg["Dice"]), _fmt(self._fg["IoU"]), "", "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"{len(self.case_ids)} case(s)"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:.4f}"


def _aggregate(counts: np.ndarray, targets: Sequence[LabelOrRegion]):
    """nnU-Net's per-case metrics, nanmean over cases, mean over foreground targets (same NumPy calls)."""
    per_case = [{t: counts_to_metrics(counts[i, k]) for k, t in enumerate(targets)} for i in range(counts.shape[0])]
    mean: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN column is NaN, as in nnU-Net
        for t in targets:
            mean[t] = {m: float(np.nanmean([c[t][m] for c in per_case])) if per_case else math.nan
                       for m in METRICS}
        fg = {}
        for m in METRICS:
            values = [mean[t][m] for t in targets if not (t == 0 or t == "0")]
            fg[m] = float(np.mean(values)) if values else math.nan
    return per_case, mean, fg


# --------------------------------------------------------------------------------------------- folders
def list_segmentations(folder: Path, file_ending: str | None = None) -> dict[str, Path]:
    """``{case_id: path}`` of the segmentation files in ``folder`` (hidden files skipped), sorted by file name.

    ``file_ending`` (e.g. ``".nii.gz"``) selects the files; without it every known image ending is accepted except
    ``summary.png``, the picture ``nnfast evaluate`` draws beside ``summary.json`` (not a segmentation of a case).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseNotFoundError(f"folder `{folder}` does not exist")
    out = {}
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.name.startswith(".") or not p.is_file() or (file_ending is None and p.name == SUMMARY_PICTURE):
            continue
        cid = _case_id(p.name, file_ending)
        if cid is not None:
            out[cid] = p
    return out


def _case_id(name: str, file_ending: str | None) -> str | None:
    endings = (file_ending,) if file_ending else _ENDINGS
    for e in endings:
        if name.endswith(e) and len(name) > len(e):
            return name[: -len(e)]
    return None


@dataclass(frozen=True)
class _CaseTask:
    case_id: str
    pred: str
    ref: str
    labels: EvaluationLabels


def _evaluate_case(task: _CaseTask) -> np.ndarray:
    pred, ref = read_pair(Path(task.pred), Path(task.ref), task.case_id)
    return count_matrix(pred, ref, task.labels)


def read_pair(pred_file: Path, ref_file: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a prediction and its reference, (z, y, x) each, checking that they share one grid.

    Raises
    ------
    GeometryError
        Shapes differ, or spacings differ by more than 0.1 %; the message names the case and both files.
    """
    from ..io.image import read_label

    pred, pg = read_label(pred_file)
    ref, rg = read_label(ref_file)
    if pg.shape != rg.shape:
        raise GeometryError(
            f"case {case_id}: prediction `{pred_file}` has shape {pg.shape} but the reference `{ref_file}` has "
            f"{rg.shape} (array order z, y, x); predictions must be exported on the reference image's grid")
    if not np.allclose(pg.spacing, rg.spacing, rtol=1e-3, atol=1e-6):
        raise GeometryError(
            f"case {case_id}: prediction `{pred_file}` has spacing {pg.spacing} but the reference `{ref_file}` has "
            f"{rg.spacing} (mm, array order z, y, x); predictions must be exported on the reference image's grid")
    return pred[0], ref[0]


def resolve_labels(labels: EvaluationLabels | Mapping[str, Any] | Path | str | Sequence[LabelOrRegion],
                   ignore_label: int | None = None) -> EvaluationLabels:
    """:class:`EvaluationLabels` from a dataset.json (path or dict), a list of labels/regions, or as given."""
    if isinstance(labels, EvaluationLabels):
        return labels
    if isinstance(labels, (str, Path)):
        from ..io.dataset import load_dataset_json

        return labels_from_dataset_json(load_dataset_json(Path(labels)))
    if isinstance(labels, Mapping):
        return labels_from_dataset_json(labels)
    return EvaluationLabels.from_labels(list(labels), ignore_label)


def match_cases(pred_dir: Path, ref_dir: Path, file_ending: str | None) -> list[tuple[str, Path, Path]]:
    """``(case_id, prediction, reference)`` for every prediction in ``pred_dir``; each needs a reference.

    References without a prediction are logged (nnU-Net evaluates what was predicted).

    Raises
    ------
    CaseNotFoundError
        A folder is missing, it holds no predictions, or a prediction has no reference file.
    """
    preds = list_segmentations(pred_dir, file_ending)
    refs = list_segmentations(ref_dir, file_ending)
    if not preds:
        raise CaseNotFoundError(f"no predictions{f' ending in {file_ending}' if file_ending else ''} in `{pred_dir}`")
    missing = [c for c in preds if c not in refs]
    if missing:
        raise CaseNotFoundError(
            f"no reference in `{ref_dir}` for {len(missing)} prediction(s) of `{pred_dir}`: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; point --ref at the folder holding "
            "the ground truth (e.g. <preprocessed>/<Dataset>/gt_segmentations)")
    unpredicted = [c for c in refs if c not in preds]
    if unpredicted:
        log.info("%d reference case(s) in %s have no prediction in %s and are not evaluated", len(unpredicted),
                 ref_dir, pred_dir)
    return [(c, p, refs[c]) for c, p in preds.items()]


def image_voxels(path: Path) -> int:
    """Number of voxels of an image file, from its header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(np.prod(reader.GetSize()))


def pool_workers(workers: int, files: Sequence[Path], min_voxels: int) -> tuple[int, list[int]]:
    """``(workers to use, voxels per file)``: 1 when the files hold fewer than ``min_voxels`` voxels in all (a pool
    would cost more than it saves), else ``workers``. Headers are read only when ``workers > 1``."""
    if workers <= 1 or len(files) <= 1:
        return 1, [Path(f).stat().st_size for f in files]
    voxels = [image_voxels(Path(f)) for f in files]
    if sum(voxels) < min_voxels:
        log.debug("%d voxels in %d files: working in this process", sum(voxels), len(files))
        return 1, voxels
    return workers, voxels


def evaluate_folder(
    pred_dir: Path | str,
    ref_dir: Path | str,
    labels: EvaluationLabels | Mapping[str, Any] | Path | str | Sequence[LabelOrRegion],
    workers: int = 1,
    *,
    ignore_label: int | None = None,
    output_file: Path | str | None = None,
    write_summary: bool = True,
    progress=None,
) -> Summary:
    """Evaluate every prediction in ``pred_dir`` against the file of the same name in ``ref_dir``.

    Parameters
    ----------
    pred_dir, ref_dir : path
        Predicted and reference segmentations (same file names, e.g. ``case_001.nii.gz``).
    labels : dataset.json path or dict, list of labels/regions, or EvaluationLabels
        What to evaluate. From a dataset.json: its foreground labels (or regions), ignore label and file ending.
    workers : int
        Worker processes (one case each at a time); folders smaller than :data:`EVALUATE_POOL_MIN_VOXELS` are
        evaluated in this process.
    ignore_label : int, optional
        With a plain list of labels: the ignore label.
    output_file : path, optional
        Where to write ``summary.json``; default ``pred_dir/summary.json``.
    write_summary : bool
        False: write nothing (``output_file`` must then be None).
    progress : callable, optional
        ``progress(done, total, case_id)``.

    Returns
    -------
    Summary

    Raises
    ------
    CaseNotFoundError
        Missing folders or references.
    GeometryError
        A prediction and its reference differ in shape or spacing (the case is named).
    """
    from ..parallel import run_tasks

    if not write_summary and output_file is not None:
        raise SettingsError(f"evaluate_folder: output_file={output_file!r} with write_summary=False; pass one or the "
                            "other")
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    ev = resolve_labels(labels, ignore_label)
    cases = match_cases(pred_dir, ref_dir, ev.file_ending)
    tasks = [_CaseTask(c, str(p), str(r), ev) for c, p, r in cases]
    workers, sizes = pool_workers(workers, [Path(t.pred) for t in tasks], EVALUATE_POOL_MIN_VOXELS)
    counts = run_tasks(_evaluate_case, tasks, workers=workers, keys=[t.case_id for t in tasks], sizes=sizes,
                       progress=progress, desc="evaluate")
    summary = Summary(ev, tuple(t.case_id for t in tasks), tuple(t.ref for t in tasks),
                      tuple(t.pred for t in tasks), np.stack(counts))
    if write_summary:
        summary.write(pred_dir / SUMMARY_FILE if output_file is None else Path(output_file))
    return summary
