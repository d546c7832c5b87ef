"""Preprocessed arrays against nnU-Net v2's own preprocessing of the same raw files, with the same plans."""
import numpy as np
import pytest

from factories import make_raw_dataset
from nnfast.io.store import load_case
from nnfast.preprocess.api import preprocess_dataset
from nnfast.settings import Settings

pytestmark = [pytest.mark.compat, pytest.mark.slow]


def _dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * np.logical_and(a, b).sum() / s


def _compare(ours_folder, theirs_folder, case_ids, labels, check_locations=True):
    from nnunet_ref import load_nnunet_case

    for cid in case_ids:
        img, seg, props, locs = load_case(ours_folder / f"{cid}.zarr")
        t_img, t_seg, t_props = load_nnunet_case(theirs_folder, cid)
        assert img.shape == t_img.shape, cid
        assert seg.shape == t_seg.shape, cid
        assert props["bbox_used_for_cropping"] == [list(map(int, b)) for b in t_props["bbox_used_for_cropping"]]
        assert tuple(props["shape_before_cropping"]) == tuple(t_props["shape_before_cropping"])
        for c in range(img.shape[0]):
            scale = np.percentile(t_img[c], 99.5) - np.percentile(t_img[c], 0.5)
            diff = np.abs(img[c].astype(np.float64) - t_img[c]).max()
            assert diff <= 1e-3 * max(scale, 1e-6), (cid, c, diff, scale)
        for lab in [-1, 0, *labels]:
            assert _dice(seg == lab, t_seg == lab) >= 0.999, (cid, lab)
        mismatch = (seg != t_seg).mean()
        assert mismatch < 1e-3, (cid, mismatch)
        if check_locations:
            for key, arr in locs.items():
                lab = int(key)
                n_total = int((seg[0] == lab).sum())
                assert len(arr) == (max(min(10000, n_total), int(np.ceil(n_total * 0.01))) if n_total else 0)
                if len(arr):
                    assert arr.shape[1] == 4 and (arr[:, 0] == 0).all()
                    assert (seg[0][tuple(arr[:, 1:].T)] == lab).all()
                    assert len(np.unique(arr, axis=0)) == len(arr)


@pytest.mark.parametrize("kind", ["ct_aniso", "mri_crop"])
def test_preprocessing_matches_nnunet(tmp_path, kind):
    from nnunet_ref import run_nnunet

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    if kind == "ct_aniso":
        root = make_raw_dataset(raw, 21, "CTAniso", [(10, 48, 52), (14, 44, 44), (12, 56, 48), (9, 50, 50)],
                                [(4.0, 0.8, 0.8), (3.0, 0.7, 0.7), (5.0, 0.9, 0.9), (4.5, 0.75, 0.75)], seed=7)
    else:
        root = make_raw_dataset(raw, 22, "MRICrop", [(24, 28, 26), (22, 30, 28), (26, 26, 30)],
                                [(1.2, 1.0, 1.0), (1.0, 1.0, 1.0), (1.1, 0.9, 0.9)], seed=8, kind="mri")
    settings = Settings(raw=raw, preprocessed=pre, results=tmp_path / "res")
    from nnfast.plan.api import plan_dataset

    res = plan_dataset(root.name, settings, export_nnunet=True)
    summary = preprocess_dataset(root.name, settings, config="all", workers=1)
    configs = [c.config for c in summary.configs]
    assert "3d_fullres" in configs and "2d" in configs
    run_nnunet("preprocess_entry", ["-d", root.name[7:10], "-c", *configs, "-np", *(["1"] * len(configs))], raw, pre)
    case_ids = [c.case_id for c in res.cases]
    for c in summary.configs:
        ours = res.output_folder / res.plans.configuration(c.config).data_identifier
        theirs = res.output_folder / f"nnUNetPlans_{c.config}"
        _compare(ours, theirs, case_ids, res.info.foreground_labels)
