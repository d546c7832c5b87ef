"""sample_class_locations: identical to nnU-Net's _sample_foreground_locations, array for array."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnfast.preprocess.class_locations import sample_class_locations


def nnunet(seg, classes, **kwargs):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    return DefaultPreprocessor._sample_foreground_locations(seg, classes, **kwargs)


def assert_identical(ref, got):
    assert list(ref) == list(got)
    for key in ref:
        assert got[key].dtype == np.int64 and got[key].ndim == 2 and got[key].shape[1] == 4, key
        if len(ref[key]) == 0:
            assert got[key].shape == (0, 4), key
        else:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=str(key))


def blobs(rng, shape, labels, dtype):
    seg = np.zeros(shape, dtype)
    for lab in labels:
        c = [int(rng.integers(0, s)) for s in shape]
        r = [int(rng.integers(1, max(2, s // 2))) for s in shape]
        seg[tuple(slice(max(0, a - b), a + b) for a, b in zip(c, r))] = lab
    return seg[None]


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("order", ["C", "F"])
def test_identical_to_nnunet(dtype, order):
    rng = np.random.default_rng([np.dtype(dtype).num, order == "F"])
    seg = blobs(rng, (30, 40, 50), [1, 2, 3, 1, 2], dtype)
    if np.dtype(dtype).kind != "u":
        seg[0, :2] = -1  # outside the nonzero region
    seg = np.asarray(seg, order=order)
    for classes in ([1, 2, 3], [3, 1], [(1, 2), (3,), [2, 3]], [1, 2, 3, [-1, 0, 1, 2, 3]], [4, 1]):
        assert_identical(nnunet(seg, classes), sample_class_locations(seg, classes))


@pytest.mark.compat
def test_identical_with_large_class_coverage_rule_and_other_constants():
    rng = np.random.default_rng(1)
    seg = np.zeros((1, 60, 70, 80), np.int8)
    seg[0, 5:55, 5:65, 5:75] = 1  # ~2e5 voxels: 1 % coverage < 10000 -> 10000 samples; 5 % coverage > 50
    seg[0, 20:30, 20:30, 20:30] = 2
    seg[0, rng.random((60, 70, 80)) < 0.001] = 3
    for kwargs in ({}, dict(seed=7, min_num_samples=50, min_percent_coverage=0.05)):
        ref = nnunet(seg, [1, 2, 3], **kwargs)
        got = sample_class_locations(seg, [1, 2, 3], **kwargs)
        assert_identical(ref, got)
    assert len(got[1]) == max(50, math.ceil(int((seg == 1).sum()) * 0.05)) > 10000


@pytest.mark.compat
def test_identical_edge_shapes():
    for shape in [(1, 1, 1), (1, 1, 9), (5, 1, 3), (1, 6, 7)]:
        seg = (np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.int16)[None]
        assert_identical(nnunet(seg, [1, 2]), sample_class_locations(seg, [1, 2]))
    empty = np.zeros((1, 3, 4, 5), np.int8)
    assert_identical(nnunet(empty, [1, (1, 2)]), sample_class_locations(empty, [1, (1, 2)]))


def test_rule_counts_membership_and_no_duplicates():
    rng = np.random.default_rng(2)
    seg = rng.integers(0, 4, (1, 20, 30, 40)).astype(np.int8)
    out = sample_class_locations(seg, [1, (2, 3), 5], min_num_samples=300, min_percent_coverage=0.1)
    for key, labs in ((1, (1,)), ((2, 3), (2, 3)), (5, (5,))):
        total = int(np.isin(seg, labs).sum())
        expected = max(min(300, total), math.ceil(total * 0.1)) if total else 0
        coords = out[key]
        assert coords.shape == (expected, 4)
        if expected:
            assert (coords[:, 0] == 0).all()
            assert np.isin(seg[tuple(coords.T)], labs).all()
            assert np.unique(coords, axis=0).shape[0] == expected  # without replacement


def test_three_dimensional_seg_gives_four_columns_and_input_untouched():
    rng = np.random.default_rng(3)
    seg = rng.integers(0, 3, (6, 7, 8)).astype(np.int16)
    before = seg.copy()
    out3 = sample_class_locations(seg, [1, 2])
    out4 = sample_class_locations(seg[None], [1, 2])
    for key in (1, 2):
        np.testing.assert_array_equal(out3[key], out4[key])
        assert out3[key].shape[1] == 4
    np.testing.assert_array_equal(seg, before)
