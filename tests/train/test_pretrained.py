"""Fine-tuning (``nnfast train --pretrained-weights``): weights from nnU-Net's own trainer (a ``.pth`` written by
``nnUNetTrainer.save_checkpoint``, driven from Python) and from an nnfast training load into nnfast's network the
way nnU-Net's ``load_pretrained_weights`` does; another input channel count skips the first convolution; another
architecture is a clear error naming the file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factories import make_brats_dataset
from nnfast.errors import PlanError, SettingsError, StoreError
from nnfast.settings import Settings
from nnfast.train.pretrained import load_pretrained_weights, read_network_weights

TASK = 44
DATASET = "Dataset044_FineTune"
REPO = Path(__file__).resolve().parents[2]

_NNUNET_CKPT = """
import json, sys, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
plans, dj, out = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
plans["continue_training"] = False  # what nnU-Net's run_training passes
tr = nnUNetTrainer(plans, "3d_fullres", 0, dj, device=torch.device("cpu"))
tr.initialize()
tr.save_checkpoint(out)
print("RESULT", json.dumps({"n": len(tr.network.state_dict()), "regions": tr.label_manager.has_regions}))
"""


@pytest.fixture(scope="module")
def ft(tmp_path_factory) -> Settings:
    from nnfast.preprocess.api import preprocess_dataset

    root = tmp_path_factory.mktemp("finetune")
    settings = Settings(raw=root / "raw", preprocessed=root / "pre", results=root / "res")
    make_brats_dataset(settings.raw, TASK, "FineTune", [(16, 20, 20)] * 3, seed=1)
    preprocess_dataset(TASK, settings, config="3d_fullres", workers=1, gpu_memory_gb=0.05)
    return settings


def _plans(settings):
    from nnfast.plan.api import load_current_plans

    return load_current_plans(TASK, settings)


def _net(settings, in_ch=2, config="3d_fullres", seed=123):
    from nnfast.network import build_network

    torch.manual_seed(seed)
    return build_network(_plans(settings), config, in_ch, 3)


def _copied_equal(net, weights) -> tuple[list[str], list[str]]:
    same, differ = [], []
    for k, v in net.state_dict().items():
        (same if k in weights and v.shape == weights[k].shape and torch.equal(v, weights[k]) else differ).append(k)
    return same, differ


@pytest.mark.compat
def test_nnunet_trainer_checkpoint_fine_tunes_an_nnfast_network(ft, tmp_path):
    from nnfast.plan.nnunet_compat import to_nnunet_plans

    dj = json.loads((ft.preprocessed / DATASET / "dataset.json").read_text())
    (tmp_path / "plans.json").write_text(json.dumps(to_nnunet_plans(_plans(ft), dj)))
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    pth = tmp_path / "checkpoint_final.pth"
    # initialize() only probes the file endings of its data folder to pick a dataset class (no case is read)
    probe = tmp_path / "nnunet_pre" / DATASET / "nnUNetPlans_3d_fullres"
    probe.mkdir(parents=True)
    (probe / "case_000.b2nd").touch()
    env = {**os.environ, "nnUNet_raw": str(ft.raw), "nnUNet_preprocessed": str(tmp_path / "nnunet_pre"),
           "nnUNet_results": str(tmp_path / "nnunet_results"), "nnUNet_compile": "f", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _NNUNET_CKPT, str(tmp_path / "plans.json"),
                        str(tmp_path / "dataset.json"), str(pth)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and pth.is_file(), r.stderr[-3000:]
    assert json.loads(r.stdout.split("RESULT ")[-1])["regions"]
    theirs = torch.load(pth, weights_only=False)["network_weights"]  # the reference reads it nnU-Net's way

    weights = read_network_weights(pth)  # weights_only=True, NumPy scalars allowlisted
    assert weights.keys() == theirs.keys()
    net = _net(ft)
    heads_before = {k: v.clone() for k, v in net.state_dict().items() if ".seg_layers." in k}
    plan = load_pretrained_weights(net, pth)
    same, differ = _copied_equal(net, theirs)
    assert differ and all(".seg_layers." in k for k in differ)  # only the heads keep their initialisation
    assert set(plan.copied) <= set(same) and {k for k, _ in plan.skipped} == set(heads_before)
    assert not set(plan.copied) & set(heads_before)  # (head biases start at 0 in both: equal without copying)
    for k, v in heads_before.items():
        assert torch.equal(net.state_dict()[k], v)
    # nnU-Net's own function agrees on the result
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as nnunet_load

    ref = _net(ft)
    nnunet_load(ref, str(pth))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k


def test_nnfast_checkpoint_other_channels_and_other_architecture(ft, tmp_path, caplog):
    import dataclasses
    import logging

    from nnfast.train.config import TrainConfig
    from nnfast.train.trainer import train

    settings = dataclasses.replace(ft, results=tmp_path / "res")
    cfg = TrainConfig(num_epochs=1, num_iterations_per_epoch=1, num_val_iterations_per_epoch=0,
                      patch_size=(8, 16, 16), batch_size=2)
    res = train(TASK, settings, "3d_fullres", "all", cfg, device="cpu", num_workers=0)
    ckpt = res.checkpoint
    pre = read_network_weights(ckpt)

    # fine-tuning run from it: the log names the file and what stayed initialised
    res2 = train(TASK, dataclasses.replace(ft, results=tmp_path / "res2"), "3d_fullres", "all", cfg, device="cpu",
                 num_workers=0, pretrained_weights=ckpt)
    log = (res2.output_folder / "training_log.txt").read_text()
    assert f"pretrained weights from {ckpt}" in log and "seg_layers" in log and "(segmentation head)" in log

    # another input channel count: the first convolution (and its decoder alias) stays initialised, the rest loads
    net = _net(ft, in_ch=1)
    with caplog.at_level(logging.INFO, logger="nnfast.train.pretrained"):
        plan = load_pretrained_weights(net, ckpt)
    first = {k for k, why in plan.skipped if why.startswith("first convolution")}
    assert first and all(k.endswith("stages.0.0.convs.0.conv.weight") or k.endswith("all_modules.0.weight")
                         for k in first)
    assert "2 input channels pretrained, 1 now" in caplog.text
    same, differ = _copied_equal(net, pre)
    assert first <= set(differ) <= {k for k, _ in plan.skipped}  # everything else was copied
    assert set(plan.copied) == set(same) - {k for k, _ in plan.skipped}

    # another architecture (the 2d configuration's network): a one-line error naming the file, before training
    with pytest.raises(PlanError, match=rf"pretrained weights `{ckpt}` do not fit this network"):
        load_pretrained_weights(_net(ft, config="2d"), ckpt)
    other = tmp_path / "net2d.pt"
    torch.save(_net(ft, config="2d").state_dict(), other)  # a bare state dict is accepted too
    with pytest.raises(PlanError, match=rf"pretrained weights `{other}` do not fit this network: `encoder"):
        train(TASK, dataclasses.replace(ft, results=tmp_path / "res3"), "3d_fullres", "all", cfg, device="cpu",
              num_workers=0, pretrained_weights=other)
    assert not (tmp_path / "res3").exists()  # nothing written
    with pytest.raises(SettingsError, match="cannot be combined with --resume"):
        train(TASK, settings, "3d_fullres", "all", cfg, device="cpu", num_workers=0, resume=True, pretrained_weights=ckpt)
    with pytest.raises(StoreError, match="do not exist"):
        read_network_weights(tmp_path / "nothing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(StoreError, match="cannot be read safely"):
        read_network_weights(tmp_path / "junk.pth")
