"""nnU-Net's own trainer on a region dataset (``label_manager.has_regions``) with nnfast's loader: its
``DC_and_BCE_loss`` and region ``validation_step`` run on the batches nnfast builds, and the targets equal
batchgeneratorsv2's region conversion of the same label maps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from factories import make_brats_dataset
from nnfast.settings import Settings

nnunetv2 = pytest.importorskip("nnunetv2")

TASK = 45
DATASET = "Dataset045_AdapterRegions"
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, numpy as np, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnfast.data.nnunet_adapter import use_nnfast_loader
plans, dj, stores = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
plans["continue_training"] = False
tr = nnUNetTrainer(plans, "3d_fullres", 0, dj, device=torch.device("cpu"))
tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch = 2, 1
tr.initialize()
use_nnfast_loader(tr, num_workers=0, base_seed=1, folder=stores)
dl_tr, dl_val = tr.get_dataloaders()
b = next(dl_tr)
out = {"loss_class": type(tr.loss.loss).__name__, "target": [list(t.shape) for t in b["target"]],
       "values": sorted(set(torch.unique(b["target"][0]).tolist()))}
out["loss"] = float(tr.train_step(b)["loss"])
v = tr.validation_step(next(dl_val))
out["tp_hard"] = np.asarray(v["tp_hard"]).tolist()
# the same batch's label maps, converted by nnU-Net's transform, are the targets
from nnfast.data.batch import BatchBuilder, BatchSpec
from dataclasses import replace
spec = dl_tr.spec
plain = BatchBuilder(dl_tr.source, replace(spec, labels=None)).build(dl_tr.base_seed, 0)[0]
conv = ConvertSegmentationToRegionsTransform(regions=list(tr.label_manager.foreground_regions))
mine = BatchBuilder(dl_tr.source, spec).build(dl_tr.base_seed, 0)[0]
out["equal"] = all(
    bool((conv(segmentation=torch.from_numpy(plain.targets[k][j].astype(np.int16)))["segmentation"].numpy()
          == mine.targets[k][j].astype(bool)).all())
    for k in range(len(mine.targets)) for j in range(mine.targets[k].shape[0]))
dl_tr.close(); dl_val.close()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.compat
def test_nnunet_trainer_trains_regions_on_nnfast_loader(tmp_path):
    from nnfast.layout import case_store_folder
    from nnfast.plan.api import load_current_plans
    from nnfast.plan.nnunet_compat import to_nnunet_plans
    from nnfast.preprocess.api import preprocess_dataset

    s = Settings(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    make_brats_dataset(s.raw, TASK, "AdapterRegions", [(16, 20, 20)] * 3, seed=2)
    preprocess_dataset(TASK, s, config="3d_fullres", workers=1, gpu_memory_gb=0.05)
    dj = json.loads((s.preprocessed / DATASET / "dataset.json").read_text())
    plans = to_nnunet_plans(load_current_plans(TASK, s), dj)
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    # nnU-Net's folder: its split and the file ending its initialize() probes; the cases come from nnfast's stores
    nn_pre = tmp_path / "nnunet_pre" / DATASET
    (nn_pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (nn_pre / "nnUNetPlans_3d_fullres" / "case_000.b2nd").touch()
    (nn_pre / "splits_final.json").write_text(json.dumps([{"train": ["case_000", "case_001"], "val": ["case_002"]}]))
    stores = case_store_folder(s.preprocessed / DATASET,
                               load_current_plans(TASK, s).configuration("3d_fullres").data_identifier)
    env = {**os.environ, "nnUNet_raw": str(s.raw), "nnUNet_preprocessed": str(tmp_path / "nnunet_pre"),
           "nnUNet_results": str(tmp_path / "nnunet_res"), "nnUNet_compile": "f", "OMP_NUM_THREADS": "1",
           "nnUNet_n_proc_DA": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "plans.json"), str(tmp_path / "dataset.json"),
                        str(stores)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["loss_class"] == "DC_and_BCE_loss"
    assert all(t[1] == 3 for t in out["target"])  # three region channels at every scale
    assert out["values"] == [0, 1] and out["equal"] is True
    assert out["loss"] == out["loss"] and len(out["tp_hard"]) == 3  # finite loss, one count per region
