"""Nonzero mask with hole filling and bounding boxes (nnU-Net's cropping to the nonzero region).

Reproduces ``nnunetv2.preprocessing.cropping.cropping.create_nonzero_mask`` (union over channels of
``data != 0``, then ``scipy.ndimage.binary_fill_holes`` with its default 6-connected structure) and
``acvl_utils.cropping_and_padding.bounding_boxes.get_bbox_from_mask`` (half-open ``[start, end)`` per axis,
the full image when the mask is empty).

How it works
------------
One fused pass over the data writes the channel union into a ``uint8`` mask and records, row by row, the
bounding box of the nonzero voxels. Hole filling is a flood fill of the background from the border with an
explicit, growable stack of scanline seeds (no recursion, O(N)). Only the bounding box needs filling: every
background voxel outside it lies in a slab that touches the array border, so it is reachable from outside,
and a background voxel on a face of the box is adjacent to such a voxel (or to the border itself). Filled
holes therefore never move the bounding box, and the box of the nonzero voxels is the box of the filled
mask.

Memory order: kernels loop in C order over the spatial axes. A view whose spatial axes are permuted in
memory (a transposed or Fortran-ordered array) is handled by permuting the axes so that they are in memory
order, running the kernels and permuting the result back; hole filling and bounding boxes commute with axis
permutations, so no copy is ever made.
"""
from __future__ import annotations

import numpy as np

from nnfast.errors import InputTypeError, LabelError, ShapeError

from ._jit import register_warmup, run_slabs, serial

__all__ = ["nonzero_mask", "nonzero_mask_and_bbox", "bbox_from_mask", "label_outside_mask", "seg_from_mask"]

_FOREGROUND = 1
_REACHED = 2  # background voxel connected to the outside (temporary marker during the fill)


# --------------------------------------------------------------------------------------------- kernels
@serial
def _nonzero_mask_bbox(data, mask):
    """Write ``any(data[c] != 0 for c)`` into ``mask`` (uint8 0/1) and return the nonzero bounding box.

    data: (c, x, y, z), any numeric dtype and layout. mask: (x, y, z) uint8, written completely.
    Returns (x0, x1, y0, y1, z0, z1) half-open; x0 == -1 when no voxel is nonzero.
    """
    n_c, n_x, n_y, n_z = data.shape
    x0, x1, y0, y1, z0, z1 = n_x, -1, n_y, -1, n_z, -1
    for x in range(n_x):
        for y in range(n_y):
            row = mask[x, y]
            for z in range(n_z):
                row[z] = data[0, x, y, z] != 0
            for c in range(1, n_c):
                for z in range(n_z):
                    if data[c, x, y, z] != 0:
                        row[z] = 1
            first = -1
            for z in range(n_z):
                if row[z] != 0:
                    first = z
                    break
            if first < 0:
                continue
            last = first
            for z in range(n_z - 1, first, -1):
                if row[z] != 0:
                    last = z
                    break
            if x < x0:
                x0 = x
            x1 = x
            if y < y0:
                y0 = y
            if y > y1:
                y1 = y
            if first < z0:
                z0 = first
            if last > z1:
                z1 = last
    if x1 < 0:
        return -1, -1, -1, -1, -1, -1
    return x0, x1 + 1, y0, y1 + 1, z0, z1 + 1


@serial
def _grow(stack):
    """A stack buffer twice as large holding the same entries."""
    grown = np.empty(2 * stack.shape[0], np.int64)
    for i in range(stack.shape[0]):  # a loop, not a slice assignment: that one compiles numba's broadcasting and its
        grown[i] = stack[i]           # error-message formatting, ~3 s on a cold start
    return grown


@serial
def _flood(mask, stack, sp, x0, x1, y0, y1, z0, z1):
    """Scanline flood fill of background (0) voxels with ``_REACHED`` inside the box, from the seeds on the stack.

    Seeds are flat indices into ``mask`` (C order); ``sp`` of them are on ``stack``. Each popped background voxel
    is extended to its full run along z; the four neighbouring rows (x +- 1, y +- 1) inside the box get one seed
    per background run that overlaps the filled run. Returns 0 when done, or the number of seeds still on the
    stack when it is too small for the next run's seeds: the caller then grows it and calls again. (Growing
    the array inside this loop would make Numba reload it at every access, ~10x slower.)
    """
    n_y = mask.shape[1]
    n_z = mask.shape[2]
    plane = n_y * n_z
    capacity = stack.shape[0]
    while sp > 0:
        sp -= 1
        idx = stack[sp]
        x = idx // plane
        rem = idx - x * plane
        y = rem // n_z
        z = rem - y * n_z
        if mask[x, y, z] != 0:
            continue
        lo = z
        while lo > z0 and mask[x, y, lo - 1] == 0:
            lo -= 1
        hi = z
        while hi < z1 - 1 and mask[x, y, hi + 1] == 0:
            hi += 1
        if sp + 2 * (hi - lo + 2) > capacity:  # at most ceil(len / 2) run starts in each of 4 rows
            return sp + 1  # the popped seed is still in place
        for k in range(lo, hi + 1):
            mask[x, y, k] = _REACHED
        for nb in range(4):
            nx = x
            ny = y
            if nb == 0:
                nx = x - 1
            elif nb == 1:
                nx = x + 1
            elif nb == 2:
                ny = y - 1
            else:
                ny = y + 1
            if nx < x0 or nx >= x1 or ny < y0 or ny >= y1:
                continue
            prev_bg = False
            base = nx * plane + ny * n_z
            for k in range(lo, hi + 1):
                is_bg = mask[nx, ny, k] == 0
                if is_bg and not prev_bg:
                    stack[sp] = base + k
                    sp += 1
                prev_bg = is_bg
    return 0


@serial
def _fill_holes(mask, x0, x1, y0, y1, z0, z1, capacity):
    """Fill the holes of the 0/1 ``mask`` inside the half-open box, in place (6-connectivity, like scipy).

    Background voxels inside the box that are not 6-connected to a face of the box become 1. Voxels
    outside the box are not touched (they must all be background). ``capacity`` is the initial seed-stack
    size (it grows as needed). Returns the number of filled voxels.
    """
    n_y = mask.shape[1]
    n_z = mask.shape[2]
    plane = n_y * n_z
    stack = np.empty(max(capacity, 1), np.int64)
    for x in range(x0, x1):
        for y in range(y0, y1):
            side = x == x0 or x == x1 - 1 or y == y0 or y == y1 - 1
            step = 1 if side else max(z1 - 1 - z0, 1)
            base = x * plane + y * n_z
            for z in range(z0, z1, step):
                if mask[x, y, z] == 0:
                    stack[0] = base + z
                    left = _flood(mask, stack, np.int64(1), x0, x1, y0, y1, z0, z1)  # not a literal 1: one compile
                    while left > 0:
                        stack = _grow(stack)
                        left = _flood(mask, stack, left, x0, x1, y0, y1, z0, z1)
    filled = 0
    for x in range(x0, x1):
        for y in range(y0, y1):
            for z in range(z0, z1):
                v = mask[x, y, z]
                if v == _REACHED:
                    mask[x, y, z] = 0
                elif v == 0:
                    mask[x, y, z] = _FOREGROUND
                    filled += 1
    return filled


@serial
def _bbox(mask):
    """Half-open bounding box (x0, x1, y0, y1, z0, z1) of a 3D boolean mask; x0 == -1 when it is empty."""
    n_x, n_y, n_z = mask.shape
    x0, x1, y0, y1, z0, z1 = n_x, -1, n_y, -1, n_z, -1
    for x in range(n_x):
        for y in range(n_y):
            first = -1
            for z in range(n_z):
                if mask[x, y, z]:
                    first = z
                    break
            if first < 0:
                continue
            last = first
            for z in range(n_z - 1, first, -1):
                if mask[x, y, z]:
                    last = z
                    break
            if x < x0:
                x0 = x
            x1 = x
            if y < y0:
                y0 = y
            if y > y1:
                y1 = y
            if first < z0:
                z0 = first
            if last > z1:
                z1 = last
    if x1 < 0:
        return -1, -1, -1, -1, -1, -1
    return x0, x1 + 1, y0, y1 + 1, z0, z1 + 1


@serial
def _label_outside(seg, mask, label, out):
    """out[k] = label where seg[k] == 0 and not mask, else seg[k]; seg/out (k, x, y, z), mask (x, y, z)."""
    n_k, n_x, n_y, n_z = seg.shape
    for k in range(n_k):
        for x in range(n_x):
            for y in range(n_y):
                for z in range(n_z):
                    v = seg[k, x, y, z]
                    if v == 0 and not mask[x, y, z]:
                        out[k, x, y, z] = label
                    else:
                        out[k, x, y, z] = v


@serial
def _mask_to_seg(mask, inside, outside, out):
    """out[0] = inside where mask else outside; mask (x, y, z), out (1, x, y, z)."""
    n_x, n_y, n_z = mask.shape
    for x in range(n_x):
        for y in range(n_y):
            for z in range(n_z):
                out[0, x, y, z] = inside if mask[x, y, z] else outside


# --------------------------------------------------------------------------------------------- wrappers
def _memory_order(strides) -> tuple[int, ...]:
    """Axes sorted by decreasing absolute stride (stable), i.e. the permutation that makes a view C-ordered."""
    return tuple(sorted(range(len(strides)), key=lambda a: -abs(strides[a])))


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _check_data(data: np.ndarray) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise InputTypeError(f"data must be a numpy array of shape (c, x, y, z); got {type(data).__name__}")
    if data.ndim != 4:
        raise ShapeError(f"data must have shape (c, x, y, z) (4 axes); got shape {data.shape}")
    if data.shape[0] < 1:
        raise ShapeError(f"data must have at least one channel; got shape {data.shape}")
    if data.dtype == np.bool_:
        return data.view(np.uint8)
    if data.dtype.kind not in "iuf":
        raise ShapeError(f"data must have an integer or floating dtype; got {data.dtype}")
    return data


def nonzero_mask_and_bbox(data: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Hole-filled nonzero mask of a multi-channel volume and its bounding box, in one pass plus a flood fill.

    Parameters
    ----------
    data : ndarray, shape (c, x, y, z)
        Image channels in nnU-Net's axis order (after transposition), any integer/float/bool dtype, any
        memory layout. NaN counts as nonzero (as with ``data != 0``). Not modified.

    Returns
    -------
    mask : ndarray of bool, shape (x, y, z)
        ``True`` where any channel is nonzero, with holes filled exactly like
        ``scipy.ndimage.binary_fill_holes(mask)`` (6-connected background reachable from the array border
        stays ``False``). Equal to nnU-Net's ``create_nonzero_mask(data)``. May be a transposed view of a
        C-contiguous array when ``data``'s spatial axes are not in C memory order.
    bbox : list of [start, end)
        Per spatial axis, like ``acvl_utils`` ``get_bbox_from_mask(mask)``; the full image when the mask is
        empty.

    Raises
    ------
    TypeError, ValueError
        If ``data`` is not a 4D numeric array with at least one channel.
    """
    data = _check_data(data)
    perm = _memory_order(data.strides[1:])
    view = data.transpose(0, *(p + 1 for p in perm))
    work = np.empty(view.shape[1:], np.uint8)
    box = _mask_and_box(view, work)
    if box[0] < 0:
        bbox_p = [[0, s] for s in work.shape]
    else:
        _fill_holes(work, *box, max(4096, 4 * (work.shape[2] + 2)))
        bbox_p = [[int(box[2 * a]), int(box[2 * a + 1])] for a in range(3)]
    inv = _inverse(perm)
    mask = work.view(np.bool_).transpose(inv)
    bbox = [bbox_p[inv[a]] for a in range(3)]
    return mask, bbox


def _mask_and_box(view: np.ndarray, work: np.ndarray) -> tuple:
    """``_nonzero_mask_bbox`` on x-slabs on the threads this process may use; the slab boxes merge exactly.

    Only where a slab has the layout of the whole (one channel, or a view already): a C-ordered multi-channel
    slab would be a strided view, another compiled signature."""
    if view.shape[0] > 1 and view.flags.c_contiguous:
        return _nonzero_mask_bbox(view, work)
    boxes: list = []

    def slab(a, b):
        box = _nonzero_mask_bbox(view[:, a:b], work[a:b])
        if box[0] >= 0:
            boxes.append((box[0] + a, box[1] + a, *box[2:]))
    run_slabs(slab, work.shape[0], items=view.size)
    if not boxes:
        return (-1,) * 6
    return (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes),
            min(b[4] for b in boxes), max(b[5] for b in boxes))


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """nnU-Net's ``create_nonzero_mask``: union over channels of ``data != 0`` with holes filled (6-connected).

    Parameters
    ----------
    data : ndarray, shape (c, x, y, z)
        Image channels, nnU-Net's axis order, any integer/float/bool dtype and layout. NaN counts as nonzero.

    Returns
    -------
    ndarray of bool, shape (x, y, z)

    Raises
    ------
    TypeError, ValueError
        If ``data`` is not a 4D numeric array with at least one channel.
    """
    return nonzero_mask_and_bbox(data)[0]


def bbox_from_mask(mask: np.ndarray) -> list[list[int]]:
    """Half-open bounding box ``[[x0, x1], [y0, y1], [z0, z1]]`` of the nonzero voxels of a 3D mask.

    Same result as ``acvl_utils`` ``get_bbox_from_mask``: the full image ``[[0, X], [0, Y], [0, Z]]`` when
    the mask is empty.

    Parameters
    ----------
    mask : ndarray, shape (x, y, z)
        Boolean (or numeric: nonzero counts as inside) mask, any layout.

    Returns
    -------
    list of three [start, end) lists of Python ints.

    Raises
    ------
    TypeError, ValueError
        If ``mask`` is not a 3D array.
    """
    if not isinstance(mask, np.ndarray):
        raise InputTypeError(f"mask must be a numpy array of shape (x, y, z); got {type(mask).__name__}")
    if mask.ndim != 3:
        raise ShapeError(f"mask must have shape (x, y, z) (3 axes); got shape {mask.shape}")
    if mask.dtype != np.bool_:
        if mask.dtype.kind not in "iuf":
            raise ShapeError(f"mask must be boolean or numeric; got dtype {mask.dtype}")
        mask = mask != 0
    perm = _memory_order(mask.strides)
    box = _bbox(mask.transpose(perm))
    shape_p = [mask.shape[p] for p in perm]
    if box[0] < 0:
        bbox_p = [[0, s] for s in shape_p]
    else:
        bbox_p = [[int(box[2 * a]), int(box[2 * a + 1])] for a in range(3)]
    inv = _inverse(perm)
    return [bbox_p[inv[a]] for a in range(3)]


def label_outside_mask(seg: np.ndarray, mask: np.ndarray, label: int = -1) -> np.ndarray:
    """New array equal to ``seg`` except that background (0) voxels outside ``mask`` become ``label``.

    The array form of nnU-Net's ``seg[(seg == 0) & ~nonzero_mask] = nonzero_label``, without touching
    ``seg``.

    Parameters
    ----------
    seg : ndarray, shape (k, x, y, z)
        Label map(s) (usually k = 1), signed integer or float dtype, any layout. Not modified.
    mask : ndarray of bool, shape (x, y, z)
        The (cropped) nonzero mask, broadcast over ``k``.
    label : int
        Value written outside the mask (nnU-Net: -1).

    Returns
    -------
    ndarray, shape (k, x, y, z), same dtype as ``seg``, C-contiguous.

    Raises
    ------
    ValueError
        On shape mismatch, a non-numeric ``seg``, or a ``label`` that ``seg``'s dtype cannot hold (e.g. -1
        in ``uint8``; nnU-Net raises ``OverflowError`` there — cast the labels to int8/int16 first).
    """
    if seg.ndim != 4 or mask.ndim != 3 or seg.shape[1:] != mask.shape:
        raise ShapeError(f"seg must have shape (k, x, y, z) and mask (x, y, z) with equal spatial shapes; got "
                         f"seg {seg.shape} and mask {mask.shape}")
    if seg.dtype.kind not in "iuf":
        raise ShapeError(f"seg must have an integer or floating dtype; got {seg.dtype}")
    _check_representable(label, seg.dtype, "seg")
    if mask.dtype != np.bool_:
        mask = mask != 0
    out = np.empty(seg.shape, seg.dtype)
    value = seg.dtype.type(label)
    if seg.shape[0] == 1:  # x-slabs of one map keep its layout (and the compiled signature); elementwise
        run_slabs(lambda a, b: _label_outside(seg[:, a:b], mask[a:b], value, out[:, a:b]), seg.shape[1],
                  items=seg.size)
    else:
        _label_outside(seg, mask, value, out)
    return out


def seg_from_mask(mask: np.ndarray, label: int = -1) -> np.ndarray:
    """nnU-Net's ``np.where(mask, int8(0), int8(label))[None]``: an int8 map (1, x, y, z), 0 inside, ``label`` outside.

    Parameters
    ----------
    mask : ndarray of bool, shape (x, y, z)
    label : int
        Value outside the mask; must fit int8.

    Returns
    -------
    ndarray of int8, shape (1, x, y, z), C-contiguous.

    Raises
    ------
    ValueError
        If ``mask`` is not 3D or ``label`` does not fit int8.
    """
    if mask.ndim != 3:
        raise ShapeError(f"mask must have shape (x, y, z); got {mask.shape}")
    _check_representable(label, np.dtype(np.int8), "the label map without seg")
    if mask.dtype != np.bool_:
        mask = mask != 0
    out = np.empty((1, *mask.shape), np.int8)
    _mask_to_seg(mask, np.int8(0), np.int8(label), out)
    return out


def _check_representable(label: int, dtype: np.dtype, what: str) -> None:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not info.min <= label <= info.max:
            raise LabelError(f"{what} has dtype {dtype}, which cannot hold the label {label} written outside the "
                             f"nonzero region; cast it to a signed dtype (int8/int16) first")


@register_warmup
def _warmup() -> None:
    """Compile the signatures real runs pass (and only those: each costs ~0.5-2 s of compile, at install or, without
    the install-time compile, on a cold start).

    Preprocessing crops images in their file's dtype when it is an integer one (int16: CT; uint8) and as contiguous
    float32 otherwise, and label maps as int8 (int16 only beyond int8's range, :mod:`nnfast.preprocess.pipeline`);
    ``nnfast fingerprint`` crops the label maps as :func:`nnfast.io.image.read_label` gives them (int16), and
    prediction makes the label map of a case without labels (``seg_from_mask``, int8). Other dtypes and layouts
    (uint16/float64 files, views) compile on first use.
    """
    for dtype in (np.float32, np.int16, np.uint8):
        tiny = np.zeros((1, 3, 4, 5), dtype)
        tiny[0, 1, 1:3, 1:4] = 1
        m, _ = nonzero_mask_and_bbox(tiny)
    for dtype in (np.int8, np.int16):
        label_outside_mask(np.zeros((1, 3, 4, 5), dtype), m)
    seg_from_mask(m, -1)
