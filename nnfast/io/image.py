"""Reading and writing images with SimpleITK, with nnU-Net v2's ``SimpleITKIO`` conventions.

Axis order: arrays are returned in SimpleITK's array order ``(z, y, x)`` (nnU-Net calls these axes 0, 1, 2)
with a leading channel axis, and ``spacing`` is given in the same order (SimpleITK's spacing reversed), in mm.
2D images become ``(1, 1, y, x)`` with spacing ``(999 * max, sy, sx)``; a 4D file is read as several channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeometryError, ImageReadError
from .atomic import atomic_target

__all__ = ["ImageGeometry", "read_image", "read_images", "read_label", "write_segmentation", "file_suffix"]


@dataclass(frozen=True)
class ImageGeometry:
    """Geometry of an image as SimpleITK reports it, plus nnU-Net's reader-order spacing.

    ``spacing`` is in array order (z, y, x), mm. ``sitk_spacing``/``origin``/``direction`` are SimpleITK's
    own (x, y, z) values, 3D (the 3D part of a 4D file's geometry).
    """

    spacing: tuple[float, ...]
    sitk_spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    shape: tuple[int, ...]  # spatial shape in array order

    def to_json(self) -> dict:
        return {
            "spacing": list(self.spacing),
            "sitk_spacing": list(self.sitk_spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "shape": list(self.shape),
        }

    @classmethod
    def from_json(cls, d: dict) -> "ImageGeometry":
        return cls(*(tuple(d[k]) for k in ("spacing", "sitk_spacing", "origin", "direction", "shape")))


def file_suffix(path: Path) -> str:
    """The image suffix of ``path`` including double suffixes such as ``.nii.gz``."""
    name = Path(path).name
    for ending in (".nii.gz", ".nrrd.gz", ".mha", ".mhd", ".nrrd", ".nii", ".gipl", ".tif", ".tiff", ".png"):
        if name.endswith(ending):
            return ending
    return Path(path).suffix


def _read_sitk(path: Path):
    import SimpleITK as sitk

    from .nifti_integrity import nifti_integrity_problem

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file `{path}` does not exist")
    # SimpleITK reads a truncated .nii.gz without complaint (zeros or garbage): check the header against the data first
    problem = nifti_integrity_problem(path)
    if problem:
        raise ImageReadError(f"cannot read image file `{path}`: {problem}; re-export or re-download it")
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:  # SimpleITK raises RuntimeError for truncated/corrupt files
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "rror" in ln), first[-1] if first else "")
        raise ImageReadError(
            f"cannot read image file `{path}`: it is truncated, corrupt or not an image ({detail.strip()}); "
            "re-export or re-download it"
        ) from None
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise ImageReadError(
            f"image file `{path}` is a vector image with {img.GetNumberOfComponentsPerPixel()} components per voxel; "
            "expected scalar voxels (store each channel as its own file, or as a 4D image)"
        )
    return img, arr


def _geometry_and_channels(img, arr: np.ndarray, path: Path) -> tuple[np.ndarray, ImageGeometry]:
    """nnU-Net's SimpleITKIO rules for 2D/3D/4D files; returns (channels, *spatial) array."""
    spacing = tuple(float(s) for s in img.GetSpacing())
    origin = tuple(float(o) for o in img.GetOrigin())
    direction = tuple(float(d) for d in img.GetDirection())
    ndim = arr.ndim
    if ndim == 2:
        arr = arr[None, None]
        sp = (999.0 * max(spacing), abs(spacing[1]), abs(spacing[0]))
        sitk_sp = spacing + (999.0 * max(spacing),)
        origin = origin + (0.0,)
        d = np.eye(3)
        d[:2, :2] = np.asarray(direction).reshape(2, 2)
        direction = tuple(float(x) for x in d.ravel())
    elif ndim == 3:
        arr = arr[None]
        sp = tuple(abs(s) for s in spacing[::-1])
        sitk_sp = spacing
    elif ndim == 4:
        sp = tuple(abs(s) for s in spacing[::-1][1:])
        sitk_sp = spacing[:3]
        origin = origin[:3]
        direction = tuple(float(x) for x in np.asarray(direction).reshape(4, 4)[:3, :3].ravel())
    else:
        raise ImageReadError(f"image file `{path}` has {ndim} dimensions; expected 2, 3 or 4")
    geom = ImageGeometry(
        spacing=tuple(float(s) for s in sp),
        sitk_spacing=tuple(float(s) for s in sitk_sp),
        origin=origin,
        direction=direction,
        shape=tuple(int(s) for s in arr.shape[1:]),
    )
    return arr, geom


def read_image(path: Path) -> tuple[np.ndarray, ImageGeometry]:
    """Read one image file; returns ``(array (c, z, y, x) in the file's dtype, geometry)``."""
    img, arr = _read_sitk(path)
    return _geometry_and_channels(img, arr, Path(path))


def read_images(paths: Sequence[Path], dtype=np.float32) -> tuple[np.ndarray, ImageGeometry]:
    """Read the channel files of one case and stack them as nnU-Net's ``SimpleITKIO.read_images`` does.

    Returns
    -------
    data : ndarray, shape (c, z, y, x), ``dtype`` (float32 by default, cast as nnU-Net does with ``unsafe``);
        ``dtype=None`` keeps the files' dtype when all channels share it (saves memory where the values are
        all that matters, e.g. the fingerprint)
    geometry : ImageGeometry of the first file

    Raises
    ------
    ImageReadError
        A file is missing, truncated or corrupt.
    GeometryError
        Channels differ in shape or spacing (nnU-Net raises too; origin/direction differences are left to
        :mod:`nnfast.verify`).
    """
    arrays, geoms = [], []
    for p in paths:
        a, g = read_image(p)
        arrays.append(a)
        geoms.append(g)
    ref = geoms[0]
    for p, g in zip(paths[1:], geoms[1:]):
        if g.shape != ref.shape:
            raise GeometryError(
                f"channel file `{p}` has shape {g.shape} but `{paths[0]}` has {ref.shape}; "
                "all channels of a case must share one grid"
            )
        if not np.allclose(g.spacing, ref.spacing):
            raise GeometryError(
                f"channel file `{p}` has spacing {g.spacing} but `{paths[0]}` has {ref.spacing}; "
                "all channels of a case must share one grid"
            )
    return stack_channels(arrays, dtype), ref


def stack_channels(arrays: Sequence[np.ndarray], dtype=np.float32) -> np.ndarray:
    """The channel arrays ``(c_i, z, y, x)`` of one case (same grid) as one ``(c, z, y, x)`` array of ``dtype``
    (:func:`read_images`' rule: ``None`` keeps a dtype all channels share, else float32)."""
    if dtype is None:
        dtypes = {a.dtype for a in arrays}
        dtype = dtypes.pop() if len(dtypes) == 1 else np.float32
    if len(arrays) == 1 and arrays[0].dtype == dtype:
        return arrays[0]
    out = np.empty((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]), dtype=dtype)
    c = 0
    for a in arrays:
        np.copyto(out[c : c + a.shape[0]], a, casting="unsafe")
        c += a.shape[0]
    return out


def read_label(path: Path, *, small: bool = False) -> tuple[np.ndarray, ImageGeometry]:
    """Read a label map; returns ``(array (1, z, y, x) int16 or int32, geometry)``.

    ``small``: int8 where the values fit (without a copy when the file holds int8 or uint8 voxels), which is what
    preprocessing stores; half the memory of int16 on a large case.

    Raises
    ------
    LabelError
        The file holds non-integer values or is 4D.
    """
    from ..errors import LabelError

    img, arr = _read_sitk(path)
    if arr.ndim == 4:
        raise LabelError(f"label file `{path}` is 4D (shape {arr.shape}); a label map must be a single 2D/3D volume")
    data, geom = _geometry_and_channels(img, arr, Path(path))
    del img, arr
    return label_array(data, path, small=small), geom


def label_array(data: np.ndarray, path, *, small: bool = False) -> np.ndarray:
    """A label map as :func:`read_label` returns it: int16 when the values fit, else int32 (``data`` as read by
    :func:`read_image`; ``path`` names the file in errors).

    Raises
    ------
    LabelError
        The array holds non-integer values.
    """
    from ..errors import LabelError

    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise LabelError(f"label file `{path}` holds non-integer values; labels must be integers")
    if data.dtype.kind in "fiu":
        lo = data.min() if data.size else 0
        hi = data.max() if data.size else 0
        if small and lo >= -128 and hi <= 127:
            if data.dtype == np.uint8:
                return data.view(np.int8)  # the same values: none is above 127
            return data.astype(np.int8, copy=False)
        target = np.int16 if (lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max) else np.int32
        data = data.astype(target, copy=False)
    return data


def write_segmentation(seg: np.ndarray, geometry: ImageGeometry, path: Path) -> None:
    """Write a label map ``seg`` (array order (z, y, x)) with ``geometry``, atomically, compressed.

    dtype uint8 when the maximum is below 255, else uint16 (nnU-Net's ``write_seg``).
    """
    import SimpleITK as sitk

    seg = np.asarray(seg)
    dtype = np.uint8 if (seg.size == 0 or seg.max() < 255) else np.uint16
    arr = seg.astype(dtype, copy=False)
    if len(geometry.shape) == 3 and geometry.shape[0] == 1 and geometry.spacing[0] >= 999 * max(geometry.spacing[1:]) - 1e-3:
        arr = arr[0]  # a 2D image read as (1, y, x)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(geometry.sitk_spacing[:2])
        img.SetOrigin(geometry.origin[:2])
        img.SetDirection(tuple(np.asarray(geometry.direction).reshape(3, 3)[:2, :2].ravel()))
    else:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(geometry.sitk_spacing)
        img.SetOrigin(geometry.origin)
        img.SetDirection(geometry.direction)
    suffix = file_suffix(Path(path))
    with atomic_target(Path(path), suffix=suffix) as tmp:
        sitk.WriteImage(img, str(tmp), True)
