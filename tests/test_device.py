"""One device rule for training (strict) and inference (anything torch accepts)."""
from __future__ import annotations

import pytest
import torch

from nnfast.device import resolve_device
from nnfast.errors import SettingsError


def test_inference_accepts_what_torch_does():
    assert resolve_device("cpu") == torch.device("cpu")
    dev = torch.device("cpu")
    assert resolve_device(dev) is dev
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)


def test_training_is_strict():
    assert resolve_device("cpu", strict=True) == torch.device("cpu")
    assert resolve_device("auto", local_rank=0, strict=True).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SettingsError, match="'auto', 'cuda' or 'cpu'"):
        resolve_device("cuda:1", strict=True)
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="no CUDA device"):
            resolve_device("cuda", strict=True)
    else:
        assert resolve_device("cuda", local_rank=0, strict=True) == torch.device("cuda", 0)


def test_inference_devices_that_do_not_exist_are_settings_errors():
    import torch

    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(SettingsError, match="CUDA device"):
                resolve_device(name)
    else:
        with pytest.raises(SettingsError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(SettingsError, match="mps"):
            resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
