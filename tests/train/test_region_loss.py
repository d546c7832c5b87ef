"""Region training's loss and pseudo-Dice against nnU-Net's (``DC_and_BCE_loss`` as ``nnUNetTrainer._build_loss``
configures it for regions; ``validation_step``'s sigmoid > 0.5 counts)."""
from __future__ import annotations

import pytest
import torch

from nnfast.train.loss import DeepSupervisionLoss, DiceBCELoss, deep_supervision_weights
from nnfast.train.step import validation_step


def _nnunet_loss(batch_dice: bool, use_ignore: bool):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=use_ignore, dice_class=MemoryEfficientSoftDiceLoss)


def _batch(shape, n_regions, seed, ignore=False, dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], n_regions, *shape[1:]), generator=g) * 3
    seg = torch.randint(0, 4, (shape[0], *shape[1:]), generator=g)  # labels 0..3, nested regions
    chans = [seg >= 1, seg >= 2, seg == 3]
    if ignore:
        chans.append(torch.rand(seg.shape, generator=g) < 0.2)
    return logits, torch.stack(chans[:n_regions] + chans[3:], 1).to(dtype)


@pytest.mark.compat
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore"])
@pytest.mark.parametrize("shape", [(2, 8, 9, 10), (3, 12, 11)], ids=["3d", "2d"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int16], ids=["bool", "int16"])
def test_dice_bce_equals_nnunet(batch_dice, ignore, shape, dtype):
    logits, target = _batch(shape, 3, seed=len(shape) + 2 * batch_dice + ignore, ignore=ignore, dtype=dtype)
    a_in, b_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    a = DiceBCELoss(batch_dice=batch_dice, use_ignore_label=ignore)(a_in, target)
    b = _nnunet_loss(batch_dice, ignore)(b_in, target if dtype == torch.bool else target.float())
    assert abs(a.item() - b.item()) < 1e-5, (a.item(), b.item())
    a.backward()
    b.backward()
    torch.testing.assert_close(a_in.grad, b_in.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.compat
def test_deep_supervision_region_loss_equals_nnunet():
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    w = deep_supervision_weights(3)
    outs, tgts = zip(*[_batch((2, s, s, s), 3, seed=s, ignore=True) for s in (8, 4, 2)])
    ours = DeepSupervisionLoss(DiceBCELoss(True, True), w)(list(outs), list(tgts))
    theirs = DeepSupervisionWrapper(_nnunet_loss(True, True), w)(list(outs), list(tgts))
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_region_loss_rejects_label_maps():
    logits, target = _batch((2, 4, 4, 4), 3, seed=0)
    with pytest.raises(ValueError, match=r"needs region targets of shape \(b, 3, \*spatial\)"):
        DiceBCELoss()(logits, target[:, :1])


@pytest.mark.compat
@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore"])
def test_region_pseudo_dice_counts_equal_nnunet(ignore):
    """nnU-Net's ``validation_step`` for regions: ``sigmoid > 0.5`` per channel, ``get_tp_fp_fn_tn`` with the
    ignore mask, no background channel to drop."""
    from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

    logits, target = _batch((2, 6, 7, 8), 3, seed=5, ignore=ignore)
    net = torch.nn.Identity()
    net.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))  # the step reads the device from parameters
    r = validation_step(net, {"data": logits, "target": target}, DiceBCELoss(use_ignore_label=ignore),
                        ignore_label=4 if ignore else None, regions=True)
    pred = (torch.sigmoid(logits) > 0.5).long()
    mask = (~target[:, -1:]).float() if ignore else None
    ref = target[:, :-1] if ignore else target
    tp, fp, fn, _ = get_tp_fp_fn_tn(pred, ref.long(), axes=[0, 2, 3, 4], mask=mask)
    assert r.tp.tolist() == tp.long().tolist() and r.fp.tolist() == fp.long().tolist()
    assert r.fn.tolist() == fn.long().tolist() and len(r.tp) == 3
