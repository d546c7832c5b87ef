"""Plans schema: JSON round trip, schema version check, inheritance resolution, atomic write/load, no torch import."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.errors import PlanError
from nnfast.plan.planner import load_plans, plan_experiment, write_plans
from nnfast.plan.schema import (
    PLANS_SCHEMA_VERSION,
    Architecture,
    ConfigurationPlan,
    InheritedConfiguration,
    Plans,
)
from plan.plan_reference_nnunet import dataset_info, make_dataset_json, make_fingerprint


def _plans(shape=(400, 512, 512), spacing=(0.8, 0.8, 0.8), channels=("CT",), n_labels=3, n=6, tmp=None) -> Plans:
    fp = make_fingerprint([spacing] * n, [shape] * n, n_channels=len(channels))
    dj = make_dataset_json(list(channels), n_labels, n)
    with tempfile.TemporaryDirectory() as d:
        return plan_experiment(fp, dataset_info(Path(d), dj))


@pytest.fixture(scope="module")
def cascade_plans() -> Plans:
    p = _plans()
    assert set(p.configurations) == {"2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"}
    return p


def test_json_round_trip(cascade_plans, tmp_path):
    text = json.dumps(cascade_plans.to_json())
    back = Plans.from_json(json.loads(text))
    assert back == cascade_plans
    assert back.to_json() == cascade_plans.to_json()
    assert list(back.configurations) == ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]
    # lowres medians are ints, fullres medians floats, as nnU-Net writes them
    assert all(isinstance(v, int) for v in back.configuration("3d_lowres").median_image_size_in_voxels)
    assert all(isinstance(v, float) for v in back.configuration("3d_fullres").median_image_size_in_voxels)


def test_write_and_load(cascade_plans, tmp_path):
    path = tmp_path / "sub" / "nnfast_plans.json"
    write_plans(cascade_plans, path)
    assert load_plans(path) == cascade_plans
    assert [p.name for p in path.parent.iterdir()] == ["nnfast_plans.json"]  # no temporary left behind
    d = json.loads(path.read_text())
    assert d["schema_version"] == PLANS_SCHEMA_VERSION and d["experiment_planner"] == "nnfast.ExperimentPlanner"
    assert d["configurations"]["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}


def test_schema_version_checked(cascade_plans, tmp_path):
    d = cascade_plans.to_json()
    d["schema_version"] = PLANS_SCHEMA_VERSION + 1
    with pytest.raises(PlanError, match="schema version"):
        Plans.from_json(d)
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=str(path.name)):
        load_plans(path)
    nnunet_like = {k: v for k, v in cascade_plans.to_json().items() if k != "schema_version"}
    with pytest.raises(PlanError, match="from_nnunet_plans"):
        Plans.from_json(nnunet_like)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plans(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plans(tmp_path / "bad.json")
    d = _plans(shape=(40, 40, 40)).to_json()
    del d["configurations"]["3d_fullres"]["patch_size"]
    with pytest.raises(PlanError, match="patch_size"):
        Plans.from_json(d)


def test_cascade_resolves_to_fullres(cascade_plans):
    full = cascade_plans.configuration("3d_fullres")
    casc = cascade_plans.configuration("3d_cascade_fullres")
    low = cascade_plans.configuration("3d_lowres")
    assert casc.name == "3d_cascade_fullres" and casc.inherits_from == "3d_fullres"
    assert casc.previous_stage == "3d_lowres" and casc.next_stage is None
    assert casc.data_identifier == full.data_identifier == "nnfast_3d_fullres"
    assert dataclasses.replace(casc, name=full.name, inherits_from=None, previous_stage=None) == full
    assert low.next_stage == "3d_cascade_fullres" and low.data_identifier == "nnfast_3d_lowres"
    assert full.batch_dice and not low.batch_dice and cascade_plans.configuration("2d").batch_dice


def test_unknown_and_circular_configurations(cascade_plans):
    with pytest.raises(PlanError, match="not in the plans"):
        cascade_plans.configuration("3d_nope")
    confs = dict(cascade_plans.configurations)
    confs["a"] = InheritedConfiguration("a", "b")
    confs["b"] = InheritedConfiguration("b", "a")
    with pytest.raises(PlanError, match="circle"):
        dataclasses.replace(cascade_plans, configurations=confs).configuration("a")


def test_invalid_dataclasses_rejected():
    with pytest.raises(PlanError, match="n_stages=2"):
        Architecture(n_stages=2, features_per_stage=(32,), kernel_sizes=((3, 3),), strides=((1, 1),),
                     n_conv_per_stage=(2,), n_conv_per_stage_decoder=())
    with pytest.raises(PlanError, match="2 or 3 axes"):
        Architecture(n_stages=1, features_per_stage=(32,), kernel_sizes=((3,),), strides=((1,),),
                     n_conv_per_stage=(2,), n_conv_per_stage_decoder=())
    c = _plans(shape=(40, 40, 40)).configuration("3d_fullres")
    with pytest.raises(PlanError, match="agree"):
        dataclasses.replace(c, spacing=(1.0, 1.0))
    with pytest.raises(PlanError, match="batch_size"):
        dataclasses.replace(c, batch_size=0)
    assert isinstance(c, ConfigurationPlan) and c.architecture.num_pool_per_axis == (3, 3, 3)


def test_planner_rejects_bad_input(tmp_path):
    dj = make_dataset_json(["CT"], 2, 2)
    info = dataset_info(tmp_path, dj)
    with pytest.raises(PlanError, match="3 positive"):
        plan_experiment(make_fingerprint([(1, 1, 0)] * 2, [(10, 10, 10)] * 2), info)
    with pytest.raises(PlanError, match="2 channel"):
        plan_experiment(make_fingerprint([(1, 1, 1)] * 2, [(10, 10, 10)] * 2, n_channels=2), info)
    with pytest.raises(PlanError, match="no cases"):
        plan_experiment(make_fingerprint([], []), info)
    with pytest.raises(PlanError, match="overwrite_target_spacing"):
        plan_experiment(make_fingerprint([(1, 1, 1)] * 2, [(10, 10, 10)] * 2), info, overwrite_target_spacing=[1, 1])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    shape=st.tuples(st.integers(1, 600), st.integers(8, 600), st.integers(8, 600)),
    spacing=st.tuples(st.floats(0.3, 8), st.floats(0.3, 8), st.floats(0.3, 8)),
    channels=st.lists(st.sampled_from(["CT", "T1", "noNorm"]), min_size=1, max_size=3),
    n_labels=st.integers(2, 20),
)
def test_round_trip_random_plans(shape, spacing, channels, n_labels):
    p = _plans(shape=shape, spacing=spacing, channels=tuple(channels), n_labels=n_labels, n=3)
    back = Plans.from_json(json.loads(json.dumps(p.to_json())))
    assert back == p
    for name in p.configurations:
        assert back.configuration(name) == p.configuration(name)


def test_planning_does_not_import_torch():
    code = ("import sys, nnfast.plan.planner, nnfast.plan.nnunet_compat, nnfast.plan.schema; "
            "assert 'torch' not in sys.modules, 'nnfast.plan imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_empty_median_axis_is_a_plan_error(tmp_path):
    info = dataset_info(tmp_path, make_dataset_json(["CT"], 2, 3))
    fp = make_fingerprint([(1.0, 1.0, 1.0)] * 3, [(1, 60, 60)] * 3)
    with pytest.raises(PlanError, match="empty axis"):  # nnU-Net: OverflowError
        plan_experiment(fp, info, overwrite_target_spacing=[3.0, 1.0, 1.0])


def test_custom_configuration_inherits_with_overrides(cascade_plans, tmp_path):
    """nnU-Net's custom configurations (``"3d_fullres_bs40": {"inherits_from": "3d_fullres", "batch_size": 40}``) are
    resolved when the plans load; they round-trip and export as nnU-Net writes them."""
    from nnfast.plan.nnunet_compat import to_nnunet_plans

    d = cascade_plans.to_json()
    d["configurations"]["3d_fullres_bs40"] = {"inherits_from": "3d_fullres", "batch_size": 40}
    p = tmp_path / "custom.json"
    p.write_text(json.dumps(d))
    plans = load_plans(p)
    c = plans.configuration("3d_fullres_bs40")
    parent = plans.configuration("3d_fullres")
    assert c.batch_size == 40 and parent.batch_size != 40
    assert c.patch_size == parent.patch_size and c.data_identifier == parent.data_identifier
    assert c.inherits_from == "3d_fullres" and c.name == "3d_fullres_bs40"
    assert plans.to_json()["configurations"]["3d_fullres_bs40"] == {"inherits_from": "3d_fullres", "batch_size": 40}
    exported = to_nnunet_plans(plans, {"file_ending": ".nii.gz"})
    assert exported["configurations"]["3d_fullres_bs40"] == {"inherits_from": "3d_fullres", "batch_size": 40}
    d["configurations"]["bad"] = {"inherits_from": "3d_fullres", "batch_size": "many"}
    p.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="bad"):
        load_plans(p).configuration("bad")


def test_schema_version_1_files_still_load(cascade_plans, tmp_path):
    """Plans written before the network class could vary (schema 1, PlainConvUNet only) read unchanged."""
    d = cascade_plans.to_json()
    d["schema_version"] = 1
    for c in d["configurations"].values():
        c.get("architecture", {}).pop("network_class", None)
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    old = load_plans(p)
    assert old.configuration("3d_fullres").architecture.network_class == "PlainConvUNet"
    assert old.configuration("3d_fullres") == cascade_plans.configuration("3d_fullres")
    assert old.to_json()["schema_version"] == PLANS_SCHEMA_VERSION == 2
