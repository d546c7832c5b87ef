"""Final validation of a trained fold (nnU-Net's ``nnUNetTrainer.perform_actual_validation``), through nnfast's
inference: predict the fold's validation cases with TTA into ``fold_<k>/validation/`` and score them against the
ground truth into ``fold_<k>/validation/summary.json``.

The cascade, as nnU-Net: the validation of a first stage (``3d_lowres``, whose plan names a ``next_stage``) also
writes each validation case's segmentation on the next stage's preprocessed grid into
``<trainer folder>/predicted_next_stage/<next stage>/<case>.zarr`` (:mod:`nnfast.io.prev_stage`): the fold's logits
resampled to the case's shape in the next stage's preprocessed folder and reduced to labels
(:func:`nnfast.infer.export.logits_to_next_stage`). The five folds together cover every training case, each predicted
by a network that did not see it; the second stage trains on them. A case whose next-stage store is missing is
skipped with a warning (preprocess ``3d_fullres`` first). Fold ``all`` writes none: its network trained on every
case, and its predictions would overwrite the cross-validated ones (nnU-Net writes them anyway).

The validation of the second stage (``3d_cascade_fullres``) feeds it the first stage's predictions of the same fold's
validation folder (``3d_lowres/fold_<k>/validation``), exactly what ``nnfast predict`` would compute with that fold;
when they are missing the first stage is predicted first.

Differences from nnU-Net, on purpose: the cases are read from the raw images (``<raw>/<Dataset>/imagesTr``) and
preprocessed again instead of read from the preprocessed folder; the preprocessing is the same code, so the network
sees the same arrays, and the validation exercises exactly the path that ``nnfast predict`` takes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import layout
from ..errors import CaseNotFoundError, StoreError

__all__ = ["validate_fold", "NextStageWriter"]

log = logging.getLogger(__name__)


def _fold_of(fold_dir: Path):
    fold = layout.parse_fold_name(fold_dir.name)
    if fold is None:
        raise CaseNotFoundError(f"`{fold_dir}` is not a fold folder (fold_<k> or fold_all)")
    return fold


class NextStageWriter:
    """Writes a cascade first stage's predictions for the next stage (a ``logits_hook`` of ``predict_folder``).

    Parameters
    ----------
    model : TrainedModel
        The first stage (its plans name the ``next_stage``).
    next_stage : str
        The next configuration (``3d_cascade_fullres``).
    preprocessed_dir : path
        ``<preprocessed>/<Dataset>``: the next stage's case stores give each case's target shape.
    output_folder : path
        ``<trainer folder>/predicted_next_stage/<next_stage>``.
    source : dict
        Recorded in each store (configuration, fold, checkpoint).

    Attributes
    ----------
    written : dict
        case id -> store path.
    skipped : dict
        case id -> reason (no next-stage case store).
    """

    def __init__(self, model, next_stage: str, preprocessed_dir: Path, output_folder: Path, source: dict) -> None:
        self.model = model
        self.next_conf = model.plans.configuration(next_stage)
        self.data_dir = layout.case_store_folder(preprocessed_dir, self.next_conf.data_identifier)
        self.output_folder = Path(output_folder)
        self.source = dict(source)
        self.written: dict[str, Path] = {}
        self.skipped: dict[str, str] = {}

    def __call__(self, case_id: str, logits, properties: dict) -> None:
        from ..io.prev_stage import write_previous_stage
        from ..io.store import read_case_metadata, store_path
        from .export import logits_to_next_stage

        store = store_path(self.data_dir, case_id)
        try:
            meta = read_case_metadata(store)
        except StoreError as e:
            self.skipped[case_id] = str(e)
            return
        shape = [int(s) for s in meta["image"]["shape"][1:]]
        bbox_next = meta["properties"].get("bbox_used_for_cropping")
        bbox_here = properties.get("bbox_used_for_cropping")
        if bbox_next is not None and bbox_here is not None and \
                [list(map(int, b)) for b in bbox_next] != [list(map(int, b)) for b in bbox_here]:
            raise StoreError(f"{case_id}: the next stage's case store `{store}` was cropped to {bbox_next} but this "
                             f"prediction to {bbox_here}; preprocess both configurations from the same raw data")
        seg = logits_to_next_stage(logits, shape, self.model.plans, self.model.config_name,
                                   regions_class_order=self.model.labels.regions_class_order)
        path = store_path(self.output_folder, case_id)
        write_previous_stage(path, seg, patch_size=self.next_conf.patch_size, source=self.source, case_id=case_id)
        self.written[case_id] = path


def _previous_stage_predictions(model, fold, val: list[str], fold_dir: Path) -> Path | None:
    """The first stage's validation folder of the same fold when it holds every validation case, else None."""
    folder = layout.validation_folder(
        layout.sibling_stage_folder(fold_dir.parent, model.configuration.previous_stage) / fold_dir.name)
    ending = model.file_ending
    if folder.is_dir() and all((folder / f"{c}{ending}").is_file() for c in val):
        return folder
    return None


def validate_fold(fold_dir: Path | str, *, settings, device: Any = "auto", checkpoint_name: str = "checkpoint_final",
                  save_probabilities: bool = False, workers: int = 1, use_tta: bool = True):
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
    use_tta : bool
        Mirroring test-time augmentation (nnU-Net's validation mirrors; ``nnfast demo --no-tta`` does not).

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
    from ..splits import fold_cases, load_or_create_splits
    from .model import load_model
    from .predict import PredictOptions, predict_folder

    fold_dir = Path(fold_dir)
    fold = _fold_of(fold_dir)
    model = load_model(fold_dir.parent, (fold,), checkpoint_name)
    name = model.plans.dataset_name
    _, cases = load_dataset(find_dataset_folder(name, settings.require("raw")))
    by_id = {c.case_id: c for c in cases}
    splits_file = settings.require("preprocessed") / name / layout.SPLITS_FILE
    if not splits_file.is_file() and fold != "all":
        raise CaseNotFoundError(f"`{splits_file}` does not exist; the validation cases of fold {fold} are those "
                                "of the training run's split")
    splits = load_or_create_splits(splits_file, sorted(by_id)) if splits_file.is_file() else []
    _, val = fold_cases(splits, fold, sorted(by_id))
    missing = [c for c in val if c not in by_id]
    if missing:
        raise CaseNotFoundError(f"validation case(s) {missing[:5]} of fold {fold} have no images in the raw dataset")
    out = layout.validation_folder(fold_dir)
    conf = model.configuration
    writer = None
    if conf.next_stage is not None and conf.next_stage in model.plans.configurations:
        if fold == "all":
            log.info("fold all of %s writes no predictions for %s (its network trained on every case)",
                     model.config_name, conf.next_stage)
        else:
            writer = NextStageWriter(model, conf.next_stage, settings.require("preprocessed") / name,
                                     layout.next_stage_folder(fold_dir.parent, conf.next_stage),
                                     {"configuration": model.config_name, "fold": fold, "checkpoint": checkpoint_name})
    prev_folder = _previous_stage_predictions(model, fold, val, fold_dir) if conf.previous_stage else None
    log.info("validating %s fold %s on %d case(s) into %s", model.config_name, fold, len(val), out)
    options = PredictOptions(model_folder=fold_dir.parent, folds=(fold,), checkpoint_name=checkpoint_name,
                             use_tta=use_tta, device=device, save_probabilities=save_probabilities, workers=workers,
                             settings=settings, previous_stage_folder=prev_folder)
    report = predict_folder([list(by_id[c].image_files) for c in val], out, options, logits_hook=writer)
    if writer is not None and writer.skipped:
        first = next(iter(sorted(writer.skipped)))
        log.warning("%d case(s) got no %s input (e.g. %s: %s); preprocess the data of %s (`%s`) and validate this "
                    "fold again (nnfast train --config %s --fold %s --validate-only)", len(writer.skipped),
                    conf.next_stage, first, writer.skipped[first], conf.next_stage, writer.data_dir.name,
                    model.config_name, fold)
    if report.failed:
        raise CaseNotFoundError(f"{len(report.failed)} validation case(s) of fold {fold} failed: "
                                + "; ".join(f"{k}: {v}" for k, v in sorted(report.failed.items())))
    return evaluate_folder(out, layout.ground_truth_folder(settings.preprocessed, settings.raw, name),
                           model.dataset_json, workers=workers,
                           output_file=out / layout.SUMMARY_FILE)
