"""Convert a Medical Segmentation Decathlon task (``TaskXX_Name``) into an nnU-Net v2 raw dataset.

Reproduces nnU-Net's ``nnunetv2/dataset_conversion/convert_MSD_dataset.py`` (``nnUNetv2_convert_MSD_dataset``):

- ``TaskXX_Name`` becomes ``<raw_root>/Dataset{XXX:03d}_Name`` (the id is the number after ``Task``; ``dataset_id``
  overrides it, like nnU-Net's ``overwrite_target_id``).
- A 3D image ``imagesTr/<case>.nii.gz`` is copied byte for byte to ``imagesTr/<case>_0000.nii.gz``; a 4D image is
  split into one 3D file per volume ``<case>_{t:04d}.nii.gz`` with the 3D part of its geometry (spacing[:-1],
  origin[:-1], direction[:3, :3]); ``imagesTs`` likewise; ``labelsTr`` files are copied unchanged. Only ``.nii.gz``
  files are converted; names starting with ``.`` or ``_`` are ignored.
- ``dataset.json``: ``labels`` inverted to ``{name: int}``, ``file_ending = ".nii.gz"``, ``channel_names`` = the old
  ``modality``; ``modality``, ``training`` and ``test`` removed; other keys kept in their order (written with
  ``indent=4`` like nnU-Net's ``save_json``, so the file is byte-identical to nnU-Net's).

Deliberate differences, all stricter or more robust:

- Errors are :mod:`nnfast.errors` exceptions naming the file/folder and what to do, instead of ``assert``.
- The dimension of each image is read from its header only (SimpleITK ``ReadImageInformation``), so 3D files are
  copied without being decompressed (nnU-Net decodes every file).
- Every input file is checked for truncation first (:func:`nnfast.io.nifti_integrity.nifti_integrity_problem`):
  SimpleITK reads truncated ``.nii.gz`` files silently, which would bake zeros into the split channels.
- The task name may contain ``_`` (nnU-Net's ``split('_')`` fails on it); a missing ``imagesTs`` is allowed
  (an empty one is created); ``training``/``test`` keys may be absent.
- Only ``raw_root`` is searched for a dataset already using the id (nnU-Net also searches preprocessed/results).
- Everything is written into a hidden temporary folder in ``raw_root`` that is renamed when complete, so a crash
  never leaves a half-converted dataset that looks finished.
- 3D files are copied in this process; only 4D files are split in workers (:func:`nnfast.parallel.run_tasks`, a
  watched spawn pool: a dead worker becomes :class:`~nnfast.errors.WorkerDiedError` naming the file), and only
  when ``workers > 1`` and there are at least :data:`POOL_MIN_BYTES` of them; otherwise in this process.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..errors import DatasetError, ImageReadError
from ..io.atomic import temporary_sibling
from ..parallel import run_tasks
from ..settings import dataset_folder_name
from ..io.nifti_integrity import nifti_integrity_problem

__all__ = ["convert_msd", "split_4d_image", "parse_msd_folder_name", "POOL_MIN_BYTES"]

logger = logging.getLogger(__name__)

_TASK_RE = re.compile(r"^Task(\d+)_(.+)$")
#: Below this many compressed bytes of 4D images, splitting runs in this process even when ``workers > 1``:
#: starting spawn workers (~1-2 s each on a busy machine) costs more than decoding that much.
POOL_MIN_BYTES = 64 << 20
_ENDING = ".nii.gz"


def parse_msd_folder_name(folder: str | os.PathLike) -> tuple[int, str]:
    """``"Task05_Prostate"`` -> ``(5, "Prostate")``; raises :class:`DatasetError` for other names."""
    name = Path(folder).name
    m = _TASK_RE.match(name)
    if not m:
        raise DatasetError(
            f"`{folder}` is not a Decathlon task folder: expected a name like Task05_Prostate (Task, the task "
            f"number, '_', the name), found `{name}`; rename the folder or pass the extracted task folder itself"
        )
    return int(m.group(1)), m.group(2)


def convert_msd(
    msd_folder: str | os.PathLike,
    raw_root: str | os.PathLike,
    workers: int = 1,
    dataset_id: int | None = None,
) -> Path:
    """Convert the Decathlon task ``msd_folder`` into ``raw_root/Dataset{id:03d}_{Name}``; returns that folder.

    Parameters
    ----------
    msd_folder : path
        An extracted Decathlon task, ``TaskXX_Name`` with ``imagesTr/``, ``labelsTr/``, ``dataset.json`` (and
        usually ``imagesTs/``).
    raw_root : path
        The raw data folder (nnU-Net's ``nnUNet_raw``); created if missing.
    workers : int
        Processes used to split/copy images; 1 converts in this process.
    dataset_id : int, optional
        Target dataset id; default the task number.

    Raises
    ------
    DatasetError
        ``msd_folder`` is not a ``TaskXX_Name`` folder, lacks ``imagesTr``/``labelsTr``/``dataset.json``, its
        ``dataset.json`` is malformed, or the id is already used by a dataset in ``raw_root``.
    ImageReadError
        An image is truncated or corrupt, or has a dimensionality other than 3 or 4 (the file is named).
    WorkerDiedError
        A worker process died (e.g. killed for memory); retry with fewer workers.
    """
    src = Path(msd_folder)
    if not src.is_dir():
        raise DatasetError(f"Decathlon task folder `{src}` does not exist or is not a folder")
    task_id, name = parse_msd_folder_name(src)
    missing = [n for n in ("imagesTr", "labelsTr") if not (src / n).is_dir()]
    if not (src / "dataset.json").is_file():
        missing.append("dataset.json")
    if missing:
        raise DatasetError(
            f"Decathlon task folder `{src}` lacks {', '.join(missing)}; a task needs imagesTr/, labelsTr/ and "
            "dataset.json (imagesTs/ is optional); re-extract the download"
        )
    new_json = _convert_dataset_json(src / "dataset.json")

    target_id = task_id if dataset_id is None else int(dataset_id)
    raw_root = Path(raw_root)
    raw_root.mkdir(parents=True, exist_ok=True)
    taken = _datasets_with_id(raw_root, target_id)
    if taken:
        raise DatasetError(
            f"dataset id {target_id} is already used in `{raw_root}` by `{taken[0].name}`; remove it, or choose "
            "another id (dataset_id=... / --dataset-id)"
        )
    target = raw_root / dataset_folder_name(target_id, name)

    jobs: list[tuple[Path, Path]] = []
    copies: list[tuple[Path, Path]] = []
    for sub, kind in (("imagesTr", "image"), ("imagesTs", "image"), ("labelsTr", "label")):
        for f in _task_files(src / sub):
            (jobs if kind == "image" else copies).append((f, Path(sub)))
    logger.info(
        "converting %s -> %s: %d images, %d labels, %d worker(s)", src, target, len(jobs), len(copies), workers
    )

    tmp = temporary_sibling(target)
    try:
        for sub in ("imagesTr", "imagesTs", "labelsTr"):
            (tmp / sub).mkdir(parents=True)
        for f, sub in copies:
            problem = nifti_integrity_problem(f)
            if problem:
                raise ImageReadError(f"label file `{f}` is unusable: {problem}; re-extract or re-download it")
            shutil.copyfile(f, tmp / sub / f.name)
        tasks = []
        for f, sub in jobs:
            if _probe(f) == 3:  # a byte copy: not worth a worker
                shutil.copyfile(f, tmp / sub / f"{f.name[: -len(_ENDING)]}_0000{_ENDING}")
            else:
                tasks.append((str(f), str(tmp / sub)))
        sizes = [os.path.getsize(t[0]) for t in tasks]
        use = workers if len(tasks) > 1 and sum(sizes) >= POOL_MIN_BYTES else 1
        logger.info("splitting %d 4D image(s) with %d worker(s)", len(tasks), use)
        run_tasks(
            _split_task,
            tasks,
            workers=min(use, len(tasks)),
            keys=[Path(t[0]).name for t in tasks],
            sizes=sizes,
            desc="images",
            warmup=False,
        )
        with open(tmp / "dataset.json", "w", encoding="utf-8") as fh:
            json.dump(new_json, fh, indent=4)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s into %s", src.name, target)
    return target


def split_4d_image(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Write ``path`` (3D or 4D ``.nii.gz``) as channel files ``<case>_XXXX.nii.gz`` into ``out_dir``.

    3D: byte copy as ``_0000``. 4D ``(x, y, z, t)``: volume ``t`` -> ``_{t:04d}`` with spacing[:-1], origin[:-1],
    direction[:3, :3] (nnU-Net's ``split_4d_nifti``). Returns the names written.

    Raises
    ------
    ImageReadError
        Truncated/corrupt file, or dimensionality other than 3 or 4.
    """
    import SimpleITK as sitk

    path, out_dir = Path(path), Path(out_dir)
    dim = _probe(path)
    case = path.name[: -len(_ENDING)]
    if dim == 3:
        out = f"{case}_0000{_ENDING}"
        shutil.copyfile(path, out_dir / out)
        return [out]
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ImageReadError(f"cannot read image file `{path}`: it is corrupt; re-extract or re-download it") from None
    arr = sitk.GetArrayFromImage(img)  # (t, z, y, x)
    spacing = tuple(img.GetSpacing()[:-1])
    origin = tuple(img.GetOrigin()[:-1])
    direction = tuple(np.asarray(img.GetDirection()).reshape(4, 4)[:-1, :-1].ravel())
    del img
    written = []
    for t in range(arr.shape[0]):
        vol = sitk.GetImageFromArray(arr[t])
        vol.SetSpacing(spacing)
        vol.SetOrigin(origin)
        vol.SetDirection(direction)
        out = f"{case}_{t:04d}{_ENDING}"
        sitk.WriteImage(vol, str(out_dir / out), True)
        written.append(out)
    logger.debug("split %s into %d channel files", path.name, len(written))
    return written


def _probe(path: Path) -> int:
    """Check ``path`` for truncation and read its header; returns its dimension (3 or 4)."""
    import SimpleITK as sitk

    problem = nifti_integrity_problem(path)
    if problem:
        raise ImageReadError(f"image file `{path}` is unusable: {problem}; re-extract or re-download it")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ImageReadError(
            f"cannot read image file `{path}`: it is corrupt or not a NIfTI image; re-extract or re-download it"
        ) from None
    dim = reader.GetDimension()
    if dim not in (3, 4):
        raise ImageReadError(
            f"image file `{path}` has {dim} dimensions (size {reader.GetSize()}); a Decathlon image must be 3D, or 4D "
            "with the channels (modalities) on the last axis; split it into 3D channel files yourself"
        )
    return dim


def _split_task(task: tuple[str, str]) -> list[str]:
    return split_4d_image(*task)


def _task_files(folder: Path) -> list[Path]:
    """The ``.nii.gz`` files of a task sub-folder (hidden ``.``/``_`` names skipped), sorted; [] if it is missing."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith((".", "_")) or not p.is_file():
            continue
        if not p.name.endswith(_ENDING):
            logger.warning("ignoring `%s`: only %s files are converted", p, _ENDING)
            continue
        out.append(p)
    return out


def _datasets_with_id(raw_root: Path, dataset_id: int) -> list[Path]:
    out = []
    for p in sorted(raw_root.iterdir()):
        m = re.match(r"^Dataset(\d+)_", p.name)
        if m and p.is_dir() and int(m.group(1)) == dataset_id:
            out.append(p)
    return out


def _convert_dataset_json(path: Path) -> dict:
    """The nnU-Net v2 ``dataset.json`` for a Decathlon one (nnU-Net's key order)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"`{path}` is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise DatasetError(f"`{path}` must hold a JSON object, found {type(d).__name__}")
    problems = []
    if "channel_names" in d and "modality" not in d:
        problems.append("it has `channel_names` but no `modality`: it looks like an nnU-Net v2 dataset already")
    elif not isinstance(d.get("modality"), dict) or not d["modality"]:
        problems.append(f"`modality` must be an object such as {{\"0\": \"CT\"}}, found {d.get('modality')!r}")
    labels = d.get("labels")
    inverted: dict[str, int] = {}
    if not isinstance(labels, dict) or not labels:
        problems.append(f"`labels` must be an object such as {{\"0\": \"background\"}}, found {labels!r}")
    else:
        for k, v in labels.items():
            try:
                value = int(k)
            except (TypeError, ValueError):
                problems.append(f"label key {k!r} is not an integer")
                continue
            if str(v) in inverted:
                problems.append(f"label name {v!r} is used for both {inverted[str(v)]} and {value}")
            inverted[str(v)] = value
    if problems:
        raise DatasetError(f"Decathlon `{path}` is malformed: " + "; ".join(problems))
    out = dict(d)
    out["labels"] = inverted
    out["file_ending"] = _ENDING
    out["channel_names"] = out.pop("modality")
    out.pop("training", None)
    out.pop("test", None)
    return out
