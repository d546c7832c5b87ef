"""Postprocessing decisions and their application against nnU-Net's determine_postprocessing on the same files:
a case set where removing small spurious components helps, one where it hurts (a real second component), and a
region-based dataset."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from evaluate._helpers import ellipsoid, nan_equal, write_seg
from nnfast.errors import DatasetError
from nnfast.evaluate.postprocessing import KeepLargestStep, PostprocessingPlan, apply_postprocessing, \
    determine_postprocessing

SHAPE = (12, 28, 30)
LABELS = {"background": 0, "organ": 1, "lesion": 2}
REGIONS = {"background": 0, "whole": [1, 2], "core": 2}


def _helps(i: int, rng):
    """Organ (1) with a lesion (2); predictions add small spurious blobs: a label-1 blob far away (removed by the
    foreground step) and a label-2 speck inside the organ (removed only by the per-label step of label 2)."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[ellipsoid(SHAPE, (6, 15, 16), (5, 9, 10))] = 1
    ref[ellipsoid(SHAPE, (6, 15, 13 + i % 3), (2, 3, 3))] = 2
    pred = ref.copy()
    pred[ellipsoid(SHAPE, (6, 15, 17), (5, 9, 10)) & (pred == 0)] = 1  # slightly shifted boundary
    if i % 4 != 3:
        pred[1:3, 1:3, 1 + i:3 + i] = 1
    if i % 2 == 0:
        pred[6, 15, 22:24] = 2
    if i == 4:
        pred[10:12, 25:27, 0:2] = 2  # a spurious lesion far outside the organ
    return pred, ref


def _hurts(i: int, rng):
    """Two organs of label 1 (left/right, different sizes): keeping the largest component deletes a real one."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[ellipsoid(SHAPE, (6, 14, 7), (4, 8, 5))] = 1
    ref[ellipsoid(SHAPE, (6, 14, 22), (3, 6, 4))] = 1
    ref[ellipsoid(SHAPE, (6, 14, 7), (1.5, 2, 2))] = 2
    pred = ref.copy()
    flip = rng.random(SHAPE) < 0.03
    pred[flip & ellipsoid(SHAPE, (6, 14, 7), (4, 8, 5))] = 0
    if i == 2:
        ref[:] = 0
        pred[:] = 0  # nothing anywhere: NaN for both labels
    return pred, ref


def _write(folder, make, n=5, seed=0):
    rng = np.random.default_rng(seed)
    pred_dir, ref_dir = folder / "pred", folder / "ref"
    for i in range(n):
        pred, ref = make(i, rng)
        write_seg(pred, pred_dir / f"case_{i:02d}.nii.gz")
        write_seg(ref, ref_dir / f"case_{i:02d}.nii.gz")
    return pred_dir, ref_dir


def _nnunet(pred_dir, ref_dir, labels, tmp_path):
    """nnU-Net's decision on a private copy of the predictions: (steps as JSON, postprocessing.json, folder)."""
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing as nn_determine

    folder = tmp_path / "nnunet_pred"
    shutil.copytree(pred_dir, folder)
    dj = {"labels": labels, "file_ending": ".nii.gz"}
    if any(isinstance(v, list) for v in labels.values()):
        dj["regions_class_order"] = [1, 2]
    fns, kwargs = nn_determine(str(folder), str(ref_dir), {"image_reader_writer": "SimpleITKIO"}, dj, 1, True)
    steps = [_as_json(k["labels_or_regions"]) for k in kwargs]
    return steps, json.loads((folder / "postprocessing.json").read_text()), folder


def _as_json(x):
    if isinstance(x, (list, tuple)):
        return [_as_json(v) for v in x]
    return int(x)


def _dataset_json(labels):
    dj = {"labels": labels, "file_ending": ".nii.gz"}
    if any(isinstance(v, list) for v in labels.values()):
        dj["regions_class_order"] = [1, 2]
    return dj


@pytest.mark.compat
@pytest.mark.parametrize("scenario,labels,expected_steps", [
    ("helps", LABELS, [[1, 2], 2]),
    ("hurts", LABELS, []),
    ("helps", REGIONS, None),
])
def test_decisions_equal_nnunet(tmp_path, nnunet_inline, scenario, labels, expected_steps):
    make = {"helps": _helps, "hurts": _hurts}[scenario]
    pred_dir, ref_dir = _write(tmp_path, make)
    theirs, their_json, their_folder = _nnunet(pred_dir, ref_dir, labels, tmp_path)
    plan = determine_postprocessing(pred_dir, ref_dir, _dataset_json(labels), workers=1, write_postprocessed=True)
    ours = [_as_json(s.labels_or_regions) for s in plan.steps]
    assert ours == theirs
    if expected_steps is not None:
        assert ours == expected_steps  # the scenario does what it is meant to
    nan_equal(plan.to_json()["input_folder"], their_json["input_folder"])
    nan_equal(plan.to_json()["postprocessed"], their_json["postprocessed"])
    # the written plan file and the postprocessed files
    written = json.loads((pred_dir / "postprocessing.json").read_text())
    assert written["postprocessing_kwargs"] == their_json["postprocessing_kwargs"]
    assert written["postprocessing_fns"] == their_json["postprocessing_fns"]
    for f in sorted((their_folder / "postprocessed").glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "postprocessed" / f.name)))
        np.testing.assert_array_equal(a, b)
    ours_pp = json.loads((pred_dir / "postprocessed" / "summary.json").read_text())
    their_pp = json.loads((their_folder / "postprocessed" / "summary.json").read_text())
    nan_equal(ours_pp["mean"], their_pp["mean"])
    # nnU-Net's own postprocessing.json can be applied by nnfast and gives the same plan
    assert PostprocessingPlan.load(their_folder / "postprocessing.json").steps == plan.steps


@pytest.mark.parametrize("make", [_helps, _hurts])
def test_label_fast_path_equals_rounds(tmp_path, make, monkeypatch):
    import nnfast.evaluate.postprocessing as pp

    pred_dir, ref_dir = _write(tmp_path, make, seed=1)
    dj = _dataset_json(LABELS)
    workers = 1
    if make is _helps:  # once through worker processes
        monkeypatch.setattr(pp, "POSTPROCESSING_POOL_MIN_VOXELS", 0)
        workers = 2
    fast = determine_postprocessing(pred_dir, ref_dir, dj, workers, output_file=None)
    rounds = determine_postprocessing(pred_dir, ref_dir, dj, output_file=None, _rounds=True)
    assert fast.steps == rounds.steps
    assert [(d.target, d.accepted) for d in fast.decisions] == [(d.target, d.accepted) for d in rounds.decisions]
    nan_equal([[d.before, d.after] for d in fast.decisions], [[d.before, d.after] for d in rounds.decisions])
    nan_equal(fast.after, rounds.after)


def test_apply_postprocessing_writes_geometry_and_removes_spurious(tmp_path):
    pred_dir, ref_dir = _write(tmp_path, _helps, n=2)
    plan = PostprocessingPlan((KeepLargestStep((1, 2)), KeepLargestStep(2)))
    out = apply_postprocessing(pred_dir, tmp_path / "pp", plan, workers=1)
    assert [p.name for p in out] == ["case_00.nii.gz", "case_01.nii.gz"]
    src = sitk.ReadImage(str(pred_dir / "case_00.nii.gz"))
    dst = sitk.ReadImage(str(out[0]))
    assert dst.GetSpacing() == src.GetSpacing() and dst.GetOrigin() == src.GetOrigin()
    a = sitk.GetArrayFromImage(dst)
    assert a[1:3, 1:3, 1:3].sum() == 0 and a[6, 15, 22:24].sum() == 0  # spurious blob and speck gone
    assert (a == 2).sum() > 0
    # a plan file works as well; an empty plan copies the files unchanged
    plan.write(tmp_path / "plan.json")
    apply_postprocessing(pred_dir, tmp_path / "pp2", tmp_path / "plan.json")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp2" / "case_00.nii.gz"))), a)
    apply_postprocessing(pred_dir, tmp_path / "pp3", PostprocessingPlan())
    assert (tmp_path / "pp3" / "case_01.nii.gz").read_bytes() == (pred_dir / "case_01.nii.gz").read_bytes()


def test_plan_json_round_trip_and_errors(tmp_path):
    plan = PostprocessingPlan((KeepLargestStep((1, 2, 3)), KeepLargestStep((2, 3)), KeepLargestStep(3)))
    back = PostprocessingPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back.steps == plan.steps
    assert plan.to_json()["postprocessing_kwargs"] == [{"labels_or_regions": [1, 2, 3]},
                                                       {"labels_or_regions": [2, 3]}, {"labels_or_regions": 3}]
    with pytest.raises(DatasetError, match="only"):
        PostprocessingPlan.from_json({"postprocessing_fns": ["other"], "postprocessing_kwargs": [{}]})
    with pytest.raises(DatasetError, match="pickle"):
        PostprocessingPlan.load(tmp_path / "postprocessing.pkl")
    with pytest.raises(FileNotFoundError):
        PostprocessingPlan.load(tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="same"):
        apply_postprocessing(tmp_path, tmp_path, plan)
