"""Plans are the user's, and several live side by side: ``nnfast plan`` / ``nnfast preprocess`` on a real (tiny) dataset.

- the issue's scenario: ``nnfast plan --gpu-memory-gb 0.05`` then ``nnfast preprocess`` keeps the small plan (it used to
  be silently replaced by an 8 GB plan); asking preprocess for another memory target is a one-line error naming the
  differences, and ``--replan`` overwrites;
- hand edits survive ``preprocess``;
- ``--preset resenc-m`` writes ``nnfast_ResEncM_plans.json`` beside ``nnfast_plans.json`` (and nnU-Net's
  ``nnUNetResEncUNetMPlans.json`` with ``--export-nnunet``), preprocessed into the shared ``nnfast_3d_fullres`` data;
- an unknown plans identifier is an error listing those on disk.
"""
from __future__ import annotations

import json

import pytest

from factories import make_raw_dataset
from nnfast.cli.main import main
from nnfast.settings import Settings

TASK = 43
NAME = "Dataset043_PlansIds"


@pytest.fixture()
def roots(tmp_path, monkeypatch) -> Settings:
    for var in ("NNFAST_RAW", "NNFAST_PREPROCESSED", "NNFAST_RESULTS", "nnUNet_raw", "nnUNet_preprocessed",
                "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    s = Settings(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    make_raw_dataset(s.raw, TASK, "PlansIds", [(24, 40, 40)] * 4, [(1.0, 1.0, 1.0)] * 4, seed=0)
    return s


def _cli(capsys, s: Settings, *argv) -> tuple[int, str, str]:
    try:
        code = main([*map(str, argv), "--raw", str(s.raw), "--preprocessed", str(s.preprocessed),
                     "--results", str(s.results)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _plans(s: Settings, identifier: str = "nnfast_plans") -> dict:
    return json.loads((s.preprocessed / NAME / f"{identifier}.json").read_text())


def test_preprocess_keeps_the_users_plan(roots, capsys):
    s = roots
    assert _cli(capsys, s, "plan", "--task", TASK, "--gpu-memory-gb", "0.05", "-q")[0] == 0
    small = (s.preprocessed / NAME / "nnfast_plans.json").read_bytes()
    patch = _plans(s)["configurations"]["3d_fullres"]["patch_size"]

    assert _cli(capsys, s, "preprocess", "--task", TASK, "--workers", "1", "-q")[0] == 0
    assert (s.preprocessed / NAME / "nnfast_plans.json").read_bytes() == small  # not replaced by an 8 GB plan

    # what an 8 GB plan would be differs, so asking for it is refused with the differences, and nothing is written
    code, _, err = _cli(capsys, s, "preprocess", "--task", TASK, "--gpu-memory-gb", "8", "--workers", "1", "-q")
    assert code == 2 and "--replan" in err and "patch_size" in err and len(err.strip().splitlines()) == 1
    assert (s.preprocessed / NAME / "nnfast_plans.json").read_bytes() == small
    code, _, err = _cli(capsys, s, "plan", "--task", TASK, "-q", "--gpu-memory-gb", "8")
    assert code == 2 and "--plans NAME" in err

    # ... beside them under another identifier, or over them with --replan
    assert _cli(capsys, s, "plan", "--task", TASK, "--gpu-memory-gb", "8", "--plans", "big_plans", "-q")[0] == 0
    assert _plans(s, "big_plans")["configurations"]["3d_fullres"]["patch_size"] != patch
    assert (s.preprocessed / NAME / "nnfast_plans.json").read_bytes() == small
    assert _cli(capsys, s, "plan", "--task", TASK, "--gpu-memory-gb", "8", "--replan", "-q")[0] == 0
    assert _plans(s)["configurations"]["3d_fullres"]["patch_size"] != patch


def test_hand_edits_survive_preprocess(roots, capsys):
    s = roots
    assert _cli(capsys, s, "plan", "--task", TASK, "--gpu-memory-gb", "0.05", "-q")[0] == 0
    f = s.preprocessed / NAME / "nnfast_plans.json"
    d = json.loads(f.read_text())
    d["configurations"]["3d_fullres"]["batch_size"] = 3
    f.write_text(json.dumps(d))
    assert _cli(capsys, s, "preprocess", "--task", TASK, "--workers", "1", "-q")[0] == 0
    assert _plans(s)["configurations"]["3d_fullres"]["batch_size"] == 3
    assert _cli(capsys, s, "plan", "--task", TASK, "-q")[0] == 0  # plain `plan` keeps them too
    assert _plans(s)["configurations"]["3d_fullres"]["batch_size"] == 3


def test_resenc_plans_beside_the_default(roots, capsys):
    from nnfast.plan.nnunet_compat import to_nnunet_plans
    from nnfast.plan.planner import load_plans

    s = roots
    assert _cli(capsys, s, "plan", "--task", TASK, "-q")[0] == 0
    code, out, _ = _cli(capsys, s, "plan", "--task", TASK, "--preset", "resenc-m", "--export-nnunet")
    assert code == 0 and "ResidualEncoderUNet" in out and "nnfast_ResEncM_plans" in out
    res = load_plans(s.preprocessed / NAME / "nnfast_ResEncM_plans.json")
    assert res.configuration("3d_fullres").architecture.network_class == "ResidualEncoderUNet"
    assert load_plans(s.preprocessed / NAME / "nnfast_plans.json").configuration("3d_fullres").architecture \
        .network_class == "PlainConvUNet"
    exported = json.loads((s.preprocessed / NAME / "nnUNetResEncUNetMPlans.json").read_text())
    assert exported["plans_name"] == "nnUNetResEncUNetMPlans"
    assert exported["experiment_planner_used"] == "nnUNetPlannerResEncM"
    assert exported["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith(
        "ResidualEncoderUNet")
    dataset_json = json.loads((s.raw / NAME / "dataset.json").read_text())
    assert json.loads(json.dumps(to_nnunet_plans(res, dataset_json))) == exported

    # preprocessing the ResEnc plans fills the data folder both plans share
    assert _cli(capsys, s, "preprocess", "--task", TASK, "--plans", "nnfast_ResEncM_plans", "--workers", "1",
                "-q")[0] == 0
    assert len(list((s.preprocessed / NAME / "nnfast_3d_fullres").glob("*.zarr"))) == 4

    code, _, err = _cli(capsys, s, "preprocess", "--task", TASK, "--plans", "nope_plans", "--workers", "1", "-q")
    assert code == 2 and "nope_plans" in err


def test_replanned_only_when_the_dataset_changed(roots, capsys, caplog):
    """A changed dataset re-plans (saying so, with what differs); under hand-edited plans it is an error instead."""
    import logging

    import SimpleITK as sitk

    s = roots
    assert _cli(capsys, s, "plan", "--task", TASK, "--gpu-memory-gb", "0.05", "-q")[0] == 0
    before = _plans(s)
    image = next((s.raw / NAME / "imagesTr").glob("*_0000.nii.gz"))
    img = sitk.ReadImage(str(image))
    sitk.WriteImage(sitk.Cast(img, sitk.sitkFloat32) * 3.0 + 500.0, str(image))  # other intensities

    with caplog.at_level(logging.WARNING, logger="nnfast.plan.api"):
        assert _cli(capsys, s, "preprocess", "--task", TASK, "--workers", "1", "-q")[0] == 0
    assert any("changed" in r.getMessage() and "re-planned" in r.getMessage() for r in caplog.records)
    after = _plans(s)
    key = "foreground_intensity_properties_per_channel"
    assert after[key] != before[key]
    assert after["configurations"]["3d_fullres"]["patch_size"] == before["configurations"]["3d_fullres"]["patch_size"]

    # hand-edited plans and a changed dataset: refused, the file untouched
    f = s.preprocessed / NAME / "nnfast_plans.json"
    after["configurations"]["3d_fullres"]["batch_size"] = 5
    f.write_text(json.dumps(after))
    img = sitk.ReadImage(str(image))
    sitk.WriteImage(img * 2.0, str(image))
    code, _, err = _cli(capsys, s, "preprocess", "--task", TASK, "--workers", "1", "-q")
    assert code == 2 and "edited by hand" in err and "--replan" in err
    assert json.loads(f.read_text())["configurations"]["3d_fullres"]["batch_size"] == 5
