"""Training hyperparameters as one dataclass (nnU-Net's trainer attributes, without subclassing).

Defaults are nnU-Net v2's ``nnUNetTrainer`` (``__init__``, ``configure_optimizers``, ``train_step``). Set values from
the CLI or in code: ``TrainConfig.from_plan(plans, "3d_fullres", num_epochs=250)``; write the resolved config next to
the checkpoints with :meth:`TrainConfig.to_json` so that a run can be reproduced and resumed.

This module does not import torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, get_args

from ..errors import SettingsError

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.schema import Plans

__all__ = ["TRAIN_CONFIG_SCHEMA_VERSION", "AmpMode", "CompileMode", "TrainConfig"]

TRAIN_CONFIG_SCHEMA_VERSION = 1

AmpMode = Literal["auto", "fp16", "bf16", "off"]
CompileMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class TrainConfig:
    """nnU-Net's training hyperparameters.

    Attributes
    ----------
    initial_lr, weight_decay, momentum, nesterov
        SGD settings (nnU-Net: 1e-2, 3e-5, 0.99, True).
    poly_exponent
        Exponent of the poly learning-rate schedule ``initial_lr * (1 - epoch / num_epochs) ** poly_exponent``.
    num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch
        1000 epochs of 250 training and 50 validation batches.
    oversample_foreground_percent
        Share of each batch whose patches are centred on a foreground voxel (0.33).
    grad_clip
        Maximum gradient 2-norm (``clip_grad_norm_``, 12).
    deep_supervision
        Train on every decoder output (True).
    amp
        Mixed precision: ``auto`` = nnU-Net's (float16 autocast with a GradScaler on CUDA, off elsewhere), ``fp16``,
        ``bf16`` (no GradScaler needed) or ``off``.
    compile
        ``torch.compile`` the network: ``auto`` = nnU-Net's rule (on for CUDA, not on Windows), ``on``, ``off``.
    save_every
        Write the latest checkpoint every this many epochs (50).
    seed
        Seed of the training run's random generators (nnU-Net's split seed is the same 12345).
    batch_size, patch_size
        None: the plan's. :meth:`from_plan` fills them in, so a config from it is complete; ``patch_size`` is in
        nnU-Net axis order (voxels).
    """

    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    nesterov: bool = True
    poly_exponent: float = 0.9
    num_epochs: int = 1000
    num_iterations_per_epoch: int = 250
    num_val_iterations_per_epoch: int = 50
    oversample_foreground_percent: float = 0.33
    grad_clip: float = 12.0
    deep_supervision: bool = True
    amp: AmpMode = "auto"
    compile: CompileMode = "auto"
    save_every: int = 50
    seed: int = 12345
    batch_size: int | None = None
    patch_size: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # normalise JSON-ish input (lists, ints for floats) so that equality and hashing behave
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        for name in ("initial_lr", "weight_decay", "momentum", "poly_exponent", "oversample_foreground_percent",
                     "grad_clip"):
            object.__setattr__(self, name, float(getattr(self, name)))
        problems = []
        if self.initial_lr <= 0:
            problems.append(f"initial_lr must be > 0, got {self.initial_lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            problems.append("nesterov needs momentum > 0")
        if self.poly_exponent < 0:
            problems.append(f"poly_exponent must be >= 0, got {self.poly_exponent}")
        for name in ("num_epochs", "num_iterations_per_epoch", "save_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_val_iterations_per_epoch < 0:
            problems.append(f"num_val_iterations_per_epoch must be >= 0, got {self.num_val_iterations_per_epoch}")
        if not 0 <= self.oversample_foreground_percent <= 1:
            problems.append(f"oversample_foreground_percent must be in [0, 1], got "
                            f"{self.oversample_foreground_percent}")
        if self.grad_clip <= 0:
            problems.append(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.amp not in get_args(AmpMode):
            problems.append(f"amp must be one of {get_args(AmpMode)}, got {self.amp!r}")
        if self.compile not in get_args(CompileMode):
            problems.append(f"compile must be one of {get_args(CompileMode)}, got {self.compile!r}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.patch_size is not None and (len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1):
            problems.append(f"patch_size must have 2 or 3 positive entries, got {self.patch_size}")
        if problems:
            raise SettingsError("invalid training settings: " + "; ".join(problems))

    @classmethod
    def from_plan(cls, plans: "Plans", config_name: str, **overrides: Any) -> "TrainConfig":
        """Defaults with the plan's batch and patch size, then ``overrides``.

        Parameters
        ----------
        plans : Plans
            The dataset's plans.
        config_name : str
            Configuration to train (inheritance resolved).
        **overrides
            Any field of this class; ``None`` values are ignored (so CLI options left unset keep the defaults).

        Raises
        ------
        SettingsError
            For unknown fields, invalid values, or a patch size with the wrong number of axes or not divisible by
            the network's total stride along an axis.
        PlanError
            If the configuration is not in the plans.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SettingsError(f"unknown training setting(s) {unknown}; known: {sorted(names)}")
        conf = plans.configuration(config_name)
        values: dict[str, Any] = {"batch_size": conf.batch_size, "patch_size": tuple(conf.patch_size)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        assert cfg.patch_size is not None
        strides = conf.architecture.strides
        if len(cfg.patch_size) != len(strides[0]):
            raise SettingsError(f"patch_size {cfg.patch_size} has {len(cfg.patch_size)} axes but configuration "
                                f"`{config_name}` is {len(strides[0])}D")
        total = [1] * len(strides[0])
        for s in strides:
            total = [t * v for t, v in zip(total, s)]
        bad = [a for a, (p, t) in enumerate(zip(cfg.patch_size, total)) if p % t]
        if bad:
            raise SettingsError(f"patch_size {cfg.patch_size} must be divisible by the network's total stride "
                                f"{tuple(total)} on every axis (configuration `{config_name}`); axes {bad} are not")
        return cfg

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict with a ``schema_version``."""
        d = dataclasses.asdict(self)
        if d["patch_size"] is not None:
            d["patch_size"] = list(d["patch_size"])
        return {"schema_version": TRAIN_CONFIG_SCHEMA_VERSION, **d}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Parse :meth:`to_json` output; missing fields take their defaults.

        Raises
        ------
        SettingsError
            For another schema version, unknown keys or invalid values.
        """
        version = d.get("schema_version", TRAIN_CONFIG_SCHEMA_VERSION)
        if version != TRAIN_CONFIG_SCHEMA_VERSION:
            raise SettingsError(f"training config schema version {version!r} is not supported (expected "
                                f"{TRAIN_CONFIG_SCHEMA_VERSION})")
        values = {k: v for k, v in d.items() if k != "schema_version"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SettingsError(f"training config has unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**values)
