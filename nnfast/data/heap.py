"""Keep freed memory in the process that builds batches (glibc's ``mallopt``), so that a sample's scratch arrays
reuse pages instead of faulting fresh ones.

Every training sample allocates and frees the same few MiB: the 2D warp's position and weight tables inside the
Numba kernel (~2.5 MiB for a 256x256 patch), torch's noise tensor, blur and low-resolution buffers, the
deep-supervision targets. glibc serves blocks of >= 128 KiB (its adaptive threshold grows only up to the largest
block freed so far) from ``mmap`` and returns them to the kernel on ``free``, and trims the heap top above 128 KiB:
each allocation then starts from new zeroed pages. Measured on a 256x256 2D warp (one core): 4.1 ms per call, of
which ~2.9 ms were page faults; 1.3 ms with :func:`keep_freed_memory`.

:func:`keep_freed_memory` sets the mmap threshold to glibc's maximum (32 MiB: larger blocks, such as a whole 3D
region, still come from ``mmap``) and the trim threshold to :data:`TRIM_THRESHOLD`: the process keeps up to that much
freed memory for reuse. The loader calls it once per process that builds batches (:class:`~nnfast.data.batch.BatchBuilder`:
loader workers, the in-process loader). Linux with glibc only; elsewhere (musl, macOS, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
#: glibc's largest allowed mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)
MMAP_THRESHOLD = 32 * 2**20
#: freed memory at the heap top kept for reuse before glibc trims it
TRIM_THRESHOLD = 256 * 2**20

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (idempotent); True when they are set."""
    if "ok" in _state:
        return _state["ok"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        except (OSError, AttributeError):  # no libc symbol table / a libc without mallopt
            ok = False
    _state["ok"] = ok
    return ok
