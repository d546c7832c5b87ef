"""``nnfast plan --transfer-from SOURCE --task TARGET`` against nnU-Net's own ``move_plans_between_datasets``.

Both move the plans of one synthetic dataset onto another (different shapes, spacings, intensities and labels). nnfast
writes, exported in nnU-Net's format, every field nnU-Net writes with the same value, except by design
``foreground_intensity_properties_per_channel``: nnU-Net keeps the source's, nnfast puts in the target's (so that CT
normalization of the target uses its own intensities), along with the target's labels.
"""
from __future__ import annotations

import json

import pytest

from factories import make_raw_dataset
from nnfast.cli.main import main
from nnfast.io.atomic import read_json
from nnfast.settings import Settings

pytestmark = pytest.mark.compat

SOURCE, TARGET = 44, 45
SOURCE_NAME, TARGET_NAME = "Dataset044_TransferSrc", "Dataset045_TransferDst"


def test_transfer_equals_nnunet_move_plans(tmp_path, monkeypatch, capsys):
    for var in ("NNFAST_RAW", "NNFAST_PREPROCESSED", "NNFAST_RESULTS"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    make_raw_dataset(s.raw, SOURCE, "TransferSrc", [(20, 48, 40)] * 3, [(2.0, 0.8, 0.8)] * 3, seed=1)
    make_raw_dataset(s.raw, TARGET, "TransferDst", [(12, 24, 24)] * 3, [(1.0, 1.0, 1.0)] * 3, seed=7, n_labels=3)
    roots = ["--raw", str(s.raw), "--preprocessed", str(s.preprocessed), "--results", str(s.results)]
    assert main(["plan", "--task", str(SOURCE), "--export-nnunet", "-q", *roots]) == 0
    assert main(["plan", "--task", str(TARGET), "--gpu-memory-gb", "0.05", "-q", *roots]) == 0  # its own plans

    # nnU-Net moves its plans file (nnUNetPlans.json, written by --export-nnunet) to the target
    monkeypatch.setenv("nnUNet_raw", str(s.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(s.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(s.results))
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
        move_plans_between_datasets,
    )

    move_plans_between_datasets(SOURCE, TARGET, "nnUNetPlans", "nnUNetPlans")
    theirs = read_json(s.preprocessed / TARGET_NAME / "nnUNetPlans.json")

    # the target already has different plans under nnfast_plans: refused, then written beside them
    code = 0
    try:
        code = main(["plan", "--task", str(TARGET), "--transfer-from", str(SOURCE), "-q", *roots])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "--replan" in capsys.readouterr().err
    assert main(["plan", "--task", str(TARGET), "--transfer-from", str(SOURCE), "--replan", "--export-nnunet",
                 "-q", *roots]) == 0
    ours = read_json(s.preprocessed / TARGET_NAME / "nnUNetPlans.json")
    ours.pop("nnfast")

    source_fp = read_json(s.preprocessed / SOURCE_NAME / "nnfast_fingerprint.json")
    target_fp = read_json(s.preprocessed / TARGET_NAME / "nnfast_fingerprint.json")
    key = "foreground_intensity_properties_per_channel"
    assert theirs[key] == source_fp[key] != target_fp[key]  # nnU-Net keeps the source's statistics
    assert ours.pop(key) == target_fp[key]
    theirs.pop(key)
    theirs.pop("nnfast")  # nnfast's provenance entry of the source file, which nnU-Net copies along
    assert ours == theirs

    moved = read_json(s.preprocessed / TARGET_NAME / "nnfast_plans.json")
    source = read_json(s.preprocessed / SOURCE_NAME / "nnfast_plans.json")
    assert moved["dataset_name"] == TARGET_NAME
    assert moved["configurations"] == source["configurations"]  # architecture, patch, spacing: the source's
    assert moved["labels"] == json.loads((s.raw / TARGET_NAME / "dataset.json").read_text())["labels"]
    assert moved["labels"] != source["labels"]
