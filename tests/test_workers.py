"""The worker core shared by the task pool and the loader: one thread policy applied in the child at start-up (the
parent's environment untouched), death messages, stop escalation down to SIGKILL, shared-memory space check."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import _parallel_tasks as tasks  # noqa: E402
from nnfast.errors import SettingsError, WorkerDiedError  # noqa: E402
from nnfast.native import available_cores, threads_per_worker  # noqa: E402
from nnfast.native._jit import THREAD_ENV  # noqa: E402
from nnfast.parallel import run_tasks  # noqa: E402
from nnfast.workers import create_shared_block, died_error, start_workers, stop_workers, wait  # noqa: E402


def test_threads_per_worker_is_cores_over_workers():
    cores = available_cores()
    assert threads_per_worker(1) == cores
    assert threads_per_worker(cores) == 1
    assert threads_per_worker(10 * cores) == 1  # at least one
    assert threads_per_worker(0) == cores
    for w in range(1, 2 * cores + 1):
        assert w * threads_per_worker(w) <= max(cores, w)


@pytest.mark.timeout(120)
def test_workers_get_their_thread_count_at_start_up_and_the_parent_env_is_untouched():
    before = dict(os.environ)
    out = run_tasks(tasks.thread_settings, [0, 1], workers=2, threads_per_worker=1, warmup=False)
    assert dict(os.environ) == before
    for env, numba_threads, torch_threads in out:
        assert env == {k: "1" for k in THREAD_ENV}
        assert numba_threads == 1 and torch_threads == 1


def _fake(exitcode, pid=123):
    return SimpleNamespace(pid=pid, proc=SimpleNamespace(exitcode=exitcode))


def test_died_error_names_the_signal_what_it_was_doing_and_advice():
    err = died_error(_fake(-signal.SIGKILL), role="worker process", doing="while processing case x",
                     advice="rerun with --workers 1 or less")
    assert isinstance(err, WorkerDiedError) and isinstance(err, RuntimeError)
    assert str(err) == ("worker process 123 was killed by SIGKILL (SIGKILL usually means the out-of-memory killer "
                        "stopped it) while processing case x; rerun with --workers 1 or less.")
    assert err.exitcode == -signal.SIGKILL
    err = died_error(_fake(-signal.SIGBUS), role="loader worker process", doing="while building batch 3",
                     advice="use fewer loader workers", shm_bytes=64 * 2**20)
    assert "SIGBUS" in str(err) and "/dev/shm is full: this pool needs 64 MiB" in str(err)
    assert "exited with code 3 between tasks" in str(died_error(_fake(3), role="w", doing="between tasks", advice="a"))
    assert "closed its pipe" in str(died_error(_fake(None), role="w", doing="x", advice="a"))


@pytest.mark.timeout(120)
def test_stop_escalates_to_sigkill_for_a_worker_that_ignores_the_sentinel_and_sigterm():
    (w,) = start_workers(1, tasks.stubborn_setup, (), threads=1, name="nnfast-test")
    try:
        deadline = time.monotonic() + 60
        while not w.ready and time.monotonic() < deadline:
            if w.conn in wait([w], timeout=1.0):
                w.ready = w.recv()[0] == "ready"
        assert w.ready
        assert w.send((0, None))  # busy for ever: it never reads the sentinel
        proc, pid, codes = w.proc, w.pid, []
        real_join = proc.join

        def join(timeout=None):  # record the exit code after each join (the handle is closed afterwards)
            real_join(timeout)
            codes.append(proc.exitcode)

        proc.join = join
        t0 = time.monotonic()
        stop_workers([w], graceful=True, join_s=0.5)
        assert time.monotonic() - t0 < 5
        assert codes[0] is None and codes[-1] == -signal.SIGKILL  # the sentinel and SIGTERM did nothing
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        try:
            w.proc.kill()  # pragma: no cover - only when an assertion failed before the stop
        except (ValueError, AttributeError):
            pass


def test_shared_block_space_is_checked_first():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with pytest.raises(SettingsError, match=r"the test ring needs .* MiB of shared memory but /dev/shm has"):
        create_shared_block("nnfast_test_", 2**62, "the test ring", "use less")
