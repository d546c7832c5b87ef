"""A pytest plugin that records each test phase's CPU seconds beside its wall seconds: where the suite's time goes
(README "Suite time"). CPU is this process's user + system time plus that of the children it waited for (nnU-Net
runs, worker pools), so a test that waits on a subprocess is charged for the subprocess's work::

    PYTHONPATH=benchmarks SUITE_TIME_OUT=/tmp/suite_time.tsv pytest -p suite_time -q

prints the total and the 40 largest phases, and writes every phase (cpu, wall, phase, test id; largest first) to
``SUITE_TIME_OUT`` when set.
"""
from __future__ import annotations

import os
import time

import pytest

_rows: list[tuple[float, float, str, str]] = []


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(phase: str):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item):
        c, w = _cpu(), time.perf_counter()
        yield
        _rows.append((_cpu() - c, time.perf_counter() - w, phase, item.nodeid))

    return hook


pytest_runtest_setup = _timed("setup")
pytest_runtest_call = _timed("call")
pytest_runtest_teardown = _timed("teardown")


def pytest_terminal_summary(terminalreporter):
    rows = sorted(_rows, reverse=True)
    terminalreporter.write_line(f"suite time: {sum(r[0] for r in rows):.1f} s CPU, {sum(r[1] for r in rows):.1f} s "
                                f"wall over {len(rows)} test phases")
    for cpu, wall, phase, node in rows[:40]:
        terminalreporter.write_line(f"{cpu:8.2f} s CPU {wall:8.2f} s wall  {phase:8s} {node}")
    out = os.environ.get("SUITE_TIME_OUT")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(f"{cpu:.2f}\t{wall:.2f}\t{phase}\t{node}\n" for cpu, wall, phase, node in rows)
