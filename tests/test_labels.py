"""Tests of :mod:`nnfast.labels` against nnU-Net's own ``LabelManager`` and batchgeneratorsv2's region transform."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from nnfast.errors import DatasetError, GeometryError, PlanError
from nnfast.labels import LabelManager, label_key, label_problems, parse_label_key

LABELS = {"background": 0, "liver": 1, "tumor": 2}
IGNORE = {"background": 0, "a": 1, "b": 2, "c": 3, "ignore": 4}
BRATS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": [3]}
BRATS_RCO = [1, 2, 3]
CASES = [(LABELS, None), (IGNORE, None), (BRATS, BRATS_RCO),
         ({"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing": 3, "ignore": 4}, [1, 2, 3])]


def _theirs(labels, rco):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager as NnunetLabelManager

    return NnunetLabelManager(labels, rco)


def _plain(t):
    return tuple(int(x) for x in t) if isinstance(t, (list, tuple)) else int(t)


@pytest.mark.parametrize("labels,rco", CASES)
def test_declared_like_nnunet(labels, rco):
    ours = LabelManager.from_dataset_json({"labels": labels, "regions_class_order": rco})
    theirs = _theirs(labels, rco)
    assert ours.has_regions == theirs.has_regions
    assert ours.has_ignore_label == theirs.has_ignore_label
    assert ours.ignore_label == theirs.ignore_label
    assert list(ours.all_labels) == [int(x) for x in theirs.all_labels]
    assert list(ours.foreground_labels) == [int(x) for x in theirs.foreground_labels]
    assert ours.num_segmentation_heads == theirs.num_segmentation_heads
    if theirs.has_regions:
        assert list(ours.foreground_regions) == [_plain(r) for r in theirs.foreground_regions]
        assert ours.foreground_targets == ours.foreground_regions
        assert ours.regions_class_order == tuple(rco)
    else:
        assert ours.foreground_regions == () and ours.foreground_targets == ours.foreground_labels
        assert ours.regions_class_order is None


def _probabilities(lm, shape=(5, 6, 7), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((lm.num_segmentation_heads, *shape)).astype(np.float32)


@pytest.mark.parametrize("labels,rco", CASES)
def test_segmentation_like_nnunet(labels, rco):
    import torch

    ours = LabelManager(labels, rco)
    theirs = _theirs(labels, rco)
    logits = _probabilities(ours) * 3
    ref = theirs.convert_logits_to_segmentation(logits)
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
    seg = ours.segmentation_from_logits(logits)
    assert seg.dtype == np.uint8 and np.array_equal(seg, ref)
    probs = theirs.apply_inference_nonlin(logits).numpy()
    ref_p = theirs.convert_probabilities_to_segmentation(probs)
    assert np.array_equal(ours.segmentation_from_probabilities(probs), ref_p)


def test_segmentation_dtype_and_painting_order():
    many = {"background": 0, **{f"l{i}": i for i in range(1, 256)}}
    assert LabelManager(many).seg_dtype == np.uint16
    assert LabelManager(LABELS).seg_dtype == np.uint8
    lm = LabelManager(BRATS, BRATS_RCO)
    probs = np.zeros((3, 2), np.float32)
    probs[:, 0] = (0.9, 0.9, 0.9)  # every region: the last painted (enhancing, 3) wins
    probs[:, 1] = (0.9, 0.2, 0.7)  # whole tumour and enhancing: 3
    assert lm.segmentation_from_probabilities(probs).tolist() == [3, 3]
    probs[2] = 0.5  # not above 0.5
    assert lm.segmentation_from_probabilities(probs).tolist() == [2, 1]


@pytest.mark.parametrize("labels,rco", [(BRATS, BRATS_RCO), (CASES[3][0], CASES[3][1])])
def test_region_targets_like_batchgenerators(labels, rco):
    import torch
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    lm = LabelManager(labels, rco)
    theirs = _theirs(labels, rco)
    rng = np.random.default_rng(1)
    seg = rng.integers(0, max(lm.declared_values) + 1, (9, 8, 7)).astype(np.int16)
    regions = [_plain(r) for r in theirs.foreground_regions]
    ignore = theirs.ignore_label
    # what nnU-Net's trainer builds: foreground regions, then the ignore label
    transform = ConvertSegmentationToRegionsTransform(regions + [ignore] if ignore is not None else regions)
    ref = transform(**{"segmentation": torch.from_numpy(seg[None])})["segmentation"].numpy()
    out = lm.region_targets(seg)
    assert out.dtype == bool and out.shape == ref.shape and np.array_equal(out, ref)
    assert np.array_equal(lm.targets(seg), out)
    assert lm.region_targets(seg, with_ignore=False).shape[0] == len(regions)


def test_one_hot_like_nnunet():
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    lm = LabelManager(IGNORE)
    seg = np.random.default_rng(2).integers(0, 5, (6, 7, 8)).astype(np.uint8)
    ref = convert_labelmap_to_one_hot(seg, lm.all_labels, output_dtype=bool)
    assert np.array_equal(lm.one_hot(seg), ref) and np.array_equal(lm.targets(seg), ref)


def test_regions_need_a_usable_regions_class_order():
    lm = LabelManager(BRATS)  # building (and evaluating) works without it
    assert lm.foreground_regions == ((1, 2, 3), (2, 3), (3,)) and lm.regions_class_order is None
    probs = np.zeros((3, 2, 2), np.float32)
    with pytest.raises(PlanError, match="no `regions_class_order`"):
        lm.segmentation_from_probabilities(probs)
    with pytest.raises(PlanError, match=r"has 2 entries but the labels define 3 regions"):
        LabelManager(BRATS, [1, 2]).check_regions_class_order()
    with pytest.raises(GeometryError, match="probabilities have 2 channels but the labels define 3"):
        LabelManager(BRATS, BRATS_RCO).segmentation_from_probabilities(probs[:2])
    assert LabelManager(LABELS, [1, 2]).check_regions_class_order() is None  # ignored without regions
    for rco in (None, [1, 2]):  # nnU-Net refuses the same inputs (when it builds its LabelManager)
        with pytest.raises(AssertionError):
            _theirs(BRATS, rco)


def test_bad_labels():
    with pytest.raises(DatasetError, match="no usable `labels`"):
        LabelManager.from_dataset_json({})
    with pytest.raises(DatasetError, match="ignore label must be one integer"):
        LabelManager({"background": 0, "a": 1, "ignore": [2, 3]})
    assert label_problems({"background": 0, "a": 2}) == [
        "labels must be consecutive integers starting at 0, found [0, 2]"]
    assert label_problems({"a": 1}) == ["`labels` must declare background as 0"]
    assert label_problems({"background": 0, "a": 1, "ignore": 1}) == [
        "the ignore label (1) must be the highest label (others go up to 1)"]
    assert label_problems({"background": 0, "a": "x"})[0].startswith("label `a` must map to an integer")
    assert label_problems({"background": 0, "a": 2}, check_numbering=False) == []
    assert label_problems(BRATS) == []  # regions with plain labels 0: accepted today


def test_keys_names_and_class_locations():
    assert label_key((1, 2)) == "(1, 2)" and parse_label_key(label_key((1, 2))) == (1, 2)
    assert parse_label_key(label_key(3)) == 3
    lm = LabelManager(CASES[3][0], CASES[3][1])
    assert lm.names == {"(1, 2, 3)": "whole_tumor", "(2, 3)": "tumor_core", "3": "enhancing"}
    assert lm.class_location_keys == [(1, 2, 3), (2, 3), (3,), (-1, 0, 1, 2, 3)]
    assert lm.annotated_classes_key == (-1, 0, 1, 2, 3) and lm.declared_values == (0, 1, 2, 3, 4)
    plain = LabelManager({"background": 0, "a": 1, "b": 2})
    assert plain.names == {"0": "background", "1": "a", "2": "b"}
    assert plain.class_location_keys == [1, 2] and plain.annotated_classes_key is None
    again = pickle.loads(pickle.dumps(lm))
    assert again.labels == lm.labels and again.regions_class_order == lm.regions_class_order


def test_frozen_and_from_plans():
    import dataclasses
    import types

    lm = LabelManager.from_plans(types.SimpleNamespace(labels={"background": 0, "r": (1, 2), "s": (2,)}), [1, 2])
    assert lm.has_regions and lm.regions_class_order == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lm.regions_class_order = None


def test_cheap_to_import():
    code = "import sys, nnfast.labels; assert 'torch' not in sys.modules and 'numba' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_region_label_problems():
    """nnU-Net's region dataset.json is accepted (plain labels beside regions need not be consecutive); a missing or
    short ``regions_class_order``, background inside a region and duplicate regions are problems."""
    doc = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
    assert label_problems(doc, regions_class_order=[1, 2, 3]) == []
    assert label_problems({**doc, "ignore": 4}, regions_class_order=[1, 2, 3]) == []
    LabelManager(doc, [1, 2, 3]).check_regions_class_order()  # and nnU-Net builds the same labels
    _theirs(doc, [1, 2, 3])
    (missing,) = label_problems(doc, regions_class_order=None)
    assert "`regions_class_order` is missing" in missing and "[1, 2, 3]" in missing
    (short,) = label_problems(doc, regions_class_order=[1, 2])
    assert "has 2 entries but the labels define 3 regions (whole_tumor, tumor_core, enhancing_tumor)" in short
    assert "names [7]" in label_problems(doc, regions_class_order=[1, 2, 7])[0]
    assert "contains background 0" in label_problems({**doc, "bad": [0, 1]}, regions_class_order=[1, 2, 3, 1])[0]
    assert "are the same labels [2, 3]" in label_problems({**doc, "again": [3, 2]},
                                                          regions_class_order=[1, 2, 3, 2])[0]
    assert "must be the highest" in label_problems({**doc, "ignore": 2}, regions_class_order=[1, 2, 3])[0]
