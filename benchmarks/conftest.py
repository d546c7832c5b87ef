"""Shared benchmark fixtures; utilities live in ``bench_utils.py``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
for p in (str(BENCH), str(BENCH.parent / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_utils import full_size  # noqa: E402


@pytest.fixture(scope="session")
def ct_task(tmp_path_factory):
    """A synthetic CT dataset converted to nnU-Net v2 layout: (raw root, dataset id, number of voxels)."""
    from nnfast.convert.msd import convert_msd
    from nnfast.synth import synthesize_msd

    root = tmp_path_factory.mktemp("bench_ct")
    if full_size():
        msd = synthesize_msd(root / "msd", task_id=61, name="BenchCT", num_cases=24, num_test=0, seed=1,
                             shape_range=((40, 90), (200, 300), (200, 300)))
    else:
        msd = synthesize_msd(root / "msd", task_id=61, name="BenchCT", num_cases=3, num_test=0, seed=1,
                             shape_range=((12, 16), (48, 64), (48, 64)))
    raw = root / "raw"
    convert_msd(msd, raw, workers=2)
    import SimpleITK as sitk

    voxels = 0
    for p in (raw / "Dataset061_BenchCT" / "imagesTr").glob("*.nii.gz"):
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        n = 1
        for s in r.GetSize():
            n *= s
        voxels += n
    return raw, 61, voxels
