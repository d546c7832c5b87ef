"""Final validation of a trained fold (nnU-Net's ``nnUNetTrainer.perform_actual_validation``), through nnfast's
inference: predict the fold's validation cases with TTA into ``fold_<k>/validation/`` and score them against the
ground truth into ``fold_<k>/validation/summary.json``.

Differences from nnU-Net, on purpose: the cases are read from the raw images (``<raw>/<Dataset>/imagesTr``) and
preprocessed again instead of read from the preprocessed folder; the preprocessing is the same code, so the network
sees the same arrays, and the validation exercises exactly the path that ``nnfast predict`` takes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import CaseNotFoundError

__all__ = ["validate_fold"]

log = logging.getLogger(__name__)


def _fold_of(fold_dir: Path):
    name = fold_dir.name
    if name == "fold_all":
        return "all"
    if name.startswith("fold_") and name[5:].isdigit():
        return int(name[5:])
    raise CaseNotFoundError(f"`{fold_dir}` is not a fold folder (fold_<k> or fold_all)")


def _ground_truth(settings, name: str) -> Path:
    for root, sub in ((settings.preprocessed, "gt_segmentations"), (settings.raw, "labelsTr")):
        if root is not None and (Path(root) / name / sub).is_dir():
            return Path(root) / name / sub
    raise CaseNotFoundError(f"no ground truth for {name}: expected `<preprocessed>/{name}/gt_segmentations` or "
                            f"`<raw>/{name}/labelsTr`")


def validate_fold(fold_dir: Path | str, *, settings, device: Any = "auto", checkpoint_name: str = "checkpoint_final",
                  save_probabilities: bool = False, workers: int = 1):
    """Predict and score the validation cases of one trained fold.

    Parameters
    ----------
    fold_dir : path
        ``<results>/<Dataset>/nnfastTrainer__nnfast_plans__<config>/fold_<k>``.
    settings : Settings
        Data roots: ``raw`` (images), ``preprocessed`` (``splits_final.json``, ``gt_segmentations``).
    device : str or torch.device
        Where the network runs.
    checkpoint_name : str
        Checkpoint to validate (nnU-Net: ``checkpoint_final``).
    save_probabilities : bool
        Also write ``<case>.npz``/``.json`` (nnU-Net's ``--npz``; needed to ensemble configurations).
    workers : int
        Export threads and evaluation processes.

    Returns
    -------
    Summary
        :func:`nnfast.evaluate.metrics.evaluate_folder`'s result, also written as ``validation/summary.json``.

    Raises
    ------
    CaseNotFoundError
        No split file, no raw images or no ground truth; or a validation case failed (its reason is in the message
        and in ``validation/nnfast_predict.json``).
    """
    from ..evaluate.metrics import evaluate_folder
    from ..io.dataset import load_dataset
    from ..settings import find_dataset_folder
    from ..train.splits import SPLITS_FILE_NAME, fold_cases, load_or_create_splits
    from .model import load_model
    from .predict import predict_folder

    fold_dir = Path(fold_dir)
    fold = _fold_of(fold_dir)
    model = load_model(fold_dir.parent, (fold,), checkpoint_name)
    name = model.plans.dataset_name
    _, cases = load_dataset(find_dataset_folder(name, settings.require("raw")))
    by_id = {c.case_id: c for c in cases}
    splits_file = settings.require("preprocessed") / name / SPLITS_FILE_NAME
    if not splits_file.is_file() and fold != "all":
        raise CaseNotFoundError(f"`{splits_file}` does not exist; the validation cases of fold {fold} are those "
                                "of the training run's split")
    splits = load_or_create_splits(splits_file, sorted(by_id)) if splits_file.is_file() else []
    _, val = fold_cases(splits, fold, sorted(by_id))
    missing = [c for c in val if c not in by_id]
    if missing:
        raise CaseNotFoundError(f"validation case(s) {missing[:5]} of fold {fold} have no images in the raw dataset")
    out = fold_dir / "validation"
    log.info("validating %s fold %s on %d case(s) into %s", model.config_name, fold, len(val), out)
    report = predict_folder([list(by_id[c].image_files) for c in val], out, fold_dir.parent, folds=(fold,),
                            checkpoint_name=checkpoint_name, use_tta=True, device=device,
                            save_probabilities=save_probabilities, workers=workers, settings=settings)
    if report.failed:
        raise CaseNotFoundError(f"{len(report.failed)} validation case(s) of fold {fold} failed: "
                                + "; ".join(f"{k}: {v}" for k, v in sorted(report.failed.items())))
    return evaluate_folder(out, _ground_truth(settings, name), model.dataset_json, workers=workers,
                           output_file=out / "summary.json")
