"""Metrics and folder evaluation: nnU-Net's compute_metrics / compute_metrics_on_folder on the same files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from evaluate._helpers import ellipsoid, nan_equal, write_seg

from nnfast.errors import CaseNotFoundError, GeometryError
from nnfast.evaluate.metrics import (
    EvaluationLabels,
    Summary,
    compute_metrics,
    evaluate_folder,
    labels_from_dataset_json,
    parse_label_key,
)

SHAPE = (6, 20, 24)


def _cases(seed=0):
    """(case_id, pred, ref) with the NaN situations nnU-Net handles: empty prediction, empty reference, a label
    absent from both, the ignore label (3) in the reference."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):
        ref = np.zeros(SHAPE, np.uint8)
        ref[ellipsoid(SHAPE, (3, 10, 12), (3, 7, 8))] = 1
        ref[ellipsoid(SHAPE, (3, 9 + i % 3, 12), (2, 3, 3))] = 2
        pred = ref.copy()
        flip = rng.random(SHAPE) < 0.05
        pred[flip] = rng.integers(0, 3, int(flip.sum()))
        if i == 1:
            pred[:] = 0  # empty prediction: Dice 0
        if i == 2:
            ref[:] = 0  # empty reference: Dice 0 where something is predicted
        if i == 3:
            ref[ref == 2] = 1
            pred[pred == 2] = 1  # label 2 absent from both: NaN
        if i == 4:
            ref[:2] = 3  # ignore label in the reference
        out.append((f"case_{i:03d}", pred, ref))
    return out


@pytest.fixture
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    for cid, pred, ref in _cases():
        write_seg(pred, pred_dir / f"{cid}.nii.gz")
        write_seg(ref, ref_dir / f"{cid}.nii.gz")
    write_seg(np.zeros(SHAPE), ref_dir / "unpredicted.nii.gz")  # a reference without prediction is skipped
    return pred_dir, ref_dir


def _nnunet_folder(pred_dir, ref_dir, targets, ignore):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    out = pred_dir.parent / "nnunet_summary.json"
    compute_metrics_on_folder(str(ref_dir), str(pred_dir), str(out), SimpleITKIO(), ".nii.gz", targets, ignore, 1)
    return json.loads(out.read_text())


@pytest.mark.compat
@pytest.mark.parametrize("ignore", [None, 3])
def test_folder_summary_equals_nnunet(folders, nnunet_inline, ignore):
    pred_dir, ref_dir = folders
    targets = [1, 2]
    summary = evaluate_folder(pred_dir, ref_dir, targets, workers=1, ignore_label=ignore)
    ours = json.loads((pred_dir / "summary.json").read_text())
    theirs = _nnunet_folder(pred_dir, ref_dir, targets, ignore)
    assert ours.pop("nnfast_version") and ours.pop("schema_version") == 1
    nan_equal(ours, theirs)
    assert list(ours) == sorted(ours)  # written with sorted keys like nnU-Net
    assert math.isnan(summary.metric_per_case[3][2]["Dice"])  # label 2 absent from both
    assert summary.metric_per_case[1][1]["Dice"] == 0.0  # empty prediction
    assert summary.foreground_dice == theirs["foreground_mean"]["Dice"]


@pytest.mark.compat
def test_regions_equal_nnunet(folders, nnunet_inline):
    pred_dir, ref_dir = folders
    d = {"labels": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, "regions_class_order": [1, 2],
         "file_ending": ".nii.gz"}
    ev = labels_from_dataset_json(d)
    assert ev.has_regions and ev.targets == ((1, 2), 2) and ev.ignore_label == 3
    evaluate_folder(pred_dir, ref_dir, d, output_file=pred_dir.parent / "ours.json")
    ours = json.loads((pred_dir.parent / "ours.json").read_text())
    theirs = _nnunet_folder(pred_dir, ref_dir, [(1, 2), 2], 3)
    del ours["nnfast_version"], ours["schema_version"]
    nan_equal(ours, theirs)


@pytest.mark.compat
def test_array_metrics_equal_nnunet_compute_metrics(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics as nn_compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    for cid, pred, ref in _cases(seed=1):
        pf = write_seg(pred, tmp_path / f"p_{cid}.nii.gz")
        rf = write_seg(ref, tmp_path / f"r_{cid}.nii.gz")
        for targets, ignore in (([1, 2], None), ([1, 2, (1, 2)], 3)):
            theirs = nn_compute_metrics(str(rf), str(pf), SimpleITKIO(), targets, ignore)["metrics"]
            ours = compute_metrics(pred, ref, targets, ignore)
            assert list(ours) == list(theirs)
            for t in targets:
                nan_equal(ours[t], {k: (float(v) if isinstance(v, float) else int(v)) for k, v in theirs[t].items()})


def test_nan_when_absent_everywhere_and_ignore_excluded():
    pred = np.zeros((2, 3, 4), np.int16)
    ref = np.zeros((1, 2, 3, 4), np.int16)
    m = compute_metrics(pred, ref, [1])
    assert math.isnan(m[1]["Dice"]) and math.isnan(m[1]["IoU"]) and m[1]["TN"] == 24
    ref[0, 0] = 5
    pred[0] = 1
    m = compute_metrics(pred, ref, [1], ignore_label=5)
    assert math.isnan(m[1]["Dice"]) and m[1]["TN"] == 12 and m[1]["FP"] == 0
    m = compute_metrics(pred, ref, [1])
    assert m[1]["Dice"] == 0.0 and m[1]["FP"] == 12 and m[1]["n_pred"] == 12 and m[1]["n_ref"] == 0


def test_summary_json_round_trip_and_table(folders, monkeypatch):
    import nnfast.evaluate.metrics as metrics

    monkeypatch.setattr(metrics, "EVALUATE_POOL_MIN_VOXELS", 0)  # small folders are otherwise evaluated in-process
    pred_dir, ref_dir = folders
    d = {"labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}, "file_ending": ".nii.gz"}
    s = evaluate_folder(pred_dir, ref_dir, d, workers=2)
    assert s.case_ids == tuple(f"case_{i:03d}" for i in range(6))
    back = Summary.from_json(json.loads((pred_dir / "summary.json").read_text()))
    np.testing.assert_array_equal(back.counts, s.counts)
    nan_equal(back.to_json()["mean"], s.to_json()["mean"])
    assert back.case_ids == s.case_ids
    table = s.format()
    assert "liver" in table and "tumour" in table and "foreground" in table and "1/6" in table
    assert parse_label_key("(1, 2)") == (1, 2) and parse_label_key("3") == 3


def test_geometry_mismatch_names_the_case(tmp_path):
    write_seg(np.zeros((4, 5, 6)), tmp_path / "p" / "a.nii.gz")
    write_seg(np.zeros((4, 5, 7)), tmp_path / "r" / "a.nii.gz")
    with pytest.raises(GeometryError, match=r"case a: .*shape"):
        evaluate_folder(tmp_path / "p", tmp_path / "r", [1], write_summary=False)
    write_seg(np.zeros((4, 5, 6)), tmp_path / "r" / "a.nii.gz", spacing=(3.0, 0.8, 0.8))
    with pytest.raises(GeometryError, match=r"case a: .*spacing"):
        evaluate_folder(tmp_path / "p", tmp_path / "r", [1], write_summary=False)


def test_missing_reference_and_empty_folder(tmp_path):
    write_seg(np.zeros((2, 2, 2)), tmp_path / "p" / "a.nii.gz")
    (tmp_path / "r").mkdir()
    with pytest.raises(CaseNotFoundError, match="no reference .* a"):
        evaluate_folder(tmp_path / "p", tmp_path / "r", [1])
    (tmp_path / "e").mkdir()
    with pytest.raises(CaseNotFoundError, match="no predictions"):
        evaluate_folder(tmp_path / "e", tmp_path / "r", [1])


def test_labels_from_dataset_json_like_label_manager():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    for labels, rco in (({"background": 0, "a": 1, "b": 2}, None),
                        ({"background": 0, "a": 1, "b": 2, "ignore": 3}, None),
                        ({"background": 0, "a": [1, 2, 3], "b": [2, 3], "c": 3}, [1, 2, 3])):
        ev = labels_from_dataset_json({"labels": labels})
        lm = LabelManager(labels, rco)
        expected = lm.foreground_regions if lm.has_regions else lm.foreground_labels
        assert list(ev.targets) == [tuple(t) if isinstance(t, (list, tuple)) else int(t) for t in expected]
        assert ev.ignore_label == lm.ignore_label
        assert list(ev.foreground_labels) == [int(x) for x in lm.foreground_labels]
    assert EvaluationLabels.from_labels([[1, 2], 3]).targets == ((1, 2), 3)


def test_pool_only_for_large_folders(tmp_path):
    from nnfast.evaluate.metrics import pool_workers

    files = [write_seg(np.zeros((4, 5, 6)), tmp_path / f"{i}.nii.gz") for i in range(3)]
    assert pool_workers(4, files, 10**9) == (1, [120, 120, 120])
    assert pool_workers(4, files, 100) == (4, [120, 120, 120])
    assert pool_workers(1, files, 0)[0] == 1
