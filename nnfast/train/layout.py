"""Where a training run lives on disk (nnU-Net v2's ``<results>/<Dataset>/<trainer>__<plans>__<config>/fold_<k>``).

Layout (``<results>`` = the results root, ``<Dataset>`` = e.g. ``Dataset004_Hippocampus``)::

    <results>/<Dataset>/nnfastTrainer__nnfast_plans__<config>/
        nnfast_plans.json         copy of the plans the network was built from (inference reads it)
        dataset.json              copy of the dataset's dataset.json
        nnfast_fingerprint.json   copy of the fingerprint (when present)
        fold_<k>/                 k = 0..4 or "all"
            train_config.json     the resolved TrainConfig of the last start
            checkpoint_latest.pt/.json   every save_every epochs and when a run stops early (resume point)
            checkpoint_best.pt/.json     whenever the EMA pseudo-Dice improves
            checkpoint_final.pt/.json    at the end (checkpoint_latest is then removed)
            training_log.txt      human-readable log, appended
            progress.json / progress.csv / progress.png   per-epoch history and its plot
            validation/           the final validation's predictions and summary.json
        predicted_next_stage/<next config>/<case>.zarr   a cascade's first stage (3d_lowres): its segmentation of
                                  each case on the next stage's grid, written by the validation of the fold that
                                  held the case out (nnfast.io.prev_stage)

Checkpoint contents: :mod:`nnfast.train.checkpoint`. This module does not import torch.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal, Union

from ..errors import PlanError, SettingsError
from ..io.atomic import atomic_target, read_json
from .config import TrainConfig

__all__ = ["TRAINER_NAME", "PLANS_IDENTIFIER", "Fold", "check_fold", "fold_name", "trainer_folder", "fold_folder",
           "previous_stage_folder", "load_saved_train_config", "prepare_trainer_folder"]

TRAINER_NAME = "nnfastTrainer"
PLANS_IDENTIFIER = "nnfast_plans"
Fold = Union[int, Literal["all"]]


def check_fold(fold: Any) -> Fold:
    """``fold`` as an int or ``"all"`` (CLI strings such as ``"3"`` accepted).

    Raises
    ------
    SettingsError
        Anything else (negative numbers, booleans, other strings).
    """
    if fold == "all":
        return "all"
    try:
        f = int(fold)
    except (TypeError, ValueError):
        raise SettingsError(f"fold must be 0..4 (or another non-negative integer) or 'all', got {fold!r}") from None
    if f < 0 or isinstance(fold, bool) or str(f) != str(fold).strip():
        raise SettingsError(f"fold must be a non-negative integer or 'all', got {fold!r}")
    return f


def fold_name(fold: Fold) -> str:
    """``fold_<k>`` / ``fold_all``."""
    fold = check_fold(fold)
    return "fold_all" if fold == "all" else f"fold_{fold}"


def trainer_folder(results_root: Path | str, dataset_name: str, config_name: str) -> Path:
    """``<results>/<Dataset>/nnfastTrainer__nnfast_plans__<config>``."""
    return Path(results_root) / dataset_name / f"{TRAINER_NAME}__{PLANS_IDENTIFIER}__{config_name}"


def fold_folder(results_root: Path | str, dataset_name: str, config_name: str, fold: Fold) -> Path:
    """``trainer_folder(...)/fold_<k>`` (``fold_all`` for fold ``"all"``)."""
    return trainer_folder(results_root, dataset_name, config_name) / fold_name(fold)


def previous_stage_folder(results_root: Path | str, dataset_name: str, previous_stage: str, config_name: str) -> Path:
    """Where the first stage of a cascade keeps its segmentations for the stage ``config_name`` (nnU-Net's layout):
    ``<results>/<Dataset>/nnfastTrainer__nnfast_plans__<previous_stage>/predicted_next_stage/<config_name>``."""
    return trainer_folder(results_root, dataset_name, previous_stage) / "predicted_next_stage" / config_name


def load_saved_train_config(folder: Path | str) -> TrainConfig | None:
    """The ``train_config.json`` of a fold folder, or None when there is none."""
    p = Path(folder) / "train_config.json"
    return TrainConfig.from_json(read_json(p)) if p.is_file() else None


def _copy_into(src: Path, dst: Path) -> None:
    with atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)


def prepare_trainer_folder(root: Path, pre_dir: Path, plans_file: Path, plans, config_name: str,
                           resume: bool) -> None:
    """Copy the plans, ``dataset.json`` and the fingerprint from the preprocessed folder ``pre_dir`` into the
    trainer folder ``root`` (atomically).

    Raises
    ------
    PlanError
        When resuming and the configuration's plan differs from the copy made when the training started (the
        checkpoint would not fit the network).
    """
    from ..plan.planner import load_plans

    root.mkdir(parents=True, exist_ok=True)
    copy = root / plans_file.name
    if resume and copy.is_file():
        old = load_plans(copy)
        if config_name in old.configurations and \
                old.configuration(config_name).to_json() != plans.configuration(config_name).to_json():
            raise PlanError(f"the plans of `{config_name}` changed since this training started (compare `{copy}` "
                            f"with `{plans_file}`): the checkpoint does not fit the new network; train without "
                            "--resume into a fresh folder or restore the old plans")
    _copy_into(plans_file, copy)
    for name in ("dataset.json", "nnfast_fingerprint.json"):
        if (pre_dir / name).is_file():
            _copy_into(pre_dir / name, root / name)
