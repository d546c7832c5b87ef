"""crop_to_nonzero against nnU-Net's, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nnfast.preprocess.cropping import crop_to_nonzero

DTYPES = (np.uint8, np.int16, np.float32, np.float64)


def ct_like(rng, shape, dtype, n_channels=1):
    """Body-like blob of nonzero values in a zero background, with enclosed zero-valued cavities."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.3, 0.3, 3)[:, None, None, None]
    radius = np.sqrt(((grid - centre) ** 2 / rng.uniform(0.2, 0.6, 3)[:, None, None, None] ** 2).sum(0))
    body = radius < 1
    data = np.zeros((n_channels, *shape), np.float64)
    data[:, body] = rng.integers(1, 100, (n_channels, int(body.sum())))
    data[:, radius < 0.3] = 0  # enclosed cavity: must be filled in the mask
    data[:, rng.random(shape) < 0.02] = 0  # scattered zeros inside the body: holes
    return data.astype(dtype)


def reference(data, seg, nonzero_label=-1):
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero as nn_crop

    return nn_crop(data.copy(), None if seg is None else seg.copy(), nonzero_label)


@pytest.mark.compat
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("with_seg", [False, True])
def test_matches_nnunet_bit_for_bit(dtype, order, with_seg):
    rng = np.random.default_rng([DTYPES.index(dtype), order == "F", with_seg])
    for shape in [(12, 17, 15), (1, 16, 14), (9, 1, 11)]:
        data = ct_like(rng, shape, dtype, n_channels=2)
        data = np.asarray(data, order=order)
        seg = None
        if with_seg:
            seg = rng.integers(0, 3, (1, *shape)).astype(np.int16 if dtype != np.float32 else np.float32)
            seg = np.asarray(seg, order=order)
        data_before = data.copy()
        seg_before = None if seg is None else seg.copy()
        d_ref, s_ref, b_ref = reference(data, seg)
        d, s, b = crop_to_nonzero(data, seg)
        assert b == b_ref
        assert d.dtype == d_ref.dtype and s.dtype == s_ref.dtype
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(s, s_ref)
        np.testing.assert_array_equal(data, data_before)  # caller's arrays untouched
        if seg is not None:
            np.testing.assert_array_equal(seg, seg_before)
            assert np.shares_memory(d, data)  # data crop is a view, like nnU-Net's


@pytest.mark.compat
def test_all_background_and_transposed_view():
    rng = np.random.default_rng(7)
    data = np.zeros((1, 4, 5, 6), np.float32)
    seg = np.zeros((1, 4, 5, 6), np.int8)
    for s in (None, seg):
        d_ref, s_ref, b_ref = reference(data, s)
        d, out, b = crop_to_nonzero(data, s)
        assert b == b_ref == [[0, 4], [0, 5], [0, 6]]
        np.testing.assert_array_equal(out, s_ref)
        assert (out == -1).all()
    # nnU-Net crops after transposing (a non-contiguous view)
    data = ct_like(rng, (10, 12, 14), np.float32).transpose(0, 3, 1, 2)
    seg = rng.integers(0, 2, (1, 10, 12, 14)).astype(np.float32).transpose(0, 3, 1, 2)
    d_ref, s_ref, b_ref = reference(data, seg)
    d, out, b = crop_to_nonzero(data, seg)
    assert b == b_ref
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(out, s_ref)


@pytest.mark.compat
def test_multichannel_seg_and_other_label():
    rng = np.random.default_rng(8)
    data = ct_like(rng, (8, 9, 10), np.int16)
    seg = rng.integers(0, 3, (2, 8, 9, 10)).astype(np.int16)
    d_ref, s_ref, b_ref = reference(data, seg, nonzero_label=-3)
    d, s, b = crop_to_nonzero(data, seg, nonzero_label=-3)
    assert b == b_ref
    np.testing.assert_array_equal(s, s_ref)


def test_unsigned_seg_is_rejected_with_advice():
    data = np.ones((1, 2, 2, 2), np.float32)
    data[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="signed"):
        crop_to_nonzero(data, np.zeros((1, 2, 2, 2), np.uint8))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="seg must have shape"):
        crop_to_nonzero(np.ones((1, 2, 3, 4)), np.zeros((1, 2, 3, 5), np.int8))
    with pytest.raises(ValueError, match=r"\(c, x, y, z\)"):
        crop_to_nonzero(np.ones((2, 3, 4)))


@given(
    arrays(np.int16, st.tuples(st.integers(1, 2), *[st.integers(1, 7)] * 3), elements=st.integers(-2, 2)),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_property_crop_then_pad_restores(data, seed):
    """Cropping loses no nonzero voxel: padding the crop back with zeros restores the input exactly."""
    seg = np.random.default_rng(seed).integers(0, 3, (1, *data.shape[1:])).astype(np.int8)
    d, s, bbox = crop_to_nonzero(data, seg)
    slicer = (slice(None), *(slice(a, b) for a, b in bbox))
    restored = np.zeros_like(data)
    restored[slicer] = d
    np.testing.assert_array_equal(restored, data)
    # labels inside the box are kept except background outside the mask, which is -1
    kept = seg[slicer]
    assert ((s == kept) | ((kept == 0) & (s == -1))).all()
    # every -1 lies outside the nonzero region, so the data there are 0 in every channel
    assert (d[:, s[0] == -1] == 0).all()
