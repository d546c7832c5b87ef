"""Preprocessing of one case, in nnU-Net v2's order (``DefaultPreprocessor.run_case_npy``):

read -> transpose -> crop to the nonzero region -> normalize -> resample (data order 3, labels one-hot linear; separate-z
when anisotropic) -> class locations -> int8/int16 labels -> zarr case store (written under a temporary name, renamed when
complete).

Axis order: arrays are ``(c, x, y, z)`` after transposition (the plan's ``transpose_forward``: low-resolution axis first),
spacings in the same order, mm.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.dataset import CaseFiles
from ..io.image import read_images, read_label
from ..labels import LabelManager
from .cropping import crop_to_nonzero
from .normalization import normalize
from .resampling import compute_new_shape, resample_data_or_seg_to_shape, resample_image_consuming

__all__ = [
    "PREPROCESS_VERSION",
    "CaseTask",
    "CaseResult",
    "preprocess_arrays",
    "preprocess_case",
    "run_case_task",
    "configuration_hash",
    "case_hash",
    "dir_size",
]

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1


def configuration_hash(plans, config_name: str) -> str:
    """A hash of everything in the plans that changes a preprocessed case of ``config_name``."""
    cfg = plans.configuration(config_name)
    relevant = {
        "version": PREPROCESS_VERSION,
        "transpose_forward": list(plans.transpose_forward),
        "spacing": [float(s) for s in cfg.spacing],
        "normalization_schemes": list(cfg.normalization_schemes),
        "use_mask_for_norm": [bool(x) for x in cfg.use_mask_for_norm],
        "intensity": [st.to_json() for st in plans.foreground_intensity_properties_per_channel]
        if "CTNormalization" in cfg.normalization_schemes else None,
        "labels": plans.labels,
        "patch_size": [int(p) for p in cfg.patch_size],  # decides the store's chunk layout
        "resampling": _resampling_kwargs(cfg),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def case_hash(config_hash: str, case: CaseFiles) -> str:
    """``config_hash`` combined with the case's input files (name, size, mtime): a changed input redoes the case."""
    h = hashlib.sha256(config_hash.encode())
    for p in (*case.image_files, case.label_file):
        if p is None:
            continue
        st = Path(p).stat()
        h.update(f"{Path(p).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _resampling_kwargs(cfg) -> dict:
    """The configuration's resampling settings for images and label maps (nnU-Net: order 3 / order 1, order_z 0)."""
    return {"data": cfg.resampling_data.to_json(), "seg": cfg.resampling_seg.to_json()}


def preprocess_arrays(
    data: np.ndarray,
    seg: np.ndarray | None,
    spacing: tuple[float, ...],
    plans,
    config_name: str,
    case_id: str = "",
    *,
    with_class_locations: bool = True,
    with_seg: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, dict, dict]:
    """Preprocess one case held in memory.

    Parameters
    ----------
    data : (c, z, y, x) array in reader order (any real dtype)
    seg : (1, z, y, x) integer label map in reader order, or None (test cases)
    spacing : reader-order spacing in mm
    with_class_locations : sample class locations (training needs them, inference does not)
    with_seg : resample the label map (False: ``seg`` is returned as None, saving a resampling of the ``-1``-outside
        mask that prediction without a previous stage never reads)

    Returns
    -------
    data : float32 (c, x, y, z) after transpose/crop/normalize/resample
    seg : int8 or int16 (1, x, y, z), -1 outside the nonzero region; None with ``with_seg=False``
    properties : JSON-able dict (shapes, bbox, spacings)
    class_locations : {key: int64 (n, 4) array}; key is a label int or a tuple of labels
    """
    return _preprocess_owned([data, seg], spacing, plans, config_name, case_id,
                             with_class_locations=with_class_locations, with_seg=with_seg)


def _preprocess_owned(arrays: list, spacing, plans, config_name: str, case_id: str = "", *,
                      with_class_locations: bool = True,
                      with_seg: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict, dict]:
    """:func:`preprocess_arrays` on ``arrays = [data, seg]``, emptied here: when the caller holds no other reference,
    every intermediate (the arrays read, the uncropped arrays, the resampling inputs) is freed as soon as the next one
    exists, which is what bounds a worker's peak memory on large cases."""
    data, seg = arrays
    arrays.clear()
    cfg = plans.configuration(config_name)
    tf = [int(a) for a in plans.transpose_forward]
    where = f"case {case_id}" if case_id else "case"
    data = np.ascontiguousarray(data.transpose([0, *[a + 1 for a in tf]]))
    if seg is not None:
        seg = np.ascontiguousarray(seg.transpose([0, *[a + 1 for a in tf]]))
        if seg.dtype != np.int8 and seg.size and -128 <= seg.min() and seg.max() <= 127:
            seg = seg.astype(np.int8)  # resampled and stored as int8 anyway: half the memory of int16 on the way
    original_spacing = [float(spacing[a]) for a in tf]
    shape_before = tuple(int(s) for s in data.shape[1:])
    data, seg, bbox = crop_to_nonzero(data, seg)
    shape_after_crop = tuple(int(s) for s in data.shape[1:])
    target_spacing = [float(s) for s in cfg.spacing]
    if len(target_spacing) < len(shape_after_crop):
        target_spacing = [original_spacing[0]] + target_spacing
    new_shape = tuple(int(s) for s in compute_new_shape(shape_after_crop, original_spacing, target_spacing))

    data = normalize(np.ascontiguousarray(data, dtype=np.float32), seg, cfg.normalization_schemes, cfg.use_mask_for_norm,
                     plans.foreground_intensity_properties_per_channel, where=where)
    rk = _resampling_kwargs(cfg)
    holder = [data]
    del data  # resample_image_consuming frees the input once its first pass has run
    data = resample_image_consuming(holder, new_shape, original_spacing, target_spacing, **rk["data"])
    data = np.ascontiguousarray(data, dtype=np.float32)  # before the label map is resampled: one image alive
    class_locations: dict = {}
    if with_seg or with_class_locations:
        seg = resample_data_or_seg_to_shape(seg, new_shape, original_spacing, target_spacing, is_seg=True,
                                            **rk["seg"])
        if with_class_locations:
            from .class_locations import sample_class_locations

            class_locations = sample_class_locations(seg, LabelManager.from_plans(plans).class_location_keys)
        seg = seg.astype(np.int16 if seg.size and seg.max() > 127 else np.int8, copy=False)
    else:
        seg = None
    properties = {
        "spacing_reader_order": [float(s) for s in spacing],
        "original_spacing": original_spacing,
        "target_spacing": target_spacing,
        "shape_before_cropping": list(shape_before),
        "bbox_used_for_cropping": [[int(a), int(b)] for a, b in bbox],
        "shape_after_cropping_and_before_resampling": list(shape_after_crop),
        "shape_after_resampling": list(new_shape),
        "transpose_forward": tf,
    }
    return data, seg, properties, class_locations


def preprocess_case(case: CaseFiles, plans, config_name: str) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Read and preprocess one case from its files (see :func:`preprocess_arrays`).

    Integer images are read in their own dtype and made float32 after cropping (the values and the nonzero mask are
    those of nnU-Net's float32 read; a full-size float32 copy less); float images are read as float32."""
    data, geom = read_images(case.image_files, dtype=None)
    if data.dtype.kind not in "iu":
        data = data.astype(np.float32, copy=False)
    seg = None
    if case.label_file is not None:
        seg, seg_geom = read_label(case.label_file)
        if seg.shape[1:] != data.shape[1:]:
            from ..errors import GeometryError

            raise GeometryError(
                f"case {case.case_id}: label file `{case.label_file}` has shape {seg.shape[1:]} but the image has "
                f"{data.shape[1:]}; run `nnfast verify` for a full report"
            )
    arrays = [data, seg]
    del data, seg  # _preprocess_owned holds the only references
    data, seg, props, locs = _preprocess_owned(arrays, geom.spacing, plans, config_name, case.case_id)
    props["case_id"] = case.case_id
    props["geometry"] = geom.to_json()
    props["image_files"] = [str(p) for p in case.image_files]
    props["label_file"] = str(case.label_file) if case.label_file else None
    return data, seg, props, locs


@dataclass(frozen=True)
class CaseTask:
    """One unit of work for a worker: preprocess ``case`` for ``config_name`` into ``out_path``."""

    case: CaseFiles
    plans_file: str
    config_name: str
    out_path: str
    case_hash: str


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    shape: tuple[int, ...]
    voxels_in: int
    voxels_out: int
    bytes_on_disk: int


@functools.lru_cache(maxsize=4)
def _load_plans_cached(path: str, mtime_ns: int):
    from ..plan.planner import load_plans

    return load_plans(Path(path))


def run_case_task(task: CaseTask) -> CaseResult:
    """Worker entry point: preprocess one case and write its store atomically."""
    from ..io.store import write_case

    plans = _load_plans_cached(task.plans_file, os.stat(task.plans_file).st_mtime_ns)
    data, seg, props, locs = preprocess_case(task.case, plans, task.config_name)
    cfg = plans.configuration(task.config_name)
    voxels_in = int(np.prod(props["shape_before_cropping"]))
    write_case(Path(task.out_path), data, seg, locs, props, task.case_hash, tuple(cfg.patch_size))
    return CaseResult(task.case.case_id, tuple(data.shape), voxels_in, int(np.prod(data.shape[1:])), dir_size(task.out_path))


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of all files below ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
