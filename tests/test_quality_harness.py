"""The pure parts of the equal-quality harness (benchmarks/quality/aggregate.py): Dice over seeds, the differences
to arm A and the inside/outside verdict, the table and the CSV."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality import aggregate  # noqa: E402


def _rows(values: dict[str, list[float]], dataset="iso", label="organ"):
    return [{"dataset": dataset, "arm": arm, "seed": s, "label": label, "dice": d, "wall_s": 10.0 + s,
             "loader_wait_s": 1.0}
            for arm, ds in values.items() for s, d in enumerate(ds)]


def test_mean_and_sample_sd_over_seeds():
    m, s = aggregate.mean_sd([0.8, 0.9, 1.0])
    assert m == pytest.approx(0.9) and s == pytest.approx(0.1)  # ddof=1, not 0.0816 (ddof=0)
    m, s = aggregate.mean_sd([0.5, float("nan")])
    assert m == 0.5 and math.isnan(s)
    assert all(math.isnan(v) for v in aggregate.mean_sd([]))


def test_summary_orders_values_by_seed():
    rows = list(reversed(_rows({"A": [0.7, 0.8, 0.9]})))
    s = aggregate.summarize(rows)[("iso", "A", "organ")]
    assert s["values"] == [0.7, 0.8, 0.9] and s["seeds"] == [0, 1, 2] and s["n"] == 3


def test_difference_inside_the_seed_spread_when_the_spread_is_larger_than_a_dice_point():
    # A: 0.80 +- 0.05, B mean 0.03 higher: outside 1 Dice point, inside the seed spread
    summary = aggregate.summarize(_rows({"A": [0.75, 0.80, 0.85], "B": [0.83, 0.83, 0.83]}))
    (d,) = aggregate.differences(summary)
    assert d["arm"] == "B" and d["diff"] == pytest.approx(0.03)
    assert d["spread"] == pytest.approx(0.05) and d["limit"] == pytest.approx(0.05) and d["inside"]


def test_difference_outside_when_both_arms_are_tight():
    summary = aggregate.summarize(_rows({"A": [0.800, 0.801, 0.799], "C": [0.770, 0.771, 0.769]}))
    (d,) = aggregate.differences(summary)
    assert d["diff"] == pytest.approx(-0.03) and d["limit"] == pytest.approx(aggregate.TOLERANCE)
    assert not d["inside"]
    # the same difference within one Dice point is inside
    summary = aggregate.summarize(_rows({"A": [0.800, 0.801, 0.799], "C": [0.795, 0.796, 0.794]}))
    assert aggregate.differences(summary)[0]["inside"]


def test_one_seed_has_no_spread_and_uses_the_tolerance():
    summary = aggregate.summarize(_rows({"A": [0.5], "B": [0.52]}))
    (d,) = aggregate.differences(summary)
    assert math.isnan(d["spread"]) and d["limit"] == aggregate.TOLERANCE and not d["inside"]


def test_differences_per_dataset_and_label_against_the_reference_only():
    rows = (_rows({"A": [0.8, 0.8], "B": [0.8, 0.8], "C": [0.5, 0.5]}, "iso", "organ")
            + _rows({"A": [0.3, 0.4], "B": [0.35, 0.36]}, "real", "grey_matter"))
    diffs = aggregate.differences(aggregate.summarize(rows))
    got = {(d["dataset"], d["label"], d["arm"]): d["inside"] for d in diffs}
    assert got == {("iso", "organ", "B"): True, ("iso", "organ", "C"): False, ("real", "grey_matter", "B"): True}


def test_table_csv_and_timings():
    rows = _rows({"A": [0.75, 0.80, 0.85], "B": [0.83, 0.83, 0.83], "C": [0.5, 0.5, 0.5]})
    summary = aggregate.summarize(rows)
    runs = [{"dataset": r["dataset"], "arm": r["arm"], "wall_s": r["wall_s"], "loader_wait_s": r["loader_wait_s"]}
            for r in rows]
    times = aggregate.timings(runs)
    assert times[("iso", "A")]["wall_mean"] == pytest.approx(11.0) and times[("iso", "A")]["n"] == 3
    text = aggregate.markdown_table(summary, aggregate.differences(summary), times)
    line = next(ln for ln in text.splitlines() if ln.startswith("| iso | organ"))
    assert "0.800 ± 0.050 (n=3)" in line and "+0.030 (0.050) inside" in line and "-0.300 (0.050) **OUTSIDE**" in line
    assert "| iso | 11 ± 1 (1.0 ± 0.0)" in text
    # the labels' sizes, the smallest marked (which Dice the budget cannot be expected to reach)
    rows2 = rows + [{**r, "label": "tumour", "dice": 0.0} for r in rows]
    s2 = aggregate.summarize(rows2)
    text = aggregate.markdown_table(s2, aggregate.differences(s2), label_shares={"iso": {"organ": 0.015,
                                                                                          "tumour": 0.0009}})
    assert "| iso | tumour (0.09 % of voxels, smallest) | 0.000 ± 0.000 (n=3)" in text
    assert "| iso | organ (1.5 % of voxels) |" in text
    csv_text = aggregate.rows_csv(rows)
    assert csv_text.splitlines()[0] == "dataset,arm,seed,label,dice,wall_s,loader_wait_s"
    assert len(csv_text.splitlines()) == 1 + len(rows)


@pytest.mark.compat
@pytest.mark.parametrize("name", sorted(__import__("benchmarks.quality.arm_worker", fromlist=["ABLATIONS"]).ABLATIONS))
def test_every_ablation_switches_off_a_transform_in_nnunets_pipeline_and_a_field_of_nnfasts(name, monkeypatch):
    """``--ablate NAME`` finds its transform in nnU-Net's default training pipeline (A) and names real
    AugmentConfig probabilities (B, C), which end up 0 while the others keep nnU-Net's defaults."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from benchmarks.quality import arm_worker
    from nnfast.data import augment_params
    from nnfast.data.augment_params import AugmentConfig

    patch, ds = (8, 16, 16), [[1, 1, 1], [0.5, 0.5, 0.5]]
    aug = AugmentConfig.from_patch_size(patch, ds_scales=ds)
    tr = nnUNetTrainer.get_training_transforms(patch, aug.rotation, ds, aug.mirror_axes, aug.do_dummy_2d,
                                               use_mask_for_norm=[False], is_cascaded=False,
                                               foreground_labels=[1, 2], regions=None, ignore_label=None)
    assert arm_worker._ablate_nnunet_transforms(tr, [name]) >= 1
    monkeypatch.setattr(augment_params.AugmentConfig, "__post_init__", augment_params.AugmentConfig.__post_init__)
    arm_worker._patch_nnfast_augmentation([name])
    off = AugmentConfig.from_patch_size(patch, ds_scales=ds)
    fields = arm_worker.ABLATIONS[name][0]
    assert all(getattr(off, f) == 0.0 for f in fields)
    assert all(getattr(aug, f) > 0 for f in fields)
    assert off.p_noise == aug.p_noise or "p_noise" in fields


def test_batch_stats_given_case_removes_the_case_mix_and_keeps_a_real_shift():
    """Issue 15: two loaders that draw the cases in different proportions but place patches alike differ at batch
    level; compared given the case they do not, while a real per-case shift still shows."""
    import numpy as np

    from benchmarks.quality.batch_stats import given_case

    rng = np.random.default_rng(0)
    level = {"a": 0.0, "b": 1.0}  # case b's patches are brighter

    def samples(n_a, n_b, shift=0.0):
        return [(c, 0.02, level[c] + shift + rng.normal(0, 0.1), 1.0 + rng.normal(0, 0.01))
                for c, n in (("a", n_a), ("b", n_b)) for _ in range(n)]

    ref = samples(300, 100)
    mixed = samples(100, 300)  # more of case b: a higher mean per batch, same placement
    assert np.mean([r[2] for r in mixed]) - np.mean([r[2] for r in ref]) > 0.4
    d, se = given_case(ref, mixed)["image_mean"]
    assert abs(d) < 3 * se and se < 0.02
    d, se = given_case(ref, samples(100, 300, shift=0.1))["image_mean"]
    assert d / se > 5
