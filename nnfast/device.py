"""The torch device a command runs on: one rule for training and inference.

``"auto"`` means CUDA when torch sees a GPU, else the CPU. Training asks for ``strict=True``: an explicit ``"cuda"``
without a visible GPU is a :class:`~nnfast.errors.SettingsError` naming the fix, and the process's local rank picks
the GPU (DDP). Inference accepts anything ``torch.device`` does (``"cuda:1"``, ``"mps"``, a ``torch.device``); a
named CUDA or MPS device that this machine does not have is a :class:`~nnfast.errors.SettingsError` too, raised
before any model is loaded.
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
        ``strict`` and an unknown choice, or ``"cuda"``/``"cuda:N"``/``"mps"`` (given as text) without that device.
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
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and not isinstance(device, torch.device):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise SettingsError(f"device {device!r} was requested but torch sees {n} CUDA device(s) (CPU-only torch "
                                "build, or CUDA_VISIBLE_DEVICES); use --device cpu" + (" or cuda:0" if n else ""))
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SettingsError("device 'mps' was requested but this torch build or machine has no Apple MPS backend; "
                            "use --device cpu")
    return dev
