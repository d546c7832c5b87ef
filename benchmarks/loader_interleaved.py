"""CPU time per training batch, nnU-Net's loader and nnfast's alternating batch by batch (one process, one thread).

On a shared machine the load changes while a benchmark runs; alternating the two pipelines batch by batch puts both
under the same load, so their ratio holds where absolute times do not. Same plans, cases and pipelines as
``test_bench_loader.py`` (``NNFAST_BENCH_SCALE=1`` sizes), nnfast reading its zarr stores::

    PYTHONPATH=. python benchmarks/loader_interleaved.py 2d 30
    PYTHONPATH=. python benchmarks/loader_interleaved.py 3d_fullres_aniso 12

prints the mean and median CPU ms per batch of each, the ratios and ``/proc/loadavg``. The first batch of each
(JIT caches, file handles) is not timed.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["NNFAST_BENCH_SCALE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import test_bench_loader as T  # noqa: E402


class _Tmp:
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True)
        return d


def main(name: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fixture = T.data._get_wrapped_function() if hasattr(T.data, "_get_wrapped_function") else \
            T.data.__pytest_wrapped__.obj  # the fixture's function (pytest >= 8.4 / older)
        nn, stores = fixture(_Tmp(Path(tmp)))(name)
        with T._single_thread():
            fns = {"nnunet": T._nnunet_next(name, nn), "nnfast": T._nnfast_next(name, stores, "zarr")}
            for f in fns.values():
                f()
            cpu: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(n):
                for k, f in fns.items():
                    c0 = time.process_time()
                    f()
                    cpu[k].append(time.process_time() - c0)
    for k, v in cpu.items():
        print(f"{k}: CPU ms per batch mean {1000 * np.mean(v):.1f} median {1000 * np.median(v):.1f}")
    print(f"ratio nnU-Net / nnfast: mean {np.mean(cpu['nnunet']) / np.mean(cpu['nnfast']):.2f}, "
          f"median {np.median(cpu['nnunet']) / np.median(cpu['nnfast']):.2f}")
    print("load", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "2d", int(sys.argv[2]) if len(sys.argv) > 2 else 20)
