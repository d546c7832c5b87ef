"""Model zips: nnfast-trained models in nnU-Net's zip layout, and installing zips from either tool.

:func:`export_model` writes what ``nnUNetv2_export_model_to_zip`` writes, so that nnU-Net's
``nnUNetv2_install_pretrained_model_from_zip`` + ``nnUNetv2_predict`` (or ``nnUNetPredictor``) run an nnfast model::

    <Dataset>/nnUNetTrainer__<plans name>__<config>/
        dataset.json
        plans.json                  nnU-Net's plans (nnfast's converted by :func:`nnfast.plan.nnunet_compat.to_nnunet_plans`)
        dataset_fingerprint.json    (from nnfast_fingerprint.json, where the folder has one)
        fold_<k>/progress.png, fold_<k>/validation/summary.json   (where training wrote them)
        fold_<k>/<checkpoint>.pth   keys nnU-Net's predictor reads: ``network_weights``, ``init_args`` (``plans``,
                                    ``configuration``, ``fold``, ``dataset_json``), ``trainer_name``
                                    (``nnUNetTrainer``: the network is nnU-Net's default PlainConvUNet, same state-dict
                                    keys), ``inference_allowed_mirroring_axes``, ``current_epoch``

The checkpoints hold only tensors and plain containers (they load with ``torch.load(weights_only=True)``, so nnfast
reads them back too). The trainer folder is named as nnU-Net names its own (``nnUNetTrainer__nnUNetPlans__<config>``)
so that nnU-Net's commands find it with their defaults.

:func:`install_model` extracts such a zip (exported by nnfast or by nnU-Net) into the results root. Every member name
is checked first: absolute paths, drive letters and ``..`` components (zip-slip) are refused before anything is
written; the members are extracted into a hidden temporary folder of the results root and moved into place only when
all were extracted.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from .. import layout
from ..errors import CaseNotFoundError, FileFormatError

__all__ = ["NNUNET_TRAINER_NAME", "export_model", "install_model", "check_zip_members"]

log = logging.getLogger(__name__)

#: The trainer whose ``build_network_architecture`` builds nnfast's network in nnU-Net (PlainConvUNet from the plans).
NNUNET_TRAINER_NAME = "nnUNetTrainer"
_NNUNET_PLANS_FILE = "plans.json"
_NNUNET_FINGERPRINT_FILE = "dataset_fingerprint.json"
#: files of a fold folder that nnU-Net's export puts into the zip too (``nnUNetv2_export_model_to_zip`` of an installed
#: model needs them)
_FOLD_EXTRAS = ("progress.png", "debug.json", f"{layout.VALIDATION_FOLDER}/{layout.SUMMARY_FILE}")


def _nnunet_plans(model) -> dict:
    """nnU-Net's plans of a loaded model: the folder's own ``plans.json`` if it is an nnU-Net folder, else nnfast's
    plans converted."""
    own = model.folder / _NNUNET_PLANS_FILE
    if own.is_file():
        return json.loads(own.read_text())
    from ..plan.nnunet_compat import to_nnunet_plans

    return to_nnunet_plans(model.plans, model.dataset_json)


def _nnunet_fingerprint(folder: Path) -> dict | None:
    """nnU-Net's ``dataset_fingerprint.json`` of a trainer folder (its own, or nnfast's converted), if it has one."""
    own = folder / _NNUNET_FINGERPRINT_FILE
    if own.is_file():
        return json.loads(own.read_text())
    ours = folder / layout.FINGERPRINT_FILE
    if not ours.is_file():
        return None
    from ..fingerprint.schema import Fingerprint

    return Fingerprint.from_json(json.loads(ours.read_text())).to_nnunet()


def _checkpoint_bytes(model, index: int, fold, nn_plans: dict, epoch) -> bytes:
    import torch

    ckpt = {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in model.weights[index].items()},
        "init_args": {"plans": nn_plans, "configuration": model.config_name, "fold": fold,
                      "dataset_json": model.dataset_json},
        "trainer_name": NNUNET_TRAINER_NAME,
        "inference_allowed_mirroring_axes": tuple(int(a) for a in model.mirror_axes),
        "current_epoch": int(epoch) if epoch is not None else 0,
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def _epoch(model, fold, checkpoint_name: str):
    side = model.folder / layout.fold_name(fold) / f"{checkpoint_name}.json"
    if side.is_file():
        try:
            return json.loads(side.read_text()).get("current_epoch")
        except ValueError:
            return None
    return None


def export_model(results_root: Path | str, task: str | int, output_zip: Path | str,
                 configs: Sequence[str] = ("3d_fullres",), *, folds: Sequence | None = None,
                 checkpoint_name: str = "checkpoint_final", trainer: str = layout.TRAINER_NAME,
                 plans_identifier: str = layout.PLANS_IDENTIFIER) -> Path:
    """Write the trained ``configs`` of ``task`` as an nnU-Net model zip (layout in the module docstring).

    Parameters
    ----------
    results_root : path
        nnfast's results root.
    task : int or str
        The dataset (``4``, ``Dataset004_Hippocampus``).
    output_zip : path
        The zip to write (atomically; replaced if it exists).
    configs : sequence of str
        Configurations to export (each must be trained).
    folds : sequence, optional
        Folds to export (default: every fold holding the checkpoint).
    checkpoint_name : str
        Which checkpoint (``checkpoint_final``, ``checkpoint_best``); stored as ``<name>.pth``.
    trainer, plans_identifier : str
        The nnfast trainer folder to export (``<trainer>__<plans>__<config>``).

    Returns
    -------
    Path
        ``output_zip``.

    Raises
    ------
    NnfastError
        A configuration or fold is missing, its plans or checkpoints do not fit (raised before the zip is written).
    """
    from ..io.atomic import atomic_target
    from .model import load_model, model_folder_for

    name = checkpoint_name[:-4] if checkpoint_name.endswith(".pth") else checkpoint_name
    name = name[:-3] if name.endswith(".pt") else name
    entries: list[tuple[str, bytes]] = []
    for config in configs:
        folder = model_folder_for(results_root, task, config, trainer=trainer, plans_identifier=plans_identifier)
        model = load_model(folder, folds, name, config_name=config)
        nn_plans = _nnunet_plans(model)
        dest = PurePosixPath(folder.parent.name) / layout.trainer_folder_name(
            config, NNUNET_TRAINER_NAME, str(nn_plans.get("plans_name", "nnUNetPlans")))
        entries.append((str(dest / layout.DATASET_JSON), json.dumps(model.dataset_json, indent=4).encode()))
        entries.append((str(dest / _NNUNET_PLANS_FILE), json.dumps(nn_plans, indent=4).encode()))
        fingerprint = _nnunet_fingerprint(folder)
        if fingerprint is not None:
            entries.append((str(dest / _NNUNET_FINGERPRINT_FILE), json.dumps(fingerprint, indent=4).encode()))
        for i, fold in enumerate(model.folds):
            data = _checkpoint_bytes(model, i, fold, nn_plans, _epoch(model, fold, name))
            fold_dir = layout.fold_name(fold)
            entries.append((str(dest / fold_dir / f"{name}.pth"), data))
            for extra in _FOLD_EXTRAS:  # what nnU-Net's export also carries, where training wrote it
                f = folder / fold_dir / extra
                if f.is_file():
                    entries.append((str(dest / fold_dir / extra), f.read_bytes()))
        log.info("export-model: %s, folds %s", dest, list(model.folds))
    out = Path(output_zip)
    with atomic_target(out, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for arcname, data in entries:
                zf.writestr(arcname, data)
    return out


_DRIVE = re.compile(r"^[A-Za-z]:")


def check_zip_members(zip_path: Path | str) -> list[str]:
    """The member names of a model zip, after checking that every one stays inside the folder it is extracted to.

    Raises
    ------
    CaseNotFoundError
        The file does not exist.
    FileFormatError
        Not a zip file; a member path is absolute, has a drive letter or a ``..`` component (zip-slip), or is a
        symbolic link; the zip holds no ``<Dataset>/<trainer>__<plans>__<config>/`` model folder.
    """
    path = Path(zip_path)
    if not path.is_file():
        raise CaseNotFoundError(f"model zip `{path}` does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise FileFormatError(f"`{path}` is not a readable zip file ({e}); expected a model zip written by "
                              "`nnfast export-model` or `nnUNetv2_export_model_to_zip`") from None
    bad = []
    for info in infos:
        n = info.filename
        parts = re.split(r"[\\/]", n)
        if n.startswith(("/", "\\")) or _DRIVE.match(n) or ".." in parts or "\x00" in n:
            bad.append(n)
        elif (info.external_attr >> 16) & 0o170000 == 0o120000:
            bad.append(f"{n} (symbolic link)")
    if bad:
        shown = ", ".join(f"`{b}`" for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise FileFormatError(f"model zip `{path}` has member path(s) escaping the folder it is extracted to: "
                              f"{shown}; refusing to install it (nothing was written)")
    names = [i.filename for i in infos]
    if not any(len(p := PurePosixPath(n).parts) >= 3 and p[1].count("__") >= 2 for n in names):
        raise FileFormatError(f"`{path}` holds no model folder `<Dataset>/<trainer>__<plans>__<config>/`; expected a "
                              "zip written by `nnfast export-model` or `nnUNetv2_export_model_to_zip`")
    return names


def install_model(zip_path: Path | str, results_root: Path | str) -> list[Path]:
    """Extract a model zip (nnfast's or nnU-Net's) into ``results_root``; existing files of the same names are
    replaced.

    Returns
    -------
    list of Path
        The trainer folders installed (``<results>/<Dataset>/<trainer>__<plans>__<config>``), sorted.

    Raises
    ------
    FileFormatError
        See :func:`check_zip_members`; raised before anything is written.
    """
    names = check_zip_members(zip_path)
    root = Path(results_root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".nnfast-install-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                target = (staging / info.filename).resolve()
                if not target.is_relative_to(staging.resolve()):  # checked above; belt and braces
                    raise FileFormatError(f"model zip `{zip_path}`: member `{info.filename}` escapes the target")
                zf.extract(info, staging)
        moved = []
        for src in sorted(p for p in staging.rglob("*") if p.is_file()):
            dst = root / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    folders = sorted({root / PurePosixPath(n).parts[0] / PurePosixPath(n).parts[1] for n in names
                      if len(PurePosixPath(n).parts) >= 3 and PurePosixPath(n).parts[1].count("__") >= 2})
    log.info("installed %d file(s) from %s into %s", len(moved), zip_path, root)
    return folders
