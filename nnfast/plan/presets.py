"""Planner presets: nnU-Net v2's default ``ExperimentPlanner`` and its residual-encoder presets ``nnUNetPlannerResEncM/L/XL``.

One :class:`PlannerPreset` per ``nnfast plan --preset`` value, holding every number in which nnU-Net's planners differ
(``experiment_planners/residual_unets/residual_encoder_unet_planners.py``, v2.8.1):

=============  ===================  ================  ============  ==========  ===============  ===============
preset         nnU-Net planner      network           ref 3D / 2D   at GB       default GB       max covered
=============  ===================  ================  ============  ==========  ===============  ===============
default        ExperimentPlanner    PlainConvUNet     560e6 / 85e6  8           8                5 %
resenc-m       nnUNetPlannerResEncM ResidualEncoder.  680e6 / 135e6 8           8                100 %
resenc-l       nnUNetPlannerResEncL ResidualEncoder.  2.1e9 / 380e6 24          24               100 %
resenc-xl      nnUNetPlannerResEncXL ResidualEncoder. 3.6e9 / 560e6 40          40               100 %
=============  ===================  ================  ============  ==========  ===============  ===============

The residual planners also stop shrinking the patch when the estimate is at most the reference (the default planner
compares ``estimate / ref_bs * 2``), use ``n_blocks_per_stage = (1, 3, 4, 6, 6, ...)`` residual blocks in the encoder
and one conv per decoder stage, and share the preprocessed ``2d`` / ``3d_fullres`` data of the default plans (their
``3d_lowres`` gets its own data identifier).

This module imports neither numpy nor torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..layout import PLANS_IDENTIFIER

__all__ = ["PlannerPreset", "PRESETS", "DEFAULT_PRESET", "get_preset", "preset_for_planner", "nnunet_plans_name"]


@dataclass(frozen=True)
class PlannerPreset:
    """The numbers of one nnU-Net experiment planner (see the module docstring)."""

    name: str
    nnunet_planner: str
    nnunet_plans_name: str
    plans_identifier: str
    network_class: str
    reference_val_3d: int
    reference_val_2d: int
    reference_corresp_gb: float
    default_gpu_memory_gb: float
    max_dataset_covered: float
    # None: PlainConvUNet's fixed convs per stage (2 encoder, 2 decoder)
    blocks_per_stage_encoder: tuple[int, ...] | None = None
    blocks_per_stage_decoder: tuple[int, ...] | None = None

    @property
    def residual(self) -> bool:
        return self.network_class == "ResidualEncoderUNet"

    @property
    def experiment_planner(self) -> str:
        """The name recorded in nnfast's plans (``nnfast.<nnU-Net planner>``)."""
        return f"nnfast.{self.nnunet_planner}"


_RES_ENC = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
_RES_DEC = (1,) * 12

DEFAULT_PRESET = "default"
PRESETS: dict[str, PlannerPreset] = {
    "default": PlannerPreset("default", "ExperimentPlanner", "nnUNetPlans", PLANS_IDENTIFIER, "PlainConvUNet",
                             560_000_000, 85_000_000, 8, 8.0, 0.05),
    "resenc-m": PlannerPreset("resenc-m", "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", "nnfast_ResEncM_plans",
                              "ResidualEncoderUNet", 680_000_000, 135_000_000, 8, 8.0, 1.0, _RES_ENC, _RES_DEC),
    "resenc-l": PlannerPreset("resenc-l", "nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", "nnfast_ResEncL_plans",
                              "ResidualEncoderUNet", 2_100_000_000, 380_000_000, 24, 24.0, 1.0, _RES_ENC, _RES_DEC),
    "resenc-xl": PlannerPreset("resenc-xl", "nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans",
                               "nnfast_ResEncXL_plans", "ResidualEncoderUNet", 3_600_000_000, 560_000_000, 40, 40.0,
                               1.0, _RES_ENC, _RES_DEC),
}


def get_preset(name: str) -> PlannerPreset:
    """The preset called ``name``.

    Raises
    ------
    UsageError
        No such preset (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"planner preset {name!r} does not exist; choose one of {', '.join(PRESETS)}") from None


def preset_for_planner(experiment_planner: str) -> PlannerPreset | None:
    """The preset whose plans record ``experiment_planner`` (``nnfast.nnUNetPlannerResEncM``, ``nnUNetPlannerResEncM``,
    ``nnfast.ExperimentPlanner``...), or None."""
    short = experiment_planner.split(".")[-1]
    for p in PRESETS.values():
        if p.nnunet_planner == short:
            return p
    return None


def nnunet_plans_name(plans_identifier: str) -> str:
    """nnU-Net's plans name for an nnfast plans identifier: a preset's own (``nnUNetResEncUNetMPlans``), else the
    identifier itself prefixed with ``nnUNetPlans_`` so that it never collides with nnfast's file of the same name."""
    for p in PRESETS.values():
        if p.plans_identifier == plans_identifier:
            return p.nnunet_plans_name
    return f"nnUNetPlans_{plans_identifier}"
