"""Label-map resampling with nnU-Net parity in one pass (one-hot linear, batchgenerators 0.25.5 decision rule).

nnU-Net resamples segmentations with ``batchgenerators.augmentations.utils.resize_segmentation(seg, shape,
order=1)`` per channel (per 2D slice on the separate-z path, then nearest along z). In batchgenerators 0.25.5
that resizes the one-hot mask of every label present, ``resize((seg == c).astype(float), shape, 1,
mode='edge', clip=True, anti_aliasing=False)``, and decides per voxel: with ``S`` the largest score, the
nearest-neighbour label (``resize(seg, shape, 0)``) wins if its score equals ``S > 0``, otherwise the smallest
label whose score is ``S``.

This module computes the same decision in a single pass over the output, without any per-label volume:

* Each output voxel has 8 linear taps (scipy ``zoom(order=1, mode='nearest', grid_mode=True)``: coordinate
  ``cc = (k + 0.5) * n_in / n_out - 0.5`` not clamped, taps ``floor(cc)`` and ``floor(cc) + 1`` clamped to the
  array, weights ``w0 = 1 - (cc - floor(cc))``, ``w1 = 1 - w0``). A label's score is scipy's sum for its
  one-hot mask: the tap products ``(w_x * w_y) * w_z`` of the taps holding that label, added from 0.0 in
  scipy's tap order (C order, last axis fastest). Taps holding other labels add exact zeros there, so the
  scores, and with them every exact tie (0.5/0.5 at even zoom factors), come out bit-identical.
* Scores are clipped to [0, 1] like skimage's ``clip=True`` on a 0/1 mask.
* Fast path: when the 8 taps hold one label, that label is the answer.
* Labels are compared by value: the smallest tied label wins, so ``-1`` (outside the nonzero region) wins
  ties against background, as in nnU-Net, which iterates ``np.sort(pd.unique(seg))``. Labels that do not
  occur under a voxel's taps score 0 there and cannot win (``S > 0``), so which labels exist elsewhere in
  the volume or slice never matters.
* Separate-z: the low-resolution axis gets taps ``(nearest, nearest)`` with weights ``(1, 0)``; the products
  then equal the 2D in-plane products, so one pass gives per-slice 2D resizing followed by nearest along z.
"""
from __future__ import annotations

import math

import numpy as np

from nnfast.errors import InputTypeError, LabelError, ShapeError, UsageError

from ._jit import register_warmup, run_slabs, serial
from .resample import check_new_shape

__all__ = ["resize_labels", "resize_labels_separate_z", "label_taps"]

_LABEL_DTYPES = (np.int8, np.int16, np.int32, np.uint8)


# --------------------------------------------------------------------------------------------- kernels
@serial
def _linear_taps(n_in, n_out, order):
    """Per output index: two tap indices, their weights and the nearest-neighbour index.

    ``order`` 1: scipy's linear taps (a zero-weight second tap is folded onto the first, which changes no
    sum). ``order`` 0: both taps on the nearest index with weights (1, 0).
    """
    idx = np.empty((n_out, 2), np.int64)
    w = np.empty((n_out, 2), np.float64)
    nn = np.empty(n_out, np.int64)
    zoom = n_in / n_out
    for k in range(n_out):
        cc = float(k)
        cc += 0.5
        cc *= zoom
        cc -= 0.5
        near = min(max(int(math.floor(cc + 0.5)), 0), n_in - 1)
        nn[k] = near
        if order == 1:
            f = math.floor(cc)
            w0 = 1.0 - (cc - f)
            w1 = 1.0
            w1 -= w0
            i0 = min(max(int(f), 0), n_in - 1)
            i1 = min(max(int(f) + 1, 0), n_in - 1)
            if w1 == 0.0:
                i1 = i0
        else:
            w0 = 1.0
            w1 = 0.0
            i0 = near
            i1 = near
        idx[k, 0] = i0
        idx[k, 1] = i1
        w[k, 0] = w0
        w[k, 1] = w1
    return idx, w, nn


@serial
def _add_score(labs, scores, n, label, p):
    """Add ``p`` to ``label``'s score in the first ``n`` slots (appending it if new); returns the new ``n``."""
    for t in range(n):
        if labs[t] == label:
            scores[t] += p
            return n
    labs[n] = label
    scores[n] = 0.0 + p
    return n + 1


@serial
def _resize_labels(seg, out, ia, wa, na, ib, wb, nb, ic, wc, nc):
    """One-hot linear resize of ``seg`` (x, y, z) into ``out`` with the batchgenerators 0.25.5 decision.

    ``i*``/``w*`` (n_out, 2): taps and weights per axis; ``n*`` (n_out,): nearest-neighbour indices.
    """
    n_x, n_y, n_z = out.shape
    labs = np.empty(8, seg.dtype)
    scores = np.empty(8, np.float64)
    for i in range(n_x):
        a0 = ia[i, 0]
        a1 = ia[i, 1]
        wa0 = wa[i, 0]
        wa1 = wa[i, 1]
        for j in range(n_y):
            b0 = ib[j, 0]
            b1 = ib[j, 1]
            p00 = wa0 * wb[j, 0]
            p01 = wa0 * wb[j, 1]
            p10 = wa1 * wb[j, 0]
            p11 = wa1 * wb[j, 1]
            r00 = seg[a0, b0]
            r01 = seg[a0, b1]
            r10 = seg[a1, b0]
            r11 = seg[a1, b1]
            row = out[i, j]
            for k in range(n_z):
                c0 = ic[k, 0]
                c1 = ic[k, 1]
                l0 = r00[c0]
                l1 = r00[c1]
                l2 = r01[c0]
                l3 = r01[c1]
                l4 = r10[c0]
                l5 = r10[c1]
                l6 = r11[c0]
                l7 = r11[c1]
                if (l0 == l1 and l0 == l2 and l0 == l3 and l0 == l4 and l0 == l5 and l0 == l6
                        and l0 == l7):
                    row[k] = l0
                    continue
                wc0 = wc[k, 0]
                wc1 = wc[k, 1]
                labs[0] = l0  # the first score of the voxel (inline: a literal n = 0 would compile _add_score twice)
                scores[0] = 0.0 + p00 * wc0
                n = _add_score(labs, scores, np.int64(1), l1, p00 * wc1)
                n = _add_score(labs, scores, n, l2, p01 * wc0)
                n = _add_score(labs, scores, n, l3, p01 * wc1)
                n = _add_score(labs, scores, n, l4, p10 * wc0)
                n = _add_score(labs, scores, n, l5, p10 * wc1)
                n = _add_score(labs, scores, n, l6, p11 * wc0)
                n = _add_score(labs, scores, n, l7, p11 * wc1)
                top = 0.0
                for t in range(n):
                    s = min(scores[t], 1.0)  # skimage clip=True on a 0/1 mask
                    scores[t] = s
                    if s > top:
                        top = s
                near = seg[na[i], nb[j], nc[k]]
                near_score = 0.0
                for t in range(n):
                    if labs[t] == near:
                        near_score = scores[t]
                if near_score == top and top > 0.0:
                    row[k] = near
                    continue
                best = labs[0]
                found = False
                for t in range(n):
                    if scores[t] == top and (not found or labs[t] < best):
                        best = labs[t]
                        found = True
                row[k] = best


# --------------------------------------------------------------------------------------------- wrappers
def label_taps(n_in: int, n_out: int, order: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear (``order=1``) or nearest (``order=0``) taps of one axis, as the label kernel uses them.

    Returns ``idx`` (n_out, 2) int64, ``w`` (n_out, 2) float64 and the nearest index ``nn`` (n_out,) int64.
    """
    if order not in (0, 1):
        raise UsageError(f"label resampling supports order 0 or 1; got {order}")
    if n_in < 1 or n_out < 1:
        raise ShapeError(f"axis sizes must be >= 1; got {n_in} -> {n_out}")
    return _linear_taps(int(n_in), int(n_out), int(order))


def _check_seg(seg, new_shape, labels) -> tuple[np.ndarray, tuple[int, int, int]]:
    if not isinstance(seg, np.ndarray):
        raise InputTypeError(f"seg must be a numpy array of shape (x, y, z) or (c, x, y, z); got {type(seg).__name__}")
    if seg.ndim not in (3, 4):
        raise ShapeError(f"seg must have shape (x, y, z) or (c, x, y, z); got shape {seg.shape}")
    if seg.dtype not in _LABEL_DTYPES:
        raise ShapeError(f"seg must be int8, int16, int32 or uint8 labels; got {seg.dtype} (cast label maps first)")
    shape = check_new_shape(new_shape)
    if labels is not None and seg.size:
        allowed = np.asarray(labels)
        if not np.isin(seg, allowed).all():
            extra = np.setdiff1d(np.unique(seg), allowed)
            raise LabelError(f"seg holds values {extra.tolist()[:10]} that are not in labels {allowed.tolist()}")
    return seg, shape  # type: ignore[return-value]


def _run(seg: np.ndarray, shape, taps) -> np.ndarray:
    four = seg.ndim == 4
    seg4 = seg if four else seg[None]
    out = np.empty((seg4.shape[0], *shape), seg.dtype)
    if seg4.size == 0:  # batchgenerators: an empty map resizes to zeros
        out[...] = 0
    else:
        (ia, wa, na), tb, tc = taps
        for c in range(seg4.shape[0]):
            src, dst = np.ascontiguousarray(seg4[c]), out[c]
            # slabs of output x-rows on the threads this process may use: rows are independent, same labels
            run_slabs(lambda a, b: _resize_labels(src, dst[a:b], ia[a:b], wa[a:b], na[a:b], *tb, *tc),
                      dst.shape[0], items=dst.size)
    return out if four else out[0]


def resize_labels(seg: np.ndarray, new_shape, labels=None, order: int = 1) -> np.ndarray:
    """nnU-Net's ``resize_segmentation(seg, new_shape, order)`` (batchgenerators 0.25.5) in one pass.

    Parameters
    ----------
    seg : ndarray, shape (x, y, z) or (c, x, y, z), int8/int16/int32/uint8
        Label map(s) in nnU-Net's axis order; channels are resized independently. Negative labels (nnU-Net's
        -1 outside the nonzero region) are ordinary labels. Any memory layout; not modified.
    new_shape : sequence of 3 int
        Output spatial shape (x, y, z).
    labels : sequence of int, optional
        If given, ``seg`` is checked to hold only these values. The result does not depend on it.
    order : {1, 0}
        1: one-hot linear with the argmax / nearest tie-break rule (nnU-Net's label resampling);
        0: nearest neighbour (skimage ``resize`` order 0).

    Returns
    -------
    ndarray, shape ([c,] *new_shape), same dtype as ``seg``, C-contiguous
        Bit-identical to nnU-Net's result.

    Raises
    ------
    TypeError, ValueError
        On a non-array, wrong ndim or dtype, bad ``new_shape`` or ``order``, or values outside ``labels``.
    """
    seg, shape = _check_seg(seg, new_shape, labels)
    in_shape = seg.shape[-3:]
    taps = [label_taps(max(in_shape[a], 1), shape[a], order) for a in range(3)]
    return _run(seg, shape, taps)


def resize_labels_separate_z(seg: np.ndarray, new_shape, axis: int, order: int = 1,
                             labels=None) -> np.ndarray:
    """nnU-Net's separate-z label resampling: per-slice 2D ``resize_segmentation``, then nearest along ``axis``.

    Reproduces ``resample_data_or_seg(seg, new_shape, is_seg=True, axis=axis, order=order,
    do_separate_z=True, order_z=0)``: every 2D slice along ``axis`` is resized in-plane with the one-hot
    linear rule of :func:`resize_labels`; if the size along ``axis`` changes, slice
    ``floor((k + 0.5) * n_in / n_out - 0.5 + 0.5)`` is taken for output slice ``k`` (``map_coordinates``
    order 0). Computed in one pass.

    Parameters
    ----------
    seg : ndarray, shape (x, y, z) or (c, x, y, z), int8/int16/int32/uint8
        Label map(s) in nnU-Net's axis order; any layout; not modified.
    new_shape : sequence of 3 int
        Output spatial shape (x, y, z).
    axis : {0, 1, 2}
        The low-resolution spatial axis.
    order : {1, 0}
        In-plane order.
    labels : sequence of int, optional
        See :func:`resize_labels`.

    Returns
    -------
    ndarray, shape ([c,] *new_shape), same dtype as ``seg``

    Raises
    ------
    TypeError, ValueError
        As :func:`resize_labels`, or if ``axis`` is not 0, 1 or 2.
    """
    seg, shape = _check_seg(seg, new_shape, labels)
    if axis not in (0, 1, 2):
        raise UsageError(f"axis must be the spatial axis 0, 1 or 2 of (x, y, z); got {axis}")
    in_shape = seg.shape[-3:]
    taps = [label_taps(max(in_shape[a], 1), shape[a], order) for a in range(3)]
    taps[axis] = label_taps(max(in_shape[axis], 1), shape[axis], 0)  # nearest along z
    return _run(seg, shape, taps)


@register_warmup
def _warmup() -> None:
    """Compile the label kernel for the dtype preprocessing passes (int8, C-contiguous: label maps are made int8 when
    their labels fit, :mod:`nnfast.preprocess.pipeline`); the other supported dtypes (int16 beyond 127 labels)
    compile on first use (~2 s each on a cold start)."""
    for dtype in (np.int8,):
        tiny = np.zeros((1, 3, 4, 5), dtype)
        tiny[0, 1:, 1:3, 2:] = 1
        resize_labels(tiny, (4, 3, 6))
        resize_labels_separate_z(tiny[0], (2, 5, 3), axis=2)
