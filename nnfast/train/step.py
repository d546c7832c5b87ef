"""One training step and one validation step, in nnU-Net v2's order (``nnUNetTrainer.train_step`` /
``validation_step`` / ``on_validation_epoch_end``), plus the device-dependent AMP / compile decisions.

Batches are dicts like nnU-Net's loader yields: ``data`` float ``(b, c, *patch)`` and ``target`` either a label map
``(b, 1, *patch)`` (region training: region channels ``(b, r [+ 1], *patch)``) or, with deep supervision, a list of
them highest resolution first (spatial axes in nnU-Net
order). Tensors are moved to the network's device with ``non_blocking=True`` (pin them in the loader).

Both steps return tensors that stay on the device (no synchronisation per step); call ``float()`` / ``.cpu()`` when
logging.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, UsageError
from .config import AmpMode, CompileMode

__all__ = [
    "resolve_amp",
    "make_grad_scaler",
    "resolve_compile",
    "train_step",
    "ValidationResult",
    "validation_step",
    "pseudo_dice",
    "summarize_validation",
]


def _device_of(network: nn.Module) -> torch.device:
    try:
        return next(network.parameters()).device
    except StopIteration:  # pragma: no cover - a network without parameters
        return torch.device("cpu")


def resolve_amp(mode: AmpMode, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for ``mode`` on ``device`` (None: full precision).

    ``auto`` is nnU-Net's choice: float16 on CUDA, off elsewhere (autocast on CPU is slow, on MPS unsupported).
    ``fp16`` / ``bf16`` apply on CUDA only as well; ``off`` is always None.

    Raises
    ------
    ValueError
        For an unknown mode.
    """
    device = torch.device(device)
    if mode not in ("auto", "fp16", "bf16", "off"):
        raise ConfigError(f"amp mode must be 'auto', 'fp16', 'bf16' or 'off', got {mode!r}")
    if mode == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def make_grad_scaler(amp_dtype: torch.dtype | None, device: torch.device | str) -> torch.amp.GradScaler | None:
    """nnU-Net's ``GradScaler("cuda")`` when training in float16 on CUDA; None otherwise (bfloat16 needs none)."""
    if amp_dtype == torch.float16 and torch.device(device).type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def resolve_compile(mode: CompileMode, device: torch.device | str) -> bool:
    """Whether to ``torch.compile`` the network: ``auto`` follows nnU-Net's ``_do_i_compile`` (on for CUDA except
    on Windows; off on CPU and MPS). ``on`` forces it (except on MPS, where torch.compile does not work)."""
    device = torch.device(device)
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"compile mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or device.type == "mps":
        return False
    if mode == "on":
        return True
    return device.type == "cuda" and os.name != "nt"


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, (list, tuple)):
        return [t.to(device, non_blocking=True) for t in x]
    return x.to(device, non_blocking=True)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is not None and device.type == "cuda":
        return torch.autocast("cuda", dtype=amp_dtype)
    return contextlib.nullcontext()


def train_step(network: nn.Module, batch: Mapping[str, Any], loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
               grad_clip: float | None = 12.0) -> torch.Tensor:
    """One optimisation step (nnU-Net's ``train_step``).

    ``zero_grad(set_to_none=True)`` -> forward and loss under autocast (CUDA only, ``amp_dtype``) ->
    ``scaler.scale(loss).backward()`` -> ``scaler.unscale_`` -> ``clip_grad_norm_(grad_clip)`` -> ``scaler.step`` ->
    ``scaler.update``; without a scaler: ``backward`` -> clip -> ``optimizer.step``.

    Parameters
    ----------
    network : nn.Module
        In training mode (possibly compiled); its parameters' device is where the batch goes.
    batch : mapping
        ``{"data": Tensor, "target": Tensor or list of Tensor}``.
    loss_fn : nn.Module
        ``loss_fn(network(data), target)``, e.g. from :func:`nnfast.train.loss.build_loss`.
    optimizer : torch.optim.Optimizer
    scaler : torch.amp.GradScaler, optional
        For float16 training (:func:`make_grad_scaler`).
    amp_dtype : torch.dtype, optional
        Autocast dtype (:func:`resolve_amp`); ignored off CUDA.
    grad_clip : float, optional
        Max gradient norm (nnU-Net: 12); None disables clipping.

    Returns
    -------
    Tensor
        The loss, detached, 0-d, on the device.
    """
    device = _device_of(network)
    data = _to(batch["data"], device)
    target = _to(batch["target"], device)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, amp_dtype):
        output = network(data)
        loss = loss_fn(output, target)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
        optimizer.step()
    return loss.detach()


@dataclass(frozen=True)
class ValidationResult:
    """Loss and hard (argmax) voxel counts of one validation batch.

    ``tp``, ``fp``, ``fn``: int64 tensors of shape ``(num_classes - 1,)`` for the foreground classes 1..C-1, summed
    over the batch and all voxels (ignored voxels excluded). All on the device.
    """

    loss: torch.Tensor
    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor


def validation_step(network: nn.Module, batch: Mapping[str, Any], loss_fn: nn.Module,
                    amp_dtype: torch.dtype | None = None, ignore_label: int | None = None,
                    regions: bool = False) -> ValidationResult:
    """Loss and pseudo-Dice counts of one batch (nnU-Net's ``validation_step``), without gradients.

    The loss is computed like in training (all deep-supervision outputs when the network returns a list); the
    counts use the highest-resolution output only: ``argmax`` over classes against the target, voxels with
    ``ignore_label`` excluded, background dropped. The target values must lie in ``[0, C)`` apart from
    ``ignore_label``. With ``regions`` the target holds region channels (the ignore mask last when
    ``ignore_label`` is set) and each output channel is its region, predicted where ``sigmoid > 0.5`` (logit > 0);
    the counts are per region (``ValidationResult`` then has one entry per region).
    """
    device = _device_of(network)
    data = _to(batch["data"], device)
    target = _to(batch["target"], device)
    with torch.no_grad():
        with _autocast(device, amp_dtype):
            output = network(data)
            loss = loss_fn(output, target)
        if isinstance(output, (list, tuple)):
            output = output[0]
        if isinstance(target, (list, tuple)):
            target = target[0]
        if regions:
            return _region_counts(output, target, loss, ignore_label is not None)
        n_classes = output.shape[1]
        pred = output.argmax(1).reshape(-1)
        labels = (target[:, 0] if target.ndim == output.ndim else target).reshape(-1).long()
        if ignore_label is not None:
            keep = labels != ignore_label
            pred, labels = pred[keep], labels[keep]
        confusion = torch.bincount(labels * n_classes + pred, minlength=n_classes * n_classes)
        confusion = confusion[: n_classes * n_classes].reshape(n_classes, n_classes)  # [true, predicted]
        tp = confusion.diagonal()
        fp = confusion.sum(0) - tp
        fn = confusion.sum(1) - tp
    return ValidationResult(loss=loss.detach().float(), tp=tp[1:], fp=fp[1:], fn=fn[1:])


def _region_counts(output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
                   has_ignore: bool) -> ValidationResult:
    """Per-region TP/FP/FN of ``sigmoid(output) > 0.5`` against region targets (nnU-Net's ``get_tp_fp_fn_tn``
    with the ignore mask)."""
    pred = output > 0  # sigmoid(x) > 0.5 exactly where x > 0
    if has_ignore:
        keep = target[:, -1:] == 0
        target = target[:, :-1]
        pred = pred & keep
        ref = (target != 0) & keep
    else:
        ref = target != 0
    axes = [0, *range(2, output.ndim)]
    tp = (pred & ref).sum(axes)
    fp = (pred & ~ref).sum(axes)
    fn = (~pred & ref).sum(axes)
    return ValidationResult(loss=loss.detach().float(), tp=tp, fp=fp, fn=fn)


def pseudo_dice(tp: Any, fp: Any, fn: Any) -> np.ndarray:
    """Per-class Dice ``2 tp / (2 tp + fp + fn)`` from summed counts (float64; NaN for a class never present nor
    predicted, as nnU-Net's ``on_validation_epoch_end``)."""
    tp, fp, fn = (np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)


def summarize_validation(results: Sequence[ValidationResult]) -> tuple[float, np.ndarray, float]:
    """Epoch summary of validation batches: mean loss, global per-class pseudo-Dice (counts summed over all
    batches first) and their NaN-ignoring mean (nnU-Net's ``mean_fg_dice``; NaN if every class is NaN)."""
    if not results:
        raise UsageError("no validation results to summarise")
    loss = float(torch.stack([r.loss for r in results]).mean())
    tp = torch.stack([r.tp for r in results]).sum(0)
    fp = torch.stack([r.fp for r in results]).sum(0)
    fn = torch.stack([r.fn for r in results]).sum(0)
    dice = pseudo_dice(tp, fp, fn)
    mean = float(np.nanmean(dice)) if np.any(~np.isnan(dice)) else float("nan")
    return loss, dice, mean
