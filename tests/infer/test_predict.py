"""Export to the original geometry and whole-folder prediction: parity with nnU-Net's export and predictor, geometry
of the written masks, per-case error reporting, probabilities, fold ensembling, the cascade."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from nnfast.errors import CaseNotFoundError, PlanError
from nnfast.infer.export import argmax_channels, logits_to_segmentation
from nnfast.infer.model import load_model
from nnfast.infer.predict import PredictOptions, predict_folder, predict_logits
from nnfast.preprocess.pipeline import preprocess_arrays

from factories import write_image
from infer._models import body_image, dataset_json, make_model_folder, tiny_plans
from nnunet_ref import ACCUMULATE_IN_FLOAT32_SOURCE, POOLS_AS_THREADS_SOURCE

MANY = {"background": 0, **{f"organ{i}": i for i in range(1, 7)}}


# --------------------------------------------------------------------------------------------- export
def _case(plans, config, shape_zyx, spacing_zyx, n_classes, seed=0):
    """Preprocessing properties of a synthetic case and smooth random logits on its preprocessed grid."""
    rng = np.random.default_rng(seed)
    img = body_image(shape_zyx, rng)[None]
    _, _, props, _ = preprocess_arrays(img, None, spacing_zyx, plans, config)
    logits = gaussian_filter(rng.normal(size=(n_classes, *props["shape_after_resampling"])), (0, 1.5, 1.5, 1.5))
    return props, (logits * 20).astype(np.float32)


def _nnunet_export(logits, props, plans, config, probabilities=False, regions_class_order=None):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnfast.plan.nnunet_compat import to_nnunet_plans

    dj = dataset_json(plans)
    if regions_class_order is not None:
        dj["regions_class_order"] = list(regions_class_order)
    pm = PlansManager(to_nnunet_plans(plans, dj))
    nn_props = {**copy.deepcopy(props), "spacing": props["spacing_reader_order"]}
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.from_numpy(logits.copy()), pm, pm.get_configuration(config), pm.get_label_manager(dj), nn_props,
        return_probabilities=probabilities, num_threads_torch=1)


@pytest.mark.compat
@pytest.mark.parametrize("config,shape,spacing,labels", [
    ("3d_fullres", (20, 26, 9), (0.8, 0.9, 3.3), None),       # transposed, cropped, in-plane upsampling
    ("3d_fullres", (18, 22, 7), (1.3, 1.2, 5.0), MANY),       # anisotropic: separate z (order 0), 7 classes
    ("3d_fullres", (14, 16, 12), (1.2, 1.1, 1.3), None),      # isotropic-ish: 3D linear
    ("2d", (16, 20, 6), (0.7, 0.8, 3.0), MANY),               # 2D configuration on a 3D image
])
def test_export_equals_nnunet(config, shape, spacing, labels):
    plans = tiny_plans()
    if labels:
        plans = dataclasses.replace(plans, labels=labels)
    n = len(plans.labels)
    props, logits = _case(plans, config, shape, spacing, n)
    assert props["shape_after_resampling"] != props["shape_after_cropping_and_before_resampling"]
    seg, probs = logits_to_segmentation(logits, props, plans, config, chunk=2, threads=2)
    ref = _nnunet_export(logits, props, plans, config)
    assert seg.shape == tuple(shape) and seg.dtype == ref.dtype == np.uint8
    np.testing.assert_array_equal(seg, ref)
    assert probs is None and len(np.unique(seg)) > 1

    seg_p, probs = logits_to_segmentation(logits, props, plans, config, return_probabilities=True)
    ref_seg, ref_probs = _nnunet_export(logits, props, plans, config, probabilities=True)
    np.testing.assert_array_equal(seg_p, ref_seg)
    assert probs.shape == ref_probs.shape == (n, *shape)
    np.testing.assert_allclose(probs, ref_probs.numpy() if hasattr(ref_probs, "numpy") else ref_probs, atol=2e-6)


@pytest.mark.compat
@pytest.mark.parametrize("spacing, target", [((3.3, 0.8, 0.8), (9, 30, 34)),   # anisotropic: separate z
                                             ((1.6, 1.4, 1.5), (14, 25, 21))])  # 3D linear
def test_next_stage_inputs_equal_nnunets_resample_and_save(tmp_path, spacing, target):
    """A cascade's first stage writes its logits resampled to the next stage's grid and reduced to labels
    (nnU-Net's ``resample_and_save`` in ``perform_actual_validation``)."""
    import blosc2
    from nnunetv2.inference.export_prediction import resample_and_save
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnfast.infer.export import logits_to_next_stage
    from nnfast.plan.nnunet_compat import to_nnunet_plans

    plans = dataclasses.replace(tiny_plans(cascade=True), labels=MANY)
    configs = dict(plans.configurations)
    configs["3d_lowres"] = dataclasses.replace(configs["3d_lowres"], spacing=tuple(spacing))
    plans = dataclasses.replace(plans, configurations=configs)
    rng = np.random.default_rng(0)
    small = tuple(max(2, t // 2) for t in target)
    logits = (gaussian_filter(rng.normal(size=(7, *small)), (0, 1, 1, 1)) * 20).astype(np.float32)
    ours = logits_to_next_stage(logits, target, plans, "3d_lowres", chunk=3, threads=2)
    dj = dataset_json(plans)
    pm = PlansManager(to_nnunet_plans(plans, dj))
    props = {"spacing": [1.0, 1.0, 1.0], "shape_after_cropping_and_before_resampling": list(target)}
    resample_and_save(torch.from_numpy(logits.copy()), list(target), str(tmp_path / "case"), pm,
                      pm.get_configuration("3d_lowres"), props, dj, num_threads_torch=1)
    ref = blosc2.open(str(tmp_path / "case.b2nd"), mode="r")[:]
    assert ours.shape == ref.shape == target and len(np.unique(ours)) > 3
    np.testing.assert_array_equal(ours, ref)


def test_export_chunking_and_threads_do_not_change_labels():
    plans = dataclasses.replace(tiny_plans(), labels=MANY)
    props, logits = _case(plans, "3d_fullres", (18, 22, 7), (1.3, 1.2, 5.0), 7, seed=3)
    logits[:, :3] = 5.0  # exact ties: the lowest class must win, whatever the grouping
    ref, _ = logits_to_segmentation(logits, props, plans, "3d_fullres", chunk=7, threads=1)
    for chunk, threads in [(1, 1), (3, 2), (2, 3)]:
        seg, _ = logits_to_segmentation(logits, props, plans, "3d_fullres", chunk=chunk, threads=threads)
        np.testing.assert_array_equal(seg, ref)
    x = np.random.default_rng(0).normal(size=(5, 6, 7, 8)).astype(np.float32)
    x[2] = x[4] = x.max() + 1
    np.testing.assert_array_equal(argmax_channels(x), np.argmax(x, 0))


@pytest.mark.compat
def test_export_regions_equal_nnunet():
    regions = {"background": 0, "whole": [1, 2], "core": 2}
    plans = dataclasses.replace(tiny_plans(), labels=regions)
    props, logits = _case(plans, "3d_fullres", (16, 20, 8), (0.9, 0.9, 3.5), 2, seed=1)
    seg, _ = logits_to_segmentation(logits, props, plans, "3d_fullres", regions_class_order=(1, 2))
    ref = _nnunet_export(logits, props, plans, "3d_fullres", regions_class_order=(1, 2))
    np.testing.assert_array_equal(seg, ref)
    assert set(np.unique(seg)) == {0, 1, 2}
    with pytest.raises(PlanError, match="regions_class_order"):
        logits_to_segmentation(logits, props, plans, "3d_fullres")


# --------------------------------------------------------------------------------------------- predict_folder
def _geometry(path: Path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _inputs(folder: Path, seed=0) -> dict[str, tuple]:
    """Two single-channel cases: a rotated, offset one and a plain one; the body does not fill the field of view."""
    rng = np.random.default_rng(seed)
    rot = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    write_image(body_image((22, 26, 9), rng), folder / "a_0000.nii.gz", (0.9, 1.1, 3.3), origin=(1.5, -2, 3),
                direction=rot)
    write_image(body_image((30, 20, 8), rng), folder / "b_0000.nii.gz", (1.0, 0.7, 3.0))
    return {"a": _geometry(folder / "a_0000.nii.gz"), "b": _geometry(folder / "b_0000.nii.gz")}


def test_predicted_masks_have_the_input_geometry(tmp_path):
    plans = tiny_plans()
    assert list(plans.transpose_forward) != [0, 1, 2]
    model = make_model_folder(tmp_path / "results", plans, "3d_fullres")
    geoms = _inputs(tmp_path / "in")
    rep = predict_folder(tmp_path / "in", tmp_path / "out",
                         PredictOptions(model_folder=model, use_tta=False, device="cpu", workers=2))
    assert rep.ok and sorted(rep.written) == ["a", "b"]
    for cid, geom in geoms.items():
        out = tmp_path / "out" / f"{cid}.nii.gz"
        assert _geometry(out) == geom
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2}
        assert len(np.unique(seg)) > 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left
    assert json.loads((tmp_path / "out" / "nnfast_predict.json").read_text())["failed"] == {}


def test_broken_cases_are_reported_and_the_others_written(tmp_path):
    plans = tiny_plans(n_channels=2)
    model = make_model_folder(tmp_path / "results", plans, "3d_fullres")
    rng = np.random.default_rng(1)
    inp = tmp_path / "in"
    for c in range(2):
        write_image(body_image((16, 20, 8), rng), inp / f"good_{c:04d}.nii.gz", (1.0, 1.0, 3.0))
    write_image(body_image((16, 20, 8), rng), inp / "missing_0000.nii.gz", (1.0, 1.0, 3.0))
    write_image(body_image((16, 20, 8), rng), inp / "grid_0000.nii.gz", (1.0, 1.0, 3.0))
    write_image(body_image((16, 21, 8), rng), inp / "grid_0001.nii.gz", (1.0, 1.0, 3.0))
    write_image(body_image((16, 20, 8), rng), inp / "origin_0000.nii.gz", (1.0, 1.0, 3.0))
    write_image(body_image((16, 20, 8), rng), inp / "origin_0001.nii.gz", (1.0, 1.0, 3.0), origin=(0, 0, 5))
    rep = predict_folder(inp, tmp_path / "out", PredictOptions(model_folder=model, use_tta=False, device="cpu"))
    assert sorted(rep.written) == ["good"] and (tmp_path / "out" / "good.nii.gz").is_file()
    assert sorted(rep.failed) == ["grid", "missing", "origin"]
    assert "missing_0001.nii.gz" in rep.failed["missing"] and "is missing" in rep.failed["missing"]
    assert "grid_0001.nii.gz" in rep.failed["grid"] and "shape" in rep.failed["grid"]
    assert "origin_0001.nii.gz" in rep.failed["origin"] and "origin" in rep.failed["origin"]
    assert not (tmp_path / "out" / "missing.nii.gz").exists()
    assert "3 failed" in rep.format()


def test_non_finite_image_is_reported(tmp_path):
    # SimpleITK's NIfTI reader turns NaN into 0, so the NaN case is a MetaImage
    plans = tiny_plans()
    model = make_model_folder(tmp_path / "results", plans, "3d_fullres")
    rng = np.random.default_rng(2)
    bad = body_image((16, 20, 8), rng)
    bad[5, 6, 3] = np.nan
    write_image(bad, tmp_path / "nan_0000.mha", (1.0, 1.0, 3.0))
    write_image(body_image((16, 20, 8), rng), tmp_path / "ok_0000.nii.gz", (1.0, 1.0, 3.0))
    two = [write_image(body_image((16, 20, 8), rng), tmp_path / f"two_{c:04d}.nii.gz", (1.0, 1.0, 3.0))
           for c in range(2)]
    rep = predict_folder([[tmp_path / "nan_0000.mha"], [tmp_path / "ok_0000.nii.gz"], two], tmp_path / "out",
                         PredictOptions(model_folder=model, use_tta=False, device="cpu"))
    assert list(rep.written) == ["ok"]
    assert "nan_0000.mha" in rep.failed["nan"] and "NaN" in rep.failed["nan"]
    assert "expects 1 channel" in rep.failed["two"]


def test_probabilities_and_fold_ensemble(tmp_path):
    plans = tiny_plans()
    model_dir = make_model_folder(tmp_path / "results", plans, "3d_fullres", folds=(0, 1))
    _inputs(tmp_path / "in")
    rep = predict_folder(tmp_path / "in", tmp_path / "out",
                         PredictOptions(model_folder=model_dir, use_tta=False, device="cpu", save_probabilities=True))
    assert rep.ok
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "a.nii.gz")))
    with np.load(tmp_path / "out" / "a.npz", allow_pickle=False) as z:
        probs = z["probabilities"]
    assert probs.shape == (3, *seg.shape) and probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=3e-3)
    agree = np.mean(np.argmax(probs, 0) == seg)
    assert agree > 0.99  # float16 rounding may flip near-ties
    props = json.loads((tmp_path / "out" / "a.json").read_text())
    assert props["case_id"] == "a" and "bbox_used_for_cropping" in props

    both = load_model(model_dir, (0, 1))
    data = np.random.default_rng(0).normal(size=(1, 8, 16, 20)).astype(np.float32)
    avg = predict_logits(both, data, use_tta=False, device="cpu")
    singles = [predict_logits(load_model(model_dir, (f,)), data, use_tta=False, device="cpu") for f in (0, 1)]
    np.testing.assert_allclose(avg, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    assert np.abs(singles[0] - singles[1]).max() > 1e-2


def test_cascade_runs_the_previous_stage_first(tmp_path):
    plans = tiny_plans(cascade=True)
    results = tmp_path / "results"
    model = make_model_folder(results, plans, "3d_cascade_fullres", n_in=1 + 2)
    _inputs(tmp_path / "in")
    with pytest.raises(CaseNotFoundError, match="needs the `3d_lowres` predictions"):
        predict_folder(tmp_path / "in", tmp_path / "out",
                       PredictOptions(model_folder=model, use_tta=False, device="cpu"))
    make_model_folder(results, plans, "3d_lowres")
    rep = predict_folder(tmp_path / "in", tmp_path / "out",
                         PredictOptions(model_folder=model, use_tta=False, device="cpu"))
    assert rep.ok and sorted(rep.written) == ["a", "b"]
    prev = tmp_path / "out" / "previous_stage_3d_lowres"
    assert (prev / "a.nii.gz").is_file() and (prev / "b.nii.gz").is_file()
    assert load_model(model).num_input_channels == 3


def test_load_model_errors(tmp_path):
    with pytest.raises(CaseNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseNotFoundError, match="no fold"):
        load_model(tmp_path / "empty")
    model = make_model_folder(tmp_path / "results", tiny_plans(), "3d_fullres")
    with pytest.raises(CaseNotFoundError, match="fold 3"):
        load_model(model, (3,))


@pytest.mark.compat
@pytest.mark.slow
def test_predict_folder_equals_nnunet_predict_from_files(tmp_path):
    """The whole chain (nnU-Net's preprocessing, sliding window with TTA, export) against nnU-Net's predictor on
    the same weights, in nnU-Net's own model folder layout (which nnfast reads too). nnU-Net accumulates in float16
    even on the CPU; it is made to accumulate in float32 so that labels can be compared exactly."""
    from nnfast.plan.nnunet_compat import to_nnunet_plans

    plans = tiny_plans()
    ours = make_model_folder(tmp_path / "results", plans, "3d_fullres")
    nn_dir = tmp_path / "nnunet_model"
    (nn_dir / "fold_0").mkdir(parents=True)
    dj = dataset_json(plans)
    (nn_dir / "plans.json").write_text(json.dumps(to_nnunet_plans(plans, dj)))
    (nn_dir / "dataset.json").write_text(json.dumps(dj))
    ck = torch.load(ours / "fold_0" / "checkpoint_final.pt", weights_only=True)
    torch.save({"network_weights": ck["network_weights"], "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               nn_dir / "fold_0" / "checkpoint_final.pth")
    geoms = _inputs(tmp_path / "in")
    (tmp_path / "nn_out").mkdir()
    code = f"""
import types, torch
torch.set_num_threads(1)
import nnunetv2.inference.predict_from_raw_data as m
{ACCUMULATE_IN_FLOAT32_SOURCE}
accumulate_in_float32(m)
{POOLS_AS_THREADS_SOURCE}
nnunet_pools_as_threads()
p = m.nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
p.initialize_from_trained_model_folder({str(nn_dir)!r}, (0,), "checkpoint_final.pth")
p.predict_from_files_sequential({str(tmp_path / 'in')!r}, {str(tmp_path / 'nn_out')!r}, save_probabilities=False)
"""
    env = {**os.environ, "nnUNet_compile": "f", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for folder in (ours, nn_dir):  # nnfast's layout and nnU-Net's
        out = tmp_path / f"out_{folder.name}"
        rep = predict_folder(tmp_path / "in", out, PredictOptions(model_folder=folder, use_tta=True, device="cpu"))
        assert rep.ok
        for cid, geom in geoms.items():
            ref = tmp_path / "nn_out" / f"{cid}.nii.gz"
            assert _geometry(out / f"{cid}.nii.gz") == _geometry(ref) == geom
            np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{cid}.nii.gz"))),
                                          sitk.GetArrayFromImage(sitk.ReadImage(str(ref))))


def test_cli_predict_exit_codes(tmp_path, capsys):
    from nnfast.cli.main import main

    plans = tiny_plans()
    model = make_model_folder(tmp_path / "results" / "Dataset999_TrainTest", plans, "3d_fullres")
    _inputs(tmp_path / "in")
    args = ["-i", str(tmp_path / "in"), "--no-tta", "--device", "cpu", "--workers", "1"]
    assert main(["predict", *args, "-o", str(tmp_path / "out1"), "--task", "999", "--results",
                 str(tmp_path / "results"), "--folds", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "out1").glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz"]
    assert "2 case(s) written" in capsys.readouterr().out
    write_image(np.zeros((4, 5, 6), np.float32), tmp_path / "in" / "c_0001.nii.gz", (1.0, 1.0, 1.0))
    assert main(["predict", *args, "-o", str(tmp_path / "out2"), "--model-folder", str(model), "-q"]) == 1
    err = capsys.readouterr().err
    assert "c: channel 0" in err and "c_0000.nii.gz" in err and (tmp_path / "out2" / "a.nii.gz").is_file()
    assert main(["predict", *args, "-o", str(tmp_path / "out3"), "--model-folder", str(model),
                 "--config", "2d"]) == 2
    assert "holds `3d_fullres` checkpoints" in capsys.readouterr().err


def test_first_case_prepared_before_the_model_loads_is_the_case_the_model_would_prepare(tmp_path):
    from nnfast.infer.inputs import list_cases, preprocess_input
    from nnfast.infer.predict import _FirstCase, _start_first_case

    plans = tiny_plans()
    model_dir = make_model_folder(tmp_path / "results", plans, "3d_fullres")
    _inputs(tmp_path / "in")
    opts = PredictOptions(model_folder=model_dir, use_tta=False, device="cpu")
    first = _start_first_case(tmp_path / "in", tmp_path / "out", opts)
    model = load_model(model_dir)
    a, b = list_cases(tmp_path / "in", ".nii.gz", 1)
    assert first is not None and first.case == a
    assert first.take(b, model) is None  # another case: the pipeline prepares it itself
    first = _start_first_case(tmp_path / "in", tmp_path / "out", opts)
    data, props = first.take(a, model)
    ref_data, ref_props = preprocess_input(a, model.plans, model.config_name)
    np.testing.assert_array_equal(data, ref_data)
    assert json.dumps(props, sort_keys=True, default=str) == json.dumps(ref_props, sort_keys=True, default=str)
    assert first.take(a, model) is None and first.seconds > 0  # handed over once
    assert _FirstCase(a, plans, "2d").take(a, model) is None  # prepared for another configuration

    # the early listing of the input folder is handed to the main path once, only for the same ending and channels
    names = list(model.plans.channel_names.values())
    assert first.listing_for(".nii.gz", 1, names) == ([a, b], [])
    assert first.listing_for(".nii.gz", 1, names) is None
    first = _start_first_case(tmp_path / "in", tmp_path / "out", opts)
    assert first.listing_for(".mha", 1, names) is None and first.listing_for(".nii.gz", 1, names) is None

    # nothing is started where the model folder alone cannot say how to prepare the case
    assert _start_first_case(tmp_path / "in", tmp_path / "out", PredictOptions(model_folder=tmp_path / "no")) is None
    cascade = make_model_folder(tmp_path / "results", tiny_plans(cascade=True), "3d_cascade_fullres", n_in=3)
    assert _start_first_case(tmp_path / "in", tmp_path / "out", PredictOptions(model_folder=cascade)) is None
    (tmp_path / "out").mkdir()
    for cid in ("a", "b"):
        (tmp_path / "out" / f"{cid}.nii.gz").write_bytes(b"")
    assert _start_first_case(tmp_path / "in", tmp_path / "out",
                             dataclasses.replace(opts, continue_prediction=True)) is None

    # predict_folder with the early first case writes what it writes with an already loaded model
    predict_folder(tmp_path / "in", tmp_path / "early", opts)
    predict_folder(tmp_path / "in", tmp_path / "loaded", opts, model=model)
    for cid in ("a", "b"):
        np.testing.assert_array_equal(*(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"{cid}.nii.gz")))
                                        for d in ("early", "loaded")))


def test_cli_program_flushes_its_report_before_the_quick_exit(tmp_path):
    plans = tiny_plans()
    model = make_model_folder(tmp_path / "results", plans, "3d_fullres")
    _inputs(tmp_path / "in")
    cmd = [sys.executable, "-m", "nnfast.cli", "predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
           "--model-folder", str(model), "--no-tta", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "2 case(s) written" in run.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz"]
    write_image(np.zeros((4, 5, 6), np.float32), tmp_path / "in" / "c_0001.nii.gz", (1.0, 1.0, 1.0))
    run = subprocess.run([*cmd[:7], str(tmp_path / "out2"), *cmd[8:], "-q"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1 and "c: channel 0" in run.stderr


def test_validate_fold_predicts_and_scores_the_validation_cases(tmp_path):
    from factories import make_raw_dataset

    from nnfast.infer.validation import validate_fold
    from nnfast.settings import Settings

    settings = Settings(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "results")
    make_raw_dataset(settings.raw, 999, "TrainTest", [(20, 22, 8)] * 3, [(1.0, 1.0, 3.0)] * 3)
    (settings.preprocessed / "Dataset999_TrainTest").mkdir(parents=True)
    splits = [{"train": ["case_002"], "val": ["case_000", "case_001"]}]
    (settings.preprocessed / "Dataset999_TrainTest" / "splits_final.json").write_text(json.dumps(splits))
    model = make_model_folder(settings.results / "Dataset999_TrainTest", tiny_plans(), "3d_fullres")
    summary = validate_fold(model / "fold_0", settings=settings, device="cpu")
    val = model / "fold_0" / "validation"
    assert sorted(p.name for p in val.glob("*.nii.gz")) == ["case_000.nii.gz", "case_001.nii.gz"]
    data = json.loads((val / "summary.json").read_text())
    assert len(data["metric_per_case"]) == 2 and "foreground_mean" in data
    assert summary is not None
