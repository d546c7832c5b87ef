"""Image resampling kernels against skimage / nnU-Net (``nnfast.native.resample``).

Reference: ``skimage.transform.resize(order, mode='edge', anti_aliasing=False)`` per channel on float64 data
(what nnU-Net's ``resample_data_or_seg`` calls) and nnU-Net's ``resample_data_or_seg`` itself for the
separate-z path. Tolerance: max |ours - ref| <= 1e-6 x the data range (float32 intermediates reach ~1e-7);
with ``precise=True`` the float32 result equals nnU-Net's float32 result bit for bit.
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
from scipy.ndimage import map_coordinates
from skimage.transform import resize

from nnfast.native.resample import axis_taps, nearest_indices, resize_image, resize_image_separate_z

TOL = 1e-6  # relative to the data range; measured ~1e-7


def _skimage(data: np.ndarray, shape, order: int = 3) -> np.ndarray:
    return np.stack([resize(data[c].astype(float), shape, order, mode="edge", anti_aliasing=False)
                     for c in range(data.shape[0])])


def _nnunet(data: np.ndarray, shape, axis, order=3, order_z=0, sep=True) -> np.ndarray:
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resample_data_or_seg(data, np.array(shape), False, axis, order, sep, order_z=order_z)


def _image(shape, dtype, layout, seed=0, offset=-30.0, scale=100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * scale + offset).astype(dtype)
    if layout == "F":
        data = np.asfortranarray(data)
    elif layout == "view":  # permuted spatial axes, as after nnU-Net's transpose
        data = np.ascontiguousarray(data.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)
    return data


def _assert_close(ours, ref, data, tol=TOL):
    assert ours.shape == ref.shape
    assert ours.dtype == np.float32
    span = float(np.max(data)) - float(np.min(data))
    err = float(np.max(np.abs(ours.astype(np.float64) - ref))) if ours.size else 0.0
    assert err <= tol * max(span, 1e-30), f"max abs diff {err:.3g} = {err / max(span, 1e-30):.3g} x range"


CASES = [
    ((2, 5, 6, 7), (7, 4, 9)),  # mixed up/down
    ((1, 12, 10, 9), (9, 8, 7)),  # downsampling
    ((1, 4, 5, 6), (8, 10, 12)),  # upsampling x2 (ties of the grid)
    ((1, 1, 6, 7), (3, 6, 5)),  # one-voxel axis
    ((1, 3, 1, 4), (3, 2, 4)),  # one-voxel axis, unchanged axes
    ((1, 8, 8, 8), (8, 8, 4)),  # one axis changes
    ((1, 9, 7, 5), (1, 1, 1)),  # to a single voxel
    ((1, 5, 6, 7), (5, 6, 7)),  # same shape
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F", "view"])
@pytest.mark.parametrize("in_shape,out_shape", CASES)
@pytest.mark.parametrize("order", [3, 1, 0])
def test_resize_image_matches_skimage(dtype, layout, in_shape, out_shape, order):
    data = _image(in_shape, dtype, layout)
    before = data.copy()
    ours = resize_image(data, out_shape, order)
    _assert_close(ours, _skimage(data, out_shape, order), data)
    assert ours.flags.c_contiguous
    np.testing.assert_array_equal(data, before)  # input untouched
    if order == 0 and dtype == np.float32:
        np.testing.assert_array_equal(ours, _skimage(data, out_shape, 0).astype(np.float32))


@pytest.mark.compat
@pytest.mark.parametrize("in_shape,out_shape", CASES)
@pytest.mark.parametrize("order", [3, 1])
def test_precise_is_bit_identical_to_nnunet(in_shape, out_shape, order):
    data = _image(in_shape, np.float32, "C", seed=3)
    ours = resize_image(data, out_shape, order, precise=True)
    ref = _nnunet(data, out_shape, None, order, sep=False)
    assert ref.dtype == np.float32
    if order == 3:
        np.testing.assert_array_equal(ours, ref)
    else:  # linear: exact halfway cases can round either way in float32 (scipy sums its taps in 3D order)
        assert np.mean(ours == ref) > 0.99
        _assert_close(ours, ref, data)


def test_one_dimensional_pass_is_bit_identical_to_scipy():
    """Along a single axis our float64 line arithmetic is scipy's; output float32 matches exactly."""
    x = np.random.default_rng(5).normal(size=23)
    for n_out in (7, 23 * 2, 31, 1):
        ref = resize(x, (n_out,), 3, mode="edge", anti_aliasing=False)
        ours = resize_image(x[None, None, None, :], (1, 1, n_out))[0, 0, 0]
        np.testing.assert_array_equal(ours, ref.astype(np.float32))


def test_large_offset_keeps_precision_relative_to_range():
    """Values in [1000, 1001]: float32 output rounding alone is ~3e-5 of the range; intermediates add nothing."""
    data = _image((1, 9, 11, 10), np.float32, "C", seed=1, offset=1000.0, scale=1.0)
    ref = _skimage(data, (13, 7, 12)).astype(np.float32)
    ulp = np.spacing(np.float32(1001.0))
    assert np.max(np.abs(resize_image(data, (13, 7, 12)) - ref)) <= ulp


def test_constant_and_clipping():
    data = np.full((1, 4, 5, 6), 2.5, np.float32)
    np.testing.assert_array_equal(resize_image(data, (7, 3, 9)), 2.5)
    step = np.zeros((1, 6, 6, 6), np.float32)
    step[:, 3:] = 1.0  # cubic overshoot must be clipped to [0, 1]
    out = resize_image(step, (11, 6, 6))
    assert out.min() == 0.0 and out.max() == 1.0
    _assert_close(out, _skimage(step, (11, 6, 6)), step)


def test_channels_are_clipped_independently():
    data = _image((3, 5, 6, 7), np.float32, "C", seed=2)
    data[1] *= 0.01
    data[2] += 500.0
    _assert_close(resize_image(data, (9, 4, 8)), _skimage(data, (9, 4, 8)), data)


@pytest.mark.compat
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F"])
@pytest.mark.parametrize("in_shape,out_shape,axis", [
    ((2, 5, 16, 17), (7, 14, 19), 0),  # z up
    ((1, 5, 16, 17), (3, 14, 19), 0),  # z down (only picked slices are resized)
    ((1, 16, 17, 5), (14, 19, 9), 2),
    ((1, 16, 17, 5), (14, 19, 2), 2),
    ((1, 16, 5, 17), (14, 9, 19), 1),
    ((1, 6, 16, 17), (6, 14, 19), 0),  # z unchanged
    ((1, 6, 16, 17), (9, 16, 17), 0),  # in-plane unchanged
    ((1, 1, 6, 7), (3, 6, 5), 0),  # single slice
    ((1, 4, 6, 7), (1, 3, 9), 0),  # to a single slice
])
@pytest.mark.parametrize("order,order_z", [(3, 0), (1, 0), (3, 1)])
def test_separate_z_matches_nnunet(dtype, layout, in_shape, out_shape, axis, order, order_z):
    data = _image(in_shape, dtype, layout, seed=4)
    ours = resize_image_separate_z(data, out_shape, axis, order, order_z)
    ref = _nnunet(data, out_shape, axis, order, order_z)
    _assert_close(ours, ref, data)
    precise = resize_image_separate_z(data, out_shape, axis, order, order_z, precise=True)
    if dtype == np.float32 and order == 3:
        np.testing.assert_array_equal(precise, ref)
    _assert_close(precise, ref, data)


@pytest.mark.compat
def test_separate_z_clips_each_slice_to_its_own_range():
    data = _image((1, 4, 8, 9), np.float32, "C", seed=6)
    data[0, 1] *= 0.1  # slices with very different ranges
    data[0, 2] = np.round(data[0, 2] / 50.0)  # a step image: cubic overshoot, clipped per slice
    ours = resize_image_separate_z(data, (6, 13, 5), 0)
    ref = _nnunet(data, (6, 13, 5), 0)
    _assert_close(ours, ref, data)
    for k, s in enumerate(nearest_indices(4, 6)):
        assert ours[0, k].min() >= data[0, s].min() and ours[0, k].max() <= data[0, s].max()


@pytest.mark.parametrize("n_in,n_out", [(2, 1), (4, 2), (3, 2), (5, 10), (6, 4), (7, 3), (1, 4), (9, 9), (40, 7)])
def test_nearest_indices_match_map_coordinates(n_in, n_out):
    coords = float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5  # nnU-Net's separate-z grid
    ref = map_coordinates(np.arange(n_in, dtype=float), coords[None], order=0, mode="nearest")
    np.testing.assert_array_equal(nearest_indices(n_in, n_out), ref.astype(np.int64))


def test_exact_half_coordinates_round_up():
    # (k + 0.5) * 2 - 0.5 = 0.5, 2.5: scipy takes floor(c + 0.5), i.e. the upper neighbour
    np.testing.assert_array_equal(nearest_indices(4, 2), [1, 3])
    np.testing.assert_array_equal(nearest_indices(2, 1), [1])


def test_axis_taps_weights_sum_to_one():
    for order in (0, 1, 3):
        idx, w = axis_taps(13, 29, order)
        assert idx.shape == w.shape == (29, order + 1)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-15)
        assert idx.min() >= 0 and idx.max() < 13 + (24 if order == 3 else 0)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((4, 5, 6), np.float32), "4 axes"),
    (np.zeros((1, 4, 5, 6), np.int16), "float32 or float64"),
    (np.zeros((0, 4, 5, 6), np.float32), "at least one channel"),
    ([[[[1.0]]]], "numpy array"),
])
def test_validation(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        resize_image(bad, (2, 2, 2))


def test_validation_of_arguments():
    data = np.zeros((1, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="3 positive sizes"):
        resize_image(data, (2, 2))
    with pytest.raises(ValueError, match="3 positive sizes"):
        resize_image(data, (2, 0, 2))
    with pytest.raises(ValueError, match="order"):
        resize_image(data, (2, 2, 2), order=2)
    with pytest.raises(ValueError, match="axis"):
        resize_image_separate_z(data, (2, 2, 2), axis=3)
    with pytest.raises(ValueError, match="order_z"):
        resize_image_separate_z(data, (2, 2, 2), axis=0, order_z=3)


@settings(max_examples=15, deadline=None)
@given(
    in_shape=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
    out_shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    order=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(in_shape, out_shape, order, seed):
    data = _image((1, *in_shape), np.float32, "C", seed=seed)
    _assert_close(resize_image(data, out_shape, order), _skimage(data, out_shape, order), data)


@pytest.mark.compat
@settings(max_examples=10, deadline=None)
@given(
    in_shape=st.tuples(st.integers(1, 6), st.integers(2, 8), st.integers(2, 8)),
    out_shape=st.tuples(st.integers(1, 8), st.integers(1, 9), st.integers(1, 9)),
    axis=st.sampled_from([0, 2]),
    seed=st.integers(0, 2**16),
)
def test_property_separate_z(in_shape, out_shape, axis, seed):
    if axis == 2:
        in_shape, out_shape = in_shape[::-1], out_shape[::-1]
    data = _image((1, *in_shape), np.float32, "C", seed=seed)
    _assert_close(resize_image_separate_z(data, out_shape, axis), _nnunet(data, out_shape, axis), data)


def test_kernels_run_without_jit():
    """The kernels stay valid Python (NUMBA_DISABLE_JIT=1) and give the same result."""
    code = (
        "import numpy as np\n"
        "from skimage.transform import resize\n"
        "from nnfast.native.resample import resize_image, resize_image_separate_z\n"
        "d = np.random.default_rng(0).random((1, 3, 4, 5)).astype(np.float32)\n"
        "for order in (3, 1, 0):\n"
        "    a = resize_image(d, (4, 3, 7), order)\n"
        "    b = resize(d[0].astype(float), (4, 3, 7), order, mode='edge', anti_aliasing=False)\n"
        "    assert np.abs(a[0] - b).max() < 1e-6, order\n"
        "s = resize_image_separate_z(d, (2, 5, 3), 2)\n"
        "assert s.shape == (1, 2, 5, 3)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
