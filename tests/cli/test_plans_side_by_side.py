"""Two plans of one dataset side by side, end to end on the CPU: ``--plans`` flows through preprocess, train, predict
and find-best (which ranks the models of both plans together), and a custom configuration (``inherits_from`` with a
batch-size override, as in nnU-Net's plans files) trains under its own name. ResEnc plans train, resume and predict.
"""
from __future__ import annotations

import json

import pytest

from factories import make_raw_dataset
from nnfast.cli.main import main
from nnfast.settings import Settings

TASK = 46
NAME = "Dataset046_SideBySide"
TRAIN = ["--fold", "0", "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--device", "cpu",
         "--workers", "0", "--seed", "0", "-q"]


@pytest.fixture()
def roots(tmp_path, monkeypatch) -> tuple[Settings, list[str]]:
    for var in ("NNFAST_RAW", "NNFAST_PREPROCESSED", "NNFAST_RESULTS", "nnUNet_raw", "nnUNet_preprocessed",
                "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    make_raw_dataset(s.raw, TASK, "SideBySide", [(8, 16, 16)] * 5, [(1.0, 1.0, 1.0)] * 5, seed=0)
    return s, ["--raw", str(s.raw), "--preprocessed", str(s.preprocessed), "--results", str(s.results)]


def test_two_plans_train_predict_and_rank_together(roots, tmp_path, capsys):
    s, r = roots
    t = str(TASK)
    assert main(["plan", "--task", t, "--gpu-memory-gb", "0.05", "-q", *r]) == 0
    assert main(["plan", "--task", t, "--gpu-memory-gb", "0.02", "--plans", "tiny_plans", "-q", *r]) == 0
    # a custom configuration in the user's plans file
    f = s.preprocessed / NAME / "tiny_plans.json"
    d = json.loads(f.read_text())
    d["configurations"]["3d_fullres_bs3"] = {"inherits_from": "3d_fullres", "batch_size": 3}
    f.write_text(json.dumps(d))
    for plans in ("nnfast_plans", "tiny_plans"):
        assert main(["preprocess", "--task", t, "--plans", plans, "--workers", "1", "-q", *r]) == 0
    assert json.loads(f.read_text())["configurations"]["3d_fullres_bs3"]["batch_size"] == 3  # kept

    assert main(["train", "--task", t, "--config", "3d_fullres", *TRAIN, *r]) == 0
    assert main(["train", "--task", t, "--config", "3d_fullres_bs3", "--plans", "tiny_plans", *TRAIN, *r]) == 0
    res = s.results / NAME
    assert (res / "nnfastTrainer__nnfast_plans__3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file()
    custom = res / "nnfastTrainer__tiny_plans__3d_fullres_bs3"
    assert json.loads((custom / "fold_0" / "train_config.json").read_text())["batch_size"] == 3
    assert (custom / "tiny_plans.json").is_file()

    out = tmp_path / "pred"
    assert main(["predict", "-i", str(s.raw / NAME / "imagesTr"), "-o", str(out), "--task", t, "--config",
                 "3d_fullres_bs3", "--plans", "tiny_plans", "--folds", "0", "--no-tta", "--device", "cpu", "-q",
                 *r]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 5

    capsys.readouterr()
    assert main(["find-best", "--task", t, "--configs", "3d_fullres", "3d_fullres_bs3", "--folds", "0",
                 "--no-ensembles", *r]) == 0
    printed = capsys.readouterr().out
    assert "nnfastTrainer__nnfast_plans__3d_fullres" in printed and "nnfastTrainer__tiny_plans__3d_fullres_bs3" in printed
    info = json.loads((res / "inference_information.json").read_text())
    assert set(info["considered_models"]) == {"3d_fullres", "tiny_plans/3d_fullres_bs3"}


def test_resenc_plans_train_resume_and_predict(roots, tmp_path):
    """``--preset resenc-m`` plans train, resume and predict through the same CLI (nnfast's ResidualEncoderUNet)."""
    s, r = roots
    t = str(TASK)
    assert main(["plan", "--task", t, "--preset", "resenc-m", "-q", *r]) == 0
    assert main(["preprocess", "--task", t, "--plans", "nnfast_ResEncM_plans", "--workers", "1", "-q", *r]) == 0
    stop = ["--epochs", "2", "--stop-after-epoch", "1"]
    i = TRAIN.index("--epochs")
    base = TRAIN[:i] + TRAIN[i + 2:]
    assert main(["train", "--task", t, "--plans", "nnfast_ResEncM_plans", "--no-val", *base, *stop, *r]) == 0
    fold = s.results / NAME / "nnfastTrainer__nnfast_ResEncM_plans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_latest.pt").is_file() and not (fold / "checkpoint_final.pt").exists()
    assert main(["train", "--task", t, "--plans", "nnfast_ResEncM_plans", "--no-val", "--resume", *base,
                 "--epochs", "2", *r]) == 0
    assert (fold / "checkpoint_final.pt").is_file()
    out = tmp_path / "pred_resenc"
    assert main(["predict", "-i", str(s.raw / NAME / "imagesTr"), "-o", str(out), "--task", t, "--plans",
                 "nnfast_ResEncM_plans", "--folds", "0", "--no-tta", "--device", "cpu", "-q", *r]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 5
