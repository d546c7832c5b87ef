"""Image resampling with ``skimage.transform.resize`` parity (nnU-Net's data resampling), separable and lean.

nnU-Net resamples images with ``skimage.transform.resize(img.astype(float), shape, order=3, mode='edge',
anti_aliasing=False)`` per channel (``resample_data_or_seg`` in
``nnunetv2/preprocessing/resampling/default_resampling.py``). That is ``scipy.ndimage.zoom(img, out / in,
order=3, mode='nearest', grid_mode=True)`` followed by clipping to the input's min/max. This module computes
the same thing axis by axis.

Arithmetic reproduced from scipy 1.17 (``ni_splines.c``, ``NI_ZoomShift``)
-----------------------------------------------------------------------
* Sampling grid (``grid_mode=True``): output index ``k`` along an axis maps to the input coordinate
  ``cc = (k + 0.5) * (n_in / n_out) - 0.5`` (float64, in that operation order).
* Order 3: the input is edge-padded by 12 voxels on every side (``_prepad_for_spline_filter``), then the
  B-spline prefilter (pole ``sqrt(3) - 2``, gain ``(1 - z)(1 - 1/z)``, the 'reflect' initialisation that
  scipy uses for ``mode='nearest'``, including the in-place aliasing of ``c[0]`` in its causal
  initialisation) runs along every axis in float64. The spline is evaluated at ``cc + 12`` with four taps
  ``floor(cc) - 1 .. floor(cc) + 2`` and scipy's weight formulas (``get_spline_interpolation_weights``:
  the last weight is ``1 - w0 - w1 - w2``).
* Order 1: no padding, no prefilter; ``cc`` is not clamped; taps ``floor(cc)``, ``floor(cc) + 1`` clamped
  to the array (mode 'nearest'); weights ``w0 = 1 - (cc - floor(cc))``, ``w1 = 1 - w0``.
* Order 0: ``floor(cc + 0.5)`` (ties of ``.5`` round up).

Separable evaluation
--------------------
The tensor-product spline factorises: padding, prefiltering and evaluating along one axis commute with
the same operations along the others. Each pass therefore resizes one axis: lines along that axis are
loaded in blocks into a small float64 buffer (edge-padded), prefiltered, and evaluated with four taps
(float64 arithmetic per line, bit-identical to scipy's along that axis). Between passes values are stored
as float32; axes whose size does not change are skipped (scipy evaluates the spline at integer
positions there, which is the identity up to rounding). Passes run from the most shrinking axis to the most
growing one to keep intermediates small. The result differs from nnU-Net's float64 computation only by
float32 storage of intermediates (about 1e-7 of the data range; values are shifted by the midpoint of the
channel's range before the first pass when that range does not contain 0, so that a large offset does not
cost precision).

Memory: input + output + one float32 intermediate per pass, plus a per-channel contiguous copy when the
input is not C-contiguous. Float64 is only used for per-block line buffers and coefficients.
:func:`resize_image_consuming` can do with less: with ``release`` every pass runs slab by slab and gives back the
pages of the input it has read (:mod:`nnfast.native.pages`), and with a ``sink`` the last pass goes box by box to the
caller (a preprocessing worker's store) instead of into an output array; the values are the same, bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

from nnfast.errors import InputTypeError, ShapeError, UsageError

from ._jit import kernel_threads, register_warmup, run_slabs, serial

__all__ = ["resize_image", "resize_image_consuming", "feed_sink", "resize_image_separate_z", "axis_taps", "nearest_indices", "check_new_shape"]

_POLE = -0.267949192431122706472553658494127633  # sqrt(3) - 2, as written in scipy's ni_splines.c
_NPAD = 12  # scipy's _prepad_for_spline_filter for mode='nearest'
_BUF_BYTES = 1 << 18  # target size of one float64 line-block buffer (fits in L2)


# --------------------------------------------------------------------------------------------- kernels
@serial
def _taps(n_in, n_out, order):
    """Tap rows and weights for resizing one axis from ``n_in`` to ``n_out`` samples.

    Returns ``idx`` (n_out, order + 1) int64 rows into the (for order 3: 12-voxel padded) line buffer and
    ``w`` (n_out, order + 1) float64 weights, computed with scipy's exact float64 operation sequence.
    """
    ntap = order + 1
    idx = np.empty((n_out, ntap), np.int64)
    w = np.empty((n_out, ntap), np.float64)
    zoom = n_in / n_out
    for k in range(n_out):
        cc = float(k)
        cc += 0.5
        cc *= zoom
        cc -= 0.5
        if order == 3:
            cc += float(_NPAD)
            f = math.floor(cc)
            start = int(f) - 1
            x = cc - f
            y = x
            z = 1.0 - x
            w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
            w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
            w0 = z * z * z / 6.0
            w3 = 1.0
            w3 -= w0
            w3 -= w1
            w3 -= w2
            w[k, 0] = w0
            w[k, 1] = w1
            w[k, 2] = w2
            w[k, 3] = w3
            for t in range(4):
                idx[k, t] = start + t
        elif order == 1:
            f = math.floor(cc)
            start = int(f)
            w0 = 1.0 - (cc - f)
            w1 = 1.0
            w1 -= w0
            w[k, 0] = w0
            w[k, 1] = w1
            idx[k, 0] = min(max(start, 0), n_in - 1)
            idx[k, 1] = min(max(start + 1, 0), n_in - 1)
        else:
            f = math.floor(cc + 0.5)
            idx[k, 0] = min(max(int(f), 0), n_in - 1)
            w[k, 0] = 1.0
    return idx, w


@serial
def _filter_gain():
    """scipy's filter gain for order 3, ``1.0 * (1 - z) * (1 - 1/z)``; lines are multiplied by it as they load."""
    z = _POLE
    gain = 1.0
    gain *= (1.0 - z) * (1.0 - 1.0 / z)
    return gain


@serial
def _spline_filter_cols(buf, n, nb, acc):
    """In-place cubic B-spline prefilter of the first ``nb`` columns of ``buf[:n]`` (each column is a line).

    Same operations per line as scipy's ``apply_filter`` for order 3 and ``NI_EXTEND_NEAREST``, except that
    the gain (:func:`_filter_gain`) must already have been applied while loading; vectorised across columns.
    ``acc`` is scratch of at least ``nb`` float64.
    """
    z = _POLE
    # causal initialisation ('reflect'); scipy accumulates into c[0] in place, so its last term reads the
    # running sum where it meant the original c[0]
    z_n = math.pow(z, float(n))
    for j in range(nb):
        acc[j] = buf[0, j] + z_n * buf[n - 1, j]
    z_i = z
    for i in range(1, n - 1):
        for j in range(nb):
            acc[j] += z_i * (buf[i, j] + z_n * buf[n - 1 - i, j])
        z_i *= z
    for j in range(nb):
        acc[j] += z_i * (buf[n - 1, j] + z_n * acc[j])
    fac = z / (1 - z_n * z_n)
    for j in range(nb):
        buf[0, j] = acc[j] * fac + buf[0, j]
    for i in range(1, n):
        for j in range(nb):
            buf[i, j] += z * buf[i - 1, j]
    fac = z / (z - 1)
    for j in range(nb):
        buf[n - 1, j] *= fac
    for i in range(n - 2, -1, -1):
        for j in range(nb):
            buf[i, j] = z * (buf[i + 1, j] - buf[i, j])


@serial
def _eval_row(buf, idx, w, k, nb, acc):
    """``acc[:nb] = sum_t buf[idx[k, t], :nb] * w[k, t]``, accumulated from 0.0 in tap order like scipy."""
    for j in range(nb):
        acc[j] = 0.0
    for t in range(idx.shape[1]):
        wt = w[k, t]
        row = idx[k, t]
        for j in range(nb):
            acc[j] += buf[row, j] * wt


@serial
def _resize_mid(src, dst, idx, w, pad, prefilter, sub, add, buf, acc, j_lo, j_hi):
    """Resize axis 1 of ``src`` (p, n, m) into ``dst`` (p, n_out, m) (float32/64), lines vectorised along axis 2;
    only the lines (columns) ``j_lo <= j < j_hi`` (a slab for one thread; each line is computed alone).

    Lines are loaded in blocks of ``buf.shape[1]`` columns, minus ``sub`` (times the filter gain when
    prefiltering), edge-padded by ``pad`` rows, optionally prefiltered, evaluated with the tap table
    (``idx``, ``w``), plus ``add``, stored in ``dst``'s dtype.
    """
    n_p, n, m = src.shape
    n_out = dst.shape[1]
    n_buf = n + 2 * pad
    block = buf.shape[1]
    scale = _filter_gain() if prefilter else 1.0
    for p in range(n_p):
        for j0 in range(j_lo, j_hi, block):
            nb = min(block, j_hi - j0)
            for i in range(n_buf):
                si = min(max(i - pad, 0), n - 1)
                for j in range(nb):
                    buf[i, j] = (src[p, si, j0 + j] - sub) * scale
            if prefilter:
                _spline_filter_cols(buf, n_buf, nb, acc)
            for k in range(n_out):
                _eval_row(buf, idx, w, k, nb, acc)
                for j in range(nb):
                    dst[p, k, j0 + j] = acc[j] + add


@serial
def _resize_last(src, dst, idx, w, pad, prefilter, sub, add, buf, acc):
    """Resize axis 1 of ``src`` (r, n) into ``dst`` (r, n_out) (float32/64): lines are contiguous rows.

    Blocks of rows are loaded transposed into ``buf`` (lines become columns) so that the prefilter
    recursions run vectorised across lines, as in :func:`_resize_mid`.
    """
    n_r, n = src.shape
    n_out = dst.shape[1]
    n_buf = n + 2 * pad
    block = buf.shape[1]
    scale = _filter_gain() if prefilter else 1.0
    for r0 in range(0, n_r, block):
        nb = min(block, n_r - r0)
        for j in range(nb):
            lo = (src[r0 + j, 0] - sub) * scale
            hi = (src[r0 + j, n - 1] - sub) * scale
            for i in range(pad):
                buf[i, j] = lo
                buf[n + pad + i, j] = hi
            for i in range(n):
                buf[pad + i, j] = (src[r0 + j, i] - sub) * scale
        if prefilter:
            _spline_filter_cols(buf, n_buf, nb, acc)
        for k in range(n_out):
            _eval_row(buf, idx, w, k, nb, acc)
            for j in range(nb):
                dst[r0 + j, k] = acc[j] + add


@serial
def _slice_minmax(src, axis, lo, hi):
    """Per-slice minimum and maximum along ``axis`` of ``src`` (x, y, z), ignoring NaN.

    ``lo``/``hi`` (len ``src.shape[axis]``) get NaN for a slice without a non-NaN value.
    """
    n_x, n_y, n_z = src.shape
    lo[:] = np.inf
    hi[:] = -np.inf
    for x in range(n_x):
        for y in range(n_y):
            if axis == 2:
                for z in range(n_z):
                    v = src[x, y, z]
                    if v < lo[z]:
                        lo[z] = v
                    if v > hi[z]:
                        hi[z] = v
            else:
                s = x if axis == 0 else y
                a = lo[s]
                b = hi[s]
                for z in range(n_z):
                    v = src[x, y, z]
                    if v < a:
                        a = v
                    if v > b:
                        b = v
                lo[s] = a
                hi[s] = b
    for s in range(lo.shape[0]):
        if lo[s] > hi[s]:
            lo[s] = np.nan
            hi[s] = np.nan


@serial
def _clip_slices(arr, axis, lo, hi):
    """Clip ``arr`` (x, y, z) in place to ``[lo[s], hi[s]]`` where ``s`` is the index along ``axis``.

    NaN bounds and NaN values are left alone (comparisons with NaN are false), as ``np.clip`` keeps NaN.
    """
    n_x, n_y, n_z = arr.shape
    for x in range(n_x):
        for y in range(n_y):
            if axis == 2:
                for z in range(n_z):
                    v = arr[x, y, z]
                    if v < lo[z]:
                        arr[x, y, z] = lo[z]
                    elif v > hi[z]:
                        arr[x, y, z] = hi[z]
            else:
                s = x if axis == 0 else y
                a = lo[s]
                b = hi[s]
                for z in range(n_z):
                    v = arr[x, y, z]
                    if v < a:
                        arr[x, y, z] = a
                    elif v > b:
                        arr[x, y, z] = b


# --------------------------------------------------------------------------------------------- helpers
def axis_taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap table of scipy's ``zoom(..., grid_mode=True, mode='nearest')`` along one axis.

    Parameters
    ----------
    n_in, n_out : int
        Input and output sample counts (>= 1).
    order : {0, 1, 3}
        Spline order.

    Returns
    -------
    idx : ndarray of int64, shape (n_out, order + 1)
        Input rows of each tap; for order 3 they index the line padded by 12 edge voxels on each side.
    w : ndarray of float64, shape (n_out, order + 1)
        Tap weights (scipy's exact arithmetic).
    """
    if order not in (0, 1, 3):
        raise UsageError(f"order must be 0, 1 or 3; got {order}")
    if n_in < 1 or n_out < 1:
        raise ShapeError(f"axis sizes must be >= 1; got {n_in} -> {n_out}")
    return _taps(int(n_in), int(n_out), int(order))


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output sample for nearest-neighbour resizing on the align_corners=False grid.

    ``floor((k + 0.5) * n_in / n_out - 0.5 + 0.5)``: what ``map_coordinates(order=0, mode='nearest')``
    picks on nnU-Net's separate-z coordinate grid and what ``zoom``/``resize`` order 0 picks (exact .5
    coordinates round up). int64, shape (n_out,).
    """
    return axis_taps(n_in, n_out, 0)[0][:, 0].copy()


def _block_size(n_buf: int, n_lines: int) -> int:
    block = max(16, min(1024, _BUF_BYTES // (8 * n_buf)))
    return max(1, min(block, n_lines))


def _resize_axis(src: np.ndarray, axis: int, n_out: int, order: int, sub: float, add: float,
                 dst: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
    """One separable pass: resize ``axis`` of the C-contiguous 3D ``src`` to ``n_out`` into ``dst``.

    ``dst`` (C-contiguous, float32 or float64) is allocated with ``dtype`` when not given.
    """
    shape = list(src.shape)
    n = shape[axis]
    shape[axis] = n_out
    if dst is None:
        dst = np.empty(shape, dtype)
    idx, w = _taps(n, n_out, order)
    pad = _NPAD if order == 3 else 0
    prefilter = order == 3
    n_buf = n + 2 * pad
    # Slabs of lines on the threads this process may use (kernel_threads): every line is resized alone, so the
    # result is the serial one bit for bit; each slab has its own line buffers.
    work = dst.size * (idx.shape[1] + 2 * prefilter)
    if axis == 2:
        rows = src.shape[0] * src.shape[1]
        s2, d2 = src.reshape(rows, n), dst.reshape(rows, n_out)

        def slab(a, b):
            block = _block_size(n_buf, b - a)
            _resize_last(s2[a:b], d2[a:b], idx, w, pad, prefilter, sub, add, np.empty((n_buf, block), np.float64),
                         np.empty(block, np.float64))
        run_slabs(slab, rows, items=work)
    else:
        if axis == 0:
            s3 = src.reshape(1, n, -1)
            d3 = dst.reshape(1, n_out, -1)
        else:
            s3, d3 = src, dst
        m = s3.shape[2]
        if s3.shape[0] >= kernel_threads():  # slabs of planes
            def slab(a, b):
                block = _block_size(n_buf, m)
                _resize_mid(s3[a:b], d3[a:b], idx, w, pad, prefilter, sub, add, np.empty((n_buf, block), np.float64),
                            np.empty(block, np.float64), 0, m)
            run_slabs(slab, s3.shape[0], items=work)
        else:  # one plane (axis 0): slabs of columns
            def slab(a, b):
                block = _block_size(n_buf, b - a)
                _resize_mid(s3, d3, idx, w, pad, prefilter, sub, add, np.empty((n_buf, block), np.float64),
                            np.empty(block, np.float64), a, b)
            run_slabs(slab, m, items=work)
    return dst


def _resize_axes(src: np.ndarray, target: tuple[int, ...], axes: list[int], order: int, shift: float,
                 out: np.ndarray, inter_dtype) -> None:
    """Resize ``src`` (3D, C-contiguous) along ``axes`` (in this order) to ``target``, writing into ``out``.

    ``out`` must be a C-contiguous float array of shape ``target``; intermediates between passes are
    ``inter_dtype``. With no axes, ``src`` is copied.
    """
    if not axes:
        out[...] = src
        return
    cur = src
    for i, axis in enumerate(axes):
        first, last = i == 0, i == len(axes) - 1
        cur = _resize_axis(cur, axis, target[axis], order, shift if first else 0.0, shift if last else 0.0,
                           out if last else None, inter_dtype)


def _pass_order(in_shape, out_shape, axes) -> list[int]:
    """Axes whose size changes, most shrinking first (keeps intermediates small)."""
    changing = [a for a in axes if in_shape[a] != out_shape[a]]
    return sorted(changing, key=lambda a: (out_shape[a] / in_shape[a], a))


def check_new_shape(new_shape) -> tuple[int, int, int]:
    """Validate a target shape of 3 positive sizes (x, y, z); shared by the image and label wrappers."""
    try:
        shape = tuple(int(s) for s in new_shape)
    except TypeError:
        raise InputTypeError(f"new_shape must be a sequence of 3 ints; got {new_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ShapeError(f"new_shape must be 3 positive sizes (x, y, z); got {tuple(new_shape)}")
    return shape  # type: ignore[return-value]


def _check_image(data, new_shape, name: str = "data") -> tuple[int, int, int]:
    if not isinstance(data, np.ndarray):
        raise InputTypeError(f"{name} must be a numpy array of shape (c, x, y, z); got {type(data).__name__}")
    if data.ndim != 4:
        raise ShapeError(f"{name} must have shape (c, x, y, z) (4 axes); got shape {data.shape}")
    if data.dtype not in (np.float32, np.float64):
        raise ShapeError(f"{name} must be float32 or float64 (cast images first); got {data.dtype}")
    if data.shape[0] < 1 or min(data.shape[1:]) < 1:
        raise ShapeError(f"{name} must have at least one channel and one voxel per axis; got shape {data.shape}")
    return check_new_shape(new_shape)


def _inter(precise: bool):
    return np.float64 if precise else np.float32


def _check_order(order: int) -> int:
    if order not in (0, 1, 3):
        raise UsageError(f"order must be 0, 1 or 3 (nnU-Net uses 3 for images, 1 for probabilities); got {order}")
    return int(order)


def _minmax_x(src: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """``_slice_minmax(src, 0, lo, hi)`` on x-slabs (each slab writes its own entries of ``lo``/``hi``)."""
    run_slabs(lambda a, b: _slice_minmax(src[a:b], 0, lo[a:b], hi[a:b]), src.shape[0], items=src.size)


def _clip(arr: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray) -> None:
    """``_clip_slices(arr, axis, lo, hi)`` on x-slabs (elementwise: the same values)."""
    if axis == 0:
        run_slabs(lambda a, b: _clip_slices(arr[a:b], 0, lo[a:b], hi[a:b]), arr.shape[0], items=arr.size)
    else:
        run_slabs(lambda a, b: _clip_slices(arr[a:b], axis, lo, hi), arr.shape[0], items=arr.size)


def _channel_minmax(src: np.ndarray) -> tuple[float, float]:
    lo = np.empty(src.shape[0], np.float64)
    hi = np.empty(src.shape[0], np.float64)
    _minmax_x(src, lo, hi)
    if np.all(np.isnan(lo)):
        return math.nan, math.nan
    return float(np.nanmin(lo)), float(np.nanmax(hi))


def _shift(lo: float, hi: float, order: int) -> float:
    """Offset subtracted before the first pass and added back after the last one.

    Spline weights sum to one, so resizing commutes with adding a constant. Shifting by the midpoint of
    the range when the range does not contain 0 keeps float32 intermediates accurate relative to the range
    (a CT volume in [1000, 1010] otherwise loses three digits). Nearest (order 0) copies values: no shift.
    """
    if order == 0 or not (lo > 0.0 or hi < 0.0):
        return 0.0
    mid = 0.5 * (lo + hi)
    return mid if math.isfinite(mid) else 0.0


# --------------------------------------------------------------------------------------------- public API
def resize_image(data: np.ndarray, new_shape, order: int = 3, *, precise: bool = False) -> np.ndarray:
    """Resize every channel like ``skimage.transform.resize(c, new_shape, order, mode='edge', anti_aliasing=False)``.

    This is nnU-Net's non-separate image resampling (``resample_data_or_seg(..., is_seg=False,
    do_separate_z=False)``), including the clipping of each channel's result to that channel's input
    min/max (NaN-ignoring, as skimage does).

    Parameters
    ----------
    data : ndarray, shape (c, x, y, z), float32 or float64
        Image channels in nnU-Net's axis order (after transposition); any memory layout. Not modified.
    new_shape : sequence of 3 int
        Output spatial shape (x, y, z), each >= 1.
    order : {3, 1, 0}
        3: cubic B-spline (images), 1: linear (probabilities/logits at export), 0: nearest.
    precise : bool
        Keep the intermediates between passes in float64 (twice their memory). The float32 result is then
        bit-identical to nnU-Net's float32 result in practice (scipy sums its 64 taps in another order,
        a difference of ~1e-16 that float32 rounding hides). Default float32 intermediates: within about
        1e-7 of the channel's range.

    Returns
    -------
    ndarray, shape (c, *new_shape), float32, C-contiguous
        Resized channels. A copy of ``data`` as float32 when the shape does not change.

    Raises
    ------
    TypeError, ValueError
        If ``data`` is not a 4D float32/float64 array with voxels, ``new_shape`` is not 3 positive sizes or
        ``order`` is not 0, 1 or 3.
    """
    return resize_image_consuming([data], new_shape, order, precise=precise)


def resize_image_consuming(arrays: list, new_shape, order: int = 3, *, precise: bool = False, sink=None,
                           release: bool = False) -> np.ndarray | None:
    """:func:`resize_image` of ``arrays.pop()``, dropping this function's reference to the input early.

    ``arrays`` is a one-element list, emptied here. When the caller held no other reference, the input is freed once
    the first separable pass of its last channel has run, so that the input, the intermediate between passes and the
    output never coexist (a 300x512x512 CT case: ~300 MiB less peak memory in a preprocessing worker). The same
    passes in the same order as :func:`resize_image` (which is this function on a list the caller keeps): the
    result is bit-identical.

    ``release``: the caller hands over the input's memory; every pass runs slab by slab and gives the pages of the
    slabs it has read back to the system (:func:`nnfast.native.pages.release_rows`), so each pass holds about one
    of its two arrays. ``sink``: the output is not allocated; the last pass of every channel is computed box by box
    (clipped) and handed to ``sink.put(channel, origin, box)``, in the order ``sink.boxes(channel, axis, shape)`` gives
    (each box three ``(start, stop)`` ranges of the channel's output ``shape`` (x, y, z), spanning the pass ``axis``
    whole; the boxes tile the output); None is returned. Either way every output line is computed exactly as without them: the values are bit-identical.
    """
    data = arrays.pop()
    shape = _check_image(data, new_shape)
    order = _check_order(order)
    n_c = data.shape[0]
    in_shape = data.shape[1:]
    if tuple(in_shape) == shape:
        if sink is not None:
            feed_sink(sink, data)
            return None
        out = np.empty((n_c, *shape), np.float32)
        out[...] = data
        return out
    out = None if sink is not None else np.empty((n_c, *shape), np.float32)
    axes = _pass_order(in_shape, shape, (0, 1, 2))
    inter = _inter(precise)
    for c in range(n_c):
        cur = np.ascontiguousarray(data[c])
        if c == n_c - 1:
            del data  # ``cur`` (a view or a copy of the last channel) is all that is still needed
        lo, hi = _channel_minmax(cur)
        shift = _shift(lo, hi, order)
        for i, axis in enumerate(axes):
            first, last = i == 0, i == len(axes) - 1
            sub, add = (shift if first else 0.0), (shift if last else 0.0)
            if last and sink is not None:
                bounds = None if order == 0 else (lo, hi)
                _stream_pass(cur, axis, shape[axis], order, sub, add, inter, c, sink, bounds, release)
            elif release:
                cur = _resize_axis_releasing(cur, axis, shape[axis], order, sub, add, out[c] if last else None, inter)
            else:
                cur = _resize_axis(cur, axis, shape[axis], order, sub, add, out[c] if last else None, inter)
        del cur
        if order != 0 and out is not None:
            _clip(out[c], 0, np.full(shape[0], lo), np.full(shape[0], hi))
    return out


def feed_sink(sink, data: np.ndarray) -> None:
    """Hand the whole array ``data`` (c, x, y, z) to ``sink`` box by box, as float32."""
    for c in range(data.shape[0]):
        for box in sink.boxes(c, 0, data.shape[1:]):
            sl = tuple(slice(int(a), int(b)) for a, b in box)
            sink.put(c, tuple(int(r[0]) for r in box), np.ascontiguousarray(data[c][sl], dtype=np.float32))


def _slab_step(n: int, pieces: int = 16) -> int:
    return max(1, -(-n // pieces))


def _take_slab(src: np.ndarray, along: int, a: int, b: int, release: bool) -> np.ndarray:
    """Rows ``a:b`` of ``src`` (3D, C-contiguous) along axis ``along`` (0 or 1) as a C-contiguous array; with
    ``release`` the pages of ``src`` they came from are given back (``src`` is not read there again)."""
    if along == 0:
        return src[a:b]  # a contiguous view: released by the caller once it has been read
    part = src[:, a:b].copy()  # a copy even when the slab is all of ``src``: its pages are released below
    if release:
        from .pages import release_rows

        nz = src.shape[2]
        release_rows(src.reshape(src.shape[0], -1), 0, src.shape[0], a * nz, b * nz)
    return part


def _resize_axis_releasing(src: np.ndarray, axis: int, n_out: int, order: int, sub: float, add: float,
                           dst: np.ndarray | None, dtype) -> np.ndarray:
    """:func:`_resize_axis` slab by slab along another axis (x, or y for a pass along x), giving each input slab's
    pages back once it has been read: the same lines computed the same way (bit-identical), about one array resident."""
    from .pages import release_rows

    shape = list(src.shape)
    shape[axis] = n_out
    if dst is None:
        dst = np.empty(shape, dtype)
    along = 0 if axis != 0 else 1
    n = src.shape[along]
    step = _slab_step(n)
    for a in range(0, n, step):
        b = min(n, a + step)
        part = _take_slab(src, along, a, b, True)
        if along == 0:
            _resize_axis(part, axis, n_out, order, sub, add, dst[a:b], dtype)
            release_rows(src, a, b)
        else:
            dst[:, a:b] = _resize_axis(part, axis, n_out, order, sub, add, None, dtype)
        del part
    return dst


def _stream_pass(src: np.ndarray, axis: int, n_out: int, order: int, sub: float, add: float, dtype, channel: int,
                 sink, bounds, release: bool) -> None:
    """The last pass of one channel, box by box in ``sink``'s order (each box spans the pass axis), each box clipped
    to ``bounds`` (the channel's input min/max) and handed to ``sink.put``; with ``release`` the input's pages of a
    slab along x (y for a pass along x) go once every box of that slab has been computed."""
    from .pages import release_rows

    along = 0 if axis != 0 else 1
    out_shape = list(src.shape)
    out_shape[axis] = n_out
    boxes = sink.boxes(channel, axis, tuple(out_shape))
    left: dict = {}
    for box in boxes:
        left[box[along]] = left.get(box[along], 0) + 1
    for box in boxes:
        sl = [slice(int(a), int(b)) for a, b in box]
        sl[axis] = slice(None)
        part = np.ascontiguousarray(src[tuple(sl)])
        block = _resize_axis(part, axis, n_out, order, sub, add, None, np.float32)
        del part
        if bounds is not None:
            _clip(block, 0, np.full(block.shape[0], bounds[0]), np.full(block.shape[0], bounds[1]))
        sink.put(channel, tuple(int(r[0]) for r in box), block)
        del block
        r = box[along]
        left[r] -= 1
        if release and not left[r]:
            if along == 0:
                release_rows(src, int(r[0]), int(r[1]))
            else:
                nz = src.shape[2]
                release_rows(src.reshape(src.shape[0], -1), 0, src.shape[0], int(r[0]) * nz, int(r[1]) * nz)


def resize_image_separate_z(data: np.ndarray, new_shape, axis: int, order: int = 3,
                            order_z: int = 0, *, precise: bool = False) -> np.ndarray:
    """nnU-Net's separate-z image resampling: in-plane per slice, then nearest (or linear) along ``axis``.

    Reproduces ``resample_data_or_seg(data, new_shape, is_seg=False, axis=axis, order=order,
    do_separate_z=True, order_z=order_z)``: every 2D slice along ``axis`` is resized in-plane like
    ``skimage.transform.resize(slice, ..., order, mode='edge', anti_aliasing=False)`` (clipped to that
    slice's own min/max); then, only if the size along ``axis`` changes, the slices are resampled along
    ``axis`` like ``scipy.ndimage.map_coordinates(order=order_z, mode='nearest')`` on the align_corners=False
    grid ``(k + 0.5) * n_in / n_out - 0.5``; for ``order_z=0`` that picks slice ``floor(coordinate + 0.5)``.
    When shrinking along ``axis`` only the slices that are picked are resized.

    Parameters
    ----------
    data : ndarray, shape (c, x, y, z), float32 or float64
        Image channels in nnU-Net's axis order; any memory layout. Not modified.
    new_shape : sequence of 3 int
        Output spatial shape (x, y, z).
    axis : {0, 1, 2}
        The low-resolution spatial axis (0 = x).
    order : {3, 1, 0}
        In-plane spline order.
    order_z : {0, 1}
        Order along ``axis`` (nnU-Net default 0).
    precise : bool
        float64 intermediates, see :func:`resize_image`.

    Returns
    -------
    ndarray, shape (c, *new_shape), float32, C-contiguous

    Raises
    ------
    TypeError, ValueError
        On invalid arrays, shapes, axis or orders.
    """
    shape = _check_image(data, new_shape)
    order = _check_order(order)
    if axis not in (0, 1, 2):
        raise UsageError(f"axis must be the spatial axis 0, 1 or 2 of (x, y, z); got {axis}")
    if order_z not in (0, 1):
        raise UsageError(f"order_z must be 0 or 1; got {order_z}")
    n_c = data.shape[0]
    in_shape = tuple(data.shape[1:])
    out = np.empty((n_c, *shape), np.float32)
    if in_shape == shape:
        out[...] = data
        return out
    n_in, n_out = in_shape[axis], shape[axis]
    inplane = [a for a in (0, 1, 2) if a != axis]
    pick_first = order_z == 0 and n_out < n_in  # shrinking: resize only the slices nearest picks
    z_last = n_out != n_in and not pick_first
    zidx = nearest_indices(n_in, n_out) if n_out != n_in and order_z == 0 else None
    for c in range(n_c):
        if pick_first:
            src = np.take(data[c], zidx, axis=axis)
        else:
            src = np.ascontiguousarray(data[c])
        mid_shape = list(shape)
        mid_shape[axis] = src.shape[axis]
        mid_shape = tuple(mid_shape)
        lo = np.empty(src.shape[axis], np.float64)
        hi = np.empty(src.shape[axis], np.float64)
        if axis == 0:
            _minmax_x(src, lo, hi)
        else:  # a reduction over x: serial (slab minima would need merging)
            _slice_minmax(src, axis, lo, hi)
        shift = 0.0 if np.all(np.isnan(lo)) else _shift(float(np.nanmin(lo)), float(np.nanmax(hi)), order)
        axes = _pass_order(src.shape, mid_shape, inplane)
        if not z_last:
            planes = out[c]
        else:  # only linear z needs more than float32 of the clipped planes
            planes = np.empty(mid_shape, _inter(precise) if order_z == 1 else np.float32)
        _resize_axes(src, mid_shape, axes, order, shift, planes, _inter(precise))
        del src
        if axes and order != 0:
            _clip(planes, axis, lo, hi)
        if z_last:
            if order_z == 0:
                np.take(planes, zidx, axis=axis, out=out[c])
            else:
                _resize_axis(planes, axis, n_out, 1, 0.0, 0.0, out[c])
    return out


@register_warmup
def _warmup() -> None:
    """Compile the signatures preprocessing and export pass: float32 images (C-contiguous) through the public
    functions on tiny inputs (orders 3/1/0, separate z). float64 and ``precise`` compile on first use (each pass
    kernel signature costs ~1 s on a cold start)."""
    for src_dtype in (np.float32,):
        tiny = np.arange(2 * 3 * 4 * 5, dtype=src_dtype).reshape(2, 3, 4, 5)
        for precise in (False,):
            resize_image(tiny, (4, 3, 6), precise=precise)
            resize_image(tiny, (2, 5, 3), order=1, precise=precise)
            resize_image(tiny, (2, 5, 3), order=0, precise=precise)
            resize_image_separate_z(tiny, (5, 3, 6), axis=0, precise=precise)
            resize_image_separate_z(tiny, (2, 5, 3), axis=2, precise=precise)
            resize_image_separate_z(tiny, (4, 5, 3), axis=2, order=1, order_z=1, precise=precise)
