"""Label resampling kernel against batchgenerators / nnU-Net (``nnfast.native.resample_seg``).

Reference: ``batchgenerators.augmentations.utils.resize_segmentation(seg.astype(float), shape, order)``
(0.25.5, tie-break 'nearest'), exactly as nnU-Net's ``resample_data_or_seg`` calls it, and nnU-Net's
``resample_data_or_seg(is_seg=True)`` for the separate-z path. Results must be identical.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.native.resample_seg import label_taps, resize_labels, resize_labels_separate_z

pytestmark = pytest.mark.compat


def _bg(seg: np.ndarray, shape, order=1, tiebreak="nearest") -> np.ndarray:
    from batchgenerators.augmentations.utils import resize_segmentation

    seg4 = seg if seg.ndim == 4 else seg[None]
    out = np.stack([resize_segmentation(seg4[c].astype(float), tuple(shape), order, seg_tiebreak=tiebreak)
                    for c in range(seg4.shape[0])]).astype(seg.dtype)
    return out if seg.ndim == 4 else out[0]


def _nnunet(seg: np.ndarray, shape, axis, order=1, sep=True) -> np.ndarray:
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resample_data_or_seg(seg, np.array(shape), True, axis, order, sep, order_z=0)


def _blocks(shape, labels, seed=0, block=2) -> np.ndarray:
    """Piecewise-constant labels in ``block``-sized cubes: even zoom factors put samples on exact ties."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(labels, size=tuple(-(-s // block) for s in shape))
    fine = np.kron(coarse, np.ones((block,) * 3, coarse.dtype))
    return fine[: shape[0], : shape[1], : shape[2]]


def _seg(shape, dtype, layout, kind="random", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = [0, 1, 2, 3] if np.dtype(dtype).kind == "u" else [-1, 0, 1, 2]
    if kind == "random":
        seg = rng.choice(labels, size=shape)
    elif kind == "blocks":
        seg = _blocks(shape, labels, seed)
    elif kind == "background":
        seg = np.zeros(shape, int)
    else:  # "shapes": nested boxes, -1 outside
        seg = np.full(shape, labels[0])
        sl = tuple(slice(s // 5, s - s // 5) for s in shape)
        seg[sl] = labels[1]
        sl = tuple(slice(s // 3, s - s // 3 + 1) for s in shape)
        seg[sl] = labels[2]
    seg = seg.astype(dtype)
    if layout == "F":
        seg = np.asfortranarray(seg)
    return seg


CASES = [
    ((6, 7, 8), (9, 5, 11)),  # mixed
    ((8, 8, 8), (4, 4, 4)),  # x0.5: every sample on a 2x2x2 tie
    ((4, 5, 6), (8, 10, 12)),  # x2
    ((1, 6, 7), (3, 6, 5)),  # one-voxel axis
    ((6, 1, 7), (6, 1, 9)),  # unchanged one-voxel axis
    ((5, 6, 7), (1, 1, 1)),
    ((5, 6, 7), (5, 6, 7)),  # same shape
]


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8])
@pytest.mark.parametrize("layout", ["C", "F"])
@pytest.mark.parametrize("in_shape,out_shape", CASES)
@pytest.mark.parametrize("kind", ["random", "blocks", "shapes", "background"])
def test_resize_labels_matches_batchgenerators(dtype, layout, in_shape, out_shape, kind):
    seg = _seg(in_shape, dtype, layout, kind)
    before = seg.copy()
    ours = resize_labels(seg, out_shape)
    assert ours.dtype == seg.dtype and ours.shape == tuple(out_shape) and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, _bg(seg, out_shape))
    np.testing.assert_array_equal(seg, before)


def test_tie_break_is_exercised():
    """On block labels at half resolution the nearest-neighbour tie-break decides many voxels."""
    seg = _seg((12, 12, 12), np.int8, "C", "blocks", seed=1)
    shape = (7, 9, 5)
    ours = resize_labels(seg, shape)
    np.testing.assert_array_equal(ours, _bg(seg, shape))
    lowest = _bg(seg, shape, tiebreak="lowest")
    assert np.count_nonzero(ours != lowest) > 0  # a rule that ignores the nearest label would fail here


def test_channels_and_negative_labels():
    seg = np.stack([_seg((7, 8, 9), np.int16, "C", "shapes"), _seg((7, 8, 9), np.int16, "C", "random", 3)])
    assert seg.min() == -1
    ours = resize_labels(seg, (5, 11, 6))
    np.testing.assert_array_equal(ours, _nnunet(seg, (5, 11, 6), None, sep=False))


def test_single_label_and_large_labels():
    np.testing.assert_array_equal(resize_labels(np.full((3, 4, 5), 7, np.int8), (6, 2, 3)), 7)
    seg = _seg((6, 6, 6), np.uint8, "C", "random", 2) * 60 + 15  # labels up to 195 in uint8
    np.testing.assert_array_equal(resize_labels(seg, (9, 4, 7)), _bg(seg, (9, 4, 7)))
    seg = _seg((6, 6, 6), np.int16, "C", "random", 2) * 1000  # labels beyond int8
    np.testing.assert_array_equal(resize_labels(seg, (9, 4, 7)), _bg(seg, (9, 4, 7)))


@pytest.mark.parametrize("in_shape,out_shape", CASES)
def test_order_0_is_nearest(in_shape, out_shape):
    seg = _seg(in_shape, np.int8, "C", "random", 4)
    np.testing.assert_array_equal(resize_labels(seg, out_shape, order=0), _bg(seg, out_shape, order=0))


@pytest.mark.parametrize("layout", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8])
@pytest.mark.parametrize("in_shape,out_shape,axis", [
    ((5, 16, 17), (7, 14, 19), 0),  # z up
    ((5, 16, 17), (3, 8, 19), 0),  # z down, x0.5 in-plane ties
    ((16, 17, 5), (14, 19, 9), 2),
    ((16, 16, 5), (8, 8, 2), 2),
    ((16, 5, 17), (14, 9, 19), 1),
    ((6, 16, 17), (6, 14, 19), 0),  # z unchanged
    ((6, 16, 17), (9, 16, 17), 0),  # in-plane unchanged
    ((1, 6, 7), (3, 12, 14), 0),  # single slice
])
@pytest.mark.parametrize("kind", ["blocks", "shapes", "random"])
def test_separate_z_matches_nnunet(layout, dtype, in_shape, out_shape, axis, kind):
    seg = _seg(in_shape, dtype, layout, kind, seed=5)[None]
    ours = resize_labels_separate_z(seg, out_shape, axis)
    np.testing.assert_array_equal(ours, _nnunet(seg, out_shape, axis))


def test_separate_z_slices_with_one_label():
    """Slices that hold a single label take nnU-Net's early exit; the one-pass rule agrees."""
    seg = np.zeros((4, 8, 9), np.int8)
    seg[1] = 2
    seg[2, 2:6, 3:7] = 1
    seg[3] = -1
    seg[3, :4] = 0
    np.testing.assert_array_equal(resize_labels_separate_z(seg[None], (6, 5, 13), 0), _nnunet(seg[None], (6, 5, 13), 0))


def test_empty_input_gives_zeros():
    out = resize_labels(np.zeros((0, 4, 5), np.int8), (3, 2, 2))
    assert out.shape == (3, 2, 2) and not out.any()


def test_label_taps_fold_zero_weights():
    idx, w, nn = label_taps(7, 7, 1)  # unchanged axis: one tap per sample
    np.testing.assert_array_equal(idx[:, 0], np.arange(7))
    np.testing.assert_array_equal(idx[:, 1], idx[:, 0])
    np.testing.assert_array_equal(w, np.column_stack([np.ones(7), np.zeros(7)]))
    np.testing.assert_array_equal(nn, np.arange(7))


def test_validation():
    with pytest.raises(ValueError, match="int8, int16, int32 or uint8"):
        resize_labels(np.zeros((3, 3, 3), np.float32), (2, 2, 2))
    with pytest.raises(ValueError, match="int8, int16, int32 or uint8"):
        resize_labels(np.zeros((3, 3, 3), np.int64), (2, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        resize_labels(np.zeros((3, 3), np.int8), (2, 2, 2))
    with pytest.raises(ValueError, match="3 positive sizes"):
        resize_labels(np.zeros((3, 3, 3), np.int8), (2, 2))
    with pytest.raises(ValueError, match="order"):
        resize_labels(np.zeros((3, 3, 3), np.int8), (2, 2, 2), order=3)
    with pytest.raises(ValueError, match="axis"):
        resize_labels_separate_z(np.zeros((3, 3, 3), np.int8), (2, 2, 2), axis=-1)
    with pytest.raises(ValueError, match=r"values \[5\]"):
        resize_labels(np.full((3, 3, 3), 5, np.int8), (2, 2, 2), labels=[0, 1])
    resize_labels(np.ones((3, 3, 3), np.int8), (2, 2, 2), labels=[-1, 0, 1])  # accepted


@settings(max_examples=20, deadline=None)
@given(
    in_shape=st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
    factors=st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 2.0, 0.7, 1.3])] * 3),
    kind=st.sampled_from(["random", "blocks", "shapes"]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(in_shape, factors, kind, seed):
    out_shape = tuple(max(1, int(round(s * f))) for s, f in zip(in_shape, factors))
    seg = _seg(in_shape, np.int8, "C", kind, seed)
    np.testing.assert_array_equal(resize_labels(seg, out_shape), _bg(seg, out_shape))


@settings(max_examples=10, deadline=None)
@given(
    in_shape=st.tuples(st.integers(1, 6), st.integers(2, 10), st.integers(2, 10)),
    out_shape=st.tuples(st.integers(1, 8), st.integers(1, 12), st.integers(1, 12)),
    axis=st.sampled_from([0, 2]),
    seed=st.integers(0, 2**16),
)
def test_property_separate_z(in_shape, out_shape, axis, seed):
    if axis == 2:
        in_shape, out_shape = in_shape[::-1], out_shape[::-1]
    seg = _seg(in_shape, np.int8, "C", "blocks", seed)[None]
    np.testing.assert_array_equal(resize_labels_separate_z(seg, out_shape, axis), _nnunet(seg, out_shape, axis))


def test_kernels_run_without_jit():
    """The kernel stays valid Python (NUMBA_DISABLE_JIT=1) and gives the same labels."""
    code = (
        "import numpy as np\n"
        "from batchgenerators.augmentations.utils import resize_segmentation\n"
        "from nnfast.native.resample_seg import resize_labels, resize_labels_separate_z\n"
        "s = np.kron(np.array([[[0, 1], [-1, 2]]], np.int8), np.ones((2, 2, 2), np.int8))\n"
        "a = resize_labels(s, (3, 2, 3))\n"
        "b = resize_segmentation(s.astype(float), (3, 2, 3), 1).astype(np.int8)\n"
        "assert (a == b).all()\n"
        "assert resize_labels_separate_z(s, (4, 3, 3), 0).shape == (4, 3, 3)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
