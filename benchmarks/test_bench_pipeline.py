"""Whole commands side by side with nnU-Net v2, as users run them (fresh processes, 2 workers).

- fingerprint + plan: ``nnUNetv2_plan_and_preprocess --no_pp -npfp 2`` vs ``nnfast plan --workers 2``
- fingerprint + plan + 3d_fullres: ``nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2 -npfp 2`` vs
  ``nnfast preprocess --workers 2``
- the floor: reading every input NIfTI file once with SimpleITK, 2 processes, and on one core (issue 13's
  "at most 4x the floor" is against the one-core read).

Peak memory is the summed RSS of the process tree, sampled every 50 ms; recorded in ``extra_info``. With
``--benchmark-disable`` (the suite's run) each command runs once and nnU-Net's pools run as threads of its process
(``bench_utils.nnunet_cmd``: same outputs, ~2x less CPU on the tiny inputs); a timed run times nnU-Net as users run it.
"""
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from bench_utils import nnfast_cmd, nnunet_cmd, run_measured

pytestmark = pytest.mark.slow


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _bench(benchmark, cmd, env, reset):
    info = {}

    def setup():
        reset()
        return (), {}

    def run():
        dt, peak, _ = run_measured(cmd, env)
        info["peak_rss_mib"] = round(peak / 2**20, 1)
        info["wall_s"] = round(dt, 3)

    benchmark.pedantic(run, setup=setup, rounds=1 if benchmark.disabled else 2, iterations=1)
    benchmark.extra_info.update(info)


def _env(raw, pre):
    return {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(pre.parent / "res"),
            "NNFAST_RAW": str(raw), "NNFAST_PREPROCESSED": str(pre), "nnUNet_compile": "f"}


@pytest.mark.compat
@pytest.mark.benchmark(group="fingerprint+plan")
def test_plan_nnunet(benchmark, ct_task, tmp_path):
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    _bench(benchmark, nnunet_cmd("plan_and_preprocess_entry", "-d", str(did), "-npfp", "2", "--no_pp",
                                 pools_as_threads=benchmark.disabled),
           _env(raw, pre), lambda: _fresh(pre))
    assert (pre / f"Dataset{did:03d}_BenchCT" / "nnUNetPlans.json").is_file()


@pytest.mark.benchmark(group="fingerprint+plan")
def test_plan_nnfast(benchmark, ct_task, tmp_path):
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    _bench(benchmark, nnfast_cmd("plan", "--task", str(did), "--workers", "2", "-q"), _env(raw, pre),
           lambda: _fresh(pre))


@pytest.mark.benchmark(group="fingerprint+plan")
def test_plan_nnfast_no_verify(benchmark, ct_task, tmp_path):
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    _bench(benchmark, nnfast_cmd("plan", "--task", str(did), "--workers", "2", "--no-verify", "-q"), _env(raw, pre),
           lambda: _fresh(pre))


@pytest.mark.compat
@pytest.mark.benchmark(group="preprocess-3d_fullres")
def test_preprocess_nnunet(benchmark, ct_task, tmp_path):
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    _bench(benchmark, nnunet_cmd("plan_and_preprocess_entry", "-d", str(did), "-c", "3d_fullres", "-np", "2",
                                 "-npfp", "2", pools_as_threads=benchmark.disabled), _env(raw, pre), lambda: _fresh(pre))
    cases = sorted((pre / f"Dataset{did:03d}_BenchCT" / "nnUNetPlans_3d_fullres").glob("*.b2nd"))
    assert len(cases) == 2 * len(list((raw / f"Dataset{did:03d}_BenchCT" / "imagesTr").glob("*.nii.gz")))  # data, seg


@pytest.mark.benchmark(group="preprocess-3d_fullres")
def test_preprocess_nnfast(benchmark, ct_task, tmp_path):
    raw, did, _ = ct_task
    pre = tmp_path / "pre"
    _bench(benchmark, nnfast_cmd("preprocess", "--task", str(did), "--workers", "2", "-q"), _env(raw, pre),
           lambda: _fresh(pre))


def _read_all(paths):
    import SimpleITK as sitk

    n = 0
    for p in paths:
        n += sitk.GetArrayFromImage(sitk.ReadImage(str(p))).size
    return n


@pytest.mark.benchmark(group="preprocess-3d_fullres")
def test_floor_read_inputs(benchmark, ct_task):
    raw, did, _ = ct_task
    files = sorted((raw / f"Dataset{did:03d}_BenchCT").glob("*/*.nii.gz"))
    halves = [files[0::2], files[1::2]]

    def run():
        with ProcessPoolExecutor(2) as ex:
            return sum(ex.map(_read_all, halves))

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 2, iterations=1)


@pytest.mark.benchmark(group="preprocess-3d_fullres")
def test_floor_read_inputs_one_core(benchmark, ct_task):
    """Decoding every input NIfTI once in this process, one SimpleITK thread."""
    import SimpleITK as sitk

    raw, did, _ = ct_task
    files = sorted((raw / f"Dataset{did:03d}_BenchCT").glob("*/*.nii.gz"))
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        benchmark.pedantic(_read_all, args=(files,), rounds=1 if benchmark.disabled else 2, iterations=1)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
