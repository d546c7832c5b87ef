"""Fine-tuning: pretrained weights into a new network, the way nnU-Net's ``load_pretrained_weights`` does.

nnU-Net rule (``nnunetv2/run/load_pretrained_weights.py``, v2.8.1): every parameter of the new network except the
segmentation heads (keys containing ``.seg_layers.``) must exist in the pretrained ``network_weights`` with the same
shape, and is copied; the heads keep their fresh initialisation (the new dataset's labels may differ). nnfast also
accepts pretrained weights whose input channel count differs (e.g. pretraining on CT, fine-tuning on two MRI
channels): then the first convolution (and every alias of it, such as the decoder's view of the encoder) keeps its
initialisation too. Everything not copied is listed in the log. Anything else that is missing or of another shape
means another architecture: a :class:`~nnfast.errors.PlanError` naming the file and the first differing parameter.

Files: an nnfast checkpoint (``checkpoint_*.pt``), an nnU-Net checkpoint (``checkpoint_*.pth``), both with
``network_weights``, or a bare state dict. They are read with ``torch.load(weights_only=True)``; nnU-Net's
checkpoints hold NumPy scalars in their logs, so only NumPy's scalar and dtype types are allowlisted
(:func:`read_network_weights` is the one function a fuller loader replaces).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import PlanError, StoreError

__all__ = ["read_network_weights", "PretrainedPlan", "plan_pretrained", "load_pretrained_weights"]

log = logging.getLogger(__name__)

#: Key fragments never transferred (nnU-Net's ``skip_strings_in_pretrained``).
SKIP_STRINGS = (".seg_layers.",)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _numpy_safe_globals() -> list:
    """NumPy's scalar reconstructor and dtype classes: what nnU-Net's checkpoints pickle besides tensors."""
    import numpy as np

    out: list = [np.dtype]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out.append(scalar)
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType", "UInt8DType"):
        t = getattr(getattr(np, "dtypes", None), name, None)
        if t is not None:
            out.append(t)
    return out


def read_network_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The network state dict of a checkpoint file (``network_weights``, or the file itself when it is a state
    dict), with DDP/``torch.compile`` prefixes (``module.``, ``_orig_mod.``) removed.

    Raises
    ------
    StoreError
        The file is missing, cannot be read with ``weights_only=True`` (NumPy scalars allowed), or holds no state
        dict.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"pretrained weights `{path}` do not exist; give an nnfast checkpoint_*.pt or an nnU-Net "
                         "checkpoint_*.pth")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as first:
            if "weights_only" not in str(first) and "Unsupported global" not in str(first):
                raise
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreError(f"pretrained weights `{path}` cannot be read safely ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected an nnfast .pt or nnU-Net .pth "
                         "checkpoint") from None
    weights = data.get("network_weights", data) if isinstance(data, Mapping) else None
    if not isinstance(weights, Mapping) or not weights or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise StoreError(f"pretrained weights `{path}` hold no network state dict (expected `network_weights`, as "
                         "nnfast and nnU-Net checkpoints store it, or a state dict)")
    out = {}
    for k, v in weights.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


@dataclass(frozen=True)
class PretrainedPlan:
    """Which parameters :func:`load_pretrained_weights` copies and which keep their initialisation (and why)."""

    path: Path
    copied: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (key, reason)


def _first_conv_keys(network: nn.Module) -> set[str]:
    """The first convolution's weight and every alias of it (the same parameter under several names: PlainConvUNet's
    decoder holds the encoder, so its parameters appear twice in the state dict)."""
    params = list(network.named_parameters(remove_duplicate=False))
    first = next((p for _, p in params if p.ndim >= 3), None)
    return {k for k, p in params if p is first} if first is not None else set()


def plan_pretrained(network: nn.Module, weights: Mapping[str, torch.Tensor], path: str | Path) -> PretrainedPlan:
    """Decide what :func:`load_pretrained_weights` copies (see the module docstring for the rule).

    Raises
    ------
    PlanError
        A parameter of ``network`` (not a segmentation head, not the first convolution with another input channel
        count) is missing from ``weights`` or has another shape: the architectures differ.
    """
    path = Path(path)
    model = network.state_dict()
    first_conv = _first_conv_keys(network)
    copied, skipped = [], []
    for k, v in model.items():
        if any(s in k for s in SKIP_STRINGS):
            skipped.append((k, "segmentation head"))
            continue
        if k not in weights:
            raise PlanError(f"pretrained weights `{path}` do not fit this network: they have no parameter `{k}` "
                            f"(the new network has {len(model)} entries, the file {len(weights)}); they come from "
                            "another architecture (plans, configuration or network class); fine-tune with the "
                            "pretraining dataset's plans (nnfast plan --transfer-from)")
        w = weights[k]
        if tuple(w.shape) != tuple(v.shape):
            if k in first_conv and w.ndim == v.ndim and w.shape[0] == v.shape[0] and w.shape[2:] == v.shape[2:]:
                skipped.append((k, f"first convolution: {w.shape[1]} input channels pretrained, {v.shape[1]} now"))
                continue
            raise PlanError(f"pretrained weights `{path}` do not fit this network: `{k}` has shape "
                            f"{tuple(w.shape)} in the file but {tuple(v.shape)} in the network; they come from "
                            "another architecture (plans, configuration or network class); fine-tune with the "
                            "pretraining dataset's plans (nnfast plan --transfer-from)")
        copied.append(k)
    return PretrainedPlan(path=path, copied=tuple(copied), skipped=tuple(skipped))


def load_pretrained_weights(network: nn.Module, path: str | Path,
                            weights: Mapping[str, torch.Tensor] | None = None) -> PretrainedPlan:
    """Copy pretrained weights into ``network`` (in place; nnU-Net's ``load_pretrained_weights``) and log what was
    skipped. ``weights``: the file's state dict when already read (:func:`read_network_weights`).

    Raises
    ------
    StoreError
        The file cannot be read.
    PlanError
        The architectures differ (see :func:`plan_pretrained`).
    """
    if weights is None:
        weights = read_network_weights(path)
    plan = plan_pretrained(network, weights, path)
    state = network.state_dict()
    for k in plan.copied:
        state[k] = weights[k]
    network.load_state_dict(state)
    log.info("loaded pretrained weights from %s: %d of %d entries copied; kept initialised: %s", plan.path,
             len(plan.copied), len(state), "; ".join(f"{k} ({why})" for k, why in plan.skipped) or "none")
    return plan
