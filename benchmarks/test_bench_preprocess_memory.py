"""Peak memory of one preprocessing worker vs case size (issue 13, goal 3), nnU-Net's ``DefaultPreprocessor`` beside.

Synthetic CT cases (int16, body + organ labels) with a coarser spacing than the dataset's median, so that every one is
resampled (upsampled ~1.2x per axis, as thin-slice CT planned at a median spacing is). Each measurement runs in a
fresh process that first preprocesses a tiny case (imports, compiled kernels loaded), then the measured case:
``VmHWM`` of that process is the worker's peak; the baseline is its RSS just before the case. nnfast runs
``run_case_task`` (read -> ... -> zarr store), nnU-Net ``DefaultPreprocessor.run_case`` + ``nnUNetDatasetBlosc2
.save_case`` with nnfast's plans exported as nnU-Net's (the same spacing and normalization).

``NNFAST_BENCH_SCALE=1``: cases 100x256x256, 200x384x384, 300x512x512 (the last resampled to 360x576x576); default:
one 20x64x64 case (CI). Run as a script to print the table::

    NNFAST_BENCH_SCALE=1 python benchmarks/test_bench_preprocess_memory.py [nnunet] [nnfast@/path/to/old/tree]

``NNFAST_BENCH_MEM_SIZES=2``: the two smaller cases; ``NNFAST_BENCH_MEM_ROUNDS=3``: three interleaved rounds (the
per-case wall and CPU time of the worker are printed beside the peak; they follow the machine's load, the peak
hardly does).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench_utils import full_size

pytestmark = pytest.mark.slow

SIZES_FULL = [(100, 256, 256), (200, 384, 384), (300, 512, 512)]
SIZES_TINY = [(20, 64, 64)]

_WORKER = r"""
import json, os, sys
from pathlib import Path
import numpy as np
pre, case_id, tool = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
from nnfast.preprocess.api import single_threaded_libraries
single_threaded_libraries()
from nnfast.io.dataset import load_dataset
info, cases = load_dataset(Path(sys.argv[4]))
case = {c.case_id: c for c in cases}
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if tool == "nnfast":
    from nnfast.preprocess.pipeline import CaseTask, run_case_task
    plans = str(pre / "nnfast_plans.json")
    def run(c, out):
        r = run_case_task(CaseTask(c, plans, "3d_fullres", str(out) + ".zarr", "x"))
        return r.shape
else:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(json.loads((pre / "nnUNetPlans.json").read_text()))
    cm = pm.get_configuration("3d_fullres")
    djson = json.loads((Path(sys.argv[4]) / "dataset.json").read_text())
    def run(c, out):
        data, seg, props = DefaultPreprocessor().run_case([str(p) for p in c.image_files], str(c.label_file), pm, cm,
                                                          djson)
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
        blocks, chunks = comp_blosc2_params(data.shape, cm.patch_size, data.itemsize)
        blocks_s, chunks_s = comp_blosc2_params(seg.shape, cm.patch_size, 2)
        nnUNetDatasetBlosc2.save_case(data, seg.astype(np.int16), props, str(out), chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_s, blocks_seg=blocks_s)
        return data.shape
tmp = Path(sys.argv[5])
run(case["case_000"], tmp / "warm")
base = rss()
import time
t0, c0 = time.perf_counter(), time.process_time()
shape = run(case[case_id], tmp / case_id)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the (large) parent
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak": hwm, "base": base, "shape": [int(s) for s in shape], "wall": wall, "cpu": cpu}))
"""


def _dataset(root: Path, sizes) -> tuple[Path, Path]:
    """Raw dataset (three small anchor cases at the median spacing, then ``sizes`` at a coarser one), planned."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from factories import make_raw_dataset

    from nnfast.plan.api import plan_dataset
    from nnfast.settings import Settings

    raw, pre = root / "raw", root / "pre"
    shapes = [(12, 40, 40)] * 3 + list(sizes)
    spacings = [(1.0, 0.7, 0.7)] * 3 + [(1.5, 0.9, 0.9)] * len(sizes)
    ds = make_raw_dataset(raw, 71, "MemCT", shapes, spacings, seed=7)
    plan_dataset(71, Settings(raw=raw, preprocessed=pre, results=root / "res"), workers=2, export_nnunet=True)
    return ds, pre / ds.name


def measure(ds: Path, pre: Path, case_id: str, tool: str, tmp: Path) -> dict:
    """One fresh worker process; ``tool`` "nnfast", "nnunet" or "nnfast@PATH" (nnfast from the source tree at
    PATH, e.g. an older commit unpacked with ``git archive``, for before/after rows in one run)."""
    import os

    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if tool.startswith("nnfast@"):
        env["PYTHONPATH"] = tool.split("@", 1)[1]
        tool = "nnfast"
    # cwd: ``python -c`` puts the working directory first on sys.path, which would shadow PYTHONPATH's nnfast
    out = subprocess.run([sys.executable, "-c", _WORKER, str(pre), case_id, tool, str(ds), str(tmp)],
                         capture_output=True, text=True, env=env, cwd=str(tmp))
    if out.returncode:
        raise RuntimeError(f"{tool} on {case_id} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["image_bytes"] = 4
    for s in r["shape"]:
        r["image_bytes"] *= s
    r["ratio"] = r["peak"] / r["image_bytes"]
    return r


@pytest.fixture(scope="module")
def memory_dataset(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("bench_mem"), SIZES_FULL if full_size() else SIZES_TINY)


def test_worker_peak_memory(benchmark, memory_dataset, tmp_path):
    ds, pre = memory_dataset
    case_id = f"case_{2 + (len(SIZES_FULL) if full_size() else len(SIZES_TINY)):03d}"  # the largest case
    result = {}

    def run():
        result.update(measure(ds, pre, case_id, "nnfast", tmp_path))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({k: result[k] for k in ("peak", "base", "image_bytes", "ratio")})
    assert result["peak"] > result["base"]


if __name__ == "__main__":  # pragma: no cover - manual tool
    import os
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="nnfast_bench_mem_"))
    sizes = SIZES_FULL if full_size() else SIZES_TINY
    sizes = sizes[:int(os.environ.get("NNFAST_BENCH_MEM_SIZES", len(sizes)))]
    ds, pre = _dataset(root, sizes)
    tools = ["nnfast"] + [a for a in sys.argv[1:] if a == "nnunet" or a.startswith("nnfast@")]
    rounds = int(os.environ.get("NNFAST_BENCH_MEM_ROUNDS", 1))
    mib = 2**20
    print("| case (z, y, x) | preprocessed image | tool | peak RSS | x image bytes | baseline | wall | CPU | load |")
    for i, size in enumerate(sizes):
        for _ in range(rounds):  # tools interleaved, so that a change of load hits every tool alike
            for tool in tools:
                r = measure(ds, pre, f"case_{3 + i:03d}", tool, root / "out")
                load = open("/proc/loadavg").read().split()[0]
                print(f"| {size} | {tuple(r['shape'][1:])} {r['image_bytes'] / mib:.0f} MiB | {tool} | "
                      f"{r['peak'] / mib:.0f} MiB | {r['ratio']:.2f}x | {r['base'] / mib:.0f} MiB | "
                      f"{r['wall']:.2f} s | {r['cpu']:.2f} s | {load} |", flush=True)
