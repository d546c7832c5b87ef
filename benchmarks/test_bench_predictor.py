"""In-memory prediction: nnfast's ``Predictor.predict_array`` vs nnU-Net's ``nnUNetPredictor.predict_single_npy_array``
on the same model (an nnfast model exported with ``export-model``, loaded by both from the same folder) and the same
array.

One call = preprocessing (crop, normalize, resample to the plan's spacing), sliding window without TTA, export back to
the input grid. The network is small (features 4/8/8, patch (8, 16, 16) by default; 8/16/32 and (32, 64, 64) at scale
1) so that the run is not only network time: what differs between the two is everything around the network. One CPU
thread for torch on both sides.

Image: (1, 24, 64, 64) by default; (1, 100, 256, 256) at (3.0, 0.8, 0.8) mm at scale 1, resampled to the plan's
(3.0, 1.0, 1.0) mm grid.

``extra_info``: ``peak_mib``, the peak of Python/NumPy allocations during one call (``tracemalloc``; torch's CPU
allocator is not traced).

Measured at scale 1 on the 2-core development machine (busy, load 7-8; 2026-12-06, two rounds each): nnU-Net 65.8 s,
nnfast 50.7 s (min; medians 69.5 / 52.6 s): 1.3x, the sliding window dominating on the CPU. Tiny default size:
2.34 -> 0.95 s.

Run::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_predictor.py --benchmark-enable -p no:cacheprovider \\
        --benchmark-columns=min,median,rounds --benchmark-group-by=group
"""
from __future__ import annotations

import dataclasses
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from bench_utils import full_size

pytestmark = pytest.mark.compat

FULL = full_size()
SHAPE = (100, 256, 256) if FULL else (24, 64, 64)
SPACING = (3.0, 0.8, 0.8)


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    from infer._models import body_image, make_model_folder, tiny_architecture, tiny_plans

    from nnfast.infer.model_zip import export_model

    root = tmp_path_factory.mktemp("bench_predictor")
    plans = tiny_plans(spacing=(1.0, 1.0, 3.0))
    conf = plans.configuration("3d_fullres")
    if FULL:
        arch = dataclasses.replace(tiny_architecture(3), features_per_stage=(8, 16, 32))
        conf = dataclasses.replace(conf, patch_size=(32, 64, 64), architecture=arch)
        plans = dataclasses.replace(plans, configurations={**plans.configurations, "3d_fullres": conf})
    make_model_folder(root / "res" / "Dataset999_TrainTest", plans, "3d_fullres")
    export_model(root / "res", 999, root / "m.zip")
    with zipfile.ZipFile(root / "m.zip") as zf:
        zf.extractall(root / "nn")
    folder = root / "nn" / "Dataset999_TrainTest" / "nnUNetTrainer__nnUNetPlans__3d_fullres"

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnfast.infer.api import Predictor

    ref = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), perform_everything_on_device=False,
                          allow_tqdm=False)
    ref.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    ours = Predictor(folder, device="cpu", use_tta=False)
    img = body_image(SHAPE, np.random.default_rng(0))[None]
    return {"nnunet": lambda: ref.predict_single_npy_array(img, {"spacing": list(SPACING)}),
            "nnfast": lambda: ours.predict_array(img, {"spacing": SPACING})}


def _measure(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


@pytest.mark.benchmark(group="infer-predict-array")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_predict_array(benchmark, impl, predictors):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictors[impl]()  # warm-up (JIT, allocator)
        peaks = []
        benchmark.pedantic(lambda: peaks.append(_measure(predictors[impl])[1]), rounds=2 if FULL else 1,
                           iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(peak_mib=round(max(peaks), 1), shape=list(SHAPE))


def test_predict_array_agrees_with_nnunet_on_benchmark_case(predictors):
    """Sanity check of the benchmark itself: the same labels except where nnU-Net's float16 accumulation flips a
    near-tie (bounded)."""
    a, b = predictors["nnunet"](), predictors["nnfast"]()
    assert a.shape == b.shape == SHAPE
    assert np.mean(a == b) > 0.999
