"""Install-time compile: every registered kernel signature into Numba's on-disk cache, before the first run.

``python -m nnfast.native.precompile [--jobs N]`` is what the build hook (``setup.py``: ``build_kernels``) runs in
the build environment while ``pip install`` builds nnfast, with the package's source folder first on
``PYTHONPATH``:

* an editable install (``pip install -e``) runs the package from its source tree, so the cache written there
  (``nnfast/native/__pycache__``, Numba's in-tree locator; or ``NUMBA_CACHE_DIR``) is the one the runtime reads;
* a wheel (``pip install .``) is built from ``build/lib``: the cache files written beside that copy go into the
  wheel and are installed beside the modules. Numba >= 0.68 keys its index on a hash of the source's content
  (earlier versions on its mtime, which installing changes: they compile on first use), and on the CPU: such a
  wheel is fast only on the machine (CPU model) that built it, and correct everywhere.

Numba's index also names the numba version: a runtime numba other than the build environment's finds the index
stale and compiles on first use, as without this step (and :func:`nnfast.native._jit.is_warm` says not warm, so
``nnfast preprocess`` compiles in the background). Nothing here is needed for correctness.

``jobs`` processes share the work (:func:`nnfast.native._jit.warmup_shared` with ``wait=False``): each takes the next
module nobody holds, in :data:`nnfast.native.kernels_index.MODULES` order (costliest first), compiles its warm-up and
writes its :func:`~nnfast.native._jit.is_warm` stamp. Only numpy and numba are imported (the build environment
has nothing else).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["PrecompileResult", "precompile", "main"]

_CHILD = ("import sys; from nnfast.native._jit import warmup_shared; "
          "import numba; numba.config.DISABLE_JIT or "
          "warmup_shared(tuple(sys.argv[2].split(',')), 0, 1, sys.argv[1], wait=False)")


@dataclass(frozen=True)
class PrecompileResult:
    """What :func:`precompile` did: ``jobs`` processes, ``wall_s`` seconds, the failed processes' exit codes and the
    last lines of their output (empty when all succeeded)."""

    jobs: int
    wall_s: float
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def precompile(jobs: "int | None" = None, modules: "tuple[str, ...] | None" = None,
               timeout_s: float = 1800.0) -> PrecompileResult:
    """Compile the warm-ups of ``modules`` (default: every kernel module,
    :data:`nnfast.native.kernels_index.MODULES`) into Numba's cache in ``jobs`` processes (default: this process's
    cores, at most one per module) of this interpreter, which import ``nnfast`` as this process would
    (``PYTHONPATH`` is passed on). A process still running after ``timeout_s`` is killed and counted as failed.
    Never raises for a failed compile: see :attr:`PrecompileResult.failures`."""
    from ._jit import available_cores

    if modules is None:
        from .kernels_index import MODULES as modules
    n = max(1, min(int(jobs) if jobs else available_cores(), len(modules)))
    lock_dir = tempfile.mkdtemp(prefix="nnfast-precompile-")
    t0 = time.perf_counter()
    try:
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, lock_dir, ",".join(modules)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(n)]
        failures = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                p.returncode = p.returncode or -9
            if p.returncode != 0:
                lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
                failures.append(f"exit code {p.returncode}: " + (" | ".join(lines[-3:]) or "no output"))
    finally:
        shutil.rmtree(lock_dir, ignore_errors=True)
    return PrecompileResult(n, time.perf_counter() - t0, tuple(failures))


def main(argv: "list[str] | None" = None) -> int:
    """Command line: one line on stdout saying what was compiled and how long it took; exit code 1 when a process
    failed (the build hook turns that into a warning, never a failed install)."""
    parser = argparse.ArgumentParser(prog="python -m nnfast.native.precompile", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: the cores, at most one a module)")
    parser.add_argument("--modules", default=None,
                        help="comma-separated kernel modules (default: all; e.g. crop,normalize for a test)")
    args = parser.parse_args(argv)
    res = precompile(args.jobs, tuple(args.modules.split(",")) if args.modules else None)
    where = os.environ.get("NUMBA_CACHE_DIR") or "nnfast/native/__pycache__"
    if res.ok:
        sys.stdout.write(f"nnfast: Numba kernels compiled into {where} in {res.wall_s:.1f} s ({res.jobs} processes)\n")
        return 0
    sys.stdout.write(f"nnfast: compiling the Numba kernels failed ({'; '.join(res.failures)[:500]}); they compile "
                     "on first use instead\n")
    return 1


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    sys.exit(main())
