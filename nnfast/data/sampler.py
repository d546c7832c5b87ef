"""Patch sampling with nnU-Net v2's semantics (``nnUNetDataLoader``): which cases, which samples are forced to
contain foreground, and where each patch lies.

Cases are drawn uniformly with replacement. Within a batch the last ``round(bs * 0.33)`` samples are forced to
contain foreground: a class is chosen uniformly among the classes present in the case, then one of its stored
locations, and the patch is centred there (lower bound clamped to nnU-Net's ``lbs``, no upper clamp). Other samples
lie uniformly within nnU-Net's bounds, which allow the patch to extend past the image by half of ``need_to_pad``.
The box returned is nnU-Net's *enlarged* box (``initial_patch_size``); its centre is the centre of the final patch,
so the distribution of patch centres equals nnU-Net's. The loader then reads only what the sample needs.

Axis order: nnU-Net's ``(x, y, z)`` after transposition; 2D configurations sample ``(1, y, z)`` boxes (a slice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["SamplerConfig", "forced_foreground", "get_bbox", "sample_batch_cases"]


@dataclass(frozen=True)
class SamplerConfig:
    """What the sampler needs to know.

    ``patch_size`` is the final patch size and ``initial_patch_size`` nnU-Net's enlarged one (equal when no spatial
    augmentation is used, e.g. validation). For 2D configurations both are 3-tuples with a leading 1.
    """

    patch_size: tuple[int, ...]
    initial_patch_size: tuple[int, ...]
    batch_size: int
    oversample_foreground_percent: float = 0.33
    probabilistic_oversampling: bool = False
    annotated_classes_key: tuple[int, ...] | None = None  # (-1, *all_labels) when the dataset has an ignore label

    @property
    def need_to_pad(self) -> tuple[int, ...]:
        return tuple(int(a) - int(b) for a, b in zip(self.initial_patch_size, self.patch_size))

    @property
    def has_ignore(self) -> bool:
        return self.annotated_classes_key is not None


def forced_foreground(cfg: SamplerConfig, rng: np.random.Generator) -> list[bool]:
    """Which samples of a batch must contain foreground (nnU-Net's ``_oversample_last_XX_percent``)."""
    if cfg.probabilistic_oversampling:
        return [bool(rng.uniform() < cfg.oversample_foreground_percent) for _ in range(cfg.batch_size)]
    n_random = round(cfg.batch_size * (1 - cfg.oversample_foreground_percent))
    return [not j < n_random for j in range(cfg.batch_size)]


def sample_batch_cases(case_ids: Sequence[str], batch_size: int, rng: np.random.Generator) -> list[str]:
    """Cases of one batch: uniform, with replacement."""
    idx = rng.integers(0, len(case_ids), size=batch_size)
    return [case_ids[i] for i in idx]


def get_bbox(
    cfg: SamplerConfig,
    data_shape: Sequence[int],
    force_fg: bool,
    class_locations: Mapping[Any, np.ndarray] | None,
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """nnU-Net's ``nnUNetDataLoader.get_bbox``: the enlarged box ``[lbs, ubs)`` of one sample.

    Parameters
    ----------
    data_shape : spatial shape of the stored case (x, y, z)
    force_fg : whether this sample must be centred on a foreground voxel
    class_locations : ``{label or region tuple: (n, 4) array of (0, x, y, z)}`` of the case

    Returns
    -------
    (lower bounds, upper bounds) per axis; may extend past the array (the reader pads).
    """
    patch = [int(p) for p in cfg.initial_patch_size]
    dim = len(data_shape)
    need_to_pad = list(cfg.need_to_pad)
    for d in range(dim):
        if need_to_pad[d] + data_shape[d] < patch[d]:
            need_to_pad[d] = patch[d] - data_shape[d]
    lbs = [-need_to_pad[i] // 2 for i in range(dim)]
    ubs = [data_shape[i] + need_to_pad[i] // 2 + need_to_pad[i] % 2 - patch[i] for i in range(dim)]

    selected = None
    if force_fg or cfg.has_ignore:
        locs = class_locations or {}
        if not force_fg:
            key = cfg.annotated_classes_key
            selected = key if len(locs.get(key, ())) > 0 else None
        else:
            eligible = [k for k in locs.keys() if len(locs[k]) > 0]
            if cfg.has_ignore and len(eligible) > 1:
                eligible = [k for k in eligible if k != cfg.annotated_classes_key] or eligible
            selected = eligible[int(rng.integers(len(eligible)))] if eligible else None
    if selected is not None:
        voxels = class_locations[selected]
        voxel = voxels[int(rng.integers(len(voxels)))]
        bbox_lbs = [max(lbs[i], int(voxel[i + 1]) - patch[i] // 2) for i in range(dim)]
    else:
        bbox_lbs = [int(rng.integers(lbs[i], ubs[i] + 1)) for i in range(dim)]
    return bbox_lbs, [bbox_lbs[i] + patch[i] for i in range(dim)]
