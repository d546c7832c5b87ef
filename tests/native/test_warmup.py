"""Warm-up policy (``nnfast.native._jit``): the preprocessing warm-up compiles exactly what preprocessing runs (a case
read from files compiles nothing more), and a pool's processes share one compile of each kernel module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

_SIGNATURES = """
import importlib, numba
def signatures(modules):
    out = {}
    for m in modules:
        mod = importlib.import_module("nnfast.native." + m)
        for name, obj in vars(mod).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.__module__ == mod.__name__:
                out[f"{m}.{name}"] = {str(s) for s in obj.signatures}
    return out
"""


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (Numba's default cache: what it loads counts as compiled signatures)."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_preprocessing_warmup_covers_a_case_read_from_files(tmp_path):
    """After ``warmup(PREPROCESS_KERNELS)`` nothing compiles while a CT case read from NIfTI files is preprocessed
    (labels, class locations; an anisotropic case with separate-z resampling and a near-isotropic one): the warm-up
    misses no signature the pipeline uses, so no worker stalls mid-run. (Prediction's label-less cases resample an
    int8 map: it runs one case per process, without a warm-up, and compiles that on first use.)"""
    out = _run(_SIGNATURES + textwrap.dedent(f"""
        import sys, json
        sys.path[:0] = [{str(TESTS)!r}, {str(TESTS / "infer")!r}, {str(TESTS / "train")!r}]
        import numpy as np
        from pathlib import Path
        from nnfast.native import warmup
        from nnfast.preprocess.api import PREPROCESS_KERNELS
        from nnfast.io.dataset import CaseFiles
        from nnfast.preprocess.pipeline import preprocess_arrays, preprocess_case
        from nnfast.io.image import read_images, read_label
        from factories import blob_labels, ct_image, write_image
        from _models import tiny_plans

        warmup(PREPROCESS_KERNELS)
        before = signatures(PREPROCESS_KERNELS)
        plans = tiny_plans(spacing=(1.0, 1.0, 3.0), shape=(24, 24, 10))
        rng = np.random.default_rng(0)
        tmp = Path({str(tmp_path)!r})
        for i, spacing in enumerate([(1.3, 0.8, 3.4), (1.1, 0.9, 1.2)]):
            seg = blob_labels((14, 26, 22), rng)
            img_path = write_image(ct_image(seg, rng), tmp / f"c{{i}}_0000.nii.gz", spacing)
            seg_path = write_image(seg, tmp / f"c{{i}}.nii.gz", spacing)
            data, geom = read_images([img_path])
            labels, _ = read_label(seg_path)
            out = preprocess_arrays(data, labels, tuple(geom.spacing), plans, "3d_fullres")
            assert out[1].shape[1:] != labels.shape[1:] and out[3], "the case must be resampled and sampled"
            # what a pool worker runs: the int16 CT image cropped in its own dtype, the labels made int8
            out = preprocess_case(CaseFiles(f"c{{i}}", (img_path,), seg_path), plans, "3d_fullres")
            assert out[1].dtype == np.int8 and out[3]
        after = signatures(PREPROCESS_KERNELS)
        new = {{k: sorted(v - before.get(k, set())) for k, v in after.items() if v - before.get(k, set())}}
        print(json.dumps(new))
        """))
    new = json.loads(out.strip().splitlines()[-1])
    assert new == {}, f"compiled after the warm-up (add these to the modules' _warmup): {new}"


def test_shared_warmup_compiles_each_module_once_across_processes(tmp_path):
    """Two processes share the warm-up of two modules on a cold cache: together they compile each signature once
    (the other process loads it from the cache), and each ends with every signature loaded. (Which process compiles
    which module depends on when each starts, so that is not asserted.)"""
    (tmp_path / "locks").mkdir()
    code = _SIGNATURES + textwrap.dedent(f"""
        import json, sys, importlib
        from nnfast.native._jit import warmup_shared
        mods = ("normalize", "class_locations")
        warmup_shared(mods, int(sys.argv[1]), 2, {str(tmp_path / "locks")!r})
        misses, have = {{}}, signatures(mods)
        for m in mods:
            mod = importlib.import_module("nnfast.native." + m)
            for name in (k.split(".", 1)[1] for k in have if k.startswith(m + ".")):
                misses[f"{{m}}.{{name}}"] = sum(getattr(mod, name).stats.cache_misses.values())
        print(json.dumps({{"misses": misses, "have": {{k: len(v) for k, v in have.items()}}}}))
        """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    a, b = results
    assert a["have"] == b["have"] and all(n >= 1 for n in a["have"].values()), results
    for kernel, n in a["have"].items():
        assert a["misses"][kernel] + b["misses"][kernel] == n, (kernel, results)  # compiled once, loaded once


def test_a_failed_background_compile_is_reported_and_its_log_kept(tmp_path, monkeypatch, caplog):
    """The background compile's output is not discarded: when it fails, :func:`finish_background` warns in one line
    naming the error and keeps the full output in a file; a successful (or terminated) one says nothing."""
    import logging
    import tempfile

    from nnfast.native import _jit

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba_cache"))
    proc = _jit.warm_in_background(("no_such_kernel_module",))
    with caplog.at_level(logging.WARNING, logger="nnfast"):
        message = _jit.finish_background(proc, timeout_s=120)
    assert proc.returncode == 1
    assert message is not None and "\n" not in message
    assert "no_such_kernel_module" in message and "ModuleNotFoundError" in message, message
    kept = tmp_path / _jit.FAILED_COMPILE_LOG
    assert str(kept) in message and "Traceback" in kept.read_text()
    assert any(r.getMessage() == message for r in caplog.records)

    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")  # the child then has nothing to compile and exits 0 at once
    ok = _jit.warm_in_background(("normalize",))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nnfast"):
        assert _jit.finish_background(ok, timeout_s=120) is None
    assert ok.returncode == 0 and not caplog.records
    assert _jit.finish_background(None) is None


def test_limit_threads_while_another_thread_imports_simpleitk():
    """A dask worker runs tasks on several threads: one may call ``limit_threads`` while another is still importing
    SimpleITK (found on the first ``--scheduler`` run: ``partially initialized module 'SimpleITK' has no attribute
    'ProcessObject'``). It waits for that import instead of failing."""
    out = _run(textwrap.dedent("""
        import sys, threading
        from nnfast.native import limit_threads
        limit_threads(1)
        t = threading.Thread(target=lambda: __import__("SimpleITK"))
        t.start()
        calls = 0
        while t.is_alive() or calls == 0:
            limit_threads(1)
            calls += 1
        t.join()
        import SimpleITK
        print(calls, SimpleITK.ProcessObject.GetGlobalDefaultNumberOfThreads())
        """))
    calls, sitk_threads = map(int, out.split()[-2:])
    assert calls >= 1 and sitk_threads == 1


def test_share_background_takes_a_share_only_of_a_running_background_compile(monkeypatch):
    """Fingerprinting calls crop's kernels while a cold ``preprocess`` compiles them in the background: with such a
    compile running it shares it (``warmup_shared`` on the same lock folder); without one, or when the running one
    does not include the modules, it does nothing (``nnfast fingerprint`` alone compiles on first use)."""
    import subprocess

    from nnfast.native import _jit

    calls = []
    monkeypatch.setattr(_jit, "warmup_shared", lambda *a: calls.append(a))
    monkeypatch.setattr(_jit, "_BACKGROUND_RUNNING", {})
    _jit.share_background(("crop",))
    assert calls == []
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _jit._BACKGROUND_RUNNING[("normalize",)] = proc
        _jit.share_background(("crop",))
        assert calls == []
        _jit._BACKGROUND_RUNNING[("crop", "normalize")] = proc
        _jit.share_background(("crop",))
        assert calls == [(("crop",), 1, 2, _jit.warmup_lock_dir())]
    finally:
        proc.kill()
        proc.wait()
    _jit.share_background(("crop",))  # finished: nothing to share
    assert len(calls) == 1
