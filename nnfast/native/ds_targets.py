"""Deep-supervision targets of a patch: nnU-Net's ``DownsampleSegForDSTransform`` (``interpolate(seg,
round(shape * scale), mode='nearest-exact')`` per scale) with the index tables built and checked once per patch
shape and scales, not per sample.

:class:`TargetDownsampler` is the wrapper: its constructor computes torch's nearest-exact source indices per axis
and scale (:func:`~nnfast.native.augment_intensity.nearest_exact_indices`, in range by construction); a call checks
only the arrays' shapes and dtypes and runs one gather kernel per scale, writing into the caller's arrays (a batch's
target slots). The per-sample path of the loader used to pay ~0.15 ms of argument checks per scale.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnfast.errors import ShapeError

from ._jit import register_warmup, serial
from .augment_intensity import nearest_exact_indices

__all__ = ["TargetDownsampler"]


@serial
def _gather(src, i0, i1, i2, dst):
    """``dst[s] = src[s][np.ix_(i0, i1, i2)]`` for (s, x, y, z) arrays."""
    for s in range(src.shape[0]):
        for a in range(i0.shape[0]):
            sa = src[s, i0[a]]
            for b in range(i1.shape[0]):
                row = sa[i1[b]]
                d = dst[s, a, b]
                for c in range(i2.shape[0]):
                    d[c] = row[i2[c]]


class TargetDownsampler:
    """Nearest-exact down-sampling of ``(s, *spatial)`` label maps to every deep-supervision scale.

    Parameters
    ----------
    spatial : 2 or 3 ints, the patch shape.
    scales : per scale, one factor per spatial axis (nnU-Net's ``deep_supervision_scales``); a scale of all ones
        means the labels themselves.

    Raises
    ------
    ShapeError
        A scale without one factor per axis, or one that shrinks an axis to 0.
    """

    def __init__(self, spatial: Sequence[int], scales: Sequence[Sequence[float]]):
        self.spatial = tuple(int(n) for n in spatial)
        if len(self.spatial) not in (2, 3) or min(self.spatial) < 1:
            raise ShapeError(f"TargetDownsampler: a 2D or 3D patch shape expected, got {self.spatial}")
        self.shapes: list[tuple[int, ...] | None] = []
        self._idx: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        for sc in scales:
            if len(sc) != len(self.spatial):
                raise ShapeError(f"TargetDownsampler: scale {tuple(sc)} does not match the patch shape {self.spatial}")
            if all(float(v) == 1 for v in sc):
                self.shapes.append(None)
                self._idx.append(None)
                continue
            new = tuple(round(n * float(v)) for n, v in zip(self.spatial, sc))
            if min(new) < 1:
                raise ShapeError(f"TargetDownsampler: scale {tuple(sc)} shrinks {self.spatial} to {new}")
            idx = [np.ascontiguousarray(nearest_exact_indices(n, m), np.int64) for n, m in zip(self.spatial, new)]
            if len(idx) == 2:
                idx.insert(0, np.zeros(1, np.int64))
            self.shapes.append(new)
            self._idx.append((idx[0], idx[1], idx[2]))

    def __call__(self, seg: np.ndarray, out: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """Targets of ``seg`` ``(s, *spatial)`` (int8/int16/int32), one per scale: ``seg`` itself for a scale of
        ones, else ``out[k]`` (C-contiguous ``(s, *shapes[k])`` of seg's dtype) or a new array."""
        if seg.shape[1:] != self.spatial or seg.ndim != len(self.spatial) + 1:
            raise ShapeError(f"TargetDownsampler: seg of shape (s, *{self.spatial}) expected, got {seg.shape}")
        src = np.ascontiguousarray(seg)
        src4 = src if src.ndim == 4 else src[:, None]
        res = []
        for k, (shape, idx) in enumerate(zip(self.shapes, self._idx)):
            if idx is None:
                res.append(seg)
                continue
            full = (seg.shape[0], *shape)
            t = out[k] if out is not None else None
            if t is None:
                t = np.empty(full, seg.dtype)
            elif t.shape != full or t.dtype != seg.dtype or not t.flags.c_contiguous:
                raise ShapeError(f"TargetDownsampler: out[{k}] must be C-contiguous {seg.dtype} {full}, got "
                                 f"{t.dtype} {t.shape}")
            _gather(src4, idx[0], idx[1], idx[2], t if t.ndim == 4 else t[:, None])
            res.append(t)
        return res


@register_warmup
def _warmup() -> None:
    """Compile the label dtypes the loader uses (int8 stores, int16 batches)."""
    for dt in (np.int8, np.int16):
        TargetDownsampler((4, 6, 8), [(1, 1, 1), (0.5, 0.5, 0.5)])(np.zeros((1, 4, 6, 8), dt))
        TargetDownsampler((6, 8), [(1, 1), (0.5, 0.5)])(np.zeros((1, 6, 8), dt))
