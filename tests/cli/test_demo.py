"""The README's first command, at a size that fits the test suite: every stage runs on real files. The held-out
validation runs without mirroring (``--no-tta``: 8x fewer network passes, most of this test's time with them);
mirrored prediction is tested in ``tests/infer``."""
import json

import SimpleITK as sitk

from nnfast.cli.main import main


def test_demo_runs_every_stage(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--folder", str(folder), "--cases", "5", "--epochs", "1", "--iterations", "1",
                 "--workers", "1", "--no-tta"]) == 0
    out = capsys.readouterr().out
    for step in ("[1/7]", "[5/7]", "[6/7]", "[7/7]", "patch size", "demo finished"):
        assert step in out
    fold = folder / "results" / "Dataset901_DemoCT" / "nnfastTrainer__nnfast_plans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pt").is_file() and (fold / "progress.png").stat().st_size > 0
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    assert json.loads((fold / "validation" / "nnfast_predict.json").read_text())["use_tta"] is False
    # pictures: the held-out cases' overlays and the validation's summary.png
    held_out = sorted(c["prediction_file"].rsplit("/", 1)[-1].replace(".nii.gz", ".png")
                      for c in summary["metric_per_case"])
    assert sorted(p.name for p in (folder / "overlays").glob("*.png")) == held_out
    assert (fold / "validation" / "summary.png").stat().st_size > 0
    preds = sorted((folder / "predictions").glob("*.nii.gz"))
    assert len(preds) == 2
    for p in preds:
        ref = sitk.ReadImage(str(folder / "raw" / "Dataset901_DemoCT" / "imagesTs" / p.name.replace(".nii.gz", "_0000.nii.gz")))
        pred = sitk.ReadImage(str(p))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
        assert pred.GetOrigin() == ref.GetOrigin() and pred.GetDirection() == ref.GetDirection()
    # a second run reuses everything up to training
    assert main(["demo", "--folder", str(folder), "--cases", "5", "--skip-training", "--workers", "1"]) == 0
    again = capsys.readouterr().out
    assert "reusing" in again and "5 already current" in again


def test_demo_validates_with_mirroring_unless_told():
    from nnfast.cli.main import build_parser

    assert build_parser().parse_args(["demo"]).no_tta is False
    assert build_parser().parse_args(["demo", "--no-tta"]).no_tta is True
