"""``nnfast preprocess`` as users run it: resume after a crash, worker death, worker-count and dask independence."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from factories import make_raw_dataset
from nnfast.io.store import load_case
from nnfast.preprocess.api import preprocess_dataset
from nnfast.settings import Settings

NAME = "Dataset031_Run"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    shapes = [(14, 56 + 4 * i, 60) for i in range(6)]
    spacings = [(3.0 + 0.5 * (i % 3), 0.8, 0.8) for i in range(6)]
    make_raw_dataset(raw, 31, "Run", shapes, spacings, seed=11, empty_cases=[5])
    return raw


def _settings(raw, tmp):
    return Settings(raw=raw, preprocessed=tmp / "pre", results=tmp / "res")


def _stores(settings):
    return sorted((settings.preprocessed / NAME / "nnfast_3d_fullres").glob("*.zarr"))


def _assert_same(a_stores, b_stores):
    assert [p.name for p in a_stores] == [p.name for p in b_stores]
    for pa, pb in zip(a_stores, b_stores):
        ia, sa, pra, la = load_case(pa)
        ib, sb, prb, lb = load_case(pb)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)
        assert la.keys() == lb.keys()
        for k in la:
            np.testing.assert_array_equal(la[k], lb[k])
        assert pra["bbox_used_for_cropping"] == prb["bbox_used_for_cropping"]


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    """An uninterrupted single-worker run."""
    tmp = tmp_path_factory.mktemp("ref")
    s = _settings(raw, tmp)
    summary = preprocess_dataset(NAME, s, workers=1, verify=False)
    assert summary.configs[0].computed == 6
    return _stores(s)


def test_rerun_skips_current_cases_and_redoes_changed_ones(raw, reference, tmp_path):
    s = _settings(raw, tmp_path)
    first = preprocess_dataset(NAME, s, workers=1, verify=False)
    assert first.configs[0].computed == 6
    second = preprocess_dataset(NAME, s, workers=1, verify=False)
    assert (second.configs[0].computed, second.configs[0].skipped) == (0, 6)
    # touching one input file invalidates that case only
    img = raw / NAME / "imagesTr" / "case_002_0000.nii.gz"
    os.utime(img, ns=(time.time_ns(), time.time_ns()))
    third = preprocess_dataset(NAME, s, workers=1, verify=False)
    assert (third.configs[0].computed, third.configs[0].skipped) == (1, 5)
    forced = preprocess_dataset(NAME, s, workers=1, verify=False, force=True)
    assert forced.configs[0].computed == 6
    _assert_same(reference, _stores(s))


def test_two_workers_and_dask_give_identical_stores(raw, reference, tmp_path):
    for pool in ("threads", "processes"):
        s2 = _settings(raw, tmp_path / f"w2_{pool}")
        assert preprocess_dataset(NAME, s2, workers=2, verify=False, pool=pool).threads == (pool == "threads")
        _assert_same(reference, _stores(s2))
    sd = _settings(raw, tmp_path / "dask")
    preprocess_dataset(NAME, sd, workers=2, scheduler="local:2", verify=False)
    _assert_same(reference, _stores(sd))


def test_workers_start_before_planning_on_a_fresh_folder_only(raw, reference, tmp_path, monkeypatch):
    """A fresh folder: the pool starts ahead of verify/fingerprint/plan; a rerun with every case current starts none."""
    import nnfast.plan.api as plan_api
    from nnfast.parallel import TaskPool

    events = []
    start, plan = TaskPool.start, plan_api.plan_dataset
    monkeypatch.setattr(TaskPool, "start", lambda self: events.append("workers") or start(self))
    monkeypatch.setattr(plan_api, "plan_dataset", lambda *a, **k: events.append("plan") or plan(*a, **k))
    s = _settings(raw, tmp_path)
    first = preprocess_dataset(NAME, s, workers=2, verify=False, pool="processes")
    assert events[:2] == ["workers", "plan"] and first.configs[0].computed == 6
    events.clear()
    again = preprocess_dataset(NAME, s, workers=2, verify=False, pool="processes")
    assert events == ["plan"] and (again.configs[0].computed, again.configs[0].skipped) == (0, 6)
    _assert_same(reference, _stores(s))


def test_no_more_workers_start_ahead_than_there_are_cases(tmp_path, monkeypatch):
    from nnfast.parallel import TaskPool

    started = []
    start = TaskPool.start
    monkeypatch.setattr(TaskPool, "start", lambda self: started.append(self.workers) or start(self))
    raw = tmp_path / "raw"
    make_raw_dataset(raw, 32, "One", [(10, 40, 44)], [(3.0, 0.8, 0.8)], seed=3)
    summary = preprocess_dataset("Dataset032_One", _settings(raw, tmp_path), workers=2, verify=False,
                                 pool="processes")
    assert summary.configs[0].computed == 1 and started == []  # one case: it runs in this process, no pool


@pytest.mark.timeout(120)
def test_verification_failure_with_workers_started_ahead_stops_before_fingerprinting(raw, tmp_path):
    import multiprocessing
    import shutil

    from nnfast.errors import NnfastError

    bad_raw = tmp_path / "raw"
    shutil.copytree(raw, bad_raw)
    img = bad_raw / NAME / "imagesTr" / "case_003_0000.nii.gz"
    img.write_bytes(img.read_bytes()[:200])  # truncated
    s = _settings(bad_raw, tmp_path)
    with pytest.raises(NnfastError, match="case_003_0000.nii.gz"):
        preprocess_dataset(NAME, s, workers=2, pool="processes")
    from nnfast.layout import FINGERPRINT_FILE

    assert not (s.preprocessed / NAME / FINGERPRINT_FILE).exists()
    assert not _stores(s)
    assert [p for p in multiprocessing.active_children() if p.name == "nnfast-worker"] == []


def _cli(raw, pre, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "nnfast.cli", "preprocess", "--task", "31", "--raw", str(raw), "--preprocessed", str(pre),
         "--no-verify", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


@pytest.mark.timeout(300)
def test_killed_run_resumes_to_the_uninterrupted_result(raw, reference, tmp_path):
    pre = tmp_path / "pre"
    folder = pre / NAME / "nnfast_3d_fullres"
    proc = _cli(raw, pre, "--workers", "1")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if folder.is_dir() and len(list(folder.glob("*.zarr"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted: " + proc.stderr.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(folder.glob("*.zarr"))
    assert 2 <= len(done) < 6
    # what looks finished is finished
    for p in done:
        load_case(p)
    proc = _cli(raw, pre, "--workers", "2")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "already current" in out
    _assert_same(reference, sorted(folder.glob("*.zarr")))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary stores left behind"


@pytest.mark.timeout(300)
def test_ctrl_c_on_the_thread_path_stops_soon_and_leaves_only_finished_stores(raw, reference, tmp_path):
    """Ctrl-C while threads of the command preprocess: exit code 130 within seconds (no case started after it, the
    running ones stop at their next step), every store that looks finished is complete, no temporaries are left, and
    a rerun completes the rest to the uninterrupted result."""
    pre = tmp_path / "pre"
    folder = pre / NAME / "nnfast_3d_fullres"
    proc = _cli(raw, pre, "--workers", "2", "--pool", "threads")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if folder.is_dir() and list(folder.glob("*.zarr")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted: " + proc.stderr.read()
    os.kill(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, (out, err)
    assert time.monotonic() - t0 < 30
    for p in folder.glob("*.zarr"):
        load_case(p)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary stores left behind"
    proc = _cli(raw, pre, "--workers", "2")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    _assert_same(reference, sorted(folder.glob("*.zarr")))


def _live_spawned_children(parent) -> list:
    import psutil

    kids = []
    for c in parent.children(recursive=True):
        try:
            if c.status() != psutil.STATUS_ZOMBIE and "spawn" in " ".join(c.cmdline()):
                kids.append(c)
        except psutil.Error:  # exited meanwhile
            pass
    return kids


@pytest.mark.timeout(300)
def test_killed_worker_is_a_clear_error(raw, tmp_path):
    """A worker killed while it holds a case (its temporary store, named with its pid, exists): exit code 2 and an
    error naming the signal, that case and fewer workers. (A worker killed while idle loses no work: the others go
    on, ``tests/test_parallel.py``.)"""
    import psutil

    proc = _cli(raw, tmp_path / "pre", "--workers", "2", "--pool", "processes", "--force")
    parent = psutil.Process(proc.pid)
    folder = tmp_path / "pre" / NAME / "nnfast_3d_fullres"
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        pids = {c.pid for c in _live_spawned_children(parent)}
        for tmp in folder.glob(".*.zarr.tmp-*") if folder.is_dir() else []:
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
            if pid in pids:
                victim = psutil.Process(pid)
                break
        time.sleep(0.02)
    assert victim is not None, "no worker seen holding a case"
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "SIGKILL" in err and "--workers 1" in err
    named = re.search(r"while processing case (case_\d+)", err)
    assert named, err
    # the case it held when killed (or, had it just finished that one, the next): never a finished store
    assert not (folder / f"{named.group(1)}.zarr").exists()
