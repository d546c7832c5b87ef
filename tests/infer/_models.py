"""Helpers for the inference tests: tiny plans (small patches, 3-stage networks with few features), model folders
in the trainer's layout holding randomly initialised networks, and raw input images."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from nnfast.plan.planner import write_plans
from nnfast.plan.schema import Architecture, InheritedConfiguration

from train._plans import synthetic_plans

torch.set_num_threads(1)  # OpenMP barriers collapse on a loaded 2-core machine


def tiny_architecture(ndim: int, strides=None) -> Architecture:
    if ndim == 3:
        strides = strides or ((1, 1, 1), (1, 2, 2), (2, 2, 2))
        kernels = ((1, 3, 3), (3, 3, 3), (3, 3, 3))
    else:
        strides = strides or ((1, 1), (2, 2), (2, 2))
        kernels = ((3, 3), (3, 3), (3, 3))
    return Architecture(n_stages=3, features_per_stage=(4, 8, 8), kernel_sizes=kernels, strides=strides,
                        n_conv_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1))


def tiny_plans(spacing=(1.0, 1.0, 3.0), shape=(24, 24, 10), patch3d=(8, 16, 16), patch2d=(16, 16),
               cascade: bool = False, n_channels: int = 1):
    """nnfast's planner on a synthetic fingerprint (reader-order ``spacing``/``shape``), with tiny networks.

    With ``cascade`` a ``3d_lowres`` (same grid, tiny) and ``3d_cascade_fullres`` (inherits ``3d_fullres``) are added.
    """
    plans = synthetic_plans(spacing, shape, n_channels=n_channels)
    configs = dict(plans.configurations)
    full = dataclasses.replace(plans.configuration("3d_fullres"), patch_size=tuple(patch3d),
                               architecture=tiny_architecture(3))
    configs["3d_fullres"] = full
    if "2d" in configs:
        configs["2d"] = dataclasses.replace(plans.configuration("2d"), patch_size=tuple(patch2d),
                                            architecture=tiny_architecture(2))
    if cascade:
        configs["3d_lowres"] = dataclasses.replace(full, name="3d_lowres", data_identifier="nnfast_3d_lowres",
                                                   next_stage="3d_cascade_fullres")
        configs["3d_cascade_fullres"] = InheritedConfiguration("3d_cascade_fullres", "3d_fullres",
                                                               previous_stage="3d_lowres")
    return dataclasses.replace(plans, configurations=configs)


def dataset_json(plans, file_ending=".nii.gz") -> dict:
    return {"channel_names": dict(plans.channel_names), "labels": dict(plans.labels),
            "numTraining": 4, "file_ending": file_ending}


def make_model_folder(root: Path, plans, config: str, folds=(0,), seed: int = 0, n_in: int | None = None) -> Path:
    """A trainer folder ``root/nnfastTrainer__nnfast_plans__<config>`` with random-init checkpoints (trainer format)."""
    from nnfast.network import build_network

    folder = Path(root) / f"nnfastTrainer__nnfast_plans__{config}"
    folder.mkdir(parents=True, exist_ok=True)
    write_plans(plans, folder / "nnfast_plans.json")
    (folder / "dataset.json").write_text(json.dumps(dataset_json(plans)))
    conf = plans.configuration(config)
    n_classes = len([k for k in plans.labels if k != "ignore"])
    in_ch = n_in or plans.num_input_channels
    for k, f in enumerate(folds):
        torch.manual_seed(seed + k)
        net = build_network(plans, config, in_ch, n_classes, deep_supervision=True)
        with torch.no_grad():  # make the random network's output depend visibly on the input
            net.decoder.seg_layers[-1].bias.copy_(torch.linspace(-0.5, 0.5, n_classes))
        d = folder / f"fold_{f}"
        d.mkdir(exist_ok=True)
        meta = {"format": "nnfast-checkpoint", "schema_version": 1, "configuration": config, "fold": f,
                "inference_allowed_mirroring_axes": list(range(conf.ndim)), "num_input_channels": in_ch,
                "num_classes": n_classes, "patch_size": list(conf.patch_size)}
        torch.save({**meta, "network_weights": net.state_dict()}, d / "checkpoint_final.pt")
        (d / "checkpoint_final.json").write_text(json.dumps(meta))
    return folder


def body_image(shape_zyx, rng, body=(slice(2, -2), slice(3, -1), slice(1, -3))) -> np.ndarray:
    """A float32 image that is zero outside a box (so that preprocessing crops) with a bright blob inside."""
    img = np.zeros(shape_zyx, np.float32)
    inner = rng.normal(0.0, 0.3, shape_zyx).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape_zyx], indexing="ij")
    inner += 2.0 * ((zz ** 2 + yy ** 2 + xx ** 2) < 0.4)
    img[body] = inner[body] + 0.1
    return img


