"""Fixture factories: small synthetic cases and datasets written to disk as real NIfTI files.

Shapes are given in SimpleITK array order (z, y, x) and spacings in the same order (mm), nnU-Net's reader order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk


def blob_labels(shape, rng, n_labels=2, empty=False) -> np.ndarray:
    """A label map with nested ellipsoids: label 1 an organ, label k>1 lesions inside it."""
    seg = np.zeros(shape, np.uint8)
    if empty:
        return seg
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    c = rng.uniform(-0.2, 0.2, 3)
    r = rng.uniform(0.35, 0.55, 3)
    organ = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
    seg[organ] = 1
    for lab in range(2, n_labels + 1):
        c2 = c + rng.uniform(-0.1, 0.1, 3)
        r2 = r * rng.uniform(0.25, 0.4)
        les = ((zz - c2[0]) / r2[0]) ** 2 + ((yy - c2[1]) / r2[1]) ** 2 + ((xx - c2[2]) / r2[2]) ** 2 < 1
        seg[les & organ] = lab
    return seg


def ct_image(seg: np.ndarray, rng, body_fraction=0.85) -> np.ndarray:
    """A CT-like int16 image: air outside an elliptical body, tissue, brighter organ, darker lesions, noise."""
    shape = seg.shape
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (yy / body_fraction) ** 2 + (xx / body_fraction) ** 2 < 1
    img = np.full(shape, -1000.0)
    img[body] = 30 + rng.normal(0, 15, body.sum())
    img[seg == 1] = 80 + rng.normal(0, 10, (seg == 1).sum())
    img[seg >= 2] = 10 + rng.normal(0, 10, (seg >= 2).sum())
    bone = body & ((yy - 0.5) ** 2 + xx ** 2 < 0.02)
    img[bone] = 700
    return np.clip(img, -1024, 3000).astype(np.int16)


def write_image(arr: np.ndarray, path: Path, spacing_zyx, origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    """Write ``arr`` ((z, y, x), or (t, z, y, x) for a 4D file) with reader-order spacing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sp = tuple(float(s) for s in spacing_zyx[::-1])
    if arr.ndim == 4:
        img = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arr])
        img.SetSpacing(sp + (1.0,))
        img.SetOrigin(tuple(origin) + (0.0,))
    else:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(sp)
        img.SetOrigin(tuple(origin))
        if direction is not None:
            img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)
    return path


def make_raw_dataset(
    raw_root: Path,
    dataset_id: int,
    name: str,
    shapes: Sequence[tuple[int, int, int]],
    spacings: Sequence[tuple[float, float, float]],
    *,
    channel_names: dict | None = None,
    n_labels: int = 2,
    seed: int = 0,
    empty_cases: Sequence[int] = (),
    kind: str = "ct",
) -> Path:
    """Write an nnU-Net v2 raw dataset ``Dataset{id:03d}_{name}`` with one case per shape."""
    rng = np.random.default_rng(seed)
    channel_names = channel_names or ({"0": "CT"} if kind == "ct" else {"0": "T1", "1": "T2"})
    root = raw_root / f"Dataset{dataset_id:03d}_{name}"
    for i, (shape, spacing) in enumerate(zip(shapes, spacings)):
        cid = f"case_{i:03d}"
        seg = blob_labels(shape, rng, n_labels, empty=i in empty_cases)
        if kind == "ct":
            chans = [ct_image(seg, rng)]
        else:
            zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
            head = (zz / 0.8) ** 2 + (yy / 0.7) ** 2 + (xx / 0.7) ** 2 < 1
            chans = []
            for c in range(len(channel_names)):
                im = np.where(head, 300 + 50 * c + rng.normal(0, 20, shape), 0.0)
                im[seg > 0] += 150 * (1 if c % 2 == 0 else -1)
                im[~head] = 0
                chans.append(im.astype(np.float32))
            seg[~head] = 0
        for c, im in enumerate(chans):
            write_image(im, root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", spacing)
        write_image(seg, root / "labelsTr" / f"{cid}.nii.gz", spacing)
    labels = {"background": 0, **{("organ" if k == 1 else f"lesion{k - 1}"): k for k in range(1, n_labels + 1)}}
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": labels, "numTraining": len(shapes), "file_ending": ".nii.gz",
        "name": name,
    }, indent=2))
    return root


#: nnU-Net's region dataset.json (``documentation/region_based_training.md``): label files hold 1 oedema,
#: 2 non-enhancing tumour, 3 enhancing tumour; the network predicts the nested regions.
BRATS_REGION_LABELS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
BRATS_REGIONS_CLASS_ORDER = [1, 2, 3]


def brats_case(shape, rng, n_channels: int = 2) -> tuple[list[np.ndarray], np.ndarray]:
    """A BraTS-like case: a head (0 outside) with a nested tumour, whole (label 1..3) > core (2..3) > enhancing (3).

    Each channel sees a different contrast of the three tissues, so no single channel separates all regions (as in
    BraTS: oedema shows in FLAIR, the enhancing rim in T1c). Returns ``(channels, labels)`` in (z, y, x) order.
    """
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = (zz / 0.9) ** 2 + (yy / 0.85) ** 2 + (xx / 0.85) ** 2 < 1
    c = rng.uniform(-0.2, 0.2, 3)
    r = rng.uniform(0.4, 0.55, 3)
    dist = np.sqrt(((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2)
    seg = np.zeros(shape, np.uint8)
    seg[(dist < 1) & head] = 1                       # oedema: the whole tumour's outer shell
    seg[(dist < 0.65) & head] = 3                    # enhancing rim
    seg[(dist < 0.4) & head] = 2                     # necrotic / non-enhancing centre (core, not enhancing)
    contrast = [(1.6, 0.8, 0.9), (0.9, 0.5, 1.7), (1.3, 1.2, 0.4), (0.7, 1.5, 1.1)]  # per channel: labels 1, 2, 3
    chans = []
    for ch in range(n_channels):
        im = np.where(head, 1.0 + rng.normal(0, 0.08, shape), 0.0)
        for lab, k in zip((1, 2, 3), contrast[ch % len(contrast)]):
            im[seg == lab] = k + rng.normal(0, 0.08, int((seg == lab).sum()))
        im[~head] = 0
        chans.append((300 * im).astype(np.float32))
    return chans, seg


def make_brats_dataset(raw_root: Path, dataset_id: int, name: str, shapes: Sequence[tuple[int, int, int]],
                       spacing=(1.0, 1.0, 1.0), *, n_channels: int = 2, seed: int = 0,
                       labels: dict | None = None, regions_class_order: Sequence[int] | None = None) -> Path:
    """Write a BraTS-like raw region dataset ``Dataset{id:03d}_{name}`` (nnU-Net's region dataset.json)."""
    rng = np.random.default_rng(seed)
    root = raw_root / f"Dataset{dataset_id:03d}_{name}"
    names = ("FLAIR", "T1c", "T2", "T1")
    for i, shape in enumerate(shapes):
        cid = f"case_{i:03d}"
        chans, seg = brats_case(shape, rng, n_channels)
        for c, im in enumerate(chans):
            write_image(im, root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", spacing)
        write_image(seg, root / "labelsTr" / f"{cid}.nii.gz", spacing)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): names[c] for c in range(n_channels)},
        "labels": labels if labels is not None else BRATS_REGION_LABELS,
        "regions_class_order": list(regions_class_order if regions_class_order is not None
                                    else BRATS_REGIONS_CLASS_ORDER),
        "numTraining": len(shapes), "file_ending": ".nii.gz", "name": name,
    }, indent=2))
    return root
