"""Three stages of per-item work overlapped on threads, with bounded memory: how ``nnfast predict`` keeps the
network busy.

::

    prepare(item)           one background thread, at most ``prefetch`` prepared items waiting
      -> compute(item, x)   the calling thread (the network), one item at a time
      -> finish(item, y)    ``workers`` threads, at most ``workers`` items pending (the oldest is awaited first)

Every item gets exactly one :class:`Outcome`, delivered on the calling thread: a failure in ``prepare`` or
``compute`` as soon as it happens, finished items in the order they were computed. An ``Exception`` raised by a
stage fails only its item; anything else ends :meth:`StagePipeline.run` with that exception once the threads are
stopped (an error while iterating the items after the items computed so far are finished and reported; a
``KeyboardInterrupt`` in ``compute`` at once). Nothing polls: the threads block on a
bounded queue and on futures, and stopping drains the queue so that a blocked producer wakes up and sees the stop.
Threads, not processes: the stages are expected to release the GIL (NumPy, Numba ``nogil`` kernels, torch).
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

__all__ = ["Outcome", "StagePipeline"]

_END = object()


@dataclass
class Outcome:
    """What became of one item.

    Attributes
    ----------
    item : object
        The item as given.
    result : object
        What ``finish`` returned (None on failure).
    error : Exception or None
        The exception that failed the item.
    stage : str
        ``"prepare"``, ``"compute"`` or ``"finish"``: where it failed (``"finish"`` when it did not).
    """

    item: Any
    result: Any = None
    error: BaseException | None = None
    stage: str = "finish"

    @property
    def ok(self) -> bool:
        return self.error is None


class StagePipeline:
    """Run ``prepare -> compute -> finish`` over items with the overlap described in the module docstring.

    Parameters
    ----------
    prepare : callable
        ``prepare(item) -> x``, on the background thread.
    compute : callable
        ``compute(item, x) -> y``, on the thread calling :meth:`run`.
    finish : callable
        ``finish(item, y) -> result``, on one of ``workers`` threads.
    workers : int
        Finishing threads, and the number of computed items that may wait for them.
    prefetch : int
        Prepared items that may wait for ``compute``.
    name : str
        Prefix of the thread names.

    Attributes
    ----------
    seconds : dict
        Wall time summed over items per stage (``prepare``, ``compute``, ``finish``) of the last :meth:`run`.
    """

    def __init__(self, prepare: Callable[[Any], Any], compute: Callable[[Any, Any], Any],
                 finish: Callable[[Any, Any], Any], *, workers: int = 1, prefetch: int = 1,
                 name: str = "nnfast") -> None:
        self.prepare = prepare
        self.compute = compute
        self.finish = finish
        self.workers = max(1, int(workers))
        self.prefetch = max(1, int(prefetch))
        self.name = name
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def _add_time(self, stage: str, t0: float) -> None:
        with self._lock:
            self.seconds[stage] += time.perf_counter() - t0

    def _produce(self, items: Iterable, ready: queue.Queue, stop: threading.Event) -> None:
        end: tuple = (_END, None, None)
        try:
            for item in items:
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                entry: tuple[Any, Any, BaseException | None]
                try:
                    entry = (item, self.prepare(item), None)
                except Exception as e:  # fails this item only
                    entry = (item, None, e)
                self._add_time("prepare", t0)
                ready.put(entry)  # blocks while `prefetch` items wait; run() drains the queue when it stops
        except BaseException as e:  # reaches run(), which raises it
            end = (_END, None, e)
        if not stop.is_set():
            ready.put(end)

    def _finish(self, item: Any, computed: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.finish(item, computed)
        finally:
            self._add_time("finish", t0)

    def run(self, items: Iterable, on_outcome: Callable[[Outcome], None]) -> None:
        """Process every item, calling ``on_outcome`` (on this thread) once per item.

        Raises
        ------
        BaseException
            What ended the producer other than a per-item ``Exception`` (e.g. iterating ``items`` failed), or what
            ``compute`` / ``on_outcome`` raised other than a per-item ``Exception``.
        """
        self.seconds = {"prepare": 0.0, "compute": 0.0, "finish": 0.0}
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        pending: collections.deque[tuple[Any, Future]] = collections.deque()

        def collect(at_most: int) -> None:
            while len(pending) > at_most:
                item, fut = pending.popleft()
                try:
                    outcome = Outcome(item, result=fut.result())
                except Exception as e:
                    outcome = Outcome(item, error=e, stage="finish")
                on_outcome(outcome)

        producer = threading.Thread(target=self._produce, args=(items, ready, stop), name=f"{self.name}-prepare",
                                    daemon=True)
        producer.start()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix=f"{self.name}-finish") as pool:
                while True:
                    item, prepared, error = ready.get()
                    if item is _END:
                        if error is not None:
                            collect(0)  # what was computed is still finished and reported
                            raise error
                        break
                    if error is not None:
                        on_outcome(Outcome(item, error=error, stage="prepare"))
                        continue
                    t0 = time.perf_counter()
                    try:
                        computed = self.compute(item, prepared)
                    except Exception as e:  # e.g. out of memory: this item fails, the next one still runs
                        on_outcome(Outcome(item, error=e, stage="compute"))
                        continue
                    finally:
                        self._add_time("compute", t0)
                        del prepared
                    collect(self.workers - 1)  # bound the items in flight (and the memory they hold)
                    pending.append((item, pool.submit(self._finish, item, computed)))
                    del computed
                collect(0)
        finally:
            stop.set()
            while True:  # wake a producer blocked on the full queue; it then sees `stop`
                try:
                    ready.get_nowait()
                except queue.Empty:
                    break
            producer.join(timeout=5)
