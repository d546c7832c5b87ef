"""The training run's own files in its trainer folder (the layout itself, trainer and fold folders, checkpoint
names, ``predicted_next_stage``: :mod:`nnfast.layout`).

- :func:`prepare_trainer_folder` copies the plans, ``dataset.json`` and the fingerprint into the trainer folder
  (inference reads them there) and refuses to resume when the plans of the configuration changed.
- :func:`load_saved_train_config` reads a fold's ``train_config.json`` (the resolved TrainConfig of its last start).

This module does not import torch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import PlanError
from ..io.atomic import atomic_target, read_json
from ..layout import DATASET_JSON, FINGERPRINT_FILE
from .config import TrainConfig

__all__ = ["TRAIN_CONFIG_FILE", "load_saved_train_config", "prepare_trainer_folder"]

TRAIN_CONFIG_FILE = "train_config.json"


def load_saved_train_config(folder: Path | str) -> TrainConfig | None:
    """The ``train_config.json`` of a fold folder, or None when there is none."""
    p = Path(folder) / TRAIN_CONFIG_FILE
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
    for name in (DATASET_JSON, FINGERPRINT_FILE):
        if (pre_dir / name).is_file():
            _copy_into(pre_dir / name, root / name)
