"""Training checkpoints: a torch state file plus a JSON sidecar, both written atomically.

Files in a fold folder (``<name>`` is ``checkpoint_latest``, ``checkpoint_best`` or ``checkpoint_final``):

- ``<name>.pt``: ``torch.save`` of a dict holding only tensors and plain containers (dict, list, str, int, float,
  bool, None), so it loads with ``torch.load(path, weights_only=True)`` (no pickled code runs). Keys:

  ``format`` (``"nnfast-checkpoint"``), ``schema_version``, ``network_weights`` (the plain module's state dict, the
  same keys as nnU-Net's ``network_weights``), ``optimizer_state``, ``grad_scaler_state`` (None without float16),
  ``lr_scheduler_state``, ``current_epoch`` (epochs completed = the next epoch to run, nnU-Net's convention),
  ``best_ema``, ``history`` (per-epoch logging lists, see :class:`~nnfast.train.progress.TrainingHistory`), ``rng``
  (torch CPU and CUDA generator states), ``loader`` (index of the next training / validation batch),
  ``train_config`` (:meth:`TrainConfig.to_json`), ``configuration``, ``fold``, ``plans_name``,
  ``inference_allowed_mirroring_axes``, ``num_input_channels``, ``num_classes``, ``nnfast_version``.

- ``<name>.json``: the human-readable part of the same information (everything above except tensors, optimizer
  and RNG states) plus the file name and save time, for tools that should not need torch.

The ``.pt`` file is written first, then the sidecar; each by a temporary name and ``os.replace``. A crash between
the two leaves a consistent ``.pt`` whose sidecar describes an older epoch; :func:`load_checkpoint` trusts the
``.pt`` and logs the mismatch.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import StoreError
from ..io.atomic import atomic_target, read_json, write_json_atomic
from ..layout import checkpoint_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_SCHEMA_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "find_resume_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "nnfast-checkpoint"
CHECKPOINT_SCHEMA_VERSION = 1
_NOT_IN_SIDECAR = ("network_weights", "optimizer_state", "grad_scaler_state", "lr_scheduler_state", "rng")


def _json_safe(obj: Any) -> Any:
    """Plain JSON values (NaN/inf become None)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    return obj


def save_checkpoint(path: Path | str, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` (``.pt``) and its sidecar (``.json``), atomically.

    ``payload`` must hold only tensors and plain containers (see the module docstring); the ``format`` and
    ``schema_version`` keys are added.
    """
    path = Path(path)
    data = {"format": CHECKPOINT_FORMAT, "schema_version": CHECKPOINT_SCHEMA_VERSION, **payload}
    with atomic_target(path) as tmp:
        torch.save(data, tmp)
    sidecar = {k: v for k, v in data.items() if k not in _NOT_IN_SIDECAR}
    sidecar.update(file=path.name, saved_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json_atomic(path.with_suffix(".json"), _json_safe(sidecar))


def load_checkpoint(path: Path | str, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises
    ------
    StoreError
        The file is missing, unreadable, or not an nnfast checkpoint of a supported version.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"checkpoint `{path}` does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, pickle of a foreign object, ...
        raise StoreError(f"checkpoint `{path}` cannot be read ({type(e).__name__}: {e}); delete it to start over "
                         "or resume from another checkpoint") from e
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(f"`{path}` is not an nnfast checkpoint (nnU-Net's .pth files are read by "
                         "nnfast's inference, not resumed by nnfast train)")
    if data.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
        raise StoreError(f"checkpoint `{path}` has schema version {data.get('schema_version')!r}; this nnfast "
                         f"reads version {CHECKPOINT_SCHEMA_VERSION}")
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            epoch = read_json(side).get("current_epoch")
        except (OSError, ValueError):
            epoch = None
        if epoch != data.get("current_epoch"):
            log.warning("%s describes epoch %s but %s holds epoch %s (interrupted save?); using the .pt file",
                        side.name, epoch, path.name, data.get("current_epoch"))
    return data


def find_resume_checkpoint(folder: Path | str) -> Path | None:
    """The checkpoint to resume from: ``checkpoint_final`` (training finished) > ``checkpoint_latest`` >
    ``checkpoint_best`` (nnU-Net's order); None if the folder has none."""
    for name in ("checkpoint_final", "checkpoint_latest", "checkpoint_best"):
        p = checkpoint_file(folder, name)
        if p.is_file():
            return p
    return None


def capture_rng_state() -> dict[str, Any]:
    """torch's global generator states: ``{"torch_cpu": ByteTensor, "torch_cuda": [ByteTensor per device]}``."""
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    else:
        state["torch_cuda"] = []
    return state


def restore_rng_state(state: Mapping[str, Any] | None) -> None:
    """Restore :func:`capture_rng_state` output (CUDA states only where the device count matches)."""
    if not state:
        return
    if state.get("torch_cpu") is not None:
        torch.set_rng_state(state["torch_cpu"].cpu())
    cuda = list(state.get("torch_cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("checkpoint holds %d CUDA generator states but %d devices are visible; CUDA generators "
                        "not restored", len(cuda), torch.cuda.device_count())
