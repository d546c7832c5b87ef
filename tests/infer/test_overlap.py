"""The prepare -> compute -> finish overlap of ``nnfast predict`` (``nnfast.infer.overlap.StagePipeline``)."""
from __future__ import annotations

import queue
import threading
import time

import pytest

from nnfast.infer import overlap
from nnfast.infer.overlap import Outcome, StagePipeline


def _run(pipeline: StagePipeline, items) -> list[Outcome]:
    got: list[Outcome] = []
    pipeline.run(items, got.append)
    return got


def test_results_in_order_and_one_outcome_per_item():
    seen_threads = {}

    def prepare(i):
        seen_threads.setdefault("prepare", set()).add(threading.current_thread().name)
        return i * 10

    def compute(i, x):
        seen_threads.setdefault("compute", set()).add(threading.current_thread().name)
        return x + 1

    def finish(i, y):
        time.sleep(0.002 * (i % 3))  # finishes complete out of order; outcomes do not
        seen_threads.setdefault("finish", set()).add(threading.current_thread().name)
        return (i, y)

    p = StagePipeline(prepare, compute, finish, workers=3, name="t")
    out = _run(p, range(20))
    assert [o.item for o in out] == list(range(20)) and all(o.ok for o in out)
    assert [o.result for o in out] == [(i, i * 10 + 1) for i in range(20)]
    assert seen_threads["prepare"] == {"t-prepare"}
    assert seen_threads["compute"] == {threading.current_thread().name}
    assert all(n.startswith("t-finish") for n in seen_threads["finish"])
    assert set(p.seconds) == {"prepare", "compute", "finish"} and all(v >= 0 for v in p.seconds.values())
    assert _run(p, []) == []


def test_an_error_fails_only_its_item():
    def prepare(i):
        if i == 1:
            raise ValueError("unreadable")
        return i

    def compute(i, x):
        if i == 2:
            raise RuntimeError("out of memory")
        return x

    def finish(i, y):
        if i == 3:
            raise OSError("disk full")
        return y

    out = {o.item: o for o in _run(StagePipeline(prepare, compute, finish, workers=2), range(5))}
    assert sorted(out) == [0, 1, 2, 3, 4]
    assert [(k, o.stage, type(o.error).__name__) for k, o in sorted(out.items()) if not o.ok] == \
        [(1, "prepare", "ValueError"), (2, "compute", "RuntimeError"), (3, "finish", "OSError")]
    assert out[0].result == 0 and out[4].result == 4


def test_a_producer_that_breaks_ends_the_run():
    def items():
        yield 0
        yield 1
        raise KeyError("listing the cases failed")

    got = []
    p = StagePipeline(lambda i: i, lambda i, x: x, lambda i, y: y)
    with pytest.raises(KeyError, match="listing"):
        p.run(items(), got.append)
    assert [o.item for o in got] == [0, 1]


def test_queues_are_bounded():
    lock = threading.Lock()
    state = {"prepared": 0, "taken": 0, "ahead": 0, "pending": 0, "max_pending": 0}

    def prepare(i):
        with lock:
            state["prepared"] += 1
            state["ahead"] = max(state["ahead"], state["prepared"] - state["taken"])
        return i

    def compute(i, x):
        with lock:
            state["taken"] += 1
            state["pending"] += 1
            state["max_pending"] = max(state["max_pending"], state["pending"])
        time.sleep(0.005)  # a slow network: the producer runs ahead as far as it may
        return x

    def finish(i, y):
        time.sleep(0.02)  # slow exports: computed items wait for them
        with lock:
            state["pending"] -= 1
        return y

    out = _run(StagePipeline(prepare, compute, finish, workers=2, prefetch=1), range(12))
    assert [o.item for o in out] == list(range(12))
    # one item waiting in the queue plus the one being prepared; at most `workers` exports (+ the one just computed)
    assert state["ahead"] <= 2 and state["max_pending"] <= 3, state


def test_a_stop_wakes_a_blocked_producer_and_nothing_polls(monkeypatch):
    timeouts = []

    class Recording(queue.Queue):
        def put(self, item, block=True, timeout=None):
            timeouts.append(timeout)
            return super().put(item, block, timeout)

        def get(self, block=True, timeout=None):
            timeouts.append(timeout)
            return super().get(block, timeout)

    monkeypatch.setattr(overlap.queue, "Queue", Recording)
    before = threading.active_count()

    def compute(i, x):
        if i == 1:
            raise KeyboardInterrupt  # not a per-item failure: ends the run while the producer is blocked
        return x

    p = StagePipeline(lambda i: i, compute, lambda i, y: y, prefetch=1)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        p.run(range(100), lambda o: None)
    assert time.perf_counter() - t0 < 2  # the producer was woken, not waited for
    assert threading.active_count() == before
    assert timeouts and set(timeouts) == {None}
