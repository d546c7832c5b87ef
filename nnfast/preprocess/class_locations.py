"""Per-class voxel locations for foreground oversampling (nnU-Net's ``_sample_foreground_locations``).

nnU-Net rule (``DefaultPreprocessor._sample_foreground_locations``, nnunetv2 2.8.1): one
``np.random.RandomState(seed)`` for the whole case; for each class or region, in the order given, the voxels
whose label is in it are the concatenation, over its labels *in the order listed*, of each label's voxels in C
order; ``total`` = their number; ``n = max(min(min_num_samples, total), ceil(total * min_percent_coverage))``
offsets are drawn with ``rs.choice(total, n, replace=False)``, and those entries become ``(0, x, y, z)``
coordinates. A class none of whose labels occurs draws nothing.

This module makes exactly the same RNG calls in the same order and maps the offsets to coordinates with two
Numba passes over the label map (:mod:`nnfast.native.class_locations`), so its output is identical to
nnU-Net's, array for array. Difference: a class without voxels gets an empty ``(0, 4)`` int64 array, where
nnU-Net stores ``[]``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

from nnfast.native.class_locations import count_labels, locate_ranked_voxels

__all__ = ["sample_class_locations"]

ClassKey = Union[int, tuple[int, ...]]


def _normalise(classes) -> list[tuple[ClassKey, tuple[int, ...]]]:
    out = []
    for c in classes:
        if isinstance(c, (tuple, list)):
            labs = tuple(int(x) for x in c)
            out.append((labs, labs))
        else:
            out.append((int(c), (int(c),)))
    return out


def sample_class_locations(
    seg: np.ndarray,
    classes: Sequence[Union[int, Sequence[int]]],
    seed: int = 1234,
    min_num_samples: int = 10000,
    min_percent_coverage: float = 0.01,
) -> dict[ClassKey, np.ndarray]:
    """Sample voxel coordinates of each class/region, identical to nnU-Net's ``_sample_foreground_locations``.

    Parameters
    ----------
    seg : ndarray, shape (1, x, y, z) or (x, y, z)
        Label map after resampling, nnU-Net's axis order, integer or float dtype (-1 = outside the nonzero
        region), any layout.
    classes : sequence of int or of tuples of int
        Foreground labels, or regions (tuples/lists of labels; a voxel belongs to a region when its label is
        in it). With an ignore label nnU-Net appends ``[-1, *all_labels]``.
    seed : int
        Seed of the single ``np.random.RandomState`` used for the whole case.
    min_num_samples : int
        At most this many samples per class unless the coverage rule asks for more.
    min_percent_coverage : float
        At least ``ceil(total * min_percent_coverage)`` samples per class.

    Returns
    -------
    dict
        Key ``int(c)`` for a label, ``tuple(labels)`` for a region; value an int64 array of shape (n, 4) with
        rows ``(0, x, y, z)`` (channel index first), in nnU-Net's draw order; (0, 4) when the class is absent.

    Raises
    ------
    TypeError, ValueError
        On a malformed ``seg``.
    """
    normalised = _normalise(classes)
    labels = sorted({lab for _, labs in normalised for lab in labs})
    counts = dict(zip(labels, count_labels(seg, labels).tolist())) if labels else {}
    rs = np.random.RandomState(seed)

    draws: list[tuple[ClassKey, np.ndarray, np.ndarray]] = []  # (key, label index per sample, rank per sample)
    slot = {lab: i for i, lab in enumerate(labels)}
    for key, labs in normalised:
        present = [lab for lab in labs if counts[lab] > 0]  # repeated labels stay repeated, like nnU-Net's ranges
        if not present:
            draws.append((key, np.empty(0, np.int64), np.empty(0, np.int64)))
            continue
        sizes = np.array([counts[lab] for lab in present], np.int64)
        total = int(sizes.sum())
        n = min(min_num_samples, total)
        n = max(n, int(math.ceil(total * min_percent_coverage)))
        offsets = rs.choice(total, n, replace=False)
        cum = np.cumsum(sizes)
        which = np.searchsorted(cum, offsets, side="right")
        ranks = offsets - (cum - sizes)[which]
        label_index = np.array([slot[lab] for lab in present], np.int64)[which]
        draws.append((key, label_index, ranks.astype(np.int64)))

    all_index = np.concatenate([d[1] for d in draws]) if draws else np.empty(0, np.int64)
    all_ranks = np.concatenate([d[2] for d in draws]) if draws else np.empty(0, np.int64)
    coords = locate_ranked_voxels(seg, labels, all_index, all_ranks) if all_ranks.size else np.empty((0, 4), np.int64)

    result: dict[ClassKey, np.ndarray] = {}
    start = 0
    for key, label_index, _ in draws:
        stop = start + label_index.size
        result[key] = coords[start:stop].copy() if stop > start else np.empty((0, 4), np.int64)
        start = stop
    return result
