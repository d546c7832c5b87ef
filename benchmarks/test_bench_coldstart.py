"""Cold start (issue 13, goal 1): the first ``nnfast preprocess`` after installing.

"Installing" here is what ``pip install`` does for nnfast's kernels (``setup.py``'s ``build_kernels`` hook): a fresh
copy of the package (fresh sources, no Numba cache: what a fresh clone has), then the hook's command,
``python -m nnfast.native.precompile``, on that copy. One benchmark runs, interleaved in every round (so that the
ratios see the same machine load), with ``PYTHONPATH`` on the copy:

- the install-time compile (``install_compile``: what the install adds to ``pip install``);
- ``nnfast preprocess --task N --workers 2`` (``first``: the first run after the install);
- the same command again (``warm``);
- the same command with ``NUMBA_CACHE_DIR`` a fresh empty folder (``jit_cold``: what a user gets when the install
  compile could not run, e.g. ``NNFAST_INSTALL_COMPILE=none`` or a failed compile: every kernel compiles, in the
  background during verification and fingerprinting and in the workers);
- ``nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2 -npfp 2`` (nnU-Net has no compile step).

on the synthetic CT set of ``test_bench_pipeline.py`` (``ct_task``: 24 cases of ~65x250x250 at
``NNFAST_BENCH_SCALE=1``). Wall times per command (median over rounds), the CPU seconds (user + sys of the command's
process tree) and the ratios go to ``extra_info``. A second benchmark times ``nnfast demo --skip-training``
(synthesize, convert, verify, fingerprint, plan, preprocess ten small cases) the same way: first run after the
install compile, warm, and on an empty cache. A third (full size only: starting a cluster costs more than the tiny
scale's budget) times the same ``nnfast preprocess`` with ``--scheduler`` on a fresh local ``dask scheduler`` and two
``dask worker`` processes sharing a fresh empty cache, cold then warm, beside the cold and warm run without dask.

At the tiny scale (CI, ``--benchmark-disable``) only the warm command runs: the install compile costs ~1 min of CPU.
"""
import os
import resource
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

PACKAGE = Path(__file__).resolve().parents[1] / "nnfast"


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


def _installed_copy(tmp_path: Path) -> Path:
    """A fresh copy of the nnfast package (no Numba cache) in a new folder under ``tmp_path``: the folder to put
    first on ``PYTHONPATH``, as an editable install of a fresh clone runs from its tree."""
    site = Path(tempfile.mkdtemp(prefix="site-", dir=tmp_path))
    shutil.copytree(PACKAGE, site / "nnfast", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _on(site: Path | None, env: dict) -> dict:
    """``env`` with ``site`` first on ``PYTHONPATH`` (unchanged when ``site`` is None)."""
    if site is None:
        return env
    path = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))]))
    return {**env, "PYTHONPATH": path}


def _timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall s, CPU s: user + sys of the command and every process it waited for) of ``cmd`` run with ``env`` in
    ``cwd``, a folder without a ``nnfast`` package: ``python -m`` puts the current folder before ``PYTHONPATH``, so
    from the repository root the commands would import the repository's nnfast (and its cache), not the copy."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    dt, _, out = run_measured(cmd, env, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cmd[1:3] == ["-m", "nnfast.native.precompile"] and "compiled into" not in out:
        raise RuntimeError(f"the install compile did not compile: {out[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


INSTALL_COMPILE = [sys.executable, "-m", "nnfast.native.precompile"]


def _report(benchmark, times: dict, cpu: dict, loads: list) -> None:
    med = {k: statistics.median(v) for k, v in times.items() if v}
    benchmark.extra_info.update({f"{k}_s": round(v, 2) for k, v in med.items()})
    benchmark.extra_info.update({f"{k}_cpu_s": round(statistics.median(v), 1) for k, v in cpu.items() if v})
    benchmark.extra_info["loadavg_after_each_round"] = loads
    if "first" in med:
        benchmark.extra_info["first_over_warm"] = round(med["first"] / med["warm"], 2)
        benchmark.extra_info["jit_cold_over_warm"] = round(med["jit_cold"] / med["warm"], 2)
    if "nnunet" in med and "first" in med:
        benchmark.extra_info["nnunet_over_first"] = round(med["nnunet"] / med["first"], 2)
        benchmark.extra_info["nnunet_over_warm"] = round(med["nnunet"] / med["warm"], 2)
        benchmark.extra_info["nnunet_over_jit_cold"] = round(med["nnunet"] / med["jit_cold"], 2)


@pytest.mark.compat
@pytest.mark.timeout(7200)  # at full size: 2 rounds of five whole commands
@pytest.mark.benchmark(group="cold-start")
def test_cold_warm_nnunet_preprocess(benchmark, ct_task, tmp_path):
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    ours = nnfast_cmd("preprocess", "--task", str(did), "--workers", "2", "-q")
    theirs = nnunet_cmd("plan_and_preprocess_entry", "-d", str(did), "-c", "3d_fullres", "-np", "2", "-npfp", "2")
    names = ("install_compile", "first", "warm", "jit_cold", "nnunet") if full_size() else ("warm",)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    loads: list[str] = []

    def one_round():
        site = _installed_copy(tmp_path) if full_size() else None
        empty = _cache_dir(tmp_path, "numba-cold-")
        for name in names:
            _fresh(pre)
            if name == "install_compile":
                cmd, env = INSTALL_COMPILE, _on(site, {})
            else:
                cmd = theirs if name == "nnunet" else ours
                env = _on(site, _env(raw, pre, empty if name == "jit_cold" else None))
            dt, cs = _timed(cmd, env, tmp_path)
            times[name].append(dt)
            cpu[name].append(cs)
        loads.append(_load())
        for folder in (site, empty):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else 2, iterations=1)
    _report(benchmark, times, cpu, loads)


@pytest.mark.timeout(3600)
@pytest.mark.benchmark(group="cold-start-demo")
def test_demo_preprocessing_cold_and_warm(benchmark, tmp_path):
    """``nnfast demo --skip-training`` (ten small cases) in a fresh folder after the install compile on a fresh copy
    of the package (first), in another fresh folder again (warm), and on an empty ``NUMBA_CACHE_DIR`` (jit_cold):
    the same work each time."""
    cases = "10" if full_size() else "3"
    names = ("install_compile", "first", "warm", "jit_cold") if full_size() else ("warm",)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    loads: list[str] = []

    def one_round():
        site = _installed_copy(tmp_path) if full_size() else None
        empty = _cache_dir(tmp_path, "numba-demo-")
        for name in names:
            if name == "install_compile":
                cmd, env = INSTALL_COMPILE, _on(site, {})
            else:
                folder = _fresh(tmp_path / "demo")
                cmd = nnfast_cmd("demo", "--folder", str(folder), "--cases", cases, "--skip-training")
                env = _on(site, {"NUMBA_CACHE_DIR": str(empty)} if name == "jit_cold" else {})
            dt, cs = _timed(cmd, env, tmp_path)
            times[name].append(dt)
            cpu[name].append(cs)
        loads.append(_load())
        for folder in (site, empty):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    benchmark.pedantic(one_round, rounds=1 if benchmark.disabled else 2, iterations=1)
    _report(benchmark, times, cpu, loads)


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
