"""Decathlon (MSD) conversion: layout, geometry, dataset.json, errors, and parity with nnU-Net's converter."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnfast.convert.msd import convert_msd, parse_msd_folder_name
from nnfast.errors import DatasetError, ImageReadError
from nnfast.synth import synthesize_msd

CT_SHAPES = ((8, 12), (24, 32), (24, 32))
MRI_SHAPES = ((10, 12), (14, 16), (14, 16))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _assert_same_image(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetDimension() == ib.GetDimension() == 3, a
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))
    assert sitk.GetArrayFromImage(ia).dtype == sitk.GetArrayFromImage(ib).dtype
    assert ia.GetSpacing() == ib.GetSpacing() and ia.GetOrigin() == ib.GetOrigin()
    assert ia.GetDirection() == ib.GetDirection()


@pytest.fixture(scope="module")
def ct_msd(tmp_path_factory):
    return synthesize_msd(tmp_path_factory.mktemp("msd"), task_id=7, num_cases=3, num_test=2, shape_range=CT_SHAPES)


@pytest.fixture(scope="module")
def mri_msd(tmp_path_factory):
    return synthesize_msd(tmp_path_factory.mktemp("msd"), task_id=5, kind="mri", num_cases=2, num_test=1,
                          shape_range=MRI_SHAPES, seed=2)


def test_parse_folder_name():
    assert parse_msd_folder_name("/x/Task05_Prostate") == (5, "Prostate")
    assert parse_msd_folder_name("Task101_My_Task") == (101, "My_Task")
    for bad in ("Dataset005_Prostate", "Task05", "Prostate", "TaskAB_x"):
        with pytest.raises(DatasetError, match="Decathlon task folder"):
            parse_msd_folder_name(bad)


def test_ct_layout_copies_and_dataset_json(ct_msd, tmp_path):
    out = convert_msd(ct_msd, tmp_path / "raw")
    assert out == tmp_path / "raw" / "Dataset007_SynthCT"
    assert _files(out) == sorted(
        ["dataset.json"]
        + [f"imagesTr/synthct_00{i}_0000.nii.gz" for i in range(3)]
        + [f"labelsTr/synthct_00{i}.nii.gz" for i in range(3)]
        + [f"imagesTs/synthct_00{i}_0000.nii.gz" for i in (3, 4)]
    )
    assert os.listdir(tmp_path / "raw") == ["Dataset007_SynthCT"]  # no temporary folder left
    for i in range(3):  # 3D images and labels are byte copies
        assert (out / f"imagesTr/synthct_00{i}_0000.nii.gz").read_bytes() == (
            ct_msd / f"imagesTr/synthct_00{i}.nii.gz").read_bytes()
        assert (out / f"labelsTr/synthct_00{i}.nii.gz").read_bytes() == (
            ct_msd / f"labelsTr/synthct_00{i}.nii.gz").read_bytes()
    d = json.loads((out / "dataset.json").read_text())
    assert list(d) == ["name", "description", "reference", "licence", "release", "tensorImageSize", "labels",
                       "numTraining", "numTest", "file_ending", "channel_names"]
    assert d["labels"] == {"background": 0, "organ": 1, "tumour": 2}
    assert d["channel_names"] == {"0": "CT"} and d["file_ending"] == ".nii.gz" and d["numTraining"] == 3


def test_4d_split_geometry(mri_msd, tmp_path):
    out = convert_msd(mri_msd, tmp_path / "raw", dataset_id=205)
    assert out.name == "Dataset205_SynthMRI"
    for sub, case in (("imagesTr", "synthmri_000"), ("imagesTr", "synthmri_001"), ("imagesTs", "synthmri_002")):
        src = sitk.ReadImage(str(mri_msd / sub / f"{case}.nii.gz"))
        arr4 = sitk.GetArrayFromImage(src)
        d4 = np.array(src.GetDirection()).reshape(4, 4)
        assert not np.allclose(d4[:3, :3], np.eye(3))  # oblique, so the 3x3 block matters
        for t in range(3):
            img = sitk.ReadImage(str(out / sub / f"{case}_{t:04d}.nii.gz"))
            assert img.GetDimension() == 3
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr4[t])
            assert np.allclose(img.GetSpacing(), src.GetSpacing()[:3])
            assert np.allclose(img.GetOrigin(), src.GetOrigin()[:3])
            assert np.allclose(np.array(img.GetDirection()).reshape(3, 3), d4[:3, :3], atol=1e-6)
        assert not (out / sub / f"{case}_0003.nii.gz").exists()
    d = json.loads((out / "dataset.json").read_text())
    assert d["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
    assert d["labels"] == {"background": 0, "edema": 1, "tumour": 2}


def test_workers_give_the_same_result(mri_msd, tmp_path, monkeypatch):
    monkeypatch.setattr("nnfast.convert.msd.POOL_MIN_BYTES", 0)  # use the worker pool even for tiny files
    a = convert_msd(mri_msd, tmp_path / "a", workers=1)
    b = convert_msd(mri_msd, tmp_path / "b", workers=2)
    assert _files(a) == _files(b)
    for f in _files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.compat
@pytest.mark.parametrize("task", ["ct_msd", "mri_msd"])
def test_matches_nnunet_converter(task, request, tmp_path, monkeypatch):
    from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset

    src = request.getfixturevalue(task)
    ref_raw = tmp_path / "nnunet_raw"
    ref_raw.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(ref_raw))  # nnunetv2.paths reads the environment lazily
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    convert_msd_dataset(str(src), num_processes=1)
    ours = convert_msd(src, tmp_path / "ours")
    (ref,) = list(ref_raw.iterdir())
    assert ref.name == ours.name
    assert _files(ours) == _files(ref)
    assert json.loads((ours / "dataset.json").read_text()) == json.loads((ref / "dataset.json").read_text())
    assert list(json.loads((ours / "dataset.json").read_text())) == list(json.loads((ref / "dataset.json").read_text()))
    assert (ours / "dataset.json").read_bytes() == (ref / "dataset.json").read_bytes()
    for f in _files(ours):
        if f.endswith(".nii.gz"):
            _assert_same_image(ours / f, ref / f)
        if f.startswith("labelsTr"):
            assert (ours / f).read_bytes() == (ref / f).read_bytes()


def test_real_4d_scan_from_nibabel(tmp_path):
    nib = pytest.importorskip("nibabel")
    example = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    if not example.is_file():
        pytest.skip(f"the installed nibabel wheel does not ship its test data ({example} is missing)")
    task = tmp_path / "Task09_Example"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    shutil.copyfile(example, task / "imagesTr" / "ex_000.nii.gz")
    src = sitk.ReadImage(str(example))
    assert src.GetDimension() == 4
    n_t = src.GetSize()[3]
    # a label on the 3D grid of the scan: a box in the middle
    size3 = src.GetSize()[:3]
    lab = np.zeros(size3[::-1], np.uint8)
    lab[size3[2] // 4: size3[2] // 2, size3[1] // 4: size3[1] // 2, size3[0] // 4: size3[0] // 2] = 1
    lab_img = sitk.GetImageFromArray(lab)
    lab_img.SetSpacing(src.GetSpacing()[:3])
    lab_img.SetOrigin(src.GetOrigin()[:3])
    lab_img.SetDirection(tuple(np.array(src.GetDirection()).reshape(4, 4)[:3, :3].ravel()))
    sitk.WriteImage(lab_img, str(task / "labelsTr" / "ex_000.nii.gz"), True)
    (task / "dataset.json").write_text(json.dumps({
        "name": "Example", "modality": {str(t): f"frame{t}" for t in range(n_t)},
        "labels": {"0": "background", "1": "box"}, "numTraining": 1, "numTest": 0,
        "training": [{"image": "./imagesTr/ex_000.nii.gz", "label": "./labelsTr/ex_000.nii.gz"}], "test": [],
    }))
    out = convert_msd(task, tmp_path / "raw")
    data = np.asanyarray(nib.load(str(example)).dataobj)  # (x, y, z, t)
    zooms = nib.load(str(example)).header.get_zooms()
    for t in range(n_t):
        img = sitk.ReadImage(str(out / "imagesTr" / f"ex_000_{t:04d}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), data[..., t].transpose(2, 1, 0))
        assert np.allclose(img.GetSpacing(), zooms[:3])
        assert np.allclose(img.GetOrigin(), lab_img.GetOrigin())
        assert np.allclose(img.GetDirection(), lab_img.GetDirection(), atol=1e-6)
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {str(t): f"frame{t}" for t in range(n_t)}
    from nnfast.verify import verify_dataset

    report = verify_dataset(out)
    assert report.errors == [], report.format()


# ------------------------------------------------------------------------------------------------ errors


def _tiny_task(root: Path, name="Task03_Tiny") -> Path:
    return synthesize_msd(root, task_id=int(name[4:6]), name=name.split("_", 1)[1], num_cases=1, num_test=0,
                          shape_range=((6, 6), (12, 12), (12, 12)))


def test_missing_parts_are_named(tmp_path):
    for part in ("imagesTr", "labelsTr", "dataset.json"):
        task = _tiny_task(tmp_path / part)
        p = task / part
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        with pytest.raises(DatasetError, match=part.replace(".", r"\.")):
            convert_msd(task, tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_not_a_task_folder(tmp_path):
    folder = tmp_path / "Prostate"
    folder.mkdir()
    with pytest.raises(DatasetError, match="Task05_Prostate"):
        convert_msd(folder, tmp_path / "raw")
    with pytest.raises(DatasetError, match="does not exist"):
        convert_msd(tmp_path / "Task01_Nothing", tmp_path / "raw")


def test_id_already_used_names_the_folder(tmp_path):
    task = _tiny_task(tmp_path)
    (tmp_path / "raw" / "Dataset003_Other").mkdir(parents=True)
    with pytest.raises(DatasetError, match="Dataset003_Other"):
        convert_msd(task, tmp_path / "raw")
    out = convert_msd(task, tmp_path / "raw", dataset_id=4)
    assert out.name == "Dataset004_Tiny"
    with pytest.raises(DatasetError, match="Dataset004_Tiny"):
        convert_msd(task, tmp_path / "raw", dataset_id=4)


def test_5d_file_is_named_and_nothing_is_left(tmp_path):
    nib = pytest.importorskip("nibabel")
    task = _tiny_task(tmp_path)
    bad = task / "imagesTr" / "tiny_bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2, 3), np.float32), np.eye(4)), str(bad))
    with pytest.raises(ImageReadError, match=r"tiny_bad\.nii\.gz.*5 dimensions"):
        convert_msd(task, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []  # the hidden temporary folder was removed


def test_truncated_input_is_named(tmp_path):
    task = _tiny_task(tmp_path)
    f = task / "imagesTr" / "tiny_000.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"tiny_000\.nii\.gz.*truncated"):
        convert_msd(task, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


def test_hidden_and_foreign_files_ignored_imagests_optional(tmp_path):
    task = _tiny_task(tmp_path)
    shutil.rmtree(task / "imagesTs")
    (task / "imagesTr" / "._tiny_000.nii.gz").write_bytes(b"macOS resource fork")
    (task / "imagesTr" / "_notes.nii.gz").write_bytes(b"x")
    (task / "labelsTr" / "README.txt").write_text("hello")
    out = convert_msd(task, tmp_path / "raw")
    assert _files(out) == ["dataset.json", "imagesTr/tiny_000_0000.nii.gz", "labelsTr/tiny_000.nii.gz"]
    assert (out / "imagesTs").is_dir()


def test_malformed_msd_dataset_json(tmp_path):
    task = _tiny_task(tmp_path)
    d = json.loads((task / "dataset.json").read_text())
    d["labels"] = {"0": "background", "1": "organ", "2": "organ"}
    (task / "dataset.json").write_text(json.dumps(d))
    with pytest.raises(DatasetError, match="organ"):
        convert_msd(task, tmp_path / "raw")
    d["labels"] = {"0": "background", "1": "organ"}
    d["channel_names"] = d.pop("modality")
    (task / "dataset.json").write_text(json.dumps(d))
    with pytest.raises(DatasetError, match="nnU-Net v2 dataset already"):
        convert_msd(task, tmp_path / "raw")
    (task / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        convert_msd(task, tmp_path / "raw")
