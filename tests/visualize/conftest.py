"""Small raw datasets for the picture tests: 3D CT with an empty case, 2D, two-channel MRI, regions."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from factories import make_raw_dataset
from nnfast.settings import Settings


def settings_for(tmp_path: Path) -> Settings:
    return Settings(raw=tmp_path / "raw", preprocessed=tmp_path / "preprocessed", results=tmp_path / "results")


@pytest.fixture
def ct_dataset(tmp_path):
    """Dataset001_CT: case_000 and case_002 with labels 1 (organ) and 2 (lesion), case_001 without foreground;
    anisotropic spacing (3, 1, 1) mm."""
    make_raw_dataset(tmp_path / "raw", 1, "CT", [(12, 40, 36), (10, 32, 32), (12, 36, 36)],
                     [(3.0, 1.0, 1.0)] * 3, empty_cases=[1], seed=1)
    return settings_for(tmp_path)


@pytest.fixture
def mri_dataset(tmp_path):
    """Dataset002_MRI: two channels (T1, T2; the label is brighter in channel 0 and darker in channel 1)."""
    make_raw_dataset(tmp_path / "raw", 2, "MRI", [(12, 32, 32), (12, 32, 32)], [(1.0, 1.0, 1.0)] * 2, kind="mri",
                     n_labels=1, seed=2)
    return settings_for(tmp_path)


@pytest.fixture
def region_dataset(tmp_path):
    """Dataset003_Regions: BraTS-like regions ``whole = [1, 2]`` and ``core = [2]``."""
    root = make_raw_dataset(tmp_path / "raw", 3, "Regions", [(12, 40, 40)], [(1.0, 1.0, 1.0)], seed=3)
    d = json.loads((root / "dataset.json").read_text())
    d["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    d["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(d))
    return settings_for(tmp_path)


@pytest.fixture
def dataset_2d(tmp_path):
    """Dataset004_TwoD: 2D images (y, x) with a disc of label 1; spacing (0.5, 1.0) mm."""
    root = tmp_path / "raw" / "Dataset004_TwoD"
    yy, xx = np.mgrid[:40, :30]
    for i in range(2):
        seg = (((yy - 20) / 12.0) ** 2 + ((xx - 15 - i) / 8.0) ** 2 < 1).astype(np.uint8)
        img = (100 + 80 * seg + np.random.default_rng(i).normal(0, 5, seg.shape)).astype(np.float32)
        for arr, p in ((img, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                       (seg, root / "labelsTr" / f"case_{i:03d}.nii.gz")):
            p.parent.mkdir(parents=True, exist_ok=True)
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.0, 0.5))
            sitk.WriteImage(im, str(p), True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "disc": 1}, "numTraining": 2,
        "file_ending": ".nii.gz"}))
    return settings_for(tmp_path)
