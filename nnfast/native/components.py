"""Connected components with full connectivity (26 neighbours in 3D, 8 in 2D) and largest-component filtering.

Reproduces what nnU-Net's postprocessing uses: ``acvl_utils.morphology.morphology_helper.label_with_component_sizes``
(``skimage.measure.label(mask, connectivity=None)``, i.e. full connectivity, the same components as
``scipy.ndimage.label(mask, structure=np.ones((3,) * ndim))``) and ``remove_all_but_largest_component`` (keep every
component whose size equals the maximum, so ties keep all tied components).

How it works
------------
Run-based union-find. One pass over the array, row by row along the last axis, records the runs of member voxels
(``[start, end)`` per run, runs in raster order). A second pass unions each run with the runs it touches in the four
already-visited neighbouring rows (``(z, y-1)``, ``(z-1, y-1)``, ``(z-1, y)``, ``(z-1, y+1)``); two runs of
neighbouring rows touch under full connectivity when their intervals overlap after widening one of them by a voxel on
each side, which a two-pointer walk over the sorted runs of both rows finds in linear time. The union keeps the
smaller run index as root, so after one forward pass of path resolution every run points at the first run of its
component in raster order, and components are numbered in the order of their first voxel, like scipy and skimage.
The work is proportional to the number of runs, not of voxels, apart from the first scan.

Membership is read through a small lookup table (``lut[value - lo] != 0``), so the same kernels serve a boolean mask
and "voxels of a label map whose value is one of these labels" without building the mask first.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from nnfast.errors import InputTypeError, ShapeError, UsageError

from ._jit import register_warmup, serial

__all__ = ["label_components", "keep_largest_component", "remove_all_but_largest_component",
           "runs_outside_largest_component", "erase_runs"]


_SKIP = 32  # voxels per block tested for a single value at once

# --------------------------------------------------------------------------------------------- kernels
@serial
def _find_runs(a, lut, lo, starts, ends, row_ptr):
    """Record the runs of member voxels of ``a`` (z, y, x) row by row; returns the number of runs.

    A voxel is a member when ``0 <= a - lo < len(lut)`` and ``lut[a - lo] != 0``. ``starts``/``ends`` receive the
    half-open x interval of each run (capacity: the worst case, one run per two voxels); ``row_ptr[z * ny + y]`` the
    index of the first run of row (z, y), ``row_ptr[nz * ny]`` the total.
    """
    nz, ny, nx = a.shape
    n_lut = lut.shape[0]
    n = 0
    for z in range(nz):
        for y in range(ny):
            row_ptr[z * ny + y] = n
            row = a[z, y]
            inside = False
            # blocks of _SKIP voxels: a block holding one value is handled at once (label maps are piecewise
            # constant; the equality test vectorises), any other block voxel by voxel
            for x0 in range(0, nx, _SKIP):
                x1 = min(x0 + _SKIP, nx)
                if x1 - x0 == _SKIP:
                    first = row[x0]
                    differs = False
                    for k in range(_SKIP):
                        differs |= row[x0 + k] != first
                    if not differs:
                        v = first - lo
                        member = v >= 0 and v < n_lut and lut[v] != 0
                        if member and not inside:
                            starts[n] = x0
                            inside = True
                        elif inside and not member:
                            ends[n] = x0
                            n += 1
                            inside = False
                        continue
                for x in range(x0, x1):
                    v = row[x] - lo
                    member = v >= 0 and v < n_lut and lut[v] != 0
                    if member and not inside:
                        starts[n] = x
                        inside = True
                    elif inside and not member:
                        ends[n] = x
                        n += 1
                        inside = False
            if inside:
                ends[n] = nx
                n += 1
    row_ptr[nz * ny] = n
    return n


@serial
def _root(parent, i):
    """Root of run ``i`` with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@serial
def _union_runs(starts, ends, row_ptr, nz, ny, n):
    """Union-find over the runs; returns ``comp`` (n,) int64: component number (0-based, raster order) per run,
    and ``sizes`` (n_components,) int64."""
    parent = np.arange(n)
    for z in range(nz):
        for y in range(ny):
            r0 = row_ptr[z * ny + y]
            r1 = row_ptr[z * ny + y + 1]
            if r0 == r1:
                continue
            for k in range(4):
                if k == 0:
                    oz = z
                    oy = y - 1
                else:
                    oz = z - 1
                    oy = y + k - 2  # y-1, y, y+1
                if oz < 0 or oy < 0 or oy >= ny:
                    continue
                q0 = row_ptr[oz * ny + oy]
                q1 = row_ptr[oz * ny + oy + 1]
                p = r0
                q = q0
                while p < r1 and q < q1:
                    if ends[q] < starts[p]:
                        q += 1
                    elif ends[p] < starts[q]:
                        p += 1
                    else:
                        rp = _root(parent, p)
                        rq = _root(parent, q)
                        if rp < rq:
                            parent[rq] = rp
                        elif rq < rp:
                            parent[rp] = rq
                        if ends[p] < ends[q]:
                            p += 1
                        else:
                            q += 1
    # parent[i] <= i everywhere, so one forward pass resolves every run to its root
    comp = np.empty(n, np.int64)
    n_comp = 0
    for i in range(n):
        r = parent[parent[i]]
        parent[i] = r
        if r == i:
            comp[i] = n_comp
            n_comp += 1
        else:
            comp[i] = comp[r]
    sizes = np.zeros(n_comp, np.int64)
    for i in range(n):
        sizes[comp[i]] += ends[i] - starts[i]
    return comp, sizes


@serial
def _paint_labels(starts, ends, row_ptr, comp, nz, ny, out):
    """out[z, y, run] = component number + 1 for every run; ``out`` must be zero-initialised."""
    for z in range(nz):
        for y in range(ny):
            for i in range(row_ptr[z * ny + y], row_ptr[z * ny + y + 1]):
                lab = comp[i] + 1
                for x in range(starts[i], ends[i]):
                    out[z, y, x] = lab


@serial
def _paint_largest(starts, ends, row_ptr, comp, sizes, nz, ny, out):
    """out[z, y, run] = 1 for the runs of every component of maximal size; ``out`` must be zero-initialised."""
    if sizes.shape[0] == 0:
        return
    biggest = sizes.max()
    for z in range(nz):
        for y in range(ny):
            for i in range(row_ptr[z * ny + y], row_ptr[z * ny + y + 1]):
                if sizes[comp[i]] == biggest:
                    for x in range(starts[i], ends[i]):
                        out[z, y, x] = 1


@serial
def _erase_smaller(starts, ends, row_ptr, comp, sizes, nz, ny, a, background):
    """a[z, y, run] = background for the runs of every component smaller than the largest; returns voxels erased."""
    if sizes.shape[0] == 0:
        return 0
    biggest = sizes.max()
    erased = 0
    for z in range(nz):
        for y in range(ny):
            for i in range(row_ptr[z * ny + y], row_ptr[z * ny + y + 1]):
                if sizes[comp[i]] < biggest:
                    for x in range(starts[i], ends[i]):
                        a[z, y, x] = background
                    erased += ends[i] - starts[i]
    return erased


@serial
def _collect_smaller(starts, ends, row_ptr, comp, sizes, nz, ny, out):
    """Write (z, y, x_start, x_end) of every run of a component smaller than the largest into ``out`` (n, 4);
    returns the number written."""
    if sizes.shape[0] == 0:
        return 0
    biggest = sizes.max()
    m = 0
    for z in range(nz):
        for y in range(ny):
            for i in range(row_ptr[z * ny + y], row_ptr[z * ny + y + 1]):
                if sizes[comp[i]] < biggest:
                    out[m, 0] = z
                    out[m, 1] = y
                    out[m, 2] = starts[i]
                    out[m, 3] = ends[i]
                    m += 1
    return m


@serial
def _erase_runs(a, runs, background):
    """a[z, y, x0:x1] = background for every row (z, y, x0, x1) of ``runs``."""
    for r in range(runs.shape[0]):
        z = runs[r, 0]
        y = runs[r, 1]
        for x in range(runs[r, 2], runs[r, 3]):
            a[z, y, x] = background


# --------------------------------------------------------------------------------------------- wrappers
_MASK_LUT = np.array([0, 1], np.uint8)


def _as_zyx(arr: np.ndarray, what: str) -> np.ndarray:
    """A 3D view of a 2D (y, x) or 3D array (2D becomes (1, y, x), which gives 8-connectivity)."""
    if not isinstance(arr, np.ndarray):
        raise InputTypeError(f"{what} must be a numpy array; got {type(arr).__name__}")
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise ShapeError(f"{what} must be 2D or 3D; got shape {arr.shape}")
    return arr


def _mask_view(mask: np.ndarray, allow_permute: bool) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """A C-contiguous uint8 0/1 view (or copy) of ``mask`` (3D) and the axis permutation applied, if any."""
    if mask.dtype != np.bool_:
        if mask.dtype.kind not in "iuf":
            raise ShapeError(f"mask must be boolean or numeric (nonzero = foreground); got dtype {mask.dtype}")
        mask = mask != 0
    perm = None
    if not mask.flags.c_contiguous:
        if allow_permute and mask.flags.f_contiguous:
            perm = (2, 1, 0)  # full connectivity is symmetric in the axes; the transpose is a C view
            mask = mask.transpose(perm)
        else:
            mask = np.ascontiguousarray(mask)
    return mask.view(np.uint8), perm


def _runs(a: np.ndarray, lut: np.ndarray, lo: int):
    nz, ny, nx = a.shape
    cap = nz * ny * ((nx + 1) // 2) + 1
    starts = np.empty(cap, np.int64)  # pages are only committed where runs are written
    ends = np.empty(cap, np.int64)
    row_ptr = np.empty(nz * ny + 1, np.int64)
    n = _find_runs(a, lut, np.int64(lo), starts, ends, row_ptr)
    comp, sizes = _union_runs(starts, ends, row_ptr, nz, ny, n)
    return starts, ends, row_ptr, comp, sizes


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the connected components of ``mask`` with full connectivity (26 neighbours in 3D, 8 in 2D).

    Parameters
    ----------
    mask : ndarray, 2D or 3D, bool or numeric (nonzero = foreground), any layout. Not modified.

    Returns
    -------
    labels : ndarray of int32, same shape
        0 for background, ``1..n`` for the components, numbered in raster (C) order of their first voxel, exactly
        as ``scipy.ndimage.label(mask, np.ones((3,) * mask.ndim))`` and ``skimage.measure.label(mask)`` number them.
    sizes : ndarray of int64, shape (n,)
        ``sizes[k - 1]`` is the number of voxels of component ``k``.

    Raises
    ------
    TypeError, ValueError
        ``mask`` is not a 2D/3D boolean or numeric array.
    """
    shape = mask.shape if isinstance(mask, np.ndarray) else None
    a, _ = _mask_view(_as_zyx(mask, "mask"), allow_permute=False)
    starts, ends, row_ptr, comp, sizes = _runs(a, _MASK_LUT, 0)
    out = np.zeros(a.shape, np.int32)
    _paint_labels(starts, ends, row_ptr, comp, a.shape[0], a.shape[1], out)
    return out.reshape(shape), sizes


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component(s) of ``mask`` (full connectivity), as acvl_utils'
    ``remove_all_but_largest_component`` computes it: every component whose size equals the maximum is kept.

    Parameters
    ----------
    mask : ndarray, 2D or 3D, bool or numeric (nonzero = foreground), any layout. Not modified.

    Returns
    -------
    ndarray of bool, same shape; all ``False`` when ``mask`` is empty.

    Raises
    ------
    TypeError, ValueError
        ``mask`` is not a 2D/3D boolean or numeric array.
    """
    shape = mask.shape if isinstance(mask, np.ndarray) else None
    a, perm = _mask_view(_as_zyx(mask, "mask"), allow_permute=True)
    starts, ends, row_ptr, comp, sizes = _runs(a, _MASK_LUT, 0)
    out = np.zeros(a.shape, np.uint8)
    _paint_largest(starts, ends, row_ptr, comp, sizes, a.shape[0], a.shape[1], out)
    out = out.view(np.bool_)
    if perm is not None:
        out = out.transpose(perm)
    return out.reshape(shape)


def _value_lut(values: Iterable[int], dtype) -> tuple[np.ndarray | None, int]:
    """Membership table of ``values`` (those a ``dtype`` voxel can hold) and its offset; (None, 0) if none can."""
    vals = sorted({int(v) for v in values})
    if not vals:
        raise UsageError("values must name at least one label")
    info = np.iinfo(dtype)
    vals = [v for v in vals if info.min <= v <= info.max]
    if not vals:
        return None, 0
    lo = vals[0]
    lut = np.zeros(vals[-1] - lo + 1, np.uint8)
    lut[np.asarray(vals) - lo] = 1
    return lut, lo


def _check_seg(seg: np.ndarray) -> np.ndarray:
    a = _as_zyx(seg, "seg")
    if a.dtype.kind not in "iu":
        raise ShapeError(f"seg must be an integer label map; got dtype {a.dtype}")
    return a


def remove_all_but_largest_component(seg: np.ndarray, values: Iterable[int], background: int = 0) -> int:
    """In place: voxels of ``seg`` whose value is in ``values`` and that lie outside the largest connected
    component(s) of the union of those values become ``background``.

    This is nnU-Net's ``remove_all_but_largest_component_from_segmentation(seg, labels_or_regions)`` (full
    connectivity; ties keep every largest component) without building the masks.

    Parameters
    ----------
    seg : ndarray, 2D or 3D, integer dtype, writeable, any layout (non-contiguous arrays are processed on a copy
        that is written back)
        A label map, e.g. (z, y, x) as read from a file.
    values : iterable of int
        The labels whose union is filtered (a label, a region's labels, or all foreground labels).
    background : int
        Value written into removed voxels (nnU-Net: 0).

    Returns
    -------
    int
        Number of voxels set to ``background``.

    Raises
    ------
    TypeError, ValueError
        ``seg`` is not a writeable 2D/3D integer array, or ``values`` is empty.
    """
    a = _check_seg(seg)
    if not a.flags.writeable:
        raise ShapeError("seg must be writeable (the removal happens in place); pass a copy")
    lut, lo = _value_lut(values, a.dtype)
    if lut is None:
        return 0
    work, perm = a, None
    if not a.flags.c_contiguous:
        if a.flags.f_contiguous:
            perm = (2, 1, 0)
            work = a.transpose(perm)
        else:
            work = np.ascontiguousarray(a)
    starts, ends, row_ptr, comp, sizes = _runs(work, lut, lo)
    erased = _erase_smaller(starts, ends, row_ptr, comp, sizes, work.shape[0], work.shape[1], work,
                            work.dtype.type(background))
    if work is not a and perm is None:
        a[...] = work
    return int(erased)


def runs_outside_largest_component(seg: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """The voxels :func:`remove_all_but_largest_component` would erase, as runs along the last axis, without
    modifying ``seg`` (to score a removal from counts of the erased voxels only).

    Parameters
    ----------
    seg : ndarray, 2D or 3D, integer dtype, C-contiguous (other layouts are copied)
    values : iterable of int

    Returns
    -------
    ndarray of int64, shape (n, 4)
        Rows ``(z, y, x_start, x_end)`` (half-open in x) in the 3D view of ``seg`` (a 2D array is ``(1, y, x)``),
        in raster order.
    """
    a = _check_seg(seg)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    lut, lo = _value_lut(values, a.dtype)
    if lut is None:
        return np.zeros((0, 4), np.int64)
    starts, ends, row_ptr, comp, sizes = _runs(a, lut, lo)
    out = np.empty((comp.shape[0], 4), np.int64)
    m = _collect_smaller(starts, ends, row_ptr, comp, sizes, a.shape[0], a.shape[1], out)
    return out[:m]


def erase_runs(seg: np.ndarray, runs: np.ndarray, background: int = 0) -> int:
    """In place: ``seg[z, y, x_start:x_end] = background`` for every row of ``runs`` (from
    :func:`runs_outside_largest_component`); returns the number of voxels written."""
    a = _check_seg(seg)
    runs = np.ascontiguousarray(runs, np.int64).reshape(-1, 4)
    if runs.shape[0]:
        if runs[:, :2].min() < 0 or runs[:, 0].max() >= a.shape[0] or runs[:, 1].max() >= a.shape[1] \
                or runs[:, 2].min() < 0 or runs[:, 3].max() > a.shape[2]:
            raise ShapeError(f"runs reach outside seg of shape {a.shape}")
        _erase_runs(a, runs, a.dtype.type(background))
    return int((runs[:, 3] - runs[:, 2]).sum())


@register_warmup
def _warmup() -> None:
    m = np.zeros((2, 3, 4), np.bool_)
    m[0, 0, :2] = True
    m[1, 2, 3] = True
    label_components(m)
    keep_largest_component(m)
    for dt in (np.uint8, np.int16, np.int32):
        s = m.astype(dt)
        remove_all_but_largest_component(s, [1])
        erase_runs(s, runs_outside_largest_component(s, [1]))
