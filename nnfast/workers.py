"""The worker core: spawned worker processes, their pipes, shared memory, death diagnosis and stopping.

nnfast has two process pools, both built on this module: :func:`nnfast.parallel.run_tasks` (one task per case:
fingerprint, preprocessing, evaluation) and :class:`nnfast.data.loader.PatchLoader` (training batches). What they
share lives here, once:

* **spawn**: :func:`start_workers` starts ``n`` processes with the ``spawn`` start method (no forked CUDA, Numba or
  thread state), each with its own duplex pipe. Every child runs :func:`_child_main`: it ignores SIGINT (the parent
  handles Ctrl-C and stops its workers), applies the thread count the parent decided (see below), calls the pool's
  ``setup(*args)`` to get a task handler, says ``ready`` and serves tasks until it receives ``None`` or its parent's
  pipe closes.
* **messages** are 4-tuples ``(kind, index, value, extra)``: ``("ready", -1, None, None)``, ``("ok", index, result,
  peak_rss_bytes)`` and ``("error", index, PackedError, None)`` (:func:`nnfast.ipc.send_error`; index ``-1`` is a
  failure while starting). What may cross a pipe is :mod:`nnfast.ipc`'s business.
* **thread policy**: the parent decides one thread count per worker with
  :func:`nnfast.native._jit.threads_per_worker` (``workers x threads <= cores``) unless the caller gives one; the
  child sets the thread-count environment variables (:data:`nnfast.native._jit.THREAD_ENV`) to it before its task's
  modules load and calls :func:`nnfast.native._jit.limit_threads` for what is loaded already (Numba, torch,
  SimpleITK, Blosc, BLAS). The parent's ``os.environ`` is never touched.
* **death diagnosis**: the parent waits on the pipes and the process sentinels together (:func:`wait`), so a worker
  that dies (the out-of-memory killer's SIGKILL, a segfault, SIGBUS from a full ``/dev/shm``, ``os._exit``) is
  noticed at once; :func:`died_error` turns its exit code into a :class:`~nnfast.errors.WorkerDiedError` that names
  the signal, what the worker was doing (the case or batch) and what to do (fewer workers).
* **stop escalation**: :func:`stop_workers` sends the ``None`` sentinel, then SIGTERM, then SIGKILL, joins every
  process and closes every pipe; no child outlives its pool.
* **shared memory**: :func:`create_shared_block` checks ``/dev/shm``'s free space first (a full ``/dev/shm`` is a
  SIGBUS in a worker, much later) and :func:`release_shared_block` always unlinks.

What stays in the pools is their scheduling, which differs by design: ``run_tasks`` gives each worker one task at a
time, largest first, and keeps going when an idle worker dies; the loader keeps up to ``num_cached`` batches in
flight, spread over the workers, and delivers them in index order from its ring of shared-memory slots (batch ``i``
in slot ``i % num_cached``).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from .errors import SettingsError, InputTypeError, WorkerDiedError
from .ipc import send_error

if TYPE_CHECKING:
    from multiprocessing.shared_memory import SharedMemory

__all__ = ["Worker", "start_workers", "wait", "died_error", "stop_workers", "create_shared_block",
           "release_shared_block", "peak_rss"]

logger = logging.getLogger(__name__)

#: ``setup(*args) -> handler``; ``handler(index, item) -> result``, optionally with a ``close()`` method.
Setup = Callable[..., Callable[[int, Any], Any]]


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (``ru_maxrss``: kibibytes on Linux, bytes on macOS)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ------------------------------------------------------------------------------------------------- child
def _child_main(conn, threads: int, setup: Setup, args: tuple) -> None:
    """Entry point of every spawned worker: threads, set-up, then serve ``(index, item)`` tasks until ``None``."""
    from .native._jit import THREAD_ENV, limit_threads  # the thread policy; Numba loads in limit_threads

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    for var in THREAD_ENV:  # before the set-up imports NumPy/Numba/torch, which read them once
        os.environ[var] = str(threads)
    handler = None
    try:
        limit_threads(threads)
        handler = setup(*args)
    except BaseException as exc:  # report set-up failures instead of dying silently
        send_error(conn, -1, exc, None)
        return
    try:
        _serve(conn, handler)
    finally:
        close = getattr(handler, "close", None)
        if close is not None:
            close()


def _serve(conn, handler: Callable[[int, Any], Any]) -> None:
    try:
        conn.send(("ready", -1, None, None))
    except (BrokenPipeError, EOFError, OSError):
        return
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        index, item = task
        try:
            result = handler(index, item)
        except BaseException as exc:
            if not send_error(conn, index, exc, None):
                return
            continue
        try:
            conn.send(("ok", index, result, peak_rss()))
        except (BrokenPipeError, EOFError, OSError):
            return
        except Exception as exc:  # the result cannot be pickled: nothing was written yet, report that
            if not send_error(conn, index, InputTypeError(
                    f"the result of {getattr(handler, '__name__', 'the task')!r} cannot be sent to the parent "
                    f"process: {type(exc).__name__}: {exc}"), None):
                return


# ------------------------------------------------------------------------------------------------ parent
class Worker:
    """One spawned worker: its process, the parent's end of its pipe and the tasks it holds (oldest first)."""

    __slots__ = ("proc", "conn", "ready", "tasks", "rss_seen")

    def __init__(self, proc, conn) -> None:
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.tasks: list[int] = []
        self.rss_seen = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: Any) -> bool:
        """Send a task (or ``None``); False when the worker is gone. Pickling errors propagate."""
        try:
            self.conn.send(message)
            return True
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            return False

    def recv(self) -> tuple | None:
        """The next message, or None when the worker is gone (possibly mid-message)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None


def start_workers(n: int, setup: Setup, args: tuple, *, threads: int, name: str) -> list[Worker]:
    """Start ``n`` spawned workers that run ``setup(*args)`` and then serve tasks with ``threads`` threads each.

    ``setup`` must be a module-level function; ``args`` travel with ``multiprocessing``'s pickling (keep them small:
    paths, JSON, specs). On a failure part-way, the workers already started are stopped before re-raising.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers: list[Worker] = []
    try:
        for _ in range(n):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_child_main, args=(child, int(threads), setup, args), name=name, daemon=True)
            try:
                proc.start()
            finally:
                child.close()
            workers.append(Worker(proc, parent))
    except BaseException:
        stop_workers(workers, graceful=False)
        raise
    return workers


def wait(workers: list[Worker], timeout: float | None) -> set:
    """Pipes and process sentinels of ``workers`` that are ready (a message, or an exit) within ``timeout``."""
    import multiprocessing.connection as mpc  # looked up at call time: tests interrupt it

    return set(mpc.wait([w.conn for w in workers] + [w.proc.sentinel for w in workers], timeout=timeout))


def died_error(worker: Worker, *, role: str, doing: str, advice: str, shm_bytes: int | None = None) -> WorkerDiedError:
    """The :class:`~nnfast.errors.WorkerDiedError` for a dead ``worker``: its exit code or signal with what that
    usually means, what it was ``doing`` (e.g. ``"while processing case x"``) and ``advice`` (fewer workers)."""
    code = worker.proc.exitcode
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}" if code is not None else "closed its pipe"
    hint = ""
    if code == -signal.SIGKILL:
        hint = " (SIGKILL usually means the out-of-memory killer stopped it)"
    elif code == -getattr(signal, "SIGBUS", 7):
        need = f": this pool needs {shm_bytes / 2**20:.0f} MiB there" if shm_bytes else ""
        hint = f" (SIGBUS usually means /dev/shm is full{need}; enlarge it, e.g. docker --shm-size)"
    elif code == -getattr(signal, "SIGSEGV", 11):
        hint = " (a crash in native code, or a corrupt input file)"
    err = WorkerDiedError(f"{role} {worker.pid} {how}{hint} {doing}; {advice}.")
    err.exitcode = code
    return err


def stop_workers(workers: list[Worker], *, graceful: bool = True, join_s: float = 5.0) -> None:
    """Stop, join and release every worker: the ``None`` sentinel (when ``graceful``), then SIGTERM, then SIGKILL.

    A worker that has not finished starting cannot read the sentinel yet and is terminated at once. Pipes are closed
    and process handles released, also when a second Ctrl-C interrupts the joins.
    """
    try:
        if graceful:
            for w in workers:
                try:
                    while not w.ready and w.conn.poll():  # did it finish starting?
                        w.ready = w.conn.recv()[0] == "ready" or w.ready
                except (EOFError, OSError, ValueError):
                    pass
                if w.ready:
                    w.send(None)
            deadline = time.monotonic() + join_s
            for w in workers:
                if w.ready:
                    w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.proc.is_alive():
                w.proc.terminate()
        deadline = time.monotonic() + join_s
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():  # ignored SIGTERM
                w.proc.kill()
                w.proc.join()
    finally:
        for w in workers:
            w.conn.close()
            if w.proc.exitcode is not None:
                w.proc.close()


# ------------------------------------------------------------------------------------------ shared memory
def create_shared_block(prefix: str, nbytes: int, what: str, advice: str) -> SharedMemory:
    """A new ``multiprocessing.shared_memory.SharedMemory`` named ``<prefix><pid>_<random>`` of ``nbytes``.

    Raises
    ------
    SettingsError
        ``/dev/shm`` has less than ``nbytes`` free; the message says what needs it (``what``) and ``advice``.
    """
    import uuid
    from multiprocessing import shared_memory

    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # no /dev/shm (macOS, Windows): nothing to check
        pass
    else:
        free = st.f_bavail * st.f_frsize
        if nbytes > free:
            raise SettingsError(f"{what} needs {nbytes / 2**20:.0f} MiB of shared memory but /dev/shm has "
                                f"{free / 2**20:.0f} MiB free; {advice}, or enlarge /dev/shm (docker: --shm-size)")
    return shared_memory.SharedMemory(name=f"{prefix}{os.getpid()}_{uuid.uuid4().hex[:12]}", create=True,
                                      size=max(1, int(nbytes)))


def release_shared_block(shm: SharedMemory | None) -> None:
    """Close and unlink ``shm``; an exported view still alive does not stop the unlink."""
    if shm is None:
        return
    try:
        shm.close()
    except BufferError:  # a view is still referenced somewhere; unlinking still frees the name
        logger.debug("shared memory %s still has exported views", shm.name)
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
