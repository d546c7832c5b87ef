"""Joint (reference, prediction) histogram against np.histogram2d-style counting with NumPy."""
from __future__ import annotations

import numpy as np
import pytest

from nnfast.native.confusion import joint_histogram, joint_histogram_runs


def _reference(ref, pred, values):
    n = len(values)
    idx = {v: i for i, v in enumerate(values)}
    br = np.array([idx.get(int(v), n) for v in ref.ravel()], np.int64)
    bp = np.array([idx.get(int(v), n) for v in pred.ravel()], np.int64)
    return np.bincount(br * (n + 1) + bp, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)


@pytest.mark.parametrize("dtypes", [(np.uint8, np.uint8), (np.int16, np.int16), (np.int32, np.int16),
                                    (np.int16, np.uint8), (np.bool_, np.int32)])
@pytest.mark.parametrize("order", ["C", "F", "mixed"])
def test_matches_reference(dtypes, order):
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 1), (3, 1, 70), (5, 9, 33), (2, 40, 64)]:
        ref = rng.integers(0, 5, shape)
        pred = rng.integers(0, 5, shape)
        # piecewise-constant stretches exercise the uniform-block shortcut
        ref[..., : shape[-1] // 2] = 1
        pred[..., : shape[-1] // 3] = 1
        ref = ref.astype(dtypes[0])
        pred = pred.astype(dtypes[1])
        if order == "F":
            ref, pred = np.asfortranarray(ref), np.asfortranarray(pred)
        elif order == "mixed":
            ref = np.asfortranarray(ref)
        for values in ([0, 1, 2], [1, 3], [4], [0, 1, 2, 3, 4], [2, 9]):
            np.testing.assert_array_equal(joint_histogram(ref, pred, values), _reference(ref, pred, values))


def test_empty_values_and_errors():
    a = np.zeros((2, 3), np.int16)
    assert joint_histogram(a, a, []).tolist() == [[6]]
    with pytest.raises(ValueError):
        joint_histogram(a, np.zeros((3, 2), np.int16), [1])
    with pytest.raises(ValueError):
        joint_histogram(a.astype(np.float32), a, [1])
    with pytest.raises(ValueError):
        joint_histogram(a, a, [1, 1])
    with pytest.raises(TypeError):
        joint_histogram([0], a, [1])


def test_negative_values_and_out_of_table_values():
    ref = np.array([-1, -1, 0, 5, 300, 2], np.int16)
    pred = np.array([-1, 0, 0, 5, 2, 300], np.int16)
    values = [-1, 0, 2]
    np.testing.assert_array_equal(joint_histogram(ref, pred, values), _reference(ref, pred, values))


@pytest.mark.parametrize("order", ["C", "F"])
def test_runs_histogram_equals_masked_histogram(order):
    from nnfast.native.components import runs_outside_largest_component

    rng = np.random.default_rng(1)
    for trial in range(30):
        shape = tuple(int(s) for s in rng.integers(1, 10, 3))
        ref = rng.integers(0, 4, shape).astype(np.int16, order=order)
        pred = rng.integers(0, 4, shape).astype(np.int16)
        pred[rng.random(shape) < 0.5] = 0
        runs = runs_outside_largest_component(pred, [1, 2])
        mask = np.zeros(shape, bool)
        for z, y, x0, x1 in runs:
            mask[z, y, x0:x1] = True
        values = [0, 1, 2, 3]
        np.testing.assert_array_equal(joint_histogram_runs(ref, np.asarray(pred, order=order), runs, values),
                                      _reference(ref[mask], pred[mask], values))
    two_d = np.array([[1, 0, 2]], np.int16)
    assert joint_histogram_runs(two_d, two_d, np.array([[0, 0, 0, 3]]), [0, 1, 2]).trace() == 3
    with pytest.raises(ValueError):
        joint_histogram_runs(two_d, two_d, np.array([[0, 1, 0, 1]]), [1])
