"""Both cores on one case (issue 13, goal 4): each slab-threaded kernel with 1 and 2 threads, and nnU-Net's function
where one exists, on one CT-like case.

The case at ``NNFAST_BENCH_SCALE=1``: a (1, 80, 281, 281) float32 image and int16 labels, resampled to
(64, 225, 225) (not separate-z) and, for separate-z, a (1, 40, 256, 256) image to (50, 293, 293). The default
scale (CI, ``--benchmark-disable``) uses 0.15 of every axis.

Threads are set with :class:`nnfast.native._jit.slab_threads` (what a process with its cores to itself gets from
``kernel_threads``). ``python benchmarks/test_bench_slabs.py [rounds]`` times every kernel interleaved (1 thread,
2 threads, nnU-Net, round after round) and prints the table of ``benchmarks/README.md``.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import pytest

from bench_utils import bench_scale


def _shape(full):
    s = max(bench_scale(), 0.15) if bench_scale() < 1 else 1.0
    return tuple(max(4, int(round(n * s))) for n in full)


def _case():
    rng = np.random.default_rng(0)
    shape = _shape((80, 281, 281))
    img = (rng.normal(40, 300, (1, *shape))).astype(np.float32)
    img[:, :, : shape[1] // 8] = 0
    seg = np.zeros((1, *shape), np.int16)
    seg[:, 5:-5, shape[1] // 4:-10, 20:-20] = 1
    seg[:, 10:20, shape[1] // 2:shape[1] // 2 + 30, 40:80] = 2
    aniso = (rng.normal(40, 300, (1, *_shape((40, 256, 256))))).astype(np.float32)
    return img, seg, aniso


def kernels():
    """{name: (nnfast callable, nnU-Net callable or None)} on one case."""
    from nnfast.native.class_locations import count_labels
    from nnfast.native.crop import label_outside_mask, nonzero_mask_and_bbox
    from nnfast.native.normalize import ct_normalize, zscore_normalize
    from nnfast.native.resample import resize_image, resize_image_separate_z
    from nnfast.native.resample_seg import resize_labels

    img, seg, aniso = _case()
    target = _shape((64, 225, 225))
    target_aniso = _shape((50, 293, 293))
    mask = seg[0] >= 0
    nz, _ = nonzero_mask_and_bbox(img)

    def nn_resample(data, shape, is_seg, sep):
        from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

        cur = (5.0, 0.8, 0.8) if sep else (1.0, 0.8, 0.8)
        new = (4.0, 0.7, 0.7) if sep else (1.25, 1.0, 1.0)
        return resample_data_or_seg_to_shape(data, shape, cur, new, is_seg=is_seg, order=1 if is_seg else 3,
                                             order_z=0, force_separate_z=None)

    def nn_ct():
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

        n = CTNormalization(use_mask_for_norm=False, intensityproperties={
            "mean": 40.0, "std": 120.0, "percentile_00_5": -50.0, "percentile_99_5": 300.0})
        return n.run(img[0].copy(), None)

    def nn_crop():
        from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

        return crop_to_nonzero(img.copy(), seg.copy())

    return {
        "ct_normalize": (lambda: ct_normalize(img[0], -50.0, 300.0, 40.0, 120.0), nn_ct),
        "zscore_normalize (masked)": (lambda: zscore_normalize(img[0], mask), None),
        "resize_image (order 3)": (lambda: resize_image(img, target), lambda: nn_resample(img, target, False, False)),
        "resize_image_separate_z": (lambda: resize_image_separate_z(aniso, target_aniso, axis=0),
                                    lambda: nn_resample(aniso, target_aniso, False, True)),
        "resize_labels (order 1)": (lambda: resize_labels(seg, target), lambda: nn_resample(seg, target, True, False)),
        "nonzero_mask_and_bbox": (lambda: nonzero_mask_and_bbox(img), nn_crop),
        "label_outside_mask": (lambda: label_outside_mask(seg, nz), None),
        "count_labels": (lambda: count_labels(seg, [1, 2, -1]), None),
    }


_KERNELS = None


def _get():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = kernels()
    return _KERNELS


NAMES = ["ct_normalize", "zscore_normalize (masked)", "resize_image (order 3)", "resize_image_separate_z",
         "resize_labels (order 1)", "nonzero_mask_and_bbox", "label_outside_mask", "count_labels"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_slab_kernel(benchmark, name, threads):
    from nnfast.native._jit import slab_threads

    ours, _ = _get()[name]
    benchmark.group = f"slabs {name}"
    with slab_threads(threads):
        ours()  # compile / load outside the timing
        benchmark.pedantic(ours, rounds=1 if benchmark.disabled else 5, iterations=1)


@pytest.mark.compat
@pytest.mark.parametrize("name", [n for n in NAMES if n in ("ct_normalize", "resize_image (order 3)",
                                                            "resize_image_separate_z", "resize_labels (order 1)",
                                                            "nonzero_mask_and_bbox")])
def test_slab_kernel_nnunet(benchmark, name):
    _, theirs = _get()[name]
    benchmark.group = f"slabs {name}"
    benchmark.pedantic(theirs, rounds=1 if benchmark.disabled else 3, iterations=1)


def _interleaved(rounds: int) -> None:
    from nnfast.native._jit import slab_threads

    ks = _get()
    rows = []
    for name in NAMES:
        ours, theirs = ks[name]
        with slab_threads(1):
            ours()
        t: dict[str, list[float]] = {"1": [], "2": [], "nnunet": []}
        for _ in range(rounds):
            for key in ("1", "2", "nnunet"):
                if key == "nnunet" and theirs is None:
                    continue
                with slab_threads(int(key) if key != "nnunet" else 1):
                    t0 = time.perf_counter()
                    (ours if key != "nnunet" else theirs)()
                    t[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in t.items() if v}
        rows.append((name, med))
        nn = f"{med['nnunet']:.3f}" if "nnunet" in med else "-"
        print(f"| {name} | {med['1']:.3f} | {med['2']:.3f} | {med['1'] / med['2']:.2f}x | {nn} |", flush=True)


if __name__ == "__main__":
    _interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
