"""nnU-Net's optimiser and learning-rate schedule (``nnUNetTrainer.configure_optimizers``, ``lr_scheduler/polylr.py``).

SGD with Nesterov momentum 0.99, weight decay 3e-5, initial learning rate 1e-2; the learning rate follows
``initial_lr * (1 - epoch / num_epochs) ** 0.9`` and is set once at the start of every epoch
(epoch 0: 1e-2, 500: 5.36e-3, 999: 2.0e-5).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["build_optimizer", "poly_lr", "PolyLRScheduler"]


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
                    cfg: TrainConfig) -> torch.optim.SGD:
    """``torch.optim.SGD(params, cfg.initial_lr, weight_decay, momentum, nesterov)`` as nnU-Net builds it."""
    return torch.optim.SGD(params, cfg.initial_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                           nesterov=cfg.nesterov)


def _poly(step: int, initial_lr: float, max_steps: int, exponent: float) -> float:
    if not 0 <= step <= max_steps:
        raise ConfigError(f"poly learning rate: step {step} is outside [0, {max_steps}]")
    return initial_lr * (1 - step / max_steps) ** exponent


def poly_lr(epoch: int, cfg: TrainConfig) -> float:
    """Learning rate of ``epoch`` (0-based): ``initial_lr * (1 - epoch / num_epochs) ** poly_exponent``.

    Raises
    ------
    ValueError
        If ``epoch`` is negative or larger than ``cfg.num_epochs``.
    """
    return _poly(epoch, cfg.initial_lr, cfg.num_epochs, cfg.poly_exponent)


class PolyLRScheduler:
    """nnU-Net's ``PolyLRScheduler``: writes the poly learning rate into every parameter group.

    ``step(epoch)`` sets the rate of ``epoch`` (the trainer calls it at the start of each epoch);
    ``step()`` without argument advances an internal counter. As in nnU-Net, construction sets the epoch-0 rate and
    the counter then stands at 1.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    initial_lr : float
    max_steps : int
        Number of epochs.
    exponent : float
        0.9 in nnU-Net.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int,
                 exponent: float = 0.9) -> None:
        self.optimizer = optimizer
        self.initial_lr = float(initial_lr)
        self.max_steps = int(max_steps)
        self.exponent = float(exponent)
        self.ctr = 0
        self._last_lr: list[float] = []
        self.step()

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> "PolyLRScheduler":
        return cls(optimizer, cfg.initial_lr, cfg.num_epochs, cfg.poly_exponent)

    def step(self, current_step: int | None = None) -> None:
        """Set the learning rate of ``current_step`` (None or -1: of the internal counter, which then advances)."""
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = _poly(int(current_step), self.initial_lr, self.max_steps, self.exponent)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_lr": self.initial_lr, "max_steps": self.max_steps, "exponent": self.exponent,
                "ctr": self.ctr, "last_lr": list(self._last_lr)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_lr = float(state["initial_lr"])
        self.max_steps = int(state["max_steps"])
        self.exponent = float(state["exponent"])
        self.ctr = int(state["ctr"])
        self._last_lr = [float(v) for v in state.get("last_lr", [])]
