"""Region-based training end to end on CPU: a BraTS-like two-channel dataset with nested regions (whole tumour ⊃
core ⊃ enhancing, nnU-Net's region dataset.json) is verified, planned, preprocessed, trained and validated.

Tiny on purpose (5 cases of 20x24x24 voxels, an 8x16x16 patch, 4 epochs of 6 batches): the assertions are that
every path accepts regions (sigmoid heads, region targets, per-region pseudo-Dice, checkpoints, the final
validation painting in ``regions_class_order``) and that the network learns something (Dice per region above what
predicting the whole head gives; bars set from measured runs with a wide margin, see the test).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factories import BRATS_REGION_LABELS, make_brats_dataset
from nnfast.settings import Settings

TASK = 43
DATASET = "Dataset043_BraTSRegions"


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Settings:
    from nnfast.preprocess.api import preprocess_dataset

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("brats")
    settings = Settings(raw=root / "raw", preprocessed=root / "pre", results=root / "res")
    make_brats_dataset(settings.raw, TASK, "BraTSRegions", [(20, 24, 24)] * 5, seed=3)
    preprocess_dataset(TASK, settings, config="3d_fullres", workers=1, gpu_memory_gb=0.05)
    yield settings
    torch.set_num_threads(n)


def _chance_dice(settings: Settings) -> dict[str, float]:
    """Dice of predicting every non-zero (head) voxel as each region: what a network that learned nothing about the
    tumour scores at best without looking."""
    import SimpleITK as sitk

    out = {}
    raw = settings.raw / DATASET
    segs = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted((raw / "labelsTr").glob("*.nii.gz"))]
    heads = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) != 0 for p in sorted((raw / "imagesTr").glob("*_0000*"))]
    for name, members in BRATS_REGION_LABELS.items():
        if name == "background":
            continue
        m = members if isinstance(members, list) else [members]
        d = [2 * np.isin(s, m).sum() / (np.isin(s, m).sum() + h.sum()) for s, h in zip(segs, heads)]
        out[str(tuple(m))] = float(np.mean(d))
    return out


def test_region_dataset_trains_and_validates(brats):
    from nnfast.infer.validation import validate_fold
    from nnfast.train.config import TrainConfig
    from nnfast.train.trainer import train

    cfg = TrainConfig(num_epochs=4, num_iterations_per_epoch=6, num_val_iterations_per_epoch=3,
                      patch_size=(8, 16, 16), batch_size=2)
    res = train(TASK, brats, "3d_fullres", 0, cfg, device="cpu", num_workers=0, final_validation=validate_fold)
    assert res.finished and res.validation_skipped is None
    h = res.history.data
    assert all(len(d) == 3 for d in h["dice_per_class"])  # one pseudo-Dice per region, no background
    assert np.mean(h["train_losses"][-2:]) < h["train_losses"][0], h["train_losses"]
    final = torch.load(res.checkpoint, weights_only=True)
    assert final["num_classes"] == 3  # three sigmoid heads
    heads = [k for k in final["network_weights"] if "seg_layers" in k and k.endswith("weight")]
    assert all(final["network_weights"][k].shape[0] == 3 for k in heads)

    summary = json.loads((res.output_folder / "validation" / "summary.json").read_text())
    dice = {k: v["Dice"] for k, v in summary["mean"].items()}
    assert set(dice) == {"(1, 2, 3)", "(2, 3)", "(3,)"}
    chance = _chance_dice(brats)
    # measured (seed 3, CPU, 4 epochs): 0.56 whole, 0.64 core, 0.63 enhancing; chance 0.30, 0.09, 0.07. The bar,
    # chance + 0.15, leaves a margin of >= 0.1 on the weakest region (whole) and fails a network that learned nothing
    for k, v in dice.items():
        assert np.isfinite(v) and v > chance[k] + 0.15, (dice, chance)
    # the exported segmentations hold the painted labels of regions_class_order only
    import SimpleITK as sitk

    preds = sorted((res.output_folder / "validation").glob("*.nii.gz"))
    assert preds
    values = set(np.unique(np.concatenate([sitk.GetArrayFromImage(sitk.ReadImage(str(p))).ravel() for p in preds])))
    assert values <= {0, 1, 2, 3} and 1 in values
