"""Decathlon conversion and dataset verification: nnfast vs nnU-Net v2 on the same synthetic task.

- convert: :func:`nnfast.convert.msd.convert_msd` vs nnU-Net's ``convert_msd_dataset`` on the same ``TaskXX`` folder
  (fresh target folder every round). nnU-Net decodes every image to learn its dimension and always starts a spawn
  pool; nnfast copies 3D files after reading only their header and converts in-process when ``workers == 1``.
- verify: :func:`nnfast.verify.verify_dataset` vs nnU-Net's ``verify_dataset_integrity`` on the converted dataset
  (nnU-Net reads every label twice and spawns a pool; nnfast reads each file once and checks more).

Both sides use the same number of worker processes, ``NNFAST_BENCH_WORKERS`` (default 2); nnfast is also timed
in-process (``workers=1``).

Sizes (``NNFAST_BENCH_SCALE``):

- ``0`` (default, CI with ``--benchmark-disable``): only the MRI task, 2 cases of 3 x (16-20) x (24-32) x (24-32);
  start-up costs dominate (CT: 3 cases of (12-16) x (48-64) x (48-64) if run). ``test_convert_verify_speedup``
  is skipped (it repeats the nnU-Net runs).
- ``1``: CT 12 cases of (60-120) x (384-512) x (384-512) int16 (a Decathlon liver/pancreas-like set) and MRI 6 cases
  of 4 x (140-155) x (200-240) x (200-240) float32 (BrainTumour-like 4D files).

Run ``NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_convert_verify.py --benchmark-enable -p no:cacheprovider -s``;
``test_convert_verify_speedup`` prints and records the ratios of one timed run of each.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import time
from pathlib import Path

import pytest

from nnfast.convert.msd import convert_msd
from nnfast.synth import synthesize_msd
from nnfast.verify import verify_dataset

_COUNTER = itertools.count()


def _full() -> bool:
    return float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0) >= 1


def _workers() -> int:
    return int(os.environ.get("NNFAST_BENCH_WORKERS", "2"))


def _spec(kind: str) -> dict:
    if kind == "ct":
        if _full():
            return dict(num_cases=12, shape_range=((60, 120), (384, 512), (384, 512)))
        return dict(num_cases=3, shape_range=((12, 16), (48, 64), (48, 64)))
    if _full():
        return dict(num_cases=6, num_channels=4, shape_range=((140, 155), (200, 240), (200, 240)))
    return dict(num_cases=2, shape_range=((16, 20), (24, 32), (24, 32)))


# CI (scale 0) runs the MRI task only (4D splitting and multi-channel checks): each nnU-Net call spawns a worker
# that imports torch, ~5-13 s on a busy 2-core machine, whatever the data size.
@pytest.fixture(scope="module", params=["ct", "mri"] if _full() else ["mri"])
def task(request, tmp_path_factory):
    """(kind, MSD task folder, nnfast-converted raw dataset, scratch folder)."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"bench_cv_{kind}")
    msd = synthesize_msd(tmp / "msd", task_id=62, name=f"Bench{kind.upper()}", kind=kind, num_test=0, seed=5,
                         **_spec(kind))
    raw = convert_msd(msd, tmp / "raw", workers=_workers())
    return kind, msd, raw, tmp


def _fresh(tmp: Path) -> Path:
    p = tmp / f"round{next(_COUNTER)}"
    p.mkdir()
    return p


@contextlib.contextmanager
def _nnunet_raw(raw: Path):
    mp = pytest.MonkeyPatch()
    mp.setenv("nnUNet_raw", str(raw))  # nnunetv2.paths reads the environment lazily; spawned workers inherit it
    mp.delenv("nnUNet_preprocessed", raising=False)
    mp.delenv("nnUNet_results", raising=False)
    try:
        yield
    finally:
        mp.undo()


def _convert_nnunet(msd: Path, raw: Path, workers: int) -> Path:
    from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset

    with _nnunet_raw(raw):
        convert_msd_dataset(str(msd), num_processes=workers)
    (out,) = raw.iterdir()
    return out


def _verify_nnunet(ds: Path, workers: int) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    with contextlib.redirect_stdout(io.StringIO()):
        verify_dataset_integrity(str(ds), num_processes=workers)


def _rounds(benchmark) -> int:
    return 1 if benchmark.disabled else 3


@pytest.mark.compat
@pytest.mark.benchmark(group="convert")
def test_convert_nnunet(benchmark, task):
    kind, msd, _, tmp = task
    w = _workers()
    benchmark.extra_info.update(kind=kind, workers=w)
    out = benchmark.pedantic(_convert_nnunet, setup=lambda: ((msd, _fresh(tmp), w), {}), rounds=_rounds(benchmark))
    assert (out / "dataset.json").is_file()


@pytest.mark.benchmark(group="convert")
@pytest.mark.parametrize("workers", [1, "bench"])
def test_convert_nnfast(benchmark, task, workers):
    kind, msd, _, tmp = task
    w = _workers() if workers == "bench" else workers
    benchmark.extra_info.update(kind=kind, workers=w)
    out = benchmark.pedantic(lambda m, r: convert_msd(m, r, workers=w), setup=lambda: ((msd, _fresh(tmp)), {}),
                             rounds=_rounds(benchmark))
    assert (out / "dataset.json").is_file()


@pytest.mark.compat
@pytest.mark.benchmark(group="verify")
def test_verify_nnunet(benchmark, task):
    kind, _, raw, _ = task
    benchmark.extra_info.update(kind=kind, workers=_workers())
    benchmark.pedantic(_verify_nnunet, args=(raw, _workers()), rounds=_rounds(benchmark))  # raises on any error


@pytest.mark.benchmark(group="verify")
@pytest.mark.parametrize("workers", [1, "bench"])
def test_verify_nnfast(benchmark, task, workers):
    kind, _, raw, _ = task
    w = _workers() if workers == "bench" else workers
    benchmark.extra_info.update(kind=kind, workers=w)
    report = benchmark.pedantic(verify_dataset, args=(raw,), kwargs={"workers": w}, rounds=_rounds(benchmark))
    assert report.problems == [], report.format()


def _timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


@pytest.mark.compat
@pytest.mark.skipif(not _full() and not os.environ.get("NNFAST_BENCH_SPEEDUP"),
                    reason="repeats the nnU-Net runs; set NNFAST_BENCH_SCALE=1 (or NNFAST_BENCH_SPEEDUP=1)")
def test_convert_verify_speedup(task, record_property):
    """One timed run of each (nnU-Net's modules imported first); ratios printed and recorded."""
    kind, msd, raw, tmp = task
    w = _workers()
    import nnunetv2.dataset_conversion.convert_MSD_dataset  # noqa: F401  (import cost not counted)
    import nnunetv2.experiment_planning.verify_dataset_integrity  # noqa: F401

    t_conv_ref = _timed(_convert_nnunet, msd, _fresh(tmp), w)
    t_conv_1 = _timed(convert_msd, msd, _fresh(tmp), workers=1)
    t_conv_w = _timed(convert_msd, msd, _fresh(tmp), workers=w)
    t_ver_ref = _timed(_verify_nnunet, raw, w)
    t_ver_1 = _timed(verify_dataset, raw, workers=1)
    t_ver_w = _timed(verify_dataset, raw, workers=w)
    rows = {
        "convert": (t_conv_ref, t_conv_1, t_conv_w),
        "verify": (t_ver_ref, t_ver_1, t_ver_w),
    }
    print(f"\n{kind} ({'full' if _full() else 'CI'} size), {w} worker(s):")
    for step, (ref, one, many) in rows.items():
        print(f"  {step}: nnU-Net {ref:.2f} s | nnfast in-process {one:.2f} s ({ref / one:.1f}x) | "
              f"nnfast {w} workers {many:.2f} s ({ref / many:.1f}x)")
        record_property(f"{kind}_{step}_nnunet_s", ref)
        record_property(f"{kind}_{step}_nnfast_1_s", one)
        record_property(f"{kind}_{step}_nnfast_{w}_s", many)
        record_property(f"{kind}_{step}_speedup_best", ref / min(one, many))
    assert min(t_conv_1, t_conv_w) < t_conv_ref
    assert min(t_ver_1, t_ver_w) < t_ver_ref
