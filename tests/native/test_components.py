"""Connected components (full connectivity) against scipy.ndimage.label with a full structure and against
skimage.measure.label(connectivity=None), which nnU-Net's postprocessing uses through acvl_utils."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.measure import label as sk_label

from nnfast.native.components import (
    erase_runs,
    keep_largest_component,
    label_components,
    remove_all_but_largest_component,
    runs_outside_largest_component,
)


def _random_masks(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ndim = int(rng.choice([2, 3]))
        shape = tuple(int(s) for s in rng.integers(1, 10, ndim))
        yield rng.random(shape) < rng.uniform(0.05, 0.8)


def _reference_keep_largest(mask):
    """acvl_utils' remove_all_but_largest_component, written out with skimage (ties keep all)."""
    lab = sk_label(mask, connectivity=None)
    sizes = np.bincount(lab.ravel())[1:]
    if sizes.size == 0:
        return np.zeros(mask.shape, bool)
    keep = np.flatnonzero(sizes == sizes.max()) + 1
    return np.isin(lab, keep)


def test_labels_equal_scipy_full_structure_and_skimage():
    for mask in _random_masks(300):
        labels, sizes = label_components(mask)
        ref, n = ndi.label(mask, structure=np.ones((3,) * mask.ndim))
        assert labels.dtype == np.int32 and labels.shape == mask.shape
        np.testing.assert_array_equal(labels, ref)
        np.testing.assert_array_equal(labels, sk_label(mask, connectivity=None))
        assert sizes.shape == (n,)
        np.testing.assert_array_equal(sizes, np.bincount(ref.ravel(), minlength=n + 1)[1:])


def test_diagonal_neighbours_connect_in_3d_and_2d():
    m = np.zeros((3, 3, 3), bool)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True  # corner-to-corner: one component only with 26-connectivity
    labels, sizes = label_components(m)
    assert sizes.tolist() == [3]
    m2 = np.eye(4, dtype=bool)
    assert label_components(m2)[1].tolist() == [4]
    # two voxels two apart are not connected
    m3 = np.zeros((1, 1, 3), bool)
    m3[0, 0, 0] = m3[0, 0, 2] = True
    assert label_components(m3)[1].tolist() == [1, 1]


def test_keep_largest_matches_acvl_utils_rule():
    for mask in _random_masks(200, seed=1):
        np.testing.assert_array_equal(keep_largest_component(mask), _reference_keep_largest(mask))


def test_keep_largest_against_acvl_utils_itself():
    from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component as acvl_keep

    for mask in _random_masks(40, seed=2):
        np.testing.assert_array_equal(keep_largest_component(mask), acvl_keep(mask))


def test_ties_keep_every_largest_component():
    m = np.zeros((5, 5, 5), bool)
    m[0, 0, :2] = True
    m[4, 4, 3:] = True
    m[2, 0, 4] = True
    out = keep_largest_component(m)
    assert out.sum() == 4 and not out[2, 0, 4]


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 1), (6, 1, 1), (1, 1, 9), (4, 5)])
def test_edge_shapes_empty_and_full(shape):
    empty = np.zeros(shape, bool)
    labels, sizes = label_components(empty)
    assert sizes.size == 0 and not labels.any()
    assert not keep_largest_component(empty).any()
    full = np.ones(shape, bool)
    labels, sizes = label_components(full)
    assert sizes.tolist() == [full.size] and (labels == 1).all()
    assert keep_largest_component(full).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_numeric_masks_and_layouts(dtype):
    rng = np.random.default_rng(3)
    mask = rng.random((6, 7, 8)) < 0.3
    expected = _reference_keep_largest(mask)
    arr = mask.astype(dtype)
    np.testing.assert_array_equal(keep_largest_component(arr), expected)
    np.testing.assert_array_equal(keep_largest_component(np.asfortranarray(arr)), expected)
    np.testing.assert_array_equal(keep_largest_component(arr[:, ::-1][:, ::-1]), expected)
    strided = np.zeros((6, 7, 16), dtype)
    strided[:, :, ::2] = arr
    np.testing.assert_array_equal(label_components(strided[:, :, ::2])[0], ndi.label(mask, np.ones((3, 3, 3)))[0])
    np.testing.assert_array_equal(label_components(np.asfortranarray(arr))[0], ndi.label(mask, np.ones((3, 3, 3)))[0])


def _reference_remove(seg, values, background=0):
    """nnU-Net's remove_all_but_largest_component_from_segmentation with the union of ``values``."""
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    return remove_all_but_largest_component_from_segmentation(seg, list(values), background)


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
@pytest.mark.parametrize("order", ["C", "F"])
def test_remove_all_but_largest_equals_nnunet(dtype, order):
    rng = np.random.default_rng(4)
    for trial in range(40):
        shape = tuple(int(s) for s in rng.integers(1, 9, 3))
        seg = rng.integers(0, 4, shape).astype(dtype, order=order)
        seg[rng.random(shape) < 0.5] = 0
        values = [[1], [2], [1, 2], [1, 2, 3], [3, 7]][trial % 5]
        expected = _reference_remove(seg, values)
        work = seg.copy(order=order)
        removed = remove_all_but_largest_component(work, values)
        np.testing.assert_array_equal(work, expected)
        assert removed == int(np.sum(seg != expected))


def test_remove_on_noncontiguous_view_writes_back():
    rng = np.random.default_rng(5)
    big = rng.integers(0, 3, (6, 8, 10)).astype(np.int16)
    view = big[:, ::2, 1:]
    expected = view.copy()
    remove_all_but_largest_component(expected, [1, 2])
    remove_all_but_largest_component(view, [1, 2])
    np.testing.assert_array_equal(view, expected)


def test_remove_background_value_and_values_outside_dtype():
    seg = np.array([[[1, 0, 1, 1]]], np.uint8)
    assert remove_all_but_largest_component(seg, [1], background=9) == 1
    assert seg.tolist() == [[[9, 0, 1, 1]]]
    seg = np.array([[[1, 0, 1]]], np.uint8)
    assert remove_all_but_largest_component(seg, [300]) == 0  # no voxel can hold 300
    assert seg.tolist() == [[[1, 0, 1]]]


def test_bad_inputs():
    with pytest.raises(ValueError):
        label_components(np.zeros((2, 2, 2, 2), bool))
    with pytest.raises(TypeError):
        keep_largest_component([[1, 0]])
    with pytest.raises(ValueError):
        remove_all_but_largest_component(np.zeros((2, 2, 2), np.float32), [1])
    with pytest.raises(ValueError):
        remove_all_but_largest_component(np.zeros((2, 2, 2), np.int16), [])
    ro = np.zeros((2, 2, 2), np.int16)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        remove_all_but_largest_component(ro, [1])


def test_large_blob_with_noise():
    """A realistic case: an organ plus scattered false positives; only the organ survives."""
    rng = np.random.default_rng(6)
    shape = (30, 64, 64)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    organ = zz ** 2 + yy ** 2 / 0.5 + xx ** 2 / 0.3 < 0.5
    noise = (rng.random(shape) < 0.002) & ~ndi.binary_dilation(organ, np.ones((3, 3, 3)))
    out = keep_largest_component(organ | noise)
    np.testing.assert_array_equal(out, organ)


@pytest.mark.parametrize("ndim", [2, 3])
def test_runs_outside_largest_then_erase_equals_removal(ndim):
    rng = np.random.default_rng(7)
    for trial in range(60):
        shape = tuple(int(s) for s in rng.integers(1, 12, ndim))
        seg = rng.integers(0, 4, shape).astype(np.int16)
        seg[rng.random(shape) < 0.4] = 0
        values = [[1], [2, 3], [1, 2, 3]][trial % 3]
        expected = seg.copy()
        n = remove_all_but_largest_component(expected, values)
        runs = runs_outside_largest_component(seg, values)
        assert runs.shape[1] == 4 and runs.dtype == np.int64
        assert int((runs[:, 3] - runs[:, 2]).sum()) == n
        work = seg.copy()
        assert erase_runs(work, runs) == n
        np.testing.assert_array_equal(work, expected)
        # rows are sorted in raster order and runs do not overlap
        flat = runs[:, 0] * 10**6 + runs[:, 1] * 10**3 + runs[:, 2]
        assert np.all(np.diff(flat) > 0)


def test_erase_runs_rejects_out_of_range_runs():
    seg = np.zeros((2, 3, 4), np.int16)
    with pytest.raises(ValueError):
        erase_runs(seg, np.array([[0, 3, 0, 1]]))
    with pytest.raises(ValueError):
        erase_runs(seg, np.array([[0, 0, 2, 5]]))
