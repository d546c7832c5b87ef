"""Entry point of the processes of the DDP test (``torch.multiprocessing.spawn`` imports it by name)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def ddp_train(rank: int, world: int, port: int, roots: dict, task: int, config: str, cfg_json: dict,
              out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from nnfast.settings import Settings
    from nnfast.train.config import TrainConfig
    from nnfast.train.trainer import train

    settings = Settings(**{k: Path(v) for k, v in roots.items()})
    # the trainer joins the gloo group itself from the torchrun-style environment and leaves it at the end
    res = train(task, settings, config, 0, TrainConfig.from_json(cfg_json), device="cpu", num_workers=0)
    assert not dist.is_initialized()
    torch.save({k: v.detach().clone() for k, v in res.network.state_dict().items()},
               Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"train_losses": res.history.data["train_losses"], "mean_fg_dice": res.history.data["mean_fg_dice"],
         "epochs": res.epochs_completed, "world_size": res.world_size}))
