"""Train one arm x seed in this (fresh) interpreter; the harness (``run.py``) starts one process per run.

``python -m benchmarks.quality.arm_worker SPEC.json``: SPEC names the arm, dataset, folders, seed and budget; the
result (training wall time, loader wait, epochs, final training loss) is written to ``SPEC["result"]``.

Arms:

* ``A``: nnU-Net v2's ``nnUNetTrainer`` with its own loader (batchgeneratorsv2 transforms,
  ``NonDetMultiThreadedAugmenter`` with ``nnUNet_n_proc_DA`` workers).
* ``B``: the same trainer class with nnfast's loader (``nnUNetTrainerNnfastLoader``, ``NNFAST_LOADER_WORKERS``
  workers, ``NNFAST_LOADER_SEED``).
* ``C``: ``nnfast train`` (:func:`nnfast.train.trainer.train`), nnfast's network, loss, optimiser and loader.

nnU-Net's trainers run in-process: its command-line trainer lookup imports every trainer module, some of which need
timm -> torchvision, which does not import against the CPU torch build used here. nnU-Net reads its data folders
from the environment at import time, which is why every run is its own process (the harness sets ``nnUNet_raw`` etc.).
Each arm trains ``epochs x iterations`` batches; nnU-Net's final validation (``perform_actual_validation``) and
nnfast's are not run: every arm is scored on the held-out cases by the harness instead.

Loader wait: the time the training loop spends waiting for the next batch (A/B: between the end of a
``train_step`` and the start of the next one, the epoch's first batch measured from ``on_train_epoch_start``;
C: nnfast's own per-epoch ``train_wait_s``).

Ablation (``SPEC["ablate"]``, names in :data:`ABLATIONS`): the named augmentations are switched off in every arm:
nnU-Net's transform objects get probability 0 (A), nnfast's :class:`~nnfast.data.augment_params.AugmentConfig`
fields are set to 0 (B, C).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

#: ablation name -> (AugmentConfig probability fields set to 0, nnU-Net (transform class, attribute) set to 0/empty)
ABLATIONS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "rotation": (("p_rotation",), (("SpatialTransform", "p_rotation"),)),
    "scaling": (("p_scaling",), (("SpatialTransform", "p_scaling"),)),
    "noise": (("p_noise",), (("GaussianNoiseTransform", "random"),)),
    "blur": (("p_blur",), (("GaussianBlurTransform", "random"),)),
    "brightness": (("p_brightness",), (("MultiplicativeBrightnessTransform", "random"),)),
    "contrast": (("p_contrast",), (("ContrastTransform", "random"),)),
    "lowres": (("p_lowres",), (("SimulateLowResolutionTransform", "random"),)),
    "gamma": (("p_gamma", "p_gamma_inverted"), (("GammaTransform", "random"),)),
    "mirror": (("p_mirror",), (("MirrorTransform", "allowed_axes"),)),
}


def _patch_nnfast_augmentation(ablate: list[str]) -> None:
    """Set the ablated AugmentConfig probabilities to 0 for every config built in this process (the loader's
    worker processes receive the config pickled, values included)."""
    if not ablate:
        return
    from nnfast.data import augment_params

    fields = [f for name in ablate for f in ABLATIONS[name][0]]
    original = augment_params.AugmentConfig.__post_init__

    def post_init(self):
        original(self)
        for f in fields:
            object.__setattr__(self, f, 0.0)

    augment_params.AugmentConfig.__post_init__ = post_init


def _ablate_nnunet_transforms(transforms, ablate: list[str]):
    """Switch the ablated transforms of nnU-Net's ``get_training_transforms`` result off; returns the count changed."""
    targets = [t for name in ablate for t in ABLATIONS[name][1]]
    changed = 0

    def walk(t):
        nonlocal changed
        inner = getattr(t, "transform", None)
        for cls_name, attr in targets:
            if attr == "random" and inner is not None and type(inner).__name__ == cls_name:
                t.apply_probability = 0.0
                changed += 1
            elif type(t).__name__ == cls_name and attr != "random":
                setattr(t, attr, () if attr == "allowed_axes" else 0.0)
                changed += 1
        for child in getattr(t, "transforms", []) or []:
            walk(child)
        if inner is not None:
            walk(inner)

    walk(transforms)
    return changed


def _nnunet_arm(spec: dict) -> dict:
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnfast.data.nnunet_adapter import nnUNetTrainerNnfastLoader

    seed, ablate = int(spec["seed"]), list(spec.get("ablate") or [])
    base = nnUNetTrainer if spec["arm"] == "A" else nnUNetTrainerNnfastLoader

    class Timed(base):  # type: ignore[misc, valid-type]
        """The arm's trainer, unchanged but for the loader-wait clock (and, when ablating, A's transforms)."""

        wait_s = 0.0
        _t_ready: float | None = None

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            self._t_ready = time.perf_counter()

        def train_step(self, batch):
            if self._t_ready is not None:
                self.wait_s += time.perf_counter() - self._t_ready
            out = super().train_step(batch)
            self._t_ready = time.perf_counter()
            return out

        if spec["arm"] == "A" and ablate:
            @staticmethod
            def get_training_transforms(*args, **kwargs):
                t = nnUNetTrainer.get_training_transforms(*args, **kwargs)
                if _ablate_nnunet_transforms(t, ablate) < len(ablate):
                    raise RuntimeError(f"ablation {ablate}: not every transform was found in nnU-Net's pipeline")
                return t

    Timed.__name__ = base.__name__  # the results folder keeps the arm's trainer name
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    pre = Path(spec["preprocessed"]) / spec["dataset"]
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnUNetv2_train's run_training passes (no --c)
    dj = load_json(str(pre / "dataset.json"))
    tr = Timed(plans, "3d_fullres", 0, dj, device=torch.device(spec["device"]))
    tr.num_epochs = int(spec["epochs"])
    tr.num_iterations_per_epoch = int(spec["iterations"])
    tr.num_val_iterations_per_epoch = int(spec["val_iterations"])
    tr.save_every = 10 ** 6  # only checkpoint_final (and nnU-Net's checkpoint_best)
    t0 = time.perf_counter()
    tr.run_training()
    wall = time.perf_counter() - t0
    log = tr.logger.local_logger.my_fantastic_logging
    return {"wall_s": wall, "loader_wait_s": float(tr.wait_s), "epochs": int(tr.current_epoch),
            "final_train_loss": float(log["train_losses"][-1]),
            "model_folder": str(tr.output_folder_base)}


def _nnfast_arm(spec: dict) -> dict:
    from nnfast.plan.planner import load_plans
    from nnfast.settings import Settings
    from nnfast.train.config import TrainConfig
    from nnfast.train.trainer import train

    settings = Settings(raw=Path(spec["raw"]), preprocessed=Path(spec["preprocessed"]), results=Path(spec["results"]))
    plans = load_plans(Path(spec["preprocessed"]) / spec["dataset"] / "nnfast_plans.json")
    cfg = TrainConfig.from_plan(plans, "3d_fullres", num_epochs=int(spec["epochs"]),
                                num_iterations_per_epoch=int(spec["iterations"]),
                                num_val_iterations_per_epoch=int(spec["val_iterations"]),
                                save_every=int(spec["epochs"]), seed=int(spec["seed"]))
    t0 = time.perf_counter()
    res = train(spec["dataset"], settings, "3d_fullres", 0, cfg, device=spec["device"],
                num_workers=int(spec["workers"]), final_validation=None)
    wall = time.perf_counter() - t0
    hist = res.history.data
    return {"wall_s": wall, "loader_wait_s": float(sum(hist["train_wait_s"])), "epochs": int(res.epochs_completed),
            "final_train_loss": float(hist["train_losses"][-1]), "model_folder": str(res.output_folder.parent)}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    _patch_nnfast_augmentation(list(spec.get("ablate") or []))
    result = _nnunet_arm(spec) if spec["arm"] in ("A", "B") else _nnfast_arm(spec)
    result.update(arm=spec["arm"], seed=spec["seed"], dataset=spec["name"], pid=os.getpid())
    tmp = Path(spec["result"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, spec["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
