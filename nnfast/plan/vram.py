"""nnU-Net's VRAM proxy: the summed size of every conv output of a PlainConvUNet or ResidualEncoderUNet, unbuilt.

Reproduces ``PlainConvUNet.compute_conv_feature_map_size`` of dynamic-network-architectures (the number nnU-Net v2's
``ExperimentPlanner.static_estimate_VRAM_usage`` compares to its reference value) in pure Python integers, so that
planning never imports torch.

What dynamic-network-architectures counts (batch 1, elements, not bytes; norms and nonlinearities are not counted):

- encoder stage ``s`` (input size ``x_{s-1}``, ``x_{-1}`` = patch): the first conv is strided, so every conv of the stage
  outputs ``features[s] * prod(x_s)`` with ``x_s = x_{s-1} // strides[s]``; ``n_conv_per_stage[s]`` convs.
- decoder stage ``d`` (``d = 0`` next to the bottleneck) works at skip resolution ``x_k``, ``k = n_stages - 2 - d``:
  the transposed conv outputs ``features[k] * prod(x_k)``, each of its ``n_conv_per_stage_decoder[d]`` convs the same,
  and its 1x1 segmentation conv ``num_classes * prod(x_k)`` -- only for the last (full-resolution) stage unless
  deep supervision is on.

nnU-Net's planner builds the network WITHOUT ``deep_supervision`` (PlainConvUNet's default is False), so it counts the
segmentation output of the last decoder stage only; :func:`nnfast.plan.planner.plan_experiment` passes
``deep_supervision=False`` accordingly.

``ResidualEncoderUNet`` (``ResidualEncoder.compute_conv_feature_map_size`` + the same ``UNetDecoder``) counts instead of
the encoder convs: the stem conv ``features[0] * prod(patch)``; in stage ``s`` the first ``BasicBlockD`` (strided)
``2 * features[s] * prod(x_s)`` plus its skip 1x1 conv ``features[s] * prod(x_s)`` when the width or the size changes,
and every further block ``2 * features[s] * prod(x_s)``.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

from ..errors import PlanError

__all__ = ["compute_conv_feature_map_size"]


class _UNetLike(Protocol):
    strides: Sequence[Sequence[int]]
    features_per_stage: Sequence[int]
    n_conv_per_stage: Sequence[int]
    n_conv_per_stage_decoder: Sequence[int]


def compute_conv_feature_map_size(
    patch_size: Sequence[int],
    architecture: _UNetLike,
    num_input_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
) -> int:
    """Sum of the output sizes (elements, batch 1) of all convs of a PlainConvUNet for one input patch.

    Parameters
    ----------
    patch_size : sequence of int
        Network input size in voxels (2 or 3 axes, nnU-Net axis order), without batch and channel axes.
    architecture : Architecture
        Any object with ``strides``, ``features_per_stage``, ``n_conv_per_stage`` and ``n_conv_per_stage_decoder``
        (e.g. :class:`nnfast.plan.schema.Architecture`).
    num_input_channels : int
        Input channels; they do not change the result (only outputs are counted) but are part of the network.
    num_classes : int
        Outputs of the segmentation heads (nnU-Net's planner uses ``len(dataset.json['labels'])``).
    deep_supervision : bool
        Count the segmentation heads of all decoder stages (True, as trained) or only the full-resolution one (False,
        as nnU-Net's planner estimates).

    Returns
    -------
    int
        Equal to dynamic-network-architectures' ``PlainConvUNet(...).compute_conv_feature_map_size(patch_size)``.

    Raises
    ------
    ValueError
        If the stage lists disagree in length or ``patch_size`` has another number of axes than the strides.
    """
    strides = [tuple(int(v) for v in s) for s in architecture.strides]
    features = [int(f) for f in architecture.features_per_stage]
    n_conv = [int(n) for n in architecture.n_conv_per_stage]
    n_conv_dec = [int(n) for n in architecture.n_conv_per_stage_decoder]
    n_stages = len(strides)
    if not (len(features) == len(n_conv) == n_stages and len(n_conv_dec) == n_stages - 1):
        raise PlanError(
            f"architecture has {n_stages} strides, {len(features)} features_per_stage, {len(n_conv)} n_conv_per_stage "
            f"and {len(n_conv_dec)} n_conv_per_stage_decoder; expected n, n, n and n - 1"
        )
    size = [int(p) for p in patch_size]
    if any(len(s) != len(size) for s in strides):
        raise PlanError(f"patch_size {tuple(size)} has {len(size)} axes but the strides are {strides}")
    if num_input_channels < 1 or num_classes < 1:
        raise PlanError(f"need at least one input channel and one class, got {num_input_channels} and {num_classes}")

    # spatial size of every encoder stage's output
    stage_voxels = []
    for stride in strides:
        size = [i // j for i, j in zip(size, stride)]
        stage_voxels.append(math.prod(size))

    total = 0
    if getattr(architecture, "network_class", "PlainConvUNet") == "ResidualEncoderUNet":
        total += features[0] * math.prod(int(p) for p in patch_size)  # stem
        before = [int(p) for p in patch_size]
        in_features = features[0]
        for s in range(n_stages):
            after = [i // j for i, j in zip(before, strides[s])]
            skip = in_features != features[s] or after != before
            total += (2 * n_conv[s] + (1 if skip else 0)) * features[s] * stage_voxels[s]
            before, in_features = after, features[s]
    else:
        for s in range(n_stages):
            total += n_conv[s] * features[s] * stage_voxels[s]
    for d in range(n_stages - 1):
        k = n_stages - 2 - d
        total += (n_conv_dec[d] + 1) * features[k] * stage_voxels[k]  # stacked convs + transposed conv
        if deep_supervision or d == n_stages - 2:
            total += num_classes * stage_voxels[k]
    return total
