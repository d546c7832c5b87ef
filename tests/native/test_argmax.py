"""Class-axis kernels of the export (running argmax, merge, softmax) against NumPy: float32/float64 inputs, C and F
order, one-voxel axes, ties (the lower class wins, as ``np.argmax``)."""
from __future__ import annotations

import numpy as np
import pytest

from nnfast.native.argmax import argmax_channels, argmax_merge, argmax_update, softmax_inplace

SHAPES = [(5, 4, 3, 6), (3, 1, 7, 2), (4, 1, 1, 1), (1, 3, 3, 3), (6, 9, 1, 5)]


def _logits(shape, dtype, order, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values, exactly representable in float32: many ties
        x = rng.integers(-2, 3, shape).astype(dtype) / 4
    else:
        x = rng.normal(0, 3, shape).astype(np.float32).astype(dtype)  # float32-exact, so float64 compares the same
    return np.asarray(x, order=order)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("ties", [False, True])
def test_argmax_channels_equals_numpy(shape, dtype, order, ties):
    x = _logits(shape, dtype, order, ties=ties)
    out = argmax_channels(x)
    assert out.dtype == np.uint8 and out.shape == shape[1:]
    np.testing.assert_array_equal(out, np.argmax(x, axis=0))
    np.testing.assert_array_equal(argmax_channels(x, np.uint16), np.argmax(x, axis=0))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("label_dtype", [np.uint8, np.uint16])
def test_update_in_groups_and_merge_equal_one_argmax(ties, label_dtype):
    x = _logits((11, 5, 4, 3), np.float32, "C", seed=3, ties=ties).reshape(11, -1)
    ref = np.argmax(x, axis=0)
    # groups of classes folded in order, as the export does with chunk=4
    best = np.full(x.shape[1], -np.inf, np.float32)
    label = np.zeros(x.shape[1], label_dtype)
    for c0 in range(0, 11, 4):
        argmax_update(x[c0:c0 + 4], c0, best, label)
    np.testing.assert_array_equal(label, ref)
    np.testing.assert_array_equal(best, x.max(axis=0))
    # two spans of classes on "threads", merged lowest span first
    spans = [(0, 6), (6, 11)]
    parts = []
    for a, b in spans:
        bb = np.full(x.shape[1], -np.inf, np.float32)
        ll = np.zeros(x.shape[1], label_dtype)
        argmax_update(x[a:b], a, bb, ll)
        parts.append((bb, ll))
    (best, label), (best2, label2) = parts
    argmax_merge(best, label, best2, label2)
    np.testing.assert_array_equal(label, ref)


def test_update_reads_float64_and_f_order_chunks():
    x = _logits((4, 6, 5), np.float64, "F", seed=5).reshape(4, 30, order="F")
    assert not x.flags.c_contiguous
    best = np.full(30, -np.inf, np.float32)
    label = np.zeros(30, np.uint8)
    argmax_update(x, 0, best, label)
    np.testing.assert_array_equal(label, np.argmax(x, axis=0))


@pytest.mark.parametrize("shape", [(5, 24), (1, 3), (3, 1), (2, 1)])
def test_softmax_equals_numpy(shape):
    x = _logits(shape, np.float32, "C", seed=7)
    x[:, 0] = 50.0  # a voxel where every class ties at a large value
    ref = np.exp(x.astype(np.float64) - x.max(axis=0))
    ref /= ref.sum(axis=0)
    y = x.copy()
    softmax_inplace(y)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(y.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(y, axis=0), np.argmax(x, axis=0))


def test_wrappers_refuse_what_the_kernels_cannot_take():
    best = np.full(4, -np.inf, np.float32)
    label = np.zeros(4, np.uint8)
    with pytest.raises(ValueError, match="voxels"):
        argmax_update(np.zeros((2, 5), np.float32), 0, best, label)
    with pytest.raises(ValueError, match="do not fit"):
        argmax_update(np.zeros((2, 4), np.float32), 255, best, label)
    with pytest.raises(TypeError, match="float32"):
        argmax_update(np.zeros((2, 4), np.float32), 0, best.astype(np.float64), label)
    with pytest.raises(TypeError, match="integer"):
        argmax_update(np.zeros((2, 4), np.float32), 0, best, label.astype(np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        argmax_update(np.zeros((2, 4), np.float32), 0, np.full(8, -np.inf, np.float32)[::2], label)
    with pytest.raises(ValueError, match="best2/label2"):
        argmax_merge(best, label, best, label.astype(np.uint16))
    with pytest.raises(TypeError, match="float32"):
        softmax_inplace(np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        softmax_inplace(np.zeros((2, 3), np.float32, order="F"))
    with pytest.raises(ValueError, match="class axis"):
        argmax_channels(np.zeros((0, 3), np.float32))
    with pytest.raises(TypeError, match="numbers"):
        argmax_channels(np.zeros((2, 3), complex))
