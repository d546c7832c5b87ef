"""Cropping, class-location sampling and fingerprint intensity summaries: nnU-Net v2.8.1 vs nnfast, one thread.

Inputs (sizes at ``NNFAST_BENCH_SCALE=1``; the default uses 0.15 of every axis so that CI runs in seconds with
``--benchmark-disable``):

* ``crop``: a CT-like (1, 100, 512, 512) volume, int16 HU and the same as float32 (nnU-Net's reader always
  yields float32): a body inside a circular field of view, exact zeros outside it and in the first/last five
  slices, water-like voxels of exactly 0 HU inside the body (holes to fill), and a label map (float32 for
  nnU-Net, as its reader returns; int16 for nnfast). nnU-Net's ``crop_to_nonzero`` writes into its ``seg``
  argument, so every round gets fresh copies (outside the timing).
* ``class_locations``: a resampled-size label map (1, 200, 420, 420) int8 with -1 outside the field of view, an
  organ (label 1, ~5e6 voxels), a tumour (2) and a small structure (3); classes [1, 2, 3].
* ``intensity``: one case's channel of the ``crop`` volume with its organ as foreground; nnU-Net's
  ``collect_foreground_intensities`` with the sample count of a 100-case dataset (1e8 // 100) against
  ``foreground_summary`` on float32 (same input) and on int16 (nnfast reads files in their own dtype).

Run::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_small_kernels.py --benchmark-enable \
        --benchmark-columns=min,median,rounds --benchmark-group-by=group
"""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import pytest

from nnfast.native.intensity import foreground_summary
from nnfast.preprocess.class_locations import sample_class_locations
from nnfast.preprocess.cropping import crop_to_nonzero


def _scale() -> float:
    return float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0) or 0.15


def _rounds() -> int:
    return 3 if _scale() >= 1 else 1


def _shape(full):
    return tuple(max(8, round(v * _scale())) for v in full)


@functools.lru_cache(maxsize=1)
def ct_case():
    """(image int16 (1, x, y, z), seg int16 (1, x, y, z)) with labels 0/1/2 inside the body."""
    shape = _shape((100, 512, 512))
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    fov = yy ** 2 + xx ** 2 < 0.95 ** 2
    body = (yy / 0.8) ** 2 + (xx / 0.6) ** 2 < 1
    organ = ((yy - 0.1) / 0.35) ** 2 + ((xx + 0.1) / 0.25) ** 2 + (zz / 0.7) ** 2 < 1
    tumour = ((yy - 0.15) / 0.08) ** 2 + ((xx + 0.05) / 0.08) ** 2 + (zz / 0.2) ** 2 < 1
    image = np.where(body, rng.normal(40, 20, shape), -1000 + rng.normal(0, 5, shape))
    image = np.where(organ, rng.normal(60, 15, shape), image)
    image[body & (rng.random(shape) < 0.01)] = 0  # water: exact zeros inside the body -> holes
    image = np.where(np.broadcast_to(fov, shape), image, 0)
    image[:5] = 0
    image[-5:] = 0
    image = np.round(image).astype(np.int16)
    seg = np.zeros(shape, np.int16)
    seg[np.broadcast_to(organ, shape)] = 1
    seg[np.broadcast_to(tumour, shape)] = 2
    return image[None], seg[None]


@functools.lru_cache(maxsize=1)
def resampled_seg():
    shape = _shape((200, 420, 420))
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    seg = np.zeros(shape, np.int8)
    seg[np.broadcast_to((yy / 0.5) ** 2 + (xx / 0.45) ** 2 + (zz / 0.8) ** 2 < 1, shape)] = 1
    seg[np.broadcast_to(((yy - 0.1) / 0.1) ** 2 + (xx / 0.1) ** 2 + (zz / 0.15) ** 2 < 1, shape)] = 2
    seg[np.broadcast_to(((yy + 0.3) / 0.04) ** 2 + ((xx - 0.2) / 0.04) ** 2 + (zz / 0.05) ** 2 < 1, shape)] = 3
    seg[np.broadcast_to(yy ** 2 + xx ** 2 > 0.97, shape)] = -1
    return seg[None]


# ----------------------------------------------------------------------------------------------- crop
def _nnunet_crop(data, seg):
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero as nn_crop

    return nn_crop(data, seg)


@pytest.mark.compat
@pytest.mark.parametrize("dtype", ["int16", "float32"])
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_crop_to_nonzero(benchmark, impl, dtype):
    benchmark.group = f"crop_to_nonzero-{dtype}"
    image, seg = ct_case()
    if dtype == "float32":
        image = image.astype(np.float32)
    seg_in = seg.astype(np.float32) if impl == "nnunet" else seg
    fn = _nnunet_crop if impl == "nnunet" else crop_to_nonzero

    def setup():
        return (image, seg_in.copy()), {}

    fn(*setup()[0])  # warm-up: imports, JIT cache
    out = benchmark.pedantic(fn, setup=setup, rounds=_rounds(), iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["voxels_per_s"] = round(image.size / benchmark.stats.stats.median)
    benchmark.extra_info["input_shape"] = list(image.shape)
    assert out[0].shape[1:] == out[1].shape[1:]


@pytest.mark.compat
def test_crop_outputs_agree():
    image, seg = ct_case()
    for img in (image, image.astype(np.float32)):
        d_ref, s_ref, b_ref = _nnunet_crop(img, seg.astype(np.float32))
        d, s, b = crop_to_nonzero(img, seg)
        assert b == b_ref
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(s, s_ref)


# ----------------------------------------------------------------------------------------------- class locations
def _nnunet_locations(seg, classes):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    return DefaultPreprocessor._sample_foreground_locations(seg, classes)


@pytest.mark.compat
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_class_locations(benchmark, impl):
    benchmark.group = "class_locations"
    seg = resampled_seg()
    fn = _nnunet_locations if impl == "nnunet" else sample_class_locations
    fn(seg, [1, 2, 3])
    out = benchmark.pedantic(fn, args=(seg, [1, 2, 3]), rounds=_rounds(), iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["voxels_per_s"] = round(seg.size / benchmark.stats.stats.median)
    benchmark.extra_info["input_shape"] = list(seg.shape)
    assert set(out) == {1, 2, 3}


@pytest.mark.compat
def test_class_locations_agree():
    seg = resampled_seg()
    ref = _nnunet_locations(seg, [1, 2, 3])
    got = sample_class_locations(seg, [1, 2, 3])
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])


# ----------------------------------------------------------------------------------------------- intensity
NUM_SAMPLES = int(1e8 // 100)  # nnU-Net's per-case draw count for a 100-case dataset


def _nnunet_intensities(seg, images):
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    return DatasetFingerprintExtractor.collect_foreground_intensities(seg, images, num_samples=NUM_SAMPLES)


@pytest.mark.compat
@pytest.mark.parametrize("impl", ["nnunet", "nnfast-float32", "nnfast-int16"])
def test_intensity_summary(benchmark, impl):
    benchmark.group = "intensity"
    image, seg = ct_case()
    fg = seg[0] > 0
    if impl == "nnunet":
        fn, args = _nnunet_intensities, (seg.astype(np.float32), image.astype(np.float32))
    elif impl == "nnfast-float32":
        fn, args = foreground_summary, (image[0].astype(np.float32), fg)
    else:
        fn, args = foreground_summary, (image[0], fg)
    fn(*args)
    benchmark.pedantic(fn, args=args, rounds=_rounds(), iterations=1)
    benchmark.extra_info["foreground_voxels"] = int(fg.sum())
    if benchmark.stats is not None:
        benchmark.extra_info["voxels_per_s"] = round(image.size / benchmark.stats.stats.median)


# ----------------------------------------------------------------------------------------------- morphology
MORPH_RADIUS = 5.5  # a ball of 12^3 (nnU-Net draws radii from U(1, 8))


@functools.lru_cache(maxsize=1)
def cascade_mask():
    """A previous-stage one-hot channel, (128, 128, 128) bool at full scale: an organ-sized ellipsoid, smooth blobs
    and speckles (~14 % foreground)."""
    import scipy.ndimage as ndi

    shape = _shape((128, 128, 128))
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    organ = ((zz + 0.2) / 0.5) ** 2 + (yy / 0.35) ** 2 + ((xx - 0.1) / 0.4) ** 2 < 1
    field = ndi.gaussian_filter(rng.random(shape, dtype=np.float32), max(1.0, shape[0] / 32))
    blobs = field > np.quantile(field, 0.9)
    return organ | blobs | (rng.random(shape) < 0.002)


def _bgv2_morphology(mask, op):
    """What ``ApplyRandomBinaryOperatorTransform`` does per channel: build the ball, run the FFT operator."""
    import torch
    from batchgeneratorsv2.transforms.nnunet import random_binary_operator as rbo
    from skimage.morphology import ball

    fn = getattr(rbo, f"binary_{op}_torch")
    return fn(torch.from_numpy(mask), torch.from_numpy(ball(MORPH_RADIUS, dtype=bool))).numpy()


def _nnfast_morphology(mask, op):
    from nnfast.native.morphology import binary_operation

    return binary_operation(mask, MORPH_RADIUS, op)


@contextlib.contextmanager
def _one_torch_thread():
    """One torch thread, as in a data-loading worker (and two spin badly on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.compat
@pytest.mark.parametrize("op", ["dilation", "closing"])
@pytest.mark.parametrize("impl", ["batchgeneratorsv2", "nnfast"])
def test_morphology(benchmark, impl, op):
    benchmark.group = f"morphology-{op}"
    mask = cascade_mask()
    fn = _bgv2_morphology if impl == "batchgeneratorsv2" else _nnfast_morphology
    with _one_torch_thread():
        fn(mask, op)  # warm-up: imports, JIT cache
        out = benchmark.pedantic(fn, args=(mask, op), rounds=5 if _scale() >= 1 else 1, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["voxels_per_s"] = round(mask.size / benchmark.stats.stats.median)
    benchmark.extra_info["input_shape"] = list(mask.shape)
    assert out.shape == mask.shape and out.dtype == bool


@pytest.mark.compat
def test_morphology_outputs_agree():
    mask = cascade_mask()
    with _one_torch_thread():
        for op in ("dilation", "erosion", "opening", "closing"):
            np.testing.assert_array_equal(_nnfast_morphology(mask, op), _bgv2_morphology(mask, op), err_msg=op)
