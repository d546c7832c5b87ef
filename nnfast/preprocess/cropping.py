"""Cropping to the nonzero region (nnU-Net's ``crop_to_nonzero``), on nnfast's kernels.

nnU-Net rule (``nnunetv2/preprocessing/cropping/cropping.py``): the nonzero mask is the union over channels of
``data != 0`` with 6-connected holes filled; the data are cropped to its half-open bounding box (the full image
when nothing is nonzero); in the cropped label map, background voxels (0) outside the mask become
``nonzero_label`` (-1), and without a label map an int8 map is made that is 0 inside and -1 outside the mask.

Differences from nnU-Net, on purpose: the caller's ``seg`` is never modified (nnU-Net writes -1 into a view of
it), and the returned ``seg`` is always a new C-contiguous array. The returned ``data`` is a view of the input,
as in nnU-Net.
"""
from __future__ import annotations

import numpy as np

from nnfast.errors import ShapeError
from nnfast.native.crop import label_outside_mask, nonzero_mask_and_bbox, seg_from_mask

__all__ = ["crop_to_nonzero"]


def crop_to_nonzero(
    data: np.ndarray, seg: np.ndarray | None = None, nonzero_label: int = -1
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Crop image channels (and labels) to the bounding box of the hole-filled nonzero mask.

    Parameters
    ----------
    data : ndarray, shape (c, x, y, z)
        Image channels in nnU-Net's axis order (after transposition), any numeric dtype and layout.
    seg : ndarray, shape (k, x, y, z), optional
        Label map(s) on the same grid (usually k = 1), signed integer or float dtype. Not modified.
    nonzero_label : int
        Written into background voxels outside the nonzero mask (nnU-Net: -1).

    Returns
    -------
    data_cropped : ndarray, shape (c, x', y', z')
        A view of ``data``.
    seg_cropped : ndarray, shape (k, x', y', z') or (1, x', y', z')
        ``seg``'s dtype, or int8 (0 inside / ``nonzero_label`` outside) when ``seg`` is None; a new array.
    bbox : list of three [start, end) lists of ints
        The crop box in ``data``'s spatial axes (``properties['bbox_used_for_cropping']`` in nnU-Net).

    Raises
    ------
    ValueError
        If ``data`` is not (c, x, y, z), ``seg`` does not match its spatial shape, or ``seg``'s dtype cannot
        hold ``nonzero_label`` (e.g. uint8 with -1).
    """
    if not isinstance(data, np.ndarray) or data.ndim != 4:
        got = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise ShapeError(f"crop_to_nonzero: data must be an array of shape (c, x, y, z); got {got}")
    if seg is not None and (not isinstance(seg, np.ndarray) or seg.ndim != 4 or seg.shape[1:] != data.shape[1:]):
        got = seg.shape if isinstance(seg, np.ndarray) else type(seg).__name__
        raise ShapeError(f"crop_to_nonzero: seg must have shape (k, {', '.join(map(str, data.shape[1:]))}) to match "
                         f"data {data.shape}; got {got}")
    mask, bbox = nonzero_mask_and_bbox(data)
    slicer = tuple(slice(start, end) for start, end in bbox)
    mask = mask[slicer]
    data_cropped = data[(slice(None), *slicer)]
    if seg is None:
        seg_cropped = seg_from_mask(mask, nonzero_label)
    else:
        seg_cropped = label_outside_mask(seg[(slice(None), *slicer)], mask, nonzero_label)
    return data_cropped, seg_cropped, bbox
