"""Entry point of the processes of the DDP batch-Dice test (``torch.multiprocessing.spawn`` imports it by name).

Every rank builds the same fixed global batch (:func:`fixed_batch`), takes its share of the samples, runs nnfast's and
nnU-Net's losses with ``ddp=True`` inside a gloo process group, and saves each loss value and the gradient of its
share of the logits, after all ranks' backward, to ``rank{r}.pt``. The test compares them in the parent.
"""
from __future__ import annotations

from pathlib import Path

N_CLASSES = 3
IGNORE_LABEL = 3


def fixed_batch(batch: int, seed: int = 3):
    """Logits ``(batch, 3, 5, 6, 7)`` float32 and float label maps ``(batch, 1, 5, 6, 7)`` in ``[0, 3)``, the same in
    every process; sample 1 has no class 2 (an absent class in a rank's share)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, N_CLASSES, 5, 6, 7), generator=g) * 3
    target = torch.randint(0, N_CLASSES, (batch, 1, 5, 6, 7), generator=g)
    target[1][target[1] == 2] = 0
    return logits, target.float()


def with_ignore(target, seed: int = 4):
    """``target`` with about a fifth of its voxels set to :data:`IGNORE_LABEL`, the same in every process."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = target.clone()
    out[torch.rand(out.shape, generator=g) < 0.2] = IGNORE_LABEL
    return out


def share(batch: int, world: int, rank: int) -> slice:
    """Samples of ``rank``: the first ``batch % world`` ranks get one more (as ``nnfast.train.ddp.split_batch``)."""
    sizes = [batch // world + (1 if i < batch % world else 0) for i in range(world)]
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def _run(loss, logits, target):
    x = logits.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()  # a collective when the loss gathers: every rank runs it
    return value.detach(), x.grad


def ddp_dice(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    from nnfast.train.loss import DiceCELoss, SoftDiceLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {}
        even = share(4, world, rank)
        logits, target = fixed_batch(4)
        logits, target = logits[even], target[even]
        for batch_dice in (True, False):
            ours = SoftDiceLoss(batch_dice=batch_dice, ddp=True)
            ref = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice, do_bg=False,
                                              smooth=1e-5, ddp=True)
            res[f"dice_bd{int(batch_dice)}"] = _run(ours, logits, target)
            res[f"dice_bd{int(batch_dice)}_nnunet"] = _run(ref, logits, target)
        # the trainer's loss with an ignore label (masked Dice terms) against nnU-Net's DC_and_CE_loss
        target_ign = with_ignore(fixed_batch(4)[1])[even]
        ref = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": True}, {}, weight_ce=1,
                             weight_dice=1, ignore_label=IGNORE_LABEL, dice_class=MemoryEfficientSoftDiceLoss)
        res["dice_ce_ignore"] = _run(DiceCELoss(batch_dice=True, ignore_label=IGNORE_LABEL, ddp=True), logits,
                                     target_ign)
        res["dice_ce_ignore_nnunet"] = _run(ref, logits, target_ign)
        # an odd global batch dealt unevenly (2 + 1): nnfast only (nnU-Net's gather needs equal shapes)
        logits3, target3 = fixed_batch(3)
        uneven = share(3, world, rank)
        res["dice_uneven"] = _run(SoftDiceLoss(batch_dice=True, ddp=True), logits3[uneven], target3[uneven])
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
