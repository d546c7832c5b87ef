"""find_best_configuration on a fake results tree: two configurations with predictions written so that one is
better (and the ensemble ties with it), or so that the ensemble wins; probabilities for the ensembles; spurious
components so that postprocessing helps."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from evaluate._helpers import ellipsoid, write_seg
from nnfast.errors import CaseNotFoundError, DatasetNotFoundError
from nnfast.evaluate.find_best import find_best_configuration
from nnfast.io.image import ImageGeometry
from nnfast.layout import trainer_folder
from nnfast.settings import Settings

SHAPE = (8, 20, 30)
SPACING = (2.0, 0.8, 0.8)
NAME = "Dataset001_Toy"
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}
FOLDS = (0, 1)


def _reference(i):
    ref = np.zeros(SHAPE, np.uint8)
    ref[ellipsoid(SHAPE, (4, 10, 15), (3.5, 8, 12))] = 1
    ref[ellipsoid(SHAPE, (4, 10, 13 + i), (2, 3, 3))] = 2
    return ref


def _probabilities(seg, confidence):
    """(3, z, y, x) float16: ``confidence`` for the predicted label, the rest shared by the others."""
    conf = np.broadcast_to(confidence, seg.shape)
    probs = np.stack([np.where(seg == c, conf, (1 - conf) / 2) for c in range(3)])
    return probs.astype(np.float16)


def _tree(tmp_path, predictions, probabilities=True):
    """``predictions[config](i, ref) -> (seg, confidence)``; writes gt, dataset.json and every fold's validation."""
    pre = tmp_path / "preprocessed" / NAME
    results = tmp_path / "results"
    geom = ImageGeometry(spacing=SPACING, sitk_spacing=SPACING[::-1], origin=(0.0, 0.0, 0.0),
                         direction=tuple(np.eye(3).ravel().tolist()), shape=SHAPE)
    (pre).mkdir(parents=True)
    (pre / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for i in range(4):
        write_seg(_reference(i), pre / "gt_segmentations" / f"case_{i}.nii.gz", SPACING)
    for config, make in predictions.items():
        folder = trainer_folder(results, NAME, config)
        for i in range(4):
            val = folder / f"fold_{i // 2}" / "validation"
            seg, conf = make(i, _reference(i))
            write_seg(seg, val / f"case_{i}.nii.gz", SPACING)
            if probabilities is True or (isinstance(probabilities, set) and config in probabilities):
                np.savez_compressed(val / f"case_{i}.npz", probabilities=_probabilities(seg, conf))
                (val / f"case_{i}.json").write_text(json.dumps({"geometry": geom.to_json()}))
    return Settings(raw=None, preprocessed=tmp_path / "preprocessed", results=results)


def _good_with_spurious(i, ref):
    """Right, confident, plus a small spurious organ blob far away in three of four cases."""
    seg = ref.copy()
    if i != 3:
        seg[0:2, 0:2, 27:29] = 1
    return seg, 0.9


def _eroded(i, ref):
    """Too small an organ, unconfident."""
    seg = ref.copy()
    seg[(ref == 1) & ~ellipsoid(SHAPE, (4, 10, 15), (2.5, 6, 9))] = 0
    return seg, 0.6


def _misses(side):
    def make(i, ref):
        seg = ref.copy()
        cols = slice(0, 12) if side == "left" else slice(18, 30)
        conf = np.full(SHAPE, 0.9)
        seg[:, :, cols] = 0
        conf[:, :, cols] = 0.6
        return seg, conf
    return make


def test_single_configuration_wins_ties_and_postprocessing_helps(tmp_path):
    settings = _tree(tmp_path, {"3d_fullres": _good_with_spurious, "2d": _eroded})
    best = find_best_configuration(1, settings, folds=FOLDS)
    names = [c.name for c in best.candidates]
    assert names == ["nnfastTrainer__nnfast_plans__2d", "nnfastTrainer__nnfast_plans__3d_fullres",
                     "ensemble___nnfastTrainer__nnfast_plans__2d___nnfastTrainer__nnfast_plans__3d_fullres___0_1"]
    dice = {c.configs: c.foreground_dice for c in best.candidates}
    assert dice[("3d_fullres",)] > dice[("2d",)]
    assert dice[("2d", "3d_fullres")] == dice[("3d_fullres",)]  # the confident member decides every voxel: a tie
    assert best.best.configs == ("3d_fullres",)  # ties go to the single configuration listed first
    # the spurious blobs are removed by keeping the largest foreground component
    assert [s.values for s in best.postprocessing.steps][:1] == [(1, 2)]
    assert best.postprocessing.dice_after > best.postprocessing.dice_before
    pp_file = best.postprocessing_file
    assert pp_file.is_file() and pp_file.parent == best.best.folder
    assert best.best.folder.name == "crossval_results_folds_0_1"
    assert sorted(p.name for p in best.best.folder.glob("*.nii.gz")) == [f"case_{i}.nii.gz" for i in range(4)]
    # outputs for the user
    info = json.loads((settings.results / NAME / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["selected_configurations"] == ["3d_fullres"]
    assert info["all_results"][names[1]] == dice[("3d_fullres",)]
    assert best.commands[0] == "nnfast predict --task 1 --config 3d_fullres -i INPUT_FOLDER -o OUTPUT_FOLDER --folds 0 1"
    assert best.commands[-1] == f"nnfast apply-postprocessing -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP --plan {pp_file}"
    text = (settings.results / NAME / "inference_instructions.txt").read_text()
    assert "nnfast predict" in text and "apply-postprocessing" in text
    assert "<- best" in best.format()


def test_ensemble_wins_when_members_err_in_different_places(tmp_path):
    settings = _tree(tmp_path, {"2d": _misses("left"), "3d_fullres": _misses("right")})
    best = find_best_configuration("Dataset001_Toy", settings, folds=FOLDS)
    assert best.best.is_ensemble and best.best.configs == ("2d", "3d_fullres")
    assert best.best.foreground_dice == 1.0
    assert all(c.foreground_dice < 1.0 for c in best.candidates if not c.is_ensemble)
    # the ensemble folder holds argmax segmentations with the reference geometry
    seg_file = best.best.folder / "case_2.nii.gz"
    img = sitk.ReadImage(str(seg_file))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), _reference(2))
    np.testing.assert_allclose(img.GetSpacing(), SPACING[::-1], rtol=1e-6)
    assert not best.postprocessing.steps  # nothing to improve on perfect predictions
    assert "--save-probabilities" in best.commands[0] and "OUTPUT_FOLDER_MODEL_2" in best.commands[1]
    assert best.commands[2] == "nnfast ensemble -i OUTPUT_FOLDER_MODEL_1 OUTPUT_FOLDER_MODEL_2 -o OUTPUT_FOLDER"


def test_missing_probabilities_skip_the_ensemble(tmp_path):
    settings = _tree(tmp_path, {"2d": _eroded, "3d_fullres": _good_with_spurious}, probabilities={"3d_fullres"})
    best = find_best_configuration(1, settings, folds=FOLDS)
    assert len(best.candidates) == 2 and best.best.configs == ("3d_fullres",)
    (why,) = best.skipped.values()
    assert "2d" in why and "--save-probabilities" in why
    best = find_best_configuration(1, settings, configs=["3d_fullres"], folds=FOLDS)
    assert [c.configs for c in best.candidates] == [("3d_fullres",)]


def test_untrained_configuration_or_fold_is_an_error(tmp_path):
    settings = _tree(tmp_path, {"3d_fullres": _good_with_spurious})
    with pytest.raises(CaseNotFoundError, match="3d_lowres .* not been trained"):
        find_best_configuration(1, settings, configs=["3d_fullres", "3d_lowres"], folds=FOLDS)
    with pytest.raises(CaseNotFoundError, match="fold 2"):
        find_best_configuration(1, settings, folds=(0, 1, 2))
    with pytest.raises(DatasetNotFoundError):
        find_best_configuration(2, settings, folds=FOLDS)


def test_cli_evaluate_find_best_ensemble_apply(tmp_path, capsys):
    from nnfast.cli.main import main

    settings = _tree(tmp_path, {"2d": _misses("left"), "3d_fullres": _good_with_spurious})
    roots = ["--preprocessed", str(settings.preprocessed), "--results", str(settings.results)]
    val = trainer_folder(settings.results, NAME, "3d_fullres") / "fold_0" / "validation"
    gt = settings.preprocessed / NAME / "gt_segmentations"
    assert main(["evaluate", "--pred", str(val), "--ref", str(gt), "--task", "1", "--workers", "1", *roots]) == 0
    out = capsys.readouterr().out
    assert "organ" in out and (val / "summary.json").is_file()
    assert main(["evaluate", "--pred", str(val), "--ref", str(gt), "--labels", "1", "2", "-o",
                 str(tmp_path / "s.json"), "--workers", "1", "-q"]) == 0
    assert (tmp_path / "s.json").is_file()
    assert main(["evaluate", "--pred", str(val), "--ref", str(tmp_path), "--labels", "1"]) == 2  # no references
    assert "no reference" in capsys.readouterr().err

    assert main(["find-best", "--task", "1", "--folds", "0", "1", "--workers", "1", *roots]) == 0
    out = capsys.readouterr().out
    assert "<- best" in out and "nnfast apply-postprocessing" in out

    members = [trainer_folder(settings.results, NAME, c) / "fold_1" / "validation" for c in ("2d", "3d_fullres")]
    assert main(["ensemble", "-i", *map(str, members), "-o", str(tmp_path / "ens"), "--workers", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "ens").glob("*.nii.gz")) == ["case_2.nii.gz", "case_3.nii.gz"]

    plan = tmp_path / "plan.json"
    from nnfast.evaluate.postprocessing import KeepLargestStep, PostprocessingPlan

    PostprocessingPlan((KeepLargestStep((1, 2)),)).write(plan)
    assert main(["apply-postprocessing", "-i", str(val), "-o", str(tmp_path / "pp"), "--plan", str(plan),
                 "--workers", "1"]) == 0
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp" / "case_0.nii.gz")))
    np.testing.assert_array_equal(seg, _reference(0))  # the spurious blob is gone
    # --configs is checked against the trained models (custom configurations are allowed): a one-line error naming it
    capsys.readouterr()
    assert main(["find-best", "--task", "1", "--configs", "4d", *roots]) == 2
    assert "4d" in capsys.readouterr().err
