"""Augmentation kernels against slow references: torch ``grid_sample`` / ``interpolate`` / ``conv``, numpy, scipy and
batchgeneratorsv2's own functions."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d, gaussian_filter
from torch.nn.functional import grid_sample, interpolate

from nnfast.data.augment_params import rotation_matrix
from nnfast.native import augment as K
from nnfast.native import augment_intensity as KI

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- references
def positions(matrix, centre, patch, flip):
    """Slow: region coordinates sampled by every output voxel, (*patch, nd) float64."""
    axes = [np.arange(p) - (p - 1) / 2.0 for p in patch]
    axes = [-a if f else a for a, f in zip(axes, flip)]
    o = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    return o @ np.asarray(matrix, np.float64).T + np.asarray(centre, np.float64)


def torch_bilinear(img, pos):
    """grid_sample(bilinear, zeros, align_corners=False) of (c, *R) at region coordinates ``pos`` (*P, nd)."""
    shape = img.shape[1:]
    g = np.empty_like(pos)
    for d, n in enumerate(shape):
        g[..., d] = (2.0 * pos[..., d] + 1.0) / n - 1.0
    grid = torch.from_numpy(np.ascontiguousarray(g[..., ::-1])).float()
    return grid_sample(torch.from_numpy(img)[None], grid[None], mode="bilinear", padding_mode="zeros",
                       align_corners=False)[0].numpy()


def vote_reference(seg, pos, pad=-1):
    """Slow, per label: one-hot bilinear scores of the padded label map (x1000, rounded to float16), top score
    wins (smallest label on ties) unless the nearest neighbour's label has the top score."""
    labels = np.unique(np.concatenate([np.unique(seg), [pad]]))
    shape = seg.shape
    fl = np.floor(pos)
    t = pos - fl
    base = fl.astype(np.int64)
    scores = np.zeros((len(labels), *pos.shape[:-1]))
    nd = len(shape)
    for corner in np.ndindex(*(2,) * nd):
        idx = [base[..., d] + corner[d] for d in range(nd)]
        w = np.ones(pos.shape[:-1])
        ok = np.ones(pos.shape[:-1], bool)
        for d in range(nd):
            w *= t[..., d] if corner[d] else 1.0 - t[..., d]
            ok &= (idx[d] >= 0) & (idx[d] < shape[d])
        lab = np.full(pos.shape[:-1], pad, np.int64)
        lab[ok] = seg[tuple(i[ok] for i in idx)]
        for li, lv in enumerate(labels):
            scores[li] += np.where(lab == lv, w, 0.0)
    scores = (scores * 1000.0).astype(np.float16).astype(np.float64)
    best = scores.max(0)
    winner = labels[np.argmax(scores, 0)]
    nn_idx = [np.rint(pos[..., d]).astype(np.int64) for d in range(nd)]
    ok = np.ones(pos.shape[:-1], bool)
    for d in range(nd):
        ok &= (nn_idx[d] >= 0) & (nn_idx[d] < shape[d])
    nn = np.full(pos.shape[:-1], pad, np.int64)
    nn[ok] = seg[tuple(i[ok] for i in nn_idx)]
    nn_score = np.take_along_axis(scores, np.searchsorted(labels, nn)[None], 0)[0]
    return np.where(nn_score == best, nn, winner)


def blob_labels(rng, shape, n_labels):
    f = gaussian_filter(rng.standard_normal((n_labels, *shape)), 1.5, axes=tuple(range(1, len(shape) + 1)))
    return np.argmax(f, 0).astype(np.int16) - 1  # labels -1 .. n_labels - 2


# --------------------------------------------------------------------------------------------- warps
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("seg_dtype", [np.int8, np.int16])
def test_warp_3d_matches_grid_sample_and_label_vote(seed, seg_dtype):
    rng = np.random.default_rng(seed)
    region = (14 + seed, 17, 19 - seed)
    patch = (9, 11 + seed, 10)
    img = rng.standard_normal((2, *region)).astype(np.float32)
    seg = blob_labels(rng, region, 4).astype(seg_dtype)[None]
    a = rotation_matrix(rng.uniform(-0.6, 0.6, 3), [rng.uniform(0.7, 1.4)] * 3)
    centre = np.array(region) / 2 - 0.5 + rng.uniform(-3, 3, 3)  # reaches outside the region on some sides
    flip = tuple(bool(v) for v in rng.integers(0, 2, 3))
    out_img, out_seg = K.warp_3d(img, seg, a, centre, patch, flip)
    pos = positions(a, centre, patch, flip)
    np.testing.assert_allclose(out_img, torch_bilinear(img, pos), atol=1e-5)
    assert out_seg.dtype == seg_dtype
    np.testing.assert_array_equal(out_seg[0], vote_reference(seg[0], pos))


@pytest.mark.parametrize("seed", range(3))
def test_warp_2d_stack_matches_grid_sample_per_slice(seed):
    rng = np.random.default_rng(10 + seed)
    n, region, patch = 3, (21, 18), (13, 16)
    img = rng.standard_normal((2, n, *region)).astype(np.float32)
    seg = np.stack([blob_labels(rng, region, 3) for _ in range(n)])[None]
    a = rotation_matrix([0.0, rng.uniform(-np.pi, np.pi)], [rng.uniform(0.7, 1.4)] * 2)
    centre = np.array(region) / 2 - 0.5 + rng.uniform(-2, 2, 2)
    flip = (bool(seed % 2), True, False)
    out_img, out_seg = K.warp_2d(img, seg, a, centre, patch, flip)
    pos = positions(a, centre, patch, flip[1:])
    for s in range(n):
        o = n - 1 - s if flip[0] else s
        np.testing.assert_allclose(out_img[:, o], torch_bilinear(img[:, s], pos), atol=1e-5)
        np.testing.assert_array_equal(out_seg[0, o], vote_reference(seg[0, s], pos))


@pytest.mark.parametrize("nd", [2, 3])
def test_warp_grid_larger_than_region(nd):
    """Scaled-up grids off-centre: a ring of output voxels with some neighbours outside the region and a large part
    with all of them outside (the padding fast path) equal grid_sample / the label vote."""
    rng = np.random.default_rng(30 + nd)
    region = (9, 14, 15)[3 - nd:] if nd == 2 else (9, 14, 15)
    patch = (8, 12, 13)[3 - nd:]
    img = rng.standard_normal((1, 3, *region[-2:]) if nd == 2 else (1, *region)).astype(np.float32)
    if nd == 2:
        seg = np.stack([blob_labels(rng, region[-2:], 3) for _ in range(3)])[None]
        a = rotation_matrix([0.0, 0.5], [1.4] * 2)
        centre = np.array(region[-2:]) / 2 - 0.5 + np.array([3.0, -2.5])
        out_img, out_seg = K.warp_2d(img, seg, a, centre, patch, (False, True, False))
        pos = positions(a, centre, patch, (True, False))
        pairs = [(out_img[:, n], out_seg[0, n], img[:, n], seg[0, n]) for n in range(3)]
    else:
        seg = blob_labels(rng, region, 3)[None]
        a = rotation_matrix((0.2, -0.3, 0.4), (1.4,) * 3)
        centre = np.array(region) / 2 - 0.5 + np.array([2.0, 3.0, -3.5])
        out_img, out_seg = K.warp_3d(img, seg, a, centre, patch, (False, True, False))
        pos = positions(a, centre, patch, (False, True, False))
        pairs = [(out_img, out_seg[0], img, seg[0])]
    inside = np.ones(pos.shape[:-1], bool)
    for d, n in enumerate(img.shape[-nd:]):
        inside &= (pos[..., d] > -1) & (pos[..., d] < n)
    assert 0.1 < (~inside).mean() < 0.9  # both paths are exercised
    for o_img, o_seg, i_img, i_seg in pairs:
        np.testing.assert_allclose(o_img, torch_bilinear(i_img, pos), atol=1e-5)
        np.testing.assert_array_equal(o_seg, vote_reference(i_seg, pos))
        assert (o_img[..., ~inside] == 0).all() and (o_seg[~inside] == -1).all()


@pytest.mark.parametrize("layout", ["F", "strided"])
def test_warp_accepts_any_layout(layout):
    rng = np.random.default_rng(8)
    img = rng.standard_normal((2, 12, 13, 14)).astype(np.float32)
    seg = blob_labels(rng, (12, 13, 14), 3)[None]
    a = rotation_matrix((0.2, -0.3, 0.1), (0.9,) * 3)
    ref = K.warp_3d(img, seg, a, (6.0, 6.5, 7.0), (7, 8, 9), (False, True, False))
    if layout == "F":
        img2, seg2 = np.asfortranarray(img), np.asfortranarray(seg)
    else:
        big_i = np.zeros((2, 24, 13, 14), np.float32)
        big_s = np.zeros((1, 24, 13, 14), np.int16)
        big_i[:, ::2], big_s[:, ::2] = img, seg
        img2, seg2 = big_i[:, ::2], big_s[:, ::2]
    out = K.warp_3d(img2, seg2, a, (6.0, 6.5, 7.0), (7, 8, 9), (False, True, False))
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])


@pytest.mark.parametrize("region", [(1, 6, 7), (5, 1, 7), (4, 6, 1), (1, 1, 1)])
def test_warp_one_voxel_axes(region):
    rng = np.random.default_rng(9)
    img = rng.standard_normal((1, *region)).astype(np.float32)
    seg = rng.integers(0, 3, (1, *region)).astype(np.int8)
    a = rotation_matrix((0.3, 0.2, -0.1), (1.1,) * 3)
    centre = np.array(region) / 2 - 0.5
    patch = (3, 4, 5)
    out_img, out_seg = K.warp_3d(img, seg, a, centre, patch)
    pos = positions(a, centre, patch, (False,) * 3)
    np.testing.assert_allclose(out_img, torch_bilinear(img, pos), atol=1e-5)
    np.testing.assert_array_equal(out_seg[0], vote_reference(seg[0], pos))
    out2, seg2 = K.warp_2d(img, seg, a[1:, 1:], centre[1:], patch[1:])
    pos2 = positions(a[1:, 1:], centre[1:], patch[1:], (False,) * 2)
    for n in range(region[0]):
        np.testing.assert_allclose(out2[:, n], torch_bilinear(img[:, n], pos2), atol=1e-5)
        np.testing.assert_array_equal(seg2[0, n], vote_reference(seg[0, n], pos2))


def test_warp_identity_is_a_crop_and_far_outside_is_padding():
    rng = np.random.default_rng(3)
    img = rng.standard_normal((1, 8, 9, 10)).astype(np.float32)
    seg = rng.integers(0, 3, (1, 8, 9, 10)).astype(np.int16)
    # integer centre offsets with identity: exact crop (weights 1/0)
    out_img, out_seg = K.warp_3d(img, seg, np.eye(3), (3.5, 4.0, 4.5), (4, 5, 6))
    np.testing.assert_array_equal(out_img, img[:, 2:6, 2:7, 2:8])
    np.testing.assert_array_equal(out_seg, seg[:, 2:6, 2:7, 2:8])
    # a patch entirely outside the region: zeros and the padding label
    out_img, out_seg = K.warp_3d(img, seg, np.eye(3), (30.0, 4.0, 4.5), (4, 5, 6))
    assert (out_img == 0).all() and (out_seg == -1).all()
    out_img, out_seg = K.warp_2d(img, seg, np.eye(2), (4.0, -20.0), (5, 6))
    assert (out_img == 0).all() and (out_seg == -1).all()


def test_warp_validates_inputs():
    img = np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="float32"):
        K.warp_3d(img.astype(np.float64), None, np.eye(3), (1, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match="seg spatial shape"):
        K.warp_3d(img, np.zeros((1, 4, 4, 3), np.int8), np.eye(3), (1, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match="matrix"):
        K.warp_3d(img, None, np.eye(2), (1, 1), (2, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.int16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000])
def test_touch_sums_one_element_per_step(dtype, n):
    """The rotated 2D warp's cache warm-up reads ``flat[::step]``; its sum is returned so the reads stay."""
    flat = (np.arange(n) % 7 - 3).astype(dtype)
    step = 64 // flat.itemsize
    assert K._touch(flat, step) == flat[::step].astype(np.float64).sum()


@pytest.mark.parametrize("angle", [0.0, 0.3, np.pi / 4, 2.0])
def test_warp_2d_large_stack_rotated_and_not(angle):
    """A dummy-2D-like stack (several slices, a patch of many rows) on both paths of the 2D warp: unrotated grids
    skip the cache warm-up, rotated ones run it; both equal grid_sample / the label vote on every slice."""
    rng = np.random.default_rng(21)
    n, region, patch = 4, (61, 58), (40, 37)
    img = rng.standard_normal((1, n, *region)).astype(np.float32)
    seg = np.stack([blob_labels(rng, region, 3) for _ in range(n)])[None]
    a = rotation_matrix([0.0, angle], [1.1] * 2)
    centre = np.array(region) / 2 - 0.5 + 1.25
    flip = (True, False, True)
    out_img, out_seg = K.warp_2d(img, seg, a, centre, patch, flip)
    pos = positions(a, centre, patch, flip[1:])
    for s in range(n):  # float32 sums in another order than torch's: a few pixels 1e-5 apart
        np.testing.assert_allclose(out_img[:, n - 1 - s], torch_bilinear(img[:, s], pos), atol=3e-5)
        np.testing.assert_array_equal(out_seg[0, n - 1 - s], vote_reference(seg[0, s], pos))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_copy_box_matches_numpy_slicing(dtype, seed):
    """The crop kernel against numpy's (slow, negative-stride) slicing: random boxes, every flip combination."""
    rng = np.random.default_rng(seed)
    src = (rng.integers(-100, 100, (2, 7, 9, 33)) if np.dtype(dtype).kind in "iu" else
           rng.standard_normal((2, 7, 9, 33))).astype(dtype)
    dst_shape = (2, 6, 8, 40)
    ext = [int(rng.integers(1, min(a, b) + 1)) for a, b in zip(src.shape[1:], dst_shape[1:])]
    lo_s = [int(rng.integers(0, n - e + 1)) for n, e in zip(src.shape[1:], ext)]
    lo_d = [int(rng.integers(0, n - e + 1)) for n, e in zip(dst_shape[1:], ext)]
    flip = tuple(bool(v) for v in rng.integers(0, 2, 3)) if seed else (True, True, True)
    dst = np.full(dst_shape, 7, dtype)
    K.copy_box(src, dst, lo_s, lo_d, ext, flip)
    ref = np.full(dst_shape, 7, dtype)
    box = src[(slice(None), *(slice(a, a + e) for a, e in zip(lo_s, ext)))]
    ref[(slice(None), *(slice(a, a + e) for a, e in zip(lo_d, ext)))] = box[
        (slice(None), *(slice(None, None, -1) if f else slice(None) for f in flip))]
    np.testing.assert_array_equal(dst, ref)


def test_copy_box_validates():
    src = np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        K.copy_box(src, np.zeros((1, 3, 4, 4), np.float32), (0, 0, 0), (0, 0, 0), (4, 4, 4))
    with pytest.raises(ValueError, match="one dtype"):
        K.copy_box(src, np.zeros((1, 4, 4, 4), np.int16), (0, 0, 0), (0, 0, 0), (4, 4, 4))


@pytest.mark.parametrize("src_dtype, dst_dtype", [(np.float32, np.float32), (np.int8, np.int16), (np.int16, np.int16),
                                                (np.int8, np.int8), (np.uint8, np.int16), (np.float64, np.float32)])
@pytest.mark.parametrize("seed", range(6))
def test_copy_chunk_matches_numpy_slicing(src_dtype, dst_dtype, seed):
    """The store reader's chunk copy against numpy's slicing and casting: random boxes (one-voxel axes included),
    every flip combination, label dtypes widened."""
    rng = np.random.default_rng(seed)
    src = (rng.integers(-100, 100, (7, 9, 33)) if np.dtype(src_dtype).kind in "iu" else
           rng.standard_normal((7, 9, 33))).astype(src_dtype)
    dst_shape = (6, 1 if seed == 1 else 8, 40)
    ext = [int(rng.integers(1, min(a, b) + 1)) for a, b in zip(src.shape, dst_shape)]
    lo_s = [int(rng.integers(0, n - e + 1)) for n, e in zip(src.shape, ext)]
    lo_d = [int(rng.integers(0, n - e + 1)) for n, e in zip(dst_shape, ext)]
    flip = tuple(bool(v) for v in rng.integers(0, 2, 3)) if seed else (True, True, True)
    dst = np.full(dst_shape, 7, dst_dtype)
    K.copy_chunk(src, dst, lo_s, lo_d, ext, flip)
    ref = np.full(dst_shape, 7, dst_dtype)
    box = src[tuple(slice(a, a + e) for a, e in zip(lo_s, ext))]
    ref[tuple(slice(a, a + e) for a, e in zip(lo_d, ext))] = box[
        tuple(slice(None, None, -1) if f else slice(None) for f in flip)].astype(dst_dtype)
    np.testing.assert_array_equal(dst, ref)


def test_copy_chunk_validates():
    src = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        K.copy_chunk(src, np.zeros((3, 4, 4), np.float32), (0, 0, 0), (0, 0, 0), (4, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        K.copy_chunk(src, np.zeros((4, 4, 4), np.float32), (1, 0, 0), (0, 0, 0), (4, 4, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        K.copy_chunk(src, np.zeros((4, 4, 8), np.float32)[..., ::2], (0, 0, 0), (0, 0, 0), (4, 4, 4))


def test_fp16_round_matches_numpy_half():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0, 1000, 20000), rng.uniform(0, 1e-3, 2000), 500 + rng.uniform(-1, 1, 2000),
                        np.arange(0, 1000, 0.125), 2.0 ** np.arange(-30, 10), 2.0 ** -14 * (1 + rng.random(100)),
                        rng.uniform(0, 2.0 ** -20, 100), [1000.0000001, 1023.9, 1500.0, 3e4]])
    ours = np.array([K._fp16_round(v) for v in x])
    np.testing.assert_array_equal(ours, x.astype(np.float16).astype(np.float64))


# --------------------------------------------------------------------------------------------- blur
@pytest.mark.parametrize("sigma", [0.5, 0.63, 0.81, 1.0])
def test_gaussian_kernel_matches_batchgeneratorsv2(sigma):
    from batchgeneratorsv2.transforms.noise.gaussian_blur import _build_kernel

    np.testing.assert_allclose(KI.gaussian_kernel_1d(sigma), _build_kernel(sigma, truncate=6).numpy(), atol=1e-7)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7, 9, 11), (4, 5, 6), (12, 3, 8)])
def test_blur_axis_matches_scipy_mirror(axis, shape):
    rng = np.random.default_rng(axis)
    x = rng.standard_normal(shape).astype(np.float32)
    w = KI.gaussian_kernel_1d(0.9)
    if shape[axis] <= len(w) // 2:
        pytest.skip("torch reflect padding needs pad < size")
    ref = correlate1d(x.astype(np.float64), w, axis=axis, mode="mirror")
    np.testing.assert_allclose(KI.blur_axis(x, w, axis), ref, atol=1e-6)


@pytest.mark.compat
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_blur_axis_matches_blur_dimension(axis):
    from batchgeneratorsv2.transforms.noise.gaussian_blur import blur_dimension

    x = np.random.default_rng(1).standard_normal((1, 10, 12, 9)).astype(np.float32)
    ref = blur_dimension(torch.from_numpy(x), 0.77, axis, force_use_fft=False)[0].numpy()
    np.testing.assert_allclose(KI.blur_axis(x[0], KI.gaussian_kernel_1d(0.77), axis), ref, atol=2e-6)


# --------------------------------------------------------------------------------------------- statistics
def test_channel_stats_and_affine_clamp():
    x = (np.random.default_rng(2).standard_normal((5, 6, 7)) * 3 + 100).astype(np.float32)
    mean, std, lo, hi = KI.channel_stats(x, with_std=True)
    assert mean == pytest.approx(x.astype(np.float64).mean(), rel=1e-12)
    assert std == pytest.approx(x.astype(np.float64).std(ddof=1), rel=1e-9)
    assert (lo, hi) == (float(x.min()), float(x.max()))
    assert np.isnan(KI.channel_stats(x)[1])
    y = x.copy()
    KI.affine_clamp(y, 1.5, -10.0, 140.0, 150.0)
    np.testing.assert_allclose(y, np.clip(x.astype(np.float64) * 1.5 - 10, 140, 150), rtol=1e-6)


@pytest.mark.compat
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("gamma", [0.7, 1.0, 1.45])
def test_gamma_matches_batchgeneratorsv2(invert, gamma):
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform

    x = (np.random.default_rng(3).standard_normal((1, 9, 10, 11)) * 2 + 0.5).astype(np.float32)
    ref = GammaTransform(gamma, 0, False, 1, 1)._apply_to_image(
        torch.from_numpy(x.copy()), apply_to_channel=torch.tensor([0]), retain_stats=torch.tensor([True]),
        invert_image=torch.tensor([invert]), gamma=torch.tensor([gamma])).numpy()
    y = x.copy()
    KI.gamma_inplace(y[0], gamma, invert, True)
    np.testing.assert_allclose(y, ref, atol=2e-5)
    # without retain_stats: the range is kept
    z = x.copy()
    KI.gamma_inplace(z[0], gamma, False, False)
    assert z.min() == pytest.approx(x.min(), abs=1e-5) and z.max() == pytest.approx(x.max(), abs=1e-5)


@pytest.mark.parametrize("gamma", [0.7, 0.93, 1.0, 1.3, 1.5])
def test_pow_kernel_within_one_ulp(gamma):
    """The gamma transform's vectorized power: within 1 ulp of the correctly rounded float32 power over the unit
    interval (down to the smallest normal float32, and a little above 1); 0, inf and NaN handled."""
    rng = np.random.default_rng(5)
    u = np.concatenate([rng.random(50_000), np.logspace(-37.9, 0, 20_000), 1 + rng.random(1000) * 1e-3,
                        [0.0, 1.0, 0.5, 0.25, np.nextafter(np.float32(1), np.float32(0))]]).astype(np.float32)
    exact = np.power(u.astype(np.float64), gamma)
    ref = exact.astype(np.float32)
    got = u.copy()
    KI._pow_unit_bits(got.view(np.uint32), gamma)
    normal = ref >= np.finfo(np.float32).tiny
    ulp = np.abs(got.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    assert ulp[normal].max() <= 1, (gamma, u[normal][ulp[normal].argmax()])
    assert (got[~normal] == 0).all() and (got[u == 0] == 0).all() and (got[u == 1] == 1).all()
    special = np.array([np.inf, np.nan], np.float32)
    KI._pow_unit_bits(special.view(np.uint32), gamma)
    assert special[0] == np.inf and np.isnan(special[1])


def test_gamma_constant_channel_stays_finite():
    x = np.full((3, 4, 5), 2.0, np.float32)
    KI.gamma_inplace(x, 1.3, True, True)
    assert np.isfinite(x).all() and np.allclose(x, 2.0)


# --------------------------------------------------------------------------------------------- resizing
def test_nearest_exact_indices_match_torch():
    for n_in in range(1, 70):
        for n_out in {1, 2, max(1, n_in // 2), max(1, round(n_in * 0.53)), max(1, round(n_in * 0.77)), n_in,
                      n_in + 3}:
            ref = interpolate(torch.arange(n_in, dtype=torch.float32)[None, None], size=n_out,
                              mode="nearest-exact")[0, 0].numpy().astype(np.int64)
            np.testing.assert_array_equal(KI.nearest_exact_indices(n_in, n_out), ref, err_msg=f"{n_in}->{n_out}")


def test_nearest_exact_3d_gather_matches_interpolate():
    x = np.random.default_rng(4).standard_normal((13, 17, 22)).astype(np.float32)
    new = (7, 11, 13)
    idx = tuple(KI.nearest_exact_indices(n, m) for n, m in zip(x.shape, new))
    ref = interpolate(torch.from_numpy(x)[None, None], size=new, mode="nearest-exact")[0, 0].numpy()
    np.testing.assert_array_equal(KI.gather_nd(x, idx), ref)
    np.testing.assert_array_equal(KI.gather_nd(x[0], idx[1:]), x[0][np.ix_(*idx[1:])])


@pytest.mark.parametrize("shape,new", [((13, 17, 22), (7, 11, 13)), ((5, 8, 9), (5, 5, 4)), ((1, 9, 10), (1, 6, 7))])
def test_linear_upsampling_matches_trilinear(shape, new):
    rng = np.random.default_rng(5)
    small = rng.standard_normal(new).astype(np.float32)
    cur = small
    for ax in range(3):
        if cur.shape[ax] != shape[ax]:
            cur = KI.linear_resize_axis(np.ascontiguousarray(cur), KI.linear_taps(cur.shape[ax], shape[ax]), ax)
    ref = interpolate(torch.from_numpy(small)[None, None], size=shape, mode="trilinear")[0, 0].numpy()
    np.testing.assert_allclose(cur, ref, atol=2e-6)
    if shape[0] == 1:  # a 2D image as (1, y, z): bilinear
        ref2 = interpolate(torch.from_numpy(small[0])[None, None], size=shape[1:], mode="bilinear")[0, 0].numpy()
        np.testing.assert_allclose(cur[0], ref2, atol=2e-6)
    # into a given array: the same values; an overlapping or mis-shaped one is refused
    taps = KI.linear_taps(new[2], shape[2])
    out = np.full((*new[:2], shape[2]), np.nan, np.float32)
    KI.linear_resize_axis(small, taps, 2, out=out)
    np.testing.assert_array_equal(out, KI.linear_resize_axis(small, taps, 2))
    with pytest.raises(ValueError, match="out must be"):
        KI.linear_resize_axis(small, taps, 2, out=np.empty((*new[:2], shape[2] + 1), np.float32))


def test_mask_and_relabel():
    rng = np.random.default_rng(6)
    img = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    seg = rng.integers(-1, 3, (1, 4, 5, 6)).astype(np.int8)
    ref_img, ref_seg = img.copy(), seg.copy()
    ref_img[[0, 2]] = np.where(seg[0] < 0, 0, img[[0, 2]])
    ref_seg[ref_seg == -1] = 0
    KI.mask_and_relabel(img, seg, (0, 2))
    np.testing.assert_array_equal(img, ref_img)
    np.testing.assert_array_equal(seg, ref_seg)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_relabel_without_mask_channels(dtype):
    """No mask channels: only label -1 becomes 0 (other negative values and the image stay), in every seg channel."""
    rng = np.random.default_rng(7)
    img = rng.standard_normal((1, 5, 6, 7)).astype(np.float32)
    seg = rng.integers(-3, 4, (2, 5, 6, 7)).astype(dtype)
    ref_img, ref_seg = img.copy(), seg.copy()
    ref_seg[ref_seg == -1] = 0
    KI.mask_and_relabel(img, seg, ())
    np.testing.assert_array_equal(img, ref_img)
    np.testing.assert_array_equal(seg, ref_seg)


def test_kernels_run_as_plain_python():
    """NUMBA_DISABLE_JIT=1: the kernels stay valid Python (and visible to coverage)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from nnfast.native import augment as K
        from nnfast.native import augment_intensity as KI
        img = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
        seg = (img[:1] % 3).astype(np.int16) - 1
        a = np.array([[1.1, 0.2, 0.0], [-0.2, 1.1, 0.1], [0.0, -0.1, 1.1]])
        i, s = K.warp_3d(img, seg, a, (2.0, 2.5, 3.0), (3, 4, 5), (True, False, False))
        assert i.shape == (2, 3, 4, 5) and set(np.unique(s)) <= {-1, 0, 1}
        i, s = K.warp_2d(img, seg, a[:2, :2], (2.5, 3.0), (4, 5), (True, False, True))
        assert i.shape == (2, 5, 4, 5)
        KI.blur_axis(img[0], KI.gaussian_kernel_1d(0.8), 2)
        KI.gamma_inplace(img[0].copy(), 1.2, True, True)
        KI.mask_and_relabel(img, seg.copy(), (0,))
        KI.mask_and_relabel(img, seg.copy(), ())
        K.copy_box(img, np.empty_like(img), (0, 1, 2), (1, 0, 0), (3, 4, 5), (True, False, True))
        i, s = K.warp_2d(img, seg, a[:2, :2] * 1.6, (2.5, 3.0), (4, 5), (False, True, False))  # a padded corner
        assert (s == -1).any()
        """
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
