"""Run one picklable function per case: in-process, on a watched spawn process pool, or on dask.distributed.

nnU-Net runs its per-case jobs (fingerprint, preprocessing) on a spawn ``multiprocessing.Pool`` and polls
worker liveness; a worker stopped by the out-of-memory killer becomes "Some background worker is 6 feet
under" with no hint of which case did it, or a hang. :func:`run_tasks` keeps
the spawn start method but owns the pool, built on :mod:`nnfast.workers` (the worker core it shares with the patch
loader: spawn, pipes, thread policy, dead-worker diagnosis, stop escalation):

* every worker has its own pipe and the parent knows which case each worker holds, so a dead worker
  (SIGKILL, segfault, ``os._exit``) becomes :class:`~nnfast.errors.WorkerDiedError` naming the case, the
  signal or exit code and how many workers to use instead, as soon as the process sentinel fires;
* a worker holds one task at a time (backpressure: at most ``workers`` tasks in flight, results never pile
  up in pipes) and tasks are handed out largest first when sizes are known, so the big cases do not
  straggle at the end;
* an exception inside the function is re-raised in the parent with the same type and the case key in its
  message, after the other workers have been stopped; no child process outlives the call, also on
  ``KeyboardInterrupt``.

:class:`TaskPool` is the same pool started ahead of its tasks: ``nnfast preprocess --pool processes`` starts its
workers (interpreter, imports, kernel warm-up: ~1-2 s of CPU each) while it still verifies, fingerprints and plans,
then runs each configuration's cases on them. With few workers ``nnfast preprocess`` runs its cases on threads of
its own process instead (:func:`run_in_threads`; :mod:`nnfast.preprocess.api`).

The same tasks can run on a dask cluster (``scheduler="tcp://host:port"``, a ``distributed.Client``, or
``"local:N"`` for a temporary ``LocalCluster``). Importing this module is cheap: Numba, psutil and dask are
imported only when a pool or a scheduler is used.
"""
from __future__ import annotations

import logging
import re
import resource
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Callable, NamedTuple, Sequence, cast

from .errors import SettingsError, InputTypeError, WorkerDiedError, WorkerStartError
from .ipc import PackedError, RemoteTraceback, dumps, loads, send_error, unpack_exception
from .workers import Worker, died_error, start_workers, stop_workers, wait

__all__ = ["run_tasks", "TaskPool", "run_in_threads", "peak_rss_bytes", "PeakRss", "format_bytes"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

_JOIN_TIMEOUT_S = 5.0
_SAMPLE_EVERY_S = 0.5


class PeakRss(NamedTuple):
    """Peak resident set sizes in bytes (``resource.getrusage`` ``ru_maxrss``)."""

    self_bytes: int
    """Peak of the calling process."""
    children_bytes: int
    """Peak of the largest single child process that has been waited for (not a sum over children)."""


def peak_rss_bytes() -> PeakRss:
    """Peak resident memory of this process and of its (terminated, joined) children, in bytes.

    Returns
    -------
    PeakRss
        ``(self_bytes, children_bytes)``; ``children_bytes`` is the largest peak of any one joined child
        process (the kernel keeps a maximum, not a sum), which is the per-worker need of a pool.
    """
    # Linux reports kibibytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return PeakRss(int(own), int(children))


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``; binary units as ``free -h`` prints them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def run_tasks(
    func: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int = 1,
    keys: Sequence[str] | None = None,
    sizes: Sequence[float] | None = None,
    scheduler: Any = None,
    progress: Progress | None = None,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    threads_per_worker: int | None = None,
    desc: str = "cases",
    warmup: bool | tuple[str, ...] = True,
    warmup_in_workers: bool = False,
) -> list:
    """Call ``func(item)`` for every item and return the results in the order of ``items``.

    Parameters
    ----------
    func
        Module-level (picklable) function of one item. Worker processes import its module by name.
    items
        One picklable item per task (e.g. a case identifier, or a small dataclass describing the case).
    workers
        Number of worker processes. ``<= 1`` without ``scheduler`` runs everything in this process.
    keys
        Case key of each item, used in progress, errors and dask task keys; default ``str(item)``.
    sizes
        Cost of each item (e.g. voxel count); tasks are handed out largest first. Default: items order.
    scheduler
        ``None`` (local processes), ``"tcp://host:port"``, a ``distributed.Client``, or ``"local:N"`` to
        run a ``LocalCluster`` of ``N`` single-threaded worker processes for the duration of the call.
    progress
        ``progress(done, total, key)`` called in this process after each completed task.
    initializer, initargs
        ``initializer(*initargs)`` runs once in every process that executes tasks (in this process too
        when ``workers <= 1``) before its first task.
    threads_per_worker
        Threads of each worker process (Numba, BLAS/OpenMP, torch, SimpleITK, Blosc); default ``cores // workers``
        (at least 1), decided by :func:`nnfast.native.threads_per_worker`. Ignored in-process.
    desc
        What the items are, for log messages and dask task keys.
    warmup
        Compile (or load from the on-disk cache) every Numba kernel in this process before starting
        workers, so that workers only load the cache (:func:`nnfast.native.warmup`); a tuple of kernel
        module names (``("crop", "resample")``) warms only those.
    warmup_in_workers
        With a tuple ``warmup``: the processes that run the tasks share the compile with each other and with a
        background compile started earlier (:func:`nnfast.native._jit.warmup_shared`, one lock folder per process
        tree: on a cold cache each compiles part of the kernels, on a warm one each only loads them). With a pool
        this process loads none; in-process, and with a dask scheduler (whose workers on this machine load what
        this process compiled), it takes its share. Tasks start when their process is warm.

    Returns
    -------
    list
        ``[func(item) for item in items]``, whatever the completion order.

    Raises
    ------
    WorkerDiedError
        A worker process died (out-of-memory killer, segfault, ``os._exit``) or a dask task killed its
        workers repeatedly (``KilledWorker``); the message names the case.
    Exception
        Whatever ``func`` raised, re-raised with the same type and ``[case <key>]`` added to its message.
    """
    items = list(items)
    n = len(items)
    case_keys = _case_keys(items, keys)
    order = _submission_order(n, sizes)
    if n == 0:
        return []
    if scheduler is not None:
        from .extras import require

        # a missing dask is named before the kernels compile (tens of seconds on a cold cache), not after
        require("distributed", "running tasks on a dask cluster (--scheduler)")
        if warmup and warmup_in_workers and isinstance(warmup, tuple):
            # share the client's compile with a background one started earlier (a local cluster's workers then
            # load it from the same cache), instead of compiling it again beside it after fingerprinting
            from .native._jit import warmup_lock_dir, warmup_shared

            warmup_shared(tuple(warmup), 1, 2, warmup_lock_dir())
        elif warmup:
            _warmup(warmup)
        return _run_dask(func, items, order, case_keys, scheduler, progress, initializer, initargs,
                         threads_per_worker, desc)
    shared = tuple(warmup) if warmup_in_workers and isinstance(warmup, tuple) else ()
    if workers <= 1 or n == 1:
        if shared:  # this process is the pool: share the compile with a background one, if any (else: all of it)
            from .native._jit import warmup_lock_dir, warmup_shared

            warmup_shared(shared, 1, 2, warmup_lock_dir())
        return _run_inline(func, items, order, case_keys, progress, initializer, initargs)
    if warmup and not shared:
        _warmup(warmup)
    pool_size = min(workers, n)
    logger.info("running %d %s on %d worker processes", n, desc, pool_size)
    return _run_pool(func, items, order, case_keys, progress, initializer, initargs, pool_size, workers,
                     threads_per_worker, shared)


def run_in_threads(
    func: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int = 1,
    keys: Sequence[str] | None = None,
    sizes: Sequence[float] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> list:
    """Call ``func(item)`` for every item on ``workers`` threads of this process; results in the order of ``items``.

    For per-case work whose heavy steps release the GIL (SimpleITK's reader, nogil Numba kernels, NumPy, Blosc):
    no interpreter start-up and no second copy of numba/zarr in memory, which for cheap cases costs more than the
    parallelism gives (measured on 24 CT cases: 2 worker processes were slower than one thread and used 2.5x the
    memory). ``sizes``: tasks start largest first, as in :func:`run_tasks`. An exception is re-raised after the
    tasks not started yet are cancelled, with a note naming the case; on any exit before the end (an error,
    ``KeyboardInterrupt``) no further task starts, ``stop`` (when given) is set so that running tasks that watch it
    can end early, and the tasks already running are waited for (one per thread).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    items = list(items)
    case_keys = _case_keys(items, keys)
    order = _submission_order(len(items), sizes)
    if workers <= 1 or len(items) <= 1:
        return _run_inline(func, items, order, case_keys, progress, None, ())
    results: list = [None] * len(items)
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nnfast")
    try:
        futures = {ex.submit(func, items[i]): i for i in order}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as exc:
                raise _add_case(exc, case_keys[i])
            if progress is not None:
                progress(done, len(items), case_keys[i])
    except BaseException:
        if stop is not None:
            stop.set()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    return results


# --------------------------------------------------------------------------------------------- helpers
def _case_keys(items: list, keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        return [str(item) for item in items]
    keys = [str(k) for k in keys]
    if len(keys) != len(items):
        raise SettingsError(f"run_tasks: got {len(items)} items but {len(keys)} keys; pass one key per item")
    return keys


def _submission_order(n: int, sizes: Sequence[float] | None) -> list[int]:
    if sizes is None:
        return list(range(n))
    sizes = list(sizes)
    if len(sizes) != n:
        raise SettingsError(f"run_tasks: got {n} items but {len(sizes)} sizes; pass one size per item")
    return sorted(range(n), key=lambda i: -float(sizes[i]))  # stable: ties keep the items order


def _warmup(which: bool | tuple[str, ...] = True) -> None:
    from . import native  # imports numba; the attribute lookup lets tests replace native.warmup

    t0 = time.perf_counter()
    if which is True:
        native.warmup()
    else:  # run_tasks calls this only when its `warmup` is set, so `which` is not False here
        native.warmup(tuple(cast(tuple[str, ...], which)))
    logger.debug("numba warm-up took %.2f s", time.perf_counter() - t0)


def _add_case(exc: BaseException, key: str) -> BaseException:
    """Put ``[case <key>]`` into ``exc``'s message, keeping its type and attributes; returns ``exc``."""
    tag = f"[case {key}]"
    if tag in str(exc):
        return exc
    if isinstance(exc, OSError) and exc.strerror is not None:
        exc.strerror = f"{exc.strerror} {tag}"
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} {tag}",) + exc.args[1:]
    elif not exc.args:
        exc.args = (tag,)
    if tag not in str(exc):  # a custom __str__, or a non-string first argument: keep it, add a note
        if hasattr(exc, "add_note"):
            exc.add_note(f"while processing case {key}")
        else:  # pragma: no cover - Python 3.10
            exc.args = exc.args + (tag,)
    return exc


def _run_inline(func, items, order, case_keys, progress, initializer, initargs) -> list:
    if initializer is not None:
        initializer(*initargs)
    results: list = [None] * len(items)
    for done, i in enumerate(order, start=1):
        try:
            results[i] = func(items[i])
        except Exception as exc:
            raise _add_case(exc, case_keys[i])
        if progress is not None:
            progress(done, len(items), case_keys[i])
    return results


# --------------------------------------------------------------------------------------- process pool
def _task_setup(payload: bytes, warm: tuple[str, ...] = (), index: int = 0, count: int = 1,
                lock_dir: str = "") -> Callable[[int, Any], Any]:
    """Set-up of a pool worker (:func:`nnfast.workers.start_workers`): share the warm-up of the ``warm`` kernel modules
    with the pool's other workers (worker ``index`` of ``count``), unpickle the task, run the initializer."""
    if warm:
        from .native._jit import warmup_shared

        t0 = time.perf_counter()
        warmup_shared(warm, index, count, lock_dir)
        logger.debug("worker %d: numba warm-up took %.2f s", index, time.perf_counter() - t0)
    func, initializer, initargs = loads(payload)
    if initializer is not None:
        initializer(*initargs)

    def handler(index: int, item: Any) -> Any:
        return func(item)

    handler.__name__ = getattr(func, "__name__", "the task")
    return handler


def _send_error(conn, index: int, exc: BaseException) -> bool:
    """Send ``exc`` with its traceback to the parent, as a worker does; False when the parent is gone."""
    return send_error(conn, index, exc, None)


class TaskPool:
    """A :func:`run_tasks` pool of spawned workers for one function, started ahead of its tasks and reusable.

    Its workers start (interpreter, imports, kernel warm-up) while this process still does other work, e.g. verifies
    and plans a dataset before preprocessing it; :meth:`run` hands them tasks when those are known, and may be called
    again (one call per configuration). Use it as a context manager: leaving the block stops every worker (gracefully
    when the block succeeded), also on an error before the first :meth:`run`. A worker that died while the caller was
    busy elsewhere is reported by the next :meth:`run` like any worker death (``WorkerDiedError``, "while starting").

    Parameters
    ----------
    func, initializer, initargs, threads_per_worker, warmup
        As for :func:`run_tasks` (``warmup``: the kernel modules the workers share the warm-up of,
        ``warmup_in_workers``; empty: none).
    workers
        Number of worker processes (>= 2; with fewer, call :func:`run_tasks` in-process instead).
    """

    def __init__(self, func: Callable[[Any], Any], *, workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = (), threads_per_worker: int | None = None, warmup: tuple[str, ...] = ()):
        if workers < 2:
            raise SettingsError(f"TaskPool needs at least 2 workers, got {workers}; run in-process with run_tasks")
        try:
            self._payload = dumps((func, initializer, initargs))
        except Exception as exc:
            raise InputTypeError(
                f"{workers} worker processes need a module-level (picklable) function, initializer and "
                f"initargs; pickling failed: {type(exc).__name__}: {exc}") from exc
        self.func = func
        self.workers = int(workers)
        self._threads = threads_per_worker
        self._warm = tuple(warmup)
        self.slots: list[Worker] = []
        self._closed = False

    def start(self) -> "TaskPool":
        """Start the workers (returns at once: they import and warm up in the background)."""
        from .native import threads_per_worker

        if self.slots or self._closed:
            return self
        from .native._jit import warmup_lock_dir

        lock_dir = warmup_lock_dir() if self._warm else ""
        threads = self._threads if self._threads is not None else threads_per_worker(self.workers)
        try:
            for i in range(self.workers):  # one at a time: each worker gets its index (its share of the warm-up)
                self.slots += start_workers(1, _task_setup, (self._payload, self._warm, i, self.workers, lock_dir),
                                            name="nnfast-worker", threads=threads)
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def __enter__(self) -> "TaskPool":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(graceful=exc_type is None)

    def close(self, graceful: bool = True) -> None:
        """Stop and join every worker (:func:`nnfast.workers.stop_workers`); the pool cannot run tasks afterwards."""
        slots, self.slots = self.slots, []
        self._closed = True
        stop_workers(slots, graceful=graceful, join_s=_JOIN_TIMEOUT_S)

    def run(self, items: Sequence[Any], *, keys: Sequence[str] | None = None, sizes: Sequence[float] | None = None,
            progress: Progress | None = None, desc: str = "cases") -> list:
        """``[func(item) for item in items]`` on the pool's workers (see :func:`run_tasks` for the arguments, the
        order of hand-out and the errors). After an error the pool is closed."""
        items = list(items)
        if self._closed:
            raise SettingsError("this TaskPool is closed; start a new one")
        self.start()
        case_keys = _case_keys(items, keys)
        order = _submission_order(len(items), sizes)
        if not items:
            return []
        ok = False
        try:
            self._drop_dead(case_keys)
            logger.info("running %d %s on %d worker processes", len(items), desc, len(self.slots))
            results = _serve_tasks(self.slots, items, order, case_keys, progress, self.workers)
            ok = True
            return results
        finally:
            if not ok:
                self.close(graceful=False)


    def _drop_dead(self, case_keys: list[str]) -> None:
        """Workers that died after starting, while holding no task (killed while the caller was busy elsewhere): no
        work is lost, so go on with the others (a warning naming how each died); ``WorkerDiedError`` when none is left
        or when one died while starting (as :func:`run_tasks`: a failed start is rarely a one-off)."""
        for slot in list(self.slots):
            try:
                while not slot.ready and slot.conn.poll():  # it may have said "ready", or why it failed, before dying
                    kind, _index, value, _peak = slot.conn.recv()
                    if kind == "error":
                        _raise_task_error(value, None)
                    slot.ready = kind == "ready"
            except (EOFError, OSError):
                pass
            if slot.proc.exitcode is None:
                continue
            err = _died_error(slot, case_keys, self.workers, 0)
            if len(self.slots) == 1 or not slot.ready:
                raise err
            logger.warning("%s Continuing with %d workers.", err, len(self.slots) - 1)
            self.slots.remove(slot)
            stop_workers([slot], graceful=False)


def _run_pool(func, items, order, case_keys, progress, initializer, initargs, pool_size, workers,
              threads, warm: tuple[str, ...] = ()) -> list:
    from .native import threads_per_worker

    with TaskPool(func, workers=pool_size, initializer=initializer, initargs=initargs, warmup=warm,
                  threads_per_worker=threads if threads is not None else threads_per_worker(workers)) as pool:
        return _serve_tasks(pool.slots, items, order, case_keys, progress, workers)


def _serve_tasks(slots: list[Worker], items: list, order: list[int], case_keys: list[str], progress: Progress | None,
                 workers: int) -> list:
    """Hand ``items`` to the started workers ``slots`` (one task per idle worker, in ``order``) and collect the
    results; a worker that dies holding a task (or while starting, or the last one) raises ``WorkerDiedError``, an
    idle one that dies is dropped from ``slots`` and the others go on."""
    n = len(items)
    results: list = [None] * n
    pending = list(reversed(order))  # pop() from the end gives the next task to hand out
    done = 0
    peak_seen = 0
    last_sample = 0.0
    while done < n:
        for slot in slots:  # hand out work: one task per idle worker
            if slot.ready and not slot.tasks and pending:
                slot.tasks.append(pending.pop())
                try:
                    slot.send((slot.tasks[0], items[slot.tasks[0]]))  # if it died, its sentinel says so below
                except Exception as exc:
                    raise InputTypeError(f"the item of case {case_keys[slot.tasks[0]]} cannot be sent to a worker "
                                         f"process: {type(exc).__name__}: {exc}") from exc
        ready = wait(slots, timeout=_SAMPLE_EVERY_S)
        for slot in list(slots):
            msg = slot.recv() if slot.conn in ready else None
            if msg is not None:
                kind, index, value, peak = msg
                if kind == "ready":
                    slot.ready = True
                    continue
                if kind == "error":
                    _raise_task_error(value, case_keys[index] if index >= 0 else None)
                results[index] = value
                peak_seen = max(peak_seen, peak)
                slot.tasks.clear()
                done += 1
                if progress is not None:
                    progress(done, n, case_keys[index])
            elif slot.conn in ready or slot.proc.sentinel in ready:
                if slot.conn not in ready and slot.conn.poll():
                    continue  # a last message arrived before the exit: read it first
                slot.proc.join(_JOIN_TIMEOUT_S)
                err = _died_error(slot, case_keys, workers, peak_seen)
                if slot.tasks or not slot.ready or len(slots) == 1:
                    raise err
                # An idle worker died (the OOM killer may pick one holding memory from its last case):
                # no work is lost, go on with the others.
                logger.warning("%s Continuing with %d workers.", err, len(slots) - 1)
                slots.remove(slot)
                stop_workers([slot], graceful=False)
        now = time.monotonic()
        if now - last_sample >= _SAMPLE_EVERY_S:
            last_sample = now
            _sample_rss(slots)
    return results


def _raise_task_error(value, key: str | None):
    exc = unpack_exception(value)
    if key is None:
        packed = PackedError(*value)
        raise WorkerStartError(f"a worker process failed to start: {packed.type_name}: {packed.message}") \
            from exc.__cause__
    raise _add_case(exc, key) from exc.__cause__


def _sample_rss(slots: list[Worker]) -> None:
    try:
        import psutil
    except ImportError:  # psutil is optional (nnfast[psutil]): the message then says less about memory
        return
    for slot in slots:
        try:
            slot.rss_seen = max(slot.rss_seen, psutil.Process(slot.proc.pid).memory_info().rss)
        except (psutil.Error, ValueError):
            pass


def _died_error(slot: Worker, case_keys: list[str], workers: int, peak_seen: int) -> WorkerDiedError:
    if not slot.ready:
        doing = ("while starting (importing the task function's module or running the initializer; its "
                 "output above says why)")
    elif not slot.tasks:
        doing = "between tasks"
    else:
        doing = f"while processing case {case_keys[slot.tasks[0]]}"
    need = max(peak_seen, slot.rss_seen)
    advice = f"rerun with --workers {max(1, workers - 1)} or less"
    if need:
        advice += f"; each worker needed at least about {format_bytes(need)} of memory"
        try:
            import psutil

            total = psutil.virtual_memory().total
            advice += f" and this machine has {format_bytes(total)}"
        except Exception:  # pragma: no cover
            pass
    err = died_error(slot, role="worker process", doing=doing, advice=advice)
    err.case = case_keys[slot.tasks[0]] if slot.tasks else None
    return err


# ----------------------------------------------------------------------------------------------- dask
_DASK_LOCK = threading.Lock()
_DASK_READY: set[str] = set()


def _dask_call(func, item, token: str, initializer, initargs, threads_by_host: dict, threads: int | None):
    """Runs on a dask worker: set threads (the pools' policy, with the task slots of this host as the workers) and,
    once per process and call, run the initializer; then the task."""
    from .native import limit_threads, threads_per_worker

    if threads is None:
        host = None
        try:
            from distributed import get_worker
            from distributed.comm import get_address_host

            host = get_address_host(get_worker().address)
        except Exception:
            pass
        threads = threads_per_worker(threads_by_host.get(host, 1))
    limit_threads(threads)
    if initializer is not None:
        with _DASK_LOCK:
            if token not in _DASK_READY:
                initializer(*initargs)
                _DASK_READY.add(token)
    return func(item)


def _killed_error(futures, index_of_key, case_keys, killed_type) -> WorkerDiedError:
    """The ``WorkerDiedError`` for a ``KilledWorker``, naming every case that failed with it.

    When a worker dies, dask marks every task assigned to it (the one executing and those queued beside
    it); with few allowed failures an innocent queued task can fail first, so collect them all.
    """
    from distributed import wait

    try:
        wait(futures, timeout=1.0)  # the errors of one worker death arrive together; give them a moment
    except Exception:
        pass
    cases = [case_keys[index_of_key[f.key]] for f in futures
             if f.status == "error" and isinstance(f.exception(), killed_type)]
    if len(cases) == 1:
        what = f"case {cases[0]}"
    else:
        what = (f"one of the cases {', '.join(cases)} (dask fails every task that was on a dying worker and "
                f"cannot tell which one killed it)")
    err = WorkerDiedError(
        f"dask workers died repeatedly while processing {what}; the out-of-memory killer is the usual "
        f"cause: use fewer workers per machine or give each more memory (the worker logs say more).")
    err.case = cases[0] if cases else None
    err.exitcode = None
    return err


def _open_client(scheduler):
    """``(client, cluster_to_close_or_None, close_client)`` for the accepted ``scheduler`` values."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, None, False
    if isinstance(scheduler, str) and scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise SettingsError(f"scheduler={scheduler!r}: expected 'local:N' with N >= 1 worker processes")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        try:
            return Client(cluster), cluster, True
        except BaseException:
            cluster.close()
            raise
    if isinstance(scheduler, str):
        return Client(scheduler), None, True
    raise InputTypeError(f"scheduler must be None, 'tcp://host:port', 'local:N' or a distributed.Client; "
                     f"got {type(scheduler).__name__}")


def _run_dask(func, items, order, case_keys, scheduler, progress, initializer, initargs, threads, desc) -> list:
    from .extras import require

    require("distributed", "running tasks on a dask cluster (--scheduler)")
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    client, cluster, close_client = _open_client(scheduler)
    futures: list = []
    try:
        slots_by_host: dict[str, int] = {}
        try:
            workers_info = client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:  # distributed < 2025 lists every worker without being asked
            workers_info = client.scheduler_info()["workers"]
        for info in workers_info.values():
            slots_by_host[info["host"]] = slots_by_host.get(info["host"], 0) + int(info.get("nthreads", 1))
        token = uuid.uuid4().hex[:12]
        n = len(items)
        index_of_key: dict[str, int] = {}
        for rank, i in enumerate(order):
            key = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', desc)}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', case_keys[i])}" \
                  f"-{i}-{token}"
            index_of_key[key] = i
            futures.append(client.submit(_dask_call, func, items[i], token, initializer, initargs, slots_by_host,
                                         threads, key=key, pure=False, priority=n - rank))
        logger.info("running %d %s on dask scheduler %s", n, desc, client.scheduler.address)
        results: list = [None] * n
        done = 0
        for fut in as_completed(futures):
            i = index_of_key[fut.key]
            if fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, KilledWorker):
                    raise _killed_error(futures, index_of_key, case_keys, KilledWorker) from exc
                tb = "".join(traceback.format_tb(fut.traceback())) if fut.traceback() is not None else ""
                raise _add_case(exc, case_keys[i]) from RemoteTraceback(tb)
            results[i] = fut.result()
            done += 1
            if progress is not None:
                progress(done, n, case_keys[i])
        return results
    finally:
        if futures:
            try:
                client.cancel(futures)
            except Exception:  # pragma: no cover - closing anyway
                pass
        if close_client:
            client.close()
        if cluster is not None:
            cluster.close()
