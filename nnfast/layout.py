"""Where nnfast keeps things on disk: the one owner of every folder and file name shared between stages.

nnU-Net v2's layout, with nnfast's names as defaults (``<Dataset>`` = e.g. ``Dataset004_Hippocampus``)::

    <preprocessed>/<Dataset>/
        dataset.json                   copy of the raw dataset's dataset.json
        nnfast_fingerprint.json        the fingerprint (FINGERPRINT_FILE)
        <plans identifier>.json        the plans (nnfast_plans.json; plans_file_name)
        splits_final.json              the cross-validation split (SPLITS_FILE)
        gt_segmentations/              copies of the label files (evaluation)
        nnfast_<config>/<case>.zarr    one case store per case and configuration (data_identifier, case_store_folder)

    <results>/<Dataset>/<trainer>__<plans identifier>__<config>/      (trainer_folder; nnfastTrainer__nnfast_plans__...)
        nnfast_plans.json, dataset.json, nnfast_fingerprint.json     copies made when training starts
        fold_<k>/  (fold_all)                                        fold_folder
            train_config.json
            checkpoint_latest / _best / _final .pt + .json           checkpoint_file, checkpoint_name
                                       (nnU-Net's model folders: .pth)
            training_log.txt, progress.json/.csv/.png
            validation/  (summary.json)                              validation_folder
        predicted_next_stage/<next config>/<case>.zarr               next_stage_folder (a cascade's first stage)

Trainer name and plans identifier are parameters everywhere (defaults :data:`TRAINER_NAME`, :data:`PLANS_IDENTIFIER`)
so that several plans can live side by side. This module imports neither numpy nor torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from .errors import CaseNotFoundError, SettingsError

__all__ = [
    "TRAINER_NAME", "PLANS_IDENTIFIER", "DATA_IDENTIFIER_PREFIX", "DATASET_JSON", "FINGERPRINT_FILE",
    "SPLITS_FILE", "GT_FOLDER", "VALIDATION_FOLDER", "SUMMARY_FILE", "SUMMARY_PICTURE", "NEXT_STAGE_FOLDER",
    "CHECKPOINT_NAMES", "Fold", "checkpoint_name", "check_fold", "fold_name", "parse_fold_name",
    "check_plans_identifier", "plans_file_name", "data_identifier", "case_store_folder",
    "trainer_folder_name",
    "trainer_folder", "fold_folder", "checkpoint_file", "validation_folder", "next_stage_folder",
    "previous_stage_folder", "sibling_stage_folder", "ground_truth_folder",
]

TRAINER_NAME = "nnfastTrainer"
PLANS_IDENTIFIER = "nnfast_plans"
#: case-store folders are ``<prefix>_<configuration>`` (nnU-Net: ``nnUNetPlans_<configuration>``)
DATA_IDENTIFIER_PREFIX = "nnfast"
DATASET_JSON = "dataset.json"
FINGERPRINT_FILE = "nnfast_fingerprint.json"
SPLITS_FILE = "splits_final.json"
GT_FOLDER = "gt_segmentations"
VALIDATION_FOLDER = "validation"
#: nnU-Net's metrics file (``nnfast evaluate``'s default output, ``validation/summary.json``)
SUMMARY_FILE = "summary.json"
SUMMARY_PICTURE = "summary.png"  # the evaluation's picture beside SUMMARY_FILE
NEXT_STAGE_FOLDER = "predicted_next_stage"
CHECKPOINT_NAMES = ("checkpoint_latest", "checkpoint_best", "checkpoint_final")

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


def parse_fold_name(name: str) -> Fold | None:
    """The fold of a folder name ``fold_<k>`` / ``fold_all``; None for anything else."""
    if name == "fold_all":
        return "all"
    m = re.fullmatch(r"fold_(\d+)", name)
    return int(m.group(1)) if m else None


def check_plans_identifier(plans_identifier: str) -> str:
    """``plans_identifier`` if it can name a plans file and a results folder: letters, digits, ``.``, ``-`` and
    single ``_`` (``__`` separates the parts of ``<trainer>__<plans>__<config>``).

    Raises
    ------
    SettingsError
        Anything else (empty, a path, ``__``).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", plans_identifier or "") or "__" in plans_identifier:
        raise SettingsError(f"plans identifier {plans_identifier!r} must be letters, digits, '.', '-' and single '_' "
                            "(e.g. nnfast_plans, nnfast_ResEncM_plans, my_plans_24gb)")
    return plans_identifier


def plans_file_name(plans_identifier: str = PLANS_IDENTIFIER) -> str:
    """``<plans identifier>.json`` (``nnfast_plans.json``)."""
    return f"{plans_identifier}.json"


def data_identifier(config_name: str, prefix: str = DATA_IDENTIFIER_PREFIX) -> str:
    """The preprocessed folder of a configuration's case stores: ``nnfast_<config>``."""
    return f"{prefix}_{config_name}"


def case_store_folder(dataset_dir: Path | str, data_identifier_: str) -> Path:
    """``<preprocessed>/<Dataset>/<data identifier>``: a configuration's case stores (the identifier comes from the
    plans, :func:`data_identifier` for nnfast's own)."""
    return Path(dataset_dir) / data_identifier_


def trainer_folder_name(config_name: str, trainer: str = TRAINER_NAME, plans_identifier: str = PLANS_IDENTIFIER) -> str:
    """``<trainer>__<plans identifier>__<config>``."""
    return f"{trainer}__{plans_identifier}__{config_name}"


def trainer_folder(results_root: Path | str, dataset_name: str, config_name: str, *, trainer: str = TRAINER_NAME,
                   plans_identifier: str = PLANS_IDENTIFIER) -> Path:
    """``<results>/<Dataset>/<trainer>__<plans identifier>__<config>``."""
    return Path(results_root) / dataset_name / trainer_folder_name(config_name, trainer, plans_identifier)


def fold_folder(results_root: Path | str, dataset_name: str, config_name: str, fold: Fold, *,
                trainer: str = TRAINER_NAME, plans_identifier: str = PLANS_IDENTIFIER) -> Path:
    """``trainer_folder(...)/fold_<k>`` (``fold_all`` for fold ``"all"``)."""
    return trainer_folder(results_root, dataset_name, config_name, trainer=trainer,
                          plans_identifier=plans_identifier) / fold_name(fold)


def checkpoint_name(name: str) -> str:
    """A checkpoint choice as its file stem: ``best``/``final``/``latest`` (``nnfast predict --checkpoint``) or
    ``checkpoint_best`` etc., with or without ``.pt``/``.pth`` (nnU-Net's ``-chk checkpoint_best.pth``).

    Raises
    ------
    SettingsError
        Not one of :data:`CHECKPOINT_NAMES`.
    """
    stem = str(name).strip()
    for suffix in (".pth", ".pt"):
        stem = stem.removesuffix(suffix)
    stem = stem if stem.startswith("checkpoint_") else f"checkpoint_{stem}"
    if stem not in CHECKPOINT_NAMES:
        raise SettingsError(f"unknown checkpoint {name!r}: expected best, final or latest "
                            f"({', '.join(CHECKPOINT_NAMES)}, .pt/.pth optional)")
    return stem


def checkpoint_file(fold_dir: Path | str, name: str) -> Path:
    """``<fold>/<name>.pt`` (``name`` e.g. ``checkpoint_final``; a ``.pt`` suffix is accepted)."""
    name = name[:-3] if name.endswith(".pt") else name
    return Path(fold_dir) / f"{name}.pt"


def validation_folder(fold_dir: Path | str) -> Path:
    """``<fold>/validation``: the final validation's predictions and ``summary.json``."""
    return Path(fold_dir) / VALIDATION_FOLDER


def next_stage_folder(trainer_dir: Path | str, next_config: str) -> Path:
    """``<trainer folder>/predicted_next_stage/<next config>``: a cascade first stage's segmentations for the next
    stage, one store per case (:mod:`nnfast.io.prev_stage`)."""
    return Path(trainer_dir) / NEXT_STAGE_FOLDER / next_config


def previous_stage_folder(results_root: Path | str, dataset_name: str, previous_stage: str, config_name: str, *,
                          trainer: str = TRAINER_NAME, plans_identifier: str = PLANS_IDENTIFIER) -> Path:
    """Where the first stage of a cascade keeps its segmentations for the stage ``config_name`` (nnU-Net's layout):
    ``<results>/<Dataset>/<trainer>__<plans>__<previous_stage>/predicted_next_stage/<config_name>``."""
    return next_stage_folder(trainer_folder(results_root, dataset_name, previous_stage, trainer=trainer,
                                            plans_identifier=plans_identifier), config_name)


def sibling_stage_folder(trainer_dir: Path | str, config_name: str) -> Path:
    """The trainer folder of configuration ``config_name`` beside ``trainer_dir`` (same trainer and plans: the
    other stage of a cascade)."""
    folder = Path(trainer_dir)
    return folder.with_name(folder.name.rsplit("__", 1)[0] + f"__{config_name}")


def ground_truth_folder(preprocessed_root: Path | str | None, raw_root: Path | str | None, dataset_name: str) -> Path:
    """The reference segmentations of a dataset: ``<preprocessed>/<Dataset>/gt_segmentations``, else
    ``<raw>/<Dataset>/labelsTr``.

    Raises
    ------
    CaseNotFoundError
        Neither exists.
    """
    for root, sub in ((preprocessed_root, GT_FOLDER), (raw_root, "labelsTr")):
        if root is not None and (Path(root) / dataset_name / sub).is_dir():
            return Path(root) / dataset_name / sub
    raise CaseNotFoundError(f"no ground truth for {dataset_name}: expected `<preprocessed>/{dataset_name}/"
                            f"{GT_FOLDER}` (written by `nnfast preprocess`) or `<raw>/{dataset_name}/labelsTr`")
