"""nnU-Net v2's training loss: soft Dice + cross-entropy, with deep supervision.

Reproduces ``nnunetv2/training/loss`` as ``nnUNetTrainer._build_loss`` configures it for label (non-region) training:

- :class:`SoftDiceLoss` = ``MemoryEfficientSoftDiceLoss(apply_nonlin=softmax over dim 1, do_bg=False, smooth=1e-5)``:
  per class ``dc = (2 I + smooth) / max(G + P + smooth, 1e-8)`` with ``I = sum(p * y)``, ``G = sum(y)``,
  ``P = sum(p)`` summed in float32 over the spatial axes (and the batch axis with ``batch_dice``); the one-hot target
  is built without gradient; loss ``= -mean(dc)``. With ``batch_dice`` and ``ddp=True`` in a multi-process run the
  sums are all-gathered over the ranks first (``MemoryEfficientSoftDiceLoss(ddp=True)``), so every rank computes the
  Dice of the global batch.
- :class:`DiceCELoss` = ``DC_and_CE_loss(weight_ce=1, weight_dice=1)``: ``CE(logits, target[:, 0].long()) - dice``,
  so the total can be negative. With an ignore label those voxels are masked out of both terms (CE through
  ``ignore_index``; CE is 0 when every voxel is ignored).
- :class:`DiceBCELoss` = ``DC_and_BCE_loss`` as configured for region training (one sigmoid channel per region):
  ``BCEWithLogits(logits, y) + SoftDice(sigmoid(logits), y, do_bg=True)``. The target holds one 0/1 channel per
  region (:meth:`nnfast.labels.LabelManager.region_targets`), with an ignore label one more channel last, which
  masks both terms (BCE: ``sum(bce * mask) / max(sum(mask), 1e-8)``, the mask counted once per voxel as nnU-Net
  does).
- :class:`DeepSupervisionLoss` = ``DeepSupervisionWrapper``: ``sum_i w_i * loss(out_i, target_i)`` over the outputs of
  every decoder stage (highest resolution first), ``w_i = 2^-i``, lowest resolution weight 0, normalised to sum 1.

Tensors: logits ``(b, c, *spatial)`` (any float dtype; sums are float32), targets ``(b, 1, *spatial)`` label maps
(float or integer dtype, nnU-Net's loader gives float) or ``(b, *spatial)``; spatial axes in nnU-Net order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputTypeError, PlanError, ShapeError
from ..plan.schema import ConfigurationPlan
from .ddp import AllGatherGrad, is_distributed

__all__ = [
    "SoftDiceLoss",
    "DiceCELoss",
    "DiceBCELoss",
    "DeepSupervisionLoss",
    "deep_supervision_scales",
    "deep_supervision_weights",
    "build_loss",
]


def _label_map(target: torch.Tensor, ndim: int) -> torch.Tensor:
    """``target`` as ``(b, 1, *spatial)``."""
    return target if target.ndim == ndim else target.unsqueeze(1)


class SoftDiceLoss(nn.Module):
    """nnU-Net's ``MemoryEfficientSoftDiceLoss`` with softmax over the channel axis.

    Parameters
    ----------
    batch_dice : bool
        Sum intersection / sizes over the batch too (one Dice per class) instead of one Dice per sample and class
        (the plan's ``batch_dice``).
    do_bg : bool
        Include the background channel (nnU-Net: False for softmax training).
    smooth : float
        Added to numerator and denominator (nnU-Net: 1e-5).
    apply_softmax : bool
        Apply ``softmax(dim=1)`` to the input first (False: the input already holds probabilities).
    ddp : bool
        With ``batch_dice``, sum intersection / sizes over the batches of all ranks of the initialised
        ``torch.distributed`` process group (nnU-Net's ``ddp=True``): every rank's loss is the Dice of the global
        batch, and each rank's input gets ``world_size`` times the gradient of the single-process loss of the global
        batch (DistributedDataParallel's gradient averaging divides that back out). The forward and backward are then
        collectives that every rank must run. Without a process group (or with one rank), or without
        ``batch_dice``, it changes nothing.
    """

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5,
                 apply_softmax: bool = True, ddp: bool = False) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = float(smooth)
        self.apply_softmax = apply_softmax
        self.ddp = ddp

    def forward(self, x: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Negative mean soft Dice.

        Parameters
        ----------
        x : Tensor ``(b, c, *spatial)``
            Logits (or probabilities with ``apply_softmax=False``).
        target : Tensor
            Label map ``(b, 1, *spatial)`` / ``(b, *spatial)`` with values in ``[0, c)``, or a one-hot / soft target
            of ``x``'s shape.
        loss_mask : Tensor ``(b, 1, *spatial)``, optional
            1 (True) where the voxel counts, 0 where it is ignored.

        Returns
        -------
        Tensor
            Scalar float32 loss in ``[-1, 0]``.
        """
        if self.apply_softmax:
            x = torch.softmax(x, 1)
        axes = tuple(range(2, x.ndim))
        first = 0 if self.do_bg else 1
        with torch.no_grad():
            if target.shape == x.shape:
                y = target[:, first:].to(torch.float32)
            else:
                labels = _label_map(target, x.ndim).long()
                classes = torch.arange(first, x.shape[1], device=x.device).view(1, -1, *([1] * len(axes)))
                # one-hot of the kept classes, (b, c - first, *spatial): a comparison is cheaper than nnU-Net's
                # zeros + scatter, and float32 avoids mixed-dtype casts in the products below
                y = (labels == classes).to(torch.float32)
            if loss_mask is not None:
                y = y * loss_mask
            sum_gt = y.sum(axes, dtype=torch.float32)
        x = x[:, first:]
        if loss_mask is None:
            intersect = (x * y).sum(axes, dtype=torch.float32)
            sum_pred = x.sum(axes, dtype=torch.float32)
        else:
            intersect = (x * y).sum(axes, dtype=torch.float32)  # y is already masked
            sum_pred = (x * loss_mask).sum(axes, dtype=torch.float32)
        if self.batch_dice:
            intersect = intersect.sum(0, dtype=torch.float32)
            sum_pred = sum_pred.sum(0, dtype=torch.float32)
            sum_gt = sum_gt.sum(0, dtype=torch.float32)
            if self.ddp and is_distributed():
                # nnU-Net gathers the (b, c) terms and sums over the ranks, then over the batch. Summing the local
                # batch first gives the same sums (and, through AllGatherGrad's backward, the same gradients) with
                # one (world, 3, c) gather instead of three (world, b, c) ones, and works when the ranks hold
                # different batch sizes (split_batch deals an odd global batch unevenly), where nnU-Net's fails.
                terms = AllGatherGrad.apply(torch.stack((intersect, sum_pred, sum_gt))).sum(0, dtype=torch.float32)
                intersect, sum_pred, sum_gt = terms.unbind(0)
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        return -dc.mean()


class DiceCELoss(nn.Module):
    """nnU-Net's ``DC_and_CE_loss``: ``weight_ce * CE + weight_dice * SoftDice`` (SoftDice is negative).

    Parameters
    ----------
    batch_dice : bool
        See :class:`SoftDiceLoss`.
    ignore_label : int, optional
        Label value excluded from both terms (nnU-Net's ``ignore`` label).
    weight_ce, weight_dice : float
        Term weights (nnU-Net: 1 and 1); a zero weight skips that term.
    smooth : float
        Dice smoothing (nnU-Net: 1e-5).
    ddp : bool
        All-gather the batch-Dice terms over the ranks (see :class:`SoftDiceLoss`; nnU-Net sets it when training
        under DDP). The CE term stays per rank, as in nnU-Net.
    """

    def __init__(self, batch_dice: bool = False, ignore_label: int | None = None, weight_ce: float = 1.0,
                 weight_dice: float = 1.0, smooth: float = 1e-5, ddp: bool = False) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)
        self.dc = SoftDiceLoss(batch_dice=batch_dice, do_bg=False, smooth=smooth, apply_softmax=False, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(b, c, *spatial)`` against the label map ``target`` ``(b, 1, *spatial)``."""
        target = _label_map(target, logits.ndim)
        if target.shape[1] != 1:
            raise ShapeError(f"DiceCELoss needs a label map of shape (b, 1, *spatial), got {tuple(target.shape)}")
        labels = target[:, 0].long()
        # one log-softmax feeds both terms (nnU-Net runs softmax and log-softmax separately): p = exp(log p)
        log_p = torch.log_softmax(logits, 1)
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        if self.ignore_label is None:
            if self.weight_dice != 0:
                loss = loss + self.weight_dice * self.dc(log_p.exp(), target)
            if self.weight_ce != 0:
                loss = loss + self.weight_ce * F.nll_loss(log_p, labels)
            return loss
        mask = target != self.ignore_label
        if self.weight_dice != 0:
            loss = loss + self.weight_dice * self.dc(log_p.exp(), torch.where(mask, target, 0), loss_mask=mask)
        if self.weight_ce != 0:
            # mean over the voxels that count; 0 when none does (nnU-Net skips CE then). Written without a
            # data-dependent branch so that it neither synchronises the GPU nor breaks a compiled graph.
            ce = F.nll_loss(log_p, labels, ignore_index=int(self.ignore_label), reduction="sum")
            loss = loss + self.weight_ce * ce / mask.sum(dtype=torch.float32).clamp_min(1.0)
        return loss


class DiceBCELoss(nn.Module):
    """nnU-Net's ``DC_and_BCE_loss`` (region training): ``weight_ce * BCEWithLogits + weight_dice * SoftDice``.

    Parameters
    ----------
    batch_dice : bool
        See :class:`SoftDiceLoss`.
    use_ignore_label : bool
        The target's last channel marks ignored voxels (nnU-Net's ``use_ignore_label``); they are excluded from both
        terms.
    weight_ce, weight_dice, smooth, ddp :
        As in :class:`DiceCELoss` (the Dice includes every channel: ``do_bg=True``).
    """

    def __init__(self, batch_dice: bool = False, use_ignore_label: bool = False, weight_ce: float = 1.0,
                 weight_dice: float = 1.0, smooth: float = 1e-5, ddp: bool = False) -> None:
        super().__init__()
        self.use_ignore_label = bool(use_ignore_label)
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)
        self.dc = SoftDiceLoss(batch_dice=batch_dice, do_bg=True, smooth=smooth, apply_softmax=False, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(b, r, *spatial)`` against region targets ``(b, r [+ 1], *spatial)`` (bool, integer
        or float 0/1; the extra last channel is the ignore mask with ``use_ignore_label``)."""
        n = logits.shape[1] + (1 if self.use_ignore_label else 0)
        if target.ndim != logits.ndim or target.shape[1] != n:
            raise ShapeError(f"DiceBCELoss needs region targets of shape (b, {n}, *spatial) for {logits.shape[1]} "
                             f"region outputs{' and the ignore channel' if self.use_ignore_label else ''}, got "
                             f"{tuple(target.shape)}")
        mask = None
        if self.use_ignore_label:
            mask = target[:, -1:] == 0
            target = target[:, :-1]
        y = target.to(torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        if self.weight_dice != 0:
            loss = loss + self.weight_dice * self.dc(torch.sigmoid(logits), y, loss_mask=mask)
        if self.weight_ce != 0:
            if mask is None:
                ce = F.binary_cross_entropy_with_logits(logits, y)
            else:
                ce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * mask).sum() \
                    / mask.sum(dtype=torch.float32).clamp_min(1e-8)
            loss = loss + self.weight_ce * ce
        return loss


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Scale of every deep-supervision output relative to the patch (nnU-Net's ``_get_deep_supervision_scales``).

    ``1 / cumprod(strides, axis=0)`` without the last (bottleneck) row: one entry per decoder output, highest
    resolution (all 1.0) first. Used to downsample the targets.

    Parameters
    ----------
    strides : sequence of sequences of int
        Per encoder stage, the stride per spatial axis (``Architecture.strides``).
    """
    cum = np.cumprod(np.asarray(strides, dtype=np.int64), axis=0)
    return [[float(v) for v in 1.0 / row] for row in cum[:-1]]


def deep_supervision_weights(n_outputs: int, lowest_weight: float = 0.0) -> list[float]:
    """nnU-Net's loss weights for ``n_outputs`` deep-supervision outputs (highest resolution first).

    ``2^-i`` per output, the lowest-resolution one set to ``lowest_weight`` (nnU-Net: 0; 1e-6 under DDP without
    torch.compile so that DDP sees a gradient for every parameter), normalised to sum 1. Example, 5 outputs:
    ``[0.533, 0.267, 0.133, 0.067, 0]``.

    With a single output (a 2-stage network) its weight stays 1: nnU-Net would zero it and divide by zero.
    """
    if n_outputs < 1:
        raise ConfigError(f"deep supervision needs at least one output, got n_outputs={n_outputs}")
    w = np.array([1.0 / 2 ** i for i in range(n_outputs)])
    if n_outputs > 1:
        w[-1] = lowest_weight
    w = w / w.sum()
    return [float(v) for v in w]


class DeepSupervisionLoss(nn.Module):
    """``sum_i weights[i] * loss(outputs[i], targets[i])``, skipping zero weights (nnU-Net's ``DeepSupervisionWrapper``).

    Parameters
    ----------
    loss : nn.Module
        Loss of one output, ``loss(output, target) -> scalar``.
    weights : sequence of float
        One weight per output, highest resolution first (see :func:`deep_supervision_weights`).
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        if not any(w != 0 for w in weights):
            raise ConfigError(f"at least one deep-supervision weight must be non-zero, got {list(weights)}")
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """``outputs`` / ``targets``: lists (highest resolution first) of equal length ``len(weights)``."""
        if not isinstance(outputs, (list, tuple)) or not isinstance(targets, (list, tuple)):
            raise InputTypeError(f"deep supervision needs lists of outputs and targets, got {type(outputs).__name__} "
                                 f"and {type(targets).__name__}; switch deep supervision on in the network and the "
                                 "loader")
        if len(outputs) != len(self.weights) or len(targets) != len(self.weights):
            raise ShapeError(f"deep supervision expects {len(self.weights)} outputs and targets, got "
                             f"{len(outputs)} outputs and {len(targets)} targets")
        total = None
        for w, o, t in zip(self.weights, outputs, targets):
            if w != 0:
                term = w * self.loss(o, t)
                total = term if total is None else total + term
        return total


def build_loss(config: ConfigurationPlan, ignore_label: int | None = None,
               deep_supervision: bool = True, lowest_weight: float = 0.0, ddp: bool = False,
               regions: bool = False) -> nn.Module:
    """The loss nnU-Net's trainer builds for a configuration (``nnUNetTrainer._build_loss``).

    Parameters
    ----------
    config : ConfigurationPlan
        Gives ``batch_dice`` and, for deep supervision, the number of outputs (``n_stages - 1``).
    ignore_label : int, optional
        The dataset's ignore label.
    deep_supervision : bool
        Wrap in :class:`DeepSupervisionLoss` (the network must return all decoder outputs).
    lowest_weight : float
        Weight of the lowest-resolution output before normalisation (see :func:`deep_supervision_weights`).
    ddp : bool
        The run is distributed (nnU-Net passes ``self.is_ddp``): with the plan's ``batch_dice`` the Dice terms are
        all-gathered over the ranks (see :class:`SoftDiceLoss`).
    regions : bool
        Region training (:attr:`nnfast.labels.LabelManager.has_regions`): :class:`DiceBCELoss` on region targets
        (with an ignore label, their last channel is the ignore mask) instead of :class:`DiceCELoss`.

    Raises
    ------
    PlanError
        If the configuration's network has fewer than 2 stages.
    """
    loss: nn.Module
    if regions:
        loss = DiceBCELoss(batch_dice=config.batch_dice, use_ignore_label=ignore_label is not None, ddp=ddp)
    else:
        loss = DiceCELoss(batch_dice=config.batch_dice, ignore_label=ignore_label, ddp=ddp)
    if not deep_supervision:
        return loss
    n_outputs = config.architecture.n_stages - 1
    if n_outputs < 1:
        raise PlanError(f"configuration `{config.name}` has {config.architecture.n_stages} stage(s); deep supervision "
                        "needs at least 2")
    return DeepSupervisionLoss(loss, deep_supervision_weights(n_outputs, lowest_weight))
