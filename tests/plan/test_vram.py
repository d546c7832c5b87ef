"""VRAM proxy against dynamic-network-architectures' ``PlainConvUNet.compute_conv_feature_map_size`` on built networks."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.plan.planner import plan_experiment
from nnfast.plan.schema import Architecture
from nnfast.plan.topology import get_pool_and_conv_props
from nnfast.plan.vram import compute_conv_feature_map_size
from plan.plan_reference_nnunet import make_dataset_json, make_fingerprint


def _arch(spacing, patch, max_features=320, n_conv=2, n_conv_dec=2):
    t = get_pool_and_conv_props(spacing, patch)
    n = len(t.strides)
    return t.patch_size, Architecture(
        n_stages=n,
        features_per_stage=tuple(min(max_features, 32 * 2 ** i) for i in range(n)),
        kernel_sizes=t.kernel_sizes, strides=t.strides,
        n_conv_per_stage=(n_conv,) * n, n_conv_per_stage_decoder=(n_conv_dec,) * (n - 1))


def _dna_size(arch: Architecture, patch, in_ch, n_classes, deep_supervision, residual: bool = False):
    """Build dynamic-network-architectures' real network (PlainConvUNet, or ResidualEncoderUNet when ``residual``)
    on torch's meta device (structure only) and ask it for its feature-map estimate."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    nd = arch.ndim
    cls, blocks = ((ResidualEncoderUNet, {"n_blocks_per_stage": arch.n_blocks_per_stage}) if residual
                   else (PlainConvUNet, {"n_conv_per_stage": arch.n_conv_per_stage}))
    with torch.device("meta"):
        net = cls(
            input_channels=in_ch, n_stages=arch.n_stages, features_per_stage=arch.features_per_stage,
            conv_op=torch.nn.Conv3d if nd == 3 else torch.nn.Conv2d, kernel_sizes=arch.kernel_sizes,
            strides=arch.strides, num_classes=n_classes, **blocks,
            n_conv_per_stage_decoder=arch.n_conv_per_stage_decoder, conv_bias=True,
            norm_op=torch.nn.InstanceNorm3d if nd == 3 else torch.nn.InstanceNorm2d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=deep_supervision)
    return int(net.compute_conv_feature_map_size(patch))


CASES = [
    ((1.0, 1.0, 1.0), (40, 56, 40), 1, 3),
    ((2.5, 0.8, 0.8), (96, 160, 160), 1, 14),
    ((3.0, 0.75, 0.75), (64, 192, 192), 4, 2),
    ((1.0, 1.0, 1.0), (128, 128, 128), 2, 105),
    ((0.8, 0.8), (512, 512), 3, 2),
    ((1.0, 1.0), (56, 40), 1, 3),
    ((1.0, 1.0, 1.0), (5, 7, 9), 1, 2),  # a single stage: no decoder, no segmentation head counted
]


@pytest.mark.compat
@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("spacing,patch,in_ch,n_classes", CASES)
def test_matches_dynamic_network_architectures(spacing, patch, in_ch, n_classes, deep_supervision):
    padded, arch = _arch(spacing, patch, 512 if len(spacing) == 2 else 320)
    ours = compute_conv_feature_map_size(padded, arch, in_ch, n_classes, deep_supervision=deep_supervision)
    assert isinstance(ours, int)
    assert ours == _dna_size(arch, padded, in_ch, n_classes, deep_supervision)


@pytest.mark.compat
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    dim=st.sampled_from([2, 3]),
    spacing=st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3),
    patch=st.lists(st.integers(8, 300), min_size=3, max_size=3),
    n_conv=st.integers(1, 3), n_conv_dec=st.integers(1, 3), n_classes=st.integers(1, 20),
    deep_supervision=st.booleans(),
)
def test_random_architectures_match(dim, spacing, patch, n_conv, n_conv_dec, n_classes, deep_supervision):
    padded, arch = _arch(spacing[:dim], patch[:dim], 320, n_conv, n_conv_dec)
    ours = compute_conv_feature_map_size(padded, arch, 1, n_classes, deep_supervision=deep_supervision)
    assert ours == _dna_size(arch, padded, 1, n_classes, deep_supervision)


@pytest.mark.compat
def test_planned_configurations_match():
    """Architectures straight out of the planner (2d, 3d_fullres, 3d_lowres) against networks built from them."""
    import tempfile
    from pathlib import Path

    from plan.plan_reference_nnunet import dataset_info

    fp = make_fingerprint([(2.0, 0.8, 0.8)] * 6, [(200, 512, 512)] * 6)
    dj = make_dataset_json(["CT"], 4, 6)
    with tempfile.TemporaryDirectory() as d:
        plans = plan_experiment(fp, dataset_info(Path(d), dj))
    assert {"2d", "3d_fullres", "3d_lowres"} <= set(plans.configurations)
    for name in ("2d", "3d_fullres", "3d_lowres"):
        c = plans.configuration(name)
        for ds in (False, True):
            assert compute_conv_feature_map_size(c.patch_size, c.architecture, 1, 4, ds) == \
                _dna_size(c.architecture, c.patch_size, 1, 4, ds)


def test_hand_computed_two_stage():
    arch = Architecture(n_stages=2, features_per_stage=(32, 64), kernel_sizes=((3, 3), (3, 3)),
                        strides=((1, 1), (2, 2)), n_conv_per_stage=(2, 2), n_conv_per_stage_decoder=(2,))
    # encoder: 2*32*16*16 + 2*64*8*8; decoder at 16x16: transpconv 32 + 2 convs of 32 + seg 3
    expected = 2 * 32 * 256 + 2 * 64 * 64 + 3 * 32 * 256 + 3 * 256
    assert compute_conv_feature_map_size((16, 16), arch, 1, 3) == expected
    assert compute_conv_feature_map_size((16, 16), arch, 1, 3, deep_supervision=False) == expected
    with pytest.raises(ValueError, match="axes"):
        compute_conv_feature_map_size((16, 16, 16), arch, 1, 3)


@pytest.mark.compat
@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("spacing,patch,in_ch,n_classes", CASES)
def test_residual_encoder_matches_dynamic_network_architectures(spacing, patch, in_ch, n_classes, deep_supervision):
    import dataclasses

    padded, plain = _arch(spacing, patch, 512 if len(spacing) == 2 else 320)
    n = plain.n_stages
    arch = dataclasses.replace(plain, network_class="ResidualEncoderUNet",
                               n_conv_per_stage=(1, 3, 4, 6, 6, 6, 6, 6)[:n], n_conv_per_stage_decoder=(1,) * (n - 1))
    ours = compute_conv_feature_map_size(padded, arch, in_ch, n_classes, deep_supervision=deep_supervision)
    assert ours == _dna_size(arch, padded, in_ch, n_classes, deep_supervision, residual=True)
    # the residual network is counted differently from the plain one of the same topology
    assert ours != compute_conv_feature_map_size(padded, plain, in_ch, n_classes, deep_supervision=deep_supervision)
