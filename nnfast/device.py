"""The torch device a command runs on: one rule for training and inference.

``"auto"`` means CUDA when torch sees a GPU, else the CPU. Training asks for ``strict=True``: an explicit ``"cuda"``
without a visible GPU is a :class:`~nnfast.errors.SettingsError` naming the fix, and the process's local rank picks
the GPU (DDP). Inference accepts anything ``torch.device`` does (``"cuda:1"``, a ``torch.device``) and leaves the
errors to torch.
"""
from __future__ import annotations

from typing import Any, Literal

from .errors import SettingsError

__all__ = ["DeviceChoice", "resolve_device"]

DeviceChoice = Literal["auto", "cuda", "cpu"]


def resolve_device(device: Any = "auto", *, local_rank: int | None = None, strict: bool = False):
    """The ``torch.device`` for ``device``.

    Parameters
    ----------
    device : str, torch.device or None
        ``"auto"`` (or None): CUDA when available, else CPU. A ``torch.device`` is returned as is.
    local_rank : int, optional
        With ``strict``: index of the CUDA device (the process's DDP local rank).
    strict : bool
        Only ``"auto"``, ``"cuda"`` and ``"cpu"`` are accepted, and ``"cuda"`` needs a visible GPU (training).

    Raises
    ------
    SettingsError
        ``strict`` and an unknown choice, or ``"cuda"`` without a GPU.
    """
    import torch

    if strict:
        if device not in ("auto", "cuda", "cpu"):
            raise SettingsError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise SettingsError("device 'cuda' was requested but torch sees no CUDA device (CPU-only torch build, "
                                    "or no GPU visible: check CUDA_VISIBLE_DEVICES); use --device cpu")
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
