"""Augmentation kernels: one-pass affine resampling of image and labels, separable blur, low resolution,
intensity statistics and the final mask / label / deep-supervision steps (batchgeneratorsv2 semantics as
nnU-Net v2's ``nnUNetTrainer.get_training_transforms`` uses them).

Spatial resampling (``SpatialTransform`` with ``mode_image='bilinear'``, ``padding_mode_image='zeros'``,
``mode_seg='bilinear'``, ``border_mode_seg='constant'``, ``padding_value_seg=-1``, ``align_corners=False``,
``seg_tiebreak='nearest'``)
-------------------------------------------------------------------------------------------------------
Output voxel ``idx`` (per axis ``0 <= idx < P``) samples the region at ``centre + A @ (s * (idx - (P - 1) / 2))``
(``s = -1`` on mirrored axes, else ``+1``), region voxel ``i`` lying at coordinate ``i``. This is
``torch.nn.functional.grid_sample`` with the grid batchgeneratorsv2 builds, expressed in voxels.

* Images: (bi/tri)linear interpolation of the 4/8 neighbours; a neighbour outside the region contributes 0
  (``padding_mode='zeros'``). Accumulation in float64, stored as float32.
* Labels: the padded label map (``pad_label`` outside the region) is interpolated one-hot: a label's score is
  the sum of the weights of the neighbours that hold it, times 1000, rounded to float16 (batchgeneratorsv2
  keeps its scores in float16, which turns near-ties into exact ties). The label with the top score wins, the
  smallest on ties, unless the nearest neighbour's label (``round half to even`` per axis, as
  ``grid_sample(mode='nearest')``) has the top score: then it wins (``seg_tiebreak='nearest'``). The scores
  are summed from the neighbours directly, never one pass per label; when all neighbours agree their label is
  written without any arithmetic.

The 2D kernel resamples a stack of slices (``(C, N, Y, Z)``) with one in-plane transform: nnU-Net's 2D
configurations (``N == 1``) and its dummy-2D augmentation of anisotropic 3D patches (every slice of axis 0 is
transformed alike, axis 0 is cropped, never interpolated).

How it is fast: positions, flat offsets and fractions are computed first for a whole output row (3D) or plane (2D,
shared by all slices) in a branch-free loop that LLVM vectorises; the gathers follow as tight loops (image: float32
weights; labels: eight or four loads and a comparison, the vote only where neighbours disagree, the float16
rounding only where the two best scores are within 0.5). Voxels whose neighbours are not all inside the region
are redone by a separate scalar routine. Versus one scalar pass per voxel this measured 2.4x (3D) and ~4x
(dummy-2D) faster; the 2D image gather runs at about the speed of torch's vectorised ``grid_sample``.

All kernels are serial (one loader worker = one core) and never allocate per voxel.
"""
from __future__ import annotations

import math

import numpy as np

from ._jit import register_warmup, serial

__all__ = [
    "warp_3d",
    "warp_2d",
    "gaussian_kernel_1d",
    "blur_axis",
    "channel_stats",
    "affine_clamp",
    "gamma_inplace",
    "nearest_exact_indices",
    "linear_taps",
    "gather_nd",
    "linear_resize_axis",
    "mask_and_relabel",
]

_SCORE_SCALE = 1000.0  # batchgeneratorsv2's scale_factor for the one-hot scores


# --------------------------------------------------------------------------------------------- label vote
@serial
def _fp16_round(x):
    """Round a float64 ``x >= 0`` to the nearest IEEE half-precision value (ties to even), as ``.to(float16)``.

    The spacing is found by halving from the binade [512, 1024) (scores never exceed 1000); no ``frexp``, which
    measured ~20x slower inside the warp kernels."""
    if x <= 0.0:
        return 0.0
    q = 0.5  # spacing of half floats in [t, 2t)
    t = 512.0
    while x >= 2.0 * t:
        t *= 2.0
        q *= 2.0
    while x < t and t > 6.103515625e-05:  # 2**-14: below it half floats are subnormal, spacing 2**-24
        t *= 0.5
        q *= 0.5
    return np.rint(x / q) * q


@serial
def _vote(lab, w, n, nn):
    """Label of one output voxel from ``n`` neighbours ``lab[:n]`` with weights ``w[:n]``; ``nn`` indexes the
    nearest neighbour. See the module docstring for the rule.

    The float16 rounding can only matter when the two best scores are within 0.5 of each other (it moves a score
    by at most a quarter below 1024): otherwise the best label wins outright and the nearest neighbour's label can
    only tie with it by being it."""
    first = lab[0]
    same = True
    for q in range(1, n):
        if lab[q] != first:
            same = False
            break
    if same:
        return first
    best = -1.0
    second = -1.0
    winner = first
    for q in range(n):
        lq = lab[q]
        seen = False
        for r in range(q):
            if lab[r] == lq:
                seen = True
                break
        if seen:
            continue
        s = 0.0
        for r in range(q, n):
            if lab[r] == lq:
                s += w[r]
        s *= _SCORE_SCALE
        if s > best:
            second = best
            best = s
            winner = lq
        elif s > second:
            second = s
    if best - second > 1.0:
        return winner
    # near tie: the exact rule with float16 scores
    nn_label = lab[nn]
    best = -1.0
    winner = first
    nn_score = -2.0
    for q in range(n):
        lq = lab[q]
        seen = False
        for r in range(q):
            if lab[r] == lq:
                seen = True
                break
        if seen:
            continue
        s = 0.0
        for r in range(q, n):
            if lab[r] == lq:
                s += w[r]
        s = _fp16_round(s * _SCORE_SCALE)
        if s > best or (s == best and lq < winner):
            best = s
            winner = lq
        if lq == nn_label:
            nn_score = s
    if nn_score == best:
        return nn_label
    return winner


# --------------------------------------------------------------------------------------------- 3D warp
@serial
def _nn_corner(x, fx):
    """1 when the nearest neighbour of ``x`` (round half to even, as ``nearbyint``) is ``floor(x) + 1``."""
    return 1 if np.rint(x) > fx else 0


@serial
def _border_voxel_3d(img, seg, out_img, out_seg, i, j, k, x, y, z, pad_label, lab, w):
    """One output voxel whose 8 neighbours are not all inside the region (zeros / ``pad_label`` outside)."""
    rx, ry, rz = img.shape[1], img.shape[2], img.shape[3]
    fx = math.floor(x)
    fy = math.floor(y)
    fz = math.floor(z)
    ix = int(fx)
    iy = int(fy)
    iz = int(fz)
    tx = x - fx
    ty = y - fy
    tz = z - fz
    for q in range(8):
        dx = q >> 2
        dy = (q >> 1) & 1
        dz = q & 1
        w[q] = (tx if dx else 1.0 - tx) * (ty if dy else 1.0 - ty) * (tz if dz else 1.0 - tz)
    for c in range(img.shape[0]):
        acc = 0.0
        for q in range(8):
            cx = ix + (q >> 2)
            cy = iy + ((q >> 1) & 1)
            cz = iz + (q & 1)
            if 0 <= cx < rx and 0 <= cy < ry and 0 <= cz < rz:
                acc += w[q] * img[c, cx, cy, cz]
        out_img[c, i, j, k] = acc
    nn = 4 * _nn_corner(x, fx) + 2 * _nn_corner(y, fy) + _nn_corner(z, fz)
    for s in range(seg.shape[0]):
        for q in range(8):
            cx = ix + (q >> 2)
            cy = iy + ((q >> 1) & 1)
            cz = iz + (q & 1)
            if 0 <= cx < rx and 0 <= cy < ry and 0 <= cz < rz:
                lab[q] = seg[s, cx, cy, cz]
            else:
                lab[q] = pad_label
        out_seg[s, i, j, k] = _vote(lab, w, 8, nn)


@serial
def _warp_3d(img, seg, a, centre, half, sign, out_img, out_seg, pad_label):
    # Two phases per output row: (1) positions, flat offsets, fractions and border flags for the whole row (no
    # branches, vectorised by LLVM); (2) the gathers. Measured 2.4x faster than one scalar pass per voxel.
    n_c = img.shape[0]
    n_s = seg.shape[0]
    rx, ry, rz = img.shape[1], img.shape[2], img.shape[3]
    px, py, pz = out_img.shape[1], out_img.shape[2], out_img.shape[3]
    sy = rz
    sx = ry * rz
    xs = np.empty(pz, np.float64)
    ys = np.empty(pz, np.float64)
    zs = np.empty(pz, np.float64)
    txs = np.empty(pz, np.float64)
    tys = np.empty(pz, np.float64)
    tzs = np.empty(pz, np.float64)
    off = np.empty(pz, np.int32)  # int32: AVX2 converts packed doubles to int32, not int64
    border = np.empty(pz, np.bool_)
    lab = np.empty(8, np.int64)
    w = np.empty(8, np.float64)
    a02 = a[0, 2]
    a12 = a[1, 2]
    a22 = a[2, 2]
    s2 = sign[2]
    mx = max(rx - 2.0, 0.0)
    my = max(ry - 2.0, 0.0)
    mz = max(rz - 2.0, 0.0)
    tiny = rx < 2 or ry < 2 or rz < 2
    h2 = half[2]
    for i in range(px):
        o0 = sign[0] * (i - half[0])
        for j in range(py):
            o1 = sign[1] * (j - half[1])
            b0 = centre[0] + a[0, 0] * o0 + a[0, 1] * o1
            b1 = centre[1] + a[1, 0] * o0 + a[1, 1] * o1
            b2 = centre[2] + a[2, 0] * o0 + a[2, 1] * o1
            for k in range(pz):
                o2 = s2 * (k - h2)
                x = b0 + a02 * o2
                y = b1 + a12 * o2
                z = b2 + a22 * o2
                fx = np.floor(x)
                fy = np.floor(y)
                fz = np.floor(z)
                xs[k] = x
                ys[k] = y
                zs[k] = z
                txs[k] = x - fx
                tys[k] = y - fy
                tzs[k] = z - fz
                border[k] = (fx < 0.0) | (fy < 0.0) | (fz < 0.0) | (fx + 1.0 >= rx) | (fy + 1.0 >= ry) | (fz + 1.0 >= rz)
                # clamped so that all 8 reads of a border voxel stay inside the region: the gather loops run
                # without a branch and the border voxels are overwritten afterwards
                cx = min(max(fx, 0.0), mx)
                cy = min(max(fy, 0.0), my)
                cz = min(max(fz, 0.0), mz)
                off[k] = np.int32(cx * sx + cy * sy + cz)
            for c in range(n_c if not tiny else 0):
                src = img[c].reshape(-1)
                dst = out_img[c, i, j]
                for k in range(pz):
                    o = off[k]
                    tx = np.float32(txs[k])
                    ty = np.float32(tys[k])
                    tz = np.float32(tzs[k])
                    ux = np.float32(1.0) - tx
                    uy = np.float32(1.0) - ty
                    uz = np.float32(1.0) - tz
                    dst[k] = (ux * (uy * (uz * src[o] + tz * src[o + 1]) + ty * (uz * src[o + sy] + tz * src[o + sy + 1]))
                              + tx * (uy * (uz * src[o + sx] + tz * src[o + sx + 1])
                                      + ty * (uz * src[o + sx + sy] + tz * src[o + sx + sy + 1])))
            for s in range(n_s if not tiny else 0):
                sg = seg[s].reshape(-1)
                dst_s = out_seg[s, i, j]
                for k in range(pz):
                    if border[k]:
                        continue
                    o = off[k]
                    l0 = sg[o]
                    l1 = sg[o + 1]
                    l2 = sg[o + sy]
                    l3 = sg[o + sy + 1]
                    l4 = sg[o + sx]
                    l5 = sg[o + sx + 1]
                    l6 = sg[o + sx + sy]
                    l7 = sg[o + sx + sy + 1]
                    if l0 == l1 and l0 == l2 and l0 == l3 and l0 == l4 and l0 == l5 and l0 == l6 and l0 == l7:
                        dst_s[k] = l0
                        continue
                    lab[0] = l0
                    lab[1] = l1
                    lab[2] = l2
                    lab[3] = l3
                    lab[4] = l4
                    lab[5] = l5
                    lab[6] = l6
                    lab[7] = l7
                    tx = txs[k]
                    ty = tys[k]
                    tz = tzs[k]
                    for q in range(8):
                        w[q] = ((tx if (q >> 2) else 1.0 - tx) * (ty if ((q >> 1) & 1) else 1.0 - ty)
                                * (tz if (q & 1) else 1.0 - tz))
                    x = xs[k]
                    y = ys[k]
                    z = zs[k]
                    nn = 4 * _nn_corner(x, x - tx) + 2 * _nn_corner(y, y - ty) + _nn_corner(z, z - tz)
                    dst_s[k] = _vote(lab, w, 8, nn)
            for k in range(pz):
                if border[k] or tiny:
                    _border_voxel_3d(img, seg, out_img, out_seg, i, j, k, xs[k], ys[k], zs[k], pad_label, lab, w)


# --------------------------------------------------------------------------------------------- 2D warp
@serial
def _border_pixel_2d(src_img, src_seg, out_img, out_seg, n, j, k, y, z, pad_label, lab, w):
    """Output pixel (j, k) of source slice ``n`` (``out_*`` are that slice's views) whose 4 neighbours are not all
    inside the region."""
    ry, rz = src_img.shape[2], src_img.shape[3]
    fy = math.floor(y)
    fz = math.floor(z)
    iy = int(fy)
    iz = int(fz)
    ty = y - fy
    tz = z - fz
    w[0] = (1.0 - ty) * (1.0 - tz)
    w[1] = (1.0 - ty) * tz
    w[2] = ty * (1.0 - tz)
    w[3] = ty * tz
    for c in range(src_img.shape[0]):
        acc = 0.0
        for q in range(4):
            cy = iy + (q >> 1)
            cz = iz + (q & 1)
            if 0 <= cy < ry and 0 <= cz < rz:
                acc += w[q] * src_img[c, n, cy, cz]
        out_img[c, j, k] = acc
    nn = 2 * _nn_corner(y, fy) + _nn_corner(z, fz)
    for s in range(src_seg.shape[0]):
        for q in range(4):
            cy = iy + (q >> 1)
            cz = iz + (q & 1)
            if 0 <= cy < ry and 0 <= cz < rz:
                lab[q] = src_seg[s, n, cy, cz]
            else:
                lab[q] = pad_label
        out_seg[s, j, k] = _vote(lab, w, 4, nn)


@serial
def _warp_2d(img, seg, a, centre, half, sign, flip_n, out_img, out_seg, pad_label):
    # The in-plane sampling (flat offsets, fractions, border flags) is the same for every slice: computed once, then
    # each slice is a pure gather pass (slices outermost, so every region plane is read in order). Measured ~4x
    # faster than one scalar pass per pixel and slice.
    n_c = img.shape[0]
    n_s = seg.shape[0]
    n_sl = img.shape[1]
    ry, rz = img.shape[2], img.shape[3]
    py, pz = out_img.shape[2], out_img.shape[3]
    npx = py * pz
    my = max(ry - 2.0, 0.0)
    mz = max(rz - 2.0, 0.0)
    tiny = ry < 2 or rz < 2
    ys = np.empty(npx, np.float64)
    zs = np.empty(npx, np.float64)
    tys = np.empty(npx, np.float64)
    tzs = np.empty(npx, np.float64)
    off = np.empty(npx, np.int32)
    border = np.empty(npx, np.bool_)
    for j in range(py):
        o1 = sign[0] * (j - half[0])
        b1 = centre[0] + a[0, 0] * o1
        b2 = centre[1] + a[1, 0] * o1
        for k in range(pz):
            q = j * pz + k
            o2 = sign[1] * (k - half[1])
            y = b1 + a[0, 1] * o2
            z = b2 + a[1, 1] * o2
            fy = np.floor(y)
            fz = np.floor(z)
            ys[q] = y
            zs[q] = z
            tys[q] = y - fy
            tzs[q] = z - fz
            border[q] = (fy < 0.0) | (fz < 0.0) | (fy + 1.0 >= ry) | (fz + 1.0 >= rz)
            cy = min(max(fy, 0.0), my)  # all 4 reads stay inside the region (see _warp_3d)
            cz = min(max(fz, 0.0), mz)
            off[q] = np.int32(cy * rz + cz)
    w00 = np.empty(npx, np.float32)
    w01 = np.empty(npx, np.float32)
    w10 = np.empty(npx, np.float32)
    w11 = np.empty(npx, np.float32)
    for q in range(npx):
        ty = np.float32(tys[q])
        tz = np.float32(tzs[q])
        w00[q] = (np.float32(1.0) - ty) * (np.float32(1.0) - tz)
        w01[q] = (np.float32(1.0) - ty) * tz
        w10[q] = ty * (np.float32(1.0) - tz)
        w11[q] = ty * tz
    lab = np.empty(4, np.int64)
    w = np.empty(4, np.float64)
    for n in range(n_sl):
        on = n_sl - 1 - n if flip_n else n
        for c in range(n_c if not tiny else 0):
            src = img[c, n].reshape(-1)
            dst = out_img[c, on].reshape(-1)
            for q in range(npx):
                o = off[q]
                dst[q] = w00[q] * src[o] + w01[q] * src[o + 1] + w10[q] * src[o + rz] + w11[q] * src[o + rz + 1]
        for s in range(n_s if not tiny else 0):
            sg = seg[s, n].reshape(-1)
            dst_s = out_seg[s, on].reshape(-1)
            for q in range(npx):
                if border[q]:
                    continue
                o = off[q]
                l0 = sg[o]
                l1 = sg[o + 1]
                l2 = sg[o + rz]
                l3 = sg[o + rz + 1]
                if l0 == l1 and l0 == l2 and l0 == l3:
                    dst_s[q] = l0
                    continue
                lab[0] = l0
                lab[1] = l1
                lab[2] = l2
                lab[3] = l3
                ty = tys[q]
                tz = tzs[q]
                w[0] = (1.0 - ty) * (1.0 - tz)
                w[1] = (1.0 - ty) * tz
                w[2] = ty * (1.0 - tz)
                w[3] = ty * tz
                y = ys[q]
                z = zs[q]
                nn = 2 * _nn_corner(y, y - ty) + _nn_corner(z, z - tz)
                dst_s[q] = _vote(lab, w, 4, nn)
        oi = out_img[:, on]
        osg = out_seg[:, on]
        for q in range(npx):
            if border[q] or tiny:
                _border_pixel_2d(img, seg, oi, osg, n, q // pz, q % pz, ys[q], zs[q], pad_label, lab, w)


def _check_warp_inputs(image, seg, matrix, centre, patch_shape, nd_matrix, what):
    if not isinstance(image, np.ndarray) or image.dtype != np.float32 or image.ndim != 4:
        raise ValueError(f"{what}: image must be a float32 array (c, x, y, z), got "
                         f"{getattr(image, 'dtype', type(image))} with shape {getattr(image, 'shape', None)}")
    if seg is None:
        seg = np.zeros((0, *image.shape[1:]), np.int16)
    if not isinstance(seg, np.ndarray) or seg.ndim != 4 or seg.dtype not in (np.int8, np.int16, np.int32):
        raise ValueError(f"{what}: seg must be an int8/int16/int32 array (c, x, y, z), got "
                         f"{getattr(seg, 'dtype', type(seg))} with shape {getattr(seg, 'shape', None)}")
    if seg.shape[1:] != image.shape[1:]:
        raise ValueError(f"{what}: seg spatial shape {seg.shape[1:]} differs from the image's {image.shape[1:]}")
    matrix = np.ascontiguousarray(matrix, dtype=np.float64)
    centre = np.ascontiguousarray(centre, dtype=np.float64)
    if matrix.shape != (nd_matrix, nd_matrix) or centre.shape != (nd_matrix,) or len(patch_shape) != nd_matrix:
        raise ValueError(f"{what}: expected a ({nd_matrix}, {nd_matrix}) matrix and {nd_matrix} centre coordinates / "
                         f"patch sizes, got {matrix.shape}, {centre.shape}, {tuple(patch_shape)}")
    if any(int(p) < 1 for p in patch_shape):
        raise ValueError(f"{what}: patch_shape must be positive, got {tuple(patch_shape)}")
    if int(np.prod(image.shape[1:], dtype=np.int64)) >= 2**31 - 1:
        raise ValueError(f"{what}: a region of {image.shape[1:]} voxels per channel is too large (the kernels use "
                         "int32 offsets); read the box needed_region returns, not the whole case")
    return np.ascontiguousarray(image), np.ascontiguousarray(seg), matrix, centre


def _outputs(out_image, out_seg, img_shape, seg_shape, seg_dtype, what):
    if out_image is None:
        out_image = np.empty(img_shape, np.float32)
    elif out_image.shape != img_shape or out_image.dtype != np.float32 or not out_image.flags.c_contiguous:
        raise ValueError(f"{what}: out_image must be C-contiguous float32 {img_shape}, got {out_image.dtype} "
                         f"{out_image.shape}")
    if out_seg is None:
        out_seg = np.empty(seg_shape, seg_dtype)
    elif out_seg.shape != seg_shape or out_seg.dtype != seg_dtype or not out_seg.flags.c_contiguous:
        raise ValueError(f"{what}: out_seg must be C-contiguous {np.dtype(seg_dtype)} {seg_shape}, got "
                         f"{out_seg.dtype} {out_seg.shape}")
    return out_image, out_seg


def warp_3d(image, seg, matrix, centre, patch_shape, flip=(False, False, False), pad_label=-1,
            out_image=None, out_seg=None):
    """Resample a 3D patch from a region with an affine map, image and labels in one pass.

    Output voxel ``idx`` samples the region at ``centre + matrix @ (s * (idx - (patch_shape - 1) / 2))`` with
    ``s = -1`` on the axes in ``flip`` (mirroring folded into the resampling), region voxel ``i`` at coordinate
    ``i``. Outside the region: image 0, labels ``pad_label``.

    Parameters
    ----------
    image : (c, x, y, z) float32, the region read from the store.
    seg : (s, x, y, z) int8/int16/int32 label maps of the region (usually ``s == 1``), or None.
    matrix : (3, 3) float, rotation @ scaling (batchgeneratorsv2's ``Rz @ Ry @ Rx @ S``), nnU-Net axis order.
    centre : (3,) float, region coordinates of the patch centre.
    patch_shape : 3 ints.
    flip : 3 bools, mirror the output along these axes.
    pad_label : label outside the region (nnU-Net: -1).
    out_image, out_seg : optional C-contiguous outputs to fill.

    Returns
    -------
    (image (c, *patch_shape) float32, seg (s, *patch_shape) of seg's dtype)
    """
    image, seg, matrix, centre = _check_warp_inputs(image, seg, matrix, centre, patch_shape, 3, "warp_3d")
    ps = tuple(int(p) for p in patch_shape)
    out_image, out_seg = _outputs(out_image, out_seg, (image.shape[0], *ps), (seg.shape[0], *ps), seg.dtype, "warp_3d")
    half = np.array([(p - 1) / 2.0 for p in ps])
    sign = np.array([-1.0 if f else 1.0 for f in flip])
    _warp_3d(image, seg, matrix, centre, half, sign, out_image, out_seg, int(pad_label))
    return out_image, out_seg


def warp_2d(image, seg, matrix, centre, patch_shape, flip=(False, False, False), pad_label=-1,
            out_image=None, out_seg=None):
    """Resample every slice of a stack with one in-plane affine map (2D and dummy-2D), image and labels in one pass.

    Output voxel ``(n, j, k)`` samples slice ``n`` (``N - 1 - n`` when ``flip[0]``) at
    ``centre + matrix @ (s * ((j, k) - (patch_shape - 1) / 2))``, ``s = -1`` on ``flip[1:]``.

    Parameters
    ----------
    image : (c, n, y, z) float32; a 2D configuration passes ``n == 1``.
    seg : (s, n, y, z) int8/int16/int32 or None.
    matrix : (2, 2) float, rotation @ scaling in the (y, z) plane.
    centre : (2,) float, in-plane region coordinates of the patch centre.
    patch_shape : 2 ints, the in-plane patch size.
    flip : 3 bools: slice axis, y, z.

    Returns
    -------
    (image (c, n, *patch_shape) float32, seg (s, n, *patch_shape))
    """
    image, seg, matrix, centre = _check_warp_inputs(image, seg, matrix, centre, patch_shape, 2, "warp_2d")
    ps = tuple(int(p) for p in patch_shape)
    n = image.shape[1]
    out_image, out_seg = _outputs(out_image, out_seg, (image.shape[0], n, *ps), (seg.shape[0], n, *ps), seg.dtype,
                                  "warp_2d")
    half = np.array([(p - 1) / 2.0 for p in ps])
    sign = np.array([-1.0 if f else 1.0 for f in flip[1:]])
    _warp_2d(image, seg, matrix, centre, half, sign, bool(flip[0]), out_image, out_seg, int(pad_label))
    return out_image, out_seg


# --------------------------------------------------------------------------------------------- blur
def gaussian_kernel_1d(sigma: float, truncate: float = 6.0) -> np.ndarray:
    """batchgeneratorsv2's ``_build_kernel``: odd size ``round_to_nearest_odd(sigma * truncate + 0.5)``, sampled
    ``exp(-x^2 / (2 sigma^2))`` normalised to sum 1 (float32 arithmetic, returned as float64)."""
    n = sigma * truncate + 0.5
    r = round(n)
    if r % 2 != 1:
        r = r + 1 if n - r >= 0 else r - 1
    half = (r - 1) * 0.5
    x = np.linspace(-half, half, r, dtype=np.float32)
    pdf = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2)
    return (pdf / pdf.sum()).astype(np.float64)


@serial
def _reflect(i, n):
    """torch 'reflect' padding index (edge not repeated), folded as often as needed."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = i % period
    if i < 0:
        i += period
    if i >= n:
        i = period - i
    return i


@serial
def _blur_axis(src, dst, w, axis):
    nx, ny, nz = src.shape
    k = w.shape[0]
    h = k // 2
    if axis == 2:
        buf = np.empty(nz + 2 * h, np.float64)
        acc = np.empty(nz, np.float64)
        for i in range(nx):
            for j in range(ny):
                line = src[i, j]
                for z in range(nz + 2 * h):
                    buf[z] = line[_reflect(z - h, nz)]
                acc[:] = 0.0
                for t in range(k):
                    wt = w[t]
                    for z in range(nz):
                        acc[z] += wt * buf[z + t]
                for z in range(nz):
                    dst[i, j, z] = acc[z]
    elif axis == 1:
        acc = np.empty(nz, np.float64)
        for i in range(nx):
            for j in range(ny):
                acc[:] = 0.0
                for t in range(k):
                    jj = _reflect(j + t - h, ny)
                    wt = w[t]
                    row = src[i, jj]
                    for z in range(nz):
                        acc[z] += wt * row[z]
                for z in range(nz):
                    dst[i, j, z] = acc[z]
    else:
        acc = np.empty((ny, nz), np.float64)
        for i in range(nx):
            acc[:, :] = 0.0
            for t in range(k):
                ii = _reflect(i + t - h, nx)
                wt = w[t]
                sl = src[ii]
                for j in range(ny):
                    for z in range(nz):
                        acc[j, z] += wt * sl[j, z]
            for j in range(ny):
                for z in range(nz):
                    dst[i, j, z] = acc[j, z]


def blur_axis(src: np.ndarray, weights: np.ndarray, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """Convolve a (x, y, z) float32 volume along ``axis`` with a symmetric odd kernel, reflect padding (torch
    ``pad(mode='reflect')`` then ``conv``), as batchgeneratorsv2's ``blur_dimension``. ``out`` must differ from
    ``src``. 2D data: pass a (1, y, z) view and axes 1, 2."""
    if src.ndim != 3 or src.dtype != np.float32 or not src.flags.c_contiguous:
        raise ValueError(f"blur_axis: src must be C-contiguous float32 (x, y, z), got {src.dtype} {src.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"blur_axis: axis must be 0, 1 or 2, got {axis}")
    w = np.ascontiguousarray(weights, np.float64)
    if w.ndim != 1 or w.shape[0] % 2 != 1:
        raise ValueError(f"blur_axis: weights must be 1D of odd length, got shape {w.shape}")
    if out is None:
        out = np.empty_like(src)
    elif out.shape != src.shape or out.dtype != np.float32 or not out.flags.c_contiguous or np.shares_memory(out, src):
        raise ValueError("blur_axis: out must be a separate C-contiguous float32 array of src's shape")
    _blur_axis(src, out, w, axis)
    return out


# --------------------------------------------------------------------------------------------- statistics
@serial
def _stats(x, with_std):
    """mean, unbiased std (nan unless ``with_std``), min, max of a flat float32 array (float64 accumulation)."""
    n = x.shape[0]
    s = 0.0
    mn = x[0]
    mx = x[0]
    for i in range(n):
        v = x[i]
        s += v
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    mean = s / n
    std = math.nan
    if with_std and n > 1:
        s2 = 0.0
        for i in range(n):
            d = x[i] - mean
            s2 += d * d
        std = math.sqrt(s2 / (n - 1))
    return mean, std, float(mn), float(mx)


def channel_stats(x: np.ndarray, with_std: bool = False) -> tuple[float, float, float, float]:
    """(mean, unbiased std, min, max) of one channel (any shape, C-contiguous float32); std is nan unless
    ``with_std`` (it costs a second pass)."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.size == 0:
        raise ValueError(f"channel_stats: expected a non-empty C-contiguous float32 array, got {x.dtype} {x.shape}")
    return _stats(x.reshape(-1), bool(with_std))


@serial
def _affine_clamp(x, a, b, lo, hi):
    for i in range(x.shape[0]):
        v = x[i] * a + b
        if v < lo:
            v = lo
        elif v > hi:
            v = hi
        x[i] = v


def affine_clamp(x: np.ndarray, a: float, b: float, lo: float = -np.inf, hi: float = np.inf) -> None:
    """In place ``x = clip(x * a + b, lo, hi)`` on a C-contiguous float32 array (brightness, contrast)."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"affine_clamp: expected a C-contiguous float32 array, got {x.dtype}")
    _affine_clamp(x.reshape(-1), float(a), float(b), float(lo), float(hi))


@serial
def _gamma_prepare(x, sgn, eps):
    """Stats of ``sgn * x`` (mean, unbiased std, min, range; float64, one pass with a shift), then in place
    ``x = (sgn * x - min) / max(range, eps)``."""
    n = x.shape[0]
    shift = sgn * x[0]
    s = 0.0
    s2 = 0.0
    mn = shift
    mx = shift
    for i in range(n):
        v = sgn * x[i]
        d = v - shift
        s += d
        s2 += d * d
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    mean = shift + s / n
    std = math.sqrt(max(s2 - s * s / n, 0.0) / (n - 1)) if n > 1 else math.nan
    rng = mx - mn
    inv = 1.0 / max(rng, eps)
    for i in range(n):
        x[i] = (sgn * x[i] - mn) * inv
    return mean, std, mn, rng


@serial
def _gamma_finish(x, sgn, mean, std, mn, rng, retain, eps):
    """``y = x * rng + mn`` (x holds ``u ** gamma``); with ``retain`` restore ``mean``/``std``; ``x = sgn * y``."""
    n = x.shape[0]
    if retain:
        s = 0.0
        s2 = 0.0
        for i in range(n):
            v = x[i]
            s += v
            s2 += v * v
        m_u = s / n
        sd_u = math.sqrt(max(s2 - s * s / n, 0.0) / (n - 1)) if n > 1 else math.nan
        # y = u * rng + mn has mean m_u * rng + mn and std sd_u * rng
        f = std / max(sd_u * rng, eps)
        a = sgn * rng * f
        b = sgn * ((mn - (m_u * rng + mn)) * f + mean)
    else:
        a = sgn * rng
        b = sgn * mn
    for i in range(n):
        x[i] = x[i] * a + b


def gamma_inplace(x: np.ndarray, gamma: float, invert: bool, retain_stats: bool) -> None:
    """batchgeneratorsv2 ``GammaTransform`` on one channel, in place (C-contiguous float32, any shape).

    ``x -> -x`` if ``invert``; ``x = ((x - min) / max(range, 1e-7)) ** gamma * range + min``; with
    ``retain_stats`` the mean and unbiased std from before the power are restored; ``x -> -x`` again.
    The power runs as numpy's SIMD ``np.power`` (measured 6x faster than torch's ``pow_`` and 17x faster than a
    scalar Numba loop); the rest is three fused Numba passes."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.size == 0:
        raise ValueError(f"gamma_inplace: expected a non-empty C-contiguous float32 array, got {x.dtype} {x.shape}")
    flat = x.reshape(-1)
    sgn = -1.0 if invert else 1.0
    eps = 1e-7
    mean, std, mn, rng = _gamma_prepare(flat, sgn, eps)
    np.power(flat, np.float32(gamma), out=flat)
    _gamma_finish(flat, sgn, mean, std, mn, rng, bool(retain_stats), eps)


# --------------------------------------------------------------------------------------------- resizing
def nearest_exact_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output sample of ``interpolate(mode='nearest-exact')`` along one axis (torch's float32
    arithmetic: ``min(floor((k + 0.5) * (n_in / n_out)), n_in - 1)``)."""
    scale = np.float32(n_in) / np.float32(n_out)
    k = np.arange(n_out, dtype=np.float32)
    idx = np.floor((k + np.float32(0.5)) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, lambda1) of ``interpolate(mode='(bi/tri)linear', align_corners=False)`` along one axis, torch's
    float32 arithmetic: ``src = max(scale * (k + 0.5) - 0.5, 0)``, ``i0 = int(src)``, ``i1 = min(i0 + 1, n_in - 1)``,
    ``lambda1 = src - i0``."""
    scale = np.float32(n_in) / np.float32(n_out)
    k = np.arange(n_out, dtype=np.float32)
    src = np.maximum(scale * (k + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float64)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, lam


@serial
def _gather3(src, i0, i1, i2, dst):
    for a in range(i0.shape[0]):
        sa = src[i0[a]]
        for b in range(i1.shape[0]):
            row = sa[i1[b]]
            for c in range(i2.shape[0]):
                dst[a, b, c] = row[i2[c]]


def gather_nd(src: np.ndarray, indices: tuple[np.ndarray, ...], out: np.ndarray | None = None) -> np.ndarray:
    """``src[np.ix_(*indices)]`` for a 2D or 3D array (nearest-exact down-sampling with precomputed indices)."""
    if src.ndim not in (2, 3) or len(indices) != src.ndim:
        raise ValueError(f"gather_nd: expected a 2D/3D array and as many index arrays, got {src.shape}, {len(indices)}")
    idx = [np.ascontiguousarray(i, np.int64) for i in indices]
    for i, n in zip(idx, src.shape):
        if i.size and (i.min() < 0 or i.max() >= n):
            raise ValueError(f"gather_nd: index out of range for an axis of size {n}")
    s3 = src if src.ndim == 3 else src[None]
    i3 = idx if src.ndim == 3 else [np.zeros(1, np.int64), *idx]
    shape = tuple(i.shape[0] for i in idx)
    if out is None:
        out = np.empty(shape, src.dtype)
    _gather3(np.ascontiguousarray(s3), i3[0], i3[1], i3[2], out if src.ndim == 3 else out[None])
    return out


@serial
def _up_axis(src, dst, i0, i1, lam, axis):
    """Linear interpolation of (x, y, z) ``src`` along ``axis`` into ``dst`` (same shape elsewhere)."""
    nx, ny, nz = dst.shape
    if axis == 2:
        for a in range(nx):
            for b in range(ny):
                row = src[a, b]
                for c in range(nz):
                    l1 = lam[c]
                    dst[a, b, c] = (1.0 - l1) * row[i0[c]] + l1 * row[i1[c]]
    elif axis == 1:
        for a in range(nx):
            for b in range(ny):
                l1 = lam[b]
                r0 = src[a, i0[b]]
                r1 = src[a, i1[b]]
                for c in range(nz):
                    dst[a, b, c] = (1.0 - l1) * r0[c] + l1 * r1[c]
    else:
        for a in range(nx):
            l1 = lam[a]
            s0 = src[i0[a]]
            s1 = src[i1[a]]
            for b in range(ny):
                for c in range(nz):
                    dst[a, b, c] = (1.0 - l1) * s0[b, c] + l1 * s1[b, c]


def linear_resize_axis(src: np.ndarray, taps: tuple[np.ndarray, np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """Resize a C-contiguous float32 (x, y, z) volume along ``axis`` with linear taps ``(i0, i1, lambda1)``
    (:func:`linear_taps`, possibly reversed for a mirrored axis); returns a new array."""
    if src.dtype != np.float32 or src.ndim != 3 or not src.flags.c_contiguous or axis not in (0, 1, 2):
        raise ValueError(f"linear_resize_axis: expected C-contiguous float32 (x, y, z) and axis 0-2, got {src.dtype} "
                         f"{src.shape}, axis {axis}")
    i0, i1, lam = (np.ascontiguousarray(taps[0], np.int64), np.ascontiguousarray(taps[1], np.int64),
                   np.ascontiguousarray(taps[2], np.float64))
    if not (i0.shape == i1.shape == lam.shape) or i0.ndim != 1 or (i0.size and max(i0.max(), i1.max()) >= src.shape[axis]):
        raise ValueError(f"linear_resize_axis: taps must be three 1D arrays of one length indexing axis {axis} "
                         f"(size {src.shape[axis]})")
    shape = list(src.shape)
    shape[axis] = i0.shape[0]
    out = np.empty(shape, np.float32)
    _up_axis(src, out, i0, i1, lam, axis)
    return out


# --------------------------------------------------------------------------------------------- final steps
@serial
def _mask_and_relabel(seg, img, channels, do_mask):
    n = seg.shape[0]
    for i in range(n):
        if seg[i] < 0:
            if do_mask:
                for c in channels:
                    img[c, i] = 0.0
            if seg[i] == -1:
                seg[i] = 0


def mask_and_relabel(image: np.ndarray, seg: np.ndarray, mask_channels=()) -> None:
    """In place: image channels ``mask_channels`` set to 0 where ``seg[0] < 0`` (``MaskImageTransform``), then
    label -1 set to 0 in every seg channel (``RemoveLabelTansform(-1, 0)``).

    image: (c, *spatial) C-contiguous float32; seg: (s, *spatial) C-contiguous int."""
    if not image.flags.c_contiguous or not seg.flags.c_contiguous or image.shape[1:] != seg.shape[1:]:
        raise ValueError(f"mask_and_relabel: C-contiguous image and seg of one spatial shape expected, got "
                         f"{image.shape} and {seg.shape}")
    ch = np.asarray(list(mask_channels), np.int64)
    img2 = image.reshape(image.shape[0], -1)
    for s in range(seg.shape[0]):
        _mask_and_relabel(seg[s].reshape(-1), img2, ch, s == 0 and ch.size > 0)


@register_warmup
def _warmup() -> None:
    """Compile every signature the augmentation pipeline uses (float32 images, int8/int16 labels)."""
    img = np.zeros((1, 4, 5, 6), np.float32)
    for dt in (np.int8, np.int16):
        seg = np.zeros((1, 4, 5, 6), dt)
        seg[0, 1:3, 1:3, 1:4] = 1
        warp_3d(img, seg, np.eye(3) * 1.1, (1.5, 2.0, 2.5), (3, 4, 5), flip=(True, False, True))
        warp_2d(img, seg, np.eye(2) * 0.9, (2.0, 2.5), (4, 5), flip=(True, False, True))
        mask_and_relabel(img.copy(), seg.copy(), (0,))
        gather_nd(seg[0], (np.arange(2), np.arange(3), np.arange(4)))
        gather_nd(seg[0, 0], (np.arange(3), np.arange(4)))
    x = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    for ax in range(3):
        blur_axis(x, gaussian_kernel_1d(0.7), ax)
    gather_nd(x, (np.arange(2), np.arange(3), np.arange(4)))
    for ax in range(3):
        linear_resize_axis(x, linear_taps(x.shape[ax], 7), ax)
    channel_stats(x, True)
    affine_clamp(x.copy(), 1.1, 0.1, 0.0, 1.0)
    gamma_inplace(x.copy(), 1.2, True, True)
