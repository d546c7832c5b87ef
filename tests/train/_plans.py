"""Plans for the training tests: nnfast's planner on small synthetic fingerprints (no data on disk)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nnfast.fingerprint.schema import Fingerprint, IntensityStats
from nnfast.io.dataset import DatasetInfo
from nnfast.plan.planner import plan_experiment
from nnfast.plan.schema import Plans

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def synthetic_plans(spacing: Sequence[float], shape: Sequence[int], n_cases: int = 4, n_channels: int = 1) -> Plans:
    """Plans for ``n_cases`` identical cases of ``shape`` voxels at ``spacing`` mm (reader axis order)."""
    stats = tuple(IntensityStats(mean=0.0, median=0.0, std=1.0, min=-1.0, max=1.0, percentile_99_5=1.0,
                                 percentile_00_5=-1.0) for _ in range(n_channels))
    fp = Fingerprint(
        case_ids=tuple(f"case_{i:03d}" for i in range(n_cases)),
        spacings=(tuple(float(s) for s in spacing),) * n_cases,
        shapes_after_crop=(tuple(int(s) for s in shape),) * n_cases,
        foreground_intensity_properties_per_channel=stats,
        median_relative_size_after_cropping=1.0,
    )
    ds = DatasetInfo(root=Path("/nonexistent"), name="Dataset999_TrainTest",
                     channel_names={str(c): "CT" for c in range(n_channels)}, labels=dict(LABELS),
                     num_training=n_cases, file_ending=".nii.gz")
    return plan_experiment(fp, ds)
