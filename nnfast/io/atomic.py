"""Atomic writes: everything nnfast writes goes to a temporary name first and is renamed when complete,
so a crashed run never leaves a file that looks finished."""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

from ..errors import FileFormatError

__all__ = ["temporary_sibling", "atomic_target", "write_json_atomic", "read_json"]


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """A hidden, unique temporary path next to ``path`` (same filesystem, so ``os.replace`` is atomic).

    The name starts with ``.`` so that dataset listings (ours and nnU-Net's) ignore it. ``suffix`` is kept at
    the end (e.g. ``.nii.gz`` so that SimpleITK picks the right writer).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_target(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()
        raise


def write_json_atomic(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_target(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.write("\n")


def read_json(path: Path) -> Any:
    """Read a JSON file.

    Raises
    ------
    FileFormatError
        The file is not valid JSON (or not UTF-8); the message names it.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"`{path}` is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the "
                              "file is damaged: restore it or rerun the step that wrote it") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"`{path}` is not a UTF-8 JSON file ({e.reason} at byte {e.start}); the file is "
                              "damaged: restore it or rerun the step that wrote it") from None
