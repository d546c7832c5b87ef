"""Run nnU-Net v2 itself on a raw dataset, in one fresh interpreter (nnU-Net reads its folders at import time):
plan + preprocess, train tiny models with its real ``nnUNetTrainer`` (a subclass: 1 epoch x 2 iterations, CPU) and
predict images with its ``nnUNetPredictor`` twice: as shipped (float16 sliding-window accumulators) and with float32
accumulators (nnfast's choice; the network runs in float32 on the CPU either way). Test helper for ``test_nnunet_models.py``::

    python _nnunet_models_driver.py SPEC.json

SPEC: ``{"dataset_id", "configurations": [...] (preprocessed when their folder is missing), "lowres": factor (adds
nnU-Net's 3d_lowres + 3d_cascade_fullres pair to its plans, see :func:`add_cascade`), "splits", "models": [{"config",
"folds" (ints or "all"), "resenc": bool, "regions": {"labels", "regions_class_order"} or absent, "tta": bool,
"previous_stage": config of an earlier model whose predictions feed this one, "base_features": first-stage features
of the network (optional, nnU-Net's 32 when absent)}], "predict_input", "predict_output"}``;
nnUNet_raw/_preprocessed/_results come from the environment.
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

import multiprocessing  # noqa: E402
import multiprocessing.pool  # noqa: E402
import types  # noqa: E402

import nnunetv2.evaluation.evaluate_predictions as _evaluate  # noqa: E402
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as _trainer_module  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for nnunet_ref
from nnunet_ref import nnunet_pools_as_threads  # noqa: E402

# the trainer's final validation (export and the cascade's next-stage inputs) and its metrics run in pools of
# `spawn`ed interpreters, each importing torch and nnU-Net (~10 s per interpreter here): threads in this process run
# the same functions
_threads = types.ModuleType("multiprocessing_as_threads")
_threads.__getattr__ = lambda name: getattr(multiprocessing, name)  # type: ignore[method-assign]
_threads.get_context = lambda *a, **k: types.SimpleNamespace(Pool=multiprocessing.pool.ThreadPool)  # type: ignore
_trainer_module.multiprocessing = _threads
_evaluate.multiprocessing = _threads
# the same for the fingerprint extractor's and the preprocessor's pools (one spawned interpreter per configuration,
# polled every 0.1 s), and for the pool of 12 forked processes that nnU-Net starts to list an image folder's files
# (twice per prediction: forking this process, torch loaded, cost more than the predictions of the small models on a
# busy machine)
nnunet_pools_as_threads()

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
        # no progress.png: nnU-Net draws a 30x54-inch figure after every epoch (about a third of a tiny model's
        # training time here); nothing in the tests reads it, and the weights and checkpoints are the same without
        self.logger.plot_progress_png = lambda output_folder: None



class nnUNetTrainerTinyRegions(nnUNetTrainerTiny):
    pass


def add_cascade(plans: dict, factor: float) -> dict:
    """nnU-Net's plans with the ``3d_lowres`` + ``3d_cascade_fullres`` pair its planner writes when the full-resolution
    patch covers too little of the median case (never for cases this tiny): ``3d_fullres`` at ``factor`` times its
    spacing (its median shape shrunk accordingly, same network and patch), and the cascade's second stage inheriting
    ``3d_fullres`` (``previous_stage``/``next_stage`` link the two)."""
    p = json.loads(json.dumps(plans))
    full = p["configurations"]["3d_fullres"]
    low = json.loads(json.dumps(full))
    low["data_identifier"] = "nnUNetPlans_3d_lowres"
    low["spacing"] = [s * factor for s in full["spacing"]]
    low["median_image_size_in_voxels"] = [max(1, round(n / factor)) for n in full["median_image_size_in_voxels"]]
    low["next_stage"] = "3d_cascade_fullres"
    p["configurations"]["3d_lowres"] = low
    p["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    return p


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
    ds_name = next(d for d in os.listdir(nnUNet_preprocessed) if d.startswith(f"Dataset{did:03d}_"))
    pre = os.path.join(nnUNet_preprocessed, ds_name)
    plans_file = os.path.join(pre, "nnUNetPlans.json")
    plans = json.load(open(plans_file))
    if spec.get("lowres") and "3d_lowres" not in plans["configurations"]:
        plans = add_cascade(plans, float(spec["lowres"]))
        json.dump(plans, open(plans_file, "w"), indent=2)
    # the configurations whose preprocessed folder is missing (a kept folder may lack those added since)
    configs = [c for c in spec["configurations"]
               if not os.path.isdir(os.path.join(pre, plans["configurations"][c].get("data_identifier", "")))]
    if configs:
        preprocess([did], configurations=configs, num_processes=[1] * len(configs), show_progress_bar=False)
    out["timings"]["plan_preprocess"] = time.time() - t0
    os.environ["nnUNet_n_proc_DA"] = "0"  # the trainer's loaders in this process (the planner needs it >= 1)
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
    preds_of: dict = {}  # configuration -> {accumulator dtype: prediction folder}
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
        # a cascade's first stage: nnUNetv2_train's final validation writes the second stage's inputs
        next_stage = p["configurations"][m["config"]].get("next_stage")
        for fold in m["folds"]:
            if os.path.isfile(os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth")) and (
                    not next_stage or os.path.isdir(os.path.join(folder, "predicted_next_stage", next_stage))):
                continue  # trained by an earlier run
            trained_before = False
            seed = fold if isinstance(fold, int) else 7  # fold "all": train and validate on every case
            torch.manual_seed(seed)  # repeatable tiny models (nnUNet_n_proc_DA=0: augmentation in this process)
            np.random.seed(seed)
            random.seed(seed)
            tr = cls({**p, "continue_training": False}, m["config"], fold, mdj, device=torch.device("cpu"))
            tr.run_training()
            if next_stage:  # what nnUNetv2_train does after training (run_training.py)
                # without mirroring (8x fewer forward passes); the checkpoint was written with the trainer's axes
                tr.inference_allowed_mirroring_axes = None
                tr.perform_actual_validation(False)
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
            # the cascade's second stage reads the first stage's predictions made with the same accumulator dtype
            prev = preds_of[m["previous_stage"]][accumulate] if m.get("previous_stage") else None
            predictor.predict_from_files_sequential(spec["predict_input"], pred_out, save_probabilities=False,
                                                    overwrite=True, folder_with_segs_from_prev_stage=prev)
        pfr.torch = torch
        preds_of[m["config"]] = preds
        out["models"].append({"folder": folder, "predictions": preds, "seconds": time.time() - t})
    out["timings"]["total"] = time.time() - t0
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
