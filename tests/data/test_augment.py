"""nnfast's augmentation against nnU-Net v2 (nnunetv2 2.8.1 / batchgeneratorsv2): configuration rules, geometry of
the resampled patch, the intensity pipeline with forced parameters, and the sampling probabilities."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from nnfast.data.augment_params import (
    AugmentConfig,
    SpatialParams,
    box_center,
    deep_supervision_scales,
    get_patch_size,
    needed_region,
    sample_spatial,
)
from nnfast.data.transforms import (
    IntensityParams,
    augment_sample,
    deep_supervision_targets,
    sample_intensity,
    spatial_patch,
    validation_transform,
)

torch.set_num_threads(1)
NO_INTENSITY = IntensityParams(None, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------- helpers
def read_region(arr: np.ndarray, lb, ub, pad) -> np.ndarray:
    """What the loader does: ``arr[:, lb:ub]`` with ``pad`` beyond the array (nnU-Net's crop_and_pad_nd)."""
    out = np.full((arr.shape[0], *[u - l for l, u in zip(lb, ub)]), pad, arr.dtype)
    src, dst = [slice(None)], [slice(None)]
    for l, u, n in zip(lb, ub, arr.shape[1:]):
        a, b = max(l, 0), min(u, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - l, b - l))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def smooth_case(rng, shape, n_channels=2, n_labels=4):
    """Smooth image channels and blob labels with a band of -1 (outside the nonzero region)."""
    axes = tuple(range(1, len(shape) + 1))
    img = (gaussian_filter(rng.standard_normal((n_channels, *shape)), 1.5, axes=axes) * 5).astype(np.float32)
    f = gaussian_filter(rng.standard_normal((n_labels, *shape)), 2.0, axes=axes)
    seg = np.argmax(f, 0).astype(np.int16)
    seg[..., :2] = -1
    return img, seg[None]


def tie_prone(params: SpatialParams, patch, centre, tol=1e-4):
    """Voxels whose sample position has a coordinate at (numerically) half-way between two voxels: there nnU-Net's
    float32 grid and our float64 one may settle a 50/50 label tie differently."""
    nd, t = len(patch), params.transform_ndim
    axes = [np.arange(p) - (p - 1) / 2.0 for p in patch[nd - t:]]
    o = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    pos = o @ params.matrix().T + (np.asarray(centre[nd - t:]) - 0.5)
    frac = np.abs(pos - np.floor(pos) - 0.5)
    m = (frac < tol).any(-1)
    return np.broadcast_to(m, tuple(patch)) if t < nd else m


def nnunet_spatial(img, seg, patch, angles, scale, dummy_2d):
    """batchgeneratorsv2's SpatialTransform as nnU-Net configures it, with forced rotation/scaling."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform

    ps = patch[1:] if dummy_2d else patch
    st = SpatialTransform(ps, 0, False, p_elastic_deform=0, p_rotation=1, rotation=lambda image, dim: angles[dim],
                          p_scaling=1, scaling=lambda image, dim: scale, p_synchronize_scaling_across_axes=1,
                          bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1)
    d = {"image": torch.from_numpy(img.copy()), "segmentation": torch.from_numpy(seg.copy())}
    if dummy_2d:
        d = Convert3DTo2DTransform()(**d)
    d = st(**d)
    if dummy_2d:
        d = Convert2DTo3DTransform()(**d)
    return d["image"].numpy(), d["segmentation"].numpy()


# --------------------------------------------------------------------------------------------- configuration
class _TrainerStub:
    def __init__(self, patch_size):
        self.configuration_manager = SimpleNamespace(patch_size=list(patch_size))

    def print_to_log_file(self, *args, **kwargs):
        pass


PATCHES = [(128, 128, 128), (56, 192, 192), (40, 56, 40), (96, 160, 160), (64, 192, 192), (20, 256, 224),
           (256, 256), (512, 512), (320, 160), (448, 224), (160, 280)]


@pytest.mark.compat
@pytest.mark.parametrize("patch", PATCHES)
def test_config_matches_nnunet_rules(patch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rot, dummy, initial, mirror = nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(
        _TrainerStub(patch))
    cfg = AugmentConfig.from_patch_size(patch)
    assert cfg.rotation == pytest.approx(rot)
    assert cfg.do_dummy_2d == dummy
    assert cfg.mirror_axes == tuple(mirror)
    assert cfg.initial_patch_size == tuple(int(v) for v in initial)


@pytest.mark.compat
@pytest.mark.parametrize("patch,rot", [((40, 56, 40), 0.3), ((33, 71, 50), 0.9), ((64, 64), 3.0), ((65, 30), 0.2)])
def test_get_patch_size_matches_nnunet(patch, rot):
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size as ref

    r = (-rot, rot)
    assert get_patch_size(patch, r, r, r, (0.85, 1.25)) == tuple(int(v) for v in ref(patch, r, r, r, (0.85, 1.25)))


@pytest.mark.compat
@pytest.mark.parametrize("dummy", [False, True])
def test_config_probabilities_match_nnunet_pipeline(dummy):
    """Every probability and range in AugmentConfig equals what nnUNetTrainer.get_training_transforms builds."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    patch = (20, 128, 128) if dummy else (64, 64, 64)
    cfg = AugmentConfig.from_patch_size(patch, use_mask_for_norm=(True, False), ds_scales=[[1, 1, 1], [.5, .5, .5]])
    t = nnUNetTrainer.get_training_transforms(patch, cfg.rotation, [[1, 1, 1], [.5, .5, .5]], cfg.mirror_axes,
                                              cfg.do_dummy_2d, use_mask_for_norm=[True, False]).transforms
    names = [type(x).__name__ for x in t]
    assert (names[0] == "Convert3DTo2DTransform") == dummy
    sp = t[1 if dummy else 0]
    assert (sp.p_rotation, sp.p_rot_per_axis, sp.p_scaling, tuple(sp.scaling), sp.p_synchronize_scaling_across_axes) \
        == (cfg.p_rotation, cfg.p_rot_per_axis, cfg.p_scaling, cfg.scaling, cfg.p_synchronize_scaling)
    assert tuple(sp.rotation) == cfg.rotation and sp.random_crop is False and sp.p_elastic_deform == 0
    assert (sp.mode_seg, sp.border_mode_seg, sp.padding_value_seg, sp.seg_tiebreak, sp.align_corners) == \
        ("bilinear", "constant", -1, "nearest", False)
    rnd = {type(x.transform).__name__ + ("_inv" if getattr(x.transform, "p_invert_image", 0) else ""): x
           for x in t if type(x).__name__ == "RandomTransform"}
    assert rnd["GaussianNoiseTransform"].apply_probability == cfg.p_noise
    assert tuple(rnd["GaussianNoiseTransform"].transform.noise_variance) == cfg.noise_sigma
    assert rnd["GaussianNoiseTransform"].transform.synchronize_channels
    blur = rnd["GaussianBlurTransform"]
    assert (blur.apply_probability, tuple(blur.transform.blur_sigma), blur.transform.p_per_channel) == \
        (cfg.p_blur, cfg.blur_sigma, cfg.blur_p_per_channel)
    assert rnd["MultiplicativeBrightnessTransform"].apply_probability == cfg.p_brightness
    assert rnd["MultiplicativeBrightnessTransform"].transform.multiplier_range.contrast_range == cfg.brightness_range
    assert rnd["ContrastTransform"].apply_probability == cfg.p_contrast
    assert rnd["ContrastTransform"].transform.contrast_range.contrast_range == cfg.contrast_range
    lr = rnd["SimulateLowResolutionTransform"]
    assert (lr.apply_probability, tuple(lr.transform.scale), lr.transform.p_per_channel) == \
        (cfg.p_lowres, cfg.lowres_scale, cfg.lowres_p_per_channel)
    assert lr.transform.ignore_axes == ((0,) if dummy else None)
    assert rnd["GammaTransform_inv"].apply_probability == cfg.p_gamma_inverted
    assert rnd["GammaTransform"].apply_probability == cfg.p_gamma
    assert rnd["GammaTransform"].transform.gamma.contrast_range == cfg.gamma_range
    mirror = next(x for x in t if type(x).__name__ == "MirrorTransform")
    assert tuple(mirror.allowed_axes) == cfg.mirror_axes
    mask = next(x for x in t if type(x).__name__ == "MaskImageTransform")
    assert tuple(mask.apply_to_channels) == cfg.mask_channels == (0,)
    assert names[-2:] == ["RemoveLabelTransform", "DownsampleSegForDSTransform"]


def test_from_configuration_uses_the_plan():
    from nnfast.plan.schema import Architecture, ConfigurationPlan, Resampling

    arch = Architecture(n_stages=3, features_per_stage=(8, 16, 32), kernel_sizes=((3, 3, 3),) * 3,
                        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), n_conv_per_stage=(2, 2, 2),
                        n_conv_per_stage_decoder=(2, 2))
    r = Resampling(order=1)
    conf = ConfigurationPlan(name="3d_fullres", data_identifier="x", batch_size=2, patch_size=(16, 64, 64),
                             median_image_size_in_voxels=(20.0, 80.0, 80.0), spacing=(3.0, 1.0, 1.0),
                             normalization_schemes=("CTNormalization", "ZScoreNormalization"),
                             use_mask_for_norm=(False, True), resampling_data=r, resampling_seg=r,
                             resampling_probabilities=r, architecture=arch, batch_dice=False)
    cfg = AugmentConfig.from_configuration(conf)
    assert cfg.patch_size == (16, 64, 64) and cfg.do_dummy_2d and cfg.mask_channels == (1,)
    assert cfg.ds_scales == ((1.0, 1.0, 1.0), (1.0, 0.5, 0.5))
    assert AugmentConfig.from_configuration(conf, deep_supervision=False, p_rotation=0.0).ds_scales is None


def test_deep_supervision_scales_match_nnunet_formula():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    ref = list(list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0))[:-1]
    assert deep_supervision_scales(strides) == tuple(tuple(r) for r in ref)


# --------------------------------------------------------------------------------------------- geometry
GEOMETRY_CASES = [
    # (initial patch shape given to nnU-Net, final patch, angles, scale)
    ((34, 38, 40), (20, 24, 26), (0.3, -0.2, 0.5), 1.2),
    ((34, 38, 40), (20, 24, 26), (-0.45, 0.1, 0.25), 0.75),
    ((26, 30, 34), (20, 24, 26), (0.4, 0.2, -0.5), 1.38),  # reaches past the enlarged patch: padding
    ((60, 64), (40, 36), (0.0, 2.7), 0.9),
    ((45, 52), (40, 36), (0.0, -0.3), 1.3),
]


@pytest.mark.compat
@pytest.mark.parametrize("initial,patch,angles,scale", GEOMETRY_CASES)
def test_resampling_matches_spatial_transform(initial, patch, angles, scale):
    rng = np.random.default_rng(sum(initial))
    img, seg = smooth_case(rng, initial)
    ref_img, ref_seg = nnunet_spatial(img, seg, patch, angles, scale, False)
    nd = len(patch)
    params = SpatialParams(nd, True, True, tuple(angles[-nd:]) if nd == 3 else tuple(angles), (scale,) * nd, ())
    centre = box_center([0] * nd, initial)
    # nnU-Net only sees its enlarged patch: clip the region to it, beyond is padding
    region = needed_region(params, patch, centre, clip_to=[[0, s] for s in initial])
    ours_img, ours_seg = spatial_patch(read_region(img, region.lb, region.ub, 0),
                                       read_region(seg, region.lb, region.ub, -1), params,
                                       AugmentConfig.from_patch_size(patch), region)
    np.testing.assert_allclose(ours_img, ref_img, atol=1e-4)
    differ = ours_seg[0] != ref_seg[0]
    assert not (differ & ~tie_prone(params, patch, centre)).any()
    assert differ.mean() < 0.01


@pytest.mark.compat
@pytest.mark.parametrize("angle,scale", [(2.1, 1.25), (-0.7, 0.8)])
def test_dummy_2d_resampling_matches_spatial_transform(angle, scale):
    rng = np.random.default_rng(7)
    patch = (6, 30, 34)
    initial = (6, 44, 46)
    img, seg = smooth_case(rng, initial)
    ref_img, ref_seg = nnunet_spatial(img, seg, patch, (0.3, angle), scale, True)
    cfg = AugmentConfig.from_patch_size(patch)
    assert cfg.do_dummy_2d
    params = SpatialParams(2, True, True, (0.3, angle), (scale, scale), ())
    centre = box_center([0, 0, 0], initial)
    region = needed_region(params, patch, centre, clip_to=[[0, s] for s in initial])
    assert region.lb[0] == 0 and region.ub[0] == patch[0]  # axis 0 is a crop
    ours_img, ours_seg = spatial_patch(read_region(img, region.lb, region.ub, 0),
                                       read_region(seg, region.lb, region.ub, -1), params, cfg, region)
    np.testing.assert_allclose(ours_img, ref_img, atol=1e-4)
    differ = ours_seg[0] != ref_seg[0]
    assert not (differ & ~tie_prone(params, patch, centre)).any()


@pytest.mark.parametrize("patch,dummy", [((14, 16, 18), False), ((5, 24, 20), True), ((22, 26), False)])
def test_needed_region_gives_the_same_patch_as_the_whole_array(patch, dummy):
    rng = np.random.default_rng(len(patch) + dummy)
    shape = tuple(3 * p for p in patch)
    img, seg = smooth_case(rng, shape)
    cfg = AugmentConfig.from_patch_size(patch)
    assert cfg.do_dummy_2d == dummy
    nd = cfg.transform_ndim
    for k in range(6):
        params = SpatialParams(nd, True, True, tuple(rng.uniform(-np.pi, np.pi, nd)),
                               (rng.uniform(0.7, 1.4),) * nd, tuple(a for a in range(len(patch)) if rng.random() < .5))
        centre = tuple(s / 2 + rng.integers(-3, 4) + 0.5 * rng.integers(0, 2) for s in shape)
        region = needed_region(params, patch, centre)
        assert all(0 <= l and u <= s for l, u, s in zip(region.lb, region.ub, shape))
        small = spatial_patch(read_region(img, region.lb, region.ub, 0), read_region(seg, region.lb, region.ub, -1),
                              params, cfg, region)
        whole = type(region)((0,) * len(shape), shape, region.centre)
        big = spatial_patch(img, seg, params, cfg, whole)
        np.testing.assert_allclose(small[0], big[0], atol=1e-5)
        np.testing.assert_array_equal(small[1], big[1])
        assert not (small[1] == -1).all()


def test_needed_region_covers_every_sample_and_is_tight():
    rng = np.random.default_rng(0)
    for _ in range(200):
        nd = int(rng.integers(2, 4))
        patch = tuple(int(v) for v in rng.integers(3, 40, nd))
        params = SpatialParams(nd, True, True, tuple(rng.uniform(-np.pi, np.pi, nd)),
                               (rng.uniform(0.7, 1.4),) * nd, ())
        centre = tuple(rng.uniform(-50, 50, nd).round() / 2)
        region = needed_region(params, patch, centre)
        axes = [np.arange(p) - (p - 1) / 2.0 for p in patch]
        pos = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, nd) @ params.matrix().T \
            + np.asarray(centre) - 0.5
        lo, hi = np.floor(pos.min(0)), np.floor(pos.max(0)) + 1  # every voxel bilinear interpolation reads
        assert (np.asarray(region.lb) <= lo).all() and (np.asarray(region.ub) > hi).all()
        assert (np.asarray(region.lb) >= lo - 1).all() and (np.asarray(region.ub) <= hi + 2).all()


@pytest.mark.parametrize("patch", [(6, 7, 8), (9, 10)])
def test_pure_crop_is_the_stored_slice(patch):
    rng = np.random.default_rng(1)
    shape = tuple(p + 6 for p in patch)
    img, seg = smooth_case(rng, shape)
    cfg = AugmentConfig.from_patch_size(patch)
    nd = len(patch)
    for mirror in [(), tuple(range(nd)), (nd - 1,)]:
        params = SpatialParams(cfg.transform_ndim, False, False, (0.0,) * cfg.transform_ndim,
                               (1.0,) * cfg.transform_ndim, mirror)
        for lb in [(0,) * nd, (3,) * nd, (-2,) * nd, tuple(s - p + 3 for s, p in zip(shape, patch))]:
            ub = tuple(l + p for l, p in zip(lb, patch))
            centre = box_center(lb, ub)
            region = needed_region(params, patch, centre)
            assert (region.lb, region.ub) == (lb, ub)
            i, s = spatial_patch(read_region(img, lb, ub, 0), read_region(seg, lb, ub, -1), params, cfg, region)
            exp_i, exp_s = read_region(img, lb, ub, 0), read_region(seg, lb, ub, -1)
            flip_axes = tuple(a + 1 for a in mirror)
            np.testing.assert_array_equal(i, np.flip(exp_i, flip_axes))
            np.testing.assert_array_equal(s, np.flip(exp_s, flip_axes))
    # an enlarged (nnU-Net-like) region: the crop is centred in it (crop_tensor's floor(centre) - patch // 2)
    params = SpatialParams(cfg.transform_ndim, False, False, (0.0,) * cfg.transform_ndim, (1.0,) * cfg.transform_ndim,
                           ())
    big = type(region)((0,) * nd, shape, box_center((0,) * nd, shape))
    i, _ = spatial_patch(img, seg, params, cfg, big)
    start = [int(np.floor(s / 2)) - p // 2 for s, p in zip(shape, patch)]
    np.testing.assert_array_equal(i, img[(slice(None), *[slice(a, a + p) for a, p in zip(start, patch)])])


@pytest.mark.parametrize("patch", [(10, 12, 14), (12, 14)])
def test_padding_beyond_the_case_on_every_border(patch):
    """Image 0 and label -1 (0 after the final relabel) wherever the rotated grid samples beyond the stored case."""
    nd = len(patch)
    shape = tuple(2 * p for p in patch)
    img = np.ones((1, *shape), np.float32)
    seg = np.ones((1, *shape), np.int16)
    cfg = AugmentConfig.from_patch_size(patch)
    params = SpatialParams(nd, True, True, (0.25, -0.2, 0.3)[:nd], (1.1,) * nd, ())
    for axis in range(nd):
        for side in (0, 1):
            centre = [s / 2 for s in shape]
            centre[axis] = 2.0 if side == 0 else shape[axis] - 2.0
            region = needed_region(params, patch, centre)
            assert region.lb[axis] < 0 if side == 0 else region.ub[axis] > shape[axis]
            i, s = spatial_patch(read_region(img, region.lb, region.ub, 0), read_region(seg, region.lb, region.ub, -1),
                                 params, cfg, region)
            axes = [np.arange(p) - (p - 1) / 2.0 for p in patch]
            pos = np.stack(np.meshgrid(*axes, indexing="ij"), -1) @ params.matrix().T + np.asarray(centre) - 0.5
            far_out = ((pos < -1) | (pos > np.asarray(shape) - 0.0)).any(-1)
            inside = ((pos >= 0) & (pos <= np.asarray(shape) - 1)).all(-1)
            assert far_out.any() and inside.any()
            assert (i[0][far_out] == 0).all() and (s[0][far_out] == -1).all()
            np.testing.assert_allclose(i[0][inside], 1.0, atol=1e-6)
            assert (s[0][inside] == 1).all()
            r = augment_sample(read_region(img, region.lb, region.ub, 0), read_region(seg, region.lb, region.ub, -1),
                               params, np.random.default_rng(0), cfg, region, intensity=NO_INTENSITY)
            assert (r.seg[0][far_out] == 0).all() and (r.seg >= 0).all()


# --------------------------------------------------------------------------------------------- intensity pipeline
def _nnunet_intensity_reference(img, seg, p: IntensityParams, mirror, cfg):
    """batchgeneratorsv2's transforms applied in nnU-Net's order with the same parameters (noise excluded)."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    x = torch.from_numpy(img.copy())
    c = x.shape[0]
    if p.blur_sigmas is not None:
        on = torch.tensor([s is not None for s in p.blur_sigmas])
        x = GaussianBlurTransform((0.5, 1.0), p_per_channel=0.5)._apply_to_image(
            x, apply_to_channel=on, sigmas=[list(s) for s in p.blur_sigmas if s is not None])
    if p.brightness is not None:
        x = MultiplicativeBrightnessTransform((0.75, 1.25), False)._apply_to_image(
            x, apply_to_channel=torch.arange(c), multipliers=torch.tensor(p.brightness))
    if p.contrast is not None:
        x = ContrastTransform((0.75, 1.25), True, False)._apply_to_image(
            x, apply_to_channel=torch.arange(c), multipliers=torch.tensor(p.contrast))
    if p.lowres_scales is not None:
        idx = [i for i, s in enumerate(p.lowres_scales) if s is not None]
        x = SimulateLowResolutionTransform((0.5, 1), False, True, None)._apply_to_image(
            x, apply_to_channel=torch.tensor(idx), scales=torch.tensor([p.lowres_scales[i] for i in idx]))
    for gammas, inv in ((p.gamma_inverted, True), (p.gamma, False)):
        if gammas is not None:
            x = GammaTransform((0.7, 1.5), 1, False, 1, 1)._apply_to_image(
                x, apply_to_channel=torch.arange(c), retain_stats=torch.ones(c, dtype=torch.bool),
                invert_image=torch.full((c,), inv), gamma=torch.tensor(gammas))
    s = torch.from_numpy(seg.copy())
    m = MirrorTransform(cfg.mirror_axes)
    x, s = m._apply_to_image(x, axes=list(mirror)), m._apply_to_segmentation(s, axes=list(mirror))
    d = {"image": x, "segmentation": s}
    if cfg.mask_channels:
        d = MaskImageTransform(list(cfg.mask_channels))(**d)
    d = RemoveLabelTansform(-1, 0)(**d)
    d = DownsampleSegForDSTransform(cfg.ds_scales)(**d)
    return d["image"].numpy(), [t.numpy() for t in d["segmentation"]]


INTENSITY_CASES = [
    IntensityParams(None, ((0.6, 0.9, 0.7), None), (0.8, 1.2), (1.1, 0.85), ((0.62, 0.62, 0.62), None), (1.3, 0.8),
                    (0.75, 1.4)),
    IntensityParams(None, None, None, (0.9, 1.2), (None, (0.55, 0.55, 0.55)), None, (1.2, 0.9)),
    IntensityParams(None, (None, (1.0, 0.5, 0.5)), (1.1, 0.77), None, ((0.93, 0.93, 0.93), (0.71, 0.71, 0.71)),
                    (0.72, 1.45), None),
]


@pytest.mark.compat
@pytest.mark.parametrize("case", range(len(INTENSITY_CASES)))
@pytest.mark.parametrize("mirror", [(), (0, 2), (1,), (0, 1, 2)])
def test_intensity_pipeline_matches_nnunet_with_forced_parameters(case, mirror):
    p = INTENSITY_CASES[case]
    rng = np.random.default_rng(case)
    patch = (13, 17, 19)
    img, seg = smooth_case(rng, patch)
    cfg = AugmentConfig.from_patch_size(patch, use_mask_for_norm=(True, False),
                                        ds_scales=[[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.5, 0.5]])
    params = SpatialParams(3, False, False, (0.0,) * 3, (1.0,) * 3, mirror)
    lb, ub = (0, 0, 0), patch
    region = needed_region(params, patch, box_center(lb, ub))
    ours = augment_sample(img.copy(), seg.copy(), params, rng, cfg, region, intensity=p)
    ref_img, ref_targets = _nnunet_intensity_reference(img, seg, p, mirror, cfg)
    np.testing.assert_allclose(ours.image, ref_img, atol=2e-4, rtol=1e-5)
    assert len(ours.targets) == len(ref_targets)
    for a, b in zip(ours.targets, ref_targets):
        np.testing.assert_array_equal(a, b)
    assert ours.targets[0] is ours.seg


def test_noise_has_the_drawn_sigma_per_channel():
    patch = (20, 30, 30)
    cfg = AugmentConfig.from_patch_size(patch)
    img = np.zeros((2, *patch), np.float32)
    seg = np.zeros((1, *patch), np.int8)
    params = SpatialParams(3, False, False, (0.0,) * 3, (1.0,) * 3, ())
    region = needed_region(params, patch, box_center((0, 0, 0), patch))
    p = IntensityParams(0.07, None, None, None, None, None, None)
    r = augment_sample(img, seg, params, np.random.default_rng(0), cfg, region, intensity=p)
    for c in range(2):
        assert r.image[c].std() == pytest.approx(0.07, rel=0.02)
        assert abs(r.image[c].mean()) < 0.002
    assert abs(np.corrcoef(r.image[0].ravel(), r.image[1].ravel())[0, 1]) < 0.03
    r2 = augment_sample(img, seg, params, np.random.default_rng(0), cfg, region, intensity=p)
    np.testing.assert_array_equal(r.image, r2.image)  # reproducible from the generator


def test_deep_supervision_and_validation_match_nnunet():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    rng = np.random.default_rng(2)
    seg = rng.integers(-1, 4, (1, 28, 37, 41)).astype(np.int16)
    scales = [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25], [0.25, 0.125, 0.125]]
    ref = DownsampleSegForDSTransform(scales)(segmentation=torch.from_numpy(seg.copy()))["segmentation"]
    ours = deep_supervision_targets(seg, scales)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b.numpy())
    assert deep_supervision_targets(seg, None) is None
    cfg = AugmentConfig.from_patch_size((28, 37, 41), ds_scales=scales)
    img = rng.standard_normal((1, 28, 37, 41)).astype(np.float32)
    v = validation_transform(img, seg, cfg)
    assert v.image is img and v.record is None and (seg == -1).any()  # input untouched
    np.testing.assert_array_equal(v.seg, np.where(seg == -1, 0, seg))
    fixed = np.where(seg == -1, 0, seg).astype(np.int16)
    ref = DownsampleSegForDSTransform(scales)(segmentation=torch.from_numpy(fixed))["segmentation"]
    for a, b in zip(v.targets, ref):
        np.testing.assert_array_equal(a, b.numpy())


def test_mirror_folding_equals_flipping_afterwards():
    """The flip written by the resampling (and the reversed low-resolution maps) equals nnU-Net's flip at the end."""
    rng = np.random.default_rng(5)
    patch = (11, 16, 18)
    shape = (30, 34, 38)
    img, seg = smooth_case(rng, shape)
    cfg = AugmentConfig.from_patch_size(patch)
    p = IntensityParams(None, ((0.7, 0.8, 0.9), None), None, (1.2, None), ((0.6, 0.6, 0.6), (0.83, 0.83, 0.83)),
                        None, (1.3, 0.8))
    for transformed in (False, True):
        base = SpatialParams(3, transformed, transformed, (0.2, -0.3, 0.4) if transformed else (0.0,) * 3,
                             (1.15,) * 3 if transformed else (1.0,) * 3, ())
        centre = box_center((4, 5, 6), (4 + 21, 5 + 24, 6 + 27))
        for mirror in [(0,), (1, 2), (0, 1, 2)]:
            m = SpatialParams(3, base.rotated, base.scaled, base.angles, base.scales, mirror)
            region = needed_region(base, patch, centre)
            args = (read_region(img, region.lb, region.ub, 0), read_region(seg, region.lb, region.ub, -1))
            plain = augment_sample(*args, base, rng, cfg, region, intensity=p)
            flipped = augment_sample(*args, m, rng, cfg, region, intensity=p)
            axes = tuple(a + 1 for a in mirror)
            np.testing.assert_allclose(flipped.image, np.flip(plain.image, axes), atol=1e-5)
            np.testing.assert_array_equal(flipped.seg, np.flip(plain.seg, axes))


def test_mask_applies_to_masked_channels_only():
    patch = (8, 9, 10)
    rng = np.random.default_rng(9)
    img = rng.standard_normal((2, *patch)).astype(np.float32) + 5
    seg = rng.integers(-1, 2, (1, *patch)).astype(np.int8)
    cfg = AugmentConfig.from_patch_size(patch, use_mask_for_norm=(False, True))
    params = SpatialParams(3, False, False, (0.0,) * 3, (1.0,) * 3, ())
    region = needed_region(params, patch, box_center((0, 0, 0), patch))
    r = augment_sample(img, seg, params, rng, cfg, region, intensity=NO_INTENSITY)
    np.testing.assert_array_equal(r.image[0], img[0])
    np.testing.assert_array_equal(r.image[1], np.where(seg[0] < 0, 0, img[1]))
    np.testing.assert_array_equal(r.seg, np.where(seg == -1, 0, seg))


def test_shape_errors_are_clear():
    patch = (8, 9, 10)
    cfg = AugmentConfig.from_patch_size(patch)
    params = SpatialParams(3, False, False, (0.0,) * 3, (1.0,) * 3, ())
    region = needed_region(params, patch, box_center((0, 0, 0), patch))
    with pytest.raises(ValueError, match="region"):
        spatial_patch(np.zeros((1, 8, 9, 11), np.float32), np.zeros((1, 8, 9, 11), np.int8), params, cfg, region)
    with pytest.raises(ValueError, match="2 or 3 axes"):
        AugmentConfig.from_patch_size((5,))


# --------------------------------------------------------------------------------------------- statistics
N = 4000


def assert_rate(hits: int, n: int, p: float, what: str):
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= 4 * sigma + 1, f"{what}: {hits}/{n}, expected {p}"


def assert_uniform(values, lo, hi, what, bins=10):
    values = np.asarray(values)
    assert values.min() >= lo and values.max() <= hi, what
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    for c in counts:
        assert_rate(int(c), len(values), 1 / bins, f"{what} histogram")


@pytest.mark.parametrize("patch", [(64, 64, 64), (20, 160, 160), (256, 256), (320, 160)])
def test_spatial_sampling_probabilities_and_ranges(patch):
    cfg = AugmentConfig.from_patch_size(patch)
    rng = np.random.default_rng(sum(patch))
    draws = [sample_spatial(rng, cfg) for _ in range(N)]
    assert_rate(sum(d.rotated for d in draws), N, 0.2, "rotation")
    assert_rate(sum(d.scaled for d in draws), N, 0.2, "scaling")
    assert_rate(sum(d.transformed for d in draws), N, 1 - 0.8 * 0.8, "rotation or scaling")
    for a in cfg.mirror_axes:
        assert_rate(sum(a in d.mirror_axes for d in draws), N, 0.5, f"mirror axis {a}")
    nd = cfg.transform_ndim
    assert all(len(d.angles) == nd and len(d.scales) == nd for d in draws)
    lo, hi = cfg.rotation
    angles = [a for d in draws if d.rotated for a in d.angles]
    assert_uniform(angles, lo, hi, "angles")
    assert all(d.angles == (0.0,) * nd for d in draws if not d.rotated)
    scales = [d.scales[0] for d in draws if d.scaled]
    assert_uniform(scales, 0.7, 1.4, "scales")
    assert all(len(set(d.scales)) == 1 for d in draws)  # synchronized across axes
    if len(patch) == 2:
        assert hi == pytest.approx(np.pi if max(patch) / min(patch) <= 1.5 else np.pi / 12)
    else:
        assert hi == pytest.approx(np.pi if cfg.do_dummy_2d else np.pi / 6)


@pytest.mark.compat
def test_transformed_fraction_matches_batchgeneratorsv2_sampling():
    """Two-sample check against SpatialTransform.get_parameters itself (global numpy RNG)."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    st = SpatialTransform((4, 4, 4), 0, False, p_rotation=0.2, rotation=(-0.5, 0.5), p_scaling=0.2,
                          scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1)
    np.random.seed(0)
    img = torch.zeros((1, 4, 4, 4))
    n = 2000
    theirs = sum(st.get_parameters(image=img)["affine"] is not None for _ in range(n))
    cfg = AugmentConfig.from_patch_size((4, 4, 4))
    rng = np.random.default_rng(0)
    ours = sum(sample_spatial(rng, cfg).transformed for _ in range(n))
    p = (theirs + ours) / (2 * n)
    assert abs(theirs - ours) <= 4 * np.sqrt(2 * n * p * (1 - p))


@pytest.mark.parametrize("patch", [(64, 64, 64), (20, 160, 160), (128, 96)])
def test_intensity_sampling_probabilities_and_ranges(patch):
    cfg = AugmentConfig.from_patch_size(patch)
    rng = np.random.default_rng(len(patch))
    n_c = 2
    draws = [sample_intensity(rng, cfg, n_c) for _ in range(N)]
    for name, p in [("noise_sigma", 0.1), ("blur_sigmas", 0.2), ("brightness", 0.15), ("contrast", 0.15),
                    ("lowres_scales", 0.25), ("gamma_inverted", 0.1), ("gamma", 0.3)]:
        assert_rate(sum(getattr(d, name) is not None for d in draws), N, p, name)
    assert_uniform([d.noise_sigma for d in draws if d.noise_sigma is not None], 0.0, 0.1, "noise sigma", bins=5)
    blur = [s for d in draws if d.blur_sigmas is not None for s in d.blur_sigmas]
    assert_rate(sum(s is not None for s in blur), len(blur), 0.5, "blur per channel")
    assert all(len(s) == len(patch) for s in blur if s is not None)
    assert_uniform([v for s in blur if s is not None for v in s], 0.5, 1.0, "blur sigma", bins=5)
    lowres = [s for d in draws if d.lowres_scales is not None for s in d.lowres_scales]
    assert_rate(sum(s is not None for s in lowres), len(lowres), 0.5, "lowres per channel")
    for s in lowres:
        if s is not None:
            if cfg.do_dummy_2d:
                assert s[0] == 1.0 and len(set(s[1:])) == 1
            else:
                assert len(set(s)) == 1
    assert_uniform([s[-1] for s in lowres if s is not None], 0.5, 1.0, "lowres scale", bins=5)
    for name, (lo, hi) in [("brightness", (0.75, 1.25)), ("contrast", (0.75, 1.25)), ("gamma", (0.7, 1.5)),
                           ("gamma_inverted", (0.7, 1.5))]:
        vals = np.array([v for d in draws if getattr(d, name) is not None for v in getattr(d, name)])
        assert len(vals) == n_c * sum(getattr(d, name) is not None for d in draws)  # every channel
        # BGContrast: half U(lo, 1), half U(1, hi)
        below = vals[vals < 1]
        assert_rate(len(below), len(vals), 0.5, f"{name} below 1")
        assert_uniform(below, lo, 1.0, f"{name} below 1", bins=4)
        assert_uniform(vals[vals >= 1], 1.0, hi, f"{name} above 1", bins=4)


def test_record_says_what_fired():
    patch = (12, 14, 16)
    cfg = AugmentConfig.from_patch_size(patch)
    rng = np.random.default_rng(11)
    img, seg = smooth_case(rng, tuple(2 * p for p in patch))
    fired = {}
    for _ in range(150):
        params = sample_spatial(rng, cfg)
        region = needed_region(params, patch, box_center((6, 7, 8), (6 + 18, 7 + 21, 8 + 24)))
        r = augment_sample(read_region(img, region.lb, region.ub, 0), read_region(seg, region.lb, region.ub, -1),
                           params, rng, cfg, region)
        assert r.record.spatial is params
        for k, v in r.record.fired.items():
            fired[k] = fired.get(k, 0) + v
        assert r.image.shape == (2, *patch) and np.isfinite(r.image).all() and r.seg.min() >= 0
    assert all(v > 0 for v in fired.values()), fired
