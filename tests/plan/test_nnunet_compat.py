"""nnUNetPlans.json adapter: round trip, nnU-Net's PlansManager loads the export and builds the same network."""
from __future__ import annotations

import copy
import json

import pytest

from nnfast.errors import PlanError
from nnfast.plan.nnunet_compat import from_nnunet_plans, image_reader_writer_for, to_nnunet_plans
from nnfast.plan.planner import plan_experiment
from plan.plan_reference_nnunet import dataset_info, make_dataset_json, make_fingerprint, run_nnunet_planner

FP = make_fingerprint([(2.0, 0.8, 0.8)] * 6, [(200, 512, 512)] * 6, n_channels=2,
                      median_relative_size_after_cropping=0.6)
DJ = make_dataset_json(["CT", "T2"], 4, 6)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    d = tmp_path_factory.mktemp("compat")
    plans = plan_experiment(FP, dataset_info(d, DJ))
    assert set(plans.configurations) == {"2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"}
    return plans, json.loads(json.dumps(to_nnunet_plans(plans, DJ)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """nnU-Net's own plans for the same dataset."""
    return run_nnunet_planner(FP, DJ, tmp_path_factory.mktemp("compat_ref"))


def test_round_trip(planned):
    plans, exported = planned
    assert from_nnunet_plans(exported, DJ) == plans


def test_export_layout(planned):
    _, d = planned
    assert d["plans_name"] == "nnUNetPlans" and d["image_reader_writer"] == "SimpleITKIO"
    assert d["experiment_planner_used"] == "ExperimentPlanner" and d["label_manager"] == "LabelManager"
    c = d["configurations"]["3d_fullres"]
    assert c["data_identifier"] == "nnUNetPlans_3d_fullres" and c["preprocessor_name"] == "DefaultPreprocessor"
    a = c["architecture"]
    assert a["network_class_name"] == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    assert a["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv3d"
    assert a["arch_kwargs"]["norm_op"] == "torch.nn.modules.instancenorm.InstanceNorm3d"
    assert a["arch_kwargs"]["nonlin"] == "torch.nn.LeakyReLU" and a["arch_kwargs"]["nonlin_kwargs"] == {"inplace": True}
    assert a["_kw_requires_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]
    assert c["resampling_fn_seg_kwargs"] == {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    assert d["configurations"]["2d"]["architecture"]["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv2d"
    assert d["configurations"]["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}


@pytest.mark.compat
def test_nnunet_plans_manager_and_network(planned, reference):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, exported = planned
    pm, pm_ref = PlansManager(exported), PlansManager(reference)
    assert pm.available_configurations == pm_ref.available_configurations
    assert pm.image_reader_writer_class.__name__ == "SimpleITKIO"
    assert pm.get_label_manager(DJ).num_segmentation_heads == 4
    for name in pm.available_configurations:
        cm, cm_ref = pm.get_configuration(name), pm_ref.get_configuration(name)
        ours = plans.configuration(name)
        assert list(cm.patch_size) == list(ours.patch_size) == list(cm_ref.patch_size)
        assert cm.batch_size == ours.batch_size == cm_ref.batch_size
        assert cm.configuration == {**cm_ref.configuration, "data_identifier": cm_ref.data_identifier}
        assert cm.previous_stage_name == ours.previous_stage and cm.batch_dice == ours.batch_dice
        assert cm.preprocessor_class.__name__ == "DefaultPreprocessor"
        assert cm.resampling_fn_data.func.__name__ == "resample_data_or_seg_to_shape"
        nets = []
        for m in (cm, cm_ref):
            with torch.device("meta"):
                nets.append(get_network_from_plans(
                    m.network_arch_class_name, m.network_arch_init_kwargs, m.network_arch_init_kwargs_req_import,
                    2, 4, allow_init=False, deep_supervision=True))
        shapes = [{k: tuple(v.shape) for k, v in n.state_dict().items()} for n in nets]
        assert shapes[0] == shapes[1]
        assert type(nets[0].encoder.stages[0][0].convs[0].norm).__name__.startswith("InstanceNorm")


@pytest.mark.compat
def test_reads_nnunet_written_plans(planned, reference):
    plans, _ = planned
    back = from_nnunet_plans(reference, DJ)
    assert back.plans_name == "nnUNetPlans" and back.experiment_planner == "ExperimentPlanner"
    assert back.configurations == plans.configurations
    assert back.transpose_forward == plans.transpose_forward
    assert back.foreground_intensity_properties_per_channel == plans.foreground_intensity_properties_per_channel


def test_custom_and_unsupported_configurations(planned):
    plans, exported = planned
    d = copy.deepcopy(exported)
    d["configurations"]["3d_fullres_bs4"] = {"inherits_from": "3d_fullres", "batch_size": 4}
    assert set(from_nnunet_plans(d, DJ).configurations) == set(plans.configurations)  # skipped, logged

    # a cascade overriding more than the stage links is stored resolved
    d = copy.deepcopy(exported)
    d["configurations"]["3d_cascade_fullres"]["batch_size"] = 5
    casc = from_nnunet_plans(d, DJ).configuration("3d_cascade_fullres")
    assert casc.batch_size == 5 and casc.inherits_from == "3d_fullres" and casc.previous_stage == "3d_lowres"

    bad = {
        "network_class_name": ("architecture", "network_class_name",
                               "dynamic_network_architectures.architectures.unet.ResidualUNet", "not supported"),
        "dropout": ("arch_kwargs", "dropout_op", "torch.nn.Dropout3d", "dropout"),
        "norm": ("arch_kwargs", "norm_op", "torch.nn.BatchNorm3d", "InstanceNorm only"),
        "resampling": (None, "resampling_fn_data", "resample_torch_fornnunet", "resample_data_or_seg_to_shape"),
        "preprocessor": (None, "preprocessor_name", "ResEncPreprocessor", "DefaultPreprocessor"),
    }
    for what, (where, key, value, message) in bad.items():
        d = copy.deepcopy(exported)
        c = d["configurations"]["3d_fullres"]
        target = {"architecture": c["architecture"], "arch_kwargs": c["architecture"]["arch_kwargs"], None: c}[where]
        target[key] = value
        with pytest.raises(PlanError, match=message):
            from_nnunet_plans(d, DJ)
    d = copy.deepcopy(exported)
    del d["configurations"]["3d_fullres"]["architecture"]
    with pytest.raises(PlanError, match="old plans format"):
        from_nnunet_plans(d, DJ)


def test_image_reader_writer_for():
    assert image_reader_writer_for({"file_ending": ".nii.gz"}) == "SimpleITKIO"
    assert image_reader_writer_for({"file_ending": ".mha"}) == "SimpleITKIO"
    assert image_reader_writer_for({"file_ending": ".png"}) == "NaturalImage2DIO"
    assert image_reader_writer_for({"file_ending": ".nii"}) == "NibabelIO"
    assert image_reader_writer_for({"file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIOWithReorient"}) \
        == "NibabelIOWithReorient"
    with pytest.raises(PlanError, match=".xyz"):
        image_reader_writer_for({"file_ending": ".xyz"})
