"""Augmentation kernels, spatial part: one-pass affine resampling of image and labels (batchgeneratorsv2 semantics
as nnU-Net v2's ``nnUNetTrainer.get_training_transforms`` uses them). The intensity kernels (blur, statistics,
gamma, low resolution, mask / relabel, nearest-exact down-sampling) are in :mod:`.augment_intensity`.

Spatial resampling (``SpatialTransform`` with ``mode_image='bilinear'``, ``padding_mode_image='zeros'``,
``mode_seg='bilinear'``, ``border_mode_seg='constant'``, ``padding_value_seg=-1``, ``align_corners=False``,
``seg_tiebreak='nearest'``)
-------------------------------------------------------------------------------------------------------
Output voxel ``idx`` (per axis ``0 <= idx < P``) samples the region at ``centre + A @ (s * (idx - (P - 1) / 2))``
(``s = -1`` on mirrored axes, else ``+1``), region voxel ``i`` lying at coordinate ``i``. This is
``torch.nn.functional.grid_sample`` with the grid batchgeneratorsv2 builds, expressed in voxels.

* Images: (bi/tri)linear interpolation of the 4/8 neighbours; a neighbour outside the region contributes 0
  (``padding_mode='zeros'``). Float32 weights and sums, as torch (positions are computed in float64).
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
are redone by a separate scalar routine, except those with all neighbours outside, which are written as padding
directly (a grid scaled up beyond the sampled box has many: a 56x192^2 dummy-2D warp at scale 1.3 took 58 -> 34 ms,
80 -> 25 ms rotated). Versus one scalar pass per voxel this measured 2.4x (3D) and ~4x
(dummy-2D) faster; the 2D image gather runs at about the speed of torch's vectorised ``grid_sample``. A rotated
2D warp reads each source plane in order before gathering from it: the gathers' diagonal walk defeats the
hardware prefetchers (~2x faster at 45 degrees with the warm-up).

All kernels are serial (one loader worker = one core) and never allocate per voxel.
"""
from __future__ import annotations

import math

import numpy as np

from nnfast.errors import ShapeError

from ._jit import register_warmup, serial

__all__ = ["warp_3d", "warp_2d", "copy_box", "copy_chunk"]

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
    border = np.empty(pz, np.uint8)  # 0 inside, 1 some of the 8 neighbours outside the region, 2 all of them
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
                border[k] = (np.uint8((fx < 0.0) | (fy < 0.0) | (fz < 0.0) | (fx + 1.0 >= rx) | (fy + 1.0 >= ry)
                                      | (fz + 1.0 >= rz))
                             + np.uint8((fx + 1.0 < 0.0) | (fy + 1.0 < 0.0) | (fz + 1.0 < 0.0) | (fx >= rx) | (fy >= ry)
                                        | (fz >= rz)))
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
                if border[k] == 2:  # all neighbours outside: padding (what _border_voxel_3d gives, without the work)
                    for c in range(n_c):
                        out_img[c, i, j, k] = 0.0
                    for s in range(n_s):
                        out_seg[s, i, j, k] = pad_label
                elif border[k] or tiny:
                    _border_voxel_3d(img, seg, out_img, out_seg, i, j, k, xs[k], ys[k], zs[k], pad_label, lab, w)


# --------------------------------------------------------------------------------------------- 2D warp
@serial
def _pixel_source(q, pz, sign, half, centre, a00, a01, a10, a11):
    """Output pixel ``q`` of a 2D warp (row-major, ``pz`` columns): its row and column and the source position
    ``(y, z)`` it samples (centre + matrix @ mirrored offset from the patch centre)."""
    j = q // pz
    k = q - j * pz
    o1 = sign[0] * (j - half[0])
    o2 = sign[1] * (k - half[1])
    return j, k, (centre[0] + a00 * o1) + a01 * o2, (centre[1] + a10 * o1) + a11 * o2


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
def _touch(flat, step):
    """Read one element per ``step`` of a flat array in order (one per cache line) and return their sum, so that
    the array's lines are in the cache before a gather walks it along a rotated grid (see :func:`_warp_2d`)."""
    acc = 0.0
    for i in range(0, flat.shape[0], step):
        acc += flat[i]
    return acc


@serial
def _warp_2d(img, seg, a, centre, half, sign, flip_n, out_img, out_seg, pad_label):
    # The in-plane sampling (flat offsets, float32 fractions, border flags) is the same for every slice: computed
    # once in a branch-free loop, then each slice is a gather pass (slices outermost, so every region plane is read
    # in order). The tables are 10 bytes per pixel: the float32 weights are recomputed in the gather (vectorized
    # arithmetic), and the float64 positions only where labels disagree or at the border (same formulas, so the
    # same bits as storing them).
    # A rotated grid walks each source plane diagonally, which the hardware prefetchers do not follow: every first
    # touch of a line was a miss to L3 or memory (a 45 degree warp of 56 slices of 275^2 cost ~3x the unrotated one).
    # Rotated warps therefore read each plane in order first (_touch, one load per 64-byte line), which brings it
    # into L2 at streaming speed: ~2x faster gathers at 45 degrees, ~1 ms per 56 x 275^2 stack when not rotated (so
    # it is skipped then: rows of an unrotated grid run along the source rows).
    n_c = img.shape[0]
    n_s = seg.shape[0]
    n_sl = img.shape[1]
    ry, rz = img.shape[2], img.shape[3]
    py, pz = out_img.shape[2], out_img.shape[3]
    npx = py * pz
    my = max(ry - 2.0, 0.0)
    mz = max(rz - 2.0, 0.0)
    tiny = ry < 2 or rz < 2
    ty32 = np.empty(npx, np.float32)
    tz32 = np.empty(npx, np.float32)
    off = np.empty(npx, np.uint32)  # unsigned: the gathers need no negative-index wrap-around checks
    border = np.empty(npx, np.uint8)  # 0 inside, 1 some of the 4 neighbours outside the region, 2 all of them
    a00, a01, a10, a11 = a[0, 0], a[0, 1], a[1, 0], a[1, 1]
    s1, h1 = sign[1], half[1]
    fry = np.float64(ry)
    frz = np.float64(rz)
    for j in range(py):
        o1 = sign[0] * (j - half[0])
        b1 = centre[0] + a00 * o1
        b2 = centre[1] + a10 * o1
        # row views: indices from range() are non-negative, so the loop has no wrap-around checks and vectorizes
        t_y = ty32[j * pz:(j + 1) * pz]
        t_z = tz32[j * pz:(j + 1) * pz]
        b_r = border[j * pz:(j + 1) * pz]
        o_r = off[j * pz:(j + 1) * pz]
        for k in range(pz):
            o2 = s1 * (k - h1)
            y = b1 + a01 * o2
            z = b2 + a11 * o2
            fy = np.floor(y)
            fz = np.floor(z)
            t_y[k] = np.float32(y - fy)
            t_z[k] = np.float32(z - fz)
            b_r[k] = (np.uint8((fy < 0.0) | (fz < 0.0) | (fy + 1.0 >= fry) | (fz + 1.0 >= frz))
                      + np.uint8((fy + 1.0 < 0.0) | (fz + 1.0 < 0.0) | (fy >= fry) | (fz >= frz)))
            cy = min(max(fy, 0.0), my)  # all 4 reads stay inside the region (see _warp_3d)
            cz = min(max(fz, 0.0), mz)
            o_r[k] = np.uint32(cy * frz + cz)
    one = np.float32(1.0)
    u1 = np.uint64(1)
    urz = np.uint64(rz)
    urz1 = np.uint64(rz + 1)
    lab = np.empty(4, np.int64)
    w = np.empty(4, np.float64)
    # the ring of pixels with some neighbours outside, listed once with their positions: the fix-up pass of each
    # slice visits only them (pixels with all neighbours outside are written as padding by the gather loops)
    n_ring = 0
    for q in range(npx):
        n_ring += border[q] == 1
    ring_q = np.empty(n_ring, np.int64)
    ring_y = np.empty(n_ring, np.float64)
    ring_z = np.empty(n_ring, np.float64)
    r = 0
    for q in range(npx):
        if border[q] == 1:
            _, _, ring_y[r], ring_z[r] = _pixel_source(q, pz, sign, half, centre, a00, a01, a10, a11)
            ring_q[r] = q
            r += 1
    zero32 = np.float32(0.0)
    pad = out_seg.dtype.type(pad_label)
    rotated = a01 != 0.0 or a10 != 0.0
    touched = 0.0
    for n in range(n_sl):
        on = n_sl - 1 - n if flip_n else n
        for c in range(n_c if not tiny else 0):
            src = img[c, n].reshape(-1)
            if rotated:
                touched += _touch(src, 16)
            dst = out_img[c, on].reshape(-1)
            for q in range(npx):
                o = np.uint64(off[q])
                ty = ty32[q]
                tz = tz32[q]
                v = ((one - ty) * (one - tz) * src[o] + (one - ty) * tz * src[o + u1]
                     + ty * (one - tz) * src[o + urz] + ty * tz * src[o + urz1])
                dst[q] = zero32 if border[q] == 2 else v  # a select, no branch
        for s in range(n_s if not tiny else 0):
            sg = seg[s, n].reshape(-1)
            if rotated:
                touched += _touch(sg, 64 // sg.itemsize)
            dst_s = out_seg[s, on].reshape(-1)
            for q in range(npx):
                if border[q]:
                    if border[q] == 2:
                        dst_s[q] = pad
                    continue
                o = np.uint64(off[q])
                l0 = sg[o]
                l1 = sg[o + u1]
                l2 = sg[o + urz]
                l3 = sg[o + urz1]
                if l0 == l1 and l0 == l2 and l0 == l3:
                    dst_s[q] = l0
                    continue
                lab[0] = l0
                lab[1] = l1
                lab[2] = l2
                lab[3] = l3
                j, k, y, z = _pixel_source(q, pz, sign, half, centre, a00, a01, a10, a11)
                fy = np.floor(y)
                fz = np.floor(z)
                ty = y - fy
                tz = z - fz
                w[0] = (1.0 - ty) * (1.0 - tz)
                w[1] = (1.0 - ty) * tz
                w[2] = ty * (1.0 - tz)
                w[3] = ty * tz
                nn = 2 * _nn_corner(y, fy) + _nn_corner(z, fz)
                dst_s[q] = _vote(lab, w, 4, nn)
        oi = out_img[:, on]
        osg = out_seg[:, on]
        if tiny:  # no gather loops ran: every pixel through the scalar routine
            for q in range(npx):
                j, k, y, z = _pixel_source(q, pz, sign, half, centre, a00, a01, a10, a11)
                _border_pixel_2d(img, seg, oi, osg, n, j, k, y, z, pad_label, lab, w)
            continue
        for r in range(n_ring):
            q = ring_q[r]
            j = q // pz
            _border_pixel_2d(img, seg, oi, osg, n, j, q - j * pz, ring_y[r], ring_z[r], pad_label, lab, w)
    return touched  # returned so that the reads are not optimized away


# --------------------------------------------------------------------------------------------- crops
@serial
def _copy_box(src, dst, src_lo, dst_lo, ext, f0, f1, f2):
    # every channel through _copy_chunk (the same rows, forwards or mirrored)
    for c in range(src.shape[0]):
        _copy_chunk(src[c], dst[c], src_lo[0], src_lo[1], src_lo[2], dst_lo[0], dst_lo[1], dst_lo[2],
                    ext[0], ext[1], ext[2], f0, f1, f2)


@serial
def _copy_chunk(src, dst, s0, s1, s2, d0, d1, d2, e0, e1, e2, f0, f1, f2):
    # One channel's box: (x, y, z) arrays, the box as scalars (the patch reader calls it once per decoded store chunk,
    # without per-call index arrays), and the destination's dtype may differ (int8 labels into int16 slots). Rows are
    # copied forwards or, on a mirrored last axis, backwards through an unsigned index: with a signed one Numba's
    # negative-index wrap-around check keeps LLVM from vectorizing the reversed loop (numpy's negative-stride copy
    # measured ~2x slower than this on 56 x 192^2 patches).
    last = np.uint64(e2 - 1)
    for i in range(e0):
        si = s0 + (e0 - 1 - i if f0 else i)
        for j in range(e1):
            sj = s1 + (e1 - 1 - j if f1 else j)
            s = src[si, sj, s2:s2 + e2]
            d = dst[d0 + i, d1 + j, d2:d2 + e2]
            if f2:
                for k in range(e2):
                    d[k] = s[last - np.uint64(k)]
            else:
                for k in range(e2):
                    d[k] = s[k]


def copy_chunk(src, dst, src_lo, dst_lo, extent, flip=(False, False, False)) -> None:
    """``dst[dst_lo + t] = src[src_lo + t']`` over a box of ``extent`` voxels of two (x, y, z) arrays, ``t'`` mirrored
    (``extent - 1 - t``) on the axes in ``flip``, cast to ``dst``'s dtype: what :func:`copy_box` does for one channel,
    for a decoded chunk of a case store written into a (mirrored) patch (:mod:`nnfast.io.store_reader` calls the
    kernel itself, once per chunk).

    Parameters
    ----------
    src, dst : (x, y, z) C-contiguous numeric arrays, not float16 (Numba has no float16 arrays); the dtypes may
        differ (values are cast as numpy's ``unsafe`` casting does).
    src_lo, dst_lo, extent : 3 ints each; both boxes must lie inside their arrays.
    flip : 3 bools.

    Raises
    ------
    ShapeError
        Not 3D C-contiguous arrays, or a box outside its array.
    """
    if (not isinstance(src, np.ndarray) or not isinstance(dst, np.ndarray) or src.ndim != 3 or dst.ndim != 3
            or not src.flags.c_contiguous or not dst.flags.c_contiguous):
        raise ShapeError(f"copy_chunk: src and dst must be C-contiguous (x, y, z) arrays, got "
                         f"{getattr(src, 'shape', type(src))} and {getattr(dst, 'shape', type(dst))}")
    lo_s, lo_d, ext = ([int(v) for v in a] for a in (src_lo, dst_lo, extent))
    if (len(lo_s) != 3 or len(lo_d) != 3 or len(ext) != 3 or min(ext) < 0 or min(lo_s) < 0 or min(lo_d) < 0
            or any(a + e > n for a, e, n in zip(lo_s, ext, src.shape))
            or any(a + e > n for a, e, n in zip(lo_d, ext, dst.shape))):
        raise ShapeError(f"copy_chunk: the box {tuple(ext)} at {tuple(lo_s)} / {tuple(lo_d)} does not fit src "
                         f"{src.shape} / dst {dst.shape}")
    _copy_chunk(src, dst, *lo_s, *lo_d, *ext, bool(flip[0]), bool(flip[1]), bool(flip[2]))


def copy_box(src, dst, src_lo, dst_lo, extent, flip=(False, False, False)):
    """``dst[:, dst_lo + t] = src[:, src_lo + t']`` over a box of ``extent`` voxels, ``t'`` mirrored (``extent - 1 -
    t``) on the axes in ``flip``: a crop written mirrored, as the spatial step does when no rotation or scaling fires.

    Parameters
    ----------
    src, dst : (c, x, y, z) C-contiguous arrays of one dtype and channel count.
    src_lo, dst_lo, extent : 3 ints each; both boxes must lie inside their arrays.
    flip : 3 bools.
    """
    if (not isinstance(src, np.ndarray) or not isinstance(dst, np.ndarray) or src.ndim != 4 or dst.ndim != 4
            or src.dtype != dst.dtype or src.shape[0] != dst.shape[0] or not src.flags.c_contiguous
            or not dst.flags.c_contiguous):
        raise ShapeError(f"copy_box: src and dst must be C-contiguous (c, x, y, z) arrays of one dtype and channel "
                         f"count, got {getattr(src, 'dtype', type(src))} {getattr(src, 'shape', None)} and "
                         f"{getattr(dst, 'dtype', type(dst))} {getattr(dst, 'shape', None)}")
    lo_s, lo_d, ext = (np.array([int(v) for v in a], np.int64) for a in (src_lo, dst_lo, extent))
    if (lo_s.shape != (3,) or lo_d.shape != (3,) or ext.shape != (3,) or (ext < 0).any() or (lo_s < 0).any()
            or (lo_d < 0).any() or (lo_s + ext > np.array(src.shape[1:])).any()
            or (lo_d + ext > np.array(dst.shape[1:])).any()):
        raise ShapeError(f"copy_box: the box {tuple(ext)} at {tuple(lo_s)} / {tuple(lo_d)} does not fit src "
                         f"{src.shape[1:]} / dst {dst.shape[1:]}")
    _copy_box(src, dst, lo_s, lo_d, ext, bool(flip[0]), bool(flip[1]), bool(flip[2]))


def _check_warp_inputs(image, seg, matrix, centre, patch_shape, nd_matrix, what):
    if not isinstance(image, np.ndarray) or image.dtype != np.float32 or image.ndim != 4:
        raise ShapeError(f"{what}: image must be a float32 array (c, x, y, z), got "
                         f"{getattr(image, 'dtype', type(image))} with shape {getattr(image, 'shape', None)}")
    if seg is None:
        seg = np.zeros((0, *image.shape[1:]), np.int16)
    if not isinstance(seg, np.ndarray) or seg.ndim != 4 or seg.dtype not in (np.int8, np.int16, np.int32):
        raise ShapeError(f"{what}: seg must be an int8/int16/int32 array (c, x, y, z), got "
                         f"{getattr(seg, 'dtype', type(seg))} with shape {getattr(seg, 'shape', None)}")
    if seg.shape[1:] != image.shape[1:]:
        raise ShapeError(f"{what}: seg spatial shape {seg.shape[1:]} differs from the image's {image.shape[1:]}")
    matrix = np.ascontiguousarray(matrix, dtype=np.float64)
    centre = np.ascontiguousarray(centre, dtype=np.float64)
    if matrix.shape != (nd_matrix, nd_matrix) or centre.shape != (nd_matrix,) or len(patch_shape) != nd_matrix:
        raise ShapeError(f"{what}: expected a ({nd_matrix}, {nd_matrix}) matrix and {nd_matrix} centre coordinates / "
                         f"patch sizes, got {matrix.shape}, {centre.shape}, {tuple(patch_shape)}")
    if any(int(p) < 1 for p in patch_shape):
        raise ShapeError(f"{what}: patch_shape must be positive, got {tuple(patch_shape)}")
    if int(np.prod(image.shape[1:], dtype=np.int64)) >= 2**31 - 1:
        raise ShapeError(f"{what}: a region of {image.shape[1:]} voxels per channel is too large (the kernels use "
                         "int32 offsets); read the box needed_region returns, not the whole case")
    return np.ascontiguousarray(image), np.ascontiguousarray(seg), matrix, centre


def _outputs(out_image, out_seg, img_shape, seg_shape, seg_dtype, what):
    if out_image is None:
        out_image = np.empty(img_shape, np.float32)
    elif out_image.shape != img_shape or out_image.dtype != np.float32 or not out_image.flags.c_contiguous:
        raise ShapeError(f"{what}: out_image must be C-contiguous float32 {img_shape}, got {out_image.dtype} "
                         f"{out_image.shape}")
    if out_seg is None:
        out_seg = np.empty(seg_shape, seg_dtype)
    elif out_seg.shape != seg_shape or out_seg.dtype != seg_dtype or not out_seg.flags.c_contiguous:
        raise ShapeError(f"{what}: out_seg must be C-contiguous {np.dtype(seg_dtype)} {seg_shape}, got "
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


@register_warmup
def _warmup() -> None:
    """Compile every signature the augmentation pipeline uses (float32 images, int8/int16 labels)."""
    img = np.zeros((1, 4, 5, 6), np.float32)
    for dt in (np.int8, np.int16):
        seg = np.zeros((1, 4, 5, 6), dt)
        seg[0, 1:3, 1:3, 1:4] = 1
        warp_3d(img, seg, np.eye(3) * 1.1, (1.5, 2.0, 2.5), (3, 4, 5), flip=(True, False, True))
        warp_2d(img, seg, np.eye(2) * 0.9, (2.0, 2.5), (4, 5), flip=(True, False, True))
        copy_box(seg, np.empty_like(seg), (0, 1, 2), (1, 0, 0), (3, 4, 4), (True, False, True))
    copy_box(img, np.empty_like(img), (0, 1, 2), (1, 0, 0), (3, 4, 4), (True, False, True))
    # the store reader's chunk copies: float32 images, int8/int16 labels into int16 batch slots (and int8 ones)
    for s_dt, d_dt in ((np.float32, np.float32), (np.int8, np.int16), (np.int16, np.int16), (np.int8, np.int8)):
        for f in (False, True):
            copy_chunk(np.zeros((2, 3, 4), s_dt), np.empty((3, 4, 5), d_dt), (0, 0, 0), (1, 0, 1), (2, 3, 4), (f, f, f))
