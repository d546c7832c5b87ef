"""From predicted logits back to a segmentation in the original image geometry (nnU-Net v2's export).

nnU-Net rule (``convert_predicted_logits_to_segmentation_with_correct_shape`` in
``nnunetv2/inference/export_prediction.py``, v2.8.1): resample the logits ``(C, x, y, z)`` from the configuration's
spacing back to ``shape_after_cropping_and_before_resampling`` with the plan's probabilities resampling (order 1,
separate-z with order 0 along the low-resolution axis when anisotropic), take the argmax over classes (regions: sigmoid
> 0.5, later regions in ``regions_class_order`` win; :class:`nnfast.labels.LabelManager` paints), insert the result
into zeros of ``shape_before_cropping`` at the crop box, and transpose back to the reader's axis order. With
probabilities: softmax (sigmoid for regions) of the resampled logits, the crop reverted with probability 1 for
background outside the box, transposed back.

nnU-Net resamples every class in float64 and keeps all of them: ``C x V`` float64 intermediates for a ``V``-voxel
image, hundreds of GB and many minutes for TotalSegmentator-like cases (100+ classes). Here the classes are
resampled in small groups (float32, :mod:`nnfast.native.resample` kernels) and reduced on the fly into a running
maximum and its class index, so memory is ``O(V)`` whatever ``C``; groups of classes run on threads (the kernels
release the GIL). The running argmax keeps the first maximal class, as ``np.argmax`` does. The resampled logits equal
nnU-Net's to float32 rounding, so labels can differ from nnU-Net's only where two classes tie within that rounding.

The cascade's first stage (:func:`logits_to_next_stage`, nnU-Net's ``resample_and_save`` in the trainer's final
validation): the logits are resampled with the same probabilities resampling to the next stage's preprocessed shape
(current and target spacing both the configuration's, so separate-z follows its anisotropy) and reduced to labels,
without uncropping or transposing: the result lies on the next stage's grid.

Axis order: ``logits`` are ``(C, x, y, z)`` in nnU-Net's order after transposition (on the preprocessed grid); the
returned segmentation is in the reader's order ``(z, y, x)`` on the original grid.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import GeometryError
from ..labels import LabelManager
from ..native.argmax import argmax_channels, argmax_merge, argmax_update, softmax_inplace
from ..preprocess.resampling import resample_data_or_seg_to_shape

__all__ = [
    "logits_to_segmentation",
    "logits_to_next_stage",
    "export_prediction",
    "argmax_channels",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 4  # classes resampled together before they are folded into the running argmax


# --------------------------------------------------------------------------------------------- export
def _checked_logits(logits, plans, regions_class_order) -> tuple[np.ndarray, LabelManager]:
    """``logits`` as a float32 (C, x, y, z) array matching the labels' heads, and the labels."""
    if not isinstance(logits, np.ndarray):  # torch CPU tensors
        logits = np.asarray(logits)
    if logits.ndim != 4:
        raise GeometryError(f"logits must have shape (C, x, y, z); got {logits.shape}")
    info = LabelManager.from_plans(plans, regions_class_order)
    info.check_heads(logits.shape[0], "logits")
    if logits.dtype != np.float32:
        logits = logits.astype(np.float32)
    return logits, info


def _resampling_args(properties: Mapping[str, Any], plans, config_name: str) -> tuple:
    cfg = plans.configuration(config_name)
    target = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    original = [float(s) for s in properties["original_spacing"]]
    current = [float(s) for s in cfg.spacing]
    if len(current) < len(target):  # 2D configuration: the first axis keeps its original spacing
        current = [original[0], *current]
    r = cfg.resampling_probabilities
    return target, current, original, dict(order=r.order, order_z=r.order_z, force_separate_z=r.force_separate_z)


def _groups(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _resample(logits: np.ndarray, a: int, b: int, target, current, original, kw) -> np.ndarray:
    out = resample_data_or_seg_to_shape(logits[a:b], target, current, original, is_seg=False, **kw)
    return np.ascontiguousarray(out, dtype=np.float32)


def _streaming_labels(logits, info: LabelManager, target, current, original, kw, chunk: int, threads: int):
    """Resample ``logits`` class group by class group and reduce to labels; O(V) memory."""
    n_vox = int(np.prod(target))
    n_c = logits.shape[0]

    def run(span: tuple[int, int]):
        a, b = span
        if info.has_regions:
            seg = np.zeros(n_vox, np.uint16)
            for c0 in range(a, b, chunk):
                part = _resample(logits, c0, min(b, c0 + chunk), target, current, original, kw).reshape(-1, n_vox)
                with np.errstate(over="ignore"):
                    prob = 1.0 / (1.0 + np.exp(-part))
                info.paint_regions(seg, prob, c0)
            return seg
        best = np.full(n_vox, -np.inf, np.float32)
        label = np.zeros(n_vox, info.seg_dtype)
        for c0 in range(a, b, chunk):
            part = _resample(logits, c0, min(b, c0 + chunk), target, current, original, kw)
            argmax_update(part.reshape(part.shape[0], n_vox), c0, best, label)
        return best, label

    if info.has_regions:  # later regions overwrite earlier ones: keep it sequential
        return run((0, n_c)).reshape(target).astype(info.seg_dtype, copy=False)
    spans = _groups(n_c, threads)
    if len(spans) == 1:
        return run(spans[0])[1].reshape(target)
    with ThreadPoolExecutor(len(spans)) as pool:
        results = list(pool.map(run, spans))
    best, label = results[0]
    for best2, label2 in results[1:]:
        argmax_merge(best, label, best2, label2)
    return label.reshape(target)


def _probabilities(logits, info: LabelManager, target, current, original, kw, chunk: int, threads: int) -> np.ndarray:
    """Resampled probabilities (C, *target) float32: softmax, or sigmoid per region."""
    n_c = logits.shape[0]
    probs = np.empty((n_c, *target), np.float32)

    def run(span):
        for c0 in range(span[0], span[1], chunk):
            c1 = min(span[1], c0 + chunk)
            probs[c0:c1] = _resample(logits, c0, c1, target, current, original, kw)

    spans = _groups(n_c, threads)
    if len(spans) == 1:
        run(spans[0])
    else:
        with ThreadPoolExecutor(len(spans)) as pool:
            list(pool.map(run, spans))
    flat = probs.reshape(n_c, -1)
    if info.has_regions:
        with np.errstate(over="ignore"):
            np.negative(flat, out=flat)
            np.exp(flat, out=flat)
            flat += 1
            np.reciprocal(flat, out=flat)
    else:
        softmax_inplace(flat)
    return probs


def logits_to_segmentation(
    logits: np.ndarray,
    properties: Mapping[str, Any],
    plans,
    config_name: str,
    *,
    return_probabilities: bool = False,
    probabilities_dtype=np.float32,
    regions_class_order: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segmentation (and probabilities) in the original geometry from logits on the preprocessed grid.

    Parameters
    ----------
    logits : ndarray, shape (C, x, y, z), float32 (float16 is accepted)
        Network output for the whole case in nnU-Net axis order on the preprocessed grid
        (``properties['shape_after_resampling']``). Not modified.
    properties : mapping
        The case's preprocessing properties (:func:`nnfast.preprocess.pipeline.preprocess_arrays`):
        ``original_spacing``, ``shape_after_cropping_and_before_resampling``, ``shape_before_cropping``,
        ``bbox_used_for_cropping``, ``transpose_forward`` (else the plan's).
    plans : Plans
        The dataset's plans (labels, transposition, the configuration's probabilities resampling).
    config_name : str
        Configuration that produced ``logits``.
    return_probabilities : bool
        Also return softmax (sigmoid for regions) probabilities on the original grid; this needs ``C x V`` memory.
    probabilities_dtype : numpy dtype
        float32 or float16 for the returned probabilities.
    regions_class_order : sequence of int, optional
        Required for region-based labels (dataset.json ``regions_class_order``).
    chunk : int
        Classes resampled together before they are folded into the running argmax (memory ``chunk x V`` float32
        per thread).
    threads : int
        Threads resampling class groups concurrently.

    Returns
    -------
    seg : ndarray, reader axis order (z, y, x), uint8 (uint16 with 255+ foreground labels)
        A transposed view of a C-contiguous array.
    probabilities : ndarray (C, z, y, x) of ``probabilities_dtype`` or None
        Background is 1 outside the crop box (regions: 0).

    Raises
    ------
    GeometryError
        If the logits do not match the label count or are not 4D.
    PlanError
        For region-based labels without ``regions_class_order``.
    """
    logits, info = _checked_logits(logits, plans, regions_class_order)
    target, current, original, kw = _resampling_args(properties, plans, config_name)
    chunk = max(1, int(chunk))
    threads = max(1, int(threads))
    probs_out = None
    if return_probabilities:
        probs = _probabilities(logits, info, target, current, original, kw, chunk, threads)
        seg_crop = info.segmentation_from_probabilities(probs)
    else:
        seg_crop = _streaming_labels(logits, info, target, current, original, kw, chunk, threads)

    shape_before = tuple(int(s) for s in properties["shape_before_cropping"])
    bbox = [(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"]]
    box = tuple(slice(a, b) for a, b in bbox)
    if tuple(b - a for a, b in bbox) != tuple(seg_crop.shape):
        raise GeometryError(f"crop box {bbox} does not match the resampled shape {seg_crop.shape}")
    tf = [int(a) for a in properties.get("transpose_forward", plans.transpose_forward)]
    tb = [int(i) for i in np.argsort(tf)]
    seg = np.zeros(shape_before, info.seg_dtype)
    seg[box] = seg_crop
    seg = seg.transpose(tb)
    if return_probabilities:
        full = np.zeros((probs.shape[0], *shape_before), probabilities_dtype)
        if not info.has_regions:
            full[0] = 1
        full[(slice(None), *box)] = probs
        del probs
        probs_out = full.transpose([0, *[a + 1 for a in tb]])
    return seg, probs_out


def logits_to_next_stage(logits: np.ndarray, target_shape: Sequence[int], plans, config_name: str, *,
                         regions_class_order: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK,
                         threads: int = 1) -> np.ndarray:
    """Labels of ``logits`` on the next stage's preprocessed grid (nnU-Net's ``resample_and_save``).

    Parameters
    ----------
    logits : ndarray (C, x, y, z) float32
        The first stage's prediction of a case on its own preprocessed grid, nnU-Net axis order. Not modified.
    target_shape : sequence of 3 int
        The case's spatial shape in the next stage's preprocessed folder (same crop, finer spacing).
    plans, config_name :
        The plans and the configuration that produced ``logits`` (its spacing and probabilities resampling).
    regions_class_order, chunk, threads : see :func:`logits_to_segmentation`.

    Returns
    -------
    ndarray ``target_shape``, uint8 (uint16 with 255+ foreground labels)

    Raises
    ------
    GeometryError
        ``logits`` or ``target_shape`` are not 3D, or the channel count does not match the labels.
    """
    target = tuple(int(s) for s in target_shape)
    if len(target) != 3:
        raise GeometryError(f"logits_to_next_stage: the target shape must be 3D, got {target}")
    logits, info = _checked_logits(logits, plans, regions_class_order)
    cfg = plans.configuration(config_name)
    spacing = [float(v) for v in cfg.spacing]
    r = cfg.resampling_probabilities
    kw = dict(order=r.order, order_z=r.order_z, force_separate_z=r.force_separate_z)
    return _streaming_labels(logits, info, target, spacing, spacing, kw, max(1, int(chunk)), max(1, int(threads)))


def export_prediction(
    logits: np.ndarray,
    properties: Mapping[str, Any],
    plans,
    config_name: str,
    output_file: Path | str,
    *,
    save_probabilities: bool = False,
    probabilities_dtype=np.float16,
    regions_class_order: Sequence[int] | None = None,
    threads: int = 1,
) -> Path:
    """Write the segmentation of ``logits`` to ``output_file`` with the case's original geometry (atomically).

    With ``save_probabilities`` also ``<case>.npz`` (key ``probabilities``, (C, z, y, x) of ``probabilities_dtype``)
    and ``<case>.json`` (the properties) next to it, where ``<case>`` is ``output_file`` without its image suffix.
    ``properties['geometry']`` (:meth:`nnfast.io.image.ImageGeometry.to_json`) gives spacing, origin, direction.

    Returns
    -------
    Path
        ``output_file``.
    """
    from ..io.atomic import atomic_target, write_json_atomic
    from ..io.image import ImageGeometry, file_suffix, write_segmentation

    output_file = Path(output_file)
    seg, probs = logits_to_segmentation(logits, properties, plans, config_name,
                                        return_probabilities=save_probabilities,
                                        probabilities_dtype=probabilities_dtype,
                                        regions_class_order=regions_class_order, threads=threads)
    geometry = ImageGeometry.from_json(properties["geometry"])
    if tuple(seg.shape) != tuple(geometry.shape):
        raise GeometryError(f"exported segmentation has shape {seg.shape} but the input image has {geometry.shape}")
    if probs is not None:
        stem = output_file.name[: -len(file_suffix(output_file))] if file_suffix(output_file) else output_file.stem
        npz = output_file.with_name(stem + ".npz")
        with atomic_target(npz, suffix=".npz") as tmp:
            np.savez_compressed(tmp, probabilities=np.ascontiguousarray(probs))
        write_json_atomic(output_file.with_name(stem + ".json"), _json_safe(properties))
        del probs
    write_segmentation(seg, geometry, output_file)
    return output_file


def _json_safe(obj):
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj

