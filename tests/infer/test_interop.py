"""nnfast models in nnU-Net and nnU-Net's files in nnfast, checked against nnU-Net itself.

One nnfast model folder (tiny plans, two folds) is exported with ``nnfast export-model``; nnU-Net (a subprocess, its
data folders come from the environment) installs the zip with its own ``install_model_from_zip_file``, predicts with
``nnUNetPredictor`` (``predict_from_files_sequential`` with and without TTA, ``--save_probabilities``, and
``predict_single_npy_array``), ensembles the two prediction folders with its ``merge_files`` and postprocesses with
its ``postprocessing.pkl`` format and ``load_postprocess_save``. nnfast must produce the same masks from the same
files. nnU-Net accumulates the sliding window in float16 even on the CPU; it is made to accumulate in float32 (as in
``test_predict.py``) so that labels compare exactly.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnfast.cli.main import main
from nnfast.errors import DatasetError, FileFormatError, ShapeError
from nnfast.infer.model_zip import install_model

from factories import write_image
from infer._models import body_image, make_model_folder, tiny_plans
from nnunet_ref import ACCUMULATE_IN_FLOAT32_SOURCE, POOLS_AS_THREADS_SOURCE

pytestmark = [pytest.mark.compat, pytest.mark.slow]

DATASET = "Dataset999_TrainTest"
NN_FOLDER = f"{DATASET}/nnUNetTrainer__nnUNetPlans__3d_fullres"

_NNUNET = """
import os, sys, types
import numpy as np, torch
torch.set_num_threads(1)
import nnunetv2.inference.predict_from_raw_data as m
""" + ACCUMULATE_IN_FLOAT32_SOURCE + POOLS_AS_THREADS_SOURCE + """
accumulate_in_float32(m)
nnunet_pools_as_threads()
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.model_sharing.model_import import install_model_from_zip_file
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.ensembling.ensemble import merge_files
from nnunetv2.postprocessing.remove_connected_components import (
    load_postprocess_save, remove_all_but_largest_component_from_segmentation as keep_largest)

root, zip_file = sys.argv[1], sys.argv[2]
j = os.path.join
install_model_from_zip_file(zip_file)
folder = j(os.environ["nnUNet_results"], %r)
preds = {}
for tta in (True, False):
    p = m.nnUNetPredictor(use_mirroring=tta, device=torch.device("cpu"), perform_everything_on_device=False,
                          allow_tqdm=False)
    p.initialize_from_trained_model_folder(folder, None, "checkpoint_final.pth")
    os.makedirs(j(root, f"nn_tta{int(tta)}"))
    p.predict_from_files_sequential(j(root, "in"), j(root, f"nn_tta{int(tta)}"), save_probabilities=True)
    preds[tta] = p
img, props = SimpleITKIO().read_images([j(root, "in", "a_0000.nii.gz")])
seg, probs = preds[True].predict_single_npy_array(img, props, None, None, True)
np.savez(j(root, "single.npz"), seg=seg, probs=probs)
rw, lm = SimpleITKIO(), preds[True].label_manager
os.makedirs(j(root, "nn_ens"))
os.makedirs(j(root, "nn_pp"))
fns, kwargs = [keep_largest, keep_largest], [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]
save_pickle((fns, kwargs), j(root, "postprocessing.pkl"))
from nnunetv2.model_sharing.model_export import export_pretrained_model
export_pretrained_model(999, j(root, "nn_export.zip"), configurations=("3d_fullres",), folds=(0,))
for case in ("a", "b"):
    merge_files([j(root, f"nn_tta{t}", f"{case}.npz") for t in (1, 0)], j(root, "nn_ens", case), ".nii.gz", rw, lm)
    load_postprocess_save(j(root, "nn_tta1", f"{case}.nii.gz"), j(root, "nn_pp", f"{case}.nii.gz"), rw, fns, kwargs)
""" % NN_FOLDER


def _write_inputs(folder: Path) -> None:
    rng = np.random.default_rng(3)
    rot = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    write_image(body_image((22, 26, 9), rng), folder / "a_0000.nii.gz", (0.9, 1.1, 3.3), origin=(1.5, -2, 3),
                direction=rot)
    write_image(body_image((30, 20, 8), rng), folder / "b_0000.nii.gz", (1.0, 0.7, 3.0))


def _as_trainer_checkpoints(folder: Path, folds) -> None:
    """Rewrite the folds' checkpoints as ``nnfast train`` writes them (its save_checkpoint, with optimizer, RNG and
    history state next to the weights), so that the export is tested on the real format."""
    from nnfast.network import build_network
    from nnfast.train.checkpoint import capture_rng_state, save_checkpoint

    for f in folds:
        path = folder / f"fold_{f}" / "checkpoint_final.pt"
        ck = torch.load(path, weights_only=True)
        net = build_network(tiny_plans(), "3d_fullres", 1, 3)
        net.load_state_dict(ck["network_weights"])
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        net(torch.zeros(1, 1, 8, 16, 16))[0].sum().backward()
        opt.step()  # a real optimizer state; the weights are then put back
        net.load_state_dict(ck["network_weights"])
        save_checkpoint(path, {**{k: v for k, v in ck.items() if k not in ("format", "schema_version")},
                               "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
                               "lr_scheduler_state": None, "rng": capture_rng_state(), "current_epoch": 7,
                               "best_ema": 0.5, "history": {"train_losses": [1.0] * 7}})


def _training_files(folder: Path, fold: int, inputs: Path) -> None:
    """The fingerprint, and one fold's progress.png and validation/summary.json, written by nnfast's own writers
    (what training and its final validation leave; nnU-Net's export needs them)."""
    from nnfast.evaluate.metrics import evaluate_folder
    from nnfast.fingerprint.schema import Fingerprint, IntensityStats
    from nnfast.infer.predict import PredictOptions, predict_folder
    from nnfast.io.atomic import write_json_atomic
    from nnfast.train.progress import TrainingHistory, plot_progress

    for tta in (True, False):  # a stand-in validation: the model's predictions scored against its TTA predictions
        predict_folder(inputs, folder.parent / f"val_tta{int(tta)}", PredictOptions(
            model_folder=folder, folds=(fold,), use_tta=tta, device="cpu", workers=1))
    evaluate_folder(folder.parent / "val_tta0", folder.parent / "val_tta1", [1, 2],
                    output_file=folder / f"fold_{fold}" / "validation" / "summary.json")

    stats = IntensityStats(mean=0.0, median=0.0, std=1.0, min=-1.0, max=1.0, percentile_99_5=1.0,
                           percentile_00_5=-1.0)
    fp = Fingerprint(case_ids=("c0", "c1"), spacings=((3.0, 1.0, 1.0),) * 2, shapes_after_crop=((10, 24, 24),) * 2,
                     foreground_intensity_properties_per_channel=(stats,), median_relative_size_after_cropping=1.0)
    write_json_atomic(folder / "nnfast_fingerprint.json", fp.to_json())
    history = TrainingHistory()
    for e in range(3):
        history.append(train_loss=1.0 - e / 10, val_loss=1.1 - e / 10, dice_per_class=[0.1 * e, 0.2 * e], lr=1e-2,
                       start=float(e), end=e + 1.0)
    plot_progress(history, folder / f"fold_{fold}" / "progress.png")


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    """nnfast model -> zip (nnfast export-model) -> nnU-Net's install, predictions, ensemble, postprocessing."""
    root = tmp_path_factory.mktemp("interop")
    results = root / "nnfast_results"
    folder = make_model_folder(results / DATASET, tiny_plans(), "3d_fullres", folds=(0, 1))
    _as_trainer_checkpoints(folder, (0, 1))
    _write_inputs(root / "in")
    _training_files(folder, fold=0, inputs=root / "in")
    zip_file = root / "model.zip"
    assert main(["export-model", "--task", "999", "--config", "3d_fullres", "--results", str(results),
                 "-o", str(zip_file), "-q"]) == 0
    env = {**os.environ, "nnUNet_compile": "f", "OMP_NUM_THREADS": "1", "nnUNet_results": str(root / "nn_results"),
           "nnUNet_raw": str(root / "nn_raw"), "nnUNet_preprocessed": str(root / "nn_pre")}
    r = subprocess.run([sys.executable, "-c", _NNUNET, str(root), str(zip_file)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


def test_export_is_nnunets_zip_layout_and_nnunet_predicts_what_nnfast_predicts(interop, capsys):
    root = interop
    with zipfile.ZipFile(root / "model.zip") as zf:
        names = sorted(zf.namelist())
    assert names == sorted([f"{NN_FOLDER}/dataset.json", f"{NN_FOLDER}/plans.json",
                            f"{NN_FOLDER}/dataset_fingerprint.json", f"{NN_FOLDER}/fold_0/progress.png",
                            f"{NN_FOLDER}/fold_0/validation/summary.json",
                            f"{NN_FOLDER}/fold_0/checkpoint_final.pth", f"{NN_FOLDER}/fold_1/checkpoint_final.pth"])
    installed = root / "nn_results" / NN_FOLDER
    trained = root / "nnfast_results" / DATASET / "nnfastTrainer__nnfast_plans__3d_fullres"
    assert (installed / "fold_0" / "progress.png").read_bytes() == (trained / "fold_0" / "progress.png").read_bytes()
    fingerprint = json.loads((installed / "dataset_fingerprint.json").read_text())
    assert "case_ids" not in fingerprint and fingerprint["spacings"] == [[3.0, 1.0, 1.0]] * 2
    ck = torch.load(installed / "fold_1" / "checkpoint_final.pth", weights_only=True)  # no pickled code
    assert ck["trainer_name"] == "nnUNetTrainer" and ck["init_args"]["configuration"] == "3d_fullres"
    assert ck["init_args"]["fold"] == 1 and tuple(ck["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    assert ck["current_epoch"] == 7 and "optimizer_state" not in ck and "rng" not in ck
    ours = torch.load(root / "nnfast_results" / DATASET / "nnfastTrainer__nnfast_plans__3d_fullres" / "fold_1" /
                      "checkpoint_final.pt", weights_only=True)["network_weights"]
    assert ck["network_weights"].keys() == ours.keys()
    assert all(torch.equal(ck["network_weights"][k], ours[k]) for k in ours)

    # nnfast's own model folder, and the zip installed by `nnfast install-model`, predict nnU-Net's masks
    assert main(["install-model", str(root / "model.zip"), "--results", str(root / "back")]) == 0
    assert "installed 1 model folder(s)" in capsys.readouterr().out
    folders = {"nnfast": root / "nnfast_results" / DATASET / "nnfastTrainer__nnfast_plans__3d_fullres",
               "installed": root / "back" / NN_FOLDER}
    for name, folder in folders.items():
        out = root / f"ours_{name}"
        assert main(["predict", "-i", str(root / "in"), "-o", str(out), "--model-folder", str(folder),
                     "--device", "cpu", "--workers", "1", "-q"]) == 0
        for case in ("a", "b"):
            ref = _labels(root / "nn_tta1" / f"{case}.nii.gz")
            assert len(np.unique(ref)) > 1
            np.testing.assert_array_equal(_labels(out / f"{case}.nii.gz"), ref)


def test_install_model_installs_a_zip_that_nnunet_exported(interop, tmp_path):
    """nnU-Net's own export (``export_pretrained_model``, fold 0) of the installed model, installed by nnfast."""
    root = interop
    with zipfile.ZipFile(root / "nn_export.zip") as zf:
        names = set(zf.namelist())
    assert {f"{NN_FOLDER}/fold_0/checkpoint_final.pth", f"{NN_FOLDER}/fold_0/progress.png",
            f"{NN_FOLDER}/fold_0/validation/summary.json", f"{NN_FOLDER}/dataset_fingerprint.json"} <= names
    folders = install_model(root / "nn_export.zip", tmp_path / "res")
    assert folders == [tmp_path / "res" / NN_FOLDER]
    trained = root / "nnfast_results" / DATASET / "nnfastTrainer__nnfast_plans__3d_fullres"
    for folder, out in ((folders[0], "theirs"), (trained, "ours")):
        assert main(["predict", "-i", str(root / "in"), "-o", str(tmp_path / out), "--model-folder", str(folder),
                     "--folds", "0", "--no-tta", "--device", "cpu", "--workers", "1", "-q"]) == 0
    for case in ("a", "b"):
        np.testing.assert_array_equal(_labels(tmp_path / "theirs" / f"{case}.nii.gz"),
                                      _labels(tmp_path / "ours" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(_labels(tmp_path / "ours" / f"{case}.nii.gz"),
                                      _labels(root / "nnfast_results" / DATASET / "val_tta0" / f"{case}.nii.gz"))


def test_install_refuses_zip_slip_before_writing_anything(tmp_path, capsys):
    for evil in ("../evil.txt", "/tmp/evil_abs.txt", f"{DATASET}/x__y__3d_fullres/../../../evil.txt"):
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr(f"{DATASET}/nnUNetTrainer__nnUNetPlans__3d_fullres/dataset.json", "{}")
            zf.writestr(evil, "pwned")
        target = tmp_path / "results" / "inner"
        with pytest.raises(FileFormatError, match="escaping") as e:
            install_model(bad, target)
        assert evil in str(e.value)
        assert not target.exists() and not (tmp_path / "results" / "evil.txt").exists()
        assert not (tmp_path / "evil.txt").exists()
    assert main(["install-model", str(bad), "--results", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.zip" in err and "escaping" in err
    assert not (tmp_path / "r2").exists()
    assert main(["install-model", str(tmp_path / "missing.zip"), "--results", str(tmp_path / "r2")]) == 2
    assert "missing.zip` does not exist" in capsys.readouterr().err
    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FileFormatError, match="not a readable zip"):
        install_model(tmp_path / "not.zip", tmp_path / "r3")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(FileFormatError, match="holds no model folder"):
        install_model(tmp_path / "other.zip", tmp_path / "r3")
    assert not (tmp_path / "r3").exists()


def test_export_names_what_is_missing(tmp_path, capsys):
    make_model_folder(tmp_path / "res" / DATASET, tiny_plans(), "3d_fullres", folds=(0,))
    args = ["export-model", "--task", "999", "--results", str(tmp_path / "res"), "-o", str(tmp_path / "m.zip")]
    assert main([*args, "--folds", "3"]) == 2
    assert "fold 3" in capsys.readouterr().err
    assert main([*args, "--config", "2d"]) == 2
    assert "nnfastTrainer__nnfast_plans__2d" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists() and not list(tmp_path.glob(".m.zip*"))


def test_ensemble_reads_nnunets_saved_probabilities(interop, tmp_path):
    root = interop
    assert (root / "nn_tta1" / "a.pkl").is_file() and not (root / "nn_tta1" / "a.json").exists()
    assert main(["ensemble", "-i", str(root / "nn_tta1"), str(root / "nn_tta0"), "-o", str(tmp_path / "ens"),
                 "--workers", "1", "-q"]) == 0
    differs = False
    for case in ("a", "b"):
        ours, ref = sitk.ReadImage(str(tmp_path / "ens" / f"{case}.nii.gz")), sitk.ReadImage(
            str(root / "nn_ens" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(ref))
        assert ours.GetOrigin() == ref.GetOrigin() and ours.GetDirection() == ref.GetDirection()
        np.testing.assert_allclose(ours.GetSpacing(), ref.GetSpacing())
        differs |= not np.array_equal(sitk.GetArrayFromImage(ref), _labels(root / "nn_tta1" / f"{case}.nii.gz"))
    assert differs  # the ensemble is not just its first member


def test_ensemble_refuses_a_properties_pickle_that_refers_to_code(interop, tmp_path):
    root = interop
    folders = []
    for name in ("nn_tta1", "nn_tta0"):
        f = tmp_path / name
        f.mkdir()
        for case in ("a", "b"):
            (f / f"{case}.npz").write_bytes((root / name / f"{case}.npz").read_bytes())
            (f / f"{case}.pkl").write_bytes((root / name / f"{case}.pkl").read_bytes())
        (f / "dataset.json").write_text((root / name / "dataset.json").read_text())
        folders.append(f)
    (folders[0] / "b.pkl").write_bytes(pickle.dumps({"spacing": os.getcwd}))
    with pytest.raises(DatasetError, match="posix.getcwd"):
        from nnfast.evaluate.ensemble import ensemble_folders

        ensemble_folders(folders, tmp_path / "ens", 1)
    assert not (tmp_path / "ens" / "b.nii.gz").exists()


def test_apply_postprocessing_reads_nnunets_pkl(interop, tmp_path, capsys):
    root = interop
    assert main(["apply-postprocessing", "-i", str(root / "nn_tta1"), "-o", str(tmp_path / "pp"),
                 "--plan", str(root / "postprocessing.pkl"), "--workers", "1"]) == 0
    assert "keep the largest component of labels 1, 2; keep the largest component of label 2" in \
        capsys.readouterr().out
    changed = False
    for case in ("a", "b"):
        ref = _labels(root / "nn_pp" / f"{case}.nii.gz")
        np.testing.assert_array_equal(_labels(tmp_path / "pp" / f"{case}.nii.gz"), ref)
        changed |= not np.array_equal(ref, _labels(root / "nn_tta1" / f"{case}.nii.gz"))
    assert changed  # the steps removed components

    evil = tmp_path / "evil" / "postprocessing.pkl"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps(([os.system], [{"command": "touch pwned"}])))
    assert main(["apply-postprocessing", "-i", str(root / "nn_tta1"), "-o", str(tmp_path / "pp2"),
                 "--plan", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and err.count("\n") == 1
    assert not (tmp_path / "pp2").exists() and not Path("pwned").exists()


def test_predictor_equals_nnunet_predictor(interop, tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnfast.infer.api import Predictor

    root = interop
    pred = Predictor(root / "nn_results" / NN_FOLDER, device="cpu")  # the zip as nnU-Net installed it
    img, props = SimpleITKIO().read_images([str(root / "in" / "a_0000.nii.gz")])
    with np.load(root / "single.npz") as z:
        ref_seg, ref_probs = z["seg"], z["probs"]
    seg, probs = pred.predict_array(img, props, return_probabilities=True)
    np.testing.assert_array_equal(seg, ref_seg)
    assert probs.shape == ref_probs.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs, ref_probs, atol=1e-4)
    np.testing.assert_array_equal(pred.predict_array(img, {"spacing": props["spacing"]}), ref_seg)  # called again

    files = [[str(root / "in" / f"{c}_0000.nii.gz")] for c in ("a", "b")]
    rep = pred.predict_files(files, tmp_path / "out")
    assert rep.ok
    for c in ("a", "b"):
        np.testing.assert_array_equal(_labels(tmp_path / "out" / f"{c}.nii.gz"), _labels(root / "nn_tta1" / f"{c}.nii.gz"))

    img_b, props_b = SimpleITKIO().read_images(files[1])
    got = list(pred.stream([(img, props), files[1], {"image": img_b, "properties": props_b}]))
    assert [g.index for g in got] == [0, 1, 2]
    np.testing.assert_array_equal(got[0].segmentation, ref_seg)
    ref_b = _labels(root / "nn_tta1" / "b.nii.gz")
    np.testing.assert_array_equal(got[1].segmentation, ref_b)
    np.testing.assert_array_equal(got[2].segmentation, ref_b)

    it = pred.stream([(img, props)] * 4)  # a consumer that stops early stops the pipeline's threads
    assert next(it).index == 0
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("nnfast-stream")]

    with pytest.raises(ShapeError, match="2 channel"):
        pred.predict_array(np.concatenate([img, img]), props)
    with pytest.raises(ShapeError, match="case 1: .*spacing"):
        list(pred.stream([(img, props), (img, {"spacing": (1.0, 1.0)})]))
