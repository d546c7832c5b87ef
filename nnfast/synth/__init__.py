"""Synthetic datasets: deterministic Decathlon-style CT and multi-channel MRI tasks (see :mod:`.generator`)."""
from .generator import CT_LABELS, DEFAULT_SHAPE_RANGE, MRI_CHANNELS, MRI_LABELS, synthesize_msd

__all__ = ["synthesize_msd", "CT_LABELS", "MRI_LABELS", "MRI_CHANNELS", "DEFAULT_SHAPE_RANGE"]
