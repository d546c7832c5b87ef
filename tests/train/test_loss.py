"""nnfast's Dice+CE and deep-supervision loss against nnU-Net v2's DC_and_CE_loss + DeepSupervisionWrapper."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from nnfast.train.loss import (DeepSupervisionLoss, DiceCELoss, SoftDiceLoss, build_loss, deep_supervision_scales,
                               deep_supervision_weights)


def _nnunet_loss(batch_dice, ignore_label=None):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def _nnunet_ds_weights(n):
    # nnUNetTrainer._build_loss, single process
    w = np.array([1 / (2 ** i) for i in range(n)])
    w[-1] = 0
    return w / w.sum()


def _random_batch(shape, n_classes, seed, absent=None, ignore_label=None, ignore_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], n_classes, *shape[1:]), generator=g) * 3
    target = torch.randint(0, n_classes, (shape[0], 1, *shape[1:]), generator=g)
    if absent is not None:
        target[target == absent] = 0
    if ignore_label is not None:
        ign = torch.rand(target.shape, generator=g) < ignore_fraction
        target[ign] = ignore_label
    return logits, target.float()  # nnU-Net's loader gives float targets


def _compare(ours, ref, logits, target):
    a_in = logits.clone().requires_grad_(True)
    b_in = logits.clone().requires_grad_(True)
    a = ours(a_in, target)
    b = ref(b_in, target)
    assert abs(a.item() - b.item()) < 1e-5, (a.item(), b.item())
    a.backward()
    b.backward()
    torch.testing.assert_close(a_in.grad, b_in.grad, rtol=1e-4, atol=1e-7)
    return a.item()


@pytest.mark.compat
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 9, 10), (3, 12, 11)], ids=["3d", "2d"])
def test_dice_ce_equals_nnunet(batch_dice, shape):
    logits, target = _random_batch(shape, 4, seed=len(shape) + batch_dice)
    _compare(DiceCELoss(batch_dice=batch_dice), _nnunet_loss(batch_dice), logits, target)


@pytest.mark.compat
@pytest.mark.parametrize("batch_dice", [False, True])
def test_absent_class_equals_nnunet(batch_dice):
    # class 2 never occurs in the target; also one sample that is all background
    logits, target = _random_batch((2, 6, 7, 8), 3, seed=5, absent=2)
    target[1] = 0
    v = _compare(DiceCELoss(batch_dice=batch_dice), _nnunet_loss(batch_dice), logits, target)
    assert np.isfinite(v)


@pytest.mark.compat
@pytest.mark.parametrize("batch_dice", [False, True])
def test_ignore_label_equals_nnunet(batch_dice):
    # 3 real classes, ignore label 3 (nnU-Net puts the ignore label after the real ones)
    logits, target = _random_batch((2, 6, 7, 8), 3, seed=7, ignore_label=3)
    v = _compare(DiceCELoss(batch_dice=batch_dice, ignore_label=3), _nnunet_loss(batch_dice, ignore_label=3),
                 logits, target)
    # the ignored voxels really are ignored: changing logits there changes nothing
    logits2 = logits.clone()
    logits2[(target == 3).expand_as(logits2)] = 100.0
    assert abs(DiceCELoss(batch_dice=batch_dice, ignore_label=3)(logits2, target).item() - v) < 1e-5


@pytest.mark.compat
def test_everything_ignored_equals_nnunet():
    logits, target = _random_batch((2, 5, 6), 3, seed=9)
    target[:] = 3
    ours = DiceCELoss(batch_dice=True, ignore_label=3)(logits, target)
    ref = _nnunet_loss(True, ignore_label=3)(logits, target)
    assert torch.isfinite(ours) and abs(ours.item() - float(ref)) < 1e-6


@pytest.mark.compat
@pytest.mark.parametrize("batch_dice", [False, True])
def test_soft_dice_against_nnunet_memory_efficient_dice(batch_dice):
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    logits, target = _random_batch((2, 5, 6, 7), 3, seed=11)
    for do_bg, ddp in ((False, False), (True, False), (False, True)):
        ref = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice, do_bg=do_bg,
                                          smooth=1e-5, ddp=False)
        # ddp=True without a process group is a single-process loss (nnU-Net's would fail there)
        ours = SoftDiceLoss(batch_dice=batch_dice, do_bg=do_bg, ddp=ddp)
        _compare(ours, ref, logits, target)
        # a one-hot target of the input's shape is accepted like nnU-Net does
        onehot = torch.nn.functional.one_hot(target[:, 0].long(), 3).movedim(-1, 1).float()
        _compare(ours, ref, logits, onehot)
        # (b, *spatial) label maps too
        _compare(ours, ref, logits, target[:, 0])


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_ddp_without_process_group_equals_single_process(batch_dice, ignore_label):
    assert not torch.distributed.is_initialized()
    logits, target = _random_batch((2, 5, 6, 7), 3, seed=13, ignore_label=ignore_label)
    makers = [lambda ddp: DiceCELoss(batch_dice=batch_dice, ignore_label=ignore_label, ddp=ddp)]
    if ignore_label is None:
        makers.append(lambda ddp: SoftDiceLoss(batch_dice=batch_dice, ddp=ddp))
    for make in makers:
        a_in = logits.clone().requires_grad_(True)
        b_in = logits.clone().requires_grad_(True)
        a, b = make(True)(a_in, target), make(False)(b_in, target)
        a.backward()
        b.backward()
        assert a.item() == b.item()
        assert torch.equal(a_in.grad, b_in.grad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.compat
def test_ddp_batch_dice_gathers_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as tmp_mp

    from train._ddp_loss_worker import IGNORE_LABEL, ddp_dice, fixed_batch, share, with_ignore

    world = 2
    tmp_mp.spawn(ddp_dice, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    def single(loss, logits, target):
        x = logits.clone().requires_grad_(True)
        v = loss(x, target)
        v.backward()
        return v.item(), x.grad

    def close(a, b):  # gradients per voxel are ~1e-4 here
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)

    logits, target = fixed_batch(4)
    whole, whole_grad = single(SoftDiceLoss(batch_dice=True), logits, target)
    for r in range(world):
        half = share(4, world, r)
        value, grad = res[r]["dice_bd1"]
        ref_value, ref_grad = res[r]["dice_bd1_nnunet"]
        # every rank's loss is the batch Dice of the global batch ...
        assert abs(value.item() - whole) < 1e-6 and abs(ref_value.item() - whole) < 1e-6
        # ... and its share gets nnU-Net's gradient: world_size times the single-process one (DDP averages it back)
        close(grad, ref_grad)
        close(grad, world * whole_grad[half])
        # without batch_dice, ddp changes nothing: per-rank Dice of the rank's own samples, as nnU-Net's
        value, grad = res[r]["dice_bd0"]
        ref_value, ref_grad = res[r]["dice_bd0_nnunet"]
        own, own_grad = single(SoftDiceLoss(batch_dice=False), logits[half], target[half])
        assert value.item() == own and abs(ref_value.item() - own) < 1e-6
        assert torch.equal(grad, own_grad)
        close(grad, ref_grad)
        # the trainer's Dice + CE with an ignore label (masked, gathered Dice terms; CE per rank) equals nnU-Net's
        value, grad = res[r]["dice_ce_ignore"]
        ref_value, ref_grad = res[r]["dice_ce_ignore_nnunet"]
        assert abs(value.item() - ref_value.item()) < 1e-6
        close(grad, ref_grad)
    assert res[0]["dice_ce_ignore"][0].item() != res[1]["dice_ce_ignore"][0].item()  # the CE terms do differ
    target_ign = with_ignore(target)
    mask = target_ign != IGNORE_LABEL
    whole_masked = SoftDiceLoss(batch_dice=True)(logits, torch.where(mask, target_ign, 0), loss_mask=mask).item()
    ce = [torch.nn.functional.cross_entropy(logits[share(4, world, r)], target_ign[share(4, world, r), 0].long(),
                                            ignore_index=IGNORE_LABEL).item() for r in range(world)]
    for r in range(world):
        assert abs(res[r]["dice_ce_ignore"][0].item() - (ce[r] + whole_masked)) < 1e-5
    # an odd global batch dealt 2 + 1 over the ranks (nnU-Net's own gather needs equal batch sizes)
    logits3, target3 = fixed_batch(3)
    whole3, whole3_grad = single(SoftDiceLoss(batch_dice=True), logits3, target3)
    for r in range(world):
        value, grad = res[r]["dice_uneven"]
        assert abs(value.item() - whole3) < 1e-6
        close(grad, world * whole3_grad[share(3, world, r)])


def test_soft_dice_perfect_and_worst_prediction():
    target = torch.zeros((1, 1, 4, 4))
    target[..., :2, :] = 1
    perfect = torch.cat([(target == 0).float(), (target == 1).float()], 1) * 50
    assert abs(SoftDiceLoss()(perfect, target).item() + 1) < 1e-6
    assert abs(SoftDiceLoss()(-perfect, target).item()) < 1e-5


@pytest.mark.compat
@pytest.mark.parametrize("batch_dice", [False, True])
def test_deep_supervision_equals_nnunet(batch_dice):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    scales = deep_supervision_scales(strides)
    patch = np.array([8, 16, 16])
    outputs, targets = [], []
    for i, s in enumerate(scales):
        size = (patch * np.asarray(s)).astype(int)
        lo, ta = _random_batch((2, *size), 3, seed=20 + i)
        outputs.append(lo)
        targets.append(ta)
    ref = DeepSupervisionWrapper(_nnunet_loss(batch_dice), _nnunet_ds_weights(len(scales)))
    ours = DeepSupervisionLoss(DiceCELoss(batch_dice=batch_dice), deep_supervision_weights(len(scales)))
    a_in = [o.clone().requires_grad_(True) for o in outputs]
    b_in = [o.clone().requires_grad_(True) for o in outputs]
    a, b = ours(a_in, targets), ref(b_in, targets)
    assert abs(a.item() - b.item()) < 1e-5
    a.backward()
    b.backward()
    for x, y in zip(a_in[:-1], b_in[:-1]):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)
    assert a_in[-1].grad is None and b_in[-1].grad is None  # lowest resolution output not used


def test_deep_supervision_scales_and_weights_match_nnunet_rules():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    ref = list(list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0))[:-1]
    assert deep_supervision_scales(strides) == [[float(v) for v in r] for r in ref]
    assert deep_supervision_scales(strides)[0] == [1.0, 1.0, 1.0]
    assert len(deep_supervision_scales(strides)) == 5
    np.testing.assert_allclose(deep_supervision_weights(5), [0.5333333, 0.2666667, 0.1333333, 0.0666667, 0],
                               atol=1e-6)
    np.testing.assert_allclose(deep_supervision_weights(5), _nnunet_ds_weights(5), rtol=0, atol=0)
    w = deep_supervision_weights(4, lowest_weight=1e-6)
    assert w[-1] > 0 and abs(sum(w) - 1) < 1e-12
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_deep_supervision_loss_input_errors():
    ds = DeepSupervisionLoss(DiceCELoss(), [0.75, 0.25])
    x, t = _random_batch((1, 4, 4), 2, seed=1)
    with pytest.raises(TypeError, match="lists"):
        ds(x, t)
    with pytest.raises(ValueError, match="expects 2"):
        ds([x], [t])
    with pytest.raises(ValueError):
        DeepSupervisionLoss(DiceCELoss(), [0.0, 0.0])


def test_build_loss_from_plan():
    from train._plans import synthetic_plans

    conf = synthetic_plans((3.0, 0.8, 0.8), (40, 200, 200)).configuration("3d_fullres")
    loss = build_loss(conf, ignore_label=None, deep_supervision=True)
    assert isinstance(loss, DeepSupervisionLoss)
    assert len(loss.weights) == conf.architecture.n_stages - 1 and loss.weights[-1] == 0
    assert loss.loss.dc.batch_dice == conf.batch_dice and loss.loss.dc.ddp is False
    flat = build_loss(conf, ignore_label=4, deep_supervision=False)
    assert isinstance(flat, DiceCELoss) and flat.ignore_label == 4
    assert build_loss(conf, deep_supervision=True, ddp=True).loss.dc.ddp is True
    assert build_loss(conf, deep_supervision=False, ddp=True).dc.ddp is True
