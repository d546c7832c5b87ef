"""Tests of :mod:`nnfast.parallel`: ordering, largest-first hand-out, error and dead-worker reporting, cleanup,
and the dask.distributed path."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

# Spawned workers (and dask worker processes) inherit sys.path, so they can import the task module by name
# whatever pytest's import mode is.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _parallel_tasks as tasks  # noqa: E402

from nnfast import native  # noqa: E402
from nnfast.errors import WorkerDiedError  # noqa: E402
from nnfast.parallel import _raise_task_error, _send_error, format_bytes, peak_rss_bytes, run_tasks  # noqa: E402


def _our_workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name == "nnfast-worker"]


def _assert_no_workers_left(pid_dir: Path) -> None:
    pids = [int(p.name) for p in pid_dir.iterdir()]
    assert pids, "the tasks did not run in any worker"
    assert os.getpid() not in pids, "the tasks ran in the test process, not in workers"
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    assert alive == [], f"worker processes left running: {alive}"
    assert _our_workers() == []


def _misbehaving_items(tmp_path: Path, bad: str) -> tuple[list, list[str]]:
    keys = ["case_a", "case_b", bad, "case_c", "case_d"]
    return [(k, str(tmp_path)) for k in keys], keys


def test_import_is_light():
    """Spawned workers import nnfast.parallel first: it must not pull in torch, zarr, dask or numba."""
    import subprocess

    code = ("import sys, nnfast.parallel; "
            "print(sorted(m for m in ('torch', 'zarr', 'dask', 'distributed', 'numba', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------- in-process
def test_inline_results_in_order_with_progress_and_initializer():
    calls = []
    out = run_tasks(tasks.read_state, [3, 1, 2], workers=1, initializer=tasks.set_state, initargs=("init",),
                    progress=lambda d, t, k: calls.append((d, t, k)), sizes=[1, 3, 2], keys=["a", "b", "c"])
    assert [x for x, _, _ in out] == [3, 1, 2]
    assert all(state == "init" for _, state, _ in out)
    # largest first (b, c, a), one progress call per task
    assert calls == [(1, 3, "b"), (2, 3, "c"), (3, 3, "a")]


def test_inline_error_names_case_and_keeps_type(tmp_path):
    items, keys = _misbehaving_items(tmp_path, "case_valueerror")
    with pytest.raises(ValueError, match=r"intensities are all NaN \[case case_valueerror\]"):
        run_tasks(tasks.misbehave, items, keys=keys, workers=1)


def test_argument_validation():
    assert run_tasks(tasks.square, [], workers=4) == []
    with pytest.raises(ValueError, match="3 items but 2 keys"):
        run_tasks(tasks.square, [1, 2, 3], keys=["a", "b"])
    with pytest.raises(ValueError, match="3 items but 1 sizes"):
        run_tasks(tasks.square, [1, 2, 3], sizes=[1])
    with pytest.raises(TypeError, match="module-level"):
        run_tasks(lambda x: x, [1, 2], workers=2, warmup=False)
    assert _our_workers() == []


# ------------------------------------------------------------------------------------------ process pool
@pytest.mark.timeout(60)
def test_pool_results_in_order_threads_initializer_and_warmup_first(monkeypatch):
    warmed = []
    monkeypatch.setattr(native, "warmup", lambda: warmed.append(_our_workers()))
    calls = []
    items = [5, 3, 8, 1, 9, 2, 7]
    out = run_tasks(tasks.read_state, items, workers=2, initializer=tasks.set_state, initargs=({"k": 1},),
                    progress=lambda d, t, k: calls.append((d, t, k)))
    assert [x for x, _, _ in out] == items
    assert all(state == {"k": 1} for _, state, _ in out)
    expected_threads = max(1, min(native.available_cores() // 2, __import__("numba").config.NUMBA_NUM_THREADS))
    assert {threads for _, _, threads in out} == {expected_threads}
    assert [d for d, _, _ in calls] == list(range(1, 8)) and {t for _, t, _ in calls} == {7}
    assert sorted(k for _, _, k in calls) == sorted(str(i) for i in items)
    assert warmed == [[]], "warm-up must run once, before any worker is started"
    assert _our_workers() == []
    own, children = peak_rss_bytes()
    assert own > 10 * 2**20 and children > 10 * 2**20  # joined workers are counted
    assert format_bytes(3 * 2**30) == "3.0 GiB"


@pytest.mark.timeout(60)
def test_pool_hands_out_largest_first():
    sizes = [3, 1, 6, 2, 5, 4]
    keys = [f"case_{s}" for s in sizes]
    # start times stand for the hand-out order: each task sleeps long enough (0.5 s) that a worker process
    # descheduled between receiving its task and reading the clock (a loaded 2-core machine, two pytest workers)
    # does not reorder them (0.2 s did, at load 17)
    out = run_tasks(tasks.timed, [(k, 0.5) for k in keys], keys=keys, sizes=sizes, workers=2, warmup=False)
    assert [k for k, _, _ in out] == keys  # results in the order of items
    assert len({pid for _, _, pid in out}) == 2
    start = {k: t for k, t, _ in out}
    rank = {k: r for r, k in enumerate(sorted(keys, key=lambda k: -int(k.split("_")[1])))}
    # with 2 workers, a task ranked at least 2 places later cannot start before this one
    for a in keys:
        for b in keys:
            if rank[a] + 2 <= rank[b]:
                assert start[a] < start[b], (a, b, start)
    first_two = sorted(keys, key=start.get)[:2]
    assert set(first_two) == {"case_6", "case_5"}


@pytest.mark.timeout(60)
def test_pool_exception_names_case_and_stops_workers(tmp_path):
    items, keys = _misbehaving_items(tmp_path, "case_valueerror")
    with pytest.raises(ValueError, match=r"intensities are all NaN \[case case_valueerror\]") as info:
        run_tasks(tasks.misbehave, items, keys=keys, workers=2, warmup=False)
    assert "misbehave" in str(info.value.__cause__)  # the worker's traceback is chained
    _assert_no_workers_left(tmp_path)


def test_worker_error_round_trip_keeps_type_and_attributes():
    """What a worker sends for an exception (``_send_error``) and how the parent re-raises it, over a pipe."""
    parent, child = multiprocessing.Pipe()
    try:
        raise tasks.OddError(7, "odd failure")
    except tasks.OddError as exc:
        assert _send_error(child, 0, exc)
    kind, index, value, _ = parent.recv()
    assert (kind, index) == ("error", 0)
    with pytest.raises(tasks.OddError) as info:
        _raise_task_error(value, "case_odd")
    assert (info.value.code, info.value.detail) == (7, "odd failure")
    assert any("case_odd" in note for note in getattr(info.value, "__notes__", [])) or "case_odd" in str(info.value)
    assert "OddError" in str(info.value.__cause__)  # the worker's traceback

    # SystemExit in a task must not end the parent quietly
    assert _send_error(child, 1, SystemExit(2))
    with pytest.raises(RuntimeError, match=r"SystemExit\(2\) \[case case_exit\]"):
        _raise_task_error(parent.recv()[2], "case_exit")

    # an exception that cannot be pickled arrives as RuntimeError with its type name and message
    class Local(Exception):
        pass

    assert _send_error(child, 2, Local("not importable"))
    with pytest.raises(RuntimeError, match=r"Local: not importable \[case case_local\]"):
        _raise_task_error(parent.recv()[2], "case_local")
    parent.close()
    child.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad, how", [("case_sigkill", "SIGKILL"), ("case_exit3", "exited with code 3")])
def test_pool_dead_worker_names_case_and_signal(tmp_path, bad, how):
    items, keys = _misbehaving_items(tmp_path, bad)
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=how) as info:
        run_tasks(tasks.misbehave, items, keys=keys, workers=2, warmup=False)
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert f"case {bad}" in message and "--workers 1" in message
    assert info.value.case == bad
    assert isinstance(info.value, RuntimeError)
    assert elapsed < 15, f"a dead worker took {elapsed:.1f} s to notice"
    _assert_no_workers_left(tmp_path)


@pytest.mark.timeout(60)
def test_pool_keyboard_interrupt_leaves_no_workers(tmp_path):
    items, keys = _misbehaving_items(tmp_path, "case_e")

    def interrupt(done, total, key):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tasks(tasks.misbehave, items, keys=keys, workers=2, warmup=False, progress=interrupt)
    _assert_no_workers_left(tmp_path)


@pytest.mark.timeout(60)
def test_pool_failing_initializer_is_reported():
    with pytest.raises(RuntimeError, match="failed to start: TypeError"):
        run_tasks(tasks.square, [1, 2], workers=2, initializer=tasks.square, initargs=("x",), warmup=False)
    assert _our_workers() == []


# ------------------------------------------------------------------------------------------------- dask
@pytest.fixture(scope="module")
def dask_client():
    dask = pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    # no retries: a task that kills its worker fails at once (the default retries it on 3 workers)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=50)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.timeout(120)
def test_dask_local_cluster_matches_local():
    pytest.importorskip("distributed")
    items = [5, 3, 8, 1, 9, 2, 7]
    calls = []
    local = run_tasks(tasks.read_state, items, workers=1, initializer=tasks.set_state, initargs=("s",))
    out = run_tasks(tasks.read_state, items, scheduler="local:2", initializer=tasks.set_state, initargs=("s",),
                    sizes=items, warmup=False, progress=lambda d, t, k: calls.append(d))
    assert [(x, s) for x, s, _ in out] == [(x, s) for x, s, _ in local] == [(x, "s") for x in items]
    assert calls == list(range(1, 8))


@pytest.mark.timeout(120)
def test_dask_error_names_case(dask_client, tmp_path):
    items, keys = _misbehaving_items(tmp_path, "case_valueerror")
    with pytest.raises(ValueError, match=r"intensities are all NaN \[case case_valueerror\]"):
        run_tasks(tasks.misbehave, items, keys=keys, scheduler=dask_client, warmup=False)
    assert dask_client.status == "running"  # a Client passed in is not closed


@pytest.mark.timeout(120)
def test_dask_killed_worker_names_case(dask_client, tmp_path):
    items, keys = _misbehaving_items(tmp_path, "case_sigkill")
    with pytest.raises(WorkerDiedError, match="case_sigkill") as info:
        run_tasks(tasks.misbehave, items, keys=keys, scheduler=dask_client, warmup=False)
    # dask fails the tasks queued on the dying worker too; the ones that had finished are not blamed
    assert "case_a" not in str(info.value)


def test_run_in_threads_keeps_order_and_names_the_failing_case():
    import time as _time

    from nnfast.parallel import run_in_threads

    def slow_square(x):
        _time.sleep(0.01 * (5 - x))  # later items finish first
        return x * x

    seen = []
    assert run_in_threads(slow_square, range(5), workers=2, progress=lambda d, t, k: seen.append(k)) == [0, 1, 4, 9, 16]
    assert sorted(seen) == ["0", "1", "2", "3", "4"]

    def boom(x):
        if x == 3:
            raise ValueError("bad input")
        return x

    with pytest.raises(ValueError, match=r"bad input \[case c3\]"):
        run_in_threads(boom, range(5), workers=2, keys=[f"c{i}" for i in range(5)])


def test_run_in_threads_starts_the_largest_first_and_nothing_after_an_interrupt():
    import threading

    from nnfast.parallel import run_in_threads

    started = []
    lock = threading.Lock()

    def record(x):
        with lock:
            started.append(x)
        return x

    sizes = [3, 9, 1, 7, 5]
    assert run_in_threads(record, range(5), workers=1, sizes=sizes) == [0, 1, 2, 3, 4]
    assert started == [1, 3, 4, 0, 2]  # one thread: exactly largest first
    started.clear()
    assert run_in_threads(record, range(5), workers=2, sizes=sizes) == [0, 1, 2, 3, 4]
    assert started[:2] in ([1, 3], [3, 1])

    started.clear()

    def held(x):
        record(x)
        time.sleep(0.2)
        return x

    def interrupt(done, total, key):
        raise KeyboardInterrupt

    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt):
        run_in_threads(held, range(20), workers=2, progress=interrupt, stop=stop)
    assert stop.is_set()  # the running tasks were told to end early
    # the two running when the first finished (and at most one more that had started meanwhile); not the 20
    assert 2 <= len(started) <= 4, started


# ------------------------------------------------------------------------------------ pool started early
@pytest.mark.timeout(60)
def test_task_pool_started_ahead_serves_several_runs_in_the_same_workers():
    from nnfast.parallel import TaskPool

    with TaskPool(tasks.timed, workers=2) as pool:
        assert len(_our_workers()) == 2  # started before any task is known
        started = {slot.pid for slot in pool.slots}
        time.sleep(0.5)  # the caller does other work meanwhile
        first = pool.run([("a", 0.2), ("b", 0.2), ("c", 0.2)], keys=["a", "b", "c"], sizes=[1, 3, 2])
        second = pool.run([("d", 0.2), ("e", 0.2)], keys=["d", "e"])
        assert pool.run([]) == []
    assert [k for k, _, _ in first] == ["a", "b", "c"] and [k for k, _, _ in second] == ["d", "e"]
    assert {pid for _, _, pid in first + second} <= started  # both runs on the workers started ahead
    assert _our_workers() == []


@pytest.mark.timeout(60)
def test_task_pool_worker_killed_while_the_caller_was_busy_is_dropped_with_a_warning(tmp_path, caplog):
    import logging
    import signal

    from nnfast.parallel import TaskPool

    items, keys = _misbehaving_items(tmp_path, "case_e")
    with caplog.at_level(logging.WARNING, logger="nnfast.parallel"):
        with TaskPool(tasks.misbehave, workers=2) as pool:
            victim = pool.slots[0].proc
            assert pool.slots[0].conn.poll(30)  # it has started ("ready" waits in its pipe)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            out = pool.run(items, keys=keys)
    assert out == keys  # no task was lost: the other worker did them all
    assert any("SIGKILL" in r.getMessage() and "Continuing with 1 workers" in r.getMessage() for r in caplog.records)
    assert len({p.name for p in tmp_path.iterdir()}) == 1  # one worker ran every task
    _assert_no_workers_left(tmp_path)


@pytest.mark.timeout(60)
def test_task_pool_dead_worker_names_the_case_and_closes_the_pool(tmp_path):
    from nnfast.parallel import TaskPool

    items, keys = _misbehaving_items(tmp_path, "case_sigkill")
    pool = TaskPool(tasks.misbehave, workers=2).start()
    with pytest.raises(WorkerDiedError, match="SIGKILL") as info:
        pool.run(items, keys=keys)
    assert info.value.case == "case_sigkill" and "--workers 1" in str(info.value)
    _assert_no_workers_left(tmp_path)  # closed by the failed run, before any `with` exit
    with pytest.raises(Exception, match="closed"):
        pool.run(items, keys=keys)


@pytest.mark.timeout(60)
def test_task_pool_worker_dead_while_starting_is_an_error():
    from nnfast.parallel import TaskPool

    with TaskPool(tasks.square, workers=2, initializer=os._exit, initargs=(3,)) as pool:
        for slot in pool.slots:
            slot.proc.join(30)
        with pytest.raises(WorkerDiedError, match="exited with code 3 while starting"):
            pool.run([1, 2, 3])
    assert _our_workers() == []


@pytest.mark.timeout(60)
def test_task_pool_left_by_an_error_before_its_first_run_stops_its_workers():
    from nnfast.parallel import TaskPool

    with pytest.raises(ValueError, match="verification failed"):
        with TaskPool(tasks.square, workers=2):
            assert len(_our_workers()) == 2
            raise ValueError("verification failed")  # e.g. planning refused the dataset
    assert _our_workers() == []
