"""nnfast.data.heap: after keep_freed_memory() a process reuses the pages of freed blocks (no page faults for a
repeated allocation), as the batch builder's samples need; without it glibc faults fresh pages every time."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import resource, sys
import numpy as np
from nnfast.data.heap import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def sample():  # eight 512 KiB tables, as a 256x256 warp allocates and frees them
    tables = [np.ones(2**16, np.float64) for _ in range(8)]
    del tables
sample()
before = faults()
for _ in range(20):
    sample()
print(ok, faults() - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    ok, n = r.stdout.split()
    return ok, int(n)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_after_keep_freed_memory():
    ok, kept = _faults("keep")
    if ok != "True":
        pytest.skip("this libc has no mallopt (not glibc)")
    _, default = _faults("default")
    # glibc's default: the freed tables coalesce above its adaptive trim threshold and go back to the kernel
    assert default >= 20 * 512  # (20 x 1024 fresh 4 KiB pages)
    assert kept < 200, kept  # the same pages every time


def test_batch_builder_sets_it(ld_cases):
    from nnfast.data.batch import BatchBuilder, BatchSpec
    from nnfast.data.dataset import ZarrCaseSource
    from nnfast.data.heap import _state

    BatchBuilder(ZarrCaseSource(ld_cases[0]), BatchSpec.from_patch_size((8, 16, 16), 2, num_channels=1))
    assert "ok" in _state
