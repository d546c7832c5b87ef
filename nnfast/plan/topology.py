"""U-Net topology from spacing and patch size: nnU-Net v2's ``get_pool_and_conv_props`` rule.

Reproduces ``nnunetv2/experiment_planning/experiment_planners/network_topology.py`` (``get_pool_and_conv_props``,
``pad_shape``, ``get_shape_must_be_divisible_by``) value for value, in plain Python (no torch).

Axis order: spacing and patch size in nnU-Net's axis order after transposition (the low-resolution axis first), spacing
in mm, sizes in voxels.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from ..errors import ShapeError

__all__ = ["Topology", "get_pool_and_conv_props", "pad_shape", "get_shape_must_be_divisible_by"]


class Topology(NamedTuple):
    """Result of :func:`get_pool_and_conv_props`; unpacks in the order nnU-Net's function returns its values."""

    num_pool_per_axis: tuple[int, ...]
    """How often each axis is downsampled (stride 2) in the encoder."""
    strides: tuple[tuple[int, ...], ...]
    """Per encoder stage, the stride of its first conv (stage 0: all ones). nnU-Net's ``pool_op_kernel_sizes``."""
    kernel_sizes: tuple[tuple[int, ...], ...]
    """Per encoder stage, the conv kernel size (1 or 3 per axis; the bottleneck is always all 3)."""
    patch_size: tuple[int, ...]
    """The input patch size padded up to a multiple of ``shape_must_be_divisible_by``."""
    shape_must_be_divisible_by: tuple[int, ...]
    """``2 ** num_pool_per_axis``."""


def _py_number(v: float) -> float:
    """``v`` as a Python int (integral types) or float, exactly."""
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def get_shape_must_be_divisible_by(num_pool_per_axis: Sequence[int]) -> tuple[int, ...]:
    """``2 ** n`` per axis: the factor each patch axis must be a multiple of for ``n`` stride-2 downsamplings."""
    return tuple(2 ** int(n) for n in num_pool_per_axis)


def pad_shape(shape: Sequence[float], must_be_divisible_by: int | Sequence[int]) -> tuple[int, ...]:
    """Round each axis of ``shape`` up to the next multiple of ``must_be_divisible_by`` (nnU-Net's ``pad_shape``).

    An axis that is already a multiple is kept. ``shape`` may hold non-integer values (nnU-Net passes median shapes
    such as 35.5 through here); the result is truncated to int exactly like nnU-Net's ``astype(int)``.

    Parameters
    ----------
    shape : sequence of float
        Sizes in voxels, one per axis.
    must_be_divisible_by : int or sequence of int
        One factor for all axes, or one per axis.

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        If a per-axis ``must_be_divisible_by`` has another length than ``shape``.
    """
    if isinstance(must_be_divisible_by, (int,)) or not hasattr(must_be_divisible_by, "__len__"):
        factors = [int(must_be_divisible_by)] * len(shape)
    else:
        factors = [int(f) for f in must_be_divisible_by]
        if len(factors) != len(shape):
            raise ShapeError(f"pad_shape: must_be_divisible_by has {len(factors)} entries but shape {tuple(shape)} has "
                             f"{len(shape)} axes")
    out = []
    for s, f in zip(map(_py_number, shape), factors):
        rem = s % f
        padded = s if rem == 0 else s + f - rem
        out.append(int(padded))
    return tuple(out)


def get_pool_and_conv_props(
    spacing: Sequence[float],
    patch_size: Sequence[float],
    min_feature_map_size: int = 4,
    max_numpool: int = 999999,
) -> Topology:
    """Encoder strides and kernel sizes for a patch, as nnU-Net v2's ``get_pool_and_conv_props``.

    Each stage downsamples (stride 2) every axis that (a) is still at least ``2 * min_feature_map_size`` voxels long,
    (b) has a current spacing within a factor 2 of the smallest current spacing among such axes, and (c) has been
    pooled fewer than ``max_numpool`` times; if only one axis qualifies it must be at least
    ``3 * min_feature_map_size`` long. Pooling stops when no axis qualifies. A conv kernel axis is 1 until its current
    spacing comes within a factor 2 of the smallest current spacing, then 3 for good; the bottleneck kernel is all 3.
    Finally the patch is padded to a multiple of ``2 ** num_pool_per_axis``.

    Parameters
    ----------
    spacing : sequence of float
        Voxel spacing in mm, one per axis (2 or 3 axes), nnU-Net axis order.
    patch_size : sequence of float
        Candidate patch size in voxels (may be non-integer, e.g. a median shape).
    min_feature_map_size : int
        Smallest edge length of a bottleneck feature map (nnU-Net: 4).
    max_numpool : int
        Cap on downsamplings per axis (nnU-Net: 999999, i.e. none).

    Returns
    -------
    Topology
        ``(num_pool_per_axis, strides, kernel_sizes, patch_size, shape_must_be_divisible_by)``; ``strides`` has
        one entry per stage (first all ones), ``kernel_sizes`` too.
    """
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    patch_size = [_py_number(s) for s in patch_size]  # numpy scalars are exact as Python numbers, and faster
    cur_size = list(patch_size)
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    num_pool = [0] * dim
    kernel = [1] * dim

    while True:
        candidates = [a for a in range(dim) if cur_size[a] >= 2 * min_feature_map_size]
        if not candidates:
            break
        finest = min(cur_spacing[a] for a in candidates)
        candidates = [a for a in candidates if cur_spacing[a] / finest < 2]
        candidates = [a for a in candidates if num_pool[a] < max_numpool]
        if len(candidates) == 1 and cur_size[candidates[0]] < 3 * min_feature_map_size:
            break
        if not candidates:
            break

        finest_all = min(cur_spacing)
        for a in range(dim):
            if kernel[a] != 3 and cur_spacing[a] / finest_all < 2:
                kernel[a] = 3

        stage_stride = [1] * dim
        for a in candidates:
            stage_stride[a] = 2
            num_pool[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
        strides.append(tuple(stage_stride))
        kernels.append(tuple(kernel))

    kernels.append((3,) * dim)
    divisible_by = get_shape_must_be_divisible_by(num_pool)
    return Topology(
        num_pool_per_axis=tuple(num_pool),
        strides=tuple(strides),
        kernel_sizes=tuple(kernels),
        patch_size=pad_shape(patch_size, divisible_by),
        shape_must_be_divisible_by=divisible_by,
    )
