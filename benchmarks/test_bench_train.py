"""Training building blocks: nnfast vs nnU-Net v2 on the same tensors (CPU here; the same code runs on CUDA).

- ``loss``: Dice + CE with deep supervision, forward + backward (nnU-Net: ``DeepSupervisionWrapper(DC_and_CE_loss(...,
  MemoryEfficientSoftDiceLoss))``; nnfast: ``build_loss`` equivalent). nnfast builds the one-hot target as a bool
  comparison instead of a float32 scatter and computes CE without a host synchronisation.
- ``val_counts``: pseudo-Dice TP/FP/FN of one validation batch (nnU-Net: float16 one-hot + ``get_tp_fp_fn_tn``;
  nnfast: one ``bincount`` confusion matrix).
- ``network``: PlainConvUNet forward + backward (same module tree and operations: expected ratio ~1);
  ``network-resenc``: the same for ResidualEncoderUNet (blocks 1/3/4/6, as the ResEnc presets start).

Sizes (``NNFAST_BENCH_SCALE``): ``0`` (default, CI) tiny 3D patches (b=2, 3 classes, 16x32x32, network features 4..16);
``1``: b=2, 3 classes, 64x128x128 logits (the loss/val count work of a 3d_fullres batch at half the default patch
edge), network b=2 at 32x64x64 with features 8..64.

``NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_train.py --benchmark-enable -p no:cacheprovider`` and compare the
means within each group.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from nnfast.network import PlainConvUNet
from nnfast.plan.schema import Architecture
from nnfast.train.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from nnfast.train.step import validation_step

pytestmark = pytest.mark.compat

FULL = float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0) >= 1
PATCH = (64, 128, 128) if FULL else (16, 32, 32)
NET_PATCH = (32, 64, 64) if FULL else (16, 32, 32)
FEATURES = (8, 16, 32, 64) if FULL else (4, 8, 16, 16)
N_CLASSES = 3


def _ds_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    outs, tgts = [], []
    for k in (1, 2, 4, 8):
        size = [p // k for p in PATCH]
        outs.append(torch.randn((2, N_CLASSES, *size), generator=g).requires_grad_(True))
        tgts.append(torch.randint(0, N_CLASSES, (2, 1, *size), generator=g).float())
    return outs, tgts


def _run_loss(loss, outs, tgts):
    for o in outs:
        o.grad = None
    loss(outs, tgts).backward()


@pytest.mark.benchmark(group="train-loss")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_loss(benchmark, impl):
    outs, tgts = _ds_batch()
    weights = deep_supervision_weights(len(outs))
    if impl == "nnunet":
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False,
                                                      "ddp": False}, {}, dice_class=MemoryEfficientSoftDiceLoss),
                                      weights)
    else:
        loss = DeepSupervisionLoss(DiceCELoss(batch_dice=True), weights)
    benchmark.pedantic(_run_loss, args=(loss, outs, tgts), rounds=5, warmup_rounds=1)


def _nnunet_counts(output, target):
    from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

    seg = output.argmax(1)[:, None]
    onehot = torch.zeros(output.shape, dtype=torch.float16)
    onehot.scatter_(1, seg, 1)
    tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=[0, 2, 3, 4])
    return tp[1:], fp[1:], fn[1:]


class _Identity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x


@pytest.mark.benchmark(group="train-val-counts")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_validation_counts(benchmark, impl):
    outs, tgts = _ds_batch(1)
    output, target = outs[0].detach(), tgts[0]
    if impl == "nnunet":
        res = benchmark.pedantic(_nnunet_counts, args=(output, target), rounds=5, warmup_rounds=1)
        tp = res[0].numpy()
    else:
        zero = lambda o, t: torch.zeros(())  # noqa: E731 - counts only
        res = benchmark.pedantic(validation_step, args=(_Identity(), {"data": output, "target": target}, zero),
                                 rounds=5, warmup_rounds=1)
        tp = res.tp.numpy()
    ref = _nnunet_counts(output, target)[0].numpy()
    np.testing.assert_array_equal(tp, ref)


@pytest.mark.benchmark(group="train-network")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_network(benchmark, impl):
    arch = Architecture(n_stages=4, features_per_stage=FEATURES, kernel_sizes=((3, 3, 3),) * 4,
                        strides=((1, 1, 1),) + ((2, 2, 2),) * 3, n_conv_per_stage=(2,) * 4,
                        n_conv_per_stage_decoder=(2,) * 3)
    torch.manual_seed(0)
    if impl == "nnunet":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet as Ref

        net = Ref(1, 4, list(FEATURES), torch.nn.Conv3d, [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [2] * 4,
                  N_CLASSES, [2] * 3, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                  torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)
    else:
        net = PlainConvUNet(arch, 1, N_CLASSES, deep_supervision=True)
    x = torch.randn((2, 1, *NET_PATCH))

    def run():
        net.zero_grad(set_to_none=True)
        sum(o.mean() for o in net(x)).backward()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="train-network-resenc")
@pytest.mark.parametrize("impl", ["nnunet", "nnfast"])
def test_bench_network_resenc(benchmark, impl):
    """ResidualEncoderUNet (nnU-Net's ResEnc presets) forward + backward: nnfast's module tree vs
    dynamic-network-architectures' on the same input (same operations: expected ratio ~1)."""
    blocks = (1, 3, 4, 6)
    arch = Architecture(n_stages=4, features_per_stage=FEATURES, kernel_sizes=((3, 3, 3),) * 4,
                        strides=((1, 1, 1),) + ((2, 2, 2),) * 3, n_conv_per_stage=blocks,
                        n_conv_per_stage_decoder=(1,) * 3, network_class="ResidualEncoderUNet")
    torch.manual_seed(0)
    if impl == "nnunet":
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet as Ref

        net = Ref(1, 4, list(FEATURES), torch.nn.Conv3d, [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3,
                  list(blocks), N_CLASSES, [1] * 3, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                  None, None, torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)
    else:
        from nnfast.network_residual import ResidualEncoderUNet

        net = ResidualEncoderUNet(arch, 1, N_CLASSES, deep_supervision=True)
    x = torch.randn((2, 1, *NET_PATCH))

    def run():
        net.zero_grad(set_to_none=True)
        sum(o.mean() for o in net(x)).backward()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
