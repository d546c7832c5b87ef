"""Evaluation and postprocessing determination: nnU-Net v2.8.1 vs nnfast on the same NIfTI files.

Both sides run the whole step from files with the same number of worker processes (``NNFAST_BENCH_WORKERS``,
default 2 at full size, where nnU-Net's spawn pools and nnfast's watched pools both start inside the timing; default 1
at the CI size, where both run in this process: nnU-Net's pools are replaced by an in-process ``starmap`` so that CI
does not start a torch-importing interpreter per pool):

* ``evaluate``: ``compute_metrics_on_folder`` (SimpleITKIO) vs ``nnfast.evaluate.metrics.evaluate_folder``; both write
  ``summary.json``.
* ``postprocessing``: ``determine_postprocessing`` (keep_postprocessed_files=False; it still writes every candidate
  folder to disk and re-reads it) vs ``nnfast.evaluate.postprocessing.determine_postprocessing`` (in memory). The
  predictions hold small spurious blobs, so the foreground step is kept and each label is tried.
* ``components`` / ``counts`` (one thread, in memory, one case): acvl_utils' ``remove_all_but_largest_component``
  (skimage labelling) and ``scipy.ndimage.label`` vs ``keep_largest_component``; nnU-Net's per-label mask sums vs
  ``count_matrix``.

Sizes (``NNFAST_BENCH_SCALE``):

- ``0`` (default, CI with ``--benchmark-disable``): 4 cases of 24 x 64 x 64.
- ``1``: 20 cases of ~100 x 256 x 256 (6.5 M voxels, labels 1-3: an organ, a lesion inside it, a small structure),
  predictions with shifted boundaries, flipped voxels and spurious blobs.

Run::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_evaluate.py --benchmark-enable -p no:cacheprovider \
        --benchmark-columns=min,mean,rounds --benchmark-group-by=group

and divide the means within each group; ``test_evaluate_speedup`` prints one timed run of each side.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bench_utils import full_size

LABELS = [1, 2, 3]
DATASET_JSON = {"labels": {"background": 0, "organ": 1, "lesion": 2, "vessel": 3}, "file_ending": ".nii.gz",
                "channel_names": {"0": "CT"}, "numTraining": 20}


def _workers() -> int:
    return int(os.environ.get("NNFAST_BENCH_WORKERS", "2" if full_size() else "1"))


@pytest.fixture(scope="module", autouse=True)
def _nnunet_pools():
    """With one worker, nnU-Net's spawn pools run in this process (see the module docstring)."""
    if _workers() > 1:
        yield
        return
    from evaluate._helpers import make_nnunet_inline

    mp = pytest.MonkeyPatch()
    make_nnunet_inline(mp)
    yield
    mp.undo()


def _size():
    return (20, (100, 256, 256)) if full_size() else (4, (24, 64, 64))


def _case(i: int, shape, rng):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    c = rng.uniform(-0.1, 0.1, 3)
    ref = np.zeros(shape, np.uint8)
    organ = ((zz - c[0]) / 0.7) ** 2 + ((yy - c[1]) / 0.5) ** 2 + ((xx - c[2]) / 0.45) ** 2 < 1
    ref[organ] = 1
    ref[((zz - c[0]) / 0.2) ** 2 + ((yy - c[1] - 0.1) / 0.12) ** 2 + ((xx - c[2]) / 0.12) ** 2 < 1] = 2
    ref[((zz + 0.2) / 0.6) ** 2 + ((yy + 0.6) / 0.05) ** 2 + ((xx - 0.5) / 0.05) ** 2 < 1] = 3
    pred = np.zeros(shape, np.uint8)
    shift = ((zz - c[0]) / 0.7) ** 2 + ((yy - c[1] - 0.03) / 0.5) ** 2 + ((xx - c[2]) / 0.46) ** 2 < 1
    pred[shift] = 1
    pred[ref == 2] = 2
    pred[ref == 3] = 3
    flip = rng.random(shape) < 0.002
    pred[flip & (pred > 0)] = rng.integers(1, 4, int((flip & (pred > 0)).sum()))
    for _ in range(3 + i % 4):  # spurious blobs of random labels outside the organ
        z, y, x = (int(rng.integers(0, s - 4)) for s in shape)
        if not organ[z, y, x]:
            pred[z:z + 3, y:y + 4, x:x + 4] = int(rng.integers(1, 4))
    return pred, ref


@functools.lru_cache(maxsize=1)
def _one_case():
    return _case(0, _size()[1], np.random.default_rng(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_evaluate")
    n, shape = _size()
    rng = np.random.default_rng(1)
    for i in range(n):
        pred, ref = _case(i, shape, rng)
        for arr, sub in ((pred, "pred"), (ref, "ref")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.8, 0.8, 2.5))
            (d / sub).mkdir(exist_ok=True)
            sitk.WriteImage(img, str(d / sub / f"case_{i:03d}.nii.gz"), True)
    from nnfast.native import warmup

    warmup()
    return d


def _fresh(d: Path, name: str) -> Path:
    """A private copy of the predictions (both tools write into the prediction folder)."""
    out = d / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(d / "pred", out)
    return out


def _nnunet_evaluate(pred: Path, ref: Path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return compute_metrics_on_folder(str(ref), str(pred), str(pred / "summary.json"), SimpleITKIO(), ".nii.gz",
                                     LABELS, None, _workers())


def _nnfast_evaluate(pred: Path, ref: Path):
    from nnfast.evaluate.metrics import evaluate_folder

    return evaluate_folder(pred, ref, DATASET_JSON, _workers())


def _nnunet_postprocessing(pred: Path, ref: Path):
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    for p in ("summary.json", "postprocessing.pkl", "postprocessing.json"):
        (pred / p).unlink(missing_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        fns, kwargs = determine_postprocessing(str(pred), str(ref), {"image_reader_writer": "SimpleITKIO"},
                                               DATASET_JSON, _workers(), keep_postprocessed_files=False)
    return [k["labels_or_regions"] for k in kwargs]


def _nnfast_postprocessing(pred: Path, ref: Path):
    from nnfast.evaluate.postprocessing import determine_postprocessing

    plan = determine_postprocessing(pred, ref, DATASET_JSON, _workers())
    return [list(s.labels_or_regions) if isinstance(s.labels_or_regions, tuple) else s.labels_or_regions
            for s in plan.steps]


def _rounds(benchmark, full: int) -> int:
    return 1 if benchmark.disabled else (full if full_size() else 5)


# ------------------------------------------------------------------------------------------------ folder steps
@pytest.mark.compat
@pytest.mark.benchmark(group="evaluate-folder")
def test_evaluate_nnunet(benchmark, folders):
    pred = _fresh(folders, "pred_nnunet")
    benchmark.pedantic(_nnunet_evaluate, args=(pred, folders / "ref"), rounds=_rounds(benchmark, 3), iterations=1)


@pytest.mark.benchmark(group="evaluate-folder")
def test_evaluate_nnfast(benchmark, folders):
    pred = _fresh(folders, "pred_nnfast")
    benchmark.pedantic(_nnfast_evaluate, args=(pred, folders / "ref"), rounds=_rounds(benchmark, 3), iterations=1)


@pytest.mark.compat
@pytest.mark.benchmark(group="postprocessing")
def test_postprocessing_nnunet(benchmark, folders):
    pred = _fresh(folders, "pp_nnunet")
    steps = benchmark.pedantic(_nnunet_postprocessing, args=(pred, folders / "ref"), rounds=_rounds(benchmark, 1),
                               iterations=1)
    benchmark.extra_info["steps"] = str(steps)


@pytest.mark.benchmark(group="postprocessing")
def test_postprocessing_nnfast(benchmark, folders):
    pred = _fresh(folders, "pp_nnfast")
    steps = benchmark.pedantic(_nnfast_postprocessing, args=(pred, folders / "ref"), rounds=_rounds(benchmark, 3),
                               iterations=1)
    benchmark.extra_info["steps"] = str(steps)


# ------------------------------------------------------------------------------------------------ kernels
@pytest.mark.compat
@pytest.mark.benchmark(group="components")
def test_largest_component_acvl_utils(benchmark):
    from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component

    mask = _one_case()[0] > 0
    benchmark.pedantic(remove_all_but_largest_component, args=(mask,), rounds=_rounds(benchmark, 5), iterations=1)


@pytest.mark.benchmark(group="components")
def test_label_scipy(benchmark):
    import scipy.ndimage as ndi

    mask = _one_case()[0] > 0
    benchmark.pedantic(ndi.label, args=(mask, np.ones((3, 3, 3))), rounds=_rounds(benchmark, 5), iterations=1)


@pytest.mark.benchmark(group="components")
def test_largest_component_nnfast(benchmark):
    from nnfast.native.components import keep_largest_component

    mask = _one_case()[0] > 0
    keep_largest_component(mask)
    benchmark.pedantic(keep_largest_component, args=(mask,), rounds=_rounds(benchmark, 20), iterations=1)


def _nnunet_counts(pred, ref):
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask

    return [compute_tp_fp_fn_tn(region_or_label_to_mask(ref, r), region_or_label_to_mask(pred, r), None)
            for r in LABELS]


@pytest.mark.compat
@pytest.mark.benchmark(group="counts")
def test_counts_nnunet(benchmark):
    pred, ref = _one_case()
    benchmark.pedantic(_nnunet_counts, args=(pred, ref), rounds=_rounds(benchmark, 5), iterations=1)


@pytest.mark.benchmark(group="counts")
def test_counts_nnfast(benchmark):
    from nnfast.evaluate.metrics import EvaluationLabels, count_matrix

    pred, ref = _one_case()
    labels = EvaluationLabels.from_labels(LABELS)
    count_matrix(pred, ref, labels)
    benchmark.pedantic(count_matrix, args=(pred, ref, labels), rounds=_rounds(benchmark, 20), iterations=1)


# ------------------------------------------------------------------------------------------------ one-shot ratios
@pytest.mark.compat
def test_evaluate_speedup(folders, record_property):
    """One timed run of each step and side (nnU-Net warmed up first); same decisions, same summary."""
    ref = folders / "ref"
    _nnunet_evaluate(_fresh(folders, "warm"), ref)  # imports torch/nnunetv2 outside the timing
    times = {}
    for name, fn in (("evaluate nnU-Net", _nnunet_evaluate), ("evaluate nnfast", _nnfast_evaluate),
                     ("postprocessing nnU-Net", _nnunet_postprocessing),
                     ("postprocessing nnfast", _nnfast_postprocessing)):
        pred = _fresh(folders, name.replace(" ", "_"))
        t0 = time.perf_counter()
        out = fn(pred, ref)
        times[name] = (time.perf_counter() - t0, out)
    ev_nn, ev_us = times["evaluate nnU-Net"][1], times["evaluate nnfast"][1]
    assert ev_us.foreground_dice == ev_nn["foreground_mean"]["Dice"]
    assert times["postprocessing nnfast"][1] == times["postprocessing nnU-Net"][1]
    n, shape = _size()
    lines = [f"{n} cases of {shape}, {_workers()} workers:"]
    for step in ("evaluate", "postprocessing"):
        a, b = times[f"{step} nnU-Net"][0], times[f"{step} nnfast"][0]
        record_property(f"{step}_speedup", a / b)
        lines.append(f"  {step:<15} nnU-Net {a:7.2f} s  nnfast {b:6.2f} s  speed-up {a / b:5.1f}x")
    print("\n" + "\n".join(lines))
