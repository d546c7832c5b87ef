"""Read torch checkpoint files safely: nnfast's ``.pt`` and nnU-Net v2's ``checkpoint_*.pth``.

Always ``torch.load(weights_only=True)`` — torch's restricted unpickler, which builds tensors and plain containers
and nothing that runs code — with an explicit allowlist (:func:`nnunet_safe_globals`) of the data-only types that
nnU-Net's trainer puts into its checkpoints besides tensors: numpy scalars (``_best_ema``, the logged losses and
Dice values in ``logging``) with their dtypes. Never ``weights_only=False``.

A checkpoint that needs any other global is refused with a :class:`~nnfast.errors.StoreError` naming the file and the
type; a truncated or non-torch file likewise names the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import StoreError

__all__ = ["nnunet_safe_globals", "load_torch_checkpoint"]


def nnunet_safe_globals() -> list:
    """The types allowed besides torch's defaults: numpy's scalar reconstructor, ``np.dtype`` and the dtype classes of the scalars nnU-Net logs (pickles of numpy
    scalars reference these by name; none of them runs user code)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out: list = [scalar, np.dtype]
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_):
        out.append(type(np.dtype(t)))  # numpy.dtypes.Float64DType, ... (numpy >= 1.25)
    return out


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_checkpoint(path: Path | str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`nnunet_safe_globals` allowed.

    Parameters
    ----------
    path : path
        A ``.pt``/``.pth`` file written by ``torch.save``.
    map_location : optional
        Where tensors go (default CPU).

    Raises
    ------
    StoreError
        The file is missing, truncated or not a torch file, or needs a type outside the allowlist (the message names
        the type: such a checkpoint could run code when loaded, so nnfast does not load it).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"checkpoint `{path}` does not exist")
    try:
        with torch.serialization.safe_globals(nnunet_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        what = m.group(1) if m else str(e).splitlines()[0]
        raise StoreError(f"checkpoint `{path}` holds a `{what}` object; nnfast loads only tensors, plain containers "
                         f"and numpy scalars (loading other types can run code), so it refuses this file") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoreError(f"checkpoint `{path}` cannot be read: it is truncated or not a torch checkpoint "
                         f"({type(e).__name__}: {first})") from None
