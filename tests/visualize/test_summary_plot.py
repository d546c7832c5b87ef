"""``nnfast evaluate`` writes summary.png beside summary.json: Dice per case and label, read back and checked."""
import json

import numpy as np
from matplotlib.image import imread

from factories import blob_labels, write_image
from nnfast.cli.main import main
from nnfast.evaluate.metrics import EvaluationLabels, Summary
from nnfast.visualize.overlay import PALETTE
from nnfast.visualize.summary_plot import plot_summary, summary_plot_path


def _has_colour(png: np.ndarray, colour, tol: float = 8) -> int:
    return int((np.abs(png[..., :3] * 255 - np.array(colour)).max(axis=-1) < tol).sum())


def test_evaluate_writes_summary_png(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(4):
        seg = blob_labels((8, 24, 24), rng)
        write_image(seg, ref / f"case_{i}.nii.gz", (1.0, 1.0, 1.0))
        p = seg.copy()
        if i == 3:
            p[p == 2] = 1  # a worst case for label 2
        write_image(p, pred / f"case_{i}.nii.gz", (1.0, 1.0, 1.0))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2}, "numTraining": 4,
        "file_ending": ".nii.gz"}))
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--dataset-json",
                 str(tmp_path / "dataset.json"), "--workers", "1"]) == 0
    assert "summary.png" in capsys.readouterr().out
    png_file = pred / "summary.png"
    assert (pred / "summary.json").is_file() and png_file.stat().st_size > 5_000
    png = imread(png_file)
    assert png.shape[0] >= 400 and png.shape[1] >= 500
    assert _has_colour(png, PALETTE[0]) > 20 and _has_colour(png, PALETTE[1]) > 20  # the dots of both labels
    # evaluating the folder again without a file ending does not take summary.png for a prediction
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--labels", "1", "2", "-q"]) == 0
    assert len(json.loads((pred / "summary.json").read_text())["metric_per_case"]) == 4
    # -o elsewhere: the picture follows the summary file
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--dataset-json",
                 str(tmp_path / "dataset.json"), "-o", str(tmp_path / "res" / "cv.json"), "-q"]) == 0
    assert (tmp_path / "res" / "cv.png").is_file()


def test_summary_with_absent_labels_and_regions_draws(tmp_path):
    labels = EvaluationLabels(((1, 2), 2), None, {"(1, 2)": "whole", "2": "core"}, True)
    counts = np.array([[[10, 1, 1, 100], [0, 0, 0, 112]], [[5, 5, 0, 100], [3, 0, 2, 105]]])
    summary = Summary(labels, ("a", "b"), ("ra", "rb"), ("pa", "pb"), counts)
    out = plot_summary(summary, summary_plot_path(tmp_path / "summary.json"))
    assert out == tmp_path / "summary.png" and out.stat().st_size > 5_000
