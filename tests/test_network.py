"""nnfast's PlainConvUNet against dynamic-network-architectures' PlainConvUNet built by nnU-Net v2 from the same plan."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nnfast.plan.nnunet_compat import to_nnunet_plans
from nnfast.network import PlainConvUNet, build_network, init_weights_he, set_deep_supervision

from train._plans import LABELS, synthetic_plans

NUM_CLASSES = len(LABELS)

# (id, reader-order spacing, cropped shape, configuration)
CASES = [
    ("3d_anisotropic", (3.0, 0.8, 0.8), (40, 200, 200), "3d_fullres"),
    ("3d_isotropic", (1.0, 1.0, 1.0), (96, 96, 96), "3d_fullres"),
    ("2d", (3.0, 0.8, 0.8), (40, 200, 200), "2d"),
]


def _plans_and_reference(spacing, shape, config, in_channels, deep_supervision, small=False):
    """nnfast plans and nnU-Net's network for ``config`` (the ``architecture`` entry of the nnUNetPlans.json that
    nnfast writes, instantiated by nnU-Net's get_network_from_plans as its trainer does). ``small`` shrinks the feature counts (same topology) for cheap forward passes."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = synthetic_plans(spacing, shape, n_channels=in_channels)
    if small:
        conf = plans.configuration(config)
        arch = dataclasses.replace(conf.architecture,
                                   features_per_stage=tuple(min(2 + 2 * i, 8) for i in range(conf.architecture.n_stages)))
        plans = dataclasses.replace(plans, configurations={**plans.configurations,
                                                            config: dataclasses.replace(conf, architecture=arch)})
    dataset_json = {"channel_names": plans.channel_names, "labels": LABELS, "file_ending": ".nii.gz",
                    "numTraining": 4}
    a = to_nnunet_plans(plans, dataset_json)["configurations"][config]["architecture"]
    ref = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], in_channels,
                                 NUM_CLASSES, allow_init=True, deep_supervision=deep_supervision)
    return plans, ref


def _min_input(arch, in_channels, factor=2, batch=2):
    """Smallest input the network takes (product of strides per axis) times ``factor`` (instance norm needs more
    than one voxel at the bottleneck)."""
    size = np.prod(np.asarray(arch.strides), axis=0) * factor
    g = torch.Generator().manual_seed(0)
    return torch.randn((batch, in_channels, *size.tolist()), generator=g)


@pytest.mark.compat
@pytest.mark.parametrize("case_id, spacing, shape, config", CASES, ids=[c[0] for c in CASES])
def test_state_dict_and_parameters_match_nnunet(case_id, spacing, shape, config):
    # full-size plan networks, built on the meta device (no weight memory, no init cost): keys, shapes, counts
    with torch.device("meta"):
        plans, ref = _plans_and_reference(spacing, shape, config, in_channels=2, deep_supervision=True)
        ours = build_network(plans, config, 2, NUM_CLASSES, deep_supervision=True)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    assert all(sd_ours[k].shape == sd_ref[k].shape for k in sd_ref)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # weights move both ways
    ours.load_state_dict(sd_ref, strict=True)
    ref.load_state_dict(sd_ours, strict=True)
    # a non-DS network has the same keys (seg heads of every stage are always built)
    with torch.device("meta"):
        flat = build_network(plans, config, 2, NUM_CLASSES, deep_supervision=False)
    flat.load_state_dict(sd_ref, strict=True)
    assert sum(p.numel() for p in ref.parameters()) > 1_000_000  # really the planned size


@pytest.mark.compat
@pytest.mark.parametrize("case_id, spacing, shape, config", CASES, ids=[c[0] for c in CASES])
def test_real_weights_load_both_ways(case_id, spacing, shape, config):
    torch.manual_seed(0)
    plans, ref = _plans_and_reference(spacing, shape, config, in_channels=2, deep_supervision=False, small=True)
    ours = build_network(plans, config, 2, NUM_CLASSES, deep_supervision=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    torch.manual_seed(1)
    ours2 = build_network(plans, config, 2, NUM_CLASSES)
    ref.load_state_dict(ours2.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours2.state_dict().values(), ref.state_dict().values()))


@pytest.mark.compat
@pytest.mark.parametrize("case_id, spacing, shape, config", CASES, ids=[c[0] for c in CASES])
def test_outputs_equal_nnunet_with_same_weights(case_id, spacing, shape, config):
    torch.manual_seed(1)
    plans, ref = _plans_and_reference(spacing, shape, config, in_channels=1, deep_supervision=True, small=True)
    arch = plans.configuration(config).architecture
    ours = build_network(plans, config, 1, NUM_CLASSES, deep_supervision=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval(), ref.eval()
    x = _min_input(arch, 1, batch=1)
    with torch.no_grad():
        out_ours, out_ref = ours(x), ref(x)
    assert isinstance(out_ours, list) and len(out_ours) == len(out_ref) == arch.n_stages - 1
    cum = np.cumprod(np.asarray(arch.strides), axis=0)
    for i, (a, b) in enumerate(zip(out_ours, out_ref)):
        expected = (x.shape[0], NUM_CLASSES, *(np.asarray(x.shape[2:]) // cum[i]).tolist())
        assert tuple(a.shape) == tuple(b.shape) == expected
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    set_deep_supervision(ours, False)
    ref.decoder.deep_supervision = False
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert isinstance(a, torch.Tensor) and a.shape == b.shape == out_ref[0].shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, out_ours[0], rtol=0, atol=0)


def test_training_mode_gradients_flow_to_every_used_parameter():
    plans = synthetic_plans((1.0, 1.0, 1.0), (64, 64, 64))
    conf = plans.configuration("3d_fullres")
    arch = dataclasses.replace(conf.architecture, features_per_stage=(2,) * conf.architecture.n_stages)
    net = PlainConvUNet(arch, 1, NUM_CLASSES, deep_supervision=True)
    out = net(_min_input(arch, 1, batch=1))
    sum(o.float().mean() for o in out).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None]
    # the lowest-resolution decoder stage's head gets a gradient too because its output is returned
    assert no_grad == []


def test_he_init_and_zero_bias():
    torch.manual_seed(0)
    conf = synthetic_plans((1.0, 1.0, 1.0), (96, 96, 96)).configuration("3d_fullres")
    arch = dataclasses.replace(conf.architecture, features_per_stage=(8, 16, 32, 32, 32))
    net = PlainConvUNet(arch, 1, NUM_CLASSES)
    conv = net.encoder.stages[2][0].convs[1].conv
    fan_in = conv.weight[0].numel()
    # kaiming_normal_(a=0.01): std = sqrt(2 / (1 + a^2)) / sqrt(fan_in)
    expected = np.sqrt(2.0 / (1 + 1e-4)) / np.sqrt(fan_in)
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    assert torch.count_nonzero(conv.bias) == 0
    assert torch.all(net.encoder.stages[0][0].convs[0].norm.weight == 1)
    tc = net.decoder.transpconvs[0]
    assert tc.kernel_size == tc.stride == tuple(arch.strides[-1])
    # init_weights_he leaves other modules alone and is idempotent in distribution
    init_weights_he(torch.nn.LeakyReLU())


def test_set_deep_supervision_through_compile_wrapper_and_errors():
    plans = synthetic_plans((1.0, 1.0, 1.0), (64, 64, 64))
    net = build_network(plans, "2d", 1, NUM_CLASSES, deep_supervision=True)

    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule (_orig_mod)
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    set_deep_supervision(Wrapper(net), False)
    assert net.deep_supervision is False
    set_deep_supervision(net, True)
    assert net.decoder.deep_supervision is True
    with pytest.raises(TypeError):
        set_deep_supervision(torch.nn.Linear(2, 2), True)


def test_build_network_unknown_configuration():
    from nnfast.errors import PlanError

    plans = synthetic_plans((1.0, 1.0, 1.0), (64, 64, 64))
    with pytest.raises(PlanError, match="3d_lowres"):
        build_network(plans, "3d_lowres", 1, 3)
