"""Ensembling saved probabilities: nnU-Net's average_probabilities + argmax on the same files, regions, geometry,
and the errors users hit (no probabilities saved, different cases, different grids)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnfast.errors import CaseNotFoundError, GeometryError
from nnfast.evaluate.ensemble import average_probabilities, ensemble_folders
from nnfast.io.image import ImageGeometry

SHAPE = (4, 9, 11)
GEOM = ImageGeometry(spacing=(2.5, 0.7, 0.8), sitk_spacing=(0.8, 0.7, 2.5), origin=(10.0, -4.0, 3.0),
                     direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), shape=SHAPE)
LABELS = {"background": 0, "a": 1, "b": 2}


def _softmax(x):
    e = np.exp(x - x.max(0))
    return e / e.sum(0)


def write_probabilities(folder, case, probs, geometry=GEOM):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{case}.npz", probabilities=probs)
    (folder / f"{case}.json").write_text(json.dumps({"geometry": geometry.to_json()}))


def _folders(tmp_path, n_cases=3, dtypes=(np.float16, np.float32), channels=3):
    rng = np.random.default_rng(0)
    folders = []
    for k, dt in enumerate(dtypes):
        f = tmp_path / f"member_{k}"
        for i in range(n_cases):
            write_probabilities(f, f"case_{i}", _softmax(rng.normal(0, 2, (channels, *SHAPE))).astype(dt))
        folders.append(f)
    return folders


@pytest.mark.compat
def test_equals_nnunet_average_and_argmax_with_geometry(tmp_path):
    from nnunetv2.ensembling.ensemble import average_probabilities as nn_average

    folders = _folders(tmp_path)
    (folders[0] / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz",
                                                         "channel_names": {"0": "CT"}, "numTraining": 3}))
    out = ensemble_folders(folders, tmp_path / "ens", workers=1)
    assert [p.name for p in out] == ["case_0.nii.gz", "case_1.nii.gz", "case_2.nii.gz"]
    for p in out:
        files = [str(f / p.name.replace(".nii.gz", ".npz")) for f in folders]
        expected = nn_average(files)
        np.testing.assert_array_equal(average_probabilities(files), expected)
        img = sitk.ReadImage(str(p))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), expected.argmax(0))
        np.testing.assert_allclose(img.GetSpacing(), GEOM.sitk_spacing, rtol=1e-6)  # NIfTI stores float32
        np.testing.assert_allclose(img.GetOrigin(), GEOM.origin, rtol=1e-6)
    assert json.loads((tmp_path / "ens" / "dataset.json").read_text())["labels"] == LABELS


def test_regions_and_saved_probabilities(tmp_path):
    folders = _folders(tmp_path, n_cases=1, dtypes=(np.float32, np.float32), channels=2)
    dj = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2],
          "file_ending": ".nii.gz"}
    out = ensemble_folders(folders, tmp_path / "ens", dataset_json=dj, save_probabilities=True)
    avg = average_probabilities([f / "case_0.npz" for f in folders])
    expected = np.zeros(SHAPE, np.uint8)
    expected[avg[0] > 0.5] = 1
    expected[avg[1] > 0.5] = 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out[0]))), expected)
    with np.load(tmp_path / "ens" / "case_0.npz") as z:
        np.testing.assert_array_equal(z["probabilities"], avg)
    assert json.loads((tmp_path / "ens" / "case_0.json").read_text())["geometry"] == GEOM.to_json()


def test_missing_probabilities_says_how_to_get_them(tmp_path):
    folders = _folders(tmp_path, n_cases=2)
    empty = tmp_path / "no_probs"
    empty.mkdir()
    with pytest.raises(CaseNotFoundError, match="--save-probabilities"):
        ensemble_folders([folders[0], empty], tmp_path / "out")
    (folders[1] / "case_1.npz").unlink()
    with pytest.raises(CaseNotFoundError, match="case_1"):
        ensemble_folders(folders, tmp_path / "out")
    with pytest.raises(ValueError):
        ensemble_folders(folders[:1], tmp_path / "out")


def test_shape_mismatch_and_missing_sidecar(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_probabilities(a, "c", np.full((2, *SHAPE), 0.5, np.float32))
    write_probabilities(b, "c", np.full((2, 4, 9, 10), 0.5, np.float32))
    with pytest.raises(GeometryError, match="shape"):
        ensemble_folders([a, b], tmp_path / "out")
    write_probabilities(b, "c", np.full((2, *SHAPE), 0.5, np.float32))
    (a / "c.json").unlink()
    with pytest.raises(CaseNotFoundError, match="sidecar"):
        ensemble_folders([a, b], tmp_path / "out")
