"""Batch builder: format and shapes (3D, 2D, deep supervision), nnU-Net's sampling rules, determinism, reading
only the needed region."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from nnfast.data import batch as batch_mod
from nnfast.data.augment_params import AugmentConfig
from nnfast.data.batch import BatchBuilder, BatchSpec, allocate_batch, batch_rng
from nnfast.data.dataset import ZarrCaseSource
from nnfast.data.sampler import forced_foreground, get_bbox, sample_batch_cases

DS3 = ((1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.25, 0.5, 0.5))
NO_AUG = dict(p_rotation=0.0, p_scaling=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0,
              p_lowres=0.0, p_gamma_inverted=0.0, p_gamma=0.0, p_mirror=0.0)


@pytest.fixture(scope="module")
def source(ld_cases):
    return ZarrCaseSource(ld_cases[0])


def spec3(batch_size=3, train=True, ds=DS3, patch=(8, 16, 16), **kw):
    aug = AugmentConfig.from_patch_size(patch, ds_scales=ds, **kw)
    return BatchSpec(augment=aug, batch_size=batch_size, num_channels=1, train=train)


def test_3d_batch_format_and_targets(source):
    spec = spec3()
    arrays, keys = BatchBuilder(source, spec).build(0, 0)
    assert arrays.data.shape == (3, 1, 8, 16, 16) and arrays.data.dtype == np.float32
    assert [t.shape for t in arrays.targets] == [(3, 1, 8, 16, 16), (3, 1, 4, 8, 8), (3, 1, 2, 8, 8)]
    assert all(t.dtype == np.int16 for t in arrays.targets)
    assert len(keys) == 3 and set(keys) <= set(source.case_ids)
    for t in arrays.targets:
        assert set(np.unique(t)) <= {0, 1, 2}  # -1 (outside the field of view / the case) became 0
    # the lower scales are nearest-exact picks of the full-resolution target
    full = arrays.targets[0]
    idx = [np.floor((np.arange(4) + 0.5) * 2).astype(int), np.floor((np.arange(8) + 0.5) * 2).astype(int)]
    np.testing.assert_array_equal(arrays.targets[1], full[:, :, idx[0]][:, :, :, idx[1]][..., idx[1]])
    assert np.isfinite(arrays.data).all()


def test_spec_sizes_and_shared_buffer_layout(source):
    spec = spec3(batch_size=2)
    buf = bytearray(spec.nbytes * 2)
    a = allocate_batch(spec, memoryview(buf), spec.nbytes)
    assert a.data.shape == spec.data_shape and [t.shape for t in a.targets] == spec.target_shapes
    BatchBuilder(source, spec).build(5, 1, a)
    b, _ = BatchBuilder(source, spec).build(5, 1)
    np.testing.assert_array_equal(a.data, b.data)
    assert not any(buf[:spec.nbytes])  # the first slot is untouched
    assert spec.nbytes >= sum(math.prod(s) * 2 for s in spec.target_shapes) + math.prod(spec.data_shape) * 4


def test_no_deep_supervision_gives_one_target(source):
    spec = spec3(ds=None)
    arrays, _ = BatchBuilder(source, spec).build(0, 0)
    assert [t.shape for t in arrays.targets] == [(3, 1, 8, 16, 16)]


def test_2d_batch_is_one_slice(source):
    aug = AugmentConfig.from_patch_size((16, 20), ds_scales=((1.0, 1.0), (0.5, 0.5)))
    spec = BatchSpec(augment=aug, batch_size=4, num_channels=1, train=True)
    assert spec.sampler.patch_size == (1, 16, 20)
    arrays, keys = BatchBuilder(source, spec).build(1, 7)
    assert arrays.data.shape == (4, 1, 16, 20)
    assert [t.shape for t in arrays.targets] == [(4, 1, 16, 20), (4, 1, 8, 10)]
    # validation: the slice equals a direct read of the sampled (1, y, z) box
    vspec = spec.with_train(False)
    arrays, keys = BatchBuilder(source, vspec).build(1, 7)
    rng = batch_rng(1, 7)
    assert sample_batch_cases(list(source.case_ids), 4, rng) == keys
    force = forced_foreground(vspec.sampler, rng)
    for j, cid in enumerate(keys):
        locs = source.class_locations(cid) if force[j] else None
        lbs, ubs = get_bbox(vspec.sampler, source.shape(cid), force[j], locs, rng)
        assert ubs[0] - lbs[0] == 1
        img, seg = source.read(cid, [[lb, ub] for lb, ub in zip(lbs, ubs)])
        np.testing.assert_array_equal(arrays.data[j], img[:, 0])
        np.testing.assert_array_equal(arrays.targets[0][j], np.where(seg[:, 0] == -1, 0, seg[:, 0]))


def test_validation_pads_small_cases(ld_cases):
    # case_003 is (10, 20, 24): a (16, 32, 32) patch sticks out on every axis
    src = ZarrCaseSource(ld_cases[0], ["case_003"])
    spec = spec3(batch_size=2, train=False, patch=(16, 32, 32), ds=None)
    arrays, keys = BatchBuilder(src, spec).build(0, 0)
    image, seg, _ = ld_cases[2]["case_003"]
    for j in range(2):
        d = arrays.data[j, 0]
        assert (d == 0).sum() >= d.size - image[0].size  # padding is 0
        assert set(np.unique(arrays.targets[0][j])) <= {0}  # case without foreground; -1 padding became 0
    # nnU-Net's rule: need_to_pad = patch - shape, box within [-need//2, shape + need//2 + need%2 - patch]
    rng = batch_rng(0, 0)
    sample_batch_cases(["case_003"], 2, rng)
    force = forced_foreground(spec.sampler, rng)
    lbs, _ = get_bbox(spec.sampler, (10, 20, 24), force[0], None, rng)
    assert lbs == [-3, -6, -4]


def test_validation_equals_plain_crop(source):
    spec = spec3(batch_size=3, train=False)
    arrays, keys = BatchBuilder(source, spec).build(11, 3)
    rng = batch_rng(11, 3)
    sample_batch_cases(list(source.case_ids), 3, rng)
    force = forced_foreground(spec.sampler, rng)
    assert force == [False, False, True]
    for j, cid in enumerate(keys):
        locs = source.class_locations(cid) if force[j] else None
        lbs, ubs = get_bbox(spec.sampler, source.shape(cid), force[j], locs, rng)
        img, seg = source.read(cid, [[lb, ub] for lb, ub in zip(lbs, ubs)])
        np.testing.assert_array_equal(arrays.data[j], img)
        np.testing.assert_array_equal(arrays.targets[0][j], np.where(seg == -1, 0, seg))


def test_training_without_augmentation_is_a_centred_crop_of_the_enlarged_box(source, monkeypatch):
    """With every transform off, a training sample is the final patch centred in nnU-Net's enlarged box, and only
    that patch is read."""
    spec = spec3(batch_size=3, **NO_AUG)
    assert spec.augment.initial_patch_size != spec.augment.patch_size
    reads = []
    real_read = source.read
    monkeypatch.setattr(source, "read",
                        lambda cid, bbox, *a, **k: reads.append(bbox) or real_read(cid, bbox, *a, **k))
    arrays, keys = BatchBuilder(source, spec).build(2, 9)
    monkeypatch.undo()
    assert all([u - lb for lb, u in b] == [8, 16, 16] for b in reads)
    # replay the sampler for the first sample (later samples also depend on the spatial/intensity draws)
    rng = batch_rng(2, 9)
    sample_batch_cases(list(source.case_ids), 3, rng)
    force = forced_foreground(spec.sampler, rng)
    cid = keys[0]
    lbs, ubs = get_bbox(spec.sampler, source.shape(cid), force[0], None, rng)
    centre = [(lb + ub) / 2 for lb, ub in zip(lbs, ubs)]
    start = [math.floor(c) - p // 2 for c, p in zip(centre, (8, 16, 16))]
    assert reads[0] == [[s, s + p] for s, p in zip(start, (8, 16, 16))]
    img, seg = source.read(cid, reads[0])
    np.testing.assert_array_equal(arrays.data[0], img)
    np.testing.assert_array_equal(arrays.targets[0][0], np.where(seg == -1, 0, seg))


def test_spatial_transform_reads_less_than_nnunet(source, monkeypatch):
    spec = spec3(batch_size=2, patch=(8, 16, 16))
    vox = []
    real_read = source.read
    monkeypatch.setattr(source, "read",
                        lambda cid, bbox, *a, **k: vox.append(math.prod(u - lb for lb, u in bbox))
                        or real_read(cid, bbox, *a, **k))
    builder = BatchBuilder(source, spec)
    for i in range(20):
        builder.build(0, i)
    nnunet = math.prod(spec.augment.initial_patch_size)
    assert max(vox) <= nnunet  # clipped to nnU-Net's box
    assert np.mean(vox) < 0.6 * nnunet
    assert 8 * 16 * 16 in vox  # pure crops happen (zooming in reads even less)


@pytest.mark.parametrize("bs", [2, 3, 5, 9, 12])
def test_forced_foreground_is_nnunets_last_samples(source, monkeypatch, bs):
    flags = []
    real = batch_mod.get_bbox

    def spy(cfg, shape, force_fg, locs, rng):
        flags.append(force_fg)
        return real(cfg, shape, force_fg, locs, rng)

    monkeypatch.setattr(batch_mod, "get_bbox", spy)
    spec = spec3(batch_size=bs, train=False, ds=None)
    builder = BatchBuilder(source, spec)
    n_batches = 6
    for i in range(n_batches):
        builder.build(0, i)
    per_batch = np.array(flags).reshape(n_batches, bs)
    n_forced = bs - round(bs * (1 - 0.33))
    expected = [j >= bs - n_forced for j in range(bs)]
    assert (per_batch == expected).all()
    assert per_batch.mean() == pytest.approx(n_forced / bs)


def test_forced_samples_contain_foreground(ld_cases):
    src = ZarrCaseSource(ld_cases[0], ["case_000", "case_001", "case_002"])  # all have foreground
    spec = spec3(batch_size=2, train=False, ds=None, patch=(4, 8, 8))
    builder = BatchBuilder(src, spec)
    fg = np.array([[(builder.build(3, i)[0].targets[0][j] > 0).any() for j in range(2)] for i in range(30)])
    assert fg[:, 1].all()  # the forced (last) sample always holds foreground
    assert fg[:, 0].mean() < 0.9  # random small patches often do not


def test_probabilistic_oversampling_uses_the_batch_rng(source):
    aug = AugmentConfig.from_patch_size((8, 16, 16))
    spec = BatchSpec(augment=aug, batch_size=8, num_channels=1, train=False, probabilistic_oversampling=True)
    flags = [forced_foreground(spec.sampler, np.random.default_rng(i)) for i in range(200)]
    assert 0.25 < np.mean(flags) < 0.41


def test_determinism_and_independence_of_batches(source):
    spec = spec3()
    a, ka = BatchBuilder(source, spec).build(42, 5)
    b, kb = BatchBuilder(source, spec).build(42, 5)
    builder = BatchBuilder(source, spec)
    for i in range(4):  # builder state (scratch buffers, caches) does not leak into results
        builder.build(42, i)
    c, kc = builder.build(42, 5)
    assert ka == kb == kc
    for x, y in ((a, b), (a, c)):
        np.testing.assert_array_equal(x.data, y.data)
        for t, u in zip(x.targets, y.targets):
            np.testing.assert_array_equal(t, u)
    d, _ = builder.build(42, 6)
    e, _ = builder.build(43, 5)
    assert not np.array_equal(a.data, d.data) and not np.array_equal(a.data, e.data)


def test_mask_for_norm_zeroes_outside(source):
    aug = AugmentConfig.from_patch_size((8, 16, 16), use_mask_for_norm=(True,), **{**NO_AUG, "p_noise": 1.0})
    spec = BatchSpec(augment=aug, batch_size=2, num_channels=1, train=True)
    seen_outside = False
    builder = BatchBuilder(source, spec)
    for i in range(4):
        # the same batch without the mask: noise is everywhere there, masked voxels are 0 here
        arrays, _ = builder.build(1, i)
        unmasked, _ = BatchBuilder(source, replace(spec, augment=replace(aug, use_mask_for_norm=(False,)))).build(1, i)
        diff = arrays.data != unmasked.data
        assert (arrays.data[diff] == 0).all()
        seen_outside |= bool(diff.any())
    assert seen_outside


def test_two_channel_cases(ld_cases_2ch):
    src = ZarrCaseSource(ld_cases_2ch[0])
    aug = AugmentConfig.from_patch_size((8, 16, 16))
    spec = BatchSpec(augment=aug, batch_size=2, num_channels=src.num_channels, train=True)
    arrays, _ = BatchBuilder(src, spec).build(0, 0)
    assert arrays.data.shape == (2, 2, 8, 16, 16)
    with pytest.raises(ValueError, match="expected"):
        BatchBuilder(src, spec).build(0, 0, allocate_batch(spec3()))


@pytest.mark.parametrize("case", ["3d", "3d_sticking_out", "2d", "2ch"])
def test_mirrored_reads_give_the_same_batches(ld_cases, ld_cases_2ch, case, monkeypatch):
    """Unrotated, unscaled samples read mirrored straight into the batch: the same bits as reading the region and
    cropping/mirroring it (the spatial step's copy), also where the patch sticks out of the case, in 2D and with two
    channels."""
    if case == "2ch":
        folder, patch, n_ch = ld_cases_2ch[0], (8, 16, 16), 2
    elif case == "2d":
        folder, patch, n_ch = ld_cases[0], (16, 20), 1
    else:
        folder, patch, n_ch = ld_cases[0], (16, 32, 32) if case == "3d_sticking_out" else (8, 16, 16), 1
    ds = ((1.0,) * len(patch), (0.5,) * len(patch))
    aug = AugmentConfig.from_patch_size(patch, ds_scales=ds)
    spec = BatchSpec(augment=aug, batch_size=3, num_channels=n_ch, train=True)
    fused, plain = ZarrCaseSource(folder), ZarrCaseSource(folder)
    mirrored = []
    real_read = fused.read
    monkeypatch.setattr(fused, "read", lambda cid, bbox, *a, flip=None: mirrored.append(flip)
                        or real_read(cid, bbox, *a, flip=flip))
    a, b = BatchBuilder(fused, spec), BatchBuilder(plain, spec)
    b._mirrored_reads = False
    assert a._mirrored_reads
    for i in range(12):
        x, kx = a.build(3, i)
        y, ky = b.build(3, i)
        assert kx == ky
        np.testing.assert_array_equal(x.data, y.data)
        for tx, ty in zip(x.targets, y.targets):
            np.testing.assert_array_equal(tx, ty)
    flips = [f for f in mirrored if f is not None]
    assert len(flips) >= 6 and any(any(f) for f in flips)  # the fused path ran, mirrored


def test_mirrored_reads_only_where_the_source_has_them(ld_cases):
    from nnfast.data.dataset import NnunetCaseSource

    spec = spec3()
    assert BatchBuilder(ZarrCaseSource(ld_cases[0]), spec)._mirrored_reads
    assert not BatchBuilder(NnunetCaseSource(ld_cases[1]), spec)._mirrored_reads
