"""Data roots and dataset resolution, decided when a command runs (never at import time).

Precedence per root: explicit argument (CLI flag) > ``NNFAST_RAW``/``NNFAST_PREPROCESSED``/``NNFAST_RESULTS`` >
nnU-Net's ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``, so nnU-Net users can switch without moving data.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from .errors import DatasetNotFoundError, SettingsError

__all__ = ["Settings", "resolve_settings", "parse_task", "find_dataset_folder", "dataset_folder_name"]

Root = Literal["raw", "preprocessed", "results"]

_ENV = {
    "raw": ("NNFAST_RAW", "nnUNet_raw"),
    "preprocessed": ("NNFAST_PREPROCESSED", "nnUNet_preprocessed"),
    "results": ("NNFAST_RESULTS", "nnUNet_results"),
}


@dataclass(frozen=True)
class Settings:
    """Resolved data roots (``None`` where nothing was set)."""

    raw: Path | None = None
    preprocessed: Path | None = None
    results: Path | None = None

    def require(self, root: Root) -> Path:
        """The root folder ``root``; raises :class:`SettingsError` saying how to set it when missing."""
        value = getattr(self, root)
        if value is None:
            ours, theirs = _ENV[root]
            raise SettingsError(
                f"the {root} data folder is not set: pass --{root} PATH, or set the environment variable {ours} "
                f"(nnU-Net's {theirs} is read too), e.g. `export {ours}=/data/nnfast_{root}`"
            )
        return value


def resolve_settings(
    raw: str | os.PathLike | None = None,
    preprocessed: str | os.PathLike | None = None,
    results: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve the three data roots from arguments and the environment."""
    env = os.environ if env is None else env
    given = {"raw": raw, "preprocessed": preprocessed, "results": results}
    out: dict[str, Path | None] = {}
    for root, value in given.items():
        if value is None:
            for var in _ENV[root]:
                if env.get(var):
                    value = env[var]
                    break
        out[root] = Path(value).expanduser().resolve() if value else None
    return Settings(**out)


_TASK_RE = re.compile(r"^(?:(?:Task|Dataset)(\d+)(?:_(.+))?|(\d+))$")


def parse_task(task: str | int) -> tuple[int, str | None]:
    """Parse ``7``, ``"007"``, ``"Task007_Pancreas"`` or ``"Dataset007_Pancreas"`` into ``(7, name or None)``."""
    m = _TASK_RE.match(str(task).strip())
    if not m:
        raise DatasetNotFoundError(
            f"cannot understand task {task!r}: expected an id such as 7 or 007, or a folder name such as "
            "Dataset007_Pancreas or Task007_Pancreas"
        )
    number = m.group(1) or m.group(3)
    return int(number), m.group(2)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net v2's folder name ``Dataset{id:03d}_{name}``."""
    return f"Dataset{dataset_id:03d}_{name}"


def find_dataset_folder(task: str | int, root: Path) -> Path:
    """Find the dataset folder for ``task`` under ``root`` (a raw/preprocessed/results root).

    Matches ``Dataset{id:03d}_*`` (and, for unconverted Decathlon folders, ``Task{id:02d|03d}_*``). A name given with
    the task must match too. Two folders with the same id is an error naming both.
    """
    dataset_id, name = parse_task(task)
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"data folder `{root}` does not exist; create it or point the setting elsewhere")
    candidates = []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        m = re.match(r"^Dataset(\d+)_(.+)$", p.name)
        if m and int(m.group(1)) == dataset_id and (name is None or m.group(2) == name):
            candidates.append(p)
    if not candidates:
        raise DatasetNotFoundError(
            f"no dataset with id {dataset_id}{f' and name {name}' if name else ''} in `{root}` "
            f"(expected a folder named Dataset{dataset_id:03d}_<Name>); convert a Decathlon task with "
            "`nnfast convert --msd PATH` or check the data folder setting"
        )
    if len(candidates) > 1:
        names = ", ".join(f"`{c.name}`" for c in candidates)
        raise DatasetNotFoundError(
            f"dataset id {dataset_id} is ambiguous in `{root}`: {names} share it; rename or remove one of them, "
            "or pass the full folder name"
        )
    return candidates[0]
