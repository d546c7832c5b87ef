"""Region targets in the batch builder: equal to nnU-Net's ``ConvertSegmentationToRegionsTransform`` +
``DownsampleSegForDSTransform`` (batchgeneratorsv2) on the label maps the same batch carries without regions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnfast.data.augment_params import AugmentConfig
from nnfast.data.batch import BatchBuilder, BatchSpec
from nnfast.data.dataset import ZarrCaseSource
from nnfast.data.transforms import deep_supervision_targets
from nnfast.errors import SettingsError
from nnfast.labels import LabelManager

DS3 = ((1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.25, 0.5, 0.5))
REGIONS = LabelManager({"background": 0, "whole": [1, 2], "core": 2}, [1, 2])
REGIONS_IGNORE = LabelManager({"background": 0, "whole": [1, 2], "core": [2], "ignore": 3}, [1, 2])


def _nnunet_targets(seg: np.ndarray, lm: LabelManager, scales) -> list[np.ndarray]:
    """batchgeneratorsv2's transforms in nnU-Net's trainer order: regions (+ ignore) first, then downsampling."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    regions = list(lm.foreground_regions) + ([lm.ignore_label] if lm.has_ignore_label else [])
    regions = [list(r) if isinstance(r, tuple) else r for r in regions]
    t = ConvertSegmentationToRegionsTransform(regions=regions, channel_in_seg=0)
    out = t(**{"segmentation": torch.from_numpy(seg.astype(np.int16))})["segmentation"]
    if scales is None:
        return [out.numpy()]
    ds = DownsampleSegForDSTransform(ds_scales=[list(s) for s in scales])
    return [x.numpy() for x in ds(**{"segmentation": out})["segmentation"]]


@pytest.mark.compat
@pytest.mark.parametrize("lm", [REGIONS, REGIONS_IGNORE], ids=["regions", "regions+ignore"])
def test_region_targets_equal_nnunet_transforms(lm):
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4 if lm.has_ignore_label else 3, (1, 16, 20, 12)).astype(np.int16)
    ours = [lm.region_targets(t[0]) for t in deep_supervision_targets(seg, DS3)]
    theirs = _nnunet_targets(seg, lm, DS3)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype == np.bool_
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_batch_region_targets_are_the_label_maps_converted(ld_cases, train):
    """Same seed, same batch: the region spec's targets are the label-map spec's targets converted per scale, and
    they agree with nnU-Net's transforms on those label maps."""
    source = ZarrCaseSource(ld_cases[0])
    aug = AugmentConfig.from_patch_size((8, 16, 16), ds_scales=DS3)
    plain = BatchSpec(augment=aug, batch_size=3, num_channels=1, train=train)
    spec = BatchSpec(augment=aug, batch_size=3, num_channels=1, train=train, labels=REGIONS)
    assert spec.num_target_channels == 2 and spec.target_shapes[1] == (3, 2, 4, 8, 8)
    a, keys_a = BatchBuilder(source, plain).build(7, 2)
    b, keys_b = BatchBuilder(source, spec).build(7, 2)
    assert keys_a == keys_b
    np.testing.assert_array_equal(a.data, b.data)
    assert any(t[:, 1].any() for t in b.targets)  # the core region occurs
    for j in range(3):
        theirs = _nnunet_targets(a.targets[0][j], REGIONS, DS3)
        for k in range(3):
            assert b.targets[k].dtype == np.int16
            np.testing.assert_array_equal(b.targets[k][j], REGIONS.region_targets(a.targets[k][j][0]))
            np.testing.assert_array_equal(b.targets[k][j], theirs[k])


def test_region_spec_pickles_and_rejects_plain_labels():
    import pickle

    aug = AugmentConfig.from_patch_size((8, 16, 16), ds_scales=DS3)
    spec = BatchSpec(augment=aug, batch_size=2, num_channels=1, labels=REGIONS_IGNORE)
    again = pickle.loads(pickle.dumps(spec))
    assert again.num_target_channels == 3 and again.labels.foreground_regions == ((1, 2), (2,))
    with pytest.raises(SettingsError, match="no regions"):
        BatchSpec(augment=aug, batch_size=2, num_channels=1, labels=LabelManager({"background": 0, "a": 1}))
