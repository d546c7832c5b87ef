"""Install-time compile (:mod:`nnfast.native.precompile`, what ``setup.py``'s build hook runs while pip builds
nnfast): run on a copy of the package, as the hook runs it on the tree an editable install runs from, it leaves a
cache that a fresh interpreter preprocessing a real case loads without compiling anything; a cache written by
another numba version is recompiled on first use, silently and with the same results."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nnfast.preprocess.api import PREPROCESS_KERNELS

TESTS = Path(__file__).resolve().parents[1]
PACKAGE = TESTS.parent / "nnfast"

pytestmark = pytest.mark.slow

# Preprocesses two CT cases read from NIfTI files, as a pool worker does (``warmup`` of the preprocessing kernels,
# then ``preprocess_case``), and prints, as JSON, the nnfast kernels' cache hits and misses (Numba's dispatcher
# statistics: a miss is a compile), whether ``is_warm`` held before, where nnfast came from and a digest of the output.
_PREPROCESS_AND_COUNT = """
import hashlib, importlib, json, sys
from pathlib import Path
sys.path[:0] = [{tests!r}, {infer!r}]
import numba, numpy as np
import nnfast
from nnfast.native._jit import is_warm, warmup
from nnfast.preprocess.api import PREPROCESS_KERNELS
from nnfast.io.dataset import CaseFiles
from nnfast.preprocess.pipeline import preprocess_case
from factories import blob_labels, ct_image, write_image
from _models import tiny_plans

warm = is_warm(PREPROCESS_KERNELS)
warmup(PREPROCESS_KERNELS)
plans = tiny_plans(spacing=(1.0, 1.0, 3.0), shape=(24, 24, 10))
rng = np.random.default_rng(0)
digest = hashlib.sha256()
for i, spacing in enumerate([(1.3, 0.8, 3.4), (1.1, 0.9, 1.2)]):
    seg = blob_labels((14, 26, 22), rng)
    img = write_image(ct_image(seg, rng), Path({tmp!r}) / f"c{{i}}_0000.nii.gz", spacing)
    lab = write_image(seg, Path({tmp!r}) / f"c{{i}}.nii.gz", spacing)
    data, labels, props, locations = preprocess_case(CaseFiles(f"c{{i}}", (img,), lab), plans, "3d_fullres")[:4]
    assert locations, "the case must be sampled"
    for a in (data, labels):
        digest.update(np.ascontiguousarray(a).tobytes())
hits, misses = {{}}, {{}}
for m in PREPROCESS_KERNELS:
    mod = importlib.import_module("nnfast.native." + m)
    for name, obj in vars(mod).items():
        if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.__module__ == mod.__name__:
            if sum(obj.stats.cache_hits.values()):
                hits[f"{{m}}.{{name}}"] = sum(obj.stats.cache_hits.values())
            if sum(obj.stats.cache_misses.values()):
                misses[f"{{m}}.{{name}}"] = sum(obj.stats.cache_misses.values())
print(json.dumps({{"file": nnfast.__file__, "warm": warm, "hits": hits, "misses": misses,
                  "digest": digest.hexdigest()}}))
"""


def _env(site: Path, **extra: str) -> dict:
    """The environment of a process that imports nnfast from ``site`` and keeps Numba's cache beside its sources
    (Numba's in-tree locator, as an editable install has it), with JIT on."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _copy_package(site: Path) -> Path:
    """A copy of the nnfast package (without any cache) under ``site``: fresh sources, as a fresh clone has."""
    shutil.copytree(PACKAGE, site / "nnfast", ignore=shutil.ignore_patterns("__pycache__"))
    return site / "nnfast" / "native" / "__pycache__"


def _preprocess(site: Path, tmp: Path) -> dict:
    tmp.mkdir()
    code = _PREPROCESS_AND_COUNT.format(tests=str(TESTS), infer=str(TESTS / "infer"), tmp=str(tmp))
    res = subprocess.run([sys.executable, "-c", code], env=_env(site), cwd=tmp, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve() == (site / "nnfast" / "__init__.py").resolve(), out["file"]
    return out


def test_install_compile_leaves_nothing_for_a_preprocess_run_to_compile(tmp_path):
    """The install step on a fresh copy of the package (the preprocessing modules: the full step compiles every
    module the same way, for ~1 min of CPU), then a fresh interpreter preprocesses real cases: every preprocessing
    kernel it runs is a cache hit and none compiles. Then the cache of ``crop`` is made another numba version's (its
    index files' version header): crop compiles again on first use, the rest still loads, and the output is the
    same bytes."""
    site = tmp_path / "site"
    cache = _copy_package(site)
    res = subprocess.run([sys.executable, "-m", "nnfast.native.precompile", "--jobs", "2",
                          "--modules", ",".join(PREPROCESS_KERNELS)], env=_env(site), cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Numba kernels compiled into" in res.stdout, res.stdout
    assert sorted(p.name for p in cache.glob("nnfast-warm-*.stamp")) == sorted(
        f"nnfast-warm-{m}.stamp" for m in PREPROCESS_KERNELS)

    first = _preprocess(site, tmp_path / "run1")
    assert first["warm"] is True
    assert first["misses"] == {}, f"compiled on a run after the install compile: {first['misses']}"
    assert {k.split(".")[0] for k in first["hits"]} == set(PREPROCESS_KERNELS), first["hits"]

    for index in cache.glob("crop.*.nbi"):
        with open(index, "rb") as f:
            pickle.load(f)  # numba's version header
            rest = f.read()
        with open(index, "wb") as f:
            pickle.dump("0.0.0-another-numba", f, protocol=-1)
            f.write(rest)
    second = _preprocess(site, tmp_path / "run2")
    assert second["digest"] == first["digest"]
    assert second["misses"] and {k.split(".")[0] for k in second["misses"]} == {"crop"}, second["misses"]
    assert {k.split(".")[0] for k in second["hits"]} == set(PREPROCESS_KERNELS) - {"crop"}, second["hits"]


def test_install_compile_without_jit_or_with_an_error(tmp_path):
    """With ``NUMBA_DISABLE_JIT=1`` (the pure-Python path needs no cache) the step succeeds and writes nothing; a
    process that fails (a kernel module that does not exist) makes it exit 1 with one line naming the error, which
    the build hook turns into a warning instead of a failed install."""
    site = tmp_path / "site"
    cache = _copy_package(site)
    res = subprocess.run([sys.executable, "-m", "nnfast.native.precompile", "--modules", "normalize"],
                         env=_env(site, NUMBA_DISABLE_JIT="1"), cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert not list(cache.glob("*.nbi")) and not list(cache.glob("*.stamp"))

    res = subprocess.run([sys.executable, "-m", "nnfast.native.precompile", "--modules", "no_such_kernel_module"],
                         env=_env(site), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "ModuleNotFoundError" in lines[0] and "compile on first use" in lines[0], res.stdout


def _copy_project(dst: Path) -> Path:
    """``setup.py``, ``pyproject.toml``, ``README.md`` and the package, as a fresh clone has them."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(TESTS.parent / name, dst / name)
    _copy_package(dst)
    return dst


def test_the_build_hook_compiles_into_the_built_package_and_never_fails_the_build(tmp_path):
    """``setup.py build`` (what a wheel build runs; an editable build runs the same subcommands on the source tree):
    the hook, last of the build steps, compiles into the copy in ``build_lib``, which the wheel carries
    (``NNFAST_INSTALL_COMPILE`` limits it to one module here, to keep the test short). When the compile fails the
    build still succeeds, with one warning line; ``NNFAST_INSTALL_COMPILE=none`` skips it."""
    (tmp_path / "project").mkdir()
    project = _copy_project(tmp_path / "project")

    def build(which: str, lib: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT")}
        env["NNFAST_INSTALL_COMPILE"] = which
        return subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-lib", lib], cwd=project, env=env,
                              capture_output=True, text=True, timeout=900)

    res = build("normalize", "lib-ok")
    assert res.returncode == 0, res.stderr[-4000:]
    cache = project / "lib-ok" / "nnfast" / "native" / "__pycache__"
    assert (project / "lib-ok" / "nnfast" / "native" / "normalize.py").is_file()
    assert (cache / "nnfast-warm-normalize.stamp").is_file() and list(cache.glob("normalize.*.nbc"))
    assert not list((project / "nnfast" / "native").glob("__pycache__/*.nbi")), "a wheel build compiles its copy"
    assert "Numba kernels compiled into" in res.stderr

    res = build("no_such_kernel_module", "lib-failed")
    assert res.returncode == 0, res.stderr[-4000:]
    warnings = [ln for ln in res.stderr.splitlines() if "WARNING: nnfast" in ln]
    assert len(warnings) == 1 and "ModuleNotFoundError" in warnings[0] and "first use" in warnings[0], res.stderr
    assert (project / "lib-failed" / "nnfast" / "native" / "crop.py").is_file()

    res = build("none", "lib-none")
    assert res.returncode == 0 and "NNFAST_INSTALL_COMPILE=none" in res.stderr, res.stderr[-4000:]
    assert not (project / "lib-none" / "nnfast" / "native" / "__pycache__").exists()
