"""Whole preprocessing, interleaved (issue 13 goal 2): nnU-Net, nnfast trees, and the decode floor, round by round.

Each round runs, one after the other on fresh output folders: ``nnUNetv2_plan_and_preprocess -d N -c 3d_fullres -np 2
-npfp 2``, ``nnfast preprocess --task N --workers 2`` once per nnfast source tree given (e.g. this checkout and a
``git archive`` of the code before a change, each with its own warm Numba cache: run a tree once before timing it),
and the floor: decoding every input NIfTI of the dataset once with SimpleITK on one core. Printed per run: wall time,
CPU time of the whole process tree (user + sys, ``getrusage(RUSAGE_CHILDREN)``) and ``/proc/loadavg`` before and
after; then the medians. On a shared machine the CPU times are the steadier measure::

    python benchmarks/preprocess_interleaved.py RAW_ROOT DATASET_ID ROUNDS [--skip-nnunet] [NAME=TREE ...]
    python benchmarks/preprocess_interleaved.py /tmp/ct/raw 61 2 this=. before=/tmp/before

``--skip-nnunet`` leaves nnU-Net's runs out (comparing nnfast trees only: their ratio is the result).
``NAME=TREE:OPT,OPT`` adds options to that tree's command, e.g. ``procs=.:--pool,processes``.

``RAW_ROOT`` holds ``DatasetNNN_Name`` (e.g. the 24-case CT set of ``test_bench_pipeline.py``'s ``ct_task``).
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:  # pragma: no cover - not Linux
        return "?"


def _commands(raw: Path, task: int, trees: dict[str, str],
              nnunet_too: bool = True) -> dict[str, tuple[list[str], str | None]]:
    py = sys.executable
    nnunet = [py, "-c", "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
              "plan_and_preprocess_entry as m; sys.argv = ['nnUNetv2_plan_and_preprocess', '-d', sys.argv[1], '-c', "
              "'3d_fullres', '-np', '2', '-npfp', '2']; m()", str(task)]
    floor = [py, "-c", "import sys, glob, SimpleITK as s; s.ProcessObject.SetGlobalDefaultNumberOfThreads(1); "
             "[s.GetArrayFromImage(s.ReadImage(f)) for f in sorted(glob.glob(sys.argv[1] + '/Dataset%03d_*/*Tr/*.nii.gz'"
             " % int(sys.argv[2])))]", str(raw), str(task)]
    cmds: dict[str, tuple[list[str], str | None]] = {"nnunet": (nnunet, None)} if nnunet_too else {}
    for name, tree in trees.items():
        tree, _, extra = tree.partition(":")  # NAME=TREE:--flag,--flag adds options (e.g. --pool,processes)
        cmds[name] = ([py, "-m", "nnfast.cli", "preprocess", "--task", str(task), "--workers", "2", "-q",
                       *[a for a in extra.split(",") if a]], str(Path(tree).resolve()))
    cmds["floor"] = (floor, None)
    return cmds


def main(argv: list[str]) -> None:
    nnunet_too = "--skip-nnunet" not in argv
    argv = [a for a in argv if a != "--skip-nnunet"]
    raw, task, rounds = Path(argv[0]).resolve(), int(argv[1]), int(argv[2])
    trees = dict(a.split("=", 1) for a in argv[3:]) or {"this": str(Path(__file__).resolve().parents[1])}
    work = Path(tempfile.mkdtemp(prefix="nnfast_interleaved_"))
    runs: dict[str, list[tuple[float, float]]] = {}
    try:
        for r in range(rounds):
            for name, (cmd, pythonpath) in _commands(raw, task, trees, nnunet_too).items():
                pre = work / f"pre_{name}"
                shutil.rmtree(pre, ignore_errors=True)
                pre.mkdir()
                env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre),
                           nnUNet_results=str(work / "res"), NNFAST_RAW=str(raw), NNFAST_PREPROCESSED=str(pre),
                           nnUNet_compile="f")
                env.pop("PYTHONPATH", None)
                if pythonpath:
                    env["PYTHONPATH"] = pythonpath
                before = _load()
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                # cwd: not a source tree (``python -m`` puts the working folder before PYTHONPATH on sys.path, so
                # run from a checkout every NAME=TREE would import that checkout's nnfast)
                proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=work)
                wall = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if proc.returncode:
                    raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
                cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                runs.setdefault(name, []).append((wall, cpu))
                print(f"round {r} {name:8s} wall {wall:8.2f} s  cpu {cpu:7.2f} s  load {before} -> {_load()}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    for name, (wall, cpu) in med.items():
        ratio = f"  nnU-Net / this: {med['nnunet'][0] / wall:.2f}x wall, {med['nnunet'][1] / cpu:.2f}x CPU" \
            if name not in ("nnunet", "floor") and "nnunet" in med else ""
        print(f"median {name:8s} wall {wall:8.2f} s  cpu {cpu:7.2f} s{ratio}")


if __name__ == "__main__":  # pragma: no cover - manual tool
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
