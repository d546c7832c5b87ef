"""Multi-GPU (and multi-process CPU) training with ``torch.distributed``: nnU-Net v2's DDP rules.

Start one process per GPU with ``torchrun --nproc_per_node N -m nnfast train ...`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``). :func:`DistContext.setup` joins the
process group (NCCL on CUDA, gloo on CPU) unless the caller already did.

What is distributed, as in nnU-Net (``nnUNetTrainer._set_batch_size_and_oversample``, ``on_validation_epoch_end``):

- the plan's batch size is the *global* batch size, split over the ranks (:func:`split_batch`); each rank's share of
  foreground-oversampled samples is recomputed so that the global batch keeps nnU-Net's pattern;
- gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`, so the weights stay identical on
  every rank;
- training losses, validation losses and pseudo-Dice counts are reduced over the ranks before logging;
- with ``batch_dice``, the Dice terms (intersection, predicted and reference sizes) are all-gathered across the ranks
  inside the loss (:class:`AllGatherGrad`, used by :class:`~nnfast.train.loss.SoftDiceLoss` with ``ddp=True``), so
  that every rank's Dice is that of the global batch (nnU-Net's ``MemoryEfficientSoftDiceLoss(ddp=True)``). The
  loss therefore runs collectives: every rank must call it equally often;
- only rank 0 writes logs, plots and checkpoints.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SettingsError

__all__ = ["DistContext", "split_batch", "all_reduce_sum", "AllGatherGrad", "is_distributed"]

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands in a distributed run.

    Attributes
    ----------
    rank, world_size, local_rank : int
        0, 1, 0 for a single-process run.
    owns_group : bool
        This context initialised the process group (and :meth:`teardown` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_type: str) -> "DistContext":
        """The context of this process: an existing process group, one described by the ``torchrun`` environment
        (joined here, NCCL for ``device_type == "cuda"``, gloo otherwise), or a single process.

        Raises
        ------
        SettingsError
            ``WORLD_SIZE`` > 1 but the rendezvous variables are missing or torch has no distributed support.
        """
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", rank))
            return cls(rank=rank, world_size=world, local_rank=local, owns_group=False)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise SettingsError("WORLD_SIZE > 1 asks for distributed training, but this torch build has no "
                                "torch.distributed support")
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise SettingsError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: start multi-GPU training "
                                "with `torchrun --nproc_per_node N -m nnfast train ...`")
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        log.info("joined the %s process group as rank %d of %d (local rank %d)", backend, rank, world, local)
        return cls(rank=rank, world_size=world, local_rank=local, owns_group=True)

    def barrier(self) -> None:
        if self.is_ddp:
            dist.barrier()

    def teardown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def split_batch(global_batch_size: int, world_size: int, rank: int,
                oversample_foreground_percent: float) -> tuple[int, float]:
    """This rank's batch size and foreground-oversampling share (nnU-Net's ``_set_batch_size_and_oversample``).

    The global batch is dealt out as evenly as possible (the first ``global % world`` ranks get one sample more).
    nnU-Net's loader forces foreground in samples ``j >= round(bs * (1 - p))`` of a batch; the rank that holds global
    samples ``[lo, hi)`` gets 0 when its whole slice lies before that boundary, 1 when after it, else the fraction of
    its slice that the global pattern oversamples.

    Raises
    ------
    SettingsError
        If the global batch is smaller than the number of ranks.
    """
    gbs, world = int(global_batch_size), int(world_size)
    if world <= 1:
        return gbs, float(oversample_foreground_percent)
    if gbs < world:
        raise SettingsError(f"the batch size ({gbs}) is smaller than the number of processes ({world}); every rank "
                            "needs at least one sample: raise the batch size or use fewer GPUs")
    sizes = [gbs // world + (1 if (gbs // world) * world + i < gbs else 0) for i in range(world)]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    boundary = 1 - float(oversample_foreground_percent)
    forced = [not j < round(gbs * boundary) for j in range(gbs)]
    if hi / gbs < boundary:
        share = 0.0
    elif lo / gbs > boundary:
        share = 1.0
    else:
        share = sum(forced[lo:hi]) / sizes[rank]
    return sizes[rank], float(share)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over all ranks (in place; ``t`` itself when not distributed)."""
    if ctx.is_ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def is_distributed() -> bool:
    """A ``torch.distributed`` process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AllGatherGrad(torch.autograd.Function):
    """All-gather with a gradient (nnU-Net's ``nnunetv2.utilities.ddp_allgather.AllGatherGrad``).

    ``AllGatherGrad.apply(t)`` returns the ``t`` of every rank stacked in rank order, shape ``(world_size, *t.shape)``
    (same dtype and device as ``t``). ``t`` must have the same shape and dtype on every rank, and every rank must
    call it (it is a collective).

    Backward: the incoming gradient ``(world_size, *t.shape)`` is summed over the ranks (``all_reduce`` SUM) and this
    rank's slice is returned. If each rank's loss is ``L_r(gathered)``, rank ``r``'s ``t`` thus receives
    ``sum_s dL_s / dt_r``; with every rank computing the same global quantity this is ``world_size`` times the
    single-process gradient, which DistributedDataParallel's gradient averaging divides back out. The backward is a
    collective too: every rank must run it.

    Raises
    ------
    RuntimeError
        From ``torch.distributed`` when no process group is initialised.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: "dist.ProcessGroup | None" = None) -> torch.Tensor:
        ctx.group = group
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor.contiguous(), group=group)
        return torch.stack(gathered, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # a copy: the incoming gradient may be an expanded (stride-0) view or shared with another node
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None
