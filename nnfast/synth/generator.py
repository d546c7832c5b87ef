"""Deterministic synthetic Medical Segmentation Decathlon (MSD) tasks, for tests, benchmarks and demos.

:func:`synthesize_msd` writes a ``TaskXX_Name`` folder laid out like the Decathlon downloads (``imagesTr/``,
``labelsTr/``, ``imagesTs/``, ``dataset.json`` with ``modality``/``labels``/``training``/``test``), which
:func:`nnfast.convert.msd.convert_msd` (or nnU-Net's ``nnUNetv2_convert_MSD_dataset``) turns into a raw dataset.

Two kinds of task:

``"ct"``
    One int16 channel in Hounsfield units: air (-1000) around an elliptical body that, in some cases, does not
    fill the field of view; subcutaneous and visceral fat (~-100 HU); soft tissue (~40 HU); a spine with vertebral
    bodies, discs and spinous processes and ribs (~300-900 HU); an organ (label 1, ~60 HU with texture) holding one
    or two darker tumours (label 2, ~20 HU); a smooth additive bias and white noise. Spacing is anisotropic and
    varies per case (z 2.5-5 mm, in-plane 0.6-0.9 mm), shapes vary, direction is the identity.
``"mri"``
    A 4D float32 file per case (SimpleITK size ``(x, y, z, c)``, as MSD BrainTumour/Prostate), channels
    ``T1``, ``T2``, ``FLAIR`` (and ``T1c``): a skull-stripped brain (exactly 0 outside, so nnU-Net's crop-to-nonzero
    and its "use mask for normalization" rule fire) with white/grey matter and ventricles, an oedema (label 1) around a
    tumour (label 2), a multiplicative bias field and Rician noise; nearly isotropic spacing (~1 mm) and a slightly
    oblique direction (a rotation about z).

Everything is drawn from ``np.random.SeedSequence(seed)``: one child sequence per case (training cases first, then
test cases), so the same arguments give byte-identical files, and adding test cases does not change training cases.
Volumes are built with NumPy broadcasting and separable smooth-field interpolation (no per-voxel Python loops):
eight 64x160x160 CT cases take well under a few seconds, most of it gzip.

Array order in this module is SimpleITK's ``(z, y, x)``; spacings are given in the same order, in mm.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..errors import DatasetError
from ..io.atomic import temporary_sibling

__all__ = ["synthesize_msd", "CT_LABELS", "MRI_LABELS", "MRI_CHANNELS", "DEFAULT_SHAPE_RANGE"]

logger = logging.getLogger(__name__)

Kind = Literal["ct", "mri"]
Range = tuple[float, float]

CT_LABELS = {"0": "background", "1": "organ", "2": "tumour"}
MRI_LABELS = {"0": "background", "1": "edema", "2": "tumour"}
MRI_CHANNELS = ("T1", "T2", "FLAIR", "T1c")

#: Default ``(z, y, x)`` shape ranges (inclusive) per kind.
DEFAULT_SHAPE_RANGE: dict[str, tuple[tuple[int, int], ...]] = {
    "ct": ((40, 64), (96, 160), (96, 160)),
    "mri": ((48, 64), (56, 80), (56, 80)),
}
_DEFAULT_SPACING = {"ct": ((2.5, 5.0), (0.6, 0.9)), "mri": ((0.95, 1.25), (0.9, 1.1))}

# Relative MRI intensities per tissue: white matter, grey matter, CSF, oedema, tumour.
_MRI_CONTRAST = {
    "T1": (0.85, 0.60, 0.20, 0.50, 0.45),
    "T2": (0.45, 0.60, 1.00, 0.85, 0.70),
    "FLAIR": (0.50, 0.60, 0.10, 0.95, 0.80),
    "T1c": (0.85, 0.60, 0.20, 0.50, 0.95),
}


def synthesize_msd(
    out_root: str | os.PathLike,
    task_id: int = 1,
    name: str | None = None,
    num_cases: int = 8,
    shape_range: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    kind: Kind = "ct",
    num_test: int = 2,
    spacing_z_range: Range | None = None,
    spacing_xy_range: Range | None = None,
    num_channels: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic Decathlon task ``out_root/Task{task_id:02d}_{name}`` and return its path.

    Parameters
    ----------
    out_root : path
        Folder that receives the task folder (created if missing).
    task_id : int
        MSD task number, written as two digits (``Task01_...``; ids >= 100 keep all digits).
    name : str, optional
        Task name (no ``_``); default ``"SynthCT"`` or ``"SynthMRI"`` by ``kind``.
    num_cases, num_test : int
        Number of training cases (with labels) and of test cases (``imagesTs``, no labels).
    shape_range : sequence of three (min, max) int pairs, optional
        Inclusive ranges of the ``(z, y, x)`` array shape; default :data:`DEFAULT_SHAPE_RANGE` of ``kind``.
    seed : int
        Seed of the ``np.random.SeedSequence`` all randomness derives from.
    kind : {"ct", "mri"}
        See the module docstring.
    spacing_z_range, spacing_xy_range : (float, float), optional
        Ranges (mm) the z spacing and the in-plane (y and x, equal for CT, drawn separately for MRI) spacing are
        drawn from per case. Defaults: CT z 2.5-5, in-plane 0.6-0.9; MRI z 0.95-1.25, in-plane 0.9-1.1.
    num_channels : int, optional
        MRI only: 1-4 channels from ``("T1", "T2", "FLAIR", "T1c")``, default 3. With 1 channel the files are 3D.
    overwrite : bool
        Replace an existing task folder instead of raising.

    Returns
    -------
    Path of the task folder.

    Raises
    ------
    DatasetError
        Invalid arguments, or the task folder exists and ``overwrite`` is False.
    """
    if kind not in ("ct", "mri"):
        raise DatasetError(f"kind must be 'ct' or 'mri', found {kind!r}")
    name = name or ("SynthCT" if kind == "ct" else "SynthMRI")
    if "_" in name or not name:
        raise DatasetError(f"task name must be non-empty without '_' (Decathlon folders are TaskXX_Name), found {name!r}")
    if num_cases < 1 or num_test < 0:
        raise DatasetError(f"need num_cases >= 1 and num_test >= 0, found {num_cases} and {num_test}")
    if kind == "ct":
        if num_channels not in (None, 1):
            raise DatasetError(f"CT tasks have one channel, found num_channels={num_channels}")
        channels: tuple[str, ...] = ("CT",)
    else:
        n = 3 if num_channels is None else int(num_channels)
        if not 1 <= n <= len(MRI_CHANNELS):
            raise DatasetError(f"num_channels must be 1..{len(MRI_CHANNELS)} for MRI, found {num_channels}")
        channels = MRI_CHANNELS[:n]
    shape_range = tuple(tuple(int(v) for v in r) for r in (shape_range or DEFAULT_SHAPE_RANGE[kind]))
    if len(shape_range) != 3 or any(lo < 4 or hi < lo for lo, hi in shape_range):
        raise DatasetError(f"shape_range must be three (min, max) pairs with 4 <= min <= max, found {shape_range}")
    sz_range = tuple(spacing_z_range or _DEFAULT_SPACING[kind][0])
    sxy_range = tuple(spacing_xy_range or _DEFAULT_SPACING[kind][1])
    if min(sz_range + sxy_range) <= 0:
        raise DatasetError(f"spacing ranges must be positive, found z {sz_range}, in-plane {sxy_range}")

    out_root = Path(out_root)
    task = out_root / f"Task{task_id:02d}_{name}"
    if task.exists() and not overwrite:
        raise DatasetError(f"`{task}` already exists; remove it or pass overwrite=True")
    out_root.mkdir(parents=True, exist_ok=True)

    prefix = name.lower()
    seqs = np.random.SeedSequence(seed).spawn(num_cases + num_test)
    tmp = temporary_sibling(task)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir(parents=True)
        training, test = [], []
        for i, ss in enumerate(seqs):
            is_train = i < num_cases
            case = f"{prefix}_{i:03d}"
            rng = np.random.default_rng(ss)
            shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in shape_range)
            if kind == "ct":
                sxy = float(rng.uniform(*sxy_range))
                spacing = (float(rng.uniform(*sz_range)), sxy, sxy)
                image, seg = _ct_case(shape, spacing, rng, margin=(i % 3 == 1))
            else:
                spacing = (float(rng.uniform(*sz_range)), float(rng.uniform(*sxy_range)), float(rng.uniform(*sxy_range)))
                image, seg = _mri_case(shape, spacing, rng, channels)
            direction, origin = _geometry(kind, shape, spacing, rng)
            sub = "imagesTr" if is_train else "imagesTs"
            _write(image, spacing, origin, direction, tmp / sub / f"{case}.nii.gz")
            if is_train:
                _write(seg, spacing, origin, direction, tmp / "labelsTr" / f"{case}.nii.gz")
                training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            else:
                test.append(f"./imagesTs/{case}.nii.gz")
            logger.debug("synthesized %s case %s shape %s spacing %s", kind, case, shape, spacing)
        dataset = {
            "name": name,
            "description": f"nnfast synthetic {'CT' if kind == 'ct' else 'multi-parametric MRI'} task (seed {seed})",
            "reference": "nnfast.synth.synthesize_msd",
            "licence": "CC-BY-SA 4.0",
            "release": "1.0",
            "tensorImageSize": "3D" if len(channels) == 1 else "4D",
            "modality": {str(c): m for c, m in enumerate(channels)},
            "labels": dict(CT_LABELS if kind == "ct" else MRI_LABELS),
            "numTraining": num_cases,
            "numTest": num_test,
            "training": training,
            "test": test,
        }
        with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
            json.dump(dataset, f, indent=4)
        if task.exists():
            shutil.rmtree(task)
        os.replace(tmp, task)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote synthetic %s task %s (%d training, %d test cases)", kind, task, num_cases, num_test)
    return task


# ----------------------------------------------------------------------------------------------------------------
# geometry and writing


def _geometry(kind: str, shape, spacing, rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, ...]]:
    """A 3x3 direction matrix and an origin (SimpleITK x, y, z order) centring the volume sensibly."""
    extent = np.array([shape[2] * spacing[2], shape[1] * spacing[1], shape[0] * spacing[0]])  # x, y, z mm
    if kind == "ct":
        direction = np.eye(3)
        origin = np.array([-extent[0] / 2, -extent[1] / 2, -float(rng.uniform(200.0, 700.0))])
        origin[:2] += rng.uniform(-10.0, 10.0, 2)
    else:
        a = np.deg2rad(rng.uniform(-10.0, 10.0))
        direction = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        origin = -direction @ (extent / 2)
    return direction, tuple(float(round(o, 4)) for o in origin)


def _write(arr: np.ndarray, spacing, origin, direction: np.ndarray, path: Path) -> None:
    """Write ``arr`` ((z, y, x) or (c, z, y, x), the latter as a 4D scalar image) as compressed NIfTI."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr, isVector=False)
    sitk_spacing = tuple(float(s) for s in spacing[::-1])
    if arr.ndim == 4:
        d4 = np.eye(4)
        d4[:3, :3] = direction
        img.SetSpacing(sitk_spacing + (1.0,))
        img.SetOrigin(tuple(origin) + (0.0,))
        img.SetDirection(tuple(d4.ravel()))
    else:
        img.SetSpacing(sitk_spacing)
        img.SetOrigin(tuple(origin))
        img.SetDirection(tuple(np.asarray(direction).ravel()))
    sitk.WriteImage(img, str(path), True)


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def _smooth_field(shape, spacing, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
    """A smooth random field (float32, ~unit std) with correlation length ~``scale_mm``.

    White noise on a coarse grid (one node per ``scale_mm``) interpolated to ``shape`` with separable Gaussian
    weights (three small matrix products) and scaled to unit variance per voxel. The field is not re-normalised
    over the volume, so a volume smaller than ``scale_mm`` gets a nearly constant field, as it should.
    """
    nodes = [max(2, int(np.ceil(n * s / scale_mm)) + 1) for n, s in zip(shape, spacing)]
    coarse = rng.standard_normal(nodes).astype(np.float32)
    mats, norms = [], []
    for n_out, n_in in zip(shape, nodes):
        pos = (np.arange(n_out) + 0.5) * (n_in - 1) / n_out
        w = np.exp(-0.5 * ((pos[:, None] - np.arange(n_in)[None, :]) / 0.6) ** 2)
        w /= w.sum(axis=1, keepdims=True)
        mats.append(w.astype(np.float32))
        norms.append((1.0 / np.sqrt((w**2).sum(axis=1))).astype(np.float32))  # unit variance at every voxel
    mz, my, mx = mats
    nz, ny, nx = shape
    # three plain 2D GEMMs: x on the coarse grid, then y, then z (the largest output) last
    f = coarse.reshape(-1, nodes[2]) @ mx.T  # (Nz*Ny, nx)
    f = f.reshape(nodes[0], nodes[1], nx).transpose(1, 0, 2).reshape(nodes[1], -1)
    f = (my * norms[1][:, None]) @ f  # (ny, Nz*nx)
    f = f.reshape(ny, nodes[0], nx).transpose(1, 0, 2).reshape(nodes[0], -1)
    f = (mz * norms[0][:, None]) @ f  # (nz, ny*nx)
    f = f.reshape(nz, ny, nx)
    f *= norms[2][None, None, :]
    return np.ascontiguousarray(f, dtype=np.float32)


def _axes_mm(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable centred coordinates in mm: Z (nz,1,1), Y (1,ny,1), X (1,1,nx), float32."""
    z, y, x = ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(s) for n, s in zip(shape, spacing))
    return z[:, None, None], y[None, :, None], x[None, None, :]


def _ellipsoid(Z, Y, X, centre, semi) -> np.ndarray:
    """Normalised squared radius ((z-cz)/az)^2 + ... (float32, full shape)."""
    return ((Z - centre[0]) / semi[0]) ** 2 + ((Y - centre[1]) / semi[1]) ** 2 + ((X - centre[2]) / semi[2]) ** 2


def _voxel_of(centre_mm, shape, spacing) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(c / s + (n - 1) / 2), 0, n - 1)) for c, s, n in zip(centre_mm, spacing, shape))


def _snap(centre_mm, shape, spacing) -> tuple[float, float, float]:
    """Move a point (mm, centred coordinates) onto the nearest voxel centre."""
    v = _voxel_of(centre_mm, shape, spacing)
    return tuple(float((i - (n - 1) / 2) * s) for i, n, s in zip(v, shape, spacing))


# ----------------------------------------------------------------------------------------------------------------
# CT


def _ct_case(shape, spacing, rng: np.random.Generator, margin: bool) -> tuple[np.ndarray, np.ndarray]:
    """One CT case: (image int16 HU (z, y, x), labels uint8 (z, y, x))."""
    nz, ny, nx = shape
    Z, Y, X = _axes_mm(shape, spacing)
    half_y, half_x = ny * spacing[1] / 2, nx * spacing[2] / 2
    half_z = nz * spacing[0] / 2

    # body: elliptical cross-section whose size breathes slowly along z
    fill = rng.uniform(0.55, 0.72) if margin else rng.uniform(0.86, 0.97)
    a = half_x * fill
    b = min(a * rng.uniform(0.62, 0.8), half_y * 0.95)
    cx = rng.uniform(-0.04, 0.04) * half_x
    cy = rng.uniform(-0.04, 0.04) * half_y
    s = 1.0 + 0.04 * np.sin(2 * np.pi * Z / rng.uniform(150, 300) + rng.uniform(0, 2 * np.pi))
    boundary = 1.0 + 0.02 * _smooth_field(shape, spacing, rng, 40.0)
    r_body = ((X - cx) / (a * s)) ** 2 + ((Y - cy) / (b * s)) ** 2
    body = r_body <= boundary
    k = b / 120.0  # in-plane anatomy scales with the body (an adult abdomen has b ~ 120 mm)
    fat_frac = 1.0 - rng.uniform(10.0, 25.0) * k / b
    inner = r_body <= boundary * fat_frac**2

    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = -100.0
    tissue = _smooth_field(shape, spacing, rng, 25.0)
    soft = np.float32(40.0) + 6.0 * tissue
    img[inner] = soft[inner]
    visceral_fat = inner & (tissue > 1.3)
    img[visceral_fat] = -90.0

    # spine: vertebral bodies (cortical shell, cancellous core) separated by discs, spinous processes; ribs
    spine_y = cy + b * 0.55
    r_vb = rng.uniform(13.0, 18.0) * k
    period = rng.uniform(24.0, 30.0)
    zphase = rng.uniform(0, period)
    disc = ((Z + zphase) % period) < 5.0
    d2 = (X - cx) ** 2 + (Y - spine_y) ** 2
    vb = d2 <= r_vb**2
    shell = vb & (d2 >= (r_vb - 3.0 * k) ** 2)
    process = (np.abs(X - cx) < 5.0 * k) & (Y > spine_y + r_vb - 2 * k) & (Y < spine_y + r_vb + rng.uniform(20, 30) * k)
    bone = np.zeros(shape, dtype=bool)
    np.logical_or(vb, process & inner, out=bone)
    bone &= ~disc
    theta = np.arctan2(Y - cy, X - cx)
    rib_band = ((Z + 12.0 * np.sin(theta) + zphase) % period) < rng.uniform(7.0, 10.0)
    rib_shell = (r_body >= (fat_frac - 0.07) ** 2) & (r_body <= (fat_frac - 0.02) ** 2)
    ribs = rib_band & rib_shell & ((np.abs(X - cx) > 0.25 * a) | (Y > cy))
    img[vb & disc] = 80.0
    img[bone] = 350.0
    img[(shell & ~disc) | ribs] = 800.0
    bone |= ribs

    # organ on the patient's right, irregular boundary, textured; tumours inside
    oc = (rng.uniform(-0.2, 0.2) * half_z, cy - 0.1 * b + rng.uniform(-0.05, 0.05) * b, cx - 0.38 * a)
    oc = _snap(oc, shape, spacing)
    osemi = (
        min(rng.uniform(35.0, 80.0), max(0.45 * half_z, 1.6 * spacing[0])),
        b * rng.uniform(0.38, 0.52),
        a * rng.uniform(0.3, 0.4),
    )
    r_org = _ellipsoid(Z, Y, X, oc, osemi) + 0.12 * _smooth_field(shape, spacing, rng, 15.0)
    organ = (r_org <= 1.0) & inner & ~bone
    texture = _smooth_field(shape, spacing, rng, 4.0)
    img[organ] = 60.0 + 8.0 * texture[organ]
    seg = np.zeros(shape, dtype=np.uint8)
    seg[organ] = 1
    for _ in range(int(rng.integers(1, 3))):
        off = rng.uniform(-0.35, 0.35, 3) * np.asarray(osemi)
        tc = _snap(np.asarray(oc) + off, shape, spacing)
        rt = rng.uniform(0.28, 0.45) * min(osemi[1:])
        tsemi = (max(rt, 1.2 * spacing[0]), rt, rt)
        tumour = (_ellipsoid(Z, Y, X, tc, tsemi) <= 1.0) & organ
        img[tumour] = 20.0 + 6.0 * texture[tumour]
        seg[tumour] = 2
    # guarantee both labels exist even on tiny grids
    cv = _voxel_of(oc, shape, spacing)
    if not (seg == 1).any():
        seg[cv] = 1
    if not (seg == 2).any():
        seg[cv] = 2

    # smooth additive bias inside the body and white noise everywhere (less in air)
    bias = _smooth_field(shape, spacing, rng, 80.0)
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = np.where(body, np.float32(rng.uniform(8.0, 18.0)), np.float32(4.0))
    img += np.where(body, 8.0 * bias, 0.0).astype(np.float32) + sigma * noise
    np.clip(img, -1024, 3071, out=img)
    return np.rint(img).astype(np.int16), seg


# ----------------------------------------------------------------------------------------------------------------
# MRI


def _mri_case(shape, spacing, rng: np.random.Generator, channels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One skull-stripped brain MRI case: (image float32 (c, z, y, x) or (z, y, x) for one channel, labels uint8)."""
    Z, Y, X = _axes_mm(shape, spacing)
    half = [n * s / 2 for n, s in zip(shape, spacing)]
    semi = (half[0] * rng.uniform(0.8, 0.95), half[1] * rng.uniform(0.72, 0.86), half[2] * rng.uniform(0.62, 0.76))
    centre = tuple(rng.uniform(-0.04, 0.04) * h for h in half)
    r_brain = _ellipsoid(Z, Y, X, centre, semi) + 0.05 * _smooth_field(shape, spacing, rng, 20.0)
    brain = r_brain <= 1.0
    grey = brain & (r_brain > rng.uniform(0.55, 0.7))
    vsemi = (semi[0] * 0.25, semi[1] * 0.3, semi[2] * 0.09)
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        vc = (centre[0] + 0.1 * semi[0], centre[1] - 0.05 * semi[1], centre[2] + side * 0.13 * semi[2])
        ventricles |= _ellipsoid(Z, Y, X, vc, vsemi) <= 1.0
    ventricles &= brain

    side = rng.choice([-1.0, 1.0])
    lc = (
        centre[0] + rng.uniform(-0.2, 0.3) * semi[0],
        centre[1] + rng.uniform(-0.3, 0.3) * semi[1],
        centre[2] + side * rng.uniform(0.35, 0.5) * semi[2],
    )
    lc = _snap(lc, shape, spacing)
    esemi = tuple(rng.uniform(0.2, 0.3) * s for s in semi)
    r_ed = _ellipsoid(Z, Y, X, lc, esemi) + 0.2 * _smooth_field(shape, spacing, rng, 8.0)
    edema = (r_ed <= 1.0) & brain & ~ventricles
    tsemi = tuple(e * rng.uniform(0.4, 0.55) for e in esemi)
    tumour = (_ellipsoid(Z, Y, X, lc, tsemi) + 0.15 * _smooth_field(shape, spacing, rng, 5.0) <= 1.0) & edema
    seg = np.zeros(shape, dtype=np.uint8)
    seg[edema] = 1
    seg[tumour] = 2
    cv = _voxel_of(lc, shape, spacing)
    if not (seg == 1).any() and brain[cv]:
        seg[cv] = 1
    if not (seg == 2).any() and brain[cv]:
        seg[cv] = 2

    # tissue index per voxel: 0 WM, 1 GM, 2 CSF, 3 oedema, 4 tumour
    tissue = np.zeros(shape, dtype=np.int8)
    tissue[grey] = 1
    tissue[ventricles] = 2
    tissue[edema] = 3
    tissue[tumour] = 4
    out = np.zeros((len(channels), *shape), dtype=np.float32)
    texture = _smooth_field(shape, spacing, rng, 3.0)
    for c, ch in enumerate(channels):
        scale = float(rng.uniform(300.0, 1200.0))
        signal = np.asarray(_MRI_CONTRAST[ch], dtype=np.float32)[tissue] * (1.0 + 0.04 * texture)
        signal *= np.exp(0.12 * _smooth_field(shape, spacing, rng, 60.0))
        sigma = np.float32(0.025)
        n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
        rician = np.sqrt((signal + n1) ** 2 + n2**2) * np.float32(scale)
        out[c][brain] = np.maximum(rician[brain], np.float32(1e-3))  # strictly positive inside the brain
    return (out[0] if len(channels) == 1 else out), seg
