"""Helpers for the planner tests: synthetic fingerprints and a runner for nnU-Net v2's real ``ExperimentPlanner``.

nnU-Net's planner reads ``dataset.json`` and one image from ``nnUNet_raw/<ds>/`` (to pick the reader/writer) and
``dataset_fingerprint.json`` from ``nnUNet_preprocessed/<ds>/``. ``nnunetv2.paths`` resolves its folders from the
environment lazily (``_EnvPath``), so setting the variables before calling is enough.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from nnfast.fingerprint.schema import Fingerprint, IntensityStats
from nnfast.io.dataset import load_dataset

DATASET_NAME = "Dataset987_PlanParity"


def make_fingerprint(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], n_channels: int = 1,
                     median_relative_size_after_cropping: float = 1.0) -> Fingerprint:
    stats = tuple(
        IntensityStats(mean=100.0 + c, median=90.0, std=50.5, min=-1000.0, max=3000.0, percentile_99_5=2000.0,
                       percentile_00_5=-900.0)
        for c in range(n_channels)
    )
    return Fingerprint(
        case_ids=tuple(f"case_{i:03d}" for i in range(len(spacings))),
        spacings=tuple(tuple(float(v) for v in s) for s in spacings),
        shapes_after_crop=tuple(tuple(int(v) for v in s) for s in shapes),
        foreground_intensity_properties_per_channel=stats,
        median_relative_size_after_cropping=float(median_relative_size_after_cropping),
    )


def make_dataset_json(channel_names: Sequence[str], n_labels: int, num_training: int,
                      file_ending: str = ".nii.gz") -> dict[str, Any]:
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, n_labels)}}
    return {
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": labels,
        "numTraining": num_training,
        "file_ending": file_ending,
    }


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_raw_dataset(root: Path, dataset_json: dict[str, Any]) -> Path:
    """``root/<DATASET_NAME>`` with dataset.json and one tiny image per channel of one case (nnU-Net reads one)."""
    import SimpleITK as sitk

    ds = root / DATASET_NAME
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    (ds / "dataset.json").write_text(json.dumps(dataset_json))
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4), dtype=np.float32))
    for c in range(len(dataset_json["channel_names"])):
        sitk.WriteImage(img, str(ds / "imagesTr" / f"case_000_{c:04d}{dataset_json['file_ending']}"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), dtype=np.uint8)),
                    str(ds / "labelsTr" / f"case_000{dataset_json['file_ending']}"))
    return ds


@contextlib.contextmanager
def _networks_on_meta_device() -> Iterator[None]:
    """Build nnU-Net's VRAM-estimate networks on torch's ``meta`` device (no weight allocation).

    ``compute_conv_feature_map_size`` only reads the module structure, so the estimate -- and the plans -- are
    unchanged; planning just gets several times faster (the tests run nnU-Net's planner a dozen times).
    """
    import torch
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    original = ExperimentPlanner.__dict__["static_estimate_VRAM_usage"]

    def on_meta(*args, **kwargs):
        with torch.device("meta"):
            return original.__func__(*args, **kwargs)

    ExperimentPlanner.static_estimate_VRAM_usage = staticmethod(on_meta)
    try:
        yield
    finally:
        ExperimentPlanner.static_estimate_VRAM_usage = original


#: nnfast preset -> nnU-Net planner class (module, name)
NNUNET_PLANNERS = {
    "default": ("nnunetv2.experiment_planning.experiment_planners.default_experiment_planner", "ExperimentPlanner"),
    **{f"resenc-{s.lower()}": ("nnunetv2.experiment_planning.experiment_planners.residual_unets."
                               "residual_encoder_unet_planners", f"nnUNetPlannerResEnc{s}") for s in ("M", "L", "XL")},
}


def run_nnunet_planner(fingerprint: Fingerprint, dataset_json: dict[str, Any], workdir: Path | None = None,
                       gpu_memory_target_in_gb: float | None = None, overwrite_target_spacing=None,
                       meta_device: bool = True, preset: str = "default") -> dict[str, Any]:
    """Run nnunetv2's planner of ``preset`` (``ExperimentPlanner``, ``nnUNetPlannerResEncM/L/XL``) and return the plans
    file it saved (``nnUNetPlans.json``, ``nnUNetResEncUNetMPlans.json``, ...); ``gpu_memory_target_in_gb`` None
    keeps the planner's default.

    ``meta_device`` builds the estimate networks without allocating weights (same numbers, faster); pass False to
    time nnU-Net as users run it.
    """
    with contextlib.ExitStack() as stack:
        if meta_device:
            stack.enter_context(_networks_on_meta_device())
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnfast-plan-")))
        raw, pre, res = workdir / "raw", workdir / "preprocessed", workdir / "results"
        write_raw_dataset(raw, dataset_json)
        (pre / DATASET_NAME).mkdir(parents=True, exist_ok=True)
        res.mkdir(exist_ok=True)
        (pre / DATASET_NAME / "dataset_fingerprint.json").write_text(json.dumps(fingerprint.to_nnunet()))
        stack.enter_context(_environ(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res)))
        # the planner lists the raw images with a pool of 12 processes forked from this (torch-loaded) process;
        # threads list the same files (about 0.65 s less CPU per plan, several seconds of wall on a busy machine)
        import multiprocessing.pool
        from unittest import mock

        import nnunetv2.utilities.utils as nnunet_utils

        stack.enter_context(mock.patch.object(nnunet_utils, "Pool", multiprocessing.pool.ThreadPool))
        devnull = stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(devnull))
        import importlib
        import warnings

        module, name = NNUNET_PLANNERS[preset]
        planner_class = getattr(importlib.import_module(module), name)
        kwargs = {} if gpu_memory_target_in_gb is None else {"gpu_memory_target_in_gb": gpu_memory_target_in_gb}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ResEnc planners warn about a non-default memory target
            planner = planner_class(DATASET_NAME, overwrite_target_spacing=overwrite_target_spacing, **kwargs)
            planner.plan_experiment()
        return json.loads((pre / DATASET_NAME / f"{planner.plans_identifier}.json").read_text())


def dataset_info(workdir: Path, dataset_json: dict[str, Any]):
    """nnfast's DatasetInfo for the same raw dataset (written if missing)."""
    ds = workdir / "raw" / DATASET_NAME
    if not (ds / "dataset.json").is_file():
        write_raw_dataset(workdir / "raw", dataset_json)
    return load_dataset(ds)[0]
