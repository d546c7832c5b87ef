"""``nnfast overlay`` on real synthetic cases: the PNGs are read back and checked where the labels are."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from factories import write_image
from nnfast.cli.main import main
from nnfast.errors import DatasetError
from nnfast.io.image import read_label
from nnfast.visualize.api import overlay_dataset
from nnfast.visualize.overlay import FILL_ALPHA, PALETTE, UNDECLARED_COLOR, outline


def _png(result) -> np.ndarray:
    return imread(result.path)[..., :3] * 255.0


def _rgb(png, panel, row, col) -> np.ndarray:
    x, y = panel.pixel_of(row, col)
    return png[y, x]


def _slice(vol, panel):
    return np.take(vol, panel.index, axis={"axial": 0, "coronal": 1, "sagittal": 2}[panel.view])


def _outline_colour_fraction(png, panel, mask2d, colour) -> float:
    rows, cols = np.nonzero(outline(mask2d))
    assert rows.size, "the slice shows no voxel of this label"
    hits = [np.abs(_rgb(png, panel, r, c) - colour).max() < 6 for r, c in zip(rows, cols)]
    return float(np.mean(hits))


def _is_filled_with(pixel, colour) -> bool:
    """A translucent fill of ``colour`` over gray: coloured, and the same channel dominates."""
    return np.ptp(pixel) > 0.5 * FILL_ALPHA * np.ptp(colour) and np.argmax(pixel) == int(np.argmax(colour))


def _ref(settings, dataset, case):
    return read_label(settings.raw / dataset / "labelsTr" / f"{case}.nii.gz")[0][0]


def test_3d_case_outlines_fill_views_and_an_empty_case(ct_dataset, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(ct_dataset.raw / "Dataset001_CT" / "labelsTr" / "case_000.nii.gz", pred / "case_000.nii.gz")
    shutil.copy(ct_dataset.raw / "Dataset001_CT" / "labelsTr" / "case_001.nii.gz", pred / "case_001.nii.gz")
    report = overlay_dataset(1, ct_dataset, tmp_path / "out", pred_dir=pred, views=("axial", "coronal", "sagittal"))
    res = {r.case_id: r for r in report.results}
    assert sorted(res) == ["case_000", "case_001", "case_002"] and not report.failed
    assert (tmp_path / "out" / "case_000.png").stat().st_size > 10_000
    png = _png(res["case_000"])
    assert png.shape[1] >= 3 * 400 and png.shape[0] >= 400
    ref = _ref(ct_dataset, "Dataset001_CT", "case_000")
    assert [p.view for p in res["case_000"].panels] == ["axial", "coronal", "sagittal"]
    for panel in res["case_000"].panels:
        assert panel.found
        seg2d = _slice(ref, panel)
        # the slice with the most foreground along this axis
        counts = (ref > 0).sum(axis=tuple(a for a in range(3) if a != {"axial": 0, "coronal": 1, "sagittal": 2}[panel.view]))
        assert panel.index == int(np.argmax(counts))
        for label, colour in ((1, PALETTE[0]), (2, PALETTE[1])):
            mask = seg2d == label
            if not mask.any():
                continue
            assert _outline_colour_fraction(png, panel, mask, np.array(colour)) > 0.95
            inner = np.argwhere(mask & ~outline(mask, 1) & ~outline(seg2d > 0, 1))
            for r, c in inner[:: max(1, len(inner) // 10)]:
                assert _is_filled_with(_rgb(png, panel, r, c), np.array(colour))
        r, c = np.argwhere(seg2d == 0)[0]
        assert np.ptp(_rgb(png, panel, r, c)) < 3  # background stays gray
    # physical aspect ratio: axial (y 40 x 36 at 1 mm), coronal (z 12 at 3 mm x 36 at 1 mm)
    ax, cor, _ = res["case_000"].panels
    for panel, ratio in ((ax, 36 / 40), (cor, 36 / 36)):
        left, top, right, bottom = panel.box
        assert (right - left) / (bottom - top) == pytest.approx(ratio, rel=0.03)
    # the case without foreground: middle slices, nothing coloured
    empty = res["case_001"]
    assert [(p.found, p.index) for p in empty.panels] == [(False, 5), (False, 16), (False, 16)]
    png = _png(empty)
    for p in empty.panels:
        left, top, right, bottom = (int(v) for v in p.box)
        assert np.ptp(png[top + 2:bottom - 2, left + 2:right - 2], axis=-1).max() < 3
    # case_002 has no prediction: named, still drawn
    assert res["case_002"].path and any("missing from the predictions" in p for p in res["case_002"].problems)


def test_2d_dataset_has_one_view_with_the_right_aspect(dataset_2d, tmp_path):
    report = overlay_dataset(4, dataset_2d, tmp_path / "out", views=("axial", "coronal", "sagittal"))
    assert len(report.written) == 2
    res = report.results[0]
    (panel,) = res.panels
    left, top, right, bottom = panel.box
    assert (right - left) / (bottom - top) == pytest.approx(30 * 1.0 / (40 * 0.5), rel=0.03)
    ref = _ref(dataset_2d, "Dataset004_TwoD", "case_000")
    assert _outline_colour_fraction(_png(res), panel, _slice(ref, panel) == 1, np.array(PALETTE[0])) > 0.95


def test_multi_channel_shows_the_chosen_channel(mri_dataset, tmp_path):
    ref = _ref(mri_dataset, "Dataset002_MRI", "case_000")
    levels = []
    for channel in (0, 1):
        report = overlay_dataset(2, mri_dataset, tmp_path / f"c{channel}", cases=["case_000"], channel=channel)
        (res,) = report.results
        (panel,) = res.panels
        seg2d = _slice(ref, panel)
        inside = np.argwhere((seg2d == 1) & ~outline(seg2d == 1, 2))[0]
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(mri_dataset.raw / "Dataset002_MRI" / "imagesTr" /
                                                        f"case_000_{channel:04d}.nii.gz")))[panel.index]
        away = (seg2d == 0) & (img != 0) & ~outline(seg2d == 0, 2)  # in the head, off the label
        head = tuple(np.argwhere(away)[0])
        png = _png(res)
        levels.append(_rgb(png, panel, *inside).mean() - _rgb(png, panel, *head).mean())
    assert levels[0] > 20 and levels[1] < -20  # the label is brighter in channel 0, darker in channel 1
    with pytest.raises(DatasetError, match="channel"):
        overlay_dataset(2, mri_dataset, tmp_path / "bad", channel=2)


def test_regions_get_one_colour_each(region_dataset, tmp_path):
    ds = region_dataset.raw / "Dataset003_Regions"
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(ds / "labelsTr" / "case_000.nii.gz", pred / "case_000.nii.gz")
    (res,) = overlay_dataset(3, region_dataset, tmp_path / "out", pred_dir=pred).results
    assert res.path and not res.problems
    (panel,) = res.panels
    seg2d = _slice(_ref(region_dataset, "Dataset003_Regions", "case_000"), panel)
    png = _png(res)
    whole, core = seg2d > 0, seg2d == 2
    assert core.any()
    assert _outline_colour_fraction(png, panel, whole, np.array(PALETTE[0])) > 0.95  # "whole" = [1, 2]
    assert _outline_colour_fraction(png, panel, core, np.array(PALETTE[1])) > 0.95  # "core" = [2], drawn on top
    r, c = np.argwhere(core & ~outline(core, 1))[0]
    assert _is_filled_with(_rgb(png, panel, r, c), np.array(PALETTE[1]))


def test_bad_input_is_named_and_the_run_goes_on(ct_dataset, tmp_path, caplog):
    ds = ct_dataset.raw / "Dataset001_CT"
    pred = tmp_path / "pred"
    pred.mkdir()
    write_image(np.zeros((5, 8, 8), np.uint8), pred / "case_000.nii.gz", (3.0, 1.0, 1.0))  # another grid
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "case_001.nii.gz")))
    seg[4:7, 10:20, 10:20] = 7  # a value dataset.json does not declare
    write_image(seg, pred / "case_001.nii.gz", (3.0, 1.0, 1.0))
    (ds / "imagesTr" / "case_002_0000.nii.gz").write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        report = overlay_dataset(1, ct_dataset, tmp_path / "out", pred_dir=pred, cases=["case_000", "case_001",
                                                                                         "case_002", "case_009"])
    res = {r.case_id: r for r in report.results}
    assert "has shape (5, 8, 8) but the image has (12, 40, 36)" in res["case_000"].problems[0]
    assert res["case_000"].path is not None
    assert "label value(s) 7 not in dataset.json" in res["case_001"].problems[0]
    png = _png(res["case_001"])
    (panel,) = res["case_001"].panels
    assert panel.found and panel.index in (4, 5, 6)  # the prediction's foreground chooses the slice
    assert _is_filled_with(_rgb(png, panel, 15, 15), np.array(UNDECLARED_COLOR))
    assert res["case_002"].path is None and "cannot read the image" in res["case_002"].error
    assert res["case_009"].path is None and "no case `case_009`" in res["case_009"].error
    for cid in ("case_000", "case_001", "case_002", "case_009"):
        assert any(cid in rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING")
    # the CLI: exit 0 while something was drawn, 2 when nothing could be
    args = ["overlay", "--task", "1", "--raw", str(ct_dataset.raw), "--preprocessed", str(tmp_path / "none"),
            "--pred", str(pred), "-q", "-o"]
    assert main(args + [str(tmp_path / "cli"), "--cases", "case_000", "case_002"]) == 0
    assert main(args + [str(tmp_path / "cli2"), "--cases", "case_002"]) == 2


def test_tasks_travel_to_worker_processes(ct_dataset, tmp_path, monkeypatch):
    """What ``--workers`` sends to a spawned worker: every task pickles and draws the same picture once unpickled
    (a real pool is started by nnfast.parallel's own tests; here it would only add seconds)."""
    import pickle

    import nnfast.parallel

    sent = []

    def fake_run_tasks(func, items, **kwargs):
        assert kwargs["workers"] == 2 and kwargs["warmup"] is False
        sent.extend(items)
        return [func(pickle.loads(pickle.dumps(t))) for t in items]

    monkeypatch.setattr(nnfast.parallel, "run_tasks", fake_run_tasks)
    report = overlay_dataset(1, ct_dataset, tmp_path / "out", workers=2)
    assert len(sent) == 3 and len(report.written) == 3
    assert all(p.suffix == ".png" for p in (tmp_path / "out").iterdir())


def test_ct_window_comes_from_the_fingerprint(ct_dataset, tmp_path):
    import json

    from nnfast.visualize.api import _fingerprint_stats

    folder = ct_dataset.preprocessed / "Dataset001_CT"
    folder.mkdir(parents=True)
    stats = {"mean": 0, "median": 0, "std": 1, "min": -5, "max": 5, "percentile_99_5": 200.0,
             "percentile_00_5": -100.0}
    (folder / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [[3, 1, 1]], "shapes_after_crop": [[12, 40, 36]], "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": {"0": stats}}))
    assert _fingerprint_stats(folder)[0].percentile_99_5 == 200.0
    (res,) = overlay_dataset(1, ct_dataset, tmp_path / "out", cases=["case_000"]).results
    (panel,) = res.panels
    png = _png(res)
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_dataset.raw / "Dataset001_CT" / "imagesTr" /
                                                    "case_000_0000.nii.gz")))[panel.index]
    r, c = np.argwhere(img <= -900)[0]  # air: below the window, black
    assert _rgb(png, panel, r, c).max() < 2


def test_help_imports_no_matplotlib():
    code = ("import sys\nfrom nnfast.cli.main import build_parser\nimport nnfast.visualize.api\n"
            "try:\n    build_parser().parse_args(['overlay', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'matplotlib' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_preprocessed_store_as_source(ct_dataset, tmp_path):
    from nnfast.io.store import load_case
    from nnfast.preprocess.api import preprocess_dataset

    preprocess_dataset(1, ct_dataset, config="3d_fullres", workers=1, verify=False)
    stores = sorted((ct_dataset.preprocessed / "Dataset001_CT").glob("*/case_000.zarr"))
    assert len(stores) == 1
    _, seg, props, _ = load_case(stores[0])
    back = np.argsort(props["transpose_forward"])
    seg = np.where(seg[0] < 0, 0, seg[0]).transpose(back)  # reader order, as the picture shows it
    report = overlay_dataset(1, ct_dataset, tmp_path / "out", source="3d_fullres", cases=["case_000", "case_001"])
    res = {r.case_id: r for r in report.results}
    assert not report.failed and not res["case_000"].problems
    (panel,) = res["case_000"].panels
    assert panel.found and panel.shape == seg.shape[1:]
    assert _outline_colour_fraction(_png(res["case_000"]), panel, _slice(seg, panel) == 1, np.array(PALETTE[0])) > 0.95
    assert not res["case_001"].panels[0].found
