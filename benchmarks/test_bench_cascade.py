"""The cascade's transforms of the previous stage's channels, per sample: batchgeneratorsv2 0.3.6 as nnU-Net v2.8.1
composes them (``MoveSegAsOneHotToDataTransform``, ``ApplyRandomBinaryOperatorTransform``,
``RemoveRandomConnectedComponentFromOneHotEncodingTransform``) vs nnfast's (:mod:`nnfast.data.cascade`), one thread.

Input: a 3-label previous-stage segmentation of blobs (large organ-like and small lesion-like) in a 128^3 patch
(``NNFAST_BENCH_SCALE=1``; the default 0 uses 32^3 so CI runs it in seconds with ``--benchmark-disable``). Modes:

* ``nnunet_p``: nnU-Net's probabilities (binary operator p 0.4, component removal p 0.2, each label p 0.5), so the
  mean is the expected cost per sample;
* ``forced``: both transforms on every label of every sample (p 1), the worst case.

Each round draws fresh random parameters in both pipelines (operator, radius U(1, 8), component). Run::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_cascade.py --benchmark-enable \
        --benchmark-timer=time.process_time --benchmark-columns=mean,median,rounds --benchmark-group-by=group
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench_utils import full_size
from nnfast.data.augment_params import AugmentConfig
from nnfast.data.cascade import augment_onehot, onehot_into, sample_cascade

LABELS = (1, 2, 3)
MODES = ("nnunet_p", "forced")


def _patch() -> tuple[int, int, int]:
    return (128, 128, 128) if full_size() else (32, 32, 32)


def _segmentation(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    seg = np.zeros(shape, np.int16)
    n = shape[0]
    for lab, count, lo, hi in ((1, 2, 0.2, 0.35), (2, 4, 0.05, 0.12), (3, 8, 0.02, 0.05)):
        for _ in range(count):
            c = rng.uniform(0, n, 3)
            r = rng.uniform(lo, hi) * n
            seg[sum((gi - ci) ** 2 for gi, ci in zip(g, c)) < r * r] = lab
    return seg


def _cfg(mode: str) -> AugmentConfig:
    over = {}
    if mode == "forced":
        over = dict(p_binary_operator=1.0, binary_operator_p_per_label=1.0, p_remove_component=1.0,
                    remove_component_p_per_label=1.0)
    return AugmentConfig.from_patch_size(_patch(), **over)


def _nnunet_transforms(cfg: AugmentConfig):
    from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
    from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
        RemoveRandomConnectedComponentFromOneHotEncodingTransform
    from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    ch = list(range(-len(LABELS), 0))
    return ComposeTransforms([
        MoveSegAsOneHotToDataTransform(source_channel_idx=1, all_labels=LABELS, remove_channel_from_source=True),
        RandomTransform(ApplyRandomBinaryOperatorTransform(channel_idx=ch, strel_size=cfg.strel_size,
                                                           p_per_label=cfg.binary_operator_p_per_label),
                        apply_probability=cfg.p_binary_operator),
        RandomTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform(
            channel_idx=ch, fill_with_other_class_p=0,
            dont_do_if_covers_more_than_x_percent=cfg.remove_component_max_fraction,
            p_per_label=cfg.remove_component_p_per_label), apply_probability=cfg.p_remove_component),
    ])


@pytest.mark.compat
@pytest.mark.parametrize("mode", MODES)
def test_bench_cascade_nnunet(benchmark, mode):
    pytest.importorskip("batchgeneratorsv2")
    torch.set_num_threads(1)
    cfg = _cfg(mode)
    tr = _nnunet_transforms(cfg)
    seg = _segmentation(_patch())
    image = torch.zeros((1, *_patch()))
    both = torch.from_numpy(np.stack([seg, seg]))
    np.random.seed(0)
    torch.manual_seed(0)
    benchmark.group = f"cascade {mode}"
    out = benchmark(lambda: tr(image=image.clone(), segmentation=both.clone()))
    assert out["image"].shape == (1 + len(LABELS), *_patch())


@pytest.mark.parametrize("mode", MODES)
def test_bench_cascade_nnfast(benchmark, mode):
    cfg = _cfg(mode)
    seg = _segmentation(_patch())
    out = np.empty((len(LABELS), *_patch()), np.float32)
    rng = np.random.default_rng(0)
    augment_onehot(onehot_into(seg, LABELS, out), sample_cascade(rng, cfg, len(LABELS)), rng, cfg)  # compile

    def run():
        onehot_into(seg, LABELS, out)
        augment_onehot(out, sample_cascade(rng, cfg, len(LABELS)), rng, cfg)
        return out

    benchmark.group = f"cascade {mode}"
    res = benchmark(run)
    assert res.shape == (len(LABELS), *_patch()) and res.sum(0).max() <= 1
