"""How much memory preprocessing workers need, and whether ``--workers N`` fits the machine.

A worker's peak while it preprocesses one case (measured on synthetic CT up to 300x512x512, see
``benchmarks/README.md``, "Memory of a preprocessing worker") is its imports (Python, NumPy, Numba's kernels,
SimpleITK, zarr: :data:`WORKER_BASE_BYTES`) plus the arrays alive while the image is resampled: the cropped label
map (int8), the resampled image (float32, every channel), the resampler's largest intermediate (float32, one
channel, at most the larger of the two grids) and, with several channels, the cropped inputs of the channels not yet
resampled (the last one is freed after its first pass: :func:`~nnfast.preprocess.resampling.resample_image_consuming`).
The store write streams chunk by chunk and adds little. :func:`case_peak_bytes` is that sum: measured 377 / 666 /
1181 MiB against 382 / 670 / 1286 estimated for the three cases of the benchmark table.

Shapes come from the fingerprint (shape after cropping per case) and the plans (target spacing), so the estimate
exists before any case is read; :func:`workers_warning` compares the ``workers`` largest cases with the memory
the machine has available (psutil's ``virtual_memory().available`` when installed, else ``MemAvailable`` of
``/proc/meminfo``).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

__all__ = ["WORKER_BASE_BYTES", "PARENT_BYTES", "case_peak_bytes", "available_memory_bytes", "max_workers_that_fit",
           "workers_warning", "dataset_peaks"]

log = logging.getLogger(__name__)

#: resident memory of a preprocessing worker before its first case (imports, compiled kernels: 269 MiB measured) plus
#: the transient buffers of reading a case
WORKER_BASE_BYTES = 300 * 2**20
#: the main process meanwhile (plans, the task list, the pool): ~350 MiB measured
PARENT_BYTES = 400 * 2**20


def case_peak_bytes(shape_after_crop: Sequence[int], new_shape: Sequence[int], channels: int = 1) -> int:
    """Estimated peak resident bytes of a worker preprocessing one case.

    Parameters
    ----------
    shape_after_crop : 3 ints, the case's spatial shape after cropping (any axis order)
    new_shape : 3 ints, its shape after resampling (same order)
    channels : image channels
    """
    n_in, n_out = math.prod(int(s) for s in shape_after_crop), math.prod(int(s) for s in new_shape)
    return WORKER_BASE_BYTES + n_in + 4 * (channels * n_out + max(n_in, n_out) + (channels - 1) * n_in)


def dataset_peaks(fingerprint, plans, config_name: str, case_ids: Sequence[str] | None = None) -> dict[str, int]:
    """:func:`case_peak_bytes` of every case of the fingerprint (or of ``case_ids``) for configuration ``config_name``
    (shapes after cropping transposed as the plans say, resampled to the configuration's spacing)."""
    from .resampling import compute_new_shape

    cfg = plans.configuration(config_name)
    tf = [int(a) for a in plans.transpose_forward]
    channels = len(cfg.normalization_schemes)
    wanted = None if case_ids is None else set(case_ids)
    out: dict[str, int] = {}
    for cid, spacing, shape in zip(fingerprint.case_ids, fingerprint.spacings, fingerprint.shapes_after_crop):
        if wanted is not None and cid not in wanted:
            continue
        sp = [float(spacing[a]) for a in tf]
        sh = [int(shape[a]) for a in tf]
        target = [float(s) for s in cfg.spacing]
        if len(target) < len(sh):  # 2D configurations keep the first axis
            target = [sp[0], *target]
        out[cid] = case_peak_bytes(sh, compute_new_shape(sh, sp, target), channels)
    return out


def available_memory_bytes() -> int | None:
    """Memory available to new processes (psutil when installed, else ``/proc/meminfo``); None when unknown."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:  # pragma: no cover - psutil cannot read this platform
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_workers_that_fit(peaks: Sequence[int], available: int) -> int:
    """The most workers whose largest cases, running together beside the main process, fit in ``available`` bytes
    (at least 1)."""
    total = PARENT_BYTES
    k = 0
    for p in sorted(peaks, reverse=True):
        if total + p > available:
            break
        total += p
        k += 1
    return max(1, k)


def workers_warning(peaks: Sequence[int], workers: int, available: int | None) -> str | None:
    """One line saying that ``workers`` workers may not fit in ``available`` bytes, or None when they do (or when the
    available memory is unknown)."""
    if available is None or not peaks or workers < 1:
        return None
    largest = sorted(peaks, reverse=True)[:workers]
    need = PARENT_BYTES + sum(largest)
    if need <= available:
        return None
    gib = 2.0**30
    fit = max_workers_that_fit(peaks, available)
    return (f"--workers {workers} may not fit in memory: the {len(largest)} largest case(s) need about "
            f"{need / gib:.1f} GiB together (up to {largest[0] / gib:.1f} GiB per worker) but {available / gib:.1f} "
            f"GiB is available; " + (f"use --workers {fit} or fewer" if fit < workers else
                                     "free memory or use a machine with more"))
