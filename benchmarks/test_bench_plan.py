"""The plan step: nnU-Net v2's ``ExperimentPlanner.plan_experiment()`` vs nnfast's ``plan_experiment`` on one fingerprint.

Both sides do the whole step in-process from files: read ``dataset.json`` and the fingerprint, plan every configuration,
write the plans JSON (nnU-Net also opens one image to choose its reader). nnU-Net instantiates a PlainConvUNet (torch)
for every candidate patch size to get its VRAM estimate; nnfast computes the same number arithmetically.

Sizes (``NNFAST_BENCH_SCALE``):

- ``0`` (default, CI with ``--benchmark-disable``): 8 CT-like cases, ~(40-64) x 160 x 160 at (2.5, 0.8, 0.8) mm.
- ``1``: a 24-case abdominal CT set, ~(80-600) x 512 x 512 at (0.6-5, 0.6-0.95, 0.6-0.95) mm -- the size behind the
  ~4 s that nnU-Net's plan step takes on it; it needs a 3d_lowres search, nnU-Net's slowest path.

Run ``NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_plan.py --benchmark-enable -p no:cacheprovider`` and divide the
two means (``group=plan``); ``test_plan_speedup`` prints and records the ratio of one timed run of each.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from nnfast.fingerprint.schema import Fingerprint
from nnfast.io.atomic import read_json
from nnfast.io.dataset import load_dataset
from nnfast.plan.planner import plan_experiment, write_plans
from plan.plan_reference_nnunet import DATASET_NAME, make_dataset_json, make_fingerprint, write_raw_dataset


def full_size() -> bool:
    return float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0) >= 1


def _fingerprint() -> Fingerprint:
    rng = np.random.default_rng(24)
    if full_size():
        n = 24
        spacings = [(float(rng.choice([0.625, 0.8, 1.0, 1.25, 2.5, 3.0, 5.0])), *(rng.uniform(0.6, 0.95),) * 2)
                    for _ in range(n)]
        shapes = [(int(rng.integers(80, 600)), 512, 512) for _ in range(n)]
    else:
        n = 8
        spacings = [(2.5, 0.8, 0.8)] * n
        shapes = [(int(rng.integers(40, 64)), 160, 160) for _ in range(n)]
    return make_fingerprint(spacings, shapes, median_relative_size_after_cropping=0.9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_plan")
    fp = _fingerprint()
    dj = make_dataset_json(["CT"], 3, len(fp.spacings))
    write_raw_dataset(d / "raw", dj)
    pre = d / "preprocessed" / DATASET_NAME
    pre.mkdir(parents=True)
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fp.to_nnunet()))
    (pre / "nnfast_fingerprint.json").write_text(json.dumps(fp.to_json()))
    (d / "results").mkdir()
    _run_nnfast(d)  # warm-up
    return d


@pytest.fixture(scope="module")
def nnunet_warm(workdir):
    """One untimed nnU-Net run: imports torch and nnunetv2 before anything is timed."""
    _run_nnunet(workdir)
    return workdir


@contextlib.contextmanager
def _nnunet_env(d: Path):
    mp = pytest.MonkeyPatch()
    mp.setenv("nnUNet_raw", str(d / "raw"))
    mp.setenv("nnUNet_preprocessed", str(d / "preprocessed"))
    mp.setenv("nnUNet_results", str(d / "results"))
    try:
        yield
    finally:
        mp.undo()


def _run_nnunet(d: Path) -> dict:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    with _nnunet_env(d), contextlib.redirect_stdout(io.StringIO()):
        ExperimentPlanner(DATASET_NAME, gpu_memory_target_in_gb=8).plan_experiment()
    return read_json(d / "preprocessed" / DATASET_NAME / "nnUNetPlans.json")


def _run_nnfast(d: Path):
    info, _ = load_dataset(d / "raw" / DATASET_NAME)
    fp = Fingerprint.from_json(read_json(d / "preprocessed" / DATASET_NAME / "nnfast_fingerprint.json"))
    plans = plan_experiment(fp, info, gpu_memory_target_in_gb=8)
    write_plans(plans, d / "preprocessed" / DATASET_NAME / "nnfast_plans.json")
    return plans


@pytest.mark.compat
@pytest.mark.benchmark(group="plan")
def test_plan_nnunet(benchmark, workdir, nnunet_warm):
    ref = benchmark.pedantic(_run_nnunet, args=(workdir,), rounds=1 if benchmark.disabled else 3, iterations=1)
    benchmark.extra_info["configurations"] = list(ref["configurations"])


@pytest.mark.benchmark(group="plan")
def test_plan_nnfast(benchmark, workdir):
    plans = benchmark.pedantic(_run_nnfast, args=(workdir,), rounds=1 if benchmark.disabled else 50, iterations=1)
    benchmark.extra_info["configurations"] = list(plans.configurations)


def _timed_speedup(run_nnunet, run_nnfast, workdir, record_property, label: str) -> None:
    """One timed run of each; the same plans once exported; nnfast faster."""
    from nnfast.plan.nnunet_compat import to_nnunet_plans

    t0 = time.perf_counter()
    ref = run_nnunet(workdir)
    t1 = time.perf_counter()
    ours = run_nnfast(workdir)
    t2 = time.perf_counter()
    exported = json.loads(json.dumps(to_nnunet_plans(ours, read_json(workdir / "raw" / DATASET_NAME / "dataset.json"))))
    exported.pop("nnfast")
    assert exported == ref
    ratio = (t1 - t0) / (t2 - t1)
    record_property("nnunet_s", t1 - t0)
    record_property("nnfast_s", t2 - t1)
    record_property("speedup", ratio)
    print(f"\n{label}: nnU-Net {t1 - t0:.3f} s, nnfast {1e3 * (t2 - t1):.2f} ms, speed-up {ratio:.0f}x "
          f"({list(ref['configurations'])})")
    assert ratio > 1


@pytest.mark.compat
def test_plan_speedup(workdir, nnunet_warm, record_property):
    """One timed run of each (after the warm-up); the same plans; nnfast faster."""
    _timed_speedup(_run_nnunet, _run_nnfast, workdir, record_property, "plan step")


# ---------------------------------------------------------------------------------------- ResEnc-M preset
def _run_nnunet_resenc_m(d: Path) -> dict:
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncM,
    )

    with _nnunet_env(d), contextlib.redirect_stdout(io.StringIO()):
        nnUNetPlannerResEncM(DATASET_NAME).plan_experiment()
    return read_json(d / "preprocessed" / DATASET_NAME / "nnUNetResEncUNetMPlans.json")


def _run_nnfast_resenc_m(d: Path):
    info, _ = load_dataset(d / "raw" / DATASET_NAME)
    fp = Fingerprint.from_json(read_json(d / "preprocessed" / DATASET_NAME / "nnfast_fingerprint.json"))
    plans = plan_experiment(fp, info, preset="resenc-m")
    write_plans(plans, d / "preprocessed" / DATASET_NAME / "nnfast_ResEncM_plans.json")
    return plans


@pytest.mark.compat
@pytest.mark.benchmark(group="plan-resenc-m")
def test_plan_resenc_m_nnunet(benchmark, workdir, nnunet_warm):
    ref = benchmark.pedantic(_run_nnunet_resenc_m, args=(workdir,), rounds=1 if benchmark.disabled else 3,
                             iterations=1)
    benchmark.extra_info["configurations"] = list(ref["configurations"])


@pytest.mark.benchmark(group="plan-resenc-m")
def test_plan_resenc_m_nnfast(benchmark, workdir):
    plans = benchmark.pedantic(_run_nnfast_resenc_m, args=(workdir,), rounds=1 if benchmark.disabled else 50,
                               iterations=1)
    benchmark.extra_info["configurations"] = list(plans.configurations)


@pytest.mark.compat
def test_plan_resenc_m_speedup(workdir, nnunet_warm, record_property):
    """ResEnc-M: one timed run of each after a warm-up of each; the same plans; nnfast faster."""
    _run_nnunet_resenc_m(workdir)  # imports the residual planner module and builds its first networks
    _timed_speedup(_run_nnunet_resenc_m, _run_nnfast_resenc_m, workdir, record_property, "ResEnc-M plan step")
