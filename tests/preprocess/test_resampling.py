"""nnU-Net-level resampling API (``nnfast.preprocess.resampling``) against nnunetv2 2.8.1's functions."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.errors import GeometryError, NnfastError
from nnfast.preprocess import resampling as ours

nn = pytest.importorskip("nnunetv2.preprocessing.resampling.default_resampling")

pytestmark = pytest.mark.compat

SPACINGS = [
    (1.0, 1.0, 1.0),
    (5.0, 0.8, 0.8),  # anisotropic, axis 0
    (0.8, 0.8, 5.0),  # anisotropic, axis 2
    (0.7, 3.0, 0.7),  # axis 1, ratio not above 3
    (0.7, 2.2, 0.7),
    (0.24, 1.25, 1.25),  # two low-resolution axes
    (3.0, 3.0, 3.0),
    (2.5, 0.75, 0.75),
    (3.6, 1.2, 1.0),  # ratio exactly 3.6
    (3.0, 1.0, 1.0),  # ratio exactly 3: not separate
]


def _theirs(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _close(a, b, data, tol=1e-6):
    assert a.shape == b.shape and a.dtype == b.dtype
    span = float(np.max(data)) - float(np.min(data))
    assert float(np.max(np.abs(a.astype(np.float64) - b))) <= tol * span


def test_compute_new_shape_rounds_half_to_even():
    assert ours.compute_new_shape((129, 10, 10), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0)).tolist() == [64, 10, 10]
    assert ours.compute_new_shape((131, 10, 10), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0)).tolist() == [66, 10, 10]
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = rng.integers(1, 600, 3)
        old = rng.choice([0.5, 0.7, 0.78125, 0.8, 1.0, 1.25, 2.5, 3.0, 5.0], 3)
        new = rng.choice([0.5, 0.7, 0.78125, 0.8, 1.0, 1.25, 2.5, 3.0, 5.0], 3)
        np.testing.assert_array_equal(ours.compute_new_shape(shape, old, new), nn.compute_new_shape(shape, old, new))
    with pytest.raises(GeometryError):
        ours.compute_new_shape((1, 2, 3), (1.0, 1.0), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacing_rules(spacing):
    for thr in (3, 2, 5):
        assert ours.get_do_separate_z(spacing, thr) == nn.get_do_separate_z(spacing, thr)
    np.testing.assert_array_equal(ours.get_lowres_axis(spacing), nn.get_lowres_axis(spacing))


@pytest.mark.parametrize("current,new", list(itertools.product(SPACINGS, SPACINGS[:6])))
@pytest.mark.parametrize("force", [None, True, False])
def test_determine_do_sep_z_and_axis(current, new, force):
    expected = nn.determine_do_sep_z_and_axis(force, current, new, 3)
    got = ours.determine_do_sep_z_and_axis(force, current, new, 3)
    assert got[0] == expected[0]
    assert got[1] == (None if expected[1] is None else int(expected[1]))
    assert got[1] is None or isinstance(got[1], int)


def _case(shape, seed=0, channels=1):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(channels, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), np.int8)
    sl = tuple(slice(s // 4, s - s // 4) for s in shape)
    seg[0][sl] = 1
    sl = tuple(slice(s // 3, s - s // 3 + 1) for s in shape)
    seg[0][sl] = 2
    seg[0, : max(1, shape[0] // 5)] = -1  # outside the nonzero region
    seg[0, :, :1] = -1
    data[:, seg[0] == -1] = 0.0
    return data, seg


RESAMPLE_CASES = [
    # shape, current spacing, new spacing, force_separate_z
    ((12, 20, 18), (1.0, 1.0, 1.0), (1.25, 1.25, 1.25), None),  # CT-like, coarser, non-separate
    ((12, 20, 18), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), None),  # x2 finer: ties in the label rule
    ((8, 20, 18), (5.0, 0.8, 0.8), (4.0, 0.7, 0.7), None),  # separate z on axis 0, z changes
    ((8, 20, 18), (5.0, 0.8, 0.8), (5.0, 0.9, 0.9), None),  # separate z, z unchanged
    ((20, 18, 7), (0.8, 0.8, 5.0), (0.7, 0.7, 6.0), None),  # separate z on axis 2, z shrinks
    ((12, 14, 16), (1.0, 1.0, 1.0), (3.5, 1.0, 1.0), None),  # new spacing anisotropic -> axis from new
    ((12, 14, 16), (1.0, 1.0, 1.0), (1.1, 0.9, 1.3), True),  # forced separate z (two lowres axes -> off)
    ((8, 20, 18), (5.0, 0.8, 0.8), (4.0, 0.7, 0.7), False),  # forced off
    ((1, 20, 18), (5.0, 0.8, 0.8), (5.0, 0.6, 0.6), None),  # single slice
]


@pytest.mark.parametrize("shape,current,new,force", RESAMPLE_CASES)
def test_resample_data_matches_nnunet(shape, current, new, force):
    data, _ = _case(shape, channels=2)
    new_shape = nn.compute_new_shape(shape, current, new)
    ref = _theirs(nn.resample_data_or_seg_to_shape, data, new_shape, current, new, False, 3, 0, force)
    got = ours.resample_data_or_seg_to_shape(data, new_shape, current, new, False, 3, 0, force)
    if tuple(new_shape) == shape:
        assert got is data and ref is data
        return
    _close(got, ref, data)
    precise = ours.resample_data_or_seg_to_shape(data, new_shape, current, new, False, 3, 0, force, precise=True)
    np.testing.assert_array_equal(precise, ref)


@pytest.mark.parametrize("shape,current,new,force", RESAMPLE_CASES)
def test_resample_seg_matches_nnunet(shape, current, new, force):
    _, seg = _case(shape, seed=1)
    new_shape = nn.compute_new_shape(shape, current, new)
    ref = _theirs(nn.resample_data_or_seg_to_shape, seg, new_shape, current, new, True, 1, 0, force)
    got = ours.resample_data_or_seg_to_shape(seg, new_shape, current, new, True, 1, 0, force)
    assert got.dtype == ref.dtype == np.int8
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shape,current,new,force", RESAMPLE_CASES[:5])
def test_probabilities_order_1(shape, current, new, force):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), size=shape).transpose(3, 0, 1, 2).astype(np.float32)
    new_shape = nn.compute_new_shape(shape, current, new)
    ref = _theirs(nn.resample_data_or_seg_to_shape, probs, new_shape, current, new, False, 1, 0, force)
    _close(ours.resample_data_or_seg_to_shape(probs, new_shape, current, new, False, 1, 0, force), ref, probs)


def test_dtypes_follow_the_input():
    data, seg = _case((6, 8, 7))
    args = ((9, 5, 7), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    d64 = data.astype(np.float64)
    got = ours.resample_data_or_seg_to_shape(d64, *args)
    ref = _theirs(nn.resample_data_or_seg_to_shape, d64, *args)
    assert got.dtype == ref.dtype == np.float64
    _close(got, ref, d64)
    for dtype in (np.int16, np.int32, np.int64, np.float32):
        s = seg.astype(dtype)
        got = ours.resample_data_or_seg_to_shape(s, *args, is_seg=True, order=1)
        ref = _theirs(nn.resample_data_or_seg_to_shape, s, *args, is_seg=True, order=1)
        assert got.dtype == ref.dtype == dtype
        np.testing.assert_array_equal(got, ref)
    fortran = np.asfortranarray(seg)
    np.testing.assert_array_equal(ours.resample_data_or_seg_to_shape(fortran, *args, is_seg=True, order=1),
                                  _theirs(nn.resample_data_or_seg_to_shape, seg, *args, is_seg=True, order=1))


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    data, _ = _case((6, 8, 7))
    got = ours.resample_data_or_seg_to_shape(torch.from_numpy(data), (9, 5, 7), (1, 1, 1), (1, 1, 1))
    ref = _theirs(nn.resample_data_or_seg_to_shape, torch.from_numpy(data), (9, 5, 7), (1, 1, 1), (1, 1, 1))
    _close(got, ref, data)


def test_order_0_seg_and_order_z_1_data():
    data, seg = _case((8, 20, 18), seed=3)
    args = ((10, 15, 13), (5.0, 0.8, 0.8), (4.0, 1.0, 1.0))
    np.testing.assert_array_equal(
        ours.resample_data_or_seg_to_shape(seg, *args, is_seg=True, order=0, force_separate_z=None),
        _theirs(nn.resample_data_or_seg_to_shape, seg, *args, is_seg=True, order=0, force_separate_z=None))
    _close(ours.resample_data_or_seg_to_shape(data, *args, order=3, order_z=1, force_separate_z=None),
           _theirs(nn.resample_data_or_seg_to_shape, data, *args, order=3, order_z=1, force_separate_z=None), data)


def test_to_spacing_matches_nnunet():
    data, seg = _case((8, 20, 18), seed=4)
    for arr, is_seg, order in ((data, False, 3), (seg, True, 1)):
        got = ours.resample_data_or_seg_to_spacing(arr, (5.0, 0.8, 0.8), (4.0, 0.7, 0.7), is_seg, order,
                                                   force_separate_z=None)
        ref = _theirs(nn.resample_data_or_seg_to_spacing, arr, (5.0, 0.8, 0.8), (4.0, 0.7, 0.7), is_seg, order,
                      force_separate_z=None)
        if is_seg:
            np.testing.assert_array_equal(got, ref)
        else:
            _close(got, ref, arr)


def test_unsupported_combinations_raise():
    data, seg = _case((8, 20, 18))
    args = ((10, 15, 13), (5.0, 0.8, 0.8), (4.0, 1.0, 1.0))
    cases = [
        dict(data=data, order=2),
        dict(data=data, order=5),
        dict(data=data, order=3, order_z=3, force_separate_z=None),
        dict(data=seg, is_seg=True, order=3),
        dict(data=seg, is_seg=True, order=1, order_z=1, force_separate_z=None),
        dict(data=seg.astype(np.int16), is_seg=False),  # integer image
        dict(data=seg.astype(np.float32) + 0.5, is_seg=True, order=1),  # fractional labels
    ]
    for kw in cases:
        arr = kw.pop("data")
        with pytest.raises(ours.UnsupportedResamplingError) as info:
            ours.resample_data_or_seg_to_shape(arr, *args, **kw)
        assert isinstance(info.value, NotImplementedError) and isinstance(info.value, NnfastError)
    # order_z is irrelevant when z does not change, as in nnU-Net
    ours.resample_data_or_seg_to_shape(seg, (8, 15, 13), *args[1:], is_seg=True, order=1, order_z=1,
                                       force_separate_z=None)
    with pytest.raises(GeometryError):
        ours.resample_data_or_seg_to_shape(data[0], *args)
    with pytest.raises(GeometryError):
        ours.resample_data_or_seg_to_shape(data, (10, 15), *args[1:])


@settings(max_examples=12, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 8), st.integers(3, 14), st.integers(3, 14)),
    current=st.tuples(*[st.sampled_from([0.7, 0.8, 1.0, 2.5, 4.0, 5.0])] * 3),
    new=st.tuples(*[st.sampled_from([0.7, 0.8, 1.0, 1.25, 2.0, 4.0])] * 3),
    force=st.sampled_from([None, False, True]),
    seed=st.integers(0, 2**16),
)
def test_property_against_nnunet(shape, current, new, force, seed):
    data, seg = _case(shape, seed=seed)
    new_shape = nn.compute_new_shape(shape, current, new)
    if new_shape.min() < 1 or np.prod(new_shape) > 4000:
        return
    ref_seg = _theirs(nn.resample_data_or_seg_to_shape, seg, new_shape, current, new, True, 1, 0, force)
    np.testing.assert_array_equal(ours.resample_data_or_seg_to_shape(seg, new_shape, current, new, True, 1, 0, force),
                                  ref_seg)
    ref = _theirs(nn.resample_data_or_seg_to_shape, data, new_shape, current, new, False, 3, 0, force)
    _close(ours.resample_data_or_seg_to_shape(data, new_shape, current, new, False, 3, 0, force), ref, data)


@pytest.mark.parametrize("channels,order,offset", [(1, 3, 0.0), (2, 3, 1000.0), (1, 1, 0.0), (2, 0, 5.0)])
@pytest.mark.parametrize("in_shape,out_shape", [((9, 14, 11), (12, 17, 13)), ((16, 10, 12), (11, 15, 12)),
                                                ((5, 6, 7), (5, 3, 9))])
def test_consuming_image_resampling_is_bit_identical(channels, order, offset, in_shape, out_shape):
    """The worker's resampling that frees its input early gives the same bits as the ordinary call."""
    from nnfast.preprocess.resampling import resample_data_or_seg_to_shape, resample_image_consuming

    rng = np.random.default_rng(sum(in_shape) + channels + order)
    data = (offset + rng.normal(size=(channels, *in_shape))).astype(np.float32)
    spacing = [1.0, 1.0, 1.0]
    expected = resample_data_or_seg_to_shape(data.copy(), out_shape, spacing, spacing, order=order)
    holder = [data.copy()]
    got = resample_image_consuming(holder, out_shape, spacing, spacing, order=order)
    assert holder == [] and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_consuming_image_resampling_separate_z_delegates():
    from nnfast.preprocess.resampling import resample_data_or_seg_to_shape, resample_image_consuming

    data = np.random.default_rng(0).normal(size=(1, 6, 20, 20)).astype(np.float32)
    args = ((9, 24, 24), [4.0, 0.8, 0.8], [2.0, 0.7, 0.7])
    expected = resample_data_or_seg_to_shape(data, *args, order=3, order_z=0, force_separate_z=None)
    got = resample_image_consuming([data.copy()], *args, order=3, order_z=0, force_separate_z=None)
    np.testing.assert_array_equal(got, expected)
