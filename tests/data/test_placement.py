"""Patch placement against nnU-Net's own code (issue 15): the same draws give the same box
(``nnUNetDataLoader.get_bbox``), and with every transform off the same box gives the same patch, voxel for voxel
(``crop_and_pad_nd`` + nnU-Net's training pipeline, whose ``SpatialTransform`` crops at ``floor(box / 2) - patch // 2``),
for odd and even ``need_to_pad``, 3D, dummy-2D and 2D."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnfast.data.augment_params import AugmentConfig, box_center
from nnfast.data.batch import BatchBuilder, BatchSpec, batch_rng
from nnfast.data.dataset import ZarrCaseSource
from nnfast.data.sampler import SamplerConfig, forced_foreground, get_bbox, sample_batch_cases

pytest.importorskip("nnunetv2")

NO_AUG = dict(p_rotation=0.0, p_scaling=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0,
              p_lowres=0.0, p_gamma_inverted=0.0, p_gamma=0.0, p_mirror=0.0)
# 3D (need_to_pad 5/6/6), dummy-2D (0/5/2: axis 0 kept, in-plane odd and even), 2D (7/3 in-plane)
PATCHES = [(8, 16, 16), (4, 13, 16), (16, 20)]


class _Draws:
    """Stands in for ``numpy.random`` inside nnU-Net's loader module: its ``randint``/``choice(n)`` take the same
    draws from a Generator as nnfast's sampler (``integers``), so both codes see identical random numbers."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def randint(self, lo, hi):
        return int(self.rng.integers(lo, hi))

    def choice(self, n):
        return int(self.rng.integers(n))


class _Numpy:
    def __init__(self, rng):
        self.random = _Draws(rng)

    def __getattr__(self, name):
        return getattr(np, name)


def _nnunet_bbox(monkeypatch, cfg: SamplerConfig, shape, force, locs, seed):
    import nnunetv2.training.dataloading.data_loader as ndl

    loader = SimpleNamespace(
        patch_size=cfg.initial_patch_size,
        need_to_pad=(np.array(cfg.initial_patch_size) - np.array(cfg.patch_size)).astype(int),
        has_ignore=cfg.has_ignore, annotated_classes_key=cfg.annotated_classes_key)
    with monkeypatch.context() as m:
        m.setattr(ndl, "np", _Numpy(np.random.default_rng(seed)))
        lbs, ubs = ndl.nnUNetDataLoader.get_bbox(loader, np.array(shape), force, locs)
    return [int(v) for v in lbs], [int(v) for v in ubs]


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("ignore", [False, True])
def test_get_bbox_is_nnunets_on_the_same_draws(ld_cases, monkeypatch, patch, ignore):
    source = ZarrCaseSource(ld_cases[0])
    spec = BatchSpec(augment=AugmentConfig.from_patch_size(patch), batch_size=2, num_channels=1,
                     annotated_classes_key=(-1, 1, 2) if ignore else None)
    cfg = spec.sampler
    seen_pad = set()
    for cid in source.case_ids:  # case_003 is (10, 20, 24) and has no foreground: extra padding, fallback to random
        shape = source.shape(cid)
        locs = dict(source.class_locations(cid))
        if ignore:
            locs[(-1, 1, 2)] = np.concatenate([v for v in locs.values()]) if any(len(v) for v in locs.values()) \
                else np.zeros((0, 4), np.int32)
        for force in (False, True):
            for seed in range(40):
                ours = get_bbox(cfg, shape, force, locs, np.random.default_rng(seed))
                theirs = _nnunet_bbox(monkeypatch, cfg, shape, force, locs, seed)
                assert ours == theirs, (cid, force, seed)
                seen_pad.update(lb < 0 or ub > s for lb, ub, s in zip(*ours, shape))
    assert seen_pad == {False, True}  # boxes inside the case and boxes reaching past it both occurred


def _nnunet_pipeline_without_randomness(patch, aug: AugmentConfig):
    """nnU-Net's own training transforms for ``patch`` with every random transform switched off (what is left:
    dummy-2D conversion, SpatialTransform's centre crop, -1 -> 0)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    tr = nnUNetTrainer.get_training_transforms(patch, aug.rotation, None, aug.mirror_axes, aug.do_dummy_2d,
                                               use_mask_for_norm=[False], is_cascaded=False, foreground_labels=[1, 2],
                                               regions=None, ignore_label=None)
    names = []

    def walk(t):
        names.append(type(t).__name__)
        if hasattr(t, "apply_probability"):
            t.apply_probability = 0.0
        if type(t).__name__ == "SpatialTransform":
            t.p_rotation = t.p_scaling = 0.0
        if type(t).__name__ == "MirrorTransform":
            t.allowed_axes = ()
        for child in getattr(t, "transforms", None) or []:
            walk(child)
        if getattr(t, "transform", None) is not None:
            walk(t.transform)

    walk(tr)
    assert "SpatialTransform" in names and ("Convert3DTo2DTransform" in names) == aug.do_dummy_2d
    return tr


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("oversample", [0.0, 1.0])
def test_unaugmented_training_patch_is_nnunets_crop_of_the_same_box(ld_cases, patch, oversample):
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    stores, _, cases = ld_cases
    source = ZarrCaseSource(stores)
    aug = AugmentConfig.from_patch_size(patch, **NO_AUG)
    assert aug.initial_patch_size == AugmentConfig.from_patch_size(patch).initial_patch_size
    spec = BatchSpec(augment=aug, batch_size=1, num_channels=1, oversample_foreground_percent=oversample)
    tr = _nnunet_pipeline_without_randomness(patch, aug)
    builder = BatchBuilder(source, spec)
    out = builder.allocate()
    two_d = len(patch) == 2
    padded = 0
    for i in range(24):
        _, keys = builder.build(5, i, out)
        rng = batch_rng(5, i)  # replay sample 0's draws
        cid = sample_batch_cases(list(source.case_ids), 1, rng)[0]
        assert cid == keys[0]
        force = forced_foreground(spec.sampler, rng)[0]
        assert force == (oversample == 1.0)
        lbs, ubs = get_bbox(spec.sampler, source.shape(cid), force, source.class_locations(cid), rng)
        image, seg, _ = cases[cid]
        bbox = [[lb, ub] for lb, ub in zip(lbs, ubs)]
        padded += any(lb < 0 or ub > s for lb, ub, s in zip(lbs, ubs, image.shape[1:]))
        img = torch.from_numpy(crop_and_pad_nd(image, bbox, 0)).float()
        lab = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        if two_d:
            img, lab = img[:, 0], lab[:, 0]
        # SpatialTransform's centre: half the box it is given (random_crop=False), which is nnfast's box_center
        first = 1 if two_d else 0
        assert tuple(c - lb for c, lb in zip(box_center(lbs[first:], ubs[first:]), lbs[first:])) == \
            tuple(s / 2 for s in img.shape[1:])
        res = tr(image=img, segmentation=lab)
        np.testing.assert_array_equal(out.data[0], res["image"].numpy(), err_msg=f"{cid} box {bbox}")
        np.testing.assert_array_equal(out.targets[0][0], res["segmentation"].numpy(), err_msg=f"{cid} box {bbox}")
    assert padded > 0


def test_enlarged_patch_is_nnunets():
    """``initial_patch_size`` (and so ``need_to_pad``) from nnU-Net's own
    ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` for the test patches and the aniso set's."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class Stub:
        def __init__(self, p):
            self.configuration_manager = SimpleNamespace(patch_size=list(p))

        def print_to_log_file(self, *a, **k):
            pass

    needs = set()
    for p in [*PATCHES, (16, 56, 64)]:
        rot, dummy, initial, mirror = nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(Stub(p))
        aug = AugmentConfig.from_patch_size(p)
        assert aug.initial_patch_size == tuple(int(v) for v in initial) and aug.do_dummy_2d == dummy
        assert aug.rotation == tuple(rot) and aug.mirror_axes == tuple(mirror)
        needs.update((a - b) % 2 for a, b in zip(aug.initial_patch_size, p))
    assert needs == {0, 1}  # odd and even need_to_pad both covered
