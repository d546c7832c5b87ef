"""Worker memory estimates and the warning of ``nnfast preprocess`` when ``--workers`` will not fit."""
import logging
import sys
import time

from factories import make_raw_dataset
from nnfast.preprocess import memory
from nnfast.preprocess.memory import (PARENT_BYTES, STREAM_BYTES, WORKER_BASE_BYTES, available_memory_bytes,
                                      case_peak_bytes, max_workers_that_fit, workers_warning)

GIB = 2**30


def test_case_peak_is_the_largest_phase_of_a_streamed_case():
    n_in = 300 * 512 * 512
    # 3D path: passes along y, z (x1.125), then x (x1.2); the largest array a pass holds is the last pass's input
    last_in = 300 * 576 * 576
    assert case_peak_bytes((300, 512, 512), (360, 576, 576)) == WORKER_BASE_BYTES + 4 * last_in + STREAM_BYTES
    # measured 670 MiB for this case (benchmarks/README.md, "Issue 13 goal 3, streamed"): within 10 %
    assert abs(case_peak_bytes((300, 512, 512), (360, 576, 576)) / (670 * 2**20) - 1) < 0.10
    # a second channel waits, cropped, while the first is resampled
    assert case_peak_bytes((300, 512, 512), (360, 576, 576), channels=2) - \
        case_peak_bytes((300, 512, 512), (360, 576, 576)) == 4 * n_in
    # shrinking: the first pass's input (the normalized float32 image) is the largest array
    assert case_peak_bytes((100, 100, 100), (50, 50, 50)) == WORKER_BASE_BYTES + 4 * 10**6 + STREAM_BYTES
    # the separate-z path holds input, output and its in-plane result whole
    assert case_peak_bytes((60, 512, 512), (150, 512, 512), separate_z=True) == \
        WORKER_BASE_BYTES + 4 * (60 * 512 * 512 + 2 * 150 * 512 * 512)


def test_workers_that_fit_and_the_warning():
    peaks = [3 * GIB, 2 * GIB, 2 * GIB, 1 * GIB]
    avail = PARENT_BYTES + 5 * GIB
    assert max_workers_that_fit(peaks, avail) == 2  # the largest two: 5 GiB
    assert max_workers_that_fit(peaks, GIB) == 1  # never below one
    assert workers_warning(peaks, 2, avail) is None
    msg = workers_warning(peaks, 4, avail)
    assert "--workers 4 may not fit" in msg and "use --workers 2 or fewer" in msg and "\n" not in msg
    assert "free memory" in workers_warning(peaks, 1, GIB)
    assert workers_warning(peaks, 4, None) is None  # unknown memory: no claim


def test_available_memory_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    avail = available_memory_bytes()
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < avail <= total


def test_preprocess_warns_once_before_the_first_case(tmp_path, monkeypatch, caplog):
    from nnfast.preprocess.api import preprocess_dataset
    from nnfast.settings import Settings

    raw = tmp_path / "raw"
    make_raw_dataset(raw, 33, "Mem", [(8, 20, 20), (9, 22, 20)], [(2.0, 1.0, 1.0)] * 2, seed=5)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**20)  # a machine with 1 MiB free
    finished = []
    with caplog.at_level(logging.WARNING, logger="nnfast"):
        preprocess_dataset(33, Settings(raw=raw, preprocessed=tmp_path / "pre", results=tmp_path / "res"), workers=2,
                           progress=lambda *a: finished.append(time.time()))
    warnings = [r for r in caplog.records if "may not fit in memory" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "--workers 2 may not fit" in warnings[0].getMessage() and "1 MiB" not in warnings[0].getMessage()
    assert finished and warnings[0].created <= min(finished)


def test_no_warning_for_a_small_case_on_this_machine():
    assert workers_warning([case_peak_bytes((8, 20, 20), (8, 20, 20))], 1, available_memory_bytes()) is None
