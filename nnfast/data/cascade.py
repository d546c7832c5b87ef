"""The cascade's extra input channels: the previous stage's segmentation as one channel per foreground label, with
nnU-Net's augmentations of them (``3d_cascade_fullres``).

nnU-Net's loader reads the previous stage's segmentation as a second label channel, which every spatial transform
(rotation, scaling, mirroring) warps together with the labels. After ``RemoveLabelTansform(-1, 0)`` its training
pipeline (``nnUNetTrainer.get_training_transforms(is_cascaded=True)``, batchgeneratorsv2 0.3.6) does:

1. ``MoveSegAsOneHotToDataTransform(source_channel_idx=1, all_labels=foreground_labels)``: one float channel per
   foreground label appended to the image (1 where the previous stage predicted that label), the label channel
   dropped;
2. with probability 0.4 ``ApplyRandomBinaryOperatorTransform(strel_size=(1, 8), p_per_label=0.5)``: in a random
   order of the one-hot channels, each with probability 0.5, one of binary dilation, erosion, closing, opening
   (uniformly) with a ball of radius ``U(1, 8)`` (a disk for 2D patches); voxels the operation adds to a channel
   are removed from the other channels;
3. with probability 0.2 ``RemoveRandomConnectedComponentFromOneHotEncodingTransform(fill_with_other_class_p=0,
   dont_do_if_covers_more_than_x_percent=0.15, p_per_label=0.5)``: in a random order, each channel with
   probability 0.5, one of its connected components (full connectivity) smaller than 15 % of the patch, chosen
   uniformly, is erased.

Validation batches get step 1 only. This imitates the previous stage's mistakes so that the second stage learns to
correct rather than copy them.

nnfast draws every choice from the sample's generator, except the component to erase, which depends on the data
and is drawn when step 3 runs. The morphology is :func:`nnfast.native.morphology.binary_operation` (the same
voxels as batchgeneratorsv2's FFT convolutions, at O(voxels) whatever the radius); the components are
:func:`nnfast.native.components.label_components`.

Array conventions: one-hot ``(n_labels, *patch)`` float32 (nnU-Net axis order), labels ``(*patch)`` integer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ShapeError
from ..native import components as KC
from ..native import morphology as KM
from .augment_params import AugmentConfig

__all__ = ["BINARY_OPERATORS", "CascadeParams", "sample_cascade", "onehot_into", "augment_onehot"]

#: batchgeneratorsv2's ``any_of_these`` default, in its order
BINARY_OPERATORS = ("dilation", "erosion", "closing", "opening")


@dataclass(frozen=True)
class CascadeParams:
    """What the cascade transforms of one sample do (drawn by :func:`sample_cascade`).

    binary_operators : ``((channel, operator, radius), ...)`` in application order, or None when the transform
        did not fire; ``channel`` indexes the one-hot channels (the foreground labels in order).
    remove_component : channels in application order, or None when the transform did not fire.
    """

    binary_operators: tuple[tuple[int, str, float], ...] | None
    remove_component: tuple[int, ...] | None


def sample_cascade(rng: np.random.Generator, cfg: AugmentConfig, n_labels: int) -> CascadeParams:
    """Draw the cascade transforms of one sample with nnU-Net's probabilities (no data touched)."""
    ops = None
    if rng.random() < cfg.p_binary_operator:
        picked = []
        for c in rng.permutation(n_labels):
            if rng.random() < cfg.binary_operator_p_per_label:
                op = BINARY_OPERATORS[int(rng.integers(len(BINARY_OPERATORS)))]
                lo, hi = cfg.strel_size
                radius = float(lo) if lo == hi else float(rng.uniform(lo, hi))
                picked.append((int(c), op, radius))
        ops = tuple(picked)
    remove = None
    if rng.random() < cfg.p_remove_component:
        remove = tuple(int(c) for c in rng.permutation(n_labels) if rng.random() < cfg.remove_component_p_per_label)
    return CascadeParams(ops, remove)


def onehot_into(seg: np.ndarray, labels: Sequence[int], out: np.ndarray) -> np.ndarray:
    """``out[i] = (seg == labels[i])`` as float32 (``MoveSegAsOneHotToDataTransform``); returns ``out``.

    seg: ``(*spatial)`` integer labels (-1 already replaced by 0); out: ``(len(labels), *spatial)`` float32."""
    if out.shape != (len(labels), *seg.shape):
        raise ShapeError(f"onehot_into: out must have shape {(len(labels), *seg.shape)}, got {out.shape}")
    for i, lab in enumerate(labels):
        np.equal(seg, lab, out=out[i], casting="unsafe")
    return out


def augment_onehot(onehot: np.ndarray, params: CascadeParams, rng: np.random.Generator, cfg: AugmentConfig) -> None:
    """Apply the binary operators and the component removal of ``params`` to ``onehot`` in place.

    Parameters
    ----------
    onehot : ndarray (n_labels, *spatial) float32, 2 or 3 spatial axes
        The previous stage's one-hot channels (:func:`onehot_into`).
    params : CascadeParams
    rng : numpy Generator
        Draws which component to erase.
    cfg : AugmentConfig
        ``remove_component_max_fraction``.
    """
    n = onehot.shape[0]
    for c, op, radius in params.binary_operators or ():
        work = onehot[c] != 0
        result = KM.binary_operation(work, radius, op)
        if n > 1:
            added = result & ~work
            if added.any():
                for oc in range(n):
                    if oc != c:
                        onehot[oc][added] = 0
        onehot[c] = result
    if params.remove_component:
        limit = float(np.prod(onehot.shape[1:], dtype=np.float64)) * cfg.remove_component_max_fraction
        for c in params.remove_component:
            work = onehot[c] != 0
            if not work.any():
                continue
            lab, sizes = KC.label_components(work)
            valid = np.flatnonzero(sizes < limit) + 1
            if valid.size:
                chosen = int(valid[int(rng.integers(valid.size))])
                onehot[c][lab == chosen] = 0
