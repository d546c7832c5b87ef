"""Dataset verification: one test per check, each on real (broken) files written to disk, plus whole-dataset tests.

Broken-file cases use tiny 8x16x16 volumes so each test runs in milliseconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnfast.convert.msd import convert_msd
from nnfast.synth import synthesize_msd
from nnfast.verify import Problem, VerifyReport, verify_dataset

SHAPE = (8, 16, 16)
SPACING = (3.0, 0.8, 0.8)  # z, y, x


def write(arr: np.ndarray, path: Path, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    """Write (z, y, x) or (t, z, y, x) ``arr`` as NIfTI with reader-order ``spacing``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr, isVector=False)
    sp = tuple(float(s) for s in spacing[::-1])
    if arr.ndim == 4:
        img.SetSpacing(sp + (1.0,))
        img.SetOrigin(tuple(origin) + (0.0,))
    else:
        img.SetSpacing(sp)
        img.SetOrigin(tuple(origin))
        if direction is not None:
            img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)
    return path


def image(seed=0, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(100, 20, shape)).astype(np.int16)


def label(shape=SHAPE, values=(1, 2)) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    z, y, x = shape
    if 1 in values:
        seg[z // 4: 3 * z // 4, y // 4: 3 * y // 4, x // 4: 3 * x // 4] = 1
    if 2 in values:
        seg[z // 2, y // 2: y // 2 + 2, x // 2: x // 2 + 2] = 2
    return seg


def make_dataset(root: Path, n_cases=2, n_channels=1, labels=None, ending=".nii.gz", **extra) -> Path:
    """A valid raw dataset ``root/Dataset001_T`` with cases c0, c1, ..."""
    ds = root / "Dataset001_T"
    for i in range(n_cases):
        for c in range(n_channels):
            write(image(10 * i + c), ds / "imagesTr" / f"c{i}_{c:04d}{ending}")
        write(label(), ds / "labelsTr" / f"c{i}{ending}")
    d = {
        "channel_names": {str(c): f"ch{c}" for c in range(n_channels)},
        "labels": labels or {"background": 0, "organ": 1, "tumour": 2},
        "numTraining": n_cases,
        "file_ending": ending,
        **extra,
    }
    (ds / "dataset.json").write_text(json.dumps(d, indent=2))
    return ds


def set_json(ds: Path, **changes) -> None:
    d = json.loads((ds / "dataset.json").read_text())
    d.update(changes)
    (ds / "dataset.json").write_text(json.dumps(d))


def only(report: VerifyReport, what: str, severity="error") -> Problem:
    """The single problem of ``severity`` whose ``what`` contains ``what``; also checks there is no other error."""
    hits = [p for p in report.problems if what in p.what and p.severity == severity]
    assert len(hits) == 1, report.format()
    if severity == "error":
        assert report.errors == hits, report.format()
        assert not report.ok
    else:
        assert report.ok, report.format()
    return hits[0]


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path)


def test_valid_small_dataset_is_clean(ds):
    report = verify_dataset(ds)
    assert report.problems == [] and report.ok and report.num_cases == 2, report.format()


# ------------------------------------------------------------------------------------------------ dataset.json


def test_missing_dataset_json(ds):
    (ds / "dataset.json").unlink()
    p = only(verify_dataset(ds), "dataset.json is missing")
    assert p.file == ds / "dataset.json" and p.found == "no such file"


def test_dataset_json_not_json(ds):
    (ds / "dataset.json").write_text('{"labels": {"background": 0,}')
    only(verify_dataset(ds), "not valid JSON")


def test_dataset_json_missing_keys_all_reported(ds):
    d = json.loads((ds / "dataset.json").read_text())
    del d["numTraining"], d["labels"]
    (ds / "dataset.json").write_text(json.dumps(d))
    report = verify_dataset(ds)
    found = " ".join(p.found for p in report.errors)
    assert "`labels` is missing" in found and "`numTraining` is missing" in found, report.format()


def test_non_consecutive_declared_labels(ds):
    set_json(ds, labels={"background": 0, "organ": 1, "tumour": 2, "cyst": 4})
    report = verify_dataset(ds)
    p = only(report, "dataset.json is malformed")
    assert "consecutive" in p.found and "[0, 1, 2, 4]" in p.found


def test_numtraining_mismatch(ds):
    set_json(ds, numTraining=5)
    p = only(verify_dataset(ds), "numTraining")
    assert p.expected == "5 case(s)" and p.found.startswith("2 case(s)")


def test_key_twice_in_dataset_json(ds):
    text = (ds / "dataset.json").read_text().replace('"numTraining": 2', '"numTraining": 2, "numTraining": 2')
    (ds / "dataset.json").write_text(text)
    p = only(verify_dataset(ds), "key twice")
    assert "`numTraining` twice" in p.found


# ------------------------------------------------------------------------------------------------ files


def test_missing_channel_file(tmp_path):
    ds = make_dataset(tmp_path, n_channels=2)
    (ds / "imagesTr" / "c1_0001.nii.gz").unlink()
    p = only(verify_dataset(ds), "image file is missing")
    assert p.case == "c1" and p.file == ds / "imagesTr" / "c1_0001.nii.gz"


def test_missing_label_file(ds):
    (ds / "labelsTr" / "c0.nii.gz").unlink()
    p = only(verify_dataset(ds), "label file is missing")
    assert p.case == "c0" and p.file == ds / "labelsTr" / "c0.nii.gz"


def test_missing_imagestr_folder(ds):
    shutil.rmtree(ds / "imagesTr")
    report = verify_dataset(ds)
    assert any("imagesTr folder is missing" in p.what for p in report.errors)
    assert any("numTraining" in p.what for p in report.errors)  # and no case was found


def test_undeclared_channel_file(tmp_path):
    ds = make_dataset(tmp_path, n_channels=2)
    write(image(), ds / "imagesTr" / "c0_0003.nii.gz")
    p = only(verify_dataset(ds), "matches no declared channel")
    assert p.case == "c0" and "2 channel(s)" in p.expected and p.found == "channel 0003"


def test_image_without_channel_suffix(ds):
    write(image(), ds / "imagesTr" / "c9.nii.gz")
    p = only(verify_dataset(ds), "lacks the channel suffix")
    assert p.found == "c9.nii.gz"


def test_same_file_with_two_endings_is_a_duplicate(ds):
    write(image(), ds / "imagesTr" / "c0_0000.nii")
    write(label(), ds / "labelsTr" / "c1.nrrd")
    report = verify_dataset(ds)
    dups = [p for p in report.errors if "duplicate" in p.what]
    assert {(p.case, p.file.name) for p in dups} == {("c0", "c0_0000.nii"), ("c1", "c1.nrrd")}, report.format()
    assert len(report.errors) == 2


def test_stray_file_with_other_ending_is_a_warning(ds):
    write(image(), ds / "imagesTr" / "old_0000.nii")
    (ds / "labelsTr" / "notes.txt").write_text("x")
    report = verify_dataset(ds)
    assert report.ok and len([p for p in report.warnings if "is ignored" in p.what]) == 2, report.format()


def test_label_without_images_is_a_warning(ds):
    write(label(), ds / "labelsTr" / "orphan.nii.gz")
    p = only(verify_dataset(ds), "label file has no images", severity="warning")
    assert p.file.name == "orphan.nii.gz"


def test_case_listed_twice_in_dataset_key(ds):
    entry = '{"images": ["imagesTr/c%d_0000.nii.gz"], "label": "labelsTr/c%d.nii.gz"}'
    text = (ds / "dataset.json").read_text().rstrip().rstrip("}")
    text += ', "dataset": {"c0": %s, "c1": %s, "c0": %s}}' % (entry % (0, 0), entry % (1, 1), entry % (0, 0))
    (ds / "dataset.json").write_text(text)
    p = only(verify_dataset(ds), "listed twice")
    assert p.case == "c0"


def test_two_cases_share_a_file(ds):
    set_json(ds, dataset={
        "c0": {"images": ["imagesTr/c0_0000.nii.gz"], "label": "labelsTr/c0.nii.gz"},
        "copy": {"images": ["imagesTr/c0_0000.nii.gz"], "label": "labelsTr/c1.nii.gz"},
    })
    report = verify_dataset(ds)
    shared = [p for p in report.errors if "more than one case" in p.what]
    assert {p.case for p in shared} == {"c0", "copy"} and len(report.errors) == 2, report.format()


def test_dataset_key_entry_with_wrong_channel_count(tmp_path):
    ds = make_dataset(tmp_path, n_channels=2)
    set_json(ds, dataset={
        "c0": {"images": ["imagesTr/c0_0000.nii.gz", "imagesTr/c0_0001.nii.gz"], "label": "labelsTr/c0.nii.gz"},
        "c1": {"images": ["imagesTr/c1_0000.nii.gz"], "label": "labelsTr/c1.nii.gz"},
    })
    p = only(verify_dataset(ds), "wrong number of image files")
    assert p.case == "c1" and p.found == "1"


def test_case_ids_differing_only_in_letter_case(ds):
    shutil.copyfile(ds / "imagesTr" / "c0_0000.nii.gz", ds / "imagesTr" / "C0_0000.nii.gz")
    shutil.copyfile(ds / "labelsTr" / "c0.nii.gz", ds / "labelsTr" / "C0.nii.gz")
    set_json(ds, numTraining=3)
    report = verify_dataset(ds)
    assert report.ok and {p.case for p in report.warnings if "letter case" in p.what} == {"c0", "C0"}, report.format()


# ------------------------------------------------------------------------------------------------ geometry


def test_image_label_shape_mismatch(ds):
    write(label(shape=(9, 16, 16)), ds / "labelsTr" / "c1.nii.gz")
    p = only(verify_dataset(ds), "shape differs")
    assert p.case == "c1" and p.expected.startswith("(8, 16, 16)") and p.found == "(9, 16, 16)"


def test_image_label_spacing_mismatch(ds):
    write(label(), ds / "labelsTr" / "c1.nii.gz", spacing=(2.5, 0.8, 0.8))
    p = only(verify_dataset(ds), "spacing differs")
    assert p.case == "c1" and "(3, 0.8, 0.8)" in p.expected and "(2.5, 0.8, 0.8)" in p.found


def test_spacing_within_float_noise_is_fine(ds):
    write(label(), ds / "labelsTr" / "c1.nii.gz", spacing=(3.0 + 1e-7, 0.8, 0.8))
    assert verify_dataset(ds).problems == []


def test_origin_mismatch_is_an_error_but_noise_is_tolerated(ds):
    write(label(), ds / "labelsTr" / "c0.nii.gz", origin=(0.0, 0.0, 1e-6))
    write(label(), ds / "labelsTr" / "c1.nii.gz", origin=(0.0, 2.0, 0.0))
    p = only(verify_dataset(ds), "origin differs")
    assert p.case == "c1" and p.found == "(0, 2, 0)"


def test_direction_mismatch(ds):
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    write(label(), ds / "labelsTr" / "c1.nii.gz", direction=flipped)
    p = only(verify_dataset(ds), "direction differs")
    assert p.case == "c1" and p.found.startswith("(-1,")


def test_channels_disagree_in_shape_and_spacing(tmp_path):
    ds = make_dataset(tmp_path, n_channels=2)
    write(image(shape=(8, 16, 15)), ds / "imagesTr" / "c0_0001.nii.gz")
    write(image(), ds / "imagesTr" / "c1_0001.nii.gz", spacing=(3.0, 0.9, 0.9))
    report = verify_dataset(ds)
    shape = [p for p in report.errors if "shape differs from channel" in p.what]
    spacing = [p for p in report.errors if "spacing differs from channel" in p.what]
    assert [p.case for p in shape] == ["c0"] and [p.case for p in spacing] == ["c1"], report.format()
    assert len(report.errors) == 2
    assert spacing[0].file.name == "c1_0001.nii.gz"


# ------------------------------------------------------------------------------------------------ values


def test_undeclared_label_values(ds):
    seg = label()
    seg[0, 0, :3] = (5, 7, 7)
    write(seg, ds / "labelsTr" / "c0.nii.gz")
    p = only(verify_dataset(ds), "not declared")
    assert p.case == "c0" and p.expected == "only [0, 1, 2]" and p.found.startswith("[5, 7]")


def test_float_label_with_fractions(ds):
    seg = label().astype(np.float32)
    seg[0, 0, 0] = 0.5
    write(seg, ds / "labelsTr" / "c1.nii.gz")
    p = only(verify_dataset(ds), "non-integer")
    assert p.case == "c1" and "0.5" in p.found


def test_float_label_with_integer_values_is_a_warning(ds):
    write(label().astype(np.float32), ds / "labelsTr" / "c1.nii.gz")
    only(verify_dataset(ds), "floating point", severity="warning")


def test_negative_labels(ds):
    seg = label().astype(np.int16)
    seg[0, 0, 0] = -1
    write(seg, ds / "labelsTr" / "c0.nii.gz")
    p = only(verify_dataset(ds), "negative")
    assert p.found.startswith("[-1]")


def test_4d_label(ds):
    write(np.stack([label(), label()]), ds / "labelsTr" / "c0.nii.gz")
    p = only(verify_dataset(ds), "label file is 4D")
    assert p.found == "2 volumes"


def test_4d_image_in_raw_dataset(ds):
    write(np.stack([image(), image(1)]), ds / "imagesTr" / "c0_0000.nii.gz")
    p = only(verify_dataset(ds), "image file is 4D")
    assert p.case == "c0"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image_nrrd_is_an_error(tmp_path, bad):
    ds = make_dataset(tmp_path, ending=".nrrd")  # SimpleITK's NRRD reader keeps NaN/inf
    img = image().astype(np.float32)
    img[1, 2, 3] = bad
    write(img, ds / "imagesTr" / "c1_0000.nrrd")
    p = only(verify_dataset(ds), "non-finite")
    assert p.case == "c1" and ("1 NaN" in p.found if np.isnan(bad) else "1 inf" in p.found)


def test_non_finite_stored_in_nifti_is_an_error(ds):
    img = image().astype(np.float32)
    img[1, 2, 3] = np.nan
    img[2, 2, 3:5] = (np.inf, -np.inf)
    f = write(img, ds / "imagesTr" / "c1_0000.nii.gz")
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(f)))).any()  # SimpleITK reads NaN as 0
    p = only(verify_dataset(ds), "stores non-finite")
    assert p.case == "c1" and p.file == f and p.found == "1 NaN and 2 inf voxel(s)"


def test_non_finite_label_is_an_error(ds):
    seg = label().astype(np.float32)
    seg[0, 0, 0] = np.nan
    write(seg, ds / "labelsTr" / "c0.nii.gz")
    p = only(verify_dataset(ds), "label has non-finite")
    assert p.case == "c0" and p.found == "1 NaN/inf voxel(s)"


def test_all_zero_image(ds):
    write(np.zeros(SHAPE, np.float32), ds / "imagesTr" / "c0_0000.nii.gz")
    p = only(verify_dataset(ds), "all zero")
    assert p.case == "c0"


def test_case_without_foreground_is_a_warning(ds):
    write(np.zeros(SHAPE, np.uint8), ds / "labelsTr" / "c0.nii.gz")
    p = only(verify_dataset(ds), "no foreground", severity="warning")
    assert p.case == "c0"


def test_ignore_label_is_not_foreground(tmp_path):
    ds = make_dataset(tmp_path, labels={"background": 0, "organ": 1, "tumour": 2, "ignore": 3})
    seg = np.zeros(SHAPE, np.uint8)
    seg[:2] = 3
    write(seg, ds / "labelsTr" / "c0.nii.gz")
    report = verify_dataset(ds)
    assert report.ok and [p.case for p in report.warnings if "no foreground" in p.what] == ["c0"], report.format()


# ------------------------------------------------------------------------------------------------ corrupt files


def test_truncated_image(ds):
    f = ds / "imagesTr" / "c1_0000.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 30])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(f))).shape == SHAPE  # SimpleITK does not notice
    p = only(verify_dataset(ds), "truncated or corrupt")
    assert p.case == "c1" and p.file == f and "truncated" in p.found


def test_garbage_bytes_image(ds):
    f = ds / "imagesTr" / "c0_0000.nii.gz"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    p = only(verify_dataset(ds), "cannot be read")
    assert p.case == "c0" and p.file == f


def test_corrupt_middle_of_label(ds):
    f = ds / "labelsTr" / "c0.nii.gz"
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 8] = b"\xde\xad\xbe\xef" * 2
    f.write_bytes(bytes(data))
    report = verify_dataset(ds)
    assert [(p.case, p.file) for p in report.errors] == [("c0", f)], report.format()


# ------------------------------------------------------------------------------------------------ whole datasets


def test_several_problems_are_all_reported(tmp_path, monkeypatch):
    monkeypatch.setattr("nnfast.verify.checks.POOL_MIN_BYTES", 0)  # use the worker pool even for tiny files
    ds = make_dataset(tmp_path, n_cases=4, n_channels=2)
    set_json(ds, numTraining=3)
    (ds / "imagesTr" / "c0_0001.nii.gz").unlink()
    write(label(), ds / "labelsTr" / "c1.nii.gz", spacing=(2.0, 0.8, 0.8))
    seg = label()
    seg[0, 0, 0] = 9
    write(seg, ds / "labelsTr" / "c2.nii.gz")
    f = ds / "imagesTr" / "c3_0000.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    write(image(), ds / "imagesTr" / "c3_0002.nii.gz")
    report = verify_dataset(ds, workers=2)
    got = {(p.case, p.what) for p in report.errors}
    assert got == {
        (None, "numTraining does not match the training cases"),
        ("c0", "image file is missing"),
        ("c1", "spacing differs from image `c1_0000.nii.gz`"),
        ("c2", "label has values not declared in dataset.json"),
        ("c3", "image file is truncated or corrupt"),
        ("c3", "image file matches no declared channel"),
    }, report.format()
    text = report.format()
    assert text.splitlines()[-1] == "6 error(s), 0 warning(s): FAILED"
    assert text.index("case c0:") < text.index("case c1:") < text.index("case c3:")
    assert "imagesTr/c3_0000.nii.gz" in text and "expected" in text and "found" in text


@pytest.fixture(scope="module")
def clean_raw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    ct = synthesize_msd(tmp / "msd", num_cases=3, num_test=1, shape_range=((8, 12), (24, 32), (24, 32)))
    mri = synthesize_msd(tmp / "msd", task_id=2, kind="mri", num_cases=2, num_test=0,
                         shape_range=((10, 12), (16, 20), (16, 20)))
    return convert_msd(ct, tmp / "raw"), convert_msd(mri, tmp / "raw")


def test_clean_synthetic_datasets_have_no_problems(clean_raw):
    for ds in clean_raw:
        report = verify_dataset(ds)
        assert report.problems == [] and report.num_cases in (2, 3), report.format()
        assert report.format().endswith("0 error(s), 0 warning(s): OK")
        assert report.to_json()["ok"] is True


@pytest.mark.compat
def test_nnunet_agrees_on_clean_and_broken(clean_raw, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    ds = clean_raw[0]  # nnU-Net passes it: see benchmarks/test_bench_convert_verify.py (kept out of here for time)
    broken = shutil.copytree(ds, tmp_path / ds.name)
    case = sorted((broken / "labelsTr").iterdir())[0]
    arr = sitk.ReadImage(str(case))
    sp = list(arr.GetSpacing())
    sp[2] *= 1.5
    arr.SetSpacing(sp)
    sitk.WriteImage(arr, str(case), True)
    with pytest.raises(RuntimeError):
        verify_dataset_integrity(str(broken), num_processes=1)
    report = verify_dataset(broken)
    assert [p.what for p in report.errors] == ["spacing differs from image `%s`" % case.name.replace(
        ".nii.gz", "_0000.nii.gz")], report.format()


REGIONS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}


def test_region_dataset_is_checked_not_rejected(ds):
    """nnU-Net's region dataset.json passes; a region whose labels no label file holds is an error; a missing or
    short ``regions_class_order`` is a dataset.json error."""
    set_json(ds, labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    report = verify_dataset(ds)
    assert report.ok and report.problems == [], report.format()
    set_json(ds, labels=REGIONS, regions_class_order=[1, 2, 3])  # label files hold 1 and 2 only
    p = only(verify_dataset(ds), "region `enhancing_tumor` names labels that no label file contains")
    assert "[3]" in p.expected and "[0, 1, 2]" in p.found
    set_json(ds, labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1])
    p = only(verify_dataset(ds), "dataset.json is malformed")
    assert "`regions_class_order` [1] has 1 entries but the labels define 2 regions (whole, core)" in p.found
