"""Models trained by nnU-Net v2 itself run in ``nnfast predict`` and segment like nnU-Net's own predictor.

One module fixture runs nnU-Net in a fresh interpreter (``_nnunet_models_driver.py``): it plans and preprocesses a
tiny synthetic dataset, trains ``nnUNetTrainer`` (a subclass: 1 epoch x 2 iterations, CPU) for 3d_fullres folds 0 and
1 with its default PlainConvUNet plans and fold 0 with a ResEnc plans file (nnU-Net's plans with the network switched
to ``ResidualEncoderUNet`` and nnU-Net's ResEnc block counts), fold 0 of a region-based model (dataset.json with
regions and ``regions_class_order``), fold 0 of ``2d``, and a cascade: ``3d_lowres`` and ``3d_cascade_fullres``
(nnU-Net's planner writes this pair only for cases larger than its patch, so the driver adds it to nnU-Net's plans
as its planner would, at 1.5x the spacing), both fold "all", the first stage's final validation writing the second
stage's training inputs as ``nnUNetv2_train`` does. It predicts two cases with ``nnUNetPredictor`` (step 0.5, float32
on the CPU; mirroring TTA for the PlainConvUNet model, none for the others to keep the test short; the cascade on
nnU-Net's own 3d_lowres predictions). nnfast then predicts the same images from the same model folders with the same
settings. The PlainConvUNet
and ResEnc models have 8 first-stage features instead of nnU-Net's 32 (same classes and topology; the mirrored
two-fold prediction of the 32-feature network was most of this module's time: its fixture took 408 s on a busy
machine, the driver 164 s of CPU, 68 s with the narrow networks).

The network runs in float32 on the CPU in both. nnU-Net sums the sliding-window tiles in float16, nnfast in float32;
the driver predicts once as nnU-Net ships and once with that accumulator dtype switched to float32. A network trained
for 2 iterations has many near-ties between classes, where the order of float additions decides the argmax, so the
masks are compared where nnfast's probabilities are decisive: every differing voxel must have a small margin (top-2
softmax gap; for regions twice the smallest sigmoid distance from 0.5). Measured on the two cases (51,536 voxels),
12-07, with the networks above (8 first-stage features for PlainConvUNet and ResEnc, 32 for regions):

=========================  ===========================================  ===========================================
model                      vs nnU-Net, float32 tile sums                vs nnU-Net as shipped (float16 tile sums)
=========================  ===========================================  ===========================================
PlainConvUNet, folds 0+1   2 voxels (0.004 %), margin <= 0.0027         354 (0.69 %), margin <= 0.116
ResEnc, fold 0, no TTA     4 voxels (0.008 %), margin <= 0.083          99 (0.19 %), margin <= 0.218
regions, fold 0, no TTA    17 voxels (0.033 %), margin <= 0.065         461 (0.90 %), margin <= 0.214
2d, fold 0, no TTA         0 voxels                                     13 (0.025 %), margin <= 0.001
3d_lowres, fold all        0 voxels                                     12 (0.023 %), margin <= 0.0005
cascade, given 3d_lowres   9 voxels (0.017 %), margin <= 0.122          -
cascade, whole chain       0 (3d_lowres stage), 9 (second stage)        -
=========================  ===========================================  ===========================================

Bounds: float32 sums margin < 0.1 (the cascade's second stage: < 0.2), <= 0.1 % of the voxels, Dice >= 0.99 per
label covering >= 1 % of a case (smallest measured 0.9971); float16 sums margin < 0.35, <= 3 %, Dice >= 0.9
(smallest measured 0.928: float16 sums flip many near-tie voxels of a small label of this untrained network). The
float32 margins of the ResEnc and region models (up to 0.083; with 8 features the region model reached 0.1035, which
is why it keeps 32) are larger than float-order noise alone would explain and are worth a closer look. (Rows from
two runs on 12-07: the narrowed PlainConvUNet/ResEnc models, and the others.)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from factories import make_raw_dataset

from nnfast.cli.main import main
from nnfast.errors import StoreError

pytest.importorskip("nnunetv2")
pytestmark = [pytest.mark.compat, pytest.mark.slow, pytest.mark.timeout(1800)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DID = 993
NAME = f"Dataset{DID}_NnunetModels"
PLAIN = "nnUNetTrainerTiny__nnUNetPlans__3d_fullres"
RESENC = "nnUNetTrainerTiny__nnUNetResEncPlansTiny__3d_fullres"
REGIONS = "nnUNetTrainerTinyRegions__nnUNetPlans__3d_fullres"
TWO_D = "nnUNetTrainerTiny__nnUNetPlans__2d"
LOWRES = "nnUNetTrainerTiny__nnUNetPlans__3d_lowres"
CASCADE = "nnUNetTrainerTiny__nnUNetPlans__3d_cascade_fullres"
#: region-based dataset.json entries (nnU-Net's format): organ or lesion, lesion; painted in that order
REGION_LABELS = {"labels": {"background": 0, "organ_or_lesion": [1, 2], "lesion": 2}, "regions_class_order": [1, 2]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """nnU-Net's raw, preprocessed and results folders after the driver ran, its predictions, and the test images."""
    # NNFAST_TEST_NNUNET_MODELS=DIR keeps nnU-Net's folders between runs (the driver then reuses the preprocessed
    # data and the trained folds; nnU-Net's predictions are always redone)
    keep = os.environ.get("NNFAST_TEST_NNUNET_MODELS")
    base = Path(keep) if keep else tmp_path_factory.mktemp("nnunet_models")
    raw, pre, res = base / "raw", base / "pre", base / "res"
    reuse = (pre / NAME / "nnUNetPlans_3d_fullres").is_dir()
    if not reuse:
        make_raw_dataset(raw, DID, "NnunetModels", [(16, 40, 40), (18, 36, 42), (14, 42, 38), (16, 38, 40)],
                         [(3.0, 1.0, 1.0)] * 4, seed=3)
    images = base / "imagesTs"
    images.mkdir(exist_ok=True)
    for cid in ("case_001", "case_003"):
        shutil.copy(raw / NAME / "imagesTr" / f"{cid}_0000.nii.gz", images)
    spec = {"dataset_id": DID, "configurations": ["3d_fullres", "2d", "3d_lowres"], "lowres": 1.5,
            "reuse_preprocessed": reuse,
            "splits": [{"train": ["case_000", "case_001", "case_002"], "val": ["case_003"]},
                       {"train": ["case_001", "case_002", "case_003"], "val": ["case_000"]}],
            "models": [{"config": "3d_fullres", "folds": [0, 1], "base_features": 8},
                       {"config": "3d_fullres", "folds": [0], "resenc": True, "tta": False, "base_features": 8},
                       {"config": "3d_fullres", "folds": [0], "regions": REGION_LABELS, "tta": False},
                       {"config": "2d", "folds": [0], "tta": False},
                       # fold "all" validates every case, which writes the cascade's inputs for every training case
                       {"config": "3d_lowres", "folds": ["all"], "tta": False},
                       {"config": "3d_cascade_fullres", "folds": ["all"], "tta": False,
                        "previous_stage": "3d_lowres"}],
            "predict_input": str(images), "predict_output": str(base / "nnunet_pred")}
    (base / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_compile": "f", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "nnUNet_def_n_proc": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(HERE / "_nnunet_models_driver.py"), str(base / "spec.json")], env=env,
                       capture_output=True, text=True, timeout=1500, cwd=base)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return {"base": base, "results": res / NAME, "images": images, "nnunet_pred": base / "nnunet_pred",
            "driver": json.loads(lines[-1][len("RESULT "):])}


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _run(capsys, argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _compare(ours: Path, ref: Path, cases=("case_001", "case_003")) -> tuple[int, int, list]:
    """(differing voxels, voxels, [(case, ours, ref, mask of differences)])."""
    differ, total, detail = 0, 0, []
    for cid in cases:
        a, b = _read(ours / f"{cid}.nii.gz"), _read(ref / f"{cid}.nii.gz")
        assert a.shape == b.shape
        differ += int((a != b).sum())
        total += a.size
        detail.append((cid, a, b, a != b))
    return differ, total, detail


@pytest.mark.parametrize("folder, folds", [(PLAIN, ["0", "1"]), (RESENC, ["0"]), (REGIONS, ["0"]), (TWO_D, ["0"]),
                                           (LOWRES, ["all"])],
                         ids=["PlainConvUNet", "ResEnc", "regions", "2d", "3d_lowres"])
def test_nnfast_predicts_nnunet_trained_model_like_nnunet(trained, capsys, tmp_path, folder, folds):
    out = tmp_path / "ours"
    code, err = _run(capsys, ["predict", "-i", trained["images"], "-o", out, "--model-folder",
                              trained["results"] / folder, "--folds", *folds, "--device", "cpu", "--workers", "1",
                              "--save-probabilities", *([] if folder == PLAIN else ["--no-tta"])])
    assert code == 0, err
    # nnU-Net's predictor with float32 accumulators: nnfast's arithmetic up to the order of float additions
    _assert_only_near_ties(out, trained["nnunet_pred"] / f"{folder}__float32", folder == REGIONS,
                           max_margin=0.1, max_fraction=1e-3, min_dice=0.99)
    # nnU-Net as shipped sums the tiles in float16 (about 3 significant digits, tiles weighted up to 10x)
    _assert_only_near_ties(out, trained["nnunet_pred"] / f"{folder}__float16", folder == REGIONS,
                           max_margin=0.35, max_fraction=0.03, min_dice=0.9)


def test_nnfast_predicts_nnunet_trained_cascade_like_nnunet(trained, capsys, tmp_path):
    """The cascade's second stage (3d_cascade_fullres, fold "all") on the same first-stage segmentations as nnU-Net's
    (its float32-sums 3d_lowres predictions, ``--prev-stage-folder``): only near-ties differ. Then the whole chain as
    a user runs it (nnfast predicts the 3d_lowres stage from the sibling model folder first): bounded Dice."""
    ref = trained["nnunet_pred"]
    out = tmp_path / "given_stage"
    code, err = _run(capsys, ["predict", "-i", trained["images"], "-o", out, "--model-folder",
                              trained["results"] / CASCADE, "--folds", "all", "--device", "cpu", "--workers", "1",
                              "--no-tta", "--save-probabilities", "--prev-stage-folder", ref / f"{LOWRES}__float32"])
    assert code == 0, err
    _assert_only_near_ties(out, ref / f"{CASCADE}__float32", False, max_margin=0.2, max_fraction=1e-3,
                           min_dice=0.99)

    out = tmp_path / "chain"
    code, err = _run(capsys, ["predict", "-i", trained["images"], "-o", out, "--model-folder",
                              trained["results"] / CASCADE, "--folds", "all", "--device", "cpu", "--workers", "1",
                              "--no-tta"])
    assert code == 0, err
    assert sorted(p.name for p in (out / "previous_stage_3d_lowres").glob("*.nii.gz")) == \
        ["case_001.nii.gz", "case_003.nii.gz"]
    for stage_out, stage_ref in ((out / "previous_stage_3d_lowres", f"{LOWRES}__float32"),
                                 (out, f"{CASCADE}__float32")):
        differ, total, detail = _compare(stage_out, ref / stage_ref)
        assert differ / total <= 2e-3, f"{differ} of {total} voxels differ from {stage_ref}"
        for cid, a, b, _ in detail:
            for lab, dice in _dice(a, b).items():
                assert dice >= 0.99, f"{cid} label {lab}: Dice {dice} against {stage_ref}"


def _dice(a: np.ndarray, b: np.ndarray) -> dict:
    """Dice per foreground label covering at least 1 % of the case in either mask (an untrained network may predict a
    few scattered voxels of a label, all near-ties, whose Dice says nothing)."""
    out = {}
    for lab in np.union1d(np.unique(a), np.unique(b)):
        if lab and max(np.mean(a == lab), np.mean(b == lab)) >= 0.01:
            out[int(lab)] = 2 * np.sum((a == lab) & (b == lab)) / (np.sum(a == lab) + np.sum(b == lab))
    return out


def _assert_only_near_ties(ours: Path, ref: Path, regions: bool, *, max_margin: float, max_fraction: float,
                           min_dice: float) -> None:
    """Masks differ only where nnfast's own probabilities are near a tie (top-2 softmax gap, or for regions twice a
    sigmoid's distance from 0.5, below ``max_margin``), in at most ``max_fraction`` of the voxels, Dice per label
    >= ``min_dice`` (labels covering at least 1 % of the case)."""
    differ, total, detail = _compare(ours, ref)
    for cid, a, b, mask in detail:
        probs = np.load(ours / f"{cid}.npz")["probabilities"].astype(np.float32)  # (C, z, y, x) like the mask
        if regions:
            assert probs.shape[0] == 2 and set(np.unique(a)) <= {0, 1, 2}  # sigmoid per region, painted labels
            margin = 2 * np.abs(probs - 0.5).min(axis=0)
        else:
            top2 = np.sort(probs, axis=0)[-2:]
            margin = top2[1] - top2[0]
        gap = margin[mask]
        assert gap.size == 0 or gap.max() < max_margin, f"{cid}: a voxel with probability margin {gap.max()} differs"
        for lab, dice in _dice(a, b).items():
            assert dice >= min_dice, f"{cid} label {lab}: Dice {dice} against {ref.name}"
    assert differ / total <= max_fraction, f"{differ} of {total} voxels differ from {ref.name}"


def test_checkpoint_best_parts_and_continue(trained, capsys, tmp_path):
    model = trained["results"] / PLAIN
    out = tmp_path / "parts"
    base = ["predict", "-i", trained["images"], "-o", out, "--model-folder", model, "--folds", "0", "--device",
            "cpu", "--checkpoint", "best", "--no-tta"]
    # found by --task/--config/--trainer/--plans in the results root, as nnUNetv2_predict -d -c -tr -p does
    code, err = _run(capsys, ["predict", "-i", trained["images"], "-o", out, "--task", DID, "--config", "3d_fullres",
                              "--trainer", "nnUNetTrainerTiny", "--plans", "nnUNetPlans", "--results",
                              trained["results"].parent, "--folds", "0", "--device", "cpu", "--checkpoint", "best",
                              "--no-tta", "--num-parts", "2", "--part-id", "1"])
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_003.nii.gz"]  # ["case_001", "case_003"][1::2]
    report = json.loads((out / "nnfast_predict.json").read_text())
    assert report["checkpoint"] == "checkpoint_best" and report["folds"] == [0]
    assert Path(report["model_folder"]) == model
    before = (out / "case_003.nii.gz").stat().st_mtime_ns
    code, err = _run(capsys, [*base, "--continue"])
    assert code == 0, err
    report = json.loads((out / "nnfast_predict.json").read_text())
    assert report["skipped"] == ["case_003"] and list(report["written"]) == ["case_001"]
    assert (out / "case_003.nii.gz").stat().st_mtime_ns == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_nnunet_checkpoints_load_only_with_the_numpy_allowlist(trained, tmp_path):
    import pickle

    import torch

    from nnfast.io.torch_checkpoint import load_torch_checkpoint

    path = trained["results"] / PLAIN / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, weights_only=True)  # torch's defaults alone refuse nnU-Net's numpy scalars
    data = load_torch_checkpoint(path)
    assert data["trainer_name"] == "nnUNetTrainerTiny" and data["init_args"]["configuration"] == "3d_fullres"
    assert isinstance(data["_best_ema"], np.floating)

    # one object outside the allowlist and the file is refused, naming the type
    data["logging"]["extra"] = pickle.PicklingError  # any class: pickled by reference, "runs code" on load
    evil = tmp_path / "checkpoint_final.pth"
    torch.save(data, evil)
    with pytest.raises(StoreError, match=r"checkpoint_final\.pth.*`pickle\.PicklingError`"):
        load_torch_checkpoint(evil)

    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoreError, match=r"cut\.pth.*truncated"):
        load_torch_checkpoint(cut)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_clean_error(capsys, trained, out: Path, argv, *names):
    code, err = _run(capsys, ["predict", "-i", trained["images"], "-o", out, "--device", "cpu", *argv])
    lines = err.strip().splitlines()
    assert code == 2 and lines and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[-1], f"{name!r} not in {lines[-1]}"
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())  # nothing half-written


def test_bad_model_folders_fail_before_any_case(trained, capsys, tmp_path):
    src = trained["results"] / PLAIN
    # a missing fold
    _assert_clean_error(capsys, trained, tmp_path / "o1", ["--model-folder", src, "--folds", "0", "3"],
                        "fold_3", "checkpoint_final")
    # an architecture nnfast does not know
    m = _copy_model(src, tmp_path / "unknown_arch" / PLAIN)
    plans = json.loads((m / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "mynets.FancyUNet"
    (m / "plans.json").write_text(json.dumps(plans))
    _assert_clean_error(capsys, trained, tmp_path / "o2", ["--model-folder", m], "plans.json", "mynets.FancyUNet")
    # a checkpoint whose class count does not fit the dataset (dataset.json with one more label)
    m = _copy_model(src, tmp_path / "other_dataset" / PLAIN)
    dj = json.loads((m / "dataset.json").read_text())
    dj["labels"]["extra"] = max(dj["labels"].values()) + 1
    (m / "dataset.json").write_text(json.dumps(dj))
    _assert_clean_error(capsys, trained, tmp_path / "o3", ["--model-folder", m, "--folds", "0"],
                        "checkpoint_final.pth", "3 output channel(s)", "4")
    # a truncated checkpoint
    m = _copy_model(src, tmp_path / "truncated" / PLAIN)
    ck = m / "fold_1" / "checkpoint_final.pth"
    ck.write_bytes(ck.read_bytes()[:5000])
    _assert_clean_error(capsys, trained, tmp_path / "o4", ["--model-folder", m], "fold_1", "truncated")
