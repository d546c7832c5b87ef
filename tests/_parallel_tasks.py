"""Task functions for ``tests/test_parallel.py``; spawned worker processes import this module by name."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


class OddError(Exception):
    """An exception whose constructor takes two arguments (re-raising must keep it intact)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def square(x: int) -> int:
    return x * x


def timed(item: tuple[str, float]) -> tuple[str, float, int]:
    """Record when a task started and in which process; sleep a little so that tasks overlap."""
    key, sleep = item
    start = time.time()
    time.sleep(sleep)
    return key, start, os.getpid()


def misbehave(item: tuple[str, str]) -> str:
    """``(key, pid_dir)``: write this worker's pid to ``pid_dir``, then do what the key says."""
    key, pid_dir = item
    (Path(pid_dir) / str(os.getpid())).touch()
    if key == "case_sigkill":
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    elif key == "case_exit3":
        time.sleep(0.2)
        os._exit(3)
    elif key == "case_valueerror":
        time.sleep(0.2)
        raise ValueError("intensities are all NaN")
    elif key == "case_odd":
        raise OddError(7, "odd failure")
    elif key == "case_sysexit":
        raise SystemExit(2)
    time.sleep(0.3)
    return key


_STATE: dict[str, object] = {}


def set_state(value: object) -> None:
    """An initializer: stores a value that :func:`read_state` returns."""
    _STATE["value"] = value


def read_state(x: int) -> tuple[int, object, int]:
    import numba

    return x, _STATE.get("value"), numba.get_num_threads()


def thread_settings(x: int) -> tuple[dict, int, int]:
    """What a worker's thread policy set: the THREAD_ENV variables, Numba's and torch's thread counts."""
    import numba
    import torch

    from nnfast.native._jit import THREAD_ENV

    return {k: os.environ.get(k) for k in THREAD_ENV}, numba.get_num_threads(), torch.get_num_threads()


def stubborn_setup():
    """A worker set-up whose worker ignores SIGTERM and never finishes its task: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def handler(index, item):
        while True:
            time.sleep(1)

    return handler
