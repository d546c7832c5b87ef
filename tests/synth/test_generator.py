"""Synthetic Decathlon task generator: determinism, layout, labels, geometry, CT/MRI specifics."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from nnfast.errors import DatasetError
from nnfast.synth import synthesize_msd

SMALL = ((10, 14), (40, 56), (40, 56))


def _read(p):
    img = sitk.ReadImage(str(p))
    return sitk.GetArrayFromImage(img), img


@pytest.fixture(scope="module")
def ct_task(tmp_path_factory):
    return synthesize_msd(tmp_path_factory.mktemp("ct"), num_cases=6, num_test=2, shape_range=SMALL, seed=3)


@pytest.fixture(scope="module")
def mri_task(tmp_path_factory):
    return synthesize_msd(tmp_path_factory.mktemp("mri"), task_id=4, kind="mri", num_cases=3, num_test=1,
                          shape_range=((16, 20), (24, 28), (24, 28)), seed=1)


def test_layout_and_dataset_json(ct_task):
    assert ct_task.name == "Task01_SynthCT"
    d = json.loads((ct_task / "dataset.json").read_text())
    assert d["modality"] == {"0": "CT"}
    assert d["labels"] == {"0": "background", "1": "organ", "2": "tumour"}
    assert d["numTraining"] == 6 and d["numTest"] == 2 and d["tensorImageSize"] == "3D"
    assert len(d["training"]) == 6 and len(d["test"]) == 2
    for entry in d["training"]:
        assert entry["image"].startswith("./imagesTr/") and entry["label"].startswith("./labelsTr/")
        assert (ct_task / entry["image"]).is_file() and (ct_task / entry["label"]).is_file()
    for t in d["test"]:
        assert (ct_task / t).is_file()
    assert sorted(p.name for p in (ct_task / "imagesTr").iterdir()) == sorted(p.name for p in (ct_task / "labelsTr").iterdir())
    assert not any(p.name.startswith(".") for p in ct_task.parent.iterdir())  # no temporary folder left


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize_msd(tmp_path / "a", num_cases=2, num_test=1, shape_range=SMALL, seed=7)
    b = synthesize_msd(tmp_path / "b", num_cases=2, num_test=1, shape_range=SMALL, seed=7)
    c = synthesize_msd(tmp_path / "c", num_cases=2, num_test=1, shape_range=SMALL, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    x, _ = _read(a / "imagesTr" / "synthct_000.nii.gz")
    y, _ = _read(c / "imagesTr" / "synthct_000.nii.gz")
    assert x.shape != y.shape or not np.array_equal(x, y)
    # adding test cases does not change training cases
    d = synthesize_msd(tmp_path / "d", num_cases=2, num_test=0, shape_range=SMALL, seed=7)
    assert (d / "labelsTr" / "synthct_001.nii.gz").read_bytes() == (a / "labelsTr" / "synthct_001.nii.gz").read_bytes()


def test_ct_intensities_labels_and_geometry(ct_task):
    spacings, shapes = [], []
    for p in sorted((ct_task / "imagesTr").iterdir()):
        img, itk = _read(p)
        seg, sitk_seg = _read(ct_task / "labelsTr" / p.name)
        assert img.dtype == np.int16 and seg.dtype == np.uint8
        assert img.shape == seg.shape
        assert sitk_seg.GetSpacing() == itk.GetSpacing() and sitk_seg.GetOrigin() == itk.GetOrigin()
        assert set(np.unique(seg)) == {0, 1, 2}
        # tumour darker than organ, organ brighter than fat, air at about -1000, some bone
        organ, tumour = img[seg == 1].mean(), img[seg == 2].mean()
        assert 35 < organ < 85 and tumour < organ - 15
        assert np.median(img[0, 0]) < -950  # a corner of the slice is air
        assert (img > 500).sum() > 50
        assert -1024 <= img.min() and img.max() <= 3071
        sx, sy, sz = itk.GetSpacing()
        assert sx == sy and 0.6 <= sx <= 0.9 and 2.5 <= sz <= 5.0 and sz / sx > 2.5  # anisotropic
        assert itk.GetDirection() == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
        spacings.append(itk.GetSpacing())
        shapes.append(img.shape)
    assert len(set(spacings)) == len(spacings)  # varies per case
    assert len(set(shapes)) > 1
    for z, y, x in shapes:
        assert SMALL[0][0] <= z <= SMALL[0][1] and SMALL[1][0] <= y <= SMALL[1][1] and SMALL[2][0] <= x <= SMALL[2][1]


def test_ct_some_bodies_do_not_fill_the_field_of_view(ct_task):
    bbox_fraction = []
    for p in sorted((ct_task / "imagesTr").iterdir()):
        img, _ = _read(p)
        body = (img > -500).any(axis=0)
        ys, xs = np.nonzero(body.any(axis=1))[0], np.nonzero(body.any(axis=0))[0]
        bbox_fraction.append((ys[-1] - ys[0] + 1) * (xs[-1] - xs[0] + 1) / body.size)
    assert min(bbox_fraction) < 0.45  # a small patient in a large field of view
    assert max(bbox_fraction) > 0.65


def test_mri_is_4d_multichannel_with_zero_background(mri_task):
    d = json.loads((mri_task / "dataset.json").read_text())
    assert d["modality"] == {"0": "T1", "1": "T2", "2": "FLAIR"} and d["tensorImageSize"] == "4D"
    for p in sorted((mri_task / "imagesTr").iterdir()):
        arr, itk = _read(p)
        assert itk.GetDimension() == 4 and arr.ndim == 4 and arr.shape[0] == 3 and arr.dtype == np.float32
        seg, sseg = _read(mri_task / "labelsTr" / p.name)
        assert sseg.GetDimension() == 3 and seg.shape == arr.shape[1:]
        assert set(np.unique(seg)) == {0, 1, 2}
        nonzero = (arr != 0).any(axis=0)
        assert 0.2 < nonzero.mean() < 0.8  # zero outside the brain: cropping and the mask rule apply
        assert np.all((arr != 0) == nonzero[None])  # one mask for all channels
        assert nonzero[seg > 0].all()
        # contrasts differ: FLAIR lesion is bright relative to brain, T1 lesion is not
        flair, t1 = arr[2], arr[0]
        assert flair[seg == 1].mean() > 1.3 * flair[nonzero & (seg == 0)].mean()
        assert t1[seg == 1].mean() < t1[nonzero & (seg == 0)].mean()
        sp = np.array(itk.GetSpacing()[:3])
        assert sp.max() / sp.min() < 1.5  # nearly isotropic
        assert sseg.GetSpacing() == itk.GetSpacing()[:3] and sseg.GetOrigin() == itk.GetOrigin()[:3]
        d4 = np.array(itk.GetDirection()).reshape(4, 4)
        assert np.allclose(d4[:3, :3], np.array(sseg.GetDirection()).reshape(3, 3))
        assert np.allclose(d4[:3, :3] @ d4[:3, :3].T, np.eye(3)) and d4[3, 3] == 1.0


def test_mri_single_channel_is_3d(tmp_path):
    t = synthesize_msd(tmp_path, kind="mri", num_cases=1, num_test=0, num_channels=1,
                       shape_range=((12, 12), (16, 16), (16, 16)))
    arr, itk = _read(t / "imagesTr" / "synthmri_000.nii.gz")
    assert itk.GetDimension() == 3 and arr.shape == (12, 16, 16)


def test_fast_enough(tmp_path):
    t0 = time.perf_counter()
    synthesize_msd(tmp_path, num_cases=8, num_test=0, shape_range=((40, 48), (96, 112), (96, 112)))
    assert time.perf_counter() - t0 < 15.0  # ~1 s on an idle core, 3 s at load 8 on 2 cores; per-voxel loops: minutes


def test_bad_arguments_and_existing_folder(tmp_path):
    with pytest.raises(DatasetError, match="kind"):
        synthesize_msd(tmp_path, kind="pet")  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="without '_'"):
        synthesize_msd(tmp_path, name="bad_name")
    with pytest.raises(DatasetError, match="shape_range"):
        synthesize_msd(tmp_path, shape_range=((2, 3), (8, 8), (8, 8)))
    synthesize_msd(tmp_path, num_cases=1, num_test=0, shape_range=SMALL)
    with pytest.raises(DatasetError, match="already exists"):
        synthesize_msd(tmp_path, num_cases=1, num_test=0, shape_range=SMALL)
    t = synthesize_msd(tmp_path, num_cases=2, num_test=0, shape_range=SMALL, overwrite=True)
    assert len(list((t / "labelsTr").iterdir())) == 2
