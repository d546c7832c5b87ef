"""nonzero mask / hole filling / bounding boxes against scipy and acvl_utils (nnU-Net's references)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.ndimage import binary_fill_holes

from nnfast.native.crop import (
    bbox_from_mask,
    label_outside_mask,
    nonzero_mask,
    nonzero_mask_and_bbox,
    seg_from_mask,
)

DTYPES = (np.uint8, np.int16, np.float32, np.float64)


def reference_mask(data: np.ndarray) -> np.ndarray:
    """Slow, obviously correct: union of ``!= 0`` over channels, then scipy's hole filling."""
    return binary_fill_holes(np.any(data != 0, axis=0))


def reference_bbox(mask: np.ndarray) -> list[list[int]]:
    """np.where bounding box; the full image when empty (acvl_utils' rule)."""
    if not mask.any():
        return [[0, s] for s in mask.shape]
    where = np.nonzero(mask)
    return [[int(w.min()), int(w.max()) + 1] for w in where]


def shell_with_cavity(shape=(9, 10, 11)) -> np.ndarray:
    """A hollow box: a closed shell whose inside must be filled."""
    m = np.zeros(shape, bool)
    m[2:7, 2:8, 2:9] = True
    m[3:6, 3:7, 3:8] = False
    return m


def random_blobs(rng, shape, n_channels, p, dtype):
    """Thresholded smooth-ish noise: blobs with holes and cavities, some touching the border."""
    noise = rng.random((n_channels, *shape))
    data = (noise < p) * rng.integers(1, 5, (n_channels, *shape))
    return data.astype(dtype)


def layouts(data):
    yield "C", data
    yield "F", np.asfortranarray(data)
    yield "transposed", data.transpose(0, 3, 1, 2)
    yield "strided", data[:, ::-1, :, ::2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonzero_mask_matches_scipy_on_random_blobs(dtype):
    rng = np.random.default_rng(0)
    for trial in range(40):
        shape = tuple(int(s) for s in rng.integers(1, 13, 3))
        data = random_blobs(rng, shape, int(rng.integers(1, 4)), float(rng.uniform(0.2, 0.9)), dtype)
        for name, arr in layouts(data):
            mask, bbox = nonzero_mask_and_bbox(arr)
            expected = reference_mask(arr)
            assert mask.dtype == np.bool_ and mask.shape == arr.shape[1:], name
            np.testing.assert_array_equal(mask, expected, err_msg=f"trial {trial}, layout {name}")
            assert bbox == reference_bbox(expected), (trial, name)


def test_cavity_is_filled_and_open_cavity_is_not():
    m = shell_with_cavity()
    data = m[None].astype(np.float32)
    out = nonzero_mask(data)
    assert out[4, 5, 5]  # enclosed cavity filled
    np.testing.assert_array_equal(out, binary_fill_holes(m))
    # open the shell towards one face: the cavity is now connected to the outside
    m2 = m.copy()
    m2[4, 5, 2] = False
    out2 = nonzero_mask(m2[None].astype(np.float32))
    assert not out2[4, 5, 5]
    np.testing.assert_array_equal(out2, binary_fill_holes(m2))


def test_cavity_touching_border_is_not_a_hole():
    m = np.ones((5, 6, 7), bool)
    m[0, 2:4, 2:4] = False  # pit open to the x = 0 face
    m[2, 2:4, 2:5] = False  # enclosed hole
    out = nonzero_mask(m[None].astype(np.int16))
    assert not out[0, 2, 2] and out[2, 2, 2]
    np.testing.assert_array_equal(out, binary_fill_holes(m))


def test_diagonal_connection_does_not_leak():
    # a hole connected to the outside only through an edge (18-neighbour) stays a hole under 6-connectivity
    m = np.ones((5, 5, 5), bool)
    m[2, 2, 2] = False
    m[1, 1, 2] = False  # edge-adjacent to (2, 2, 2), itself enclosed... then open it to the border diagonally
    m[0, 0, 2] = False
    out = nonzero_mask(m[None].astype(np.float32))
    np.testing.assert_array_equal(out, binary_fill_holes(m))
    assert out[2, 2, 2] and out[1, 1, 2] and not out[0, 0, 2]


def test_nan_counts_as_nonzero():
    data = np.zeros((1, 3, 3, 3), np.float32)
    data[0, 1, 1, 1] = np.nan
    mask, bbox = nonzero_mask_and_bbox(data)
    assert mask[1, 1, 1] and mask.sum() == 1
    assert bbox == [[1, 2], [1, 2], [1, 2]]


def test_channel_union():
    data = np.zeros((3, 4, 4, 4), np.int16)
    data[0, 0, 0, 0] = 1
    data[2, 3, 3, 3] = -7
    mask, bbox = nonzero_mask_and_bbox(data)
    assert mask[0, 0, 0] and mask[3, 3, 3] and mask.sum() == 2
    assert bbox == [[0, 4], [0, 4], [0, 4]]


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 9), (5, 1, 6), (4, 6, 1), (1, 1, 8)])
def test_single_voxel_axes(shape):
    rng = np.random.default_rng(1)
    data = random_blobs(rng, shape, 1, 0.6, np.float32)
    # with a one-voxel axis every voxel touches the border: nothing is ever filled
    data[0, ..., 0] = 0  # make sure there is background
    mask, bbox = nonzero_mask_and_bbox(data)
    np.testing.assert_array_equal(mask, reference_mask(data))
    np.testing.assert_array_equal(mask, data[0] != 0)
    assert bbox == reference_bbox(mask)


def test_2d_like_input_fills_nothing_like_scipy_3d():
    # nnU-Net stores 2D images as (c, 1, y, x): in 3D every voxel of a one-slice volume touches the border
    m = np.zeros((1, 9, 9), bool)
    m[0, 2:7, 2:7] = True
    m[0, 4, 4] = False
    out = nonzero_mask(m[None].astype(np.uint8))
    assert not out[0, 4, 4]
    np.testing.assert_array_equal(out, binary_fill_holes(m))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_mask_gives_full_image_bbox(dtype):
    data = np.zeros((2, 4, 5, 6), dtype)
    mask, bbox = nonzero_mask_and_bbox(data)
    assert not mask.any()
    assert bbox == [[0, 4], [0, 5], [0, 6]]
    assert bbox_from_mask(mask) == [[0, 4], [0, 5], [0, 6]]


@pytest.mark.compat
def test_matches_nnunet_create_nonzero_mask_and_acvl_bbox():
    from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    rng = np.random.default_rng(2)
    for _ in range(20):
        shape = tuple(int(s) for s in rng.integers(1, 15, 3))
        data = random_blobs(rng, shape, int(rng.integers(1, 3)), float(rng.uniform(0.05, 0.95)), np.float32)
        ref = create_nonzero_mask(data)
        mask, bbox = nonzero_mask_and_bbox(data)
        np.testing.assert_array_equal(mask, ref)
        assert bbox == get_bbox_from_mask(ref)
        assert bbox_from_mask(ref) == get_bbox_from_mask(ref)
    empty = np.zeros((3, 4, 5), bool)
    assert bbox_from_mask(empty) == get_bbox_from_mask(empty)


def test_large_enclosed_cavity_and_spiral_do_not_overflow():
    # a big hollow box (stack growth) and a maze-like pattern (many scanline runs)
    m = np.zeros((30, 40, 50), bool)
    m[1:29, 1:39, 1:49] = True
    m[2:28, 2:38, 2:48] = False
    m[::3, :, 10] = True
    m[:, ::4, 30] = True
    rng = np.random.default_rng(3)
    m ^= rng.random(m.shape) < 0.02
    out = nonzero_mask(m[None].astype(np.float32))
    np.testing.assert_array_equal(out, binary_fill_holes(m))


def test_tiny_stack_grows_and_gives_the_same_result():
    from nnfast.native.crop import _fill_holes

    rng = np.random.default_rng(6)
    for trial in range(10):
        m = rng.random((9, 23, 31)) < 0.55
        m[4, 5:20, 5:25] = True
        m[3:6, 10, 10:20] = False
        work = m.astype(np.uint8)
        _fill_holes(work, 0, 9, 0, 23, 0, 31, 1)  # starts with a one-entry stack: grows many times
        np.testing.assert_array_equal(work.view(bool), binary_fill_holes(m), err_msg=str(trial))


def test_input_not_modified():
    rng = np.random.default_rng(4)
    data = random_blobs(rng, (6, 7, 8), 2, 0.5, np.int16)
    before = data.copy()
    nonzero_mask(data)
    np.testing.assert_array_equal(data, before)


@given(arrays(np.bool_, st.tuples(*[st.integers(1, 8)] * 3)))
@settings(max_examples=80, deadline=None)
def test_bbox_property_crop_keeps_all_voxels(mask):
    bbox = bbox_from_mask(mask)
    assert bbox == reference_bbox(mask)
    slicer = tuple(slice(a, b) for a, b in bbox)
    cropped = mask[slicer]
    assert cropped.sum() == mask.sum()
    if mask.any():
        # tight: every face of the box holds a voxel of the mask
        for axis in range(3):
            assert np.take(cropped, 0, axis=axis).any() and np.take(cropped, -1, axis=axis).any()
    # padding the crop back into place restores the mask (crop/pad inverse)
    restored = np.zeros_like(mask)
    restored[slicer] = cropped
    np.testing.assert_array_equal(restored, mask)


@given(arrays(np.uint8, st.tuples(st.integers(1, 2), *[st.integers(1, 7)] * 3), elements=st.integers(0, 1)))
@settings(max_examples=80, deadline=None)
def test_nonzero_mask_property_matches_scipy(data):
    mask, bbox = nonzero_mask_and_bbox(data)
    expected = reference_mask(data)
    np.testing.assert_array_equal(mask, expected)
    assert bbox == reference_bbox(expected)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.float64])
def test_label_outside_mask(dtype):
    rng = np.random.default_rng(5)
    seg = rng.integers(0, 3, (1, 5, 6, 7)).astype(dtype)
    mask = rng.random((5, 6, 7)) < 0.5
    for view in (seg, np.asfortranarray(seg), seg[:, :, ::-1]):
        m = mask[:, ::-1] if view.strides[2] < 0 else mask
        before = view.copy()
        out = label_outside_mask(view, m, -1)
        expected = view.copy()
        expected[(expected == 0) & ~m[None]] = -1
        assert out.dtype == view.dtype
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(view, before)


def test_label_outside_mask_rejects_unsigned_with_negative_label():
    with pytest.raises(ValueError, match="uint8"):
        label_outside_mask(np.zeros((1, 2, 2, 2), np.uint8), np.zeros((2, 2, 2), bool), -1)
    out = label_outside_mask(np.zeros((1, 2, 2, 2), np.uint8), np.zeros((2, 2, 2), bool), 255)
    assert (out == 255).all()


def test_seg_from_mask():
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 1:, 2] = True
    out = seg_from_mask(mask)
    np.testing.assert_array_equal(out, np.where(mask, np.int8(0), np.int8(-1))[None])
    assert out.dtype == np.int8 and out.shape == (1, 2, 3, 4)


def test_errors():
    with pytest.raises(ValueError, match=r"\(c, x, y, z\)"):
        nonzero_mask(np.zeros((3, 4, 5)))
    with pytest.raises(TypeError):
        nonzero_mask([[[[1]]]])
    with pytest.raises(ValueError, match="dtype"):
        nonzero_mask(np.zeros((1, 2, 2, 2), complex))
    with pytest.raises(ValueError, match=r"\(x, y, z\)"):
        bbox_from_mask(np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="spatial"):
        label_outside_mask(np.zeros((1, 2, 2, 3)), np.zeros((2, 2, 2), bool))


def test_kernels_run_as_python_with_jit_disabled():
    code = textwrap.dedent(
        """
        import numpy as np
        from scipy.ndimage import binary_fill_holes
        from nnfast.native.crop import nonzero_mask_and_bbox, bbox_from_mask, label_outside_mask, seg_from_mask
        m = np.zeros((5, 6, 7), bool); m[1:4, 1:5, 1:6] = True; m[2, 2:4, 2:5] = False; m[0, 0, 0] = True
        mask, bbox = nonzero_mask_and_bbox(m[None].astype(np.float32))
        assert (mask == binary_fill_holes(m)).all() and bbox == [[0, 4], [0, 5], [0, 6]], bbox
        assert bbox_from_mask(mask[:, :, 1:]) == [[1, 4], [1, 5], [0, 5]]
        assert (label_outside_mask(np.zeros((1, 5, 6, 7), np.int8), mask) == np.where(mask, 0, -1)).all()
        assert (seg_from_mask(mask)[0] == np.where(mask, 0, -1)).all()
        """
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
