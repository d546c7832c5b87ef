"""Every ``nnfast`` command fed its classic wrong inputs: missing or unknown task, missing roots, missing or empty
folders, bad flag values, corrupted files, a missing model folder.

Each must end with exit code 2 and one error line on stderr that names the offending thing (argparse's own errors
print the usage first, then that line), never a traceback. ``nnfast verify`` is the exception by design: a dataset
it can read but that has problems is a report with exit code 1. Everything runs in-process on a five-case dataset of
8x16x16 voxels, preprocessed once for the module.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from factories import make_raw_dataset, write_image
from nnfast.cli.main import main
from nnfast.settings import Settings

TASK = 41
NAME = "Dataset041_BadInputs"
ROOT_VARS = ("NNFAST_RAW", "NNFAST_PREPROCESSED", "NNFAST_RESULTS", "nnUNet_raw", "nnUNet_preprocessed",
             "nnUNet_results")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Settings:
    """A raw dataset, planned and preprocessed (3d_fullres), and an empty results root."""
    from nnfast.preprocess.api import preprocess_dataset

    base = tmp_path_factory.mktemp("bad_inputs")
    s = Settings(raw=base / "raw", preprocessed=base / "pre", results=base / "res")
    make_raw_dataset(s.raw, TASK, "BadInputs", [(8, 16, 16)] * 5, [(1.0, 1.0, 1.0)] * 5, seed=0)
    preprocess_dataset(TASK, s, config="3d_fullres", workers=1, gpu_memory_gb=0.05)
    s.results.mkdir()
    return s


@pytest.fixture(autouse=True)
def _no_root_variables(monkeypatch):
    for var in ROOT_VARS:
        monkeypatch.delenv(var, raising=False)


def _roots(s: Settings) -> list[str]:
    return ["--raw", str(s.raw), "--preprocessed", str(s.preprocessed), "--results", str(s.results)]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_error(capsys, argv, *names: str, code: int = 2) -> str:
    """``argv`` exits with ``code``; stderr's last line is ``nnfast <command>: error: ...`` naming every ``names``
    (case-insensitive); a non-argparse error is that one line alone; no traceback."""
    got, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert got == code, f"exit code {got}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert re.match(rf"nnfast( {argv[0]})?: error: ", last), err
    if not lines[0].startswith("usage:"):
        assert len(lines) == 1, err
    for name in names:
        assert str(name).lower() in last.lower(), f"{name!r} not named in: {last}"
    return last


def _copy_dataset(s: Settings, tmp_path) -> Settings:
    """A private copy of the raw and preprocessed dataset to corrupt."""
    new = Settings(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    shutil.copytree(s.raw, new.raw)
    shutil.copytree(s.preprocessed, new.preprocessed)
    new.results.mkdir()
    return new


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------------------------- roots, tasks
@pytest.mark.parametrize("command", ["verify", "plan", "preprocess", "train", "find-best"])
def test_missing_roots(capsys, command):
    assert_error(capsys, [command, "--task", TASK], "NNFAST_")


@pytest.mark.parametrize("command", ["verify", "plan", "preprocess", "train", "find-best"])
@pytest.mark.parametrize("task,name", [("999", "999"), ("Dataset999_Nothing", "999"), ("not-a-task", "not-a-task")])
def test_unknown_task(capsys, roots, command, task, name):
    assert_error(capsys, [command, "--task", task, *_roots(roots)], name)


def test_missing_roots_of_other_commands(capsys, tmp_path):
    (tmp_path / "Task09_X").mkdir()
    assert_error(capsys, ["convert", "--msd", tmp_path / "Task09_X"], "NNFAST_RAW")
    assert_error(capsys, ["predict", "-i", tmp_path, "-o", tmp_path / "out", "--task", TASK], "NNFAST_RESULTS")


def test_root_that_does_not_exist(capsys, tmp_path):
    assert_error(capsys, ["verify", "--task", TASK, "--raw", tmp_path / "nowhere"], "nowhere")


def test_root_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_error(capsys, ["plan", "--task", TASK, "--raw", f, "--preprocessed", tmp_path / "pre"], "file")


# ----------------------------------------------------------------------------------------------- flag values
@pytest.mark.parametrize("argv,name", [
    (["verify", "--task", TASK, "--workers", "0"], "--workers"),
    (["plan", "--task", TASK, "--workers", "-1"], "--workers"),
    (["train", "--task", TASK, "--epochs", "0"], "--epochs"),
    (["find-best", "--task", TASK, "--folds", "x"], "--folds"),
    (["synth", "--out", "x", "--cases", "0"], "--cases"),
    (["demo", "--cases", "-3"], "--cases"),
    (["convert", "--msd", "x", "--workers", "0"], "--workers"),
    (["evaluate", "--pred", "a", "--ref", "b", "--workers", "0"], "--workers"),
    (["ensemble", "-i", "a", "b", "-o", "c", "--workers", "0"], "--workers"),
    (["apply-postprocessing", "-i", "a", "-o", "b", "--plan", "p", "--workers", "0"], "--workers"),
    (["plan", "--task", TASK, "--gpu-memory-gb", "lots"], "--gpu-memory-gb"),
    (["train", "--task", TASK, "--no-such-flag"], "--no-such-flag"),
])
def test_argparse_rejects(capsys, argv, name):
    assert_error(capsys, argv, name)


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
@pytest.mark.parametrize("command", ["plan", "preprocess"])
def test_gpu_memory_out_of_range(capsys, roots, tmp_path, command, value):
    s = _copy_dataset(roots, tmp_path)
    shutil.rmtree(s.preprocessed)
    assert_error(capsys, [command, "--task", TASK, "--gpu-memory-gb", value, *_roots(s)], "--gpu-memory-gb")


@pytest.mark.parametrize("scheduler", ["local:0", "local:x", "nonsense"])
def test_bad_scheduler(capsys, roots, tmp_path, scheduler):
    s = _copy_dataset(roots, tmp_path)
    assert_error(capsys, ["preprocess", "--task", TASK, "--force", "--scheduler", scheduler, *_roots(s)], scheduler)


@pytest.mark.parametrize("fold", ["-1", "x", "0,1"])  # fold 7 is valid: nnU-Net's seeded 80:20 split
def test_train_bad_fold(capsys, roots, fold):
    assert_error(capsys, ["train", "--task", TASK, "--fold", fold, "--device", "cpu", *_roots(roots)], fold)


@pytest.mark.parametrize("flag,value", [("--workers", "-1"), ("--val-iterations", "-1")])
def test_train_negative_counts(capsys, roots, flag, value):
    assert_error(capsys, ["train", "--task", TASK, flag, value, "--device", "cpu", *_roots(roots)], flag)


def test_train_val_best_needs_validate_only(capsys, roots):
    assert_error(capsys, ["train", "--task", TASK, "--val-best", *_roots(roots)], "--val-best", "--validate-only")


def test_preprocess_configuration_not_in_the_plans(capsys, roots):
    """--config is checked against the loaded plans (custom configurations are allowed), listing what they have."""
    err = assert_error(capsys, ["preprocess", "--task", TASK, "--config", "4d", "--workers", "1", *_roots(roots)],
                       "--config", "4d", "3d_fullres")
    assert "available" in err


def test_configuration_names_checked_against_the_plans(capsys, roots, tmp_path):
    """--config takes custom configurations, so a wrong name is caught where the plans or models are loaded."""
    err = assert_error(capsys, ["train", "--task", TASK, "--config", "3d", "--device", "cpu", *_roots(roots)],
                       "`3d`", "3d_fullres")
    assert "available" in err
    (tmp_path / "in").mkdir()
    (roots.results / NAME).mkdir(exist_ok=True)
    try:
        assert_error(capsys, ["predict", "-i", tmp_path / "in", "-o", tmp_path / "out", "--task", TASK, "--config",
                              "3d", *_roots(roots)], "__3d")
        assert_error(capsys, ["find-best", "--task", TASK, "--configs", "4d", *_roots(roots)], "4d")
    finally:
        (roots.results / NAME).rmdir()


def test_unknown_preset_and_plans(capsys, roots):
    assert_error(capsys, ["plan", "--task", TASK, "--preset", "resenc-xxl", *_roots(roots)], "--preset", "resenc-xxl")
    err = assert_error(capsys, ["preprocess", "--task", TASK, "--plans", "missing_plans", *_roots(roots)],
                       "missing_plans", "nnfast_plans")
    assert "plans on disk" in err
    assert_error(capsys, ["plan", "--task", TASK, "--transfer-from", TASK + 1, *_roots(roots)], str(TASK + 1))


def test_transfer_source_without_plans(capsys, roots, tmp_path):
    from factories import make_raw_dataset

    make_raw_dataset(roots.raw, TASK + 2, "NoPlans", [(8, 16, 16)] * 2, [(1.0, 1.0, 1.0)] * 2, seed=1)
    (roots.preprocessed / f"Dataset{TASK + 2:03d}_NoPlans").mkdir(exist_ok=True)
    err = assert_error(capsys, ["plan", "--task", TASK, "--transfer-from", TASK + 2, *_roots(roots)], "NoPlans")
    assert "nnfast plan --task" in err
    shutil.rmtree(roots.raw / f"Dataset{TASK + 2:03d}_NoPlans")
    shutil.rmtree(roots.preprocessed / f"Dataset{TASK + 2:03d}_NoPlans")


def test_train_configuration_not_preprocessed(capsys, roots):
    assert_error(capsys, ["train", "--task", TASK, "--config", "2d", "--device", "cpu", *_roots(roots)], "2d")


def test_train_resume_and_validate_without_a_trained_fold(capsys, roots, tmp_path):
    s = _copy_dataset(roots, tmp_path)
    assert_error(capsys, ["train", "--task", TASK, "--validate-only", "--device", "cpu", *_roots(s)],
                 "nnfastTrainer__nnfast_plans__3d_fullres", "does not exist")


def test_synth_min_shape_without_max_shape(capsys, tmp_path):
    assert_error(capsys, ["synth", "--out", tmp_path, "--min-shape", "8", "8", "8"], "--min-shape", "--max-shape")


@pytest.mark.parametrize("lo,hi", [((8, 8, 8), (4, 4, 4)), ((0, 8, 8), (8, 8, 8)), ((-4, 8, 8), (8, 8, 8))])
def test_synth_bad_shapes(capsys, tmp_path, lo, hi):
    assert_error(capsys, ["synth", "--out", tmp_path, "--min-shape", *lo, "--max-shape", *hi], "shape")


def test_synth_negative_test_cases(capsys, tmp_path):
    assert_error(capsys, ["synth", "--out", tmp_path, "--test-cases", "-1"], "--test-cases")


def test_synth_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_error(capsys, ["synth", "--out", f], "afile")


def test_demo_folder_is_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_error(capsys, ["demo", "--folder", f], "afile")


# --------------------------------------------------------------------------------------------------- convert
def test_convert_missing_and_empty_task_folder(capsys, tmp_path):
    raw = tmp_path / "raw"
    assert_error(capsys, ["convert", "--msd", tmp_path / "Task09_Nope", "--raw", raw], "Task09_Nope")
    (tmp_path / "Task09_Empty").mkdir()
    assert_error(capsys, ["convert", "--msd", tmp_path / "Task09_Empty", "--raw", raw], "Task09_Empty")


def test_convert_folder_not_named_like_a_task(capsys, tmp_path):
    (tmp_path / "whatever").mkdir()
    assert_error(capsys, ["convert", "--msd", tmp_path / "whatever", "--raw", tmp_path / "raw"], "whatever")


def test_convert_invalid_dataset_json(capsys, tmp_path):
    task = tmp_path / "Task09_Broken"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "dataset.json").write_text('{"labels": {"0": "background"')
    assert_error(capsys, ["convert", "--msd", task, "--raw", tmp_path / "raw"], "dataset.json")


# --------------------------------------------------------------------------------------- corrupted raw data
def _verify_report(capsys, s: Settings) -> str:
    """``nnfast verify``'s report (stdout) of a dataset it can open but that has problems: exit code 1."""
    code = main([str(a) for a in ["verify", "--task", TASK, *_roots(s)]])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err, captured
    return captured.out


@pytest.mark.parametrize("text", ['{"channel_names": {"0": "CT"}, "labels": ', "[1, 2, 3]", None])
def test_bad_dataset_json(capsys, roots, tmp_path, text):
    s = _copy_dataset(roots, tmp_path)
    shutil.rmtree(s.preprocessed)
    dj = s.raw / NAME / "dataset.json"
    if text is None:
        dj.unlink()
    else:
        dj.write_text(text)
    assert "dataset.json" in _verify_report(capsys, s)
    for command in ("plan", "preprocess"):
        assert_error(capsys, [command, "--task", TASK, *_roots(s)], "dataset.json")


def test_empty_images_folder(capsys, roots, tmp_path):
    s = _copy_dataset(roots, tmp_path)
    shutil.rmtree(s.preprocessed)
    for f in (s.raw / NAME / "imagesTr").iterdir():
        f.unlink()
    assert_error(capsys, ["plan", "--task", TASK, *_roots(s)], "imagesTr")


def test_truncated_image_is_reported_by_verify_and_refused_by_plan(capsys, roots, tmp_path):
    s = _copy_dataset(roots, tmp_path)
    shutil.rmtree(s.preprocessed)
    _truncate(s.raw / NAME / "imagesTr" / "case_000_0000.nii.gz")
    assert "case_000_0000.nii.gz" in _verify_report(capsys, s)
    assert_error(capsys, ["plan", "--task", TASK, *_roots(s)], "case_000_0000.nii.gz", "failed verification")


def test_nan_image_is_a_verify_error(capsys, roots, tmp_path):
    s = _copy_dataset(roots, tmp_path)
    shutil.rmtree(s.preprocessed)
    img = np.zeros((12, 24, 24), np.float32)
    img[2:6, 4:9, 4:9] = 100
    img[3, 5, 5] = np.nan
    write_image(img, s.raw / NAME / "imagesTr" / "case_001_0000.nii.gz", (1.0, 1.0, 1.0))
    out = _verify_report(capsys, s)
    assert "error: image file stores non-finite values [" in out and "case_001_0000.nii.gz" in out
    assert "1 NaN and 0 inf voxel(s)" in out and "FAILED" in out


# ------------------------------------------------------------------------------------- corrupted preprocessed
def test_invalid_plans_json(capsys, roots, tmp_path):
    s = _copy_dataset(roots, tmp_path)
    plans = next((s.preprocessed / NAME).glob("*plans*.json"))
    plans.write_text("{ not json")
    assert_error(capsys, ["train", "--task", TASK, "--device", "cpu", *_roots(s)], plans.name)


def test_store_that_is_not_a_zarr_store(capsys, roots, tmp_path):
    s = _copy_dataset(roots, tmp_path)
    stores = sorted((s.preprocessed / NAME).rglob("case_*.zarr"))
    assert len(stores) == 5
    for store in stores:
        shutil.rmtree(store)
        store.mkdir()
        (store / "zarr.json").write_text("garbage")
    assert_error(capsys, ["train", "--task", TASK, "--device", "cpu", "--epochs", "1", "--iterations", "1",
                          "--val-iterations", "0", "--workers", "0", "--no-val", *_roots(s)], ".zarr")


# ------------------------------------------------------------------------------------------------- predict
def test_predict_needs_task_or_model_folder(capsys, tmp_path):
    assert_error(capsys, ["predict", "-i", tmp_path, "-o", tmp_path / "out"], "--task", "--model-folder")


def test_predict_missing_model_folder(capsys, roots, tmp_path):
    inp = roots.raw / NAME / "imagesTr"
    assert_error(capsys, ["predict", "-i", inp, "-o", tmp_path / "out", "--model-folder", tmp_path / "nomodel"],
                 "nomodel")
    assert_error(capsys, ["predict", "-i", inp, "-o", tmp_path / "out", "--task", TASK, "--device", "cpu",
                          *_roots(roots)], "Dataset041")  # nothing trained: the results root has no such dataset


def test_predict_model_folder_without_checkpoints(capsys, roots, tmp_path):
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    inp = roots.raw / NAME / "imagesTr"
    assert_error(capsys, ["predict", "-i", inp, "-o", tmp_path / "out", "--model-folder", model], "model")


@pytest.mark.parametrize("argv_extra,name", [
    (["--step", "0"], "--step"), (["--step", "1.5"], "--step"), (["--folds", "x"], "--folds"),
    (["--device", "tpu"], "tpu"), (["--checkpoint", "nope"], "nope"),
])
def test_predict_bad_values(capsys, roots, tmp_path, argv_extra, name):
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    inp = roots.raw / NAME / "imagesTr"
    assert_error(capsys, ["predict", "-i", inp, "-o", tmp_path / "out", "--model-folder", model, *argv_extra], name)


def test_predict_missing_and_empty_input(capsys, roots, tmp_path):
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    assert_error(capsys, ["predict", "-i", tmp_path / "noinput", "-o", tmp_path / "out", "--model-folder", model],
                 "noinput")
    (tmp_path / "empty").mkdir()
    assert_error(capsys, ["predict", "-i", tmp_path / "empty", "-o", tmp_path / "out", "--model-folder", model],
                 "empty")


# ------------------------------------------------------------------------------------------------ evaluate
def _seg_folder(roots, tmp_path, name) -> Path:
    d = tmp_path / name
    shutil.copytree(roots.raw / NAME / "labelsTr", d)
    return d


def test_evaluate_missing_and_empty_folders(capsys, roots, tmp_path):
    ref = _seg_folder(roots, tmp_path, "ref")
    assert_error(capsys, ["evaluate", "--pred", tmp_path / "nopred", "--ref", ref, "--labels", "1"], "nopred")
    assert_error(capsys, ["evaluate", "--pred", ref, "--ref", tmp_path / "noref", "--labels", "1"], "noref")
    (tmp_path / "empty").mkdir()
    assert_error(capsys, ["evaluate", "--pred", tmp_path / "empty", "--ref", ref, "--labels", "1"], "empty")


def test_evaluate_without_labels(capsys, roots, tmp_path):
    ref = _seg_folder(roots, tmp_path, "ref")
    assert_error(capsys, ["evaluate", "--pred", ref, "--ref", ref], "--dataset-json")


def test_evaluate_invalid_and_missing_dataset_json(capsys, roots, tmp_path):
    ref = _seg_folder(roots, tmp_path, "ref")
    bad = tmp_path / "dataset.json"
    bad.write_text('{"labels": ')
    assert_error(capsys, ["evaluate", "--pred", ref, "--ref", ref, "--dataset-json", bad], "dataset.json")
    assert_error(capsys, ["evaluate", "--pred", ref, "--ref", ref, "--dataset-json", tmp_path / "none.json"],
                 "none.json")


def test_evaluate_truncated_prediction(capsys, roots, tmp_path):
    ref = _seg_folder(roots, tmp_path, "ref")
    pred = _seg_folder(roots, tmp_path, "pred")
    _truncate(pred / "case_000.nii.gz")
    assert_error(capsys, ["evaluate", "--pred", pred, "--ref", ref, "--labels", "1", "--workers", "1"],
                 "case_000")


def test_evaluate_prediction_on_another_grid(capsys, roots, tmp_path):
    ref = _seg_folder(roots, tmp_path, "ref")
    pred = _seg_folder(roots, tmp_path, "pred")
    write_image(np.zeros((8, 16, 12), np.uint8), pred / "case_002.nii.gz", (1.0, 1.0, 1.0))
    assert_error(capsys, ["evaluate", "--pred", pred, "--ref", ref, "--labels", "1", "--workers", "1"],
                 "case_002", "shape")


def test_evaluate_unknown_task(capsys, roots, tmp_path):
    ref = _seg_folder(roots, tmp_path, "ref")
    assert_error(capsys, ["evaluate", "--pred", ref, "--ref", ref, "--task", "999", *_roots(roots)], "999")


# --------------------------------------------------------------------------- find-best, ensemble, postprocess
def test_find_best_without_trained_configurations(capsys, roots, tmp_path):
    assert_error(capsys, ["find-best", "--task", TASK, *_roots(roots)], "041")  # no results folder at all
    s = Settings(raw=roots.raw, preprocessed=roots.preprocessed, results=tmp_path / "res")
    (s.results / NAME).mkdir(parents=True)
    assert_error(capsys, ["find-best", "--task", TASK, *_roots(s)], NAME)


def test_find_best_bad_folds(capsys, roots):
    assert_error(capsys, ["find-best", "--task", TASK, "--folds", "-1", *_roots(roots)], "-1")


def test_ensemble_needs_two_folders(capsys, roots, tmp_path):
    a = _seg_folder(roots, tmp_path, "a")
    assert_error(capsys, ["ensemble", "-i", a, "-o", tmp_path / "out"], "two")


def test_ensemble_missing_folder_and_no_probabilities(capsys, roots, tmp_path):
    a, b = _seg_folder(roots, tmp_path, "a"), _seg_folder(roots, tmp_path, "b")
    assert_error(capsys, ["ensemble", "-i", a, tmp_path / "nofolder", "-o", tmp_path / "out"], "nofolder")
    assert_error(capsys, ["ensemble", "-i", a, b, "-o", tmp_path / "out"], "npz")


def test_ensemble_invalid_dataset_json(capsys, roots, tmp_path):
    a, b = _seg_folder(roots, tmp_path, "a"), _seg_folder(roots, tmp_path, "b")
    bad = tmp_path / "dataset.json"
    bad.write_text("{")
    assert_error(capsys, ["ensemble", "-i", a, b, "-o", tmp_path / "out", "--dataset-json", bad], "dataset.json")


def test_apply_postprocessing_bad_plan(capsys, roots, tmp_path):
    a = _seg_folder(roots, tmp_path, "a")
    out = tmp_path / "out"
    assert_error(capsys, ["apply-postprocessing", "-i", a, "-o", out, "--plan", tmp_path / "none.json"], "none.json")
    bad = tmp_path / "pp.json"
    bad.write_text("{ nope")
    assert_error(capsys, ["apply-postprocessing", "-i", a, "-o", out, "--plan", bad], "pp.json")
    bad.write_text(json.dumps({"steps": [{"kind": "explode"}]}))
    assert_error(capsys, ["apply-postprocessing", "-i", a, "-o", out, "--plan", bad], "pp.json")


def test_apply_postprocessing_missing_input(capsys, tmp_path):
    plan = tmp_path / "pp.json"
    from nnfast.evaluate.postprocessing import PostprocessingPlan

    PostprocessingPlan(()).write(plan)
    assert_error(capsys, ["apply-postprocessing", "-i", tmp_path / "noin", "-o", tmp_path / "out", "--plan", plan],
                 "noin")


def test_apply_postprocessing_truncated_segmentation(capsys, roots, tmp_path):
    a = _seg_folder(roots, tmp_path, "a")
    _truncate(a / "case_001.nii.gz")
    plan = tmp_path / "pp.json"
    from nnfast.evaluate.postprocessing import KeepLargestStep, PostprocessingPlan

    PostprocessingPlan((KeepLargestStep((1,)),)).write(plan)
    assert_error(capsys, ["apply-postprocessing", "-i", a, "-o", tmp_path / "out", "--plan", plan, "--workers", "1"],
                 "case_001")


# ------------------------------------------------------------------------------- optional dependencies missing
def test_scheduler_without_dask_names_the_extra(capsys, roots, tmp_path, monkeypatch):
    for name in ("distributed", "dask"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    s = _copy_dataset(roots, tmp_path)
    assert_error(capsys, ["preprocess", "--task", TASK, "--force", "--workers", "1", "--scheduler", "local:1",
                          *_roots(s)], 'pip install "nnfast[dask]"')


def test_progress_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    from nnfast.errors import MissingDependencyError
    from nnfast.train.progress import TrainingHistory, plot_progress

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "nnfast\[plot\]"'):
        plot_progress(TrainingHistory(), tmp_path / "progress.png")
    assert not (tmp_path / "progress.png").exists()


def test_worker_memory_sampling_without_psutil(monkeypatch):
    """psutil only adds memory figures to dead-worker messages: without it, sampling is skipped, and the peak
    resident sizes still come from ``resource``."""
    from nnfast import parallel

    monkeypatch.setitem(sys.modules, "psutil", None)

    class Slot:
        rss_seen = 0

    slot = Slot()
    parallel._sample_rss([slot])
    assert slot.rss_seen == 0
    peak = parallel.peak_rss_bytes()
    assert peak[0] > 0


def test_require_names_the_pip_command(monkeypatch):
    from nnfast.errors import MissingDependencyError, NnfastError
    from nnfast.extras import require

    pytest.importorskip("psutil")
    assert require("psutil", "sampling worker memory").__name__ == "psutil"
    monkeypatch.setitem(sys.modules, "psutil", None)
    with pytest.raises(MissingDependencyError) as e:
        require("psutil", "sampling worker memory")
    assert isinstance(e.value, (NnfastError, ImportError))
    assert 'pip install "nnfast[psutil]"' in str(e.value) and "sampling worker memory" in str(e.value)


def test_predict_corrupt_checkpoint(capsys, roots, tmp_path):
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    for name in ("nnfast_plans.json", "dataset.json"):
        shutil.copy(roots.preprocessed / NAME / name, model / name)
    (model / "fold_0" / "checkpoint_final.pt").write_bytes(b"PK\x03\x04 truncated")
    assert_error(capsys, ["predict", "-i", roots.raw / NAME / "imagesTr", "-o", tmp_path / "out", "--model-folder",
                          model, "--device", "cpu"], "checkpoint_final.pt")


# --------------------------------------------------------------------------------------- regions, fine-tuning
@pytest.mark.parametrize("labels,rco,name", [
    ({"background": 0, "whole": [1, 2], "ghost": [3]}, [1, 3], "region `ghost` names labels"),
    ({"background": 0, "whole": [1, 2], "core": 2}, [1], "regions_class_order"),
], ids=["region-names-missing-label", "short-regions-class-order"])
def test_bad_regions(capsys, roots, tmp_path, labels, rco, name):
    s = _copy_dataset(roots, tmp_path)
    shutil.rmtree(s.preprocessed)
    dj = s.raw / NAME / "dataset.json"
    d = json.loads(dj.read_text())
    dj.write_text(json.dumps({**d, "labels": labels, "regions_class_order": rco}))
    assert name in _verify_report(capsys, s)
    for command in ("plan", "preprocess"):
        assert_error(capsys, [command, "--task", TASK, *_roots(s)], name)
    assert not s.preprocessed.exists() or not any(s.preprocessed.rglob("*.zarr"))


def test_train_pretrained_weights_missing_or_of_another_architecture(capsys, roots, tmp_path):
    import torch

    from nnfast.network import build_network
    from nnfast.plan.api import load_current_plans

    s = Settings(raw=roots.raw, preprocessed=roots.preprocessed, results=tmp_path / "res")
    argv = ["train", "--task", TASK, "--epochs", "1", "--device", "cpu", *_roots(s)]
    assert_error(capsys, [*argv, "--pretrained-weights", tmp_path / "none.pth"], "none.pth", "do not exist")
    other = tmp_path / "other.pt"
    torch.save(build_network(load_current_plans(TASK, roots), "2d", 1, 3).state_dict(), other)
    assert_error(capsys, [*argv, "--pretrained-weights", other], str(other), "do not fit this network")
    assert not (tmp_path / "res").exists()
