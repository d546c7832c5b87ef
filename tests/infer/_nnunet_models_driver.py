"""Run nnU-Net v2 itself on a raw dataset, in one fresh interpreter (nnU-Net reads its folders at import time):
plan + preprocess, train tiny models with its real ``nnUNetTrainer`` (a subclass: 1 epoch x 2 iterations, CPU) and
predict images with its ``nnUNetPredictor`` twice: as shipped (float16 sliding-window accumulators) and with float32
accumulators (nnfast's choice; the network runs in float32 on the CPU either way). Test helper for ``test_nnunet_models.py``::

    python _nnunet_models_driver.py SPEC.json

SPEC: ``{"dataset_id", "configurations": [...], "splits", "models": [{"config", "folds", "resenc": bool,
"regions": {"labels", "regions_class_order"} or absent, "tta": bool, "base_features": first-stage features of the
network (optional, nnU-Net's 32 when absent)}], "predict_input", "predict_output"}``; nnUNet_raw/_preprocessed/_results come from the environment.
Prints ``RESULT {json}`` with the trained folders and timings.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import torch


t0 = time.time()
torch.set_num_threads(1)
from nnunetv2.experiment_planning.plan_and_preprocess_api import (  # noqa: E402
    extract_fingerprints,
    plan_experiments,
    preprocess,
)
from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe  # noqa: E402
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402

_init = fe.DatasetFingerprintExtractor.__init__


def _small_budget(self, *a, **k):  # nnU-Net samples 1e8 foreground voxels; tiny cases need far fewer
    _init(self, *a, **k)
    self.num_foreground_voxels_for_intensitystats = 4e6


fe.DatasetFingerprintExtractor.__init__ = _small_budget


class _Float32Accumulation:
    """``torch`` for nnU-Net's predictor module with ``torch.half`` meaning float32 (its only use there is the dtype
    of the sliding-window accumulators)."""

    def __getattr__(self, name):
        return torch.float32 if name == "half" else getattr(torch, name)


class nnUNetTrainerTiny(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cpu")):  # nnU-Net records the named arguments
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1



class nnUNetTrainerTinyRegions(nnUNetTrainerTiny):
    pass


def narrow_plans(p: dict, base: int) -> dict:
    """nnU-Net's plans with ``base`` features in the first stage (doubling per stage up to the plans' maximum)
    instead of its 32 (a copy): the same network class and topology, ~16x less arithmetic for base 8, so that
    training and predicting with TTA fit the test suite. The trainer writes them to its model folder's plans.json,
    where nnU-Net's predictor and nnfast read them."""
    p = json.loads(json.dumps(p))
    for c in p["configurations"].values():
        if "architecture" in c:
            kw = c["architecture"]["arch_kwargs"]
            top = max(kw["features_per_stage"])
            kw["features_per_stage"] = [min(base * 2 ** i, top) for i in range(kw["n_stages"])]
    return p


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    did = int(spec["dataset_id"])
    out = {"timings": {}}
    if not spec.get("reuse_preprocessed"):
        extract_fingerprints([did], num_processes=1, check_dataset_integrity=False, show_progress_bar=False)
        plan_experiments([did])
        configs = spec["configurations"]
        preprocess([did], configurations=configs, num_processes=[1] * len(configs), show_progress_bar=False)
    out["timings"]["plan_preprocess"] = time.time() - t0
    os.environ["nnUNet_n_proc_DA"] = "0"  # the trainer's loaders in this process (the planner needs it >= 1)
    ds_name = next(d for d in os.listdir(nnUNet_preprocessed) if d.startswith(f"Dataset{did:03d}_"))
    pre = os.path.join(nnUNet_preprocessed, ds_name)
    plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    dj = json.load(open(os.path.join(pre, "dataset.json")))
    if spec.get("splits"):
        json.dump(spec["splits"], open(os.path.join(pre, "splits_final.json"), "w"))


    def resenc_plans(p: dict) -> dict:
        """nnU-Net's plans with every configuration's network switched to ResidualEncoderUNet (the arch_kwargs that
        nnU-Net's ResEnc planners write: n_blocks_per_stage instead of n_conv_per_stage, one decoder conv per stage)."""
        p = json.loads(json.dumps(p))
        p["plans_name"] = "nnUNetResEncPlansTiny"
        for c in p["configurations"].values():
            if "architecture" not in c:
                continue
            a = c["architecture"]
            a["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
            kw = a["arch_kwargs"]
            n = kw["n_stages"]
            kw.pop("n_conv_per_stage")
            kw["n_blocks_per_stage"] = [1, 3, 4, 6, 6, 6, 6][:n]
            kw["n_conv_per_stage_decoder"] = [1] * (n - 1)
        return p


    # nnU-Net's predictor looks the trainer class up by name among all its trainers, importing each (one of them
    # imports timm -> torchvision, which fails against the CPU torch build here): hand it ours
    import nnunetv2.inference.predict_from_raw_data as pfr

    pfr.recursive_find_trainer_class_by_name = lambda *a, **k: nnUNetTrainerTiny
    out["models"] = []
    for m in spec["models"]:
        t = time.time()
        p = narrow_plans(plans, int(m["base_features"])) if m.get("base_features") else plans
        p = resenc_plans(p) if m.get("resenc") else p
        if m.get("resenc"):
            json.dump(p, open(os.path.join(pre, p["plans_name"] + ".json"), "w"), indent=2)
        # a region-based model: the same preprocessed data, dataset.json with regions (its own trainer name, so that
        # its folder does not collide with the label-based model's)
        cls, mdj = (nnUNetTrainerTinyRegions, {**dj, **m["regions"]}) if m.get("regions") else (nnUNetTrainerTiny, dj)
        folder = os.path.join(nnUNet_results, ds_name, f"{cls.__name__}__{p['plans_name']}__{m['config']}")
        trained_before = True
        for fold in m["folds"]:
            if os.path.isfile(os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth")):
                continue  # trained by an earlier run
            trained_before = False
            torch.manual_seed(fold)  # repeatable tiny models (nnUNet_n_proc_DA=0: augmentation in this process)
            np.random.seed(fold)
            random.seed(fold)
            tr = cls({**p, "continue_training": False}, m["config"], fold, mdj, device=torch.device("cpu"))
            tr.run_training()
        preds = {}
        for accumulate in ("float16", "float32"):
            # nnU-Net sums the tiles' logits in float16 (predicted_logits = torch.zeros(..., dtype=torch.half));
            # "float32" swaps that one dtype for float32 (nnfast sums in float32)
            pfr.torch = torch if accumulate == "float16" else _Float32Accumulation()
            pred_out = os.path.join(spec["predict_output"], os.path.basename(folder) + "__" + accumulate)
            preds[accumulate] = pred_out
            if trained_before and os.path.isdir(pred_out) and len(os.listdir(pred_out)) > 3:
                continue  # a kept folder (NNFAST_TEST_NNUNET_MODELS): same model, same predictions
            os.makedirs(pred_out, exist_ok=True)
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=m.get("tta", True),
                                        perform_everything_on_device=False, device=torch.device("cpu"),
                                        allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(folder, tuple(m["folds"]),
                                                           m.get("checkpoint", "checkpoint_final.pth"))
            predictor.predict_from_files_sequential(spec["predict_input"], pred_out, save_probabilities=False,
                                                    overwrite=True)
        pfr.torch = torch
        out["models"].append({"folder": folder, "predictions": preds, "seconds": time.time() - t})
    out["timings"]["total"] = time.time() - t0
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
