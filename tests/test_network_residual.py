"""nnfast's ResidualEncoderUNet against dynamic-network-architectures' ResidualEncoderUNet, both built from the same
nnU-Net ``architecture`` entry (nnfast through its plans adapter, nnU-Net through ``get_network_from_plans``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nnfast.errors import PlanError
from nnfast.network import build_network, network_from_architecture
from nnfast.network_residual import ResidualEncoderUNet
from nnfast.plan.nnunet_compat import from_nnunet_plans, to_nnunet_plans

from train._plans import LABELS, synthetic_plans

NUM_CLASSES = len(LABELS)
CONFIGS = [((3.0, 0.8, 0.8), (40, 200, 200), "3d_fullres"), ((1.0, 1.0, 1.0), (96, 96, 96), "3d_fullres"),
           ((3.0, 0.8, 0.8), (40, 200, 200), "2d")]
IDS = ["3d_anisotropic", "3d_isotropic", "2d"]


def _resenc_plans(spacing, shape, config, in_channels, small):
    """nnfast plans whose ``config`` is a ResidualEncoderUNet (nnU-Net's ResEnc block counts), plus the nnU-Net plans
    dict nnfast writes for them."""
    plans = synthetic_plans(spacing, shape, n_channels=in_channels)
    conf = plans.configuration(config)
    a = conf.architecture
    n = a.n_stages
    feats = tuple(min(2 + 2 * i, 8) for i in range(n)) if small else a.features_per_stage
    arch = dataclasses.replace(a, network_class="ResidualEncoderUNet", features_per_stage=feats,
                               n_conv_per_stage=(1, 3, 4, 6, 6, 6, 6, 6)[:n], n_conv_per_stage_decoder=(1,) * (n - 1))
    plans = dataclasses.replace(plans, configurations={**plans.configurations,
                                                        config: dataclasses.replace(conf, architecture=arch)})
    dj = {"channel_names": plans.channel_names, "labels": LABELS, "file_ending": ".nii.gz", "numTraining": 4}
    return plans, to_nnunet_plans(plans, dj), dj


def _reference(nnunet_plans, config, in_channels, deep_supervision):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    a = nnunet_plans["configurations"][config]["architecture"]
    return get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], in_channels,
                                  NUM_CLASSES, allow_init=True, deep_supervision=deep_supervision)


@pytest.mark.compat
@pytest.mark.parametrize("spacing, shape, config", CONFIGS, ids=IDS)
def test_resenc_state_dict_matches_nnunet(spacing, shape, config):
    with torch.device("meta"):
        plans, nn_plans, dj = _resenc_plans(spacing, shape, config, 2, small=False)
        ref = _reference(nn_plans, config, 2, True)
        ours = build_network(plans, config, 2, NUM_CLASSES, deep_supervision=True)
    assert type(ref).__name__ == "ResidualEncoderUNet" and isinstance(ours, ResidualEncoderUNet)
    a = nn_plans["configurations"][config]["architecture"]
    assert a["network_class_name"].endswith(".ResidualEncoderUNet") and "n_blocks_per_stage" in a["arch_kwargs"]
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    assert all(sd_ours[k].shape == sd_ref[k].shape for k in sd_ref)
    ours.load_state_dict(sd_ref, strict=True)
    ref.load_state_dict(sd_ours, strict=True)
    # the adapter reads what it wrote: same architecture back
    assert from_nnunet_plans(nn_plans, dj).configuration(config).architecture == plans.configuration(config).architecture


@pytest.mark.compat
@pytest.mark.parametrize("spacing, shape, config", CONFIGS, ids=IDS)
def test_resenc_forward_equal_both_ways(spacing, shape, config):
    torch.manual_seed(0)
    plans, nn_plans, _ = _resenc_plans(spacing, shape, config, 2, small=True)
    ref = _reference(nn_plans, config, 2, True)
    ours = build_network(plans, config, 2, NUM_CLASSES, deep_supervision=True)
    # nnU-Net's init zeroes the last norm of each block: randomise every tensor so the residual paths count
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    arch = plans.configuration(config).architecture
    size = (np.prod(np.asarray(arch.strides), axis=0) * 2).tolist()
    x = torch.randn((2, 2, *size), generator=torch.Generator().manual_seed(1))
    ours.eval(), ref.eval()
    with torch.no_grad():
        out_ref, out_ours = ref(x), ours(x)
    assert len(out_ref) == len(out_ours) == arch.n_stages - 1
    for r, o in zip(out_ref, out_ours):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    # and the other direction: our random init into theirs
    torch.manual_seed(2)
    ours2 = network_from_architecture(arch, 2, NUM_CLASSES, deep_supervision=False)
    ref.load_state_dict(ours2.state_dict(), strict=True)
    ref.decoder.deep_supervision = False
    with torch.no_grad():
        torch.testing.assert_close(ours2(x), ref(x), rtol=0, atol=0)


def test_resenc_init_zeroes_last_norm_of_each_block():
    plans, _, _ = _resenc_plans((1.0, 1.0, 1.0), (64, 64, 64), "3d_fullres", 1, small=True)
    net = build_network(plans, "3d_fullres", deep_supervision=False)
    blocks = [m for m in net.modules() if type(m).__name__ == "BasicBlockD"]
    assert len(blocks) == sum(plans.configuration("3d_fullres").architecture.n_blocks_per_stage)
    assert all(float(b.conv2.norm.weight.detach().abs().sum()) == 0 and float(b.conv1.norm.weight.detach().sum()) > 0 for b in blocks)


def test_unknown_network_class_is_a_plan_error():
    plans, nn_plans, dj = _resenc_plans((1.0, 1.0, 1.0), (64, 64, 64), "3d_fullres", 1, small=True)
    nn_plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_pkg.nets.FancyUNet"
    with pytest.raises(PlanError, match="my_pkg.nets.FancyUNet"):
        from_nnunet_plans(nn_plans, dj)
    with pytest.raises(PlanError, match="FancyUNet"):  # the plans schema refuses it before a network is built
        bad = dataclasses.replace(plans.configuration("3d_fullres").architecture, network_class="FancyUNet")
        network_from_architecture(bad, 1, 2)
