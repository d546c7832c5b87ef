"""nnU-Net's resampling API (``nnunetv2.preprocessing.resampling.default_resampling``) on nnfast's kernels.

Same names, signatures and decisions as nnU-Net v2.8.1: :func:`compute_new_shape` (half-to-even rounding),
:func:`get_do_separate_z`, :func:`get_lowres_axis`, :func:`determine_do_sep_z_and_axis` and
:func:`resample_data_or_seg_to_shape`. The arrays are computed by :mod:`nnfast.native.resample` (images:
separable B-spline, skimage ``resize`` parity) and :mod:`nnfast.native.resample_seg` (labels: one-pass one-hot
linear with batchgenerators 0.25.5's decision rule, bit-identical).

Supported: images (float) with ``order`` 0/1/3 and, on the separate-z path, ``order_z`` 0/1; label maps (integer,
or float holding integers) with ``order`` 0/1 and ``order_z`` 0. Anything else raises
:class:`UnsupportedResamplingError` (nnU-Net's defaults are data 3/0, seg 1/0, probabilities 1/0).

Axis order is nnU-Net's after transposition: ``data`` is ``(c, x, y, z)`` and spacings are ``(x, y, z)`` in mm.
"""
from __future__ import annotations

import logging
from typing import Sequence, Union

import numpy as np

from nnfast.errors import GeometryError, UnsupportedResamplingError
from nnfast.native.resample import resize_image, resize_image_separate_z
from nnfast.native.resample_seg import resize_labels, resize_labels_separate_z

__all__ = [
    "ANISO_THRESHOLD",
    "UnsupportedResamplingError",
    "compute_new_shape",
    "get_do_separate_z",
    "get_lowres_axis",
    "determine_do_sep_z_and_axis",
    "resample_data_or_seg_to_shape",
    "resample_data_or_seg_to_spacing",
    "resample_image_consuming",
]

logger = logging.getLogger(__name__)

ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD

Spacing = Union[Sequence[float], np.ndarray]
Shape = Union[Sequence[int], np.ndarray]



# --------------------------------------------------------------------------------------------- decisions
def compute_new_shape(old_shape: Shape, old_spacing: Spacing, new_spacing: Spacing) -> np.ndarray:
    """Shape after resampling from ``old_spacing`` to ``new_spacing``: ``round(old_spacing / new_spacing * old_shape)``.

    Python's ``round`` on the float product, i.e. half-to-even (64.5 -> 64), exactly like nnU-Net.

    Parameters
    ----------
    old_shape : sequence of int
        Spatial shape (x, y, z) (or any length equal to the spacings).
    old_spacing, new_spacing : sequence of float
        Spacings in mm, same axis order.

    Returns
    -------
    ndarray of int
        The new shape.

    Raises
    ------
    GeometryError
        If the three sequences differ in length.
    """
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise GeometryError(f"shape {tuple(old_shape)}, old spacing {tuple(old_spacing)} and new spacing "
                            f"{tuple(new_spacing)} must have the same number of axes")
    return np.array([int(round(sp_old / sp_new * n)) for sp_old, sp_new, n in zip(old_spacing, new_spacing, old_shape)])


def get_do_separate_z(spacing: Spacing, anisotropy_threshold: float = ANISO_THRESHOLD) -> bool:
    """True when ``max(spacing) / min(spacing) > anisotropy_threshold`` (nnU-Net's anisotropy rule)."""
    return bool((np.max(spacing) / np.min(spacing)) > anisotropy_threshold)


def get_lowres_axis(new_spacing: Spacing) -> np.ndarray:
    """Indices of the axes with the largest spacing (``max(spacing) / spacing == 1``), as nnU-Net computes them."""
    return np.where(max(new_spacing) / np.array(new_spacing) == 1)[0]


def determine_do_sep_z_and_axis(force_separate_z: bool | None, current_spacing: Spacing, new_spacing: Spacing,
                                separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> tuple[bool, int | None]:
    """Whether to resample the low-resolution axis separately, and which axis (nnU-Net's rule).

    ``force_separate_z`` True/False overrides the anisotropy test (True takes the low-resolution axis of
    ``current_spacing``); None separates when ``current_spacing`` is anisotropic (axis from it), else when
    ``new_spacing`` is (axis from it). When two or three axes share the largest spacing there is no single
    low-resolution axis and nothing is separated.

    Returns
    -------
    (do_separate_z, axis) : (bool, int or None)
    """
    if force_separate_z is not None:
        do_separate_z = bool(force_separate_z)
        axes = get_lowres_axis(current_spacing) if force_separate_z else None
    elif get_do_separate_z(current_spacing, separate_z_anisotropy_threshold):
        do_separate_z, axes = True, get_lowres_axis(current_spacing)
    elif get_do_separate_z(new_spacing, separate_z_anisotropy_threshold):
        do_separate_z, axes = True, get_lowres_axis(new_spacing)
    else:
        do_separate_z, axes = False, None
    if axes is None:
        return do_separate_z, None
    if len(axes) != 1:  # e.g. spacing (0.24, 1.25, 1.25): no out-of-plane axis
        return False, None
    return do_separate_z, int(axes[0])


# --------------------------------------------------------------------------------------------- resampling
def _label_view(seg: np.ndarray) -> np.ndarray:
    """``seg`` as a dtype the label kernel takes (int8/int16/int32/uint8), values unchanged."""
    if seg.dtype in (np.int8, np.int16, np.int32, np.uint8):
        return seg
    if seg.dtype == np.bool_:
        return seg.view(np.uint8)
    if seg.dtype.kind not in "iuf":
        raise UnsupportedResamplingError(f"label maps must have an integer dtype; got {seg.dtype}")
    if seg.size == 0:
        return seg.astype(np.int32)
    lo, hi = np.min(seg), np.max(seg)
    if seg.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi) and np.all(np.mod(seg, 1) == 0)):
        raise UnsupportedResamplingError(f"label map of dtype {seg.dtype} holds non-integer values; labels must be "
                                         "whole numbers (cast the label map to int16)")
    if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
        raise UnsupportedResamplingError(f"label values [{lo}, {hi}] do not fit in int32")
    return seg.astype(np.int32)


def resample_data_or_seg_to_shape(data: np.ndarray, new_shape: Shape, current_spacing: Spacing, new_spacing: Spacing,
                                  is_seg: bool = False, order: int = 3, order_z: int = 0,
                                  force_separate_z: bool | None = False,
                                  separate_z_anisotropy_threshold: float = ANISO_THRESHOLD, *,
                                  precise: bool = False) -> np.ndarray:
    """Resample images or label maps to ``new_shape`` the way nnU-Net does, on fast kernels.

    Decisions follow nnU-Net's ``resample_data_or_seg_to_shape`` (v2.8.1): :func:`determine_do_sep_z_and_axis`
    picks the separate-z path; without it every channel is resized in 3D; with it every slice along the
    low-resolution axis is resized in 2D and the slices are then resampled along that axis with ``order_z``
    (only if its size changes).

    Parameters
    ----------
    data : ndarray (or torch CPU tensor), shape (c, x, y, z)
        Images (float32/float64; float16 is computed in float32) when ``is_seg`` is False; label maps (any
        integer dtype, bool, or float holding whole numbers) when True. Any memory layout; not modified.
    new_shape : sequence of 3 int
        Output spatial shape (x, y, z).
    current_spacing, new_spacing : sequence of 3 float
        Spacings (x, y, z) in mm; they only decide the separate-z path.
    is_seg : bool
        Label maps (one-hot linear, ``order`` 1) instead of images (B-spline, ``order`` 3).
    order : int
        Images: 0, 1 or 3. Label maps: 0 or 1.
    order_z : int
        Order along the low-resolution axis on the separate-z path. Images: 0 or 1. Label maps: 0.
    force_separate_z : bool or None
        nnU-Net's override (its default is False; plans pass None to let the anisotropy rule decide).
    separate_z_anisotropy_threshold : float
        Spacing ratio above which an axis counts as low-resolution (nnU-Net: 3).
    precise : bool
        Images only: float64 intermediates, making float32 results bit-identical to nnU-Net's in practice
        (see :func:`nnfast.native.resample.resize_image`). Keyword-only; not an nnU-Net parameter.

    Returns
    -------
    ndarray, shape (c, *new_shape), dtype of ``data``
        ``data`` itself when the shape does not change (as in nnU-Net). Label maps are identical to
        nnU-Net's; images differ by about 1e-7 of each channel's range (0 with ``precise`` for float32).

    Raises
    ------
    GeometryError
        If ``data`` is not 4D or ``new_shape``/spacings do not have 3 entries.
    UnsupportedResamplingError
        For orders nnfast does not implement, or label maps that are not whole numbers.
    """
    if not isinstance(data, np.ndarray):
        data = np.asarray(data)  # torch CPU tensors, lists
    if data.ndim != 4:
        raise GeometryError(f"data must have shape (c, x, y, z); got shape {data.shape}")
    shape = np.asarray(new_shape)
    if shape.shape != (3,) or len(current_spacing) != 3 or len(new_spacing) != 3:
        raise GeometryError(f"new_shape {tuple(np.ravel(shape))}, current spacing {tuple(current_spacing)} and new "
                            f"spacing {tuple(new_spacing)} must each have 3 entries (x, y, z)")
    do_separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing,
                                                      separate_z_anisotropy_threshold)
    target = tuple(int(s) for s in shape)
    if tuple(data.shape[1:]) == target:
        return data
    z_changes = do_separate_z and data.shape[1 + axis] != target[axis]
    logger.debug("resampling %s %s -> %s (separate z: %s, axis %s)", "seg" if is_seg else "data",
                 data.shape[1:], target, do_separate_z, axis)
    if is_seg:
        if order not in (0, 1):
            raise UnsupportedResamplingError(f"label maps are resampled with order 0 or 1 (nnU-Net: 1); got {order}")
        if z_changes and order_z != 0:
            raise UnsupportedResamplingError(f"label maps support order_z 0 along the low-resolution axis; got "
                                             f"{order_z}")
        seg = _label_view(data)
        if do_separate_z:
            out = resize_labels_separate_z(seg, target, axis, order=order)
        else:
            out = resize_labels(seg, target, order=order)
        return out if out.dtype == data.dtype else out.astype(data.dtype)

    if data.dtype.kind != "f":
        raise UnsupportedResamplingError(f"images must be floating point (nnU-Net casts them to float32 before "
                                         f"resampling); got {data.dtype}")
    if order not in (0, 1, 3):
        raise UnsupportedResamplingError(f"images are resampled with order 0, 1 or 3 (nnU-Net: 3, probabilities 1); "
                                         f"got {order}")
    if z_changes and order_z not in (0, 1):
        raise UnsupportedResamplingError(f"images support order_z 0 or 1 along the low-resolution axis; got {order_z}")
    img = data if data.dtype in (np.float32, np.float64) else data.astype(np.float32)
    if do_separate_z:
        out = resize_image_separate_z(img, target, axis, order=order, order_z=order_z, precise=precise)
    else:
        out = resize_image(img, target, order=order, precise=precise)
    return out if out.dtype == data.dtype else out.astype(data.dtype)


def resample_data_or_seg_to_spacing(data: np.ndarray, current_spacing: Spacing, new_spacing: Spacing,
                                    is_seg: bool = False, order: int = 3, order_z: int = 0,
                                    force_separate_z: bool | None = False,
                                    separate_z_anisotropy_threshold: float = ANISO_THRESHOLD, *,
                                    precise: bool = False) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_spacing``: :func:`compute_new_shape`, then
    :func:`resample_data_or_seg_to_shape` (same parameters; ``data`` is (c, x, y, z))."""
    if np.ndim(data) != 4:
        raise GeometryError(f"data must have shape (c, x, y, z); got shape {np.shape(data)}")
    new_shape = compute_new_shape(np.shape(data)[1:], current_spacing, new_spacing)
    return resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg, order, order_z,
                                         force_separate_z, separate_z_anisotropy_threshold, precise=precise)


def resample_image_consuming(arrays: list, new_shape: Shape, current_spacing: Spacing, new_spacing: Spacing,
                             order: int = 3, order_z: int = 0, force_separate_z: bool | None = False,
                             separate_z_anisotropy_threshold: float = ANISO_THRESHOLD, *, sink=None,
                             release: bool = False) -> np.ndarray | None:
    """:func:`resample_data_or_seg_to_shape` of the image ``arrays.pop()`` (``is_seg=False``), freeing it early.

    The caller hands over its only reference (``arrays`` is a one-element list, emptied here). On the 3D path the input
    is dropped once the first separable pass of its last channel has run, so that the input, the resampler's
    intermediate and the output never coexist (a 300x512x512 CT case: -300 MiB of peak). The result is bit-identical
    to :func:`resample_data_or_seg_to_shape` (the same kernel passes in the same order: ``nnfast.native.resample``'s
    ``resize_image_consuming``). The separate-z path, float64 images and unchanged shapes
    go through :func:`resample_data_or_seg_to_shape` unchanged.

    ``release`` (the caller hands over the input's memory too) and ``sink`` (the output goes box by box to
    ``sink.put``, None is returned) are those of :func:`nnfast.native.resample.resize_image_consuming`, on the 3D path;
    on the others the result is computed whole and then handed to ``sink`` box by box. Values are bit-identical
    either way.
    """
    from nnfast.native.resample import resize_image_consuming

    data = arrays.pop()
    target = tuple(int(s) for s in new_shape)
    do_separate_z, _axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing,
                                                       separate_z_anisotropy_threshold)
    if (do_separate_z or not isinstance(data, np.ndarray) or data.ndim != 4 or data.dtype != np.float32
            or tuple(data.shape[1:]) == target or order not in (0, 1, 3)):
        out = resample_data_or_seg_to_shape(data, target, current_spacing, new_spacing, False, order, order_z,
                                            force_separate_z, separate_z_anisotropy_threshold)
        if sink is None:
            return out
        del data
        from nnfast.native.resample import feed_sink

        feed_sink(sink, np.asarray(out))
        return None
    holder = [data]
    del data  # resize_image_consuming holds the only reference
    return resize_image_consuming(holder, target, order, sink=sink, release=release)
