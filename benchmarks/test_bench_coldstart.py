"""Cold start (issue 13, goal 1): the first ``nnfast preprocess`` after installing, with an empty Numba cache.

One benchmark runs, interleaved in every round (so that the ratios see the same machine load):

- ``nnfast preprocess --task N --workers 2`` with ``NUMBA_CACHE_DIR`` a fresh empty folder (cold: every kernel
  compiles, as on the first run after ``pip install`` or in a fresh container);
- the same command again on that now filled cache (warm);
- ``nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2 -npfp 2`` (nnU-Net has no compile step).

on the synthetic CT set of ``test_bench_pipeline.py`` (``ct_task``: 24 cases of ~65x250x250 at
``NNFAST_BENCH_SCALE=1``). Wall times per command (median over rounds) and the ratios go to ``extra_info``. A second
benchmark times ``nnfast demo --skip-training`` (synthesize, convert, verify, fingerprint, plan, preprocess ten small
cases) on a fresh cache and on a warm one. A third (full size only: starting a cluster costs more than the tiny
scale's budget) times the same ``nnfast preprocess`` with ``--scheduler`` on a fresh local ``dask scheduler`` and two
``dask worker`` processes sharing the fresh cache, cold then warm, beside the cold and warm run without dask.

At the tiny scale (CI, ``--benchmark-disable``) only the warm command runs: a cold run compiles for ~10 s.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench_utils import full_size, nnfast_cmd, nnunet_cmd, run_measured

pytestmark = pytest.mark.slow


def _env(raw: Path, pre: Path, cache: Path | None) -> dict:
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(pre.parent / "res"),
           "NNFAST_RAW": str(raw), "NNFAST_PREPROCESSED": str(pre), "nnUNet_compile": "f"}
    return env if cache is None else {**env, "NUMBA_CACHE_DIR": str(cache)}


def _cache_dir(tmp_path: Path, prefix: str) -> Path | None:
    """A fresh, empty Numba cache folder; ``None`` (Numba's usual cache) at the tiny scale, which runs warm only."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_path)) if full_size() else None


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:  # pragma: no cover - not Linux
        return "?"


@pytest.mark.compat
@pytest.mark.timeout(7200)  # at full size: 2 rounds of three whole commands
@pytest.mark.benchmark(group="cold-start")
def test_cold_warm_nnunet_preprocess(benchmark, ct_task, tmp_path):
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    ours = nnfast_cmd("preprocess", "--task", str(did), "--workers", "2", "-q")
    theirs = nnunet_cmd("plan_and_preprocess_entry", "-d", str(did), "-c", "3d_fullres", "-np", "2", "-npfp", "2")
    times: dict[str, list[float]] = {"cold": [], "warm": [], "nnunet": []}
    loads: list[str] = []
    commands = [("cold", ours), ("warm", ours), ("nnunet", theirs)] if full_size() else [("warm", ours)]

    def one_round():
        cache = _cache_dir(tmp_path, "numba-cold-")
        for name, cmd in commands:
            _fresh(pre)
            dt, _, _ = run_measured(cmd, _env(raw, pre, cache))
            times[name].append(dt)
        loads.append(_load())
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else 2, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    benchmark.extra_info.update({f"{k}_s": round(v, 2) for k, v in med.items()})
    benchmark.extra_info["loadavg_after_each_round"] = loads
    if "cold" in med:
        benchmark.extra_info["cold_over_warm"] = round(med["cold"] / med["warm"], 2)
        benchmark.extra_info["nnunet_over_cold"] = round(med["nnunet"] / med["cold"], 2)
        benchmark.extra_info["nnunet_over_warm"] = round(med["nnunet"] / med["warm"], 2)


@pytest.mark.timeout(3600)
@pytest.mark.benchmark(group="cold-start-demo")
def test_demo_preprocessing_cold_and_warm(benchmark, tmp_path):
    """``nnfast demo --skip-training`` (ten small cases) in a fresh folder on a fresh Numba cache, then in another
    fresh folder on the filled cache: the same work, cold and warm."""
    cases = "10" if full_size() else "3"
    times: dict[str, list[float]] = {"cold": [], "warm": []}

    def one_round():
        cache = _cache_dir(tmp_path, "numba-demo-")
        for name in ("cold", "warm") if full_size() else ("warm",):
            folder = _fresh(tmp_path / "demo")
            cmd = nnfast_cmd("demo", "--folder", str(folder), "--cases", cases, "--skip-training")
            dt, _, _ = run_measured(cmd, {} if cache is None else {"NUMBA_CACHE_DIR": str(cache)})
            times[name].append(dt)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else 2, iterations=1)
    benchmark.extra_info.update({f"{k}_s": round(statistics.median(v), 2) for k, v in times.items() if v})
    benchmark.extra_info["loadavg"] = _load()


def _dask_cluster(env: dict) -> tuple[str, list]:
    """A fresh local ``dask scheduler`` and two ``dask worker`` processes with ``env``; (address, processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dask = [str(Path(sys.executable).with_name("dask"))]
    procs = [subprocess.Popen([*dask, "scheduler", "--port", str(port), "--no-dashboard"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(3)
    procs += [subprocess.Popen([*dask, "worker", f"tcp://127.0.0.1:{port}", "--no-dashboard"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    time.sleep(5)
    return f"tcp://127.0.0.1:{port}", procs


def _stop(procs: list) -> None:
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.timeout(7200)
@pytest.mark.benchmark(group="cold-start-dask")
def test_cold_and_warm_preprocess_on_a_local_dask_cluster(benchmark, ct_task, tmp_path):
    """``nnfast preprocess --scheduler tcp://127.0.0.1:PORT`` on a fresh cluster (scheduler + 2 workers) with an
    empty Numba cache, then again on the filled one (the same cluster), and the same two without dask."""
    if not full_size():
        pytest.skip("full size only (NNFAST_BENCH_SCALE=1): a cluster's start-up exceeds the tiny scale's budget")
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    os_env = dict(os.environ)
    times: dict[str, list[float]] = {"dask_cold": [], "dask_warm": [], "cold": [], "warm": []}
    loads: list[str] = []

    def one_round():
        for use_dask in (True, False):
            cache = _cache_dir(tmp_path, "numba-dask-")
            env = {**os_env, **_env(raw, pre, cache)}
            address, procs = _dask_cluster(env) if use_dask else ("", [])
            try:
                for run in ("cold", "warm"):
                    _fresh(pre)
                    cmd = nnfast_cmd("preprocess", "--task", str(did), "--workers", "2", "-q",
                                     *(("--scheduler", address) if use_dask else ()))
                    dt, _, _ = run_measured(cmd, env)  # raises when the command fails
                    times[("dask_" if use_dask else "") + run].append(dt)
            finally:
                _stop(procs)
                shutil.rmtree(cache, ignore_errors=True)
        loads.append(_load())

    benchmark.pedantic(one_round, rounds=2, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    benchmark.extra_info.update({f"{k}_s": round(v, 2) for k, v in med.items()})
    benchmark.extra_info["loadavg_after_each_round"] = loads
    benchmark.extra_info["dask_cold_over_cold"] = round(med["dask_cold"] / med["cold"], 2)
