"""Inference: export of a many-class prediction to the original geometry, and sliding-window throughput; nnfast vs
nnU-Net v2.8.1 on the same inputs.

``export`` (group ``infer-export``): resample the logits back to the cropped original shape, argmax, revert the crop,
transpose back and write the NIfTI (nnU-Net: ``export_prediction_from_logits``; nnfast:
:func:`nnfast.infer.export.export_prediction`). 24 classes, anisotropic so that separate-z fires:

* scale 1: original cropped image (60, 384, 384) at (5.0, 0.78, 0.78) mm inside a (64, 400, 400) scan, logits
  (24, 100, 374, 374) float32 on the (3.0, 0.8, 0.8) mm grid (1.3 GB of logits, a TotalSegmentator-like
  abdomen with fewer classes);
* default (CI): every axis x 0.15.

``sliding_window`` (group ``infer-sliding-window``): whole-case logits without TTA, one CPU thread, a small
PlainConvUNet (features 8/16/32, patch (32, 64, 64) at scale 1; 4/8/8 and (16, 32, 32) by default) on a
(1, 64, 192, 192) case (default (1, 20, 40, 40)); nnU-Net's ``predict_sliding_window_return_logits`` (which
accumulates in float16 on the CPU) vs :func:`nnfast.infer.sliding_window.predict_sliding_window` (float32). Both
run the same network module, so only the tiling machinery differs.

``extra_info``: ``voxels_per_s`` (output voxels of the export; input voxels of the sliding window) and
``peak_mib``, the peak of Python/NumPy allocations during one call (``tracemalloc``, running during the timed call:
nnU-Net's export at scale 1 takes minutes, so it runs once; torch's CPU allocator is not traced, which favours
nnU-Net, whose export starts from a torch tensor).

Run::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_export.py --benchmark-enable -p no:cacheprovider \\
        --benchmark-columns=min,median,rounds --benchmark-group-by=group

Measured at scale 1 on the 2-core development machine (load 3-6, one round each, one thread each):

=====================  ==================  =====  ======================
case                   seconds             ratio  peak traced MiB
=====================  ==================  =====  ======================
export (24 classes)    92.7 -> 4.02        23.1x  5467 -> 377
sliding window         5.87 -> 5.75        1.0x   (network-bound; 0.40 -> 0.41 Mvoxel/s)
=====================  ==================  =====  ======================
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tracemalloc

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.compat

FULL = float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0) >= 1
SCALE = 1.0 if FULL else 0.15
N_CLASSES = 24
ORIG_SPACING = (5.0, 0.78, 0.78)
TARGET_SPACING = (3.0, 0.8, 0.8)


def _sz(v: int, lo: int = 4) -> int:
    return max(lo, round(v * SCALE))


def _plans(n_classes: int, spacing, patch, features):
    from infer._models import tiny_architecture, tiny_plans

    plans = tiny_plans()
    arch = dataclasses.replace(tiny_architecture(3), features_per_stage=tuple(features))
    conf = dataclasses.replace(plans.configuration("3d_fullres"), spacing=tuple(spacing), patch_size=tuple(patch),
                               architecture=arch)
    labels = {"background": 0, **{f"class{i}": i for i in range(1, n_classes)}}
    return dataclasses.replace(plans, labels=labels, transpose_forward=(0, 1, 2), transpose_backward=(0, 1, 2),
                               configurations={**plans.configurations, "3d_fullres": conf})


@pytest.fixture(scope="module")
def export_case():
    from nnfast.io.image import ImageGeometry
    from nnfast.preprocess.resampling import compute_new_shape

    scan = (_sz(64), _sz(400, 8), _sz(400, 8))
    crop = (_sz(60), _sz(384, 8), _sz(384, 8))
    lo = [(s - c) // 2 for s, c in zip(scan, crop)]
    bbox = [[a, a + c] for a, c in zip(lo, crop)]
    new = tuple(int(v) for v in compute_new_shape(crop, ORIG_SPACING, TARGET_SPACING))
    plans = _plans(N_CLASSES, TARGET_SPACING, (16, 32, 32), (4, 8, 8))
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn((1, N_CLASSES, *[max(2, s // 8) for s in new]), generator=g)
    logits = torch.nn.functional.interpolate(coarse, size=new, mode="trilinear")[0].mul_(5).numpy()
    sitk_spacing = tuple(reversed(ORIG_SPACING))
    geom = ImageGeometry(spacing=ORIG_SPACING, sitk_spacing=sitk_spacing, origin=(0.0, 0.0, 0.0),
                         direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), shape=scan)
    props = {"spacing_reader_order": list(ORIG_SPACING), "original_spacing": list(ORIG_SPACING),
             "target_spacing": list(TARGET_SPACING), "shape_before_cropping": list(scan),
             "bbox_used_for_cropping": bbox, "shape_after_cropping_and_before_resampling": list(crop),
             "shape_after_resampling": list(new), "transpose_forward": [0, 1, 2], "geometry": geom.to_json()}
    return plans, np.ascontiguousarray(logits, np.float32), props


def _measure(fn):
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2 ** 20


@pytest.mark.benchmark(group="infer-export")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_export(benchmark, impl, export_case, tmp_path):
    plans, logits, props = export_case
    out_voxels = int(np.prod(props["shape_before_cropping"]))
    if impl == "nnunet":
        from nnunetv2.inference.export_prediction import export_prediction_from_logits
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from infer._models import dataset_json
        from nnfast.plan.nnunet_compat import to_nnunet_plans

        dj = dataset_json(plans)
        pm = PlansManager(to_nnunet_plans(plans, dj))
        cm = pm.get_configuration("3d_fullres")
        geom = props["geometry"]
        nn_props = {**props, "spacing": props["spacing_reader_order"],
                    "sitk_stuff": {"spacing": geom["sitk_spacing"], "origin": geom["origin"],
                                   "direction": geom["direction"]}}

        def run():
            export_prediction_from_logits(torch.from_numpy(logits.copy()), copy.deepcopy(nn_props), cm, pm, dj,
                                          str(tmp_path / "nnunet"), num_threads_torch=1)
        out = tmp_path / "nnunet.nii.gz"
    else:
        from nnfast.infer.export import export_prediction

        out = tmp_path / "nnfast.nii.gz"

        def run():
            export_prediction(logits, props, plans, "3d_fullres", out, threads=1)

    if impl == "nnfast":
        run()  # Numba: compile or load the cached kernels
    peaks = []
    benchmark.pedantic(lambda: peaks.append(_measure(run)), rounds=1 if FULL else 2, iterations=1)
    assert out.is_file()
    benchmark.extra_info.update(peak_mib=round(max(peaks), 1), classes=N_CLASSES,
                                shape_out=props["shape_before_cropping"], logits_shape=list(logits.shape))
    if benchmark.stats is not None:
        benchmark.extra_info["voxels_per_s"] = out_voxels / benchmark.stats.stats.min


@pytest.mark.compat
def test_export_agrees_with_nnunet_on_benchmark_case(export_case, tmp_path):
    """The benchmarked outputs are the same segmentation (sanity check of the benchmark itself)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from infer._models import dataset_json
    from nnfast.infer.export import logits_to_segmentation
    from nnfast.plan.nnunet_compat import to_nnunet_plans

    plans, logits, props = export_case
    if FULL:
        pytest.skip("only at the CI size: nnU-Net's export of the full case is measured above")
    dj = dataset_json(plans)
    pm = PlansManager(to_nnunet_plans(plans, dj))
    ref = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.from_numpy(logits.copy()), pm, pm.get_configuration("3d_fullres"), pm.get_label_manager(dj),
        {**copy.deepcopy(props), "spacing": props["spacing_reader_order"]}, num_threads_torch=1)
    seg, _ = logits_to_segmentation(logits, props, plans, "3d_fullres", threads=2)
    assert np.mean(seg == ref) > 0.9999


@pytest.fixture(scope="module")
def window_case():
    from nnfast.network import build_network

    if FULL:
        patch, feats, shape = (32, 64, 64), (8, 16, 32), (64, 192, 192)
    else:
        patch, feats, shape = (16, 32, 32), (4, 8, 8), (20, 40, 40)
    plans = _plans(3, (1.0, 1.0, 1.0), patch, feats)
    torch.manual_seed(0)
    net = build_network(plans, "3d_fullres", 1, 3, deep_supervision=False).eval()
    data = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    return plans, net, data, patch


@pytest.mark.benchmark(group="infer-sliding-window")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_sliding_window(benchmark, impl, window_case):
    plans, net, data, patch = window_case
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if impl == "nnunet":
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            from infer._models import dataset_json
            from nnfast.plan.nnunet_compat import to_nnunet_plans

            dj = dataset_json(plans)
            pm = PlansManager(to_nnunet_plans(plans, dj))
            pred = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"),
                                   perform_everything_on_device=False, allow_tqdm=False)
            pred.manual_initialization(net, pm, pm.get_configuration("3d_fullres"), [net.state_dict()], dj,
                                       "nnUNetTrainer", None)
            x = torch.from_numpy(data)

            def run():
                return pred.predict_sliding_window_return_logits(x)
        else:
            from nnfast.infer.sliding_window import predict_sliding_window

            def run():
                return predict_sliding_window(net, data, patch, 3, mirror_axes=None, device="cpu")

        run()
        benchmark.pedantic(run, rounds=1 if FULL else 2, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(shape=list(data.shape), patch=list(patch))
    if benchmark.stats is not None:
        benchmark.extra_info["voxels_per_s"] = int(np.prod(data.shape[1:])) / benchmark.stats.stats.min
