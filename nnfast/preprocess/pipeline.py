"""Preprocessing of one case, in nnU-Net v2's order (``DefaultPreprocessor.run_case_npy``):

read -> transpose -> crop to the nonzero region -> normalize -> resample (data order 3, labels one-hot linear; separate-z
when anisotropic) -> class locations -> int8/int16 labels -> zarr case store (written under a temporary name, renamed when
complete).

A preprocessing worker does the same steps in another order to hold less memory
(:func:`preprocess_case_to_store`: label map first, the image's resampling streamed into the store); the stored
arrays are the same bit for bit.

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
from ..io.image import ImageGeometry, label_array, read_images, read_label, stack_channels
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
    "preprocess_case_to_store",
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
    data, seg, properties, geo = _prepare(arrays, spacing, plans, config_name)
    cfg = plans.configuration(config_name)
    where = f"case {case_id}" if case_id else "case"
    data = normalize(np.ascontiguousarray(data, dtype=np.float32), seg, cfg.normalization_schemes, cfg.use_mask_for_norm,
                     plans.foreground_intensity_properties_per_channel, where=where)
    rk = _resampling_kwargs(cfg)
    holder = [data]
    del data  # resample_image_consuming frees the input once its first pass has run
    data = resample_image_consuming(holder, geo["new_shape"], geo["original_spacing"], geo["target_spacing"],
                                    **rk["data"])
    data = np.ascontiguousarray(data, dtype=np.float32)  # before the label map is resampled: one image alive
    class_locations: dict = {}
    if with_seg or with_class_locations:
        holder = [seg]
        del seg
        seg, class_locations = _resample_seg(holder, plans, cfg, geo, with_class_locations)
    else:
        seg = None
    return data, seg, properties, class_locations


def _prepare(arrays: list, spacing, plans, config_name: str) -> tuple[np.ndarray, np.ndarray | None, dict, dict]:
    """Transpose and crop ``arrays = [data, seg]`` (emptied here; int8 label maps where the values fit): the cropped
    ``data`` and ``seg``, the case's properties and its geometry (``original_spacing``, ``target_spacing``,
    ``new_shape``)."""
    data, seg = arrays
    arrays.clear()
    cfg = plans.configuration(config_name)
    tf = [int(a) for a in plans.transpose_forward]
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
    geo = {"original_spacing": original_spacing, "target_spacing": target_spacing, "new_shape": new_shape}
    return data, seg, properties, geo


def _resample_seg(holder: list, plans, cfg, geo: dict, with_class_locations: bool) -> tuple[np.ndarray, dict]:
    """The cropped label map ``holder.pop()`` resampled (int8, or int16 when the labels need it) and its class
    locations; the cropped map is dropped before the class locations are sampled."""
    seg = holder.pop()
    seg = resample_data_or_seg_to_shape(seg, geo["new_shape"], geo["original_spacing"], geo["target_spacing"],
                                        is_seg=True, **_resampling_kwargs(cfg)["seg"])
    class_locations: dict = {}
    if with_class_locations:
        from .class_locations import sample_class_locations

        class_locations = sample_class_locations(seg, LabelManager.from_plans(plans).class_location_keys)
    seg = seg.astype(np.int16 if seg.size and seg.max() > 127 else np.int8, copy=False)
    return seg, class_locations


def _check_label_shape(case: CaseFiles, data: np.ndarray, seg: np.ndarray) -> None:
    if seg.shape[1:] != data.shape[1:]:
        from ..errors import GeometryError

        raise GeometryError(
            f"case {case.case_id}: label file `{case.label_file}` has shape {seg.shape[1:]} but the image has "
            f"{data.shape[1:]}; run `nnfast verify` for a full report"
        )


def _add_case_properties(props: dict, case: CaseFiles, geom) -> None:
    """The case's identity, geometry and source files, stored with its properties."""
    props["case_id"] = case.case_id
    props["geometry"] = geom.to_json()
    props["image_files"] = [str(p) for p in case.image_files]
    props["label_file"] = str(case.label_file) if case.label_file else None


def _write_label_phase(store, holder: list, plans, cfg, geo: dict) -> None:
    """Resample the label map ``holder.pop()``, write it and its class locations to ``store``, and give the memory
    this phase freed back to the system before the image's phase."""
    from nnfast.native.pages import trim_heap

    seg, locs = _resample_seg(holder, plans, cfg, geo, True)
    store.write_seg(seg, locs)
    del seg, locs
    trim_heap()


def _float32_releasing(data: np.ndarray) -> np.ndarray:
    """``data`` (c, x, y, z) as a C-contiguous float32 array; when a conversion is needed it runs slab by slab along x
    and gives the pages of ``data`` already converted back to the system (``data`` is owned and not read again)."""
    from nnfast.native.pages import release_rows

    if data.dtype == np.float32 and data.flags.c_contiguous:
        return data
    if not data.flags.c_contiguous:
        return np.ascontiguousarray(data, dtype=np.float32)
    out = np.empty(data.shape, np.float32)
    n = data.shape[1]
    step = max(1, -(-n // 16))
    for c in range(data.shape[0]):
        for a in range(0, n, step):
            b = min(n, a + step)
            out[c, a:b] = data[c, a:b]
            release_rows(data[c], a, b)
    return out


class CaseStopped(Exception):
    """A case given up because its command is stopping (Ctrl-C, another case's error): its store is not written."""


def _check_stop(stop, case: CaseFiles) -> None:
    if stop is not None and stop.is_set():
        raise CaseStopped(f"case {case.case_id}: stopped before it was finished (nothing written)")


def preprocess_case_to_store(case: CaseFiles, plans, config_name: str, out_path: str | os.PathLike, case_hash: str,
                             decoded=None, stop=None) -> tuple[tuple[int, ...], int]:
    """Read, preprocess and store one training case, holding as little of it in memory as the steps allow.

    The same arrays and store as :func:`preprocess_case` followed by :func:`nnfast.io.store.write_case` (values bit
    for bit; the image's chunks may sit in another order inside its shard file), in another order of work: the label
    map is resampled, its class locations sampled and both written first (before normalization unless a channel
    normalizes within the nonzero mask), then the image is converted to float32, normalized and resampled with every
    pass giving back the pages of the input slabs it has read, the last pass streamed box by box into the store's
    shard writer (:meth:`nnfast.io.case_writer.CaseStoreWriter.image_sink`). The arrays read are owned here, which is
    what allows giving their memory back early.

    ``decoded``: a :class:`~nnfast.io.decoded_cache.DecodedCache` holding the case's arrays as an earlier step of this
    process decoded them from the same, unchanged files (:func:`_read_case`); the files are read otherwise.
    ``stop``: a ``threading.Event``; once it is set the case ends at its next step (a phase, or a box of the image)
    with :class:`CaseStopped`, its temporary store removed (threads cannot be killed: this is how Ctrl-C or another
    case's error stops a preprocessing thread).

    Returns
    -------
    (shape, voxels_in) : the stored image's ``(c, x, y, z)`` shape and the voxels of the image before cropping.
    """
    from nnfast.native.pages import trim_heap

    from ..io.case_writer import CaseStoreWriter

    _check_stop(stop, case)
    data, geom, seg = _read_case(case, decoded)
    _check_stop(stop, case)
    arrays = [data, seg]
    del data, seg
    data, seg, props, geo = _prepare(arrays, geom.spacing, plans, config_name)
    _add_case_properties(props, case, geom)
    trim_heap()  # what reading and cropping freed
    cfg = plans.configuration(config_name)
    where = f"case {case.case_id}"
    mask_used = any(bool(m) for m in cfg.use_mask_for_norm)
    with CaseStoreWriter(out_path, case_hash, tuple(cfg.patch_size)) as store:
        if not mask_used:  # the label map first, while the image is still in its (smaller) integer dtype
            holder = [seg]
            del seg
            _write_label_phase(store, holder, plans, cfg, geo)
            seg = None
        _check_stop(stop, case)
        data = normalize(_float32_releasing(data), seg, cfg.normalization_schemes, cfg.use_mask_for_norm,
                         plans.foreground_intensity_properties_per_channel, where=where)
        if mask_used:
            holder = [seg]
            del seg
            _write_label_phase(store, holder, plans, cfg, geo)
        shape = (int(data.shape[0]), *geo["new_shape"])
        sink = store.image_sink(shape, check=None if stop is None else functools.partial(_check_stop, stop, case))
        holder = [data]
        del data
        resample_image_consuming(holder, geo["new_shape"], geo["original_spacing"], geo["target_spacing"],
                                 **_resampling_kwargs(cfg)["data"], sink=sink, release=True)
        store.finish(props)
    return shape, int(np.prod(props["shape_before_cropping"]))


def _read_case(case: CaseFiles, decoded=None) -> tuple[np.ndarray, "ImageGeometry", np.ndarray]:
    """``(data, geometry, seg)`` of a labelled case as :func:`preprocess_case_to_store` starts from: the channels
    ``(c, z, y, x)`` in their integer dtype (float32 for float files), the first channel's geometry, the label map
    ``(1, z, y, x)`` int8 where it fits. Taken from ``decoded`` when it holds the case read from its current files
    (the same arrays: :func:`~nnfast.io.image.read_images` and :func:`~nnfast.io.image.read_label` apply the same
    conversions to what they decode), else read."""
    got = decoded.take(case.case_id, (*case.image_files, case.label_file)) if decoded is not None else None
    if got is not None:
        data, geom = stack_channels(got.images, dtype=None), got.geometry
        seg = label_array(got.label, case.label_file, small=True)
        del got
    else:
        data, geom = read_images(case.image_files, dtype=None)
        seg, _seg_geom = read_label(case.label_file, small=True)  # int8 where it fits: what is stored
    if data.dtype.kind not in "iu":
        data = data.astype(np.float32, copy=False)
    _check_label_shape(case, data, seg)
    return data, geom, seg


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
        _check_label_shape(case, data, seg)
    arrays = [data, seg]
    del data, seg  # _preprocess_owned holds the only references
    data, seg, props, locs = _preprocess_owned(arrays, geom.spacing, plans, config_name, case.case_id)
    _add_case_properties(props, case, geom)
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


def run_case_task(task: CaseTask, decoded=None, stop=None) -> CaseResult:
    """Worker (or worker thread) entry point: preprocess one case and write its store atomically (streamed:
    :func:`preprocess_case_to_store`, taking the case's arrays from ``decoded`` when it holds them; a case without a
    label file the whole-array way; ``stop``: see :func:`preprocess_case_to_store`)."""
    from ..io.store import write_case

    plans = _load_plans_cached(task.plans_file, os.stat(task.plans_file).st_mtime_ns)
    if task.case.label_file is not None:
        shape, voxels_in = preprocess_case_to_store(task.case, plans, task.config_name, task.out_path, task.case_hash,
                                                    decoded, stop)
        return CaseResult(task.case.case_id, shape, voxels_in, int(np.prod(shape[1:])), dir_size(task.out_path))
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
