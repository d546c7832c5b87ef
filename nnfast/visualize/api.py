"""``nnfast overlay``: one PNG per case of a dataset, with its reference labels and, optionally, its predictions.

Sources: the raw dataset (``imagesTr``/``labelsTr`` in nnU-Net's layout, read with :mod:`nnfast.io.image`), or the
preprocessed stores of one configuration (``source="3d_fullres"`` etc.: the normalized image and the resampled
label map of :mod:`nnfast.io.store`, transposed back to reader order; predictions are in the raw geometry, so with
this source a prediction is drawn only where its grid happens to match).

Windowing (:func:`nnfast.visualize.overlay.intensity_window`): a channel normalized with ``CTNormalization`` (named
``CT`` in dataset.json) is shown between the fingerprint's 0.5 and 99.5 foreground percentiles
(``<preprocessed>/<Dataset>/nnfast_fingerprint.json``, else nnU-Net's ``dataset_fingerprint.json``; in a
preprocessed store the same percentiles after the normalization); other channels, or CT without a fingerprint,
between the case's own 0.5 and 99.5 percentiles.

Bad input never stops the run: a case missing from the prediction folder, a prediction or reference whose grid
differs from the image, label values that dataset.json does not declare are drawn around and named in the picture's
title and in a logged warning; a case that cannot be drawn at all (unreadable image) is reported in
:class:`OverlayReport` without a picture. Cases are drawn on worker processes (:func:`nnfast.parallel.run_tasks`).

Axis order: reader order ``(z, y, x)``, spacing in the same order, mm (see :mod:`nnfast.visualize.overlay`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import DatasetError, NnfastError
from ..labels import LabelManager

__all__ = ["OverlayTask", "OverlayResult", "OverlayReport", "overlay_dataset", "draw_overlay_task"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OverlayTask:
    """One picture to draw (picklable; built in the parent, drawn on a worker).

    Exactly one of ``image_file`` (raw source: the file of the chosen channel) and ``store`` (a preprocessed case
    store) is set. ``window`` is the CT window when the fingerprint decides it, else None (per-case percentiles).
    """

    case_id: str
    out_path: str
    labels: LabelManager
    scheme: str
    channel: int = 0
    image_file: str | None = None
    label_file: str | None = None
    store: str | None = None
    pred_file: str | None = None
    pred_dir: str | None = None
    window: tuple[float, float] | None = None
    views: tuple[str, ...] = ("axial",)
    source: str = "raw"


@dataclass(frozen=True)
class OverlayResult:
    """What drawing one case gave: the picture (None when nothing could be drawn), the problems named in its title,
    the error that prevented a picture, and where each view landed in the picture."""

    case_id: str
    path: str | None
    problems: tuple[str, ...] = ()
    error: str | None = None
    panels: tuple = ()  # nnfast.visualize.overlay.Panel per view: where each slice is in the PNG


@dataclass
class OverlayReport:
    """Every case of an ``nnfast overlay`` run."""

    output_folder: Path
    results: list[OverlayResult] = field(default_factory=list)

    @property
    def written(self) -> list[OverlayResult]:
        return [r for r in self.results if r.path is not None]

    @property
    def failed(self) -> list[OverlayResult]:
        return [r for r in self.results if r.path is None]

    @property
    def with_problems(self) -> list[OverlayResult]:
        return [r for r in self.results if r.problems]

    def format(self, details: bool = True) -> str:
        """One line of counts and, with ``details``, one line per problem or error."""
        lines = [f"wrote {len(self.written)} picture(s) to {self.output_folder}"
                 + (f"; {len(self.with_problems)} with problems named in their titles" if self.with_problems else "")
                 + (f"; {len(self.failed)} case(s) could not be drawn" if self.failed else "")]
        if not details:
            return lines[0]
        for r in self.results:
            for p in r.problems:
                lines.append(f"  warning: case {r.case_id}: {p}")
            if r.error:
                lines.append(f"  error: case {r.case_id}: {r.error}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one case
def _read_source(task: OverlayTask) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None, list[str]]:
    """The chosen channel (z, y, x), its spacing, the reference (z, y, x) or None, and problems found."""
    from ..io.image import read_image, read_label

    problems: list[str] = []
    if task.store is not None:
        import zarr

        from ..io.store import read_case_metadata

        props = read_case_metadata(task.store)["properties"]
        root = zarr.open_group(task.store, mode="r")
        back = np.argsort([int(a) for a in props.get("transpose_forward", [0, 1, 2])])
        image = np.asarray(root["image"][task.channel]).transpose(back)
        seg = np.asarray(root["seg"][0]).transpose(back)
        spacing = tuple(float(props["target_spacing"][b]) for b in back)
        return image, spacing, np.where(seg < 0, 0, seg), problems
    data, geom = read_image(Path(task.image_file))
    if data.shape[0] != 1:
        raise DatasetError(f"image file `{task.image_file}` holds {data.shape[0]} channels; expected one per file")
    image, spacing = data[0], geom.spacing
    ref = None
    if task.label_file is None or not Path(task.label_file).is_file():
        problems.append(f"no reference label file `{task.label_file}`" if task.label_file else "no reference label")
    else:
        try:
            seg, lgeom = read_label(Path(task.label_file))
            mismatch = _geometry_mismatch(seg.shape[1:], lgeom.spacing, image.shape, spacing)
            if mismatch:
                problems.append(f"reference `{Path(task.label_file).name}` {mismatch}; not drawn")
            else:
                ref = seg[0]
        except NnfastError as e:
            problems.append(f"reference not drawn: {e}")
    return image, spacing, ref, problems


def _geometry_mismatch(shape, spacing, image_shape, image_spacing) -> str | None:
    if tuple(shape) != tuple(image_shape):
        return f"has shape {tuple(shape)} but the image has {tuple(image_shape)}"
    if not np.allclose(spacing, image_spacing, rtol=1e-3, atol=1e-5):
        return (f"has spacing {tuple(round(s, 4) for s in spacing)} but the image has "
                f"{tuple(round(s, 4) for s in image_spacing)}")
    return None


def _read_prediction(task: OverlayTask, image_shape, spacing) -> tuple[np.ndarray | None, list[str]]:
    from ..io.image import read_label

    if task.pred_dir is None:
        return None, []
    if task.pred_file is None or not Path(task.pred_file).is_file():
        name = Path(task.pred_file).name if task.pred_file else task.case_id
        return None, [f"missing from the predictions: no `{name}` in `{task.pred_dir}`"]
    try:
        pred, geom = read_label(Path(task.pred_file))
    except NnfastError as e:
        return None, [f"prediction not drawn: {e}"]
    mismatch = _geometry_mismatch(pred.shape[1:], geom.spacing, image_shape, spacing)
    if mismatch:
        return None, [f"prediction `{Path(task.pred_file).name}` {mismatch}; not drawn"]
    return pred[0], []


def _undeclared(seg: np.ndarray | None, labels: LabelManager, what: str) -> list[str]:
    if seg is None:
        return []
    bad = sorted(set(np.unique(seg).tolist()) - set(labels.declared_values))
    if not bad:
        return []
    return [f"{what} holds label value(s) {', '.join(map(str, bad))} not in dataset.json (drawn in magenta)"]


def draw_overlay_task(task: OverlayTask) -> OverlayResult:
    """Draw one case (the worker function of :func:`overlay_dataset`); never raises for a bad case."""
    from .overlay import intensity_window, render_case

    try:
        image, spacing, ref, problems = _read_source(task)
    except (NnfastError, OSError, ValueError, KeyError) as e:
        return OverlayResult(task.case_id, None, (), f"cannot read the image: {e}")
    pred, pred_problems = _read_prediction(task, image.shape, spacing)
    problems += pred_problems
    problems += _undeclared(ref, task.labels, "the reference")
    problems += _undeclared(pred, task.labels, "the prediction")
    window = task.window or intensity_window(image, task.scheme)
    channel = f", channel {task.channel}" if task.channel else ""
    title = f"{task.case_id} ({task.source}{channel})"
    try:
        pic = render_case(task.out_path, image, spacing, window, task.labels, reference=ref, prediction=pred,
                          title=title, problems=problems, views=task.views)
    except (NnfastError, OSError, ValueError) as e:
        return OverlayResult(task.case_id, None, tuple(problems), f"cannot draw: {e}")
    return OverlayResult(task.case_id, str(pic.path), tuple(problems), None, pic.panels)


# ------------------------------------------------------------------------------------------------ the dataset
def _fingerprint_stats(folder: Path | None):
    """The fingerprint's per-channel intensity statistics from a preprocessed dataset folder, or None."""
    from ..fingerprint.schema import Fingerprint

    if folder is None:
        return None
    for name, parse in (("nnfast_fingerprint.json", Fingerprint.from_json),
                        ("dataset_fingerprint.json", Fingerprint.from_nnunet)):
        f = folder / name
        if f.is_file():
            try:
                return parse(json.loads(f.read_text(encoding="utf-8"))).foreground_intensity_properties_per_channel
            except (NnfastError, ValueError, KeyError, TypeError) as e:
                log.warning("cannot use the fingerprint `%s` for windowing (%s)", f, e)
    return None


def _preprocessed_folder(task: str | int, settings) -> Path | None:
    from ..settings import find_dataset_folder

    if settings.preprocessed is None:
        return None
    try:
        return find_dataset_folder(task, settings.preprocessed)
    except FileNotFoundError:
        return None


def overlay_dataset(
    task: str | int,
    settings,
    output_folder: Path | str,
    *,
    cases: Sequence[str] | None = None,
    pred_dir: Path | str | None = None,
    workers: int = 1,
    channel: int = 0,
    views: Sequence[str] = ("axial",),
    source: str = "raw",
    progress: Callable[[int, int, str], None] | None = None,
) -> OverlayReport:
    """Draw ``<output_folder>/<case>.png`` for every case (or those named) of a dataset.

    Parameters
    ----------
    task : str or int
        The dataset (``7``, ``Dataset007_Name``).
    settings : nnfast.settings.Settings
        Data folders: raw (``source="raw"``) or preprocessed (a configuration name as ``source``).
    output_folder : path
    cases : sequence of str, optional
        Case ids to draw (default: every training case of the source). Ids the source lacks are reported.
    pred_dir : path, optional
        Folder of predicted segmentations ``<case><file_ending>`` on the image's grid (``nnfast predict``'s output,
        a fold's ``validation`` folder).
    workers : int
        Worker processes (one case each at a time).
    channel : int
        Image channel to show.
    views : sequence of ``"axial"``, ``"coronal"``, ``"sagittal"``
    source : ``"raw"`` or a configuration name (``"2d"``, ``"3d_fullres"``, ``"3d_lowres"``)
    progress : callable, optional
        ``progress(done, total, case_id)``.

    Returns
    -------
    OverlayReport
        Per case: the picture, the problems named in its title (also logged as warnings), or the error.

    Raises
    ------
    DatasetError
        ``channel`` is not a channel of the dataset, or the source has no cases.
    DatasetNotFoundError, PlanError
        The dataset, or (preprocessed source) its plans, cannot be found.
    """
    from ..io.dataset import load_dataset, load_dataset_json
    from ..parallel import run_tasks
    from ..preprocess.normalization import scheme_for_channel_name
    from ..settings import find_dataset_folder

    out = Path(output_folder)
    pre_folder = _preprocessed_folder(task, settings)
    per_case: dict[str, dict] = {}
    if source == "raw":
        info, case_files = load_dataset(find_dataset_folder(task, settings.require("raw")))
        d, name = info.raw, info.name
        _check_channel(channel, len(info.channel_names), name)
        for c in case_files:
            image_file = c.image_files[channel] if channel < len(c.image_files) else None
            per_case[c.case_id] = dict(image_file=None if image_file is None else str(image_file),
                                       label_file=None if c.label_file is None else str(c.label_file))
        scheme = scheme_for_channel_name(str(info.channel_names[str(channel)]))
        stats = _fingerprint_stats(pre_folder) if scheme == "CTNormalization" else None
        window = None
        if stats is not None and channel < len(stats):
            window = (float(stats[channel].percentile_00_5), float(stats[channel].percentile_99_5))
        elif scheme == "CTNormalization":
            log.warning("%s: no fingerprint in the preprocessed folder (run `nnfast plan`); CT is windowed with "
                        "each case's own percentiles", name)
    else:
        from ..io.store import list_case_ids, store_path
        from ..plan.api import plans_path
        from ..plan.planner import load_plans

        folder = find_dataset_folder(task, settings.require("preprocessed"))
        d, name = load_dataset_json(folder / "dataset.json"), folder.name
        plans = load_plans(plans_path(folder))
        cfg = plans.configuration(source)
        _check_channel(channel, len(cfg.normalization_schemes), name)
        stores = folder / cfg.data_identifier
        for cid in list_case_ids(stores):
            per_case[cid] = dict(store=str(store_path(stores, cid)))
        scheme = cfg.normalization_schemes[channel]
        window = None
        if scheme == "CTNormalization":
            s = plans.foreground_intensity_properties_per_channel[channel]
            std = max(float(s.std), 1e-8)
            window = ((s.percentile_00_5 - s.mean) / std, (s.percentile_99_5 - s.mean) / std)
    if not per_case:
        raise DatasetError(f"{name} has no cases in its {source} source")
    labels = LabelManager.from_dataset_json(d)
    ending = d.get("file_ending", ".nii.gz")
    report = OverlayReport(out)
    wanted = list(cases) if cases else sorted(per_case)
    tasks = []
    for cid in wanted:
        if cid not in per_case:
            report.results.append(OverlayResult(cid, None, (), f"no case `{cid}` in the {source} source of {name}"))
            continue
        tasks.append(OverlayTask(
            case_id=cid, out_path=str(out / f"{cid}.png"), labels=labels, scheme=scheme, channel=channel,
            pred_file=str(Path(pred_dir) / f"{cid}{ending}") if pred_dir is not None else None,
            pred_dir=str(pred_dir) if pred_dir is not None else None, window=window, views=tuple(views),
            source=source, **per_case[cid]))
    out.mkdir(parents=True, exist_ok=True)
    results = run_tasks(draw_overlay_task, tasks, workers=workers, keys=[t.case_id for t in tasks],
                        progress=progress, desc="overlay", warmup=False)
    report.results.extend(results)
    for r in report.results:
        for p in r.problems:
            log.warning("case %s: %s", r.case_id, p)
        if r.error:
            log.warning("case %s: no picture: %s", r.case_id, r.error)
    return report


def _check_channel(channel: int, n: int, name: str) -> None:
    if not 0 <= channel < n:
        raise DatasetError(f"{name} has {n} channel(s) (0..{n - 1}); --channel {channel} is not one of them")
