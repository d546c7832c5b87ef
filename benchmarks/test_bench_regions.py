"""Region training: target construction + loss, nnfast vs nnU-Net v2 on the same label maps and logits.

One training batch's region work after augmentation: from the (b, 1, *patch) label map to the deep-supervision
targets (3 BraTS regions, 4 scales) and the deep-supervision loss forward + backward.

- nnU-Net: batchgeneratorsv2's ``ConvertSegmentationToRegionsTransform`` then ``DownsampleSegForDSTransform`` per
  sample (its trainer's order: regions at full resolution, each region channel downsampled), then
  ``DeepSupervisionWrapper(DC_and_BCE_loss(..., MemoryEfficientSoftDiceLoss))``.
- nnfast: ``deep_supervision_targets`` on the label map (one channel downsampled), then
  ``LabelManager.region_targets`` per scale straight into the batch's int16 arrays (what ``BatchBuilder`` does), then
  ``DeepSupervisionLoss(DiceBCELoss)``.

Sizes (``NNFAST_BENCH_SCALE``): ``0`` (CI) b=2, 16x32x32; ``1``: b=2, 64x128x128.
``NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_regions.py --benchmark-enable -p no:cacheprovider``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nnfast.data.transforms import deep_supervision_targets
from nnfast.labels import LabelManager
from nnfast.train.loss import DeepSupervisionLoss, DiceBCELoss, deep_supervision_weights

pytestmark = pytest.mark.compat

FULL = float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0) >= 1
PATCH = (64, 128, 128) if FULL else (16, 32, 32)
SCALES = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [0.125, 0.125, 0.125]]
LM = LabelManager({"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}, [1, 2, 3])
B = 2


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, p) for p in PATCH], indexing="ij")
    d = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)[None] + rng.normal(0, 0.05, (B, *PATCH))
    seg = np.select([d < 0.3, d < 0.5, d < 0.8], [2, 3, 1], 0).astype(np.int16)[:, None]  # (b, 1, *patch)
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn((B, 3, *(round(p * s[0]) for p in PATCH)), generator=g).requires_grad_(True)
              for s in SCALES]
    return seg, logits


def _nnfast(seg, logits, loss):
    targets = [np.empty((B, 3, *(round(p * s[0]) for p in PATCH)), np.int16) for s in SCALES]
    for j in range(B):
        for k, t in enumerate(deep_supervision_targets(seg[j], SCALES)):
            LM.region_targets(t[0], out=targets[k][j])
    for o in logits:
        o.grad = None
    loss(logits, [torch.from_numpy(t) for t in targets]).backward()


def _nnunet(seg, logits, loss, convert, down):
    per_sample = []
    for j in range(B):
        r = convert(segmentation=torch.from_numpy(seg[j]))["segmentation"]
        per_sample.append(down(segmentation=r)["segmentation"])
    targets = [torch.stack([s[k] for s in per_sample]) for k in range(len(SCALES))]  # the loader's collation
    for o in logits:
        o.grad = None
    loss(logits, targets).backward()


@pytest.mark.benchmark(group="region-targets-and-loss")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_region_targets_and_loss(benchmark, impl):
    seg, logits = _inputs()
    weights = deep_supervision_weights(len(SCALES))
    torch.set_num_threads(1)
    if impl == "nnunet":
        from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
        from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
        from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        regions = [list(r) if isinstance(r, tuple) else r for r in LM.foreground_regions]
        loss = DeepSupervisionWrapper(DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5,
                                                           "ddp": False}, use_ignore_label=False,
                                                      dice_class=MemoryEfficientSoftDiceLoss), weights)
        args = (seg, logits, loss, ConvertSegmentationToRegionsTransform(regions=regions, channel_in_seg=0),
                DownsampleSegForDSTransform(ds_scales=SCALES))
        benchmark.pedantic(_nnunet, args=args, rounds=5, warmup_rounds=1)
    else:
        loss = DeepSupervisionLoss(DiceBCELoss(batch_dice=True), weights)
        benchmark.pedantic(_nnfast, args=(seg, logits, loss), rounds=5, warmup_rounds=1)
