"""Checks of one training case, run in a worker: each file is read once, every problem is collected; on request the
case's fingerprint is made from the same arrays (one read per file for verification and fingerprint).

Per case: every declared channel file and the label file exist; no file is truncated/corrupt; images are 3D
(one volume per channel file), finite and not all zero (NaN/inf stored in a float NIfTI file are read as 0 by
SimpleITK, whose libnifti zeroes them, which hides a corrupt scan: such files are scanned raw, only when the array
read holds a 0, and reported as an error naming the file and the count of non-finite voxels, for images as for
labels); channels share shape, spacing, origin and direction; the label is a 3D integer map whose values are
non-negative and declared; it shares the image grid; it has foreground.

Tolerances: spacing is compared with ``np.allclose`` defaults, as nnU-Net's ``verify_dataset_integrity``; origin
and direction with ``rtol = atol = 1e-4`` (mm for origins). nnU-Net only warns about origin/direction differences
(its reader ignores them); nnfast makes them errors, because a label shifted or flipped against its image trains
a wrong model silently, while staying tolerant of the float noise (1e-8 level, nnU-Net issue #1287) that NIfTI
writers introduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from ..fingerprint.extract import CaseFingerprint
from ..io.image import ImageGeometry, read_image
from ..io.decoded_cache import DecodedCache
from ..io.nifti_integrity import nifti_integrity_problem, nifti_nonfinite_counts
from .report import Problem

__all__ = ["CaseTask", "CaseResult", "check_case", "GEOMETRY_TOL"]

#: rtol and atol for origin and direction comparisons.
GEOMETRY_TOL = 1e-4


@dataclass(frozen=True)
class CaseTask:
    """What a worker needs to check one case (picklable, small)."""

    case_id: str
    image_files: tuple[str, ...]
    label_file: str | None
    expected_labels: tuple[int, ...] | None  # None when dataset.json's labels are unusable
    background_labels: tuple[int, ...] = (0,)  # labels that are not foreground (0 and the ignore label)
    fingerprint: bool = False  # also fingerprint the case from the arrays read (when it has no error)


@dataclass(frozen=True)
class CaseResult:
    problems: tuple[Problem, ...]
    labels_found: tuple[int, ...]
    fingerprint: CaseFingerprint | None = None  # with CaseTask.fingerprint, for a case without errors


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _values(v: np.ndarray, limit: int = 10) -> str:
    v = list(v)
    head = ", ".join(str(x) for x in v[:limit])
    return f"[{head}{', ...' if len(v) > limit else ''}] ({len(v)} value(s))"


def check_case(task: CaseTask, decoded: DecodedCache | None = None) -> CaseResult:
    """Check one case; never raises for bad data (an unexpected exception becomes an error problem too).

    ``decoded``: a case without errors leaves the arrays read in it (:mod:`nnfast.io.decoded_cache`), for a later
    step of the same process that needs them (preprocessing) instead of reading the files again."""
    problems: list[Problem] = []
    labels: tuple[int, ...] = ()
    arrays: dict = {}
    signature = DecodedCache.sign(decoded, (*task.image_files, task.label_file))  # before reading
    try:
        labels = _check(task, problems, arrays if task.fingerprint or decoded is not None else None)
    except Exception as e:  # a bug or an unforeseen file: report it, keep checking the other cases
        problems.append(Problem("error", task.case_id, None, "checking this case failed unexpectedly",
                                "a readable case", f"{type(e).__name__}: {e}"))
    fingerprint = None
    if task.fingerprint and arrays and not any(p.severity == "error" for p in problems):
        fingerprint = _fingerprint(task, arrays)
    if decoded is not None and "label" in arrays and "geometry" in arrays \
            and not any(p.severity == "error" for p in problems):
        decoded.keep(task.case_id, signature, arrays["images"], arrays["geometry"], arrays["label"])
    return CaseResult(tuple(problems), labels, fingerprint)


def _fingerprint(task: CaseTask, arrays: dict) -> CaseFingerprint | None:
    """The case's fingerprint from the arrays verification read, exactly as
    :func:`~nnfast.fingerprint.extract.analyze_case` would make it from the files; None when it cannot be made
    here (the fingerprint step then reads the case itself)."""
    from ..fingerprint.extract import analyze_arrays
    from ..io.image import label_array, stack_channels

    try:
        data = stack_channels(arrays["images"], dtype=None)
        seg = label_array(arrays["label"], task.label_file)
        return analyze_arrays(task.case_id, data, seg, arrays["spacing"])
    except Exception:  # never fail verification for the fingerprint's sake
        return None


def _err(problems, task, file, what, expected, found, severity="error"):
    problems.append(Problem(severity, task.case_id, None if file is None else Path(file), what, expected, found))


def _read(path: str, kind: str, task: CaseTask, problems: list) -> tuple[np.ndarray, ImageGeometry] | None:
    if not Path(path).is_file():
        _err(problems, task, path, f"{kind} file is missing", "the file to exist", "no such file")
        return None
    problem = nifti_integrity_problem(path)
    if problem:
        _err(problems, task, path, f"{kind} file is truncated or corrupt", "a complete file", problem)
        return None
    try:
        return read_image(Path(path))
    except ImageReadError as e:
        _err(problems, task, path, f"{kind} file cannot be read", "a readable image", str(e))
        return None


def _check(task: CaseTask, problems: list[Problem], keep: dict | None = None) -> tuple[int, ...]:
    """Check the case's files; with ``keep``, the arrays read are left in it (``images``, ``label``, ``spacing``, the
    first image's ``geometry``) for the fingerprint and the decoded cache."""
    images: list[tuple[str, ImageGeometry]] = []
    for path in task.image_files:
        got = _read(path, "image", task, problems)
        if got is None:
            continue
        data, geom = got
        images.append((path, geom))
        _check_image_values(data, path, task, problems)
        if keep is not None:
            keep.setdefault("images", []).append(data)
            keep.setdefault("spacing", geom.spacing)
            keep.setdefault("geometry", geom)
        del data

    ref_path, ref = images[0] if images else (None, None)
    for path, geom in images[1:]:
        _compare(ref, geom, path, f"channel `{Path(ref_path).name}`", task, problems)

    labels_found: tuple[int, ...] = ()
    if task.label_file is None:
        _err(problems, task, None, "case has no label file", "a label file", "none listed")
        return labels_found
    got = _read(task.label_file, "label", task, problems)
    if got is None:
        return labels_found
    seg, lgeom = got
    labels_found = _check_label_values(seg, task, problems)
    if keep is not None:
        keep["label"] = seg
    if ref is not None:
        _compare(ref, lgeom, task.label_file, f"image `{Path(ref_path).name}`", task, problems)
    return labels_found


def _stored_nonfinite(data: np.ndarray, path: str) -> tuple[int, int]:
    """NaN/inf counts that a float NIfTI file stores but SimpleITK turned into 0 (see
    :func:`~nnfast.io.nifti_integrity.nifti_nonfinite_counts`); only scanned when the array read holds a 0."""
    if data.dtype.kind != "f" or not np.any(data == 0):
        return 0, 0
    return nifti_nonfinite_counts(path) or (0, 0)


def _check_image_values(data: np.ndarray, path: str, task: CaseTask, problems: list) -> None:
    if data.shape[0] > 1:
        _err(problems, task, path, "image file is 4D", "one 3D volume per channel file (split 4D files into "
             "<case>_XXXX channel files, e.g. with `nnfast convert --msd`)", f"{data.shape[0]} volumes")
    lo = hi = None
    if data.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(np.count_nonzero(np.isinf(data)))
        if n_nan or n_inf:
            _err(problems, task, path, "image has non-finite values", "finite values (replace NaN/inf with "
                 "a sensible value, e.g. the background intensity)", f"{n_nan} NaN and {n_inf} inf voxel(s)")
            finite = np.isfinite(data)
            if not finite.any():
                return
            lo, hi = data[finite].min(), data[finite].max()
        else:
            s_nan, s_inf = _stored_nonfinite(data, path)
            if s_nan or s_inf:
                _err(problems, task, path, "image file stores non-finite values", "finite values (SimpleITK, "
                     "and so nnU-Net and nnfast, read NaN/inf in NIfTI files as 0, which hides a corrupt scan; "
                     "replace them with a sensible value, e.g. the background intensity)",
                     f"{s_nan} NaN and {s_inf} inf voxel(s)")
    if lo is None:
        lo, hi = data.min(), data.max()
    if lo == 0 and hi == 0:
        _err(problems, task, path, "image is all zero", "some non-zero voxels (normalization divides by the "
             "intensity spread of the non-zero region)", "every voxel is 0")
    elif lo == hi:
        _err(problems, task, path, "image is constant", "varying intensities", f"every voxel is {lo}",
             severity="warning")


def _check_label_values(seg: np.ndarray, task: CaseTask, problems: list) -> tuple[int, ...]:
    path = task.label_file
    if seg.shape[0] > 1:
        _err(problems, task, path, "label file is 4D", "a single 3D label map", f"{seg.shape[0]} volumes")
        return ()
    if seg.dtype.kind == "f":
        finite = np.isfinite(seg)
        s_nan, s_inf = _stored_nonfinite(seg, path)
        if not finite.all() or s_nan or s_inf:
            n = int(seg.size - np.count_nonzero(finite)) + s_nan + s_inf
            _err(problems, task, path, "label has non-finite values", "integer labels (SimpleITK reads NaN/inf "
                 "in NIfTI files as 0, i.e. background)", f"{n} NaN/inf voxel(s)")
            seg = seg[finite]
        frac = seg != np.round(seg)
        if frac.any():
            _err(problems, task, path, "label has non-integer values", "integer labels (a label map, not an "
                 "interpolated or probability image)", f"e.g. {_values(np.unique(seg[frac])[:10])}")
            return ()
        if seg.size and (seg.min() < np.iinfo(np.int32).min or seg.max() > np.iinfo(np.int32).max):
            _err(problems, task, path, "label values out of range", "integer labels", f"min {seg.min()}, max {seg.max()}")
            return ()
        _err(problems, task, path, "label is stored as floating point", "an integer pixel type (e.g. uint8)",
             f"{seg.dtype}, integer-valued", severity="warning")
        seg = seg.astype(np.int32)
    present = _unique_ints(seg)
    negative = present[present < 0]
    if negative.size:
        _err(problems, task, path, "label has negative values", "labels >= 0 (nnfast uses -1 internally for "
             "'outside the image')", _values(negative))
    if task.expected_labels is not None:
        undeclared = np.setdiff1d(present[present >= 0], np.asarray(task.expected_labels))
        if undeclared.size:
            _err(problems, task, path, "label has values not declared in dataset.json",
                 f"only {list(task.expected_labels)}", _values(undeclared))
    if not np.setdiff1d(present, np.asarray(task.background_labels)).size:
        _err(problems, task, path, "label has no foreground", "at least one foreground voxel (this may be "
             "intended)", f"only {present.tolist()}", severity="warning")
    return tuple(int(v) for v in present)


def _unique_ints(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array.

    Label maps hold few distinct values in a small range: one ``(a == v).any()`` pass per value in ``[min, max]``
    is ~10x faster than ``np.unique`` or ``np.bincount`` (which sort or widen to intp) on a 512x512x100 map.
    """
    if a.size == 0:
        return np.zeros(0, np.int64)
    lo, hi = int(a.min()), int(a.max())
    if hi - lo < 24:
        return np.array([v for v in range(lo, hi + 1) if v in (lo, hi) or (a == v).any()], dtype=np.int64)
    return np.unique(a).astype(np.int64)


def _compare(ref: ImageGeometry, geom: ImageGeometry, path: str, against: str, task: CaseTask, problems: list) -> None:
    """Compare the grid of ``path`` with the reference (first channel)."""
    if tuple(geom.shape) != tuple(ref.shape):
        _err(problems, task, path, f"shape differs from {against}", f"{tuple(ref.shape)} (z, y, x)",
             f"{tuple(geom.shape)}")
        return
    if len(geom.spacing) != len(ref.spacing) or not np.allclose(geom.spacing, ref.spacing):
        _err(problems, task, path, f"spacing differs from {against}", f"{_fmt(ref.spacing)} mm (z, y, x)",
             f"{_fmt(geom.spacing)}")
    if len(geom.origin) != len(ref.origin) or not np.allclose(geom.origin, ref.origin, rtol=GEOMETRY_TOL,
                                                               atol=GEOMETRY_TOL):
        _err(problems, task, path, f"origin differs from {against}", f"{_fmt(ref.origin)} mm (x, y, z)",
             f"{_fmt(geom.origin)}")
    if len(geom.direction) != len(ref.direction) or not np.allclose(geom.direction, ref.direction,
                                                                     rtol=GEOMETRY_TOL, atol=GEOMETRY_TOL):
        _err(problems, task, path, f"direction differs from {against}", _fmt(ref.direction), _fmt(geom.direction))
