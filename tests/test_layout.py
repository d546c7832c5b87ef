"""The on-disk layout (``nnfast.layout``): nnU-Net's folder and file names, one owner for every stage."""
from __future__ import annotations

import pytest

from nnfast import layout
from nnfast.errors import CaseNotFoundError, SettingsError


def test_results_layout_is_nnunets(tmp_path):
    root = layout.trainer_folder(tmp_path, "Dataset001_X", "3d_lowres")
    assert root == tmp_path / "Dataset001_X" / "nnfastTrainer__nnfast_plans__3d_lowres"
    assert layout.trainer_folder(tmp_path, "D", "2d", trainer="nnUNetTrainer", plans_identifier="nnUNetResEncUNetMPlans") \
        == tmp_path / "D" / "nnUNetTrainer__nnUNetResEncUNetMPlans__2d"
    assert layout.fold_folder(tmp_path, "Dataset001_X", "3d_lowres", 3) == root / "fold_3"
    assert layout.fold_folder(tmp_path, "Dataset001_X", "3d_lowres", "all") == root / "fold_all"
    assert layout.checkpoint_file(root / "fold_3", "checkpoint_best") == root / "fold_3" / "checkpoint_best.pt"
    assert layout.checkpoint_file(root, "checkpoint_best.pt") == root / "checkpoint_best.pt"
    assert layout.validation_folder(root / "fold_0") == root / "fold_0" / "validation"
    assert layout.next_stage_folder(root, "3d_cascade_fullres") == root / "predicted_next_stage" / "3d_cascade_fullres"
    assert layout.previous_stage_folder(tmp_path, "Dataset001_X", "3d_lowres", "3d_cascade_fullres") == \
        root / "predicted_next_stage" / "3d_cascade_fullres"
    assert layout.sibling_stage_folder(root, "3d_cascade_fullres") == \
        tmp_path / "Dataset001_X" / "nnfastTrainer__nnfast_plans__3d_cascade_fullres"


def test_preprocessed_names():
    assert layout.plans_file_name() == "nnfast_plans.json"
    assert layout.plans_file_name("nnUNetPlans") == "nnUNetPlans.json"
    assert layout.data_identifier("3d_fullres") == "nnfast_3d_fullres"
    assert (layout.SPLITS_FILE, layout.FINGERPRINT_FILE, layout.DATASET_JSON) == \
        ("splits_final.json", "nnfast_fingerprint.json", "dataset.json")


def test_folds():
    assert [layout.check_fold(f) for f in (0, "3", "all", 7)] == [0, 3, "all", 7]
    for bad in (-1, "x", True, "1.5", None):
        with pytest.raises(SettingsError):
            layout.check_fold(bad)
    assert [layout.fold_name(f) for f in (0, "all")] == ["fold_0", "fold_all"]
    assert [layout.parse_fold_name(n) for n in ("fold_4", "fold_all", "fold_x", "validation")] == [4, "all", None, None]


def test_ground_truth_prefers_the_preprocessed_copy(tmp_path):
    with pytest.raises(CaseNotFoundError, match="gt_segmentations"):
        layout.ground_truth_folder(tmp_path / "pre", tmp_path / "raw", "D")
    (tmp_path / "raw" / "D" / "labelsTr").mkdir(parents=True)
    assert layout.ground_truth_folder(tmp_path / "pre", tmp_path / "raw", "D") == tmp_path / "raw" / "D" / "labelsTr"
    (tmp_path / "pre" / "D" / "gt_segmentations").mkdir(parents=True)
    assert layout.ground_truth_folder(tmp_path / "pre", None, "D") == tmp_path / "pre" / "D" / "gt_segmentations"


def test_cli_choices_are_the_plan_schemas_configuration_names():
    """``--config`` takes any configuration of the loaded plans (custom ones too, validated against the plans); the
    help names the schema's configurations, not a hand-made list."""
    from nnfast.cli.main import build_parser
    from nnfast.plan.schema import CONFIGURATION_NAMES

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for cmd, dest in (("train", "config"), ("predict", "config"), ("find-best", "configs")):
        action = next(a for a in sub[cmd]._actions if a.dest == dest)
        assert action.choices is None and ", ".join(CONFIGURATION_NAMES) in action.help
    pre = next(a for a in sub["preprocess"]._actions if a.dest == "config")
    assert pre.choices is None and all(c in pre.help for c in ("2d", "3d_fullres", "3d_lowres", "all"))


def test_checkpoint_name_accepts_short_and_nnunet_spellings():
    from nnfast.errors import SettingsError

    for given, stem in [("best", "checkpoint_best"), ("final", "checkpoint_final"), ("checkpoint_latest", "checkpoint_latest"),
                        ("checkpoint_best.pth", "checkpoint_best"), ("checkpoint_final.pt", "checkpoint_final")]:
        assert layout.checkpoint_name(given) == stem
    with pytest.raises(SettingsError, match="'nope'"):
        layout.checkpoint_name("nope")
