"""``nnfast preprocess`` on threads of the command's process (``pool="threads"``, the default for ``--workers 2``):
the same stores as worker processes, each input decoded once (the arrays verification or the fingerprint read are
taken from a :class:`~nnfast.io.decoded_cache.DecodedCache`), falling back to reading when evicted or when a file
changed, and errors that name the case and leave nothing that looks finished."""
import os
import time

import numpy as np
import pytest

from factories import make_raw_dataset, write_image
from nnfast.io.decoded_cache import DecodedCache, DecodedCase, file_signature
from nnfast.io.image import read_image
from nnfast.io.store import load_case
from nnfast.preprocess import api
from nnfast.preprocess.api import preprocess_dataset
from nnfast.settings import Settings


def _settings(raw, tmp):
    return Settings(raw=raw, preprocessed=tmp / "pre", results=tmp / "res")


def _stores(settings, name):
    return sorted((settings.preprocessed / name / "nnfast_3d_fullres").glob("*.zarr"))


def _assert_same(a_stores, b_stores):
    assert [p.name for p in a_stores] == [p.name for p in b_stores] and a_stores
    for pa, pb in zip(a_stores, b_stores):
        ia, sa, pra, la = load_case(pa)
        ib, sb, prb, lb = load_case(pb)
        assert ia.dtype == ib.dtype and sa.dtype == sb.dtype
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)
        assert la.keys() == lb.keys()
        for k in la:
            np.testing.assert_array_equal(la[k], lb[k])
        assert pra == prb


@pytest.fixture(scope="module")
def ct_raw(tmp_path_factory):
    """Anisotropic CT cases (separate-z resampling), three labels, one case without foreground."""
    raw = tmp_path_factory.mktemp("raw_ct")
    shapes = [(12, 50 + 4 * i, 56) for i in range(5)]
    spacings = [(3.0 + 0.5 * (i % 3), 0.8, 0.8) for i in range(5)]
    make_raw_dataset(raw, 41, "ThrCT", shapes, spacings, n_labels=3, seed=5, empty_cases=[4])
    return raw


@pytest.fixture(scope="module")
def mr_raw(tmp_path_factory):
    """Two float32 channels (z-score within the nonzero mask: the label map is written after the image's
    normalization), near-isotropic spacing."""
    raw = tmp_path_factory.mktemp("raw_mr")
    shapes = [(20, 24 + 2 * i, 22) for i in range(4)]
    make_raw_dataset(raw, 42, "ThrMR", shapes, [(1.2, 1.0, 1.0)] * 4, kind="mri", n_labels=2, seed=6)
    return raw


@pytest.mark.parametrize("which", ["ct", "mr"])
def test_threads_give_the_stores_of_worker_processes_and_read_each_file_once(which, ct_raw, mr_raw, tmp_path):
    raw, name, n = (ct_raw, "Dataset041_ThrCT", 5) if which == "ct" else (mr_raw, "Dataset042_ThrMR", 4)
    procs = _settings(raw, tmp_path / "procs")
    by_procs = preprocess_dataset(name, procs, workers=2, pool="processes")
    threads = _settings(raw, tmp_path / "threads")
    by_threads = preprocess_dataset(name, threads, workers=2, pool="threads")
    assert not by_procs.threads and by_threads.threads
    assert by_threads.configs[0].computed == n
    assert by_threads.reused_reads == n  # verification decoded every file; none was read again
    assert by_procs.reused_reads == 0
    assert "inputs read once" in by_threads.format() and "preprocessing thread(s) at once" in by_threads.format()
    _assert_same(_stores(procs, name), _stores(threads, name))


def test_without_verification_the_fingerprint_decodes_for_preprocessing(ct_raw, tmp_path):
    s = _settings(ct_raw, tmp_path)
    summary = preprocess_dataset("Dataset041_ThrCT", s, workers=2, pool="threads", verify=False)
    assert summary.reused_reads == 5
    ref = _settings(ct_raw, tmp_path / "ref")
    preprocess_dataset("Dataset041_ThrCT", ref, workers=1, verify=False)
    _assert_same(_stores(ref, "Dataset041_ThrCT"), _stores(s, "Dataset041_ThrCT"))


def test_auto_uses_threads_for_two_workers_and_processes_beyond_the_cap(monkeypatch):
    monkeypatch.setattr("nnfast.native._jit.available_cores", lambda: 8)
    assert api._use_threads(2, None, "auto")
    assert not api._use_threads(api.THREAD_WORKERS_MAX + 1, None, "auto")
    assert not api._use_threads(2, "local:2", "auto")  # a dask scheduler runs its own workers
    assert api._use_threads(1, None, "auto")  # one worker: this process anyway, reading each input once
    assert not api._use_threads(1, None, "processes")
    monkeypatch.setattr("nnfast.native._jit.available_cores", lambda: 1)
    assert not api._use_threads(2, None, "auto") and api._use_threads(2, None, "threads")


def test_evicted_cases_are_read_again(ct_raw, tmp_path, monkeypatch):
    """A budget that holds only the smaller cases: the larger ones are dropped and read from their files."""
    one = read_image(next((ct_raw / "Dataset041_ThrCT" / "imagesTr").glob("case_000_*")))[0]
    per_case = one.nbytes * 3 // 2  # int16 image + uint8 label
    made = []

    def small_cache():
        made.append(DecodedCache(int(per_case * 2.2)))
        return made[-1]

    monkeypatch.setattr(api, "_decoded_cache", small_cache)
    s = _settings(ct_raw, tmp_path)
    summary = preprocess_dataset("Dataset041_ThrCT", s, workers=2, pool="threads")
    assert made and made[0].dropped >= 3
    assert 1 <= summary.reused_reads <= 2 and summary.configs[0].computed == 5
    ref = _settings(ct_raw, tmp_path / "ref")
    preprocess_dataset("Dataset041_ThrCT", ref, workers=2, pool="processes")
    _assert_same(_stores(ref, "Dataset041_ThrCT"), _stores(s, "Dataset041_ThrCT"))


def test_a_file_changed_after_it_was_read_is_read_again(ct_raw, tmp_path, monkeypatch):
    """An input rewritten between planning and preprocessing: its case is preprocessed from the new file, the same
    store as reading it gives; the other cases come from the cache."""
    import shutil

    import nnfast.plan.api as plan_api
    from nnfast.preprocess.pipeline import CaseTask, run_case_task

    raw = tmp_path / "raw"
    shutil.copytree(ct_raw, raw)
    img = raw / "Dataset041_ThrCT" / "imagesTr" / "case_002_0000.nii.gz"
    arr, geom = read_image(img)
    plan = plan_api.plan_dataset

    def plan_then_edit(*a, **k):
        res = plan(*a, **k)
        changed = arr[0].copy()
        changed[changed != 0] += 7  # same shape and nonzero region, other intensities
        write_image(changed, img, geom.spacing)
        os.utime(img, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
        return res

    monkeypatch.setattr(plan_api, "plan_dataset", plan_then_edit)
    s = _settings(raw, tmp_path)
    summary = preprocess_dataset("Dataset041_ThrCT", s, workers=2, pool="threads")
    assert summary.reused_reads == 4
    out = _stores(s, "Dataset041_ThrCT")
    stored = next(p for p in out if p.name == "case_002.zarr")
    # the same case read from its (new) file, with the same plans
    from nnfast.io.dataset import load_dataset

    case = next(c for c in load_dataset(raw / "Dataset041_ThrCT")[1] if c.case_id == "case_002")
    plans_file = str(s.preprocessed / "Dataset041_ThrCT" / "nnfast_plans.json")
    again = tmp_path / "again.zarr"
    run_case_task(CaseTask(case, plans_file, "3d_fullres", str(again), "h"))
    a, sa, _p, la = load_case(stored)
    b, sb, _q, lb = load_case(again)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)


def test_an_error_in_one_case_names_it_and_leaves_no_finished_store(ct_raw, tmp_path, monkeypatch):
    import nnfast.preprocess.pipeline as pipeline
    import SimpleITK as sitk

    write_label = pipeline._write_label_phase

    def failing(store, *a, **k):
        if "case_001" in str(store.path):
            raise RuntimeError("disk full")
        return write_label(store, *a, **k)

    monkeypatch.setattr(pipeline, "_write_label_phase", failing)
    threads_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    s = _settings(ct_raw, tmp_path)
    with pytest.raises(RuntimeError, match=r"disk full \[case case_001\]"):
        preprocess_dataset("Dataset041_ThrCT", s, workers=2, pool="threads")
    folder = s.preprocessed / "Dataset041_ThrCT" / "nnfast_3d_fullres"
    assert not (folder / "case_001.zarr").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary stores left behind"
    for p in folder.glob("*.zarr"):  # whatever looks finished loads whole
        load_case(p)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads_before  # the scope restored it
    monkeypatch.setattr(pipeline, "_write_label_phase", write_label)
    again = preprocess_dataset("Dataset041_ThrCT", s, workers=2, pool="threads")  # resumes
    assert again.configs[0].computed + again.configs[0].skipped == 5 and again.configs[0].computed >= 1


def test_decoded_cache_budget_signature_and_single_take(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 10)
    sig = file_signature([f, None])
    geom = None

    def entry(n):
        return DecodedCase([np.zeros(n, np.uint8)], geom, np.zeros(0, np.int8), sig)

    cache = DecodedCache(100)
    assert cache.put("a", entry(40)) and cache.put("b", entry(30))
    assert cache.put("c", entry(20))  # 90 bytes
    assert not cache.put("big", entry(101)) and len(cache) == 3  # larger than the budget: refused, others kept
    assert cache.put("d", entry(25))  # evicts the largest (a) to fit
    assert cache.used_bytes == 75 and cache.take("a", [f]) is None
    got = cache.take("b", [f])
    assert got is not None and got.nbytes == 30 and cache.take("b", [f]) is None  # handed out once
    os.utime(f, ns=(time.time_ns() + 10**9,) * 2)
    assert cache.take("c", [f]) is None  # the file changed since it was read
    f.unlink()
    assert cache.take("d", [f]) is None and cache.used_bytes == 0
    assert (cache.hits, cache.dropped) == (1, 2)


def test_decoded_inputs_are_dropped_when_the_cases_would_not_fit_beside_them(ct_raw, tmp_path, monkeypatch):
    """Memory shrank between reading and preprocessing: the kept inputs are released (and read again) before the
    cases start, rather than held beside cases that may not fit."""
    from nnfast.preprocess import memory

    calls = []

    def shrinking():
        calls.append(1)
        return 2**30 if len(calls) == 1 else 2**20  # plenty when the cache is made, 1 MiB when the cases start

    monkeypatch.setattr(memory, "available_memory_bytes", shrinking)
    s = _settings(ct_raw, tmp_path)
    summary = preprocess_dataset("Dataset041_ThrCT", s, workers=2, pool="threads")
    assert summary.reused_reads == 0 and summary.configs[0].computed == 5
    ref = _settings(ct_raw, tmp_path / "ref")
    preprocess_dataset("Dataset041_ThrCT", ref, workers=1)
    _assert_same(_stores(ref, "Dataset041_ThrCT"), _stores(s, "Dataset041_ThrCT"))


def test_a_stopping_command_ends_a_running_case_at_its_next_step_without_a_store(ct_raw, tmp_path, monkeypatch):
    """Threads cannot be killed: Ctrl-C (or another case's error) sets ``stop`` and the case running gives up at its
    next step, removing its temporary store."""
    import threading

    import nnfast.preprocess.pipeline as pipeline
    from nnfast.io.dataset import load_dataset
    from nnfast.preprocess.pipeline import CaseStopped, CaseTask, run_case_task

    s = _settings(ct_raw, tmp_path)
    preprocess_dataset("Dataset041_ThrCT", s, workers=1)  # plans
    plans_file = str(s.preprocessed / "Dataset041_ThrCT" / "nnfast_plans.json")
    case = load_dataset(ct_raw / "Dataset041_ThrCT")[1][0]
    stop = threading.Event()
    write_label = pipeline._write_label_phase

    def label_then_ctrl_c(*a, **k):
        write_label(*a, **k)
        stop.set()

    monkeypatch.setattr(pipeline, "_write_label_phase", label_then_ctrl_c)
    out = tmp_path / "stopped" / f"{case.case_id}.zarr"
    with pytest.raises(CaseStopped, match=case.case_id):
        run_case_task(CaseTask(case, plans_file, "3d_fullres", str(out), "h"), stop=stop)
    assert not out.exists() and not list(out.parent.iterdir())
    monkeypatch.setattr(pipeline, "_write_label_phase", write_label)
    stop.clear()
    run_case_task(CaseTask(case, plans_file, "3d_fullres", str(out), "h"), stop=stop)
    load_case(out)
