"""Normalization schemes, chosen per channel by name as nnU-Net v2 does.

``CTNormalization`` (dataset foreground statistics, clip to p0.5/p99.5), ``ZScoreNormalization`` (per case, within the
nonzero region when ``use_mask_for_norm``), ``NoNormalization``, ``RescaleTo01Normalization``, ``RGBTo01Normalization``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DatasetError, PlanError
from ..fingerprint.schema import IntensityStats

__all__ = ["SCHEMES", "scheme_for_channel_name", "normalize_channel", "normalize"]

SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization", "RGBTo01Normalization")

_BY_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}


def scheme_for_channel_name(name: str) -> str:
    """nnU-Net's mapping from a ``channel_names`` entry to a scheme (any unknown name -> z-score)."""
    return _BY_NAME.get(name.casefold(), "ZScoreNormalization")


def normalize_channel(
    image: np.ndarray,
    scheme: str,
    use_mask: bool,
    seg: np.ndarray | None,
    stats: IntensityStats | None,
    out: np.ndarray | None = None,
    where: str = "",
) -> np.ndarray:
    """Normalize one channel (shape (x, y, z)); returns float32.

    ``seg`` is the cropped label map of the case (-1 outside the nonzero region), used for the mask when ``use_mask``.
    """
    from nnfast.native.normalize import ct_normalize, zscore_normalize

    if scheme == "CTNormalization":
        if stats is None:
            raise PlanError("CTNormalization needs the fingerprint's foreground intensity statistics")
        return ct_normalize(image, stats.percentile_00_5, stats.percentile_99_5, stats.mean, stats.std, out=out)
    if scheme == "ZScoreNormalization":
        mask = (seg >= 0) if (use_mask and seg is not None) else None
        return zscore_normalize(image, mask, out=out)
    if out is None:
        out = np.empty(image.shape, np.float32)
    if scheme == "NoNormalization":
        np.copyto(out, image, casting="unsafe")
        return out
    if scheme == "RescaleTo01Normalization":
        np.copyto(out, image, casting="unsafe")
        out -= out.min()
        out /= max(out.max(), 1e-8)
        return out
    if scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise DatasetError(f"{where}: RGBTo01Normalization expects values in 0..255, found {image.min()}..{image.max()}")
        np.copyto(out, image, casting="unsafe")
        out /= np.float32(255.0)
        return out
    raise PlanError(f"unknown normalization scheme {scheme!r}; expected one of {SCHEMES}")


def normalize(
    data: np.ndarray,
    seg: np.ndarray | None,
    schemes: Sequence[str],
    use_mask_for_norm: Sequence[bool],
    stats: Sequence[IntensityStats] | None,
    where: str = "",
) -> np.ndarray:
    """Normalize every channel of ``data`` (c, x, y, z) in place when it is float32 C-contiguous; returns float32 data."""
    if len(schemes) != data.shape[0]:
        raise PlanError(f"{where}: the plan has {len(schemes)} normalization schemes but the case has {data.shape[0]} channels")
    inplace = data.dtype == np.float32 and data.flags.c_contiguous
    out = data if inplace else np.empty(data.shape, np.float32)
    s = None if seg is None else seg[0]
    for c in range(data.shape[0]):
        normalize_channel(data[c], schemes[c], bool(use_mask_for_norm[c]), s, stats[c] if stats else None,
                          out=out[c], where=where)
    return out
