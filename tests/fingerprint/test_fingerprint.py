"""Fingerprint parity with nnU-Net v2's DatasetFingerprintExtractor on real NIfTI files."""
from pathlib import Path

import numpy as np
import pytest

from factories import make_raw_dataset
from nnfast.fingerprint.extract import extract_fingerprint
from nnfast.fingerprint.schema import Fingerprint
from nnfast.io.dataset import load_dataset

STATS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")


def _datasets(tmp_path):
    raw = tmp_path / "raw"
    ct = make_raw_dataset(raw, 11, "CTAniso", [(12, 40, 44), (16, 36, 40), (10, 48, 40), (14, 40, 40)],
                          [(3.0, 0.8, 0.8), (4.0, 0.7, 0.7), (5.0, 0.9, 0.9), (3.5, 0.75, 0.75)], seed=1,
                          empty_cases=[3])
    # large enough foregrounds that nnU-Net's sampled percentiles are not dominated by gaps between the few tail
    # voxels (tiny foregrounds make its estimate jump between neighbouring voxel values)
    mri = make_raw_dataset(raw, 12, "MRICrop", [(36, 44, 44), (34, 46, 42), (38, 42, 46)],
                           [(1.0, 1.0, 1.0), (1.1, 1.0, 1.0), (1.0, 0.9, 0.9)], seed=2, kind="mri")
    return raw, [ct, mri]


@pytest.mark.compat
@pytest.mark.slow
def test_fingerprint_matches_nnunet(tmp_path):
    from nnunet_ref import nnunet_fingerprint

    raw, roots = _datasets(tmp_path)
    ids = [int(root.name[7:10]) for root in roots]
    nnunet = nnunet_fingerprint(ids, raw, tmp_path / "pre")  # one nnU-Net run for both datasets
    for root, dataset_id in zip(roots, ids):
        info, cases = load_dataset(root)
        ours = extract_fingerprint(info, cases, workers=1)
        theirs = Fingerprint.from_nnunet(nnunet[dataset_id])
        np.testing.assert_allclose(ours.spacings, theirs.spacings)
        assert ours.shapes_after_crop == theirs.shapes_after_crop
        assert ours.median_relative_size_after_cropping == pytest.approx(theirs.median_relative_size_after_cropping)
        for ch, (a, b) in enumerate(zip(ours.foreground_intensity_properties_per_channel,
                                        theirs.foreground_intensity_properties_per_channel)):
            scale = b.percentile_99_5 - b.percentile_00_5
            for k in STATS:
                assert abs(getattr(a, k) - getattr(b, k)) <= 0.005 * scale, (root.name, ch, k, getattr(a, k), getattr(b, k))


def test_empty_foreground_case_does_not_count(tmp_path):
    """nnU-Net gives a case without foreground no samples; statistics must equal those of the other cases alone."""
    raw = tmp_path / "raw"
    root = make_raw_dataset(raw, 13, "E", [(8, 20, 20), (8, 20, 20), (8, 20, 20)], [(2.0, 1.0, 1.0)] * 3, seed=3,
                            empty_cases=[2])
    info, cases = load_dataset(root)
    with_empty = extract_fingerprint(info, cases)
    without = extract_fingerprint(info, cases[:2])
    assert with_empty.foreground_intensity_properties_per_channel == without.foreground_intensity_properties_per_channel
    assert len(with_empty.shapes_after_crop) == 3


def test_cases_weighted_equally(tmp_path):
    """A case with 8x more foreground must not dominate: mean = mean of the case means."""
    from nnfast.io.image import read_images, read_label

    raw = tmp_path / "raw"
    root = make_raw_dataset(raw, 14, "W", [(8, 16, 16), (16, 32, 32)], [(1.0, 1.0, 1.0)] * 2, seed=4)
    info, cases = load_dataset(root)
    fp = extract_fingerprint(info, cases)
    means = []
    for c in cases:
        img, _ = read_images(c.image_files)
        seg, _ = read_label(c.label_file)
        means.append(img[0][seg[0] > 0].astype(np.float64).mean())
    assert fp.foreground_intensity_properties_per_channel[0].mean == pytest.approx(np.mean(means), rel=1e-9)


def test_json_round_trip(tmp_path):
    raw = tmp_path / "raw"
    root = make_raw_dataset(raw, 15, "J", [(6, 12, 12)] * 2, [(1.0, 1.0, 1.0)] * 2, seed=5)
    info, cases = load_dataset(root)
    fp = extract_fingerprint(info, cases)
    assert Fingerprint.from_json(fp.to_json()) == fp
    assert set(fp.to_nnunet()) == {"spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                                   "median_relative_size_after_cropping"}


def test_verification_fingerprints_equal_the_fingerprint_step(tmp_path):
    """Verification fingerprints each case from the arrays it reads; the result is the fingerprint step's, exactly
    (CT with an empty case, multi-channel MRI)."""
    from nnfast.verify import verify_dataset

    _raw, roots = _datasets(tmp_path)
    for root in roots:
        info, cases = load_dataset(root)
        report = verify_dataset(root, workers=2, fingerprint=True)
        assert sorted(report.case_fingerprints) == sorted(c.case_id for c in cases)
        from_files = extract_fingerprint(info, cases, workers=1)
        from_verify = extract_fingerprint(info, cases, precomputed=report.case_fingerprints)
        assert from_verify == from_files


def test_planning_reads_each_file_once(tmp_path, monkeypatch):
    """verify + fingerprint + plan decode every raw file exactly once; a second run reads none."""
    from collections import Counter

    from nnfast.io import image as image_mod
    from nnfast.plan.api import plan_dataset
    from nnfast.settings import Settings

    raw = tmp_path / "raw"
    make_raw_dataset(raw, 14, "Once", [(8, 20, 20), (9, 22, 20), (8, 18, 24)], [(2.0, 1.0, 1.0)] * 3, seed=4)
    reads = Counter()
    real = image_mod._read_sitk

    def counting(path):
        reads[str(path)] += 1
        return real(path)

    monkeypatch.setattr(image_mod, "_read_sitk", counting)
    settings = Settings(raw=raw, preprocessed=tmp_path / "pre", results=tmp_path / "res")
    plan_dataset(14, settings, workers=2)
    assert len(reads) == 6 and set(reads.values()) == {1}, reads
    reads.clear()
    plan_dataset(14, settings, workers=2)
    assert not reads


def test_planning_reads_the_stored_fingerprint_once(tmp_path, monkeypatch):
    """When verification runs again (its record gone) over a current stored fingerprint, plan_dataset reads the
    fingerprint file once (verification asks whether to fingerprint too; planning reuses it), decodes no image for
    the fingerprint, and reuses it."""
    from collections import Counter

    from nnfast.plan import api
    from nnfast.settings import Settings

    raw = tmp_path / "raw"
    make_raw_dataset(raw, 15, "Stored", [(8, 20, 20), (9, 22, 20)], [(2.0, 1.0, 1.0)] * 2, seed=5)
    settings = Settings(raw=raw, preprocessed=tmp_path / "pre", results=tmp_path / "res")
    first = api.plan_dataset(15, settings, workers=1)
    (first.output_folder / api.STATE_FILE).unlink()  # verification runs again
    reads = Counter()
    real = api.read_json

    def counting(path):
        reads[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(api, "read_json", counting)
    again = api.plan_dataset(15, settings, workers=1)
    assert again.fingerprint_reused and again.fingerprint == first.fingerprint
    assert reads[api.fingerprint_path(first.output_folder).name] == 1, reads
