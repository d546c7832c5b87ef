"""JIT policy for every kernel in :mod:`nnfast.native` (the one place that decides it).

Rules (they avoid Numba's known pitfalls: cache keys that ignore ``parallel=``, lazy compiles inside workers,
oversubscribed threads):

* :func:`serial` kernels are compiled with ``cache=True`` and ``nogil=True``. They are what worker
  processes run.
* :func:`parallel` kernels use ``parallel=True`` and are **never** cached: Numba's cache key ignores
  ``parallel=``, so a cached serial and parallel build of one function could be confused. Always write a
  parallel kernel as its own Python function.
* ``fastmath`` stays off everywhere: parity with nnU-Net's float arithmetic matters more than the last
  few percent.
* :func:`configure_threads` is the single place where ``workers x threads <= cores`` is decided; worker
  processes call it with ``workers=N`` and end up with one Numba thread each.
* Modules register warm-up callables with :func:`register_warmup`; :func:`warmup` compiles every
  signature the pipeline uses, so the parent compiles (or loads from cache) before workers start and no
  worker stalls on a lazy compile mid-run.
"""
from __future__ import annotations

import os
from typing import Callable

import numba

__all__ = ["serial", "parallel", "register_warmup", "warmup", "configure_threads", "available_cores"]

_SERIAL_FLAGS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")
_PARALLEL_FLAGS = dict(cache=False, nogil=True, fastmath=False, error_model="numpy", parallel=True)

_WARMUPS: list[Callable[[], None]] = []


def serial(func):
    """Compile ``func`` as a cached, serial, GIL-free kernel."""
    return numba.njit(**_SERIAL_FLAGS)(func)


def parallel(func):
    """Compile ``func`` as a multi-threaded kernel (``prange``); not cached, see module docstring."""
    return numba.njit(**_PARALLEL_FLAGS)(func)


def register_warmup(func: Callable[[], None]) -> Callable[[], None]:
    """Register a zero-argument callable that calls kernels on tiny inputs of every used signature."""
    _WARMUPS.append(func)
    return func


def warmup(modules: "tuple[str, ...] | None" = None) -> None:
    """Compile (or load from the on-disk cache) every registered kernel signature.

    ``modules`` limits this to the named kernel modules (e.g. ``("crop", "resample")``): loading every kernel costs
    ~1.4 s even from the cache, which a command that uses a few of them should not pay.
    """
    import importlib

    if modules is None:
        from . import kernels_index  # noqa: F401  (imports every kernel module, registering its warm-up)
    else:
        for name in modules:
            importlib.import_module(f"{__package__}.{name}")
    for func in list(_WARMUPS):
        if modules is None or func.__module__.rsplit(".", 1)[-1] in modules:
            func()


def available_cores() -> int:
    """Cores this process may use (CPU affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(workers: int = 1) -> int:
    """Set the Numba thread count so that ``workers * threads <= cores``; returns the thread count.

    Call with the number of worker processes in the parent and with ``workers`` equal to that same number
    inside each worker (each worker then gets ``cores // workers`` threads, at least 1).
    """
    threads = max(1, available_cores() // max(1, workers))
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    return threads
