"""How much memory preprocessing workers need, and whether ``--workers N`` fits the machine.

A worker preprocesses a training case in phases (:func:`~nnfast.preprocess.pipeline.preprocess_case_to_store`), and its
peak is its imports (Python, NumPy, Numba's kernels, SimpleITK, zarr: :data:`WORKER_BASE_BYTES`) plus the largest of:

* reading: the image as read (int16 for CT) and the label file being read (SimpleITK's buffer and its copy);
* the label map: the image (still int16), the cropped label map (int8) and the resampled one, then the resampled one
  and the class-location draw (nnU-Net's ``RandomState.choice`` permutes every foreground voxel index: 8 bytes each,
  counted as 10 % of the voxels);
* the image: every resampling pass gives back the pages of its input as it reads them and the last pass goes box by
  box into the store, so each pass holds about the larger of its input and its output (float32; the last pass only its
  input) plus :data:`STREAM_BYTES`, beside the channels not yet resampled. The separate-z path (anisotropic cases)
  holds its input, output and in-plane result whole, as before.

:func:`case_peak_bytes` is that sum: measured vs estimated in ``benchmarks/README.md`` ("Issue 13 goals 2–3"), within
~10 %.

Shapes come from the fingerprint (shape after cropping per case) and the plans (target spacing), so the estimate
exists before any case is read; :func:`workers_warning` compares the ``workers`` largest cases with the memory
the machine has available (psutil's ``virtual_memory().available`` when installed, else ``MemAvailable`` of
``/proc/meminfo``).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

__all__ = ["WORKER_BASE_BYTES", "STREAM_BYTES", "PARENT_BYTES", "case_peak_bytes", "available_memory_bytes", "max_workers_that_fit",
           "workers_warning", "dataset_peaks"]

log = logging.getLogger(__name__)

#: resident memory of a preprocessing worker before its first case (imports, compiled kernels: 269 MiB measured) plus
#: the transient buffers of reading a case
WORKER_BASE_BYTES = 280 * 2**20
#: the streamed last resampling pass: its boxes (the first ones held until the shuffle trial's sample is complete) and
#: the copy of a box's input
STREAM_BYTES = 40 * 2**20
#: the main process meanwhile (plans, the task list, the pool): ~350 MiB measured
PARENT_BYTES = 400 * 2**20


def case_peak_bytes(shape_after_crop: Sequence[int], new_shape: Sequence[int], channels: int = 1, *,
                    separate_z: bool = False) -> int:
    """Estimated peak resident bytes of a worker preprocessing one case (see the module docstring).

    Parameters
    ----------
    shape_after_crop : 3 ints, the case's spatial shape after cropping, nnU-Net's axis order (x, y, z)
    new_shape : 3 ints, its shape after resampling (same order)
    channels : image channels
    separate_z : the case is resampled on nnU-Net's separate-z path (anisotropic spacing)
    """
    from nnfast.native.resample import _pass_order

    shape_in = [int(s) for s in shape_after_crop]
    shape_out = [int(s) for s in new_shape]
    n_in, n_out = math.prod(shape_in), math.prod(shape_out)
    reading = 2 * channels * n_in + 2 * n_in
    labels = 2 * channels * n_in + max(n_in + n_out, n_out + 8 * n_out // 10)
    if separate_z:
        image = 4 * (channels * n_in + n_out + max(n_in, n_out))
    else:
        sizes = [n_in]  # voxels of every pass's input, then the output
        cur = list(shape_in)
        for axis in _pass_order(shape_in, shape_out, (0, 1, 2)):
            cur[axis] = shape_out[axis]
            sizes.append(math.prod(cur))
        held = max(max(a, b) for a, b in zip(sizes[:-1], sizes[1:-1] + [0])) if len(sizes) > 1 else n_in
        image = 4 * (held + (channels - 1) * n_in) + STREAM_BYTES
    return WORKER_BASE_BYTES + max(reading, labels, image)


def dataset_peaks(fingerprint, plans, config_name: str, case_ids: Sequence[str] | None = None) -> dict[str, int]:
    """:func:`case_peak_bytes` of every case of the fingerprint (or of ``case_ids``) for configuration ``config_name``
    (shapes after cropping transposed as the plans say, resampled to the configuration's spacing)."""
    from .resampling import compute_new_shape, determine_do_sep_z_and_axis

    cfg = plans.configuration(config_name)
    force = cfg.resampling_data.force_separate_z
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
        separate_z = determine_do_sep_z_and_axis(force, sp, target)[0]
        out[cid] = case_peak_bytes(sh, compute_new_shape(sh, sp, target), channels, separate_z=separate_z)
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
