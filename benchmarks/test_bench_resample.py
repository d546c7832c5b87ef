"""Resampling: nnU-Net v2.8.1's ``resample_data_or_seg_to_shape`` vs nnfast's, single-threaded, same inputs.

Two cases, each for the image (order 3) and the label map (order 1, labels -1..2), one benchmark group per
pair so that the ratio is visible side by side:

* ``ct``: CT-like (1, 80, 281, 281) float32, spacing (1.0, 0.8, 0.8) -> (1.25, 1.0, 1.0): (64, 225, 225),
  not separate-z.
* ``aniso``: (1, 40, 256, 256), spacing (5.0, 0.8, 0.8) -> (4.0, 0.7, 0.7): (50, 293, 293); separate-z fires
  (ratio 6.25 > 3) on axis 0 and z changes too.

Those are the sizes at ``NNFAST_BENCH_SCALE=1``; the default (0) uses 0.15 of every axis so that CI runs in
seconds with ``--benchmark-disable``. Each benchmark's ``extra_info`` holds ``voxels_per_s`` (output voxels)
and ``peak_mib``: the peak of Python/NumPy allocations during one call, measured once with ``tracemalloc``
(inputs excluded; numba kernels allocate only per-axis tables and line buffers, which this does not see).
Run::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_resample.py --benchmark-enable \
        --benchmark-columns=min,median,rounds --benchmark-group-by=group [--benchmark-timer=time.process_time]

On a shared, oversubscribed machine time with ``--benchmark-timer=time.process_time`` (CPU time; both sides run on
one thread), wall time there mostly measures the scheduler. Measured at scale 1 on a 2-core machine at load ~8,
CPU-time medians of 3 rounds (nnU-Net -> nnfast, ratio; peak traced MiB nnU-Net -> nnfast):

==============  =====================  =====  ===============
case            seconds                ratio  peak MiB
==============  =====================  =====  ===============
ct data         1.470 -> 0.082         18.0x  233 -> 47
ct seg          1.072 -> 0.027         39.3x  168 -> 3
aniso data      0.646 -> 0.044         14.8x  292 -> 46
aniso seg       0.817 -> 0.028         28.7x  280 -> 4
==============  =====================  =====  ===============
"""
from __future__ import annotations

import os
import tracemalloc
import warnings

import numpy as np
import pytest

from nnfast.preprocess.resampling import compute_new_shape
from nnfast.preprocess.resampling import resample_data_or_seg_to_shape as nnfast_resample

CASES = {
    "ct": ((80, 281, 281), (1.0, 0.8, 0.8), (1.25, 1.0, 1.0)),
    "aniso": ((40, 256, 256), (5.0, 0.8, 0.8), (4.0, 0.7, 0.7)),
}


def bench_scale() -> float:
    return float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0)


def _scale() -> float:
    return bench_scale() or 0.15


def _case(name: str):
    """(data float32 (1, x, y, z), seg int8 (1, x, y, z), new_shape, current spacing, new spacing)."""
    from scipy.ndimage import zoom

    full, cur, new = CASES[name]
    shape = tuple(max(6, round(v * _scale())) for v in full)
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=tuple(max(2, s // 8) for s in shape))
    field = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)[: shape[0], : shape[1], : shape[2]]
    data = (field + 0.05 * rng.normal(size=shape)).astype(np.float32)[None]  # smooth, normalized-CT-like
    seg = np.zeros((1, *shape), np.int8)
    seg[0][field > 0.3] = 1
    seg[0][field > 0.8] = 2
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    outside = (yy - shape[1] / 2) ** 2 + (xx - shape[2] / 2) ** 2 > (0.48 * min(shape[1:])) ** 2
    seg[0][:, outside] = -1  # outside a circular field of view, as after cropping to nonzero
    data[0][:, outside] = 0.0
    return data, seg, tuple(int(s) for s in compute_new_shape(shape, cur, new)), cur, new


def _nnunet_resample(*args):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resample_data_or_seg_to_shape(*args)


def _peak_mib(fn, *args) -> float:
    tracemalloc.start()
    try:
        fn(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def _run(benchmark, impl: str, case: str, is_seg: bool):
    data, seg, new_shape, cur, new = _case(case)
    arr = seg if is_seg else data
    args = (arr, new_shape, cur, new, is_seg, 1 if is_seg else 3, 0, None)
    fn = nnfast_resample if impl == "nnfast" else _nnunet_resample
    fn(*args)  # warm-up: JIT cache load, imports
    benchmark.extra_info["input_shape"] = list(arr.shape)
    benchmark.extra_info["output_shape"] = list(new_shape)
    benchmark.extra_info["peak_mib"] = round(_peak_mib(fn, *args), 1)
    rounds = 3 if bench_scale() >= 1 else 1
    out = benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["voxels_per_s"] = round(np.prod(new_shape) / benchmark.stats.stats.median)
    assert out.shape == (1, *new_shape) and out.dtype == arr.dtype
    return out


@pytest.mark.compat
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_resample_data(benchmark, case, impl):
    benchmark.group = f"resample-{case}-data"
    _run(benchmark, impl, case, is_seg=False)


@pytest.mark.compat
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_resample_seg(benchmark, case, impl):
    benchmark.group = f"resample-{case}-seg"
    _run(benchmark, impl, case, is_seg=True)


@pytest.mark.compat
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_agree(case):
    """The benchmarked calls compute the same thing (labels identical, images within 1e-6 of the range)."""
    data, seg, new_shape, cur, new = _case(case)
    ours = nnfast_resample(seg, new_shape, cur, new, True, 1, 0, None)
    np.testing.assert_array_equal(ours, _nnunet_resample(seg, new_shape, cur, new, True, 1, 0, None))
    ours = nnfast_resample(data, new_shape, cur, new, False, 3, 0, None)
    ref = _nnunet_resample(data, new_shape, cur, new, False, 3, 0, None)
    assert np.max(np.abs(ours - ref)) <= 1e-6 * (data.max() - data.min())
