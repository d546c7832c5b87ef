"""Model selection: the cross-validation results of every trained configuration and of every pair of them ensembled,
the best one by foreground mean Dice, its postprocessing, and the commands to predict with it.

nnU-Net rule (``nnunetv2/evaluation/find_best_configuration.py``, v2.8.1):

- candidates ``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres`` (those trained); each configuration's
  validation predictions of the requested folds are gathered into ``crossval_results_folds_<f_f_..>`` and evaluated
  against ``gt_segmentations`` (``accumulate_cv_results``);
- every pair of configurations is ensembled (probabilities averaged, ``ensemble_crossvalidations``) into
  ``<results>/<Dataset>/ensembles/ensemble___<model 1>___<model 2>___<folds>`` and evaluated;
- the best is the maximal ``foreground_mean`` Dice; on a tie the first one wins (configurations in the order above,
  single configurations before ensembles);
- postprocessing is determined on the winner's predictions; ``inference_information.json`` and
  ``inference_instructions.txt`` in ``<results>/<Dataset>/`` say how to predict.

Differences: a pair is skipped (and reported) when a member was trained without saved probabilities, instead of
failing the whole run; NaN results rank below every number.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .. import layout
from ..errors import CaseNotFoundError, DatasetNotFoundError
from ..plan.schema import CONFIGURATION_NAMES
from ..settings import Settings, find_dataset_folder, parse_task
from .metrics import list_segmentations
from .postprocessing import PLAN_FILE, PostprocessingPlan, determine_postprocessing

__all__ = ["CONFIG_ORDER", "Candidate", "BestConfiguration", "find_best_configuration",
           "folds_name", "predict_commands"]

log = logging.getLogger(__name__)

#: Configurations considered, in nnU-Net's order (ties go to the earlier one).
#: configurations in the order that breaks ties (nnU-Net's)
CONFIG_ORDER = CONFIGURATION_NAMES
INFO_FILE = "inference_information.json"
INSTRUCTIONS_FILE = "inference_instructions.txt"


def folds_name(folds: Sequence[int | str]) -> str:
    """nnU-Net's ``folds_tuple_to_string``: ``(0, 1, 2)`` -> ``"0_1_2"``."""
    return "_".join(str(f) for f in folds)


@dataclass(frozen=True)
class Candidate:
    """A configuration or an ensemble of two and its cross-validation result."""

    name: str
    configs: tuple[str, ...]
    folder: Path
    foreground_dice: float
    has_probabilities: bool = False

    @property
    def is_ensemble(self) -> bool:
        return len(self.configs) > 1


@dataclass(frozen=True)
class BestConfiguration:
    """Outcome of :func:`find_best_configuration`."""

    dataset: str
    task: str
    folds: tuple
    candidates: tuple[Candidate, ...]
    best: Candidate
    postprocessing: PostprocessingPlan
    postprocessing_file: Path
    commands: tuple[str, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    info_file: Path | None = None

    def to_json(self) -> dict:
        from .. import __version__

        return {
            "schema_version": 1,
            "nnfast_version": __version__,
            "dataset": self.dataset,
            "dataset_name_or_id": self.task,
            "folds": list(self.folds),
            "considered_models": [c.configs[0] for c in self.candidates if not c.is_ensemble],
            "all_results": {c.name: c.foreground_dice for c in self.candidates},
            "skipped": dict(self.skipped),
            "best_model_or_ensemble": {
                "name": self.best.name,
                "selected_configurations": list(self.best.configs),
                "result_on_crossval_pre_pp": self.best.foreground_dice,
                "result_on_crossval_post_pp": self.postprocessing.dice_after,
                "postprocessing_file": str(self.postprocessing_file),
                "postprocessing_steps": self.postprocessing.to_json()["postprocessing_kwargs"],
                "predictions": str(self.best.folder),
            },
            "commands": list(self.commands),
        }

    def format(self) -> str:
        width = max(len(c.name) for c in self.candidates)
        lines = [f"cross-validation results of {self.dataset} (folds {', '.join(map(str, self.folds))}), "
                 "foreground mean Dice:"]
        for c in self.candidates:
            mark = "  <- best" if c is self.best else ""
            lines.append(f"  {c.name:<{width}}  {c.foreground_dice:.5f}{mark}")
        for name, why in self.skipped.items():
            lines.append(f"  {name:<{width}}  skipped: {why}")
        lines.append(f"postprocessing of {self.best.name}:")
        lines.append(self.postprocessing.format())
        lines.append("")
        lines.append(instructions(self))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- commands
def _trained_plans(ds_folder: Path) -> list[str]:
    """Plans identifiers with trained folders ``<trainer>__<plans>__<config>`` in ``ds_folder`` (default first)."""
    found = {p.name.split("__")[1] for p in ds_folder.glob(f"{layout.TRAINER_NAME}__*__*") if p.is_dir()
             and len(p.name.split("__")) == 3}
    return [layout.PLANS_IDENTIFIER] + sorted(found - {layout.PLANS_IDENTIFIER})


def predict_commands(task: str, configs: Sequence[str], folds: Sequence, postprocessing_file: Path) -> list[str]:
    """The commands that reproduce a candidate on new images: ``nnfast predict`` per member (keeping probabilities
    for an ensemble; a cascade predicts its previous stage itself), ``nnfast ensemble``, ``nnfast
    apply-postprocessing``."""
    fold_str = " ".join(str(f) for f in folds)
    ensemble = len(configs) > 1
    cmds, outputs = [], []
    for j, c in enumerate(configs):
        out = f"OUTPUT_FOLDER_MODEL_{j + 1}" if ensemble else "OUTPUT_FOLDER"
        plans_flag = ""
        if "/" in c:  # a model of other plans than the default: <plans>/<config>
            p, c = c.split("/", 1)
            plans_flag = f" --plans {p}"
        cmds.append(f"nnfast predict --task {task} --config {c}{plans_flag} -i INPUT_FOLDER -o {out} --folds {fold_str}"
                    + (" --save-probabilities" if ensemble else ""))
        outputs.append(out)
    if ensemble:
        cmds.append(f"nnfast ensemble -i {' '.join(outputs)} -o OUTPUT_FOLDER")
    cmds.append(f"nnfast apply-postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP --plan {postprocessing_file}")
    return cmds


def instructions(best: BestConfiguration) -> str:
    """Readable instructions (also written to ``inference_instructions.txt``)."""
    lines = ["Run inference like this:", ""]
    if best.best.is_ensemble:
        lines.append(f"An ensemble won ({' + '.join(best.best.configs)}). Predict with each member, keeping the "
                     "probabilities, then ensemble:")
        lines.append("")
    lines.extend(c for c in best.commands if not c.startswith("nnfast apply-postprocessing"))
    lines.append("")
    if best.postprocessing.steps:
        lines.append("Once inference is completed, apply the postprocessing:")
    else:
        lines.append("Postprocessing did not improve the cross-validation results; applying the (empty) plan only "
                     "copies the files:")
    lines.append("")
    lines.extend(c for c in best.commands if c.startswith("nnfast apply-postprocessing"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- gathering
@dataclass
class _Gathered:
    config: str
    folder: Path
    merged: Path
    probabilities: dict[str, Path]  # case -> npz (only when every case has one)
    cases: list[str]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _gather(config: str, folder: Path, folds: Sequence, file_ending: str | None, task: str) -> _Gathered:
    """Collect the validation predictions of ``folds`` into ``crossval_results_folds_<..>`` (hard links, fresh)."""
    merged = folder / f"crossval_results_folds_{folds_name(folds)}"
    where: dict[str, Path] = {}
    npz: dict[str, Path] = {}
    for f in folds:
        val = layout.validation_folder(folder / layout.fold_name(f))
        files = list_segmentations(val, file_ending) if val.is_dir() else {}
        if not files:
            raise CaseNotFoundError(
                f"configuration {config} has no validation predictions for fold {f} (`{val}`); train that fold "
                f"(`nnfast train --task {task} --config {config} --fold {f}`) or choose the folds with --folds")
        for case, path in files.items():
            if case in where:
                raise CaseNotFoundError(f"case {case} has validation predictions in two folds of {config}: "
                                        f"`{where[case]}` and `{path}`; the folds must come from one split")
            where[case] = path
            p = val / f"{case}.npz"
            if p.is_file() and p.with_suffix(".json").is_file():
                npz[case] = p
    if merged.exists():
        shutil.rmtree(merged)
    merged.mkdir(parents=True)
    for case, path in where.items():
        _link_or_copy(path, merged / path.name)
    probabilities = npz if len(npz) == len(where) else {}
    return _Gathered(config, folder, merged, probabilities, sorted(where))


def _rank_key(c: Candidate) -> float:
    return -math.inf if c.foreground_dice is None or math.isnan(c.foreground_dice) else c.foreground_dice


def _dataset_json(task, settings: Settings, name: str, trained: list[Path]) -> dict:
    from ..io.dataset import load_dataset_json

    candidates = [f / "dataset.json" for f in trained]
    for root in (settings.preprocessed, settings.raw):
        if root is not None and (root / name / "dataset.json").is_file():
            candidates.append(root / name / "dataset.json")
    for c in candidates:
        if c.is_file():
            return load_dataset_json(c)
    raise CaseNotFoundError(f"no dataset.json for {name}: looked in the trained model folders and the preprocessed "
                            f"and raw folders; run `nnfast plan --task {task}`")


# --------------------------------------------------------------------------------------------- main
def find_best_configuration(
    task: str | int,
    settings: Settings,
    configs: Sequence[str] | None = None,
    folds: Sequence[int] = (0, 1, 2, 3, 4),
    *,
    workers: int = 1,
    allow_ensembling: bool = True,
    progress=None,
    plans: Sequence[str] | None = None,
) -> BestConfiguration:
    """Evaluate every trained configuration and pairwise ensemble, pick the best, decide its postprocessing.

    Parameters
    ----------
    task : str or int
        Dataset id or name (``7``, ``Dataset007_Pancreas``).
    settings : Settings
        Data roots: results (trained models), preprocessed (``gt_segmentations``, dataset.json).
    configs : sequence of str, optional
        Configurations to consider; default every one of :data:`CONFIG_ORDER` that was trained (configurations
        named here must have been trained). Order decides ties.
    folds : sequence of int
        Folds whose validation predictions make up the cross-validation.
    workers : int
        Worker processes for evaluation, ensembling and postprocessing.
    allow_ensembling : bool
        Also ensemble every pair of configurations that saved probabilities.
    plans : sequence of str, optional
        Plans identifiers whose models compete (default: every one with a trained folder, ``nnfast_plans`` first), so
        that e.g. the default and the ResEnc-M ``3d_fullres`` are ranked together. A model of other plans than
        ``nnfast_plans`` is named ``<plans>/<config>`` in the results and commands.

    Returns
    -------
    BestConfiguration
        Also written to ``<results>/<Dataset>/inference_information.json`` (+ ``inference_instructions.txt``).

    Raises
    ------
    DatasetNotFoundError
        No results for the task.
    CaseNotFoundError
        A requested configuration or fold is not trained, ground truth or dataset.json is missing.
    """
    from ..io.atomic import atomic_target, write_json_atomic
    from .ensemble import ensemble_cases
    from .metrics import evaluate_folder

    results = settings.require("results")
    ds_folder = find_dataset_folder(task, results)
    name = ds_folder.name
    task_str = str(parse_task(task)[0])
    folds = tuple(folds)
    explicit = configs is not None
    order = list(configs) if configs is not None else list(CONFIG_ORDER)
    plans_ids = list(plans) if plans else _trained_plans(ds_folder)
    trained = []
    for c in order:
        found = [(c if p == layout.PLANS_IDENTIFIER else f"{p}/{c}", layout.trainer_folder(results, name, c,
                                                                                        plans_identifier=p))
                 for p in plans_ids]
        found = [(k, f) for k, f in found if f.is_dir()]
        f = layout.trainer_folder(results, name, c)
        if found:
            trained.extend(found)
        elif explicit:
            raise CaseNotFoundError(f"configuration {c} of {name} has not been trained (no `{f}`); train it with "
                                    f"`nnfast train --task {task_str} --config {c} --fold F` for folds "
                                    f"{', '.join(map(str, folds))}")
        else:
            log.info("%s: configuration %s not trained, not considered", name, c)
    if not trained:
        raise DatasetNotFoundError(f"no trained configuration of {name} in `{ds_folder}` (expected folders like "
                                   f"`{layout.trainer_folder_name('3d_fullres')}`); train first")
    dataset_json = _dataset_json(task_str, settings, name, [f for _, f in trained])
    gt = layout.ground_truth_folder(settings.preprocessed, settings.raw, name)
    ending = dataset_json.get("file_ending")

    candidates: list[Candidate] = []
    gathered: list[_Gathered] = []
    for c, f in trained:
        g = _gather(c, f, folds, ending, task_str)
        summary = evaluate_folder(g.merged, gt, dataset_json, workers, progress=progress)
        gathered.append(g)
        candidates.append(Candidate(f.name, (c,), g.merged, summary.foreground_dice, bool(g.probabilities)))
        log.info("%s: %.5f", f.name, summary.foreground_dice)

    skipped: dict[str, str] = {}
    if allow_ensembling:
        for i in range(len(gathered)):
            for j in range(i + 1, len(gathered)):
                a, b = gathered[i], gathered[j]
                ident = f"ensemble___{a.folder.name}___{b.folder.name}___{folds_name(folds)}"
                missing = [g.config for g in (a, b) if not g.probabilities]
                if missing:
                    skipped[ident] = (f"no saved probabilities for {', '.join(missing)} (train/predict with "
                                      "--save-probabilities to ensemble)")
                    log.warning("%s skipped: %s", ident, skipped[ident])
                    continue
                if a.cases != b.cases:
                    skipped[ident] = "the configurations' cross-validations cover different cases"
                    log.warning("%s skipped: %s", ident, skipped[ident])
                    continue
                out = ds_folder / "ensembles" / ident
                if out.exists():
                    shutil.rmtree(out)
                groups = {case: [a.probabilities[case], b.probabilities[case]] for case in a.cases}
                ensemble_cases(groups, out, workers, dataset_json=dataset_json, progress=progress)
                summary = evaluate_folder(out, gt, dataset_json, workers, progress=progress)
                candidates.append(Candidate(ident, (a.config, b.config), out, summary.foreground_dice))
                log.info("%s: %.5f", ident, summary.foreground_dice)

    best = candidates[0]
    for cand in candidates[1:]:
        if _rank_key(cand) > _rank_key(best):
            best = cand
    plan = determine_postprocessing(best.folder, gt, dataset_json, workers, progress=progress)
    pp_file = best.folder / PLAN_FILE
    commands = predict_commands(task_str, best.configs, folds, pp_file)
    info_file = ds_folder / INFO_FILE
    result = BestConfiguration(name, task_str, folds, tuple(candidates), best, plan, pp_file, tuple(commands),
                               skipped, info_file)
    write_json_atomic(info_file, result.to_json())
    with atomic_target(ds_folder / INSTRUCTIONS_FILE) as tmp:
        tmp.write_text(instructions(result) + "\n", encoding="utf-8")
    return result

