"""The cascade's input channels (``nnfast.data.cascade``) and batches of the second stage (``3d_cascade_fullres``)."""
from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest

from nnfast.data.augment_params import AugmentConfig
from nnfast.data.batch import BatchBuilder, BatchSpec
from nnfast.data.cascade import BINARY_OPERATORS, CascadeParams, augment_onehot, onehot_into, sample_cascade
from nnfast.data.dataset import NnunetCaseSource, ZarrCaseSource
from nnfast.data.loader import PatchLoader
from nnfast.io.prev_stage import write_previous_stage
from nnfast.io.store import store_path
from nnfast.native.components import label_components

LABELS = (1, 2)
NO_AUG = dict(p_rotation=0, p_scaling=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
              p_gamma_inverted=0, p_gamma=0, p_mirror=0, p_binary_operator=0, p_remove_component=0)


def _blobs(shape, seed, n=3):
    """A label map with a few blobs of labels 1..n (a stand-in for a first stage's prediction)."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    seg = np.zeros(shape, np.uint8)
    for k in range(6):
        c = [rng.uniform(0, s) for s in shape]
        r = rng.uniform(1.5, 5)
        seg[sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < r * r] = 1 + k % n
    return seg


@pytest.fixture(scope="module")
def cascade_cases(tmp_path_factory, ld_write_cases):
    """Three cases with a previous-stage folder (nnfast stores and nnU-Net .b2nd files) holding a noisy copy of the
    labels, and a second folder holding the labels themselves (a perfect first stage)."""
    root = tmp_path_factory.mktemp("cascade_cases")
    stores, nn, cases = ld_write_cases(root, [(12, 40, 44), (10, 36, 30), (16, 30, 38)], seed=3)
    noisy, perfect, nn_prev = root / "prev_noisy", root / "prev_perfect", root / "nn_prev"
    nn_prev.mkdir()
    for i, (cid, (_, seg, _)) in enumerate(cases.items()):
        lab = np.maximum(seg[0], 0).astype(np.uint8)
        pred = lab.copy()
        pred[_blobs(lab.shape, i, 2) > 0] = _blobs(lab.shape, i, 2)[_blobs(lab.shape, i, 2) > 0]
        write_previous_stage(store_path(noisy, cid), pred, patch_size=(8, 16, 16))
        write_previous_stage(store_path(perfect, cid), lab, patch_size=(8, 16, 16))
        try:
            from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
        except ImportError:  # pragma: no cover
            continue
        nnUNetDatasetBlosc2.save_seg(pred, str(nn_prev / cid))
    return {"stores": stores, "nnunet": nn, "cases": cases, "noisy": noisy, "perfect": perfect, "nn_prev": nn_prev}


def _spec(train=True, batch_size=3, **aug):
    cfg = AugmentConfig.from_patch_size((8, 16, 16), ds_scales=[(1, 1, 1), (0.5, 0.5, 0.5)], **aug)
    return BatchSpec(augment=cfg, batch_size=batch_size, num_channels=1, train=train, cascade_labels=LABELS)


# ----------------------------------------------------------------------------------------------- parameters
def test_sample_cascade_follows_nnunets_probabilities():
    cfg = AugmentConfig.from_patch_size((8, 16, 16))
    rng = np.random.default_rng(0)
    n = 6000
    draws = [sample_cascade(rng, cfg, 3) for _ in range(n)]
    bin_fired = [d.binary_operators for d in draws if d.binary_operators is not None]
    cc_fired = [d.remove_component for d in draws if d.remove_component is not None]
    assert abs(len(bin_fired) / n - 0.4) < 0.03 and abs(len(cc_fired) / n - 0.2) < 0.03
    per_label = np.mean([len(b) for b in bin_fired]) / 3
    assert abs(per_label - 0.5) < 0.03 and abs(np.mean([len(c) for c in cc_fired]) / 3 - 0.5) < 0.04
    ops = [o for b in bin_fired for (_, o, _) in b]
    radii = np.array([r for b in bin_fired for (_, _, r) in b])
    assert {o: ops.count(o) / len(ops) for o in BINARY_OPERATORS} == pytest.approx(
        {o: 0.25 for o in BINARY_OPERATORS}, abs=0.03)
    assert radii.min() >= 1 and radii.max() < 8 and abs(radii.mean() - 4.5) < 0.15
    # channels come in a random order, each at most once
    firsts = [b[0][0] for b in bin_fired if len(b) == 3]
    assert set(firsts) == {0, 1, 2} and all(sorted(c for c, _, _ in b) == [0, 1, 2] for b in bin_fired if len(b) == 3)


@pytest.mark.compat
def test_onehot_equals_nnunets_move_seg_as_onehot():
    import torch
    from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform

    seg = np.random.default_rng(1).integers(0, 4, (2, 6, 7, 8)).astype(np.int16)
    img = np.random.default_rng(2).random((1, 6, 7, 8)).astype(np.float32)
    ref = MoveSegAsOneHotToDataTransform(1, (1, 2, 3))(image=torch.from_numpy(img), segmentation=torch.from_numpy(seg))
    out = onehot_into(seg[1], (1, 2, 3), np.empty((3, 6, 7, 8), np.float32))
    np.testing.assert_array_equal(ref["image"][1:].numpy(), out)
    np.testing.assert_array_equal(ref["segmentation"].numpy(), seg[:1])


@pytest.mark.compat
@pytest.mark.parametrize("seed", range(6))
def test_binary_operators_equal_batchgeneratorsv2(seed):
    import torch
    from batchgeneratorsv2.transforms.nnunet import random_binary_operator as rbo

    fns = {"dilation": rbo.binary_dilation_torch, "erosion": rbo.binary_erosion_torch,
           "closing": rbo.binary_closing_torch, "opening": rbo.binary_opening_torch}
    rng = np.random.default_rng(seed)
    shape = (10, 26, 23) if seed % 2 else (1, 30, 27)
    onehot = onehot_into(_blobs(shape, seed), (1, 2, 3), np.empty((3, *shape), np.float32))
    ops = tuple((int(c), BINARY_OPERATORS[int(rng.integers(4))], float(rng.uniform(1, 8)))
                for c in rng.permutation(3))
    ours = onehot.copy()
    augment_onehot(ours, CascadeParams(ops, None), rng, AugmentConfig.from_patch_size((8, 16, 16)))
    tr = rbo.ApplyRandomBinaryOperatorTransform(channel_idx=[0, 1, 2])
    ref = tr._apply_to_image(torch.from_numpy(onehot.copy()), apply_to_channels=[c for c, _, _ in ops],
                             operators=[fns[o] for _, o, _ in ops], strel_size=[r for _, _, r in ops])
    np.testing.assert_array_equal(ours, ref.numpy())


def test_component_removal_erases_one_small_component_uniformly():
    cfg = AugmentConfig.from_patch_size((8, 16, 16))
    x = np.zeros((2, 12, 30, 30), np.float32)
    x[0, 1:3, 1:3, 1:3] = 1        # 8 voxels
    x[0, 6:8, 10:14, 10:14] = 1    # 32 voxels
    x[0, :, 20:, 20:] = 1          # 1200 voxels = 11 % of the patch: still removable
    x[1, :, :, :12] = 1            # 4320 voxels = 40 %: never removed
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(600):
        y = x.copy()
        augment_onehot(y, CascadeParams(None, (1, 0)), rng, cfg)
        np.testing.assert_array_equal(y[1], x[1])
        erased = x[0] - y[0]
        assert erased.min() == 0
        lab, sizes = label_components(erased)
        assert len(sizes) == 1  # exactly one component of channel 0
        seen[int(sizes[0])] = seen.get(int(sizes[0]), 0) + 1
    assert set(seen) == {8, 32, 1200} and min(seen.values()) > 150
    empty = np.zeros((1, 4, 4, 4), np.float32)
    augment_onehot(empty, CascadeParams(None, (0,)), rng, cfg)  # nothing there: nothing happens
    assert not empty.any()


# ----------------------------------------------------------------------------------------------- sources
def test_sources_read_the_previous_stage_as_a_second_label_channel(cascade_cases):
    cc = cascade_cases
    z = ZarrCaseSource(cc["stores"], previous_stage_folder=cc["noisy"])
    assert z.num_seg_channels == 2 and z.missing_previous_stage() == {}
    box = [[-2, 9], [5, 30], [-3, 20]]
    img, seg = z.read("case_001", box)
    plain_img, plain_seg = ZarrCaseSource(cc["stores"]).read("case_001", box)
    np.testing.assert_array_equal(img, plain_img)
    np.testing.assert_array_equal(seg[:1], plain_seg)
    assert seg.shape == (2, 11, 25, 23) and seg.dtype == np.int16
    assert (seg[1, :2] == -1).all() and (seg[1, :, :, :3] == -1).all() and (seg[1, 2:, :, 3:] >= 0).all()
    z2 = pickle.loads(pickle.dumps(z.subset(["case_001"])))  # what the loader sends to its workers
    np.testing.assert_array_equal(z2.read("case_001", box)[1], seg)
    assert "previous stage" in repr(z2)
    if (cc["nn_prev"] / "case_001.b2nd").is_file():
        n = NnunetCaseSource(cc["nnunet"], previous_stage_folder=cc["nn_prev"])
        assert n.missing_previous_stage() == {}
        np.testing.assert_array_equal(n.read("case_001", box)[1], seg)
        assert set(NnunetCaseSource(cc["nnunet"], previous_stage_folder=cc["stores"]).missing_previous_stage()) == \
            set(cc["cases"])


def test_missing_previous_stage_is_named(cascade_cases, tmp_path):
    cc = cascade_cases
    write_previous_stage(store_path(tmp_path, "case_000"), np.zeros((12, 40, 44), np.uint8), patch_size=(8, 16, 16))
    write_previous_stage(store_path(tmp_path, "case_001"), np.zeros((10, 36, 31), np.uint8), patch_size=(8, 16, 16))
    missing = ZarrCaseSource(cc["stores"], previous_stage_folder=tmp_path).missing_previous_stage()
    assert set(missing) == {"case_001", "case_002"} and "(10, 36, 31)" in missing["case_001"]


# ----------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("train, warp", [(True, False), (True, True), (False, False)])
def test_perfect_previous_stage_stays_aligned_with_the_labels(cascade_cases, train, warp):
    """With the labels as the previous stage and the cascade's own transforms off, the one-hot channels equal the
    one-hot of the target through cropping and mirroring, and through rotation and scaling too except where the
    label vote sees the -1 outside the field of view (a previous stage cannot hold -1, it has 0 there)."""
    cc = cascade_cases
    src = ZarrCaseSource(cc["stores"], previous_stage_folder=cc["perfect"])
    p = 0.7 if warp else 0.0
    spec = _spec(train, p_rotation=p, p_scaling=p, p_binary_operator=0, p_remove_component=0)
    b = BatchBuilder(src, spec)
    differ = total = 0
    for i in range(12):
        arr, keys = b.build(5, i)
        assert arr.data.shape == (3, 3, 8, 16, 16)
        for j in range(3):
            t = arr.targets[0][j, 0]
            for k, lab in enumerate(LABELS):
                differ += int((arr.data[j, 1 + k] != (t == lab)).sum())
                total += t.size
    assert differ == 0 if not warp else differ < 0.002 * total


def test_without_augmentation_the_batch_is_the_stored_crop(cascade_cases):
    cc = cascade_cases
    src = ZarrCaseSource(cc["stores"], previous_stage_folder=cc["noisy"])
    spec = _spec(True, batch_size=1, **NO_AUG)  # one sample: the cascade's draws come after everything else
    arr, keys = BatchBuilder(src, spec).build(0, 0)
    plain = BatchBuilder(ZarrCaseSource(cc["stores"]), replace(spec, cascade_labels=None)).build(0, 0)[0]
    np.testing.assert_array_equal(arr.data[:, :1], plain.data)  # same sampling, same image
    for a, p in zip(arr.targets, plain.targets):
        np.testing.assert_array_equal(a, p)
    onehot = arr.data[:, 1:]
    assert set(np.unique(onehot)) <= {0.0, 1.0} and onehot.sum(1).max() <= 1


def test_augmented_onehot_is_binary_exclusive_and_deterministic(cascade_cases):
    cc = cascade_cases
    src = ZarrCaseSource(cc["stores"], previous_stage_folder=cc["noisy"])
    spec = _spec(True, batch_size=1, p_binary_operator=1.0, p_remove_component=1.0)
    b = BatchBuilder(src, spec)
    changed = 0
    for i in range(16):
        arr, _ = b.build(1, i)
        onehot = arr.data[:, 1:]
        assert set(np.unique(onehot)) <= {0.0, 1.0} and onehot.sum(1).max() <= 1
        again, _ = BatchBuilder(pickle.loads(pickle.dumps(src)), spec).build(1, i)
        np.testing.assert_array_equal(arr.data, again.data)
        plain, _ = BatchBuilder(src, replace(spec, augment=replace(spec.augment, p_binary_operator=0,
                                                                   p_remove_component=0))).build(1, i)
        changed += int(not np.array_equal(plain.data[:, 1:], onehot))
        np.testing.assert_array_equal(plain.targets[0], arr.targets[0])  # targets are untouched
    assert changed >= 8


def test_loader_workers_and_settings(cascade_cases):
    cc = cascade_cases
    src = ZarrCaseSource(cc["stores"], previous_stage_folder=cc["noisy"])
    spec = BatchSpec.from_patch_size((8, 16, 16), 2, num_channels=1, cascade_labels=LABELS)
    kw = dict(base_seed=4, num_batches=3, pin_memory=False)
    with PatchLoader(src, spec, num_workers=0, **kw) as a, PatchLoader(src, spec, num_workers=1, **kw) as b:
        for x, y in zip(a, b):
            assert x["data"].shape == (2, 3, 8, 16, 16)
            assert x["keys"] == y["keys"] and x["data"].equal(y["data"]) and x["target"].equal(y["target"])
    with pytest.raises(ValueError, match="cascade_labels"):
        PatchLoader(src, BatchSpec.from_patch_size((8, 16, 16), 2, num_channels=1))
    with pytest.raises(ValueError, match="previous_stage_folder"):
        PatchLoader(ZarrCaseSource(cc["stores"]), spec)
    with pytest.raises(ValueError, match="foreground labels"):
        BatchSpec(augment=AugmentConfig.from_patch_size((8, 16, 16)), batch_size=2, num_channels=1,
                  cascade_labels=(0, 1))


# ----------------------------------------------------------------------------------------------- nnU-Net
@pytest.mark.compat
@pytest.mark.parametrize("train", [True, False])
def test_batches_look_like_nnunets_cascade_loader(cascade_cases, train):
    """nnU-Net's nnUNetDataLoader on its own folder with ``folder_with_segs_from_previous_stage`` and the cascaded
    transforms vs nnfast's loader on the same files: same layout, dtypes and shapes; binary, exclusive one-hot
    channels after the image."""
    import torch
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    cc = cascade_cases
    patch, ds = (8, 16, 16), [[1, 1, 1], [0.5, 0.5, 0.5]]
    aug = AugmentConfig.from_patch_size(patch, ds_scales=ds)
    kw = dict(deep_supervision_scales=ds, is_cascaded=True, foreground_labels=[1, 2], regions=None, ignore_label=None)
    if train:
        tr = nnUNetTrainer.get_training_transforms(patch, aug.rotation, mirror_axes=aug.mirror_axes,
                                                   do_dummy_2d_data_aug=aug.do_dummy_2d, use_mask_for_norm=[False],
                                                   **kw)
    else:
        tr = nnUNetTrainer.get_validation_transforms(**kw)
    lm = LabelManager({"background": 0, "a": 1, "b": 2}, None)
    dataset = nnUNetDatasetBlosc2(str(cc["nnunet"]), folder_with_segs_from_previous_stage=str(cc["nn_prev"]))
    dl = nnUNetDataLoader(dataset, 3, aug.initial_patch_size if train else patch, patch, lm,
                          oversample_foreground_percent=0.33, transforms=tr)
    ref = next(dl)
    spec = BatchSpec(augment=aug, batch_size=3, num_channels=1, train=train, cascade_labels=LABELS)
    with PatchLoader(NnunetCaseSource(cc["nnunet"], previous_stage_folder=cc["nn_prev"]), spec, base_seed=0,
                     pin_memory=False) as loader:
        ours = next(loader)
    assert ref["data"].dtype == ours["data"].dtype == torch.float32
    assert tuple(ref["data"].shape) == tuple(ours["data"].shape) == (3, 3, *patch)
    assert [(t.dtype, t.shape) for t in ref["target"]] == [(t.dtype, t.shape) for t in ours["target"]]
    for b in (ref, ours):
        onehot = b["data"][:, 1:]
        assert set(torch.unique(onehot).tolist()) <= {0.0, 1.0} and float(onehot.sum(1).max()) <= 1
        assert set(torch.unique(b["target"][0]).tolist()) <= {0, 1, 2}


@pytest.mark.compat
def test_nnunet_adapter_reads_the_trainers_previous_stage_folder(cascade_cases, tmp_path):
    """``build_nnunet_loaders`` on a cascaded trainer (only the attributes the adapter reads): the previous stage
    comes from ``folder_with_segs_from_previous_stage``; missing files are named before any worker starts."""
    import types

    import torch

    from nnfast.data.nnunet_adapter import build_nnunet_loaders
    from nnfast.errors import DatasetError

    cc = cascade_cases
    if not (cc["nn_prev"] / "case_000.b2nd").is_file():  # pragma: no cover
        pytest.skip("nnU-Net's blosc2 files were not written")
    aug = AugmentConfig.from_patch_size((8, 16, 16))
    ids = sorted(cc["cases"])

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class Fake(types.SimpleNamespace):
        get_training_transforms = nnUNetTrainer.get_training_transforms

    def fake(prev_folder):
        return Fake(
            label_manager=types.SimpleNamespace(has_regions=False, has_ignore_label=False, all_labels=[0, 1, 2],
                                                foreground_labels=[1, 2]),
            is_cascaded=True, folder_with_segs_from_previous_stage=str(prev_folder),
            configure_rotation_dummyDA_mirroring_and_inital_patch_size=lambda: (
                aug.rotation, aug.do_dummy_2d, aug.initial_patch_size, aug.mirror_axes),
            configuration_manager=types.SimpleNamespace(patch_size=[8, 16, 16], use_mask_for_norm=[False],
                                                        batch_size=2),
            _get_deep_supervision_scales=lambda: [[1, 1, 1], [0.5, 0.5, 0.5]], do_split=lambda: (ids[:2], ids[2:]),
            preprocessed_dataset_folder=str(cc["nnunet"]), device=torch.device("cpu"),
            oversample_foreground_percent=0.33, probabilistic_oversampling=False, num_iterations_per_epoch=2,
            num_val_iterations_per_epoch=1, current_epoch=0, local_rank=0)

    tr, val = build_nnunet_loaders(fake(cc["nn_prev"]), num_workers=0, base_seed=1)
    try:
        b, v = next(tr), next(val)
        assert tuple(b["data"].shape) == tuple(v["data"].shape) == (2, 3, 8, 16, 16)
        assert tr.spec.cascade_labels == (1, 2) and set(torch.unique(b["data"][:, 1:]).tolist()) <= {0.0, 1.0}
    finally:
        tr.close()
        val.close()
    with pytest.raises(DatasetError, match=r"3 of 3 are missing.*case_000"):
        build_nnunet_loaders(fake(tmp_path), num_workers=0, base_seed=1)


def test_sources_travel_as_json(cascade_cases):
    """What the loader sends its workers: the class and the folder/ids/settings, as JSON text."""
    import json

    from nnfast.data.dataset import source_from_json, source_to_json

    cc = cascade_cases
    for src in (ZarrCaseSource(cc["stores"], previous_stage_folder=cc["noisy"]).subset(["case_001", "case_002"]),
                ZarrCaseSource(cc["stores"])):
        text = source_to_json(src)
        assert json.loads(text)["class"] == "nnfast.data.dataset:ZarrCaseSource" and len(text) < 1000
        back = source_from_json(text)
        assert type(back) is ZarrCaseSource and back.case_ids == src.case_ids
        assert back.previous_stage_folder == src.previous_stage_folder
        box = [[-1, 5], [2, 20], [3, 30]]
        for a, b in zip(src.read("case_001", box), back.read("case_001", box)):
            np.testing.assert_array_equal(a, b)

    class Opaque(ZarrCaseSource):
        def __getstate__(self):
            return {"handle": object()}

    with pytest.raises(TypeError, match="num_workers=0"):
        source_to_json(Opaque(cc["stores"]))
