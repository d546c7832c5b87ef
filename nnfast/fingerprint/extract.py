"""Dataset fingerprint extraction (nnU-Net v2's ``DatasetFingerprintExtractor``, without its 1e8-sample buffer).

Per case: read the channels and the label map, crop to the nonzero region (holes filled), record spacing, shape after crop
and the relative size after cropping, and summarize each channel's foreground intensities (``seg > 0`` inside the crop) as
exact moments plus a fixed-size quantile sketch. The dataset statistics weight every non-empty case equally, as nnU-Net's
``1e8 // n_cases`` samples per case do, but from a few KiB per case instead of 400 MB of samples.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..io.dataset import CaseFiles, DatasetInfo
from ..io.decoded_cache import DecodedCache
from ..io.image import read_images, read_label
from .schema import Fingerprint, IntensityStats

__all__ = ["CaseFingerprint", "analyze_case", "analyze_arrays", "extract_fingerprint", "source_signature", "SKETCH_SIZE"]

log = logging.getLogger(__name__)

SKETCH_SIZE = 4096


@dataclass(frozen=True)
class CaseFingerprint:
    """What one case contributes to the fingerprint."""

    case_id: str
    spacing: tuple[float, ...]
    shape_after_crop: tuple[int, ...]
    relative_size_after_cropping: float
    summaries: tuple  # one native.intensity summary per channel


def analyze_case(case: CaseFiles, sketch_size: int = SKETCH_SIZE, decoded: DecodedCache | None = None) -> CaseFingerprint:
    """Fingerprint one case (runs on worker threads, or dask workers; reads each file once). ``decoded``: a
    :class:`~nnfast.io.decoded_cache.DecodedCache` in which the arrays read are left for a later step."""
    signature = DecodedCache.sign(decoded, (*case.image_files, case.label_file))  # before reading
    data, geom = read_images(case.image_files, dtype=None)
    seg, _ = read_label(case.label_file)
    result = analyze_arrays(case.case_id, data, seg, geom.spacing, sketch_size)
    if decoded is not None:
        decoded.keep(case.case_id, signature, [data], geom, seg)
    return result


def analyze_arrays(case_id: str, data: np.ndarray, seg: np.ndarray, spacing: Sequence[float],
                   sketch_size: int = SKETCH_SIZE) -> CaseFingerprint:
    """Fingerprint one case already in memory: ``data`` ``(c, z, y, x)`` as :func:`~nnfast.io.image.read_images`
    with ``dtype=None`` returns it, ``seg`` ``(1, z, y, x)`` as :func:`~nnfast.io.image.read_label` does, ``spacing``
    in the same (reader) order, mm. Verification calls it on the arrays it has read (one read per file)."""
    from nnfast.native.intensity import foreground_summary

    from ..preprocess.cropping import crop_to_nonzero

    shape_before = data.shape[1:]
    data_c, seg_c, _bbox = crop_to_nonzero(data, seg)
    del data, seg
    fg = seg_c[0] > 0
    summaries = tuple(foreground_summary(data_c[c], fg, sketch_size) for c in range(data_c.shape[0]))
    shape_after = tuple(int(s) for s in data_c.shape[1:])
    return CaseFingerprint(
        case_id=case_id,
        spacing=tuple(float(s) for s in spacing),
        shape_after_crop=shape_after,
        relative_size_after_cropping=float(np.prod(shape_after) / np.prod(shape_before)),
        summaries=summaries,
    )


def extract_fingerprint(
    info: DatasetInfo,
    cases: Sequence[CaseFiles],
    *,
    workers: int = 1,
    scheduler=None,
    progress: Callable[[int, int, str], None] | None = None,
    precomputed: Mapping[str, CaseFingerprint] | None = None,
    decoded=None,
) -> Fingerprint:
    """Fingerprint a dataset.

    Parameters
    ----------
    info, cases : the dataset (see :func:`nnfast.io.dataset.load_dataset`)
    workers : threads of this process; ``scheduler`` runs the same per-case tasks on dask.distributed instead.
    precomputed : case id -> :class:`CaseFingerprint` already made from the same files (verification makes them
        while it reads each file, :func:`nnfast.verify.verify_dataset` with ``fingerprint=True``); only the other
        cases are read.
    decoded : a :class:`~nnfast.io.decoded_cache.DecodedCache` that keeps the arrays of the cases read here (threads
        only).

    Returns
    -------
    Fingerprint with spacings and shapes in reader order (z, y, x), as nnU-Net.
    """
    from nnfast.native.intensity import mixture_statistics

    from ..parallel import run_in_threads, run_tasks

    done = dict(precomputed or {})
    todo = [c for c in cases if c.case_id not in done]
    if todo:
        from ..native._jit import share_background

        share_background(("crop",))  # a cold `preprocess` compiles crop in the background: load it, not twice
    if todo and scheduler is None:
        # a case is cheap and every heavy step releases the GIL: threads beat worker processes here
        analyze = analyze_case if decoded is None else functools.partial(analyze_case, decoded=decoded)
        new = run_in_threads(analyze, todo, workers=workers, keys=[c.case_id for c in todo], progress=progress)
    elif todo:
        new = run_tasks(analyze_case, todo, workers=workers, keys=[c.case_id for c in todo],
                        sizes=[_file_size(c) for c in todo], scheduler=scheduler, progress=progress,
                        desc="fingerprint", warmup=False)  # the workers compile the files' dtypes on first use:
        # a warm-up here would compile every kernel of nnfast in this process (~100 s cold) for a few signatures
    else:
        new = []
    done.update((r.case_id, r) for r in new)
    results = [done[c.case_id] for c in cases]
    stats = []
    for ch in range(info.num_channels):
        m = mixture_statistics([r.summaries[ch] for r in results])
        stats.append(IntensityStats(**{k: float(m[k]) for k in (
            "mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")}))
    return Fingerprint(
        case_ids=tuple(r.case_id for r in results),
        spacings=tuple(r.spacing for r in results),
        shapes_after_crop=tuple(r.shape_after_crop for r in results),
        foreground_intensity_properties_per_channel=tuple(stats),
        median_relative_size_after_cropping=float(np.median([r.relative_size_after_cropping for r in results])),
    )


def _file_size(case: CaseFiles) -> int:
    try:
        return sum(os.path.getsize(p) for p in case.image_files)
    except OSError:
        return 0


def source_signature(info: DatasetInfo, cases: Sequence[CaseFiles]) -> str:
    """A hash of what the fingerprint depends on: dataset.json and every input file's name, size and mtime.

    Used to tell whether a stored fingerprint (and the plans made from it) is stale.
    """
    h = hashlib.sha256()
    h.update(repr(sorted(info.raw.items(), key=lambda kv: kv[0])).encode())
    for c in cases:
        for p in (*c.image_files, c.label_file):
            if p is None:
                continue
            try:
                st = Path(p).stat()
                h.update(f"{Path(p).name}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{Path(p).name}:missing".encode())
    return h.hexdigest()[:16]
