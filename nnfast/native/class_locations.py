"""Label counting and rank-to-coordinate lookup for sampling class locations (nnU-Net's oversampling targets).

nnU-Net's ``DefaultPreprocessor._sample_foreground_locations`` builds ``np.argwhere`` over every voxel of every
requested label, stable-sorts it by label and then picks random offsets into the per-label blocks. The k-th
entry of a label's block is simply the k-th voxel of that label in C order, so the same picks need only

1. one pass counting the voxels of each requested label (:func:`count_labels`), after which the caller draws
   the random offsets (numpy's ``RandomState``, to reproduce nnU-Net's stream), and
2. one pass that walks the volume in C order with a running count per label and writes the coordinates of
   the requested ranks (:func:`locate_ranked_voxels`), stopping as soon as every request is served.

No coordinate array of all foreground voxels, no per-label boolean masks, no sort of the volume.

Labels are matched like ``np.isin(seg, labels)``: a float label map matches where its value equals the integer
label exactly (NaN and non-integral values match nothing).
"""
from __future__ import annotations

import numpy as np

from nnfast.errors import InputTypeError, LabelError, ShapeError, UsageError

from ._jit import register_warmup, run_slabs, serial

__all__ = ["count_labels", "locate_ranked_voxels"]

_MAX_LABEL_SPAN = 1 << 22  # labels are looked up in a table spanning min(labels)..max(labels)


# --------------------------------------------------------------------------------------------- kernels
@serial
def _count_labels(seg, lut, lo, counts):
    """counts[lut[v - lo]] += 1 for every voxel value v that is a requested integer label."""
    n_x, n_y, n_z = seg.shape
    hi = lo + lut.shape[0] - 1
    for x in range(n_x):
        for y in range(n_y):
            for z in range(n_z):
                v = seg[x, y, z]
                if not (v >= lo and v <= hi):  # also false for NaN
                    continue
                iv = np.int64(v)
                if iv != v:
                    continue
                slot = lut[iv - lo]
                if slot >= 0:
                    counts[slot] += 1


@serial
def _locate_ranked(seg, lut, lo, starts, ranks, rows, out):
    """Write (0, x, y, z) of the ranks[p]-th voxel (C order) of slot s into out[rows[p]], p in starts[s]:starts[s+1].

    ``ranks`` must be sorted within each slot's segment (duplicates allowed).
    """
    n_x, n_y, n_z = seg.shape
    hi = lo + lut.shape[0] - 1
    n_slots = starts.shape[0] - 1
    seen = np.zeros(n_slots, np.int64)
    ptr = starts[:-1].copy()
    remaining = starts[n_slots] - starts[0]
    if remaining == 0:
        return
    for x in range(n_x):
        for y in range(n_y):
            for z in range(n_z):
                v = seg[x, y, z]
                if not (v >= lo and v <= hi):
                    continue
                iv = np.int64(v)
                if iv != v:
                    continue
                slot = lut[iv - lo]
                if slot < 0:
                    continue
                rank = seen[slot]
                seen[slot] = rank + 1
                p = ptr[slot]
                end = starts[slot + 1]
                while p < end and ranks[p] == rank:
                    row = rows[p]
                    out[row, 0] = 0
                    out[row, 1] = x
                    out[row, 2] = y
                    out[row, 3] = z
                    p += 1
                    remaining -= 1
                ptr[slot] = p
                if remaining == 0:
                    return


# --------------------------------------------------------------------------------------------- wrappers
def _spatial(seg: np.ndarray) -> np.ndarray:
    """(x, y, z) view of a (1, x, y, z) or (x, y, z) label map, C-ordered (copied only if its axes are not)."""
    if not isinstance(seg, np.ndarray):
        raise InputTypeError(f"seg must be a numpy array of shape (1, x, y, z) or (x, y, z); got {type(seg).__name__}")
    if seg.ndim == 4:
        if seg.shape[0] != 1:
            raise ShapeError(f"seg must have one channel, shape (1, x, y, z); got shape {seg.shape}")
        seg = seg[0]
    if seg.ndim != 3:
        raise ShapeError(f"seg must have shape (1, x, y, z) or (x, y, z); got shape {seg.shape}")
    if seg.dtype == np.bool_:
        seg = seg.view(np.uint8)
    if seg.dtype.kind not in "iuf":
        raise ShapeError(f"seg must have an integer or float dtype; got {seg.dtype}")
    strides = [abs(s) for s, n in zip(seg.strides, seg.shape) if n > 1]
    if strides != sorted(strides, reverse=True):
        seg = np.ascontiguousarray(seg)  # C-order ranks need a C-order walk; keep it cache friendly
    return seg


def _lookup(labels) -> tuple[np.ndarray, int, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size == 0:
        return labels, 0, np.full(1, -1, np.int32)
    if np.unique(labels).size != labels.size:
        raise UsageError(f"labels must be distinct; got {labels.tolist()}")
    lo, hi = int(labels.min()), int(labels.max())
    if hi - lo >= _MAX_LABEL_SPAN:
        raise LabelError(f"labels span {lo}..{hi}, more than {_MAX_LABEL_SPAN} values; relabel to small integers")
    lut = np.full(hi - lo + 1, -1, np.int32)
    lut[labels - lo] = np.arange(labels.size, dtype=np.int32)
    return labels, lo, lut


def count_labels(seg: np.ndarray, labels) -> np.ndarray:
    """Number of voxels of each label, in one pass.

    Parameters
    ----------
    seg : ndarray, shape (1, x, y, z) or (x, y, z)
        Label map in nnU-Net's axis order, integer or float dtype, any layout.
    labels : sequence of int
        Distinct labels (may be negative, e.g. -1).

    Returns
    -------
    ndarray of int64, shape (len(labels),)

    Raises
    ------
    TypeError, ValueError
        On a malformed ``seg`` or repeated/widely spread labels.
    """
    seg = _spatial(seg)
    labels, lo, lut = _lookup(labels)
    counts = np.zeros(labels.size, np.int64)
    if labels.size:  # x-slabs on the threads this process may use, each with its own (exact, integer) counts
        parts: list = []

        def slab(a, b):
            part = np.zeros(labels.size, np.int64)
            _count_labels(seg[a:b], lut, np.int64(lo), part)
            parts.append(part)
        run_slabs(slab, seg.shape[0], items=seg.size)
        for part in parts:
            counts += part
    return counts


def locate_ranked_voxels(seg: np.ndarray, labels, label_index, ranks) -> np.ndarray:
    """Coordinates of the ``ranks[j]``-th voxel (C order, 0-based) of label ``labels[label_index[j]]``.

    This is row ``ranks[j]`` of ``np.argwhere(seg == labels[label_index[j]])`` for a (1, x, y, z) ``seg``,
    without building those arrays.

    Parameters
    ----------
    seg : ndarray, shape (1, x, y, z) or (x, y, z)
        Label map, integer or float dtype, any layout.
    labels : sequence of int
        Distinct labels.
    label_index : array of int, shape (m,)
        Index into ``labels`` per request.
    ranks : array of int, shape (m,)
        0-based rank per request; must be < the label's voxel count (see :func:`count_labels`).

    Returns
    -------
    ndarray of int64, shape (m, 4)
        ``(0, x, y, z)`` per request, in request order (the leading 0 is the channel index, as in nnU-Net).

    Raises
    ------
    ValueError
        On mismatched request arrays, a label index out of range or a rank beyond its label's voxel count.
    """
    seg = _spatial(seg)
    labels, lo, lut = _lookup(labels)
    label_index = np.asarray(label_index, dtype=np.int64).reshape(-1)
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if label_index.shape != ranks.shape:
        raise ShapeError(f"label_index and ranks must have one entry per request; got {label_index.shape} and "
                         f"{ranks.shape}")
    out = np.full((ranks.size, 4), -1, np.int64)
    if ranks.size == 0:
        return out
    if label_index.min() < 0 or label_index.max() >= labels.size or ranks.min() < 0:
        raise UsageError(f"label_index must lie in [0, {labels.size}) and ranks be >= 0")
    order = np.lexsort((ranks, label_index))  # by label, then rank
    starts = np.searchsorted(label_index[order], np.arange(labels.size + 1)).astype(np.int64)
    _locate_ranked(seg, lut, np.int64(lo), starts, ranks[order], order.astype(np.int64), out)
    if out[:, 0].min() < 0:
        missing = np.flatnonzero(out[:, 0] < 0)[0]
        raise UsageError(f"request {missing} asks for voxel rank {ranks[missing]} of label "
                         f"{labels[label_index[missing]]}, which has fewer voxels")
    return out


@register_warmup
def _warmup() -> None:
    """Compile the signatures preprocessing passes: contiguous int8 label maps (other dtypes and views compile on
    first use; each signature costs ~0.5 s on a cold start)."""
    seg = np.zeros((1, 3, 4, 5), np.int8)
    seg[0, 1, 2, 3] = 1
    seg[0, 2, 1, 0] = -1
    count_labels(seg, [1, -1])
    locate_ranked_voxels(seg, [1, -1], [0, 1], [0, 0])
