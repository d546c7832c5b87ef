"""Giving the consumed part of a large array back to the operating system before the array itself is freed.

A separable resampling pass reads its input once, slab by slab; :func:`release_rows` lets the pages of the slabs
already read go (``madvise(MADV_DONTNEED)`` on the whole pages inside them), so that a worker's resident memory holds
the not-yet-read part of the input and the part of the output written so far, instead of both arrays whole
(:mod:`nnfast.native.resample`, streamed preprocessing). The released part of the array reads as zeros afterwards: only
call it on an array this code owns and never reads there again. Where ``madvise`` is not available (not Linux) it
does nothing, and memory is simply freed with the array.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

__all__ = ["release_rows", "release_bytes", "trim_heap"]

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux
_madvise = None
_malloc_trim = None
if sys.platform.startswith("linux"):
    try:
        _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc; absent from musl
        _malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        _malloc_trim = None
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
        _madvise = None


def release_bytes(addr: int, nbytes: int) -> None:
    """Release the whole pages inside ``[addr, addr + nbytes)`` (partial pages at either end are kept)."""
    if _madvise is None or nbytes <= 0:
        return
    lo = -(-addr // _PAGE) * _PAGE
    hi = (addr + nbytes) // _PAGE * _PAGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_DONTNEED)  # a failure only means the memory stays until the array is freed


def release_rows(arr: np.ndarray, lo: int, hi: int, col_lo: int = 0, col_hi: int | None = None) -> None:
    """Release rows ``lo:hi`` of the C-contiguous ``arr`` (along axis 0), or, with ``col_lo``/``col_hi``, only the
    range ``[col_lo, col_hi)`` of axis 1 within each of those rows."""
    if _madvise is None or arr.size == 0 or hi <= lo:
        return
    if not arr.flags.c_contiguous:
        raise ValueError("release_rows: the array must be C-contiguous")
    row = arr.strides[0] if arr.ndim > 1 else arr.itemsize
    base = arr.ctypes.data
    if col_hi is None and col_lo == 0:
        release_bytes(base + lo * row, (hi - lo) * row)
        return
    col = arr.strides[1]
    col_hi = arr.shape[1] if col_hi is None else col_hi
    if (col_hi - col_lo) * col < _PAGE:
        return
    for r in range(lo, hi):
        release_bytes(base + r * row + col_lo * col, (col_hi - col_lo) * col)


def trim_heap() -> None:
    """Give the heap memory freed so far back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Arrays below glibc's mmap threshold (up to 32 MiB once larger ones have been freed) live on the heap, and freeing
    them does not shrink a worker's resident memory; between the phases of a case that memory would otherwise sit under
    the next phase's peak."""
    if _malloc_trim is not None:
        _malloc_trim(0)
