"""The training run (``nnfast.train.trainer``) on a tiny synthetic dataset, CPU only.

The dataset (6 CT-like cases of 32x64x64 voxels, an organ and a lesion) is planned with a 0.05 GB GPU-memory target
so that nnfast's planner (nnU-Net's rules) keeps ``3d_lowres``; every configuration is preprocessed for real.
Patches are overridden to 8x16x16 (3D) / 32x32 (2D) to keep CPU steps short; torch runs one thread (on a busy
2-core machine OpenMP spinning costs far more than it gains).
"""
from __future__ import annotations

import dataclasses
import json
import math
import socket

import numpy as np
import pytest
import torch

from factories import make_raw_dataset
from nnfast.errors import DatasetError, DatasetNotFoundError, SettingsError
from nnfast.settings import Settings
from nnfast.train.checkpoint import load_checkpoint
from nnfast.train.config import TrainConfig
from nnfast.train.ddp import split_batch
from nnfast.train.optim import poly_lr
from nnfast.train.progress import TrainingHistory
from nnfast.layout import fold_folder, trainer_folder
from nnfast.train.trainer import train

TASK = 31
DATASET = "Dataset031_TrainTiny"
TINY = dict(patch_size=(8, 16, 16), batch_size=2)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, one_thread) -> Settings:
    from nnfast.preprocess.api import preprocess_dataset

    root = tmp_path_factory.mktemp("train_ds")
    settings = Settings(raw=root / "raw", preprocessed=root / "pre", results=root / "res")
    make_raw_dataset(settings.raw, TASK, "TrainTiny", [(32, 64, 64)] * 6, [(1.0, 1.0, 1.0)] * 6, n_labels=2,
                     seed=0)
    preprocess_dataset(TASK, settings, config="all", workers=1, gpu_memory_gb=0.05)
    return settings


def _settings(dataset: Settings, tmp_path) -> Settings:
    return dataclasses.replace(dataset, results=tmp_path / "results")


def _state_equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_fixture_plans_keep_lowres(dataset):
    from nnfast.plan.api import load_current_plans

    plans = load_current_plans(TASK, dataset)
    assert {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"} <= set(plans.configurations)


def test_training_learns_and_writes_its_files(dataset, tmp_path):
    settings = _settings(dataset, tmp_path)
    cfg = TrainConfig(num_epochs=6, num_iterations_per_epoch=8, num_val_iterations_per_epoch=8, save_every=4, **TINY)
    seen = []
    res = train(TASK, settings, "3d_fullres", 0, cfg, device="cpu", num_workers=0, progress=seen.append)
    out = fold_folder(settings.results, DATASET, "3d_fullres", 0)
    assert res.output_folder == out and res.finished and res.epochs_completed == 6 and res.epochs_run == 6
    h = res.history.data
    assert [r.epoch for r in seen] == list(range(6))

    # learning: the training loss falls, validation loss falls, pseudo-Dice rises (deterministic run, wide margins)
    assert np.mean(h["train_losses"][-2:]) < np.mean(h["train_losses"][:2]) - 0.2, h["train_losses"]
    assert h["val_losses"][-1] < h["val_losses"][0] - 0.1, h["val_losses"]
    assert h["mean_fg_dice"][-1] > h["mean_fg_dice"][0] + 0.1, h["mean_fg_dice"]
    assert all(len(d) == 2 for d in h["dice_per_class"])  # organ and lesion
    # nnU-Net's EMA and poly learning rate
    ema = h["mean_fg_dice"][0]
    for i, m in enumerate(h["mean_fg_dice"]):
        ema = m if i == 0 else 0.9 * ema + 0.1 * m
        assert h["ema_fg_dice"][i] == pytest.approx(ema)
        assert h["lrs"][i] == pytest.approx(poly_lr(i, cfg))
    assert res.best_ema == pytest.approx(max(h["ema_fg_dice"]))

    # files
    root = trainer_folder(settings.results, DATASET, "3d_fullres")
    for name in ("nnfast_plans.json", "dataset.json", "nnfast_fingerprint.json"):
        assert (root / name).is_file()
    png = (out / "progress.png").read_bytes()
    assert len(png) > 10_000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "progress.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("epoch,train_loss,val_loss,mean_fg_dice,ema_fg_dice,lr")
    assert json.loads((out / "progress.json").read_text())["epochs"] == 6
    log = (out / "training_log.txt").read_text()
    assert "Epoch 5" in log and "training done" in log
    assert TrainConfig.from_json(json.loads((out / "train_config.json").read_text())) == res.train_config
    splits = json.loads((dataset.preprocessed / DATASET / "splits_final.json").read_text())
    assert len(splits) == 5 and sorted(splits[0]["train"] + splits[0]["val"]) == [f"case_{i:03d}" for i in range(6)]

    # checkpoints: final and best written, latest removed at the end; weights_only loading; sidecar
    assert not (out / "checkpoint_latest.pt").exists() and not (out / "checkpoint_latest.json").exists()
    final = torch.load(out / "checkpoint_final.pt", weights_only=True)
    assert final["current_epoch"] == 6 and final["fold"] == 0 and final["configuration"] == "3d_fullres"
    assert final["inference_allowed_mirroring_axes"] == [0, 1, 2] and final["num_classes"] == 3
    assert final["loader"] == {"next_train_batch": 48, "next_val_batch": 48}
    assert _state_equal(final["network_weights"], res.network.state_dict()) == []
    side = json.loads((out / "checkpoint_final.json").read_text())
    assert side["current_epoch"] == 6 and side["file"] == "checkpoint_final.pt"
    assert side["train_config"]["num_epochs"] == 6 and "network_weights" not in side and "rng" not in side
    assert side["history"]["train_losses"] == pytest.approx(h["train_losses"])
    best = load_checkpoint(out / "checkpoint_best.pt")
    assert best["best_ema"] == pytest.approx(res.best_ema)
    # the weights load into a freshly built network (strict)
    from nnfast.network import build_network
    from nnfast.plan.planner import load_plans

    net = build_network(load_plans(root / "nnfast_plans.json"), "3d_fullres", 1, 3)
    net.load_state_dict(final["network_weights"])


def _watch_loaders_at_first_epoch(monkeypatch) -> list[dict]:
    """Record the loaders' state when the first epoch starts (the epoch clock); the list fills during train()."""
    from nnfast.train import trainer as trainer_mod

    seen: list[dict] = []
    real_epoch = trainer_mod._Run._epoch

    def epoch(self, e):
        if not seen:
            lds = [ld for ld in (self.train_loader, self.val_loader) if ld is not None]
            seen.append({"ready": [ld.workers_ready for ld in lds], "built": [ld.batches_ready for ld in lds],
                         "pids": [p for ld in lds for p in ld.worker_pids]})
        return real_epoch(self, e)

    monkeypatch.setattr(trainer_mod._Run, "_epoch", epoch)
    return seen


def _assert_gone(pids: list[int]) -> None:
    import os

    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_resume_continues_bit_for_bit(dataset, tmp_path, monkeypatch):
    cfg = TrainConfig(num_epochs=3, num_iterations_per_epoch=3, num_val_iterations_per_epoch=2, **TINY)
    a_set = _settings(dataset, tmp_path / "a")
    b_set = _settings(dataset, tmp_path / "b")
    a = train(TASK, a_set, "3d_fullres", 1, cfg, device="cpu", num_workers=0)

    # the interrupted run reads its batches through loader worker processes: same batches as in-process
    seen = _watch_loaders_at_first_epoch(monkeypatch)
    b1 = train(TASK, b_set, "3d_fullres", 1, cfg, device="cpu", num_workers=1, stop_after_epoch=2)
    monkeypatch.undo()
    # the workers started before the first epoch's clock (as nnU-Net's on_train_start), and are gone at the end
    assert seen[0]["ready"] == [True, True] and min(seen[0]["built"]) >= 1 and len(seen[0]["pids"]) == 2
    _assert_gone(seen[0]["pids"])
    out_b = fold_folder(b_set.results, DATASET, "3d_fullres", 1)
    assert not b1.finished and b1.epochs_completed == 2 and b1.checkpoint == out_b / "checkpoint_latest.pt"
    assert load_checkpoint(b1.checkpoint)["current_epoch"] == 2
    assert not (out_b / "checkpoint_final.pt").exists()
    torch.manual_seed(999)  # whatever happens in between must not matter
    b2 = train(TASK, b_set, "3d_fullres", 1, None, device="cpu", num_workers=0, resume=True)
    assert b2.finished and b2.epochs_run == 1 and b2.epochs_completed == 3 and b2.train_config == a.train_config

    assert _state_equal(a.network.state_dict(), b2.network.state_dict()) == []
    fa = load_checkpoint(fold_folder(a_set.results, DATASET, "3d_fullres", 1) / "checkpoint_final.pt")
    fb = load_checkpoint(out_b / "checkpoint_final.pt")
    for pa, pb in zip(fa["optimizer_state"]["state"].values(), fb["optimizer_state"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    for key in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs"):
        assert a.history.data[key] == b2.history.data[key], key
    assert fa["loader"] == fb["loader"] and fa["best_ema"] == fb["best_ema"]
    assert torch.equal(fa["rng"]["torch_cpu"], fb["rng"]["torch_cpu"])

    # resuming a finished run trains nothing more
    b3 = train(TASK, b_set, "3d_fullres", 1, None, device="cpu", num_workers=0, resume=True)
    assert b3.finished and b3.epochs_run == 0
    assert _state_equal(a.network.state_dict(), b3.network.state_dict()) == []


def test_failed_training_leaves_no_loader_process(dataset, tmp_path, monkeypatch):
    import os

    from nnfast.data.loader import SHM_PREFIX
    from nnfast.train import trainer as trainer_mod

    seen = _watch_loaders_at_first_epoch(monkeypatch)
    watched = trainer_mod._Run._epoch

    def failing(self, e):
        watched(self, e)  # records, then trains one epoch
        raise RuntimeError("boom in epoch")

    monkeypatch.setattr(trainer_mod._Run, "_epoch", failing)
    cfg = TrainConfig(num_epochs=2, num_iterations_per_epoch=1, num_val_iterations_per_epoch=1, **TINY)
    with pytest.raises(RuntimeError, match="boom in epoch"):
        train(TASK, _settings(dataset, tmp_path), "3d_fullres", 0, cfg, device="cpu", num_workers=1)
    assert seen[0]["ready"] == [True, True] and len(seen[0]["pids"]) == 2
    _assert_gone(seen[0]["pids"])
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"{SHM_PREFIX}{os.getpid()}_")]


@pytest.mark.parametrize("config, patch, fold", [("2d", (32, 32), "all"), ("3d_lowres", (8, 16, 16), 0)])
def test_2d_and_lowres_configurations_train(dataset, tmp_path, monkeypatch, config, patch, fold):
    calls = []

    def fake(fold_dir, **kw):
        return calls.append((fold_dir, kw)) or {"mean_dice": 0.5}

    settings = _settings(dataset, tmp_path)
    cfg = TrainConfig(num_epochs=1, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, patch_size=patch,
                      batch_size=2)
    res = train(TASK, settings, config, fold, cfg, device="cpu", num_workers=0, final_validation=fake)
    out = fold_folder(settings.results, DATASET, config, fold)
    assert res.finished and out.name == ("fold_all" if fold == "all" else "fold_0")
    conv = torch.nn.Conv2d if config == "2d" else torch.nn.Conv3d
    assert isinstance(res.network.encoder.stages[0][0].convs[0].conv, conv)
    ck = load_checkpoint(out / "checkpoint_final.pt")
    assert ck["inference_allowed_mirroring_axes"] == ([0, 1] if config == "2d" else [0, 1, 2])
    assert ck["patch_size"] == list(patch)
    # the final-validation hook ran with the final checkpoint
    assert res.validation == {"mean_dice": 0.5} and res.validation_skipped is None
    assert calls[0][0] == out and calls[0][1]["checkpoint_name"] == "checkpoint_final"


def test_cascade_names_what_is_missing(dataset, tmp_path):
    with pytest.raises(DatasetError, match=r"3d_cascade_fullres` fold 0 trains on the `3d_lowres` segmentation of each "
                                          r"of its 6 cases, but 6 are missing.*validation cases of `3d_lowres` fold\(s\) "
                                          r"0, 1, 2, 3, 4.*no previous-stage segmentation.*--validate-only"):
        train(TASK, _settings(dataset, tmp_path), "3d_cascade_fullres", 0, TrainConfig(num_epochs=1),
              device="cpu", num_workers=0)
    assert not fold_folder(tmp_path / "results", DATASET, "3d_cascade_fullres", 0).joinpath("checkpoint_latest.pt") \
        .exists()


@pytest.mark.slow
def test_cascade_trains_on_the_cross_validated_lowres_predictions(dataset, tmp_path, monkeypatch, capsys):
    """3d_lowres folds 0-4 write every case's segmentation on the full-resolution grid (each by the fold that held
    it out); 3d_cascade_fullres trains on them as extra input channels, validates with fold 0's 3d_lowres
    predictions and predicts new images through both stages."""
    from nnfast.cli.main import main
    from nnfast.infer import predict
    from nnfast.infer.validation import validate_fold
    from nnfast.io.prev_stage import PreviousStageReader, read_previous_stage_metadata
    from nnfast.io.store_reader import CaseReader
    from nnfast.layout import previous_stage_folder
    from nnfast.plan.api import load_current_plans

    real = predict.predict_folder
    monkeypatch.setattr(predict, "predict_folder",  # speed
                        lambda inputs, out, opts, **kw: real(inputs, out, dataclasses.replace(opts, use_tta=False), **kw))
    settings = _settings(dataset, tmp_path)
    cfg = TrainConfig(num_epochs=1, num_iterations_per_epoch=1, num_val_iterations_per_epoch=1, **TINY)
    for k in range(5):
        r = train(TASK, settings, "3d_lowres", k, cfg, device="cpu", num_workers=0, final_validation=validate_fold)
        assert r.validation_skipped is None, r.validation_skipped
    splits = json.loads((dataset.preprocessed / DATASET / "splits_final.json").read_text())
    plans = load_current_plans(TASK, dataset)
    full = dataset.preprocessed / DATASET / plans.configuration("3d_cascade_fullres").data_identifier
    prev = previous_stage_folder(settings.results, DATASET, "3d_lowres", "3d_cascade_fullres")
    for k, s in enumerate(splits):
        for cid in s["val"]:
            meta = read_previous_stage_metadata(prev / f"{cid}.zarr")
            assert meta["source"] == {"configuration": "3d_lowres", "fold": k, "checkpoint": "checkpoint_final"}
            shape = CaseReader(full / f"{cid}.zarr").shape
            assert tuple(meta["shape"]) == shape
            seg = PreviousStageReader(prev / f"{cid}.zarr").read([[0, n] for n in shape])
            assert set(np.unique(seg)) <= {0, 1, 2}
    assert sorted(p.name for p in prev.glob("*.zarr")) == sorted(f"{c}.zarr" for s in splits for c in s["val"])

    res = train(TASK, settings, "3d_cascade_fullres", 0, cfg, device="cpu", num_workers=0,
                final_validation=validate_fold)
    assert res.finished and res.validation_skipped is None and 0 <= res.validation_dice <= 1
    assert res.network.encoder.stages[0][0].convs[0].conv.in_channels == 3  # image + one channel per label
    ck = load_checkpoint(res.output_folder / "checkpoint_final.pt")
    assert ck["num_input_channels"] == 3 and ck["configuration"] == "3d_cascade_fullres"
    assert "3 input channels (2 of them the `3d_lowres` segmentation" in (res.output_folder / "training_log.txt") \
        .read_text()
    val = res.output_folder / "validation"
    assert sorted(p.name for p in val.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in splits[0]["val"])
    assert not (val / "previous_stage_3d_lowres").exists()  # fold 0's 3d_lowres validation was used

    # a new image through both stages: 3d_lowres is predicted first
    images = sorted((dataset.raw / DATASET / "imagesTr").glob("*_0000.nii.gz"))[:1]
    report = real([images], tmp_path / "pred", predict.PredictOptions(
        model_folder=res.output_folder.parent, folds=(0,), use_tta=False, device="cpu", settings=settings))
    assert report.ok and len(report.written) == 1
    assert len(list((tmp_path / "pred" / "previous_stage_3d_lowres").glob("*.nii.gz"))) == 1

    # --validate-only writes a fold's next-stage inputs again
    for cid in splits[1]["val"]:
        import shutil
        shutil.rmtree(prev / f"{cid}.zarr")
    roots = ["--raw", str(dataset.raw), "--preprocessed", str(dataset.preprocessed), "--results", str(settings.results)]
    assert main(["train", "--task", str(TASK), "--config", "3d_lowres", "--fold", "1", "--validate-only",
                 "--device", "cpu", *roots]) == 0
    assert "validation of 3d_lowres fold 1 (checkpoint_final): foreground mean Dice" in capsys.readouterr().out
    assert all((prev / f"{cid}.zarr").is_dir() for cid in splits[1]["val"])
    assert main(["train", "--task", str(TASK), "--config", "3d_cascade_fullres", "--fold", "2", "--validate-only",
                 "--device", "cpu", *roots]) == 2  # never trained
    assert "checkpoint_final.pt` does not exist" in capsys.readouterr().err


def test_bad_requests(dataset, tmp_path):
    settings = _settings(dataset, tmp_path)
    with pytest.raises(SettingsError, match="fold"):
        train(TASK, settings, "3d_fullres", "x", device="cpu")
    with pytest.raises(DatasetNotFoundError):
        train(77, settings, "3d_fullres", 0, device="cpu")
    with pytest.raises(SettingsError, match="patch_size"):
        train(TASK, settings, "3d_fullres", 0, TrainConfig(patch_size=(8, 16, 18)), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="cuda"):
            train(TASK, settings, "3d_fullres", 0, device="cuda")


def test_final_validation_is_the_callers_callable(dataset, tmp_path):
    """train() calls the final validation it is given (it imports no inference); a failure there is reported and
    the training stands."""
    from nnfast.errors import CaseNotFoundError

    settings = _settings(dataset, tmp_path)
    cfg = TrainConfig(num_epochs=1, num_iterations_per_epoch=1, num_val_iterations_per_epoch=1, **TINY)
    calls = []

    def failing(fold_dir, **kwargs):
        calls.append((fold_dir, kwargs))
        raise CaseNotFoundError("no raw images")

    res = train(TASK, settings, "3d_fullres", 0, cfg, device="cpu", num_workers=0, final_validation=failing)
    assert res.finished and res.validation is None and res.validation_skipped == "failed: no raw images"
    assert calls == [(res.output_folder, dict(settings=settings, device=torch.device("cpu"),
                                              checkpoint_name="checkpoint_final", save_probabilities=False, workers=1))]
    assert "final validation failed" in (res.output_folder / "training_log.txt").read_text()


@pytest.mark.slow
def test_final_validation_predicts_and_scores_the_validation_cases(dataset, tmp_path, monkeypatch):
    from nnfast.infer import predict
    from nnfast.infer.validation import validate_fold

    real = predict.predict_folder
    monkeypatch.setattr(predict, "predict_folder",  # speed
                        lambda inputs, out, opts, **kw: real(inputs, out, dataclasses.replace(opts, use_tta=False), **kw))
    settings = _settings(dataset, tmp_path)
    cfg = TrainConfig(num_epochs=1, num_iterations_per_epoch=1, num_val_iterations_per_epoch=1, **TINY)
    res = train(TASK, settings, "3d_fullres", 0, cfg, device="cpu", num_workers=0, final_validation=validate_fold)
    assert res.validation_skipped is None and 0 <= res.validation_dice <= 1
    splits = json.loads((dataset.preprocessed / DATASET / "splits_final.json").read_text())
    out = res.output_folder / "validation"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in splits[0]["val"])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(splits[0]["val"])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(res.validation_dice)
    assert "final validation done" in (res.output_folder / "training_log.txt").read_text()


def test_history_ema_and_nan_epochs():
    h = TrainingHistory()
    assert h.append(train_loss=1, val_loss=1, dice_per_class=[0.5, float("nan")], lr=0.01, start=0, end=1) == (0.5, 0.5)
    m, e = h.append(train_loss=1, val_loss=1, dice_per_class=[float("nan")] * 2, lr=0.01, start=1, end=2)
    assert math.isnan(m) and e == 0.5  # a NaN epoch keeps the EMA (nnU-Net would turn it into NaN for good)
    assert h.append(train_loss=1, val_loss=1, dice_per_class=[1.0, 0.0], lr=0.01, start=2, end=4) == (0.5, 0.5)
    assert h.append(train_loss=1, val_loss=1, dice_per_class=[1.0, 1.0], lr=0.01, start=4, end=5)[1] == \
        pytest.approx(0.55)
    back = TrainingHistory.from_dict(h.to_dict())
    assert len(back) == 4 and back.epoch_times() == [1, 1, 2, 1]
    back.truncate(2)
    assert len(back) == 2 and back.last_ema == 0.5


@pytest.mark.compat
@pytest.mark.parametrize("world", [2, 3, 4])
def test_split_batch_matches_nnunet(monkeypatch, world):
    import types

    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as mod

    for gbs in range(world, 14):
        for p in (0.0, 0.33, 0.5, 0.66, 1.0):
            for rank in range(world):
                fake_dist = types.SimpleNamespace(get_world_size=lambda: world, get_rank=lambda r=rank: r)
                monkeypatch.setattr(mod, "dist", fake_dist)
                me = types.SimpleNamespace(is_ddp=True, oversample_foreground_percent=p,
                                           configuration_manager=types.SimpleNamespace(batch_size=gbs))
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    mod.nnUNetTrainer._set_batch_size_and_oversample(me)
                assert split_batch(gbs, world, rank, p) == (me.batch_size, pytest.approx(me.oversample_foreground_percent))
    with pytest.raises(SettingsError, match="smaller than the number of processes"):
        split_batch(1, world, 0, 0.33)


def test_cli_train_then_extend_with_resume(dataset, tmp_path, capsys):
    from nnfast.cli.main import main

    roots = ["--preprocessed", str(dataset.preprocessed), "--results", str(tmp_path / "results")]
    base = ["train", "--task", str(TASK), "--config", "3d_lowres", "--fold", "2", "--iterations", "2",
            "--val-iterations", "1", "--device", "cpu", "--workers", "0", "--no-val", *roots]
    assert main([*base, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "training finished" in out
    assert main([*base, "--epochs", "2", "--resume"]) == 0  # the saved settings with 2 epochs instead of 1
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "epoch 1/2" not in out and "(1 epochs this run)" in out
    ck = load_checkpoint(fold_folder(tmp_path / "results", DATASET, "3d_lowres", 2) / "checkpoint_final.pt")
    assert ck["current_epoch"] == 2 and ck["train_config"]["num_iterations_per_epoch"] == 2
    assert main(["train", "--task", str(TASK), "--config", "3d_cascade_fullres", "--device", "cpu", *roots]) == 2
    assert "previous-stage segmentation" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gloo_two_processes(dataset, tmp_path):
    import torch.multiprocessing as tmp_mp

    from train._ddp_worker import ddp_train

    settings = _settings(dataset, tmp_path)
    cfg = TrainConfig(num_epochs=1, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, **TINY)
    roots = {k: str(getattr(settings, k)) for k in ("raw", "preprocessed", "results")}
    tmp_mp.spawn(ddp_train, args=(2, _free_port(), roots, TASK, "3d_fullres", cfg.to_json(), str(tmp_path)),
                 nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert _state_equal(w0, w1) == []  # DDP kept the replicas identical
    from nnfast.network import build_network
    from nnfast.plan.planner import load_plans

    torch.manual_seed(cfg.seed)
    init = build_network(load_plans(dataset.preprocessed / DATASET / "nnfast_plans.json"), "3d_fullres", 1, 3)
    assert _state_equal(init.state_dict(), w0) != []  # ... and they did train
    h0, h1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert h0 == h1 and h0["epochs"] == 1 and h0["world_size"] == 2  # reduced losses / pseudo-Dice agree
    assert "(2 processes)" in (fold_folder(settings.results, DATASET, "3d_fullres", 0) / "training_log.txt").read_text()
    out = fold_folder(settings.results, DATASET, "3d_fullres", 0)
    ck = load_checkpoint(out / "checkpoint_final.pt")  # written by rank 0
    assert _state_equal(ck["network_weights"], w0) == []
    assert len([p for p in out.iterdir() if p.suffix == ".pt"]) == 2  # final + best, nothing per rank
