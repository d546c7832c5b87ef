"""TrainConfig (defaults = nnU-Net's trainer, JSON round trip), SGD and the poly LR schedule vs nnU-Net."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.errors import PlanError, SettingsError
from nnfast.train.config import TrainConfig
from nnfast.train.optim import PolyLRScheduler, build_optimizer, poly_lr

from train._plans import synthetic_plans


def test_defaults_are_nnunet_trainer_values():
    c = TrainConfig()
    assert (c.initial_lr, c.weight_decay, c.momentum, c.nesterov, c.poly_exponent) == (1e-2, 3e-5, 0.99, True, 0.9)
    assert (c.num_epochs, c.num_iterations_per_epoch, c.num_val_iterations_per_epoch) == (1000, 250, 50)
    assert (c.oversample_foreground_percent, c.grad_clip, c.deep_supervision, c.save_every, c.seed) == \
        (0.33, 12.0, True, 50, 12345)
    assert (c.amp, c.compile, c.batch_size, c.patch_size) == ("auto", "auto", None, None)


@pytest.mark.compat
def test_defaults_match_the_installed_nnunet_trainer_source():
    """Read nnUNetTrainer.py's literal assignments with ast (importing the trainer takes seconds)."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("nnunetv2")
    src = (Path(spec.origin).parent / "training" / "nnUNetTrainer" / "nnUNetTrainer.py").read_text()
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "nnUNetTrainer")
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    literals = {}
    for node in ast.walk(methods["__init__"]):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            try:
                literals[node.targets[0].attr] = ast.literal_eval(node.value)
            except ValueError:
                pass
    c = TrainConfig()
    for name in ("initial_lr", "weight_decay", "oversample_foreground_percent", "num_iterations_per_epoch",
                 "num_val_iterations_per_epoch", "num_epochs", "save_every"):
        assert literals[name] == getattr(c, name), name
    assert literals["enable_deep_supervision"] is c.deep_supervision
    opt_src = ast.get_source_segment(src, methods["configure_optimizers"])
    assert f"momentum={c.momentum}, nesterov={c.nesterov}" in opt_src
    assert f"clip_grad_norm_(self.network.parameters(), {c.grad_clip:g})" in \
        ast.get_source_segment(src, methods["train_step"])


def test_from_plan_fills_batch_and_patch_and_applies_overrides():
    plans = synthetic_plans((3.0, 0.8, 0.8), (40, 200, 200))
    conf = plans.configuration("3d_fullres")
    c = TrainConfig.from_plan(plans, "3d_fullres")
    assert c.batch_size == conf.batch_size and c.patch_size == conf.patch_size
    c = TrainConfig.from_plan(plans, "3d_fullres", num_epochs=5, batch_size=1, amp="bf16", compile=None)
    assert (c.num_epochs, c.batch_size, c.amp, c.compile) == (5, 1, "bf16", "auto")
    total = [1, 1, 1]
    for s in conf.architecture.strides:
        total = [a * b for a, b in zip(total, s)]
    c = TrainConfig.from_plan(plans, "3d_fullres", patch_size=[2 * t for t in total])
    assert c.patch_size == tuple(2 * t for t in total)
    with pytest.raises(SettingsError, match="divisible"):
        TrainConfig.from_plan(plans, "3d_fullres", patch_size=[t + 1 for t in total])
    with pytest.raises(SettingsError, match="axes"):
        TrainConfig.from_plan(plans, "3d_fullres", patch_size=(64, 64))
    with pytest.raises(SettingsError, match="unknown"):
        TrainConfig.from_plan(plans, "3d_fullres", learning_rate=1.0)
    with pytest.raises(PlanError):
        TrainConfig.from_plan(plans, "3d_lowres")


@pytest.mark.parametrize("bad", [dict(initial_lr=0), dict(momentum=1.0), dict(num_epochs=0), dict(amp="fp8"),
                                 dict(compile="maybe"), dict(oversample_foreground_percent=1.5),
                                 dict(grad_clip=-1), dict(batch_size=0), dict(patch_size=(0, 4, 4))])
def test_invalid_values_rejected(bad):
    with pytest.raises(SettingsError):
        TrainConfig(**bad)


@settings(max_examples=40, deadline=None)
@given(st.builds(TrainConfig,
                 initial_lr=st.floats(1e-6, 1.0), weight_decay=st.floats(0, 1e-2), momentum=st.floats(0.01, 0.999),
                 num_epochs=st.integers(1, 5000), oversample_foreground_percent=st.floats(0, 1),
                 amp=st.sampled_from(["auto", "fp16", "bf16", "off"]), compile=st.sampled_from(["auto", "on", "off"]),
                 deep_supervision=st.booleans(), batch_size=st.none() | st.integers(1, 64),
                 patch_size=st.none() | st.lists(st.integers(1, 512), min_size=2, max_size=3).map(tuple)))
def test_json_round_trip(cfg):
    text = json.dumps(cfg.to_json())
    assert TrainConfig.from_json(json.loads(text)) == cfg


def test_from_json_rejects_unknown_keys_and_versions():
    d = TrainConfig().to_json()
    with pytest.raises(SettingsError, match="unknown"):
        TrainConfig.from_json({**d, "lr": 1})
    with pytest.raises(SettingsError, match="version"):
        TrainConfig.from_json({**d, "schema_version": 99})
    assert TrainConfig.from_json({"num_epochs": 7}) == TrainConfig(num_epochs=7)


def test_config_and_splits_do_not_import_torch():
    code = ("import sys, nnfast.train.config, nnfast.splits; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_optimizer_is_nnunet_sgd():
    net = torch.nn.Linear(3, 2)
    opt = build_optimizer(net.parameters(), TrainConfig())
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"]) == (1e-2, 3e-5, 0.99, True)


@pytest.mark.compat
def test_poly_lr_equals_nnunet_scheduler():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler as RefScheduler

    cfg = TrainConfig(num_epochs=1000)
    net_a, net_b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt_a, opt_b = build_optimizer(net_a.parameters(), cfg), build_optimizer(net_b.parameters(), cfg)
    ours = PolyLRScheduler.from_config(opt_a, cfg)
    ref = RefScheduler(opt_b, cfg.initial_lr, cfg.num_epochs)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == 1e-2
    for epoch in [0, 1, 2, 250, 500, 998, 999, 1000]:  # the trainer's explicit step(current_epoch)
        ours.step(epoch)
        ref.step(epoch)
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == poly_lr(epoch, cfg)
        assert ours.get_last_lr() == ref.get_last_lr()
    for _ in range(5):  # implicit counter
        ours.step()
        ref.step()
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    assert abs(poly_lr(500, cfg) - 5.358867e-3) < 1e-8
    assert abs(poly_lr(999, cfg) - 2.0e-5) < 1e-6


def test_scheduler_state_round_trip_and_range():
    cfg = TrainConfig(num_epochs=10)
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
    s = PolyLRScheduler.from_config(opt, cfg)
    s.step()
    s.step()
    s2 = PolyLRScheduler.from_config(opt, cfg)
    s2.load_state_dict(s.state_dict())
    s.step()
    s2.step()
    assert s.get_last_lr() == s2.get_last_lr() and s.ctr == s2.ctr == 4
    with pytest.raises(ValueError):
        poly_lr(11, cfg)
    with pytest.raises(ValueError):
        poly_lr(-1, dataclasses.replace(cfg))
