"""Benchmark utilities (imported by benchmark files as ``bench_utils``).

``NNFAST_BENCH_SCALE`` (default 0 = tiny inputs, just enough to keep the benchmarks runnable in CI with
``--benchmark-disable``; 1 = the sizes quoted in ``benchmarks/README.md``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path


BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
for p in (str(BENCH), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)


def bench_scale() -> float:
    return float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0)


def full_size() -> bool:
    return bench_scale() >= 1


class TreeMemory:
    """Samples the summed RSS of a process and all its descendants; ``peak`` in bytes."""

    def __init__(self, pid: int, every: float = 0.05):
        import psutil

        self._proc = psutil.Process(pid)
        self.peak = 0
        self._every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            time.sleep(self._every)

    def stop(self):
        self._stop.set()
        self._t.join()


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; returns (wall seconds, peak RSS of the process tree in bytes, combined output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    out, _ = proc.communicate()
    mem.stop()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return dt, mem.peak, out


NNUNET_ENTRY = """
import sys
from nnunetv2.experiment_planning import plan_and_preprocess_entrypoints as e
name = sys.argv[1]
sys.argv = [name] + sys.argv[2:]
getattr(e, name)()
"""


def nnunet_cmd(entry: str, *args: str, pools_as_threads: bool = False) -> list[str]:
    """nnU-Net's command-line entry point ``entry`` (e.g. ``plan_and_preprocess_entry``) in a fresh interpreter.

    ``pools_as_threads``: its worker pools run as threads of that interpreter (``nnunet_ref.nnunet_pools_as_threads``:
    the same functions on the same inputs, the same outputs, without an interpreter spawned per pool). For the
    suite's run with ``--benchmark-disable``, where the command only has to run; a timed run leaves it off, so that
    nnU-Net is timed as users run it."""
    if not pools_as_threads:
        return [sys.executable, "-c", NNUNET_ENTRY, entry, *args]
    from nnunet_ref import POOLS_AS_THREADS_SOURCE

    return [sys.executable, "-c", POOLS_AS_THREADS_SOURCE + "nnunet_pools_as_threads()\n" + NNUNET_ENTRY, entry, *args]


def nnfast_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnfast.cli", *args]


