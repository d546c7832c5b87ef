"""Ensembling: average the saved probabilities of several predictions of the same cases and write segmentations.

nnU-Net rule (``nnunetv2/ensembling/ensemble.py``, v2.8.1): for each case, load ``probabilities`` from every folder's
``<case>.npz``, accumulate in float32 in folder order (``avg = first.astype(float32); avg += next ...; avg /= n``),
convert to a segmentation (argmax over classes; regions: ``probability > 0.5`` painted in ``regions_class_order``;
:meth:`nnfast.labels.LabelManager.segmentation_from_probabilities`, the painting export uses)
and write it with the case's geometry. Every folder must hold the same cases.

nnfast's predictions store the probabilities as ``<case>.npz`` (key ``probabilities``, (C, z, y, x), float16 or
float32) with a ``<case>.json`` sidecar holding the case's properties, among them ``geometry``
(:meth:`nnfast.io.image.ImageGeometry.to_json`); the geometry of the first folder's sidecar is used. nnU-Net's
``--save_probabilities`` output (``<case>.npz`` with the same ``probabilities`` layout, ``<case>.pkl`` properties) is
read too: the ``.pkl`` through the data-only unpickler (:mod:`nnfast.io.safe_pickle`), its ``sitk_stuff`` giving the
geometry; nnU-Net's prediction folders also hold the dataset.json that gives the labels.

Axis order: probabilities (C, z, y, x), the reader's order of the original image; segmentations (z, y, x).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CaseNotFoundError, DatasetError, GeometryError, UsageError
from ..labels import LabelManager

__all__ = ["ensemble_folders", "ensemble_cases", "list_probabilities", "average_probabilities"]

log = logging.getLogger(__name__)

_HINT = "train/predict with --save-probabilities to keep them"


def list_probabilities(folder: Path | str) -> dict[str, Path]:
    """``{case_id: <case>.npz}`` in ``folder`` (hidden files skipped), sorted by case id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseNotFoundError(f"folder `{folder}` does not exist")
    return {p.name[:-4]: p for p in sorted(folder.glob("*.npz")) if not p.name.startswith(".")}


def average_probabilities(files: Sequence[Path | str]) -> np.ndarray:
    """Mean of the ``probabilities`` arrays of ``files``, accumulated in float32 in the given order (nnU-Net's
    ``average_probabilities``).

    Returns
    -------
    ndarray of float32, (C, z, y, x)

    Raises
    ------
    CaseNotFoundError
        A file is missing or has no ``probabilities`` key.
    GeometryError
        The arrays differ in shape (the message names both files).
    """
    if not files:
        raise UsageError("average_probabilities needs at least one file")
    avg = None
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise CaseNotFoundError(f"probabilities `{f}` do not exist; {_HINT}")
        with np.load(f) as z:
            if "probabilities" not in z.files:
                raise CaseNotFoundError(f"`{f}` holds no `probabilities` array (keys: {z.files}); {_HINT}")
            p = z["probabilities"]
        if avg is None:
            avg = p if p.dtype == np.float32 else p.astype(np.float32)
            first = f
            continue
        if p.shape != avg.shape:
            raise GeometryError(f"probabilities `{f}` have shape {p.shape} but `{first}` has {avg.shape}; "
                                "only predictions of the same cases on the same grid can be ensembled")
        avg += p
    avg /= np.float32(len(files))
    return avg


@dataclass(frozen=True)
class _Task:
    case_id: str
    files: tuple[str, ...]
    out_file: str
    labels: LabelManager | None  # None: plain argmax over the channels
    save_probabilities: bool


def _nnunet_geometry(pkl: Path, shape) -> tuple:
    """Geometry from nnU-Net's ``<case>.pkl`` (its ``--save_probabilities`` properties), read data-only."""
    from ..io.image import ImageGeometry
    from ..io.safe_pickle import load_data_pickle

    props = load_data_pickle(
        pkl, refuse=lambda name: DatasetError(f"`{pkl}` refers to `{name}`; nnU-Net's properties files hold only "
                                              "data, so nnfast refuses to load it (it could run code)"),
        unreadable=lambda reason: DatasetError(f"`{pkl}` is not a readable nnU-Net properties file ({reason})"))
    sitk = props.get("sitk_stuff") if isinstance(props, Mapping) else None
    if not isinstance(sitk, Mapping) or not {"spacing", "origin", "direction"} <= set(sitk):
        raise DatasetError(f"`{pkl}` has no SimpleITK geometry (`sitk_stuff` with spacing, origin, direction); "
                           "nnfast ensembles predictions of images read with SimpleITK (.nii.gz, .nrrd, .mha)")
    geom = ImageGeometry(tuple(float(v) for v in props["spacing"]), tuple(float(v) for v in sitk["spacing"]),
                         tuple(float(v) for v in sitk["origin"]), tuple(float(v) for v in sitk["direction"]),
                         tuple(int(v) for v in shape))
    return geom, {"geometry": geom.to_json()}


def _geometry(npz: Path, shape=None):
    """Geometry of a saved probability file: nnfast's ``<case>.json`` sidecar, else nnU-Net's ``<case>.pkl``."""
    from ..io.atomic import read_json
    from ..io.image import ImageGeometry

    side = npz.with_suffix(".json")
    if not side.is_file() and npz.with_suffix(".pkl").is_file() and shape is not None:
        return _nnunet_geometry(npz.with_suffix(".pkl"), shape)
    if not side.is_file():
        raise CaseNotFoundError(f"`{side}` (the geometry of `{npz.name}`) is missing; the ensemble needs the "
                                "sidecar that nnfast writes next to every saved probability file (or nnU-Net's "
                                f"`{npz.with_suffix('.pkl').name}`)")
    d = read_json(side)
    geom = d.get("geometry") if isinstance(d, Mapping) else None
    if geom is None:
        raise CaseNotFoundError(f"`{side}` has no `geometry` entry; re-predict with a current nnfast and "
                                "--save-probabilities")
    return ImageGeometry.from_json(geom), d


def _to_segmentation(probs: np.ndarray, labels: LabelManager | None) -> np.ndarray:
    if labels is None:  # no dataset.json: plain argmax, as many labels as channels
        labels = LabelManager({str(i): i for i in range(probs.shape[0])})
    return labels.segmentation_from_probabilities(probs)


def _ensemble_case(task: _Task) -> str:
    from ..io.atomic import atomic_target, write_json_atomic
    from ..io.image import write_segmentation

    files = [Path(f) for f in task.files]
    probs = average_probabilities(files)
    geometry, sidecar = _geometry(files[0], probs.shape[1:])
    if tuple(probs.shape[1:]) != tuple(geometry.shape):
        raise GeometryError(f"probabilities of case {task.case_id} have spatial shape {probs.shape[1:]} but its "
                            f"image has {geometry.shape} (z, y, x)")
    seg = _to_segmentation(probs, task.labels)
    out = Path(task.out_file)
    write_segmentation(seg, geometry, out)
    if task.save_probabilities:
        npz = out.parent / f"{task.case_id}.npz"
        with atomic_target(npz, suffix=".npz") as tmp:
            np.savez_compressed(tmp, probabilities=probs)
        write_json_atomic(out.parent / f"{task.case_id}.json", sidecar)
    return str(out)


def ensemble_cases(
    groups: Mapping[str, Sequence[Path | str]],
    out_dir: Path | str,
    workers: int = 1,
    *,
    dataset_json: Mapping[str, Any] | None = None,
    file_ending: str | None = None,
    save_probabilities: bool = False,
    progress=None,
) -> list[Path]:
    """Ensemble explicit files: ``groups[case_id]`` lists that case's ``.npz`` files (one per member).

    See :func:`ensemble_folders`; this is the form :mod:`nnfast.evaluate.find_best` uses on the folds' folders.
    """
    from ..parallel import run_tasks

    out_dir = Path(out_dir)
    labels = LabelManager.from_dataset_json(dataset_json) if dataset_json and dataset_json.get("labels") else None
    ending = file_ending or (dataset_json or {}).get("file_ending") or ".nii.gz"
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [_Task(c, tuple(str(f) for f in fs), str(out_dir / f"{c}{ending}"), labels, save_probabilities)
             for c, fs in sorted(groups.items())]
    sizes = [sum(Path(f).stat().st_size for f in t.files) for t in tasks]
    out = run_tasks(_ensemble_case, tasks, workers=workers, keys=[t.case_id for t in tasks], sizes=sizes,
                    progress=progress, desc="ensemble")
    if dataset_json:
        from ..io.atomic import write_json_atomic

        write_json_atomic(out_dir / "dataset.json", dict(dataset_json))
    return [Path(p) for p in out]


def ensemble_folders(
    folders: Sequence[Path | str],
    out_dir: Path | str,
    workers: int = 1,
    *,
    dataset_json: Mapping[str, Any] | Path | str | None = None,
    save_probabilities: bool = False,
    progress=None,
) -> list[Path]:
    """Average the saved probabilities of the same cases in ``folders`` and write the segmentations to ``out_dir``.

    Parameters
    ----------
    folders : sequence of path
        Prediction folders holding ``<case>.npz`` (key ``probabilities``) and ``<case>.json`` for every case.
    out_dir : path
        Receives ``<case><file_ending>`` (and with ``save_probabilities`` the averaged ``.npz`` + sidecar) and a copy
        of the dataset.json.
    workers : int
        Worker processes, one case each at a time.
    dataset_json : dict or path, optional
        Labels (regions and ``regions_class_order``) and file ending; default: ``dataset.json`` of the first folder
        if there is one, else plain argmax and ``.nii.gz``.
    save_probabilities : bool
        Also write the averaged probabilities (float32).

    Returns
    -------
    list of Path
        The written segmentations, sorted by case.

    Raises
    ------
    CaseNotFoundError
        A folder has no probabilities (the message says to predict with ``--save-probabilities``), or the folders
        hold different cases (named).
    GeometryError
        Probabilities of a case differ in shape between folders, or from the image geometry.
    """
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise UsageError(f"an ensemble needs at least two folders; got {len(folders)}")
    if dataset_json is None and (folders[0] / "dataset.json").is_file():
        dataset_json = folders[0] / "dataset.json"
    if isinstance(dataset_json, (str, Path)):
        from ..io.dataset import load_dataset_json

        dataset_json = load_dataset_json(Path(dataset_json))
    per_folder = [list_probabilities(f) for f in folders]
    for f, cases in zip(folders, per_folder):
        if not cases:
            raise CaseNotFoundError(f"no probabilities (<case>.npz) in `{f}`; {_HINT}")
    every = sorted(set().union(*[set(c) for c in per_folder]))
    problems = []
    for f, cases in zip(folders, per_folder):
        missing = [c for c in every if c not in cases]
        if missing:
            problems.append(f"`{f}` lacks {len(missing)}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if problems:
        raise CaseNotFoundError("the folders do not hold the same cases; " + "; ".join(problems)
                                + f" ({_HINT}, for every case)")
    groups = {c: [cases[c] for cases in per_folder] for c in every}
    return ensemble_cases(groups, out_dir, workers, dataset_json=dataset_json, save_probabilities=save_probabilities,
                          progress=progress)
