"""Training batches: nnU-Net v2.8.1's ``nnUNetDataLoader`` + its training transforms vs nnfast's batch builder and
multiprocess :class:`~nnfast.data.loader.PatchLoader`, same plans and data.

Per plan, one process, one thread each (``threadpool_limits(1)``, ``torch.set_num_threads(1)``, blosc single
threaded), timing whole batches (sampling, reading, augmentation, deep-supervision targets):

* ``nnunet``: ``nnUNetDataLoader(nnUNetDatasetBlosc2, bs, initial_patch_size, patch_size, ...,
  transforms=nnUNetTrainer.get_training_transforms(...))`` exactly as ``nnUNetTrainer.get_dataloaders`` builds it,
  ``generate_train_batch()`` per batch (what each of its ``NonDetMultiThreadedAugmenter`` workers runs);
* ``nnfast_b2nd``: nnfast's :class:`~nnfast.data.batch.BatchBuilder` reading the same nnU-Net folder
  (:class:`~nnfast.data.dataset.NnunetCaseSource`);
* ``nnfast_zarr``: the same on nnfast's own zarr stores of the same cases (:class:`ZarrCaseSource`).

Then ``PatchLoader`` with 1 and 2 worker processes on the zarr stores (scaling, and memory per worker: RSS and
USS after the run), and how many cores each pipeline needs to feed one training step of ``NNFAST_BENCH_STEP_MS``
(default 130 ms, an A100 3d_fullres bs 2 step in nnU-Net issue #3063).

Plans (``NNFAST_BENCH_SCALE=1``; the default divides every axis by 4 so CI runs in seconds with
``--benchmark-disable``), CT-like float32 images, labels -1/0/1/2/3, deep supervision on:

* ``3d_fullres_aniso``: patch 56x192x192, bs 2, cases (120, 300, 300) (dummy-2D augmentation, +-180 deg);
* ``3d_fullres_iso``: patch 128^3, bs 2, cases (192, 192, 192) (full 3D, +-30 deg);
* ``2d``: patch 256x256, bs 12, cases (40, 320, 320) (+-180 deg).

Measured (scale 1, 4 cases, busy shared 2-core machine with load ~6, so ratios matter more than ms; two runs):
one core, ms per batch, nnU-Net -> nnfast on its b2nd folder / on zarr stores: 3d_fullres_aniso 657-1023 ->
202-225 / 162-181 (3.3-5.6x), 3d_fullres_iso 2269-2750 -> 254-270 / 229-277 (8.4-11x), 2d (bs 12) 144-150 ->
48-69 / 43-65 (2.2-3.4x). Cores to feed a 130 ms step: nnU-Net 5-8 / 17-21 / 1.1, nnfast 1.2-1.7 / 1.8-2.1 / 0.3-0.5.
Worker RSS ~600 MiB (USS 260-320 MiB) in 3D, ~450 MiB (USS ~230) in 2D, mostly torch and Numba; the scaling from 1
to 2 workers cannot be seen on that machine.

12-07 (busy, load 10-22, AMD EPYC, CPU time per batch, after nnfast.data.heap and the one-pass deep-supervision
targets): 2d 100.1 -> 27.1 / 26.2 ms (zarr / b2nd, 3.7-3.8x), 3d_fullres_aniso 705 -> 94.6 / 86.6 ms (7.5-8.1x);
PatchLoader 1 -> 2 workers 902 -> 365 ms/batch wall. Second pass (12-07, load 12-19; vectorized gamma power,
whole-slice 2D chunks, leaner needed_region and 2D warp tables): 2d 90.4 -> 18.6 ms (4.85x, 60 batches interleaved
with ``loader_interleaved.py``), 3d_fullres_aniso 356 -> 79 ms (4.5x, 30 interleaved batches; nnU-Net's mean moves 2x
between runs).

Run the real sizes and print the table (``-s``)::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_loader.py -s --benchmark-enable \
        --benchmark-columns=mean,median,rounds --benchmark-group-by=group
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from bench_utils import bench_scale, full_size
from test_bench_patch_read import ct_like_case

PLANS = {
    # name: (case shape, patch, batch size, strides of a typical plan)
    "3d_fullres_aniso": ((120, 300, 300), (56, 192, 192), 2,
                         [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]),
    "3d_fullres_iso": ((192, 192, 192), (128, 128, 128), 2, [[1, 1, 1]] + [[2, 2, 2]] * 5),
    "2d": ((40, 320, 320), (256, 256), 12, [[1, 1]] + [[2, 2]] * 6),
}
STEP_MS = float(os.environ.get("NNFAST_BENCH_STEP_MS", "130"))
RESULTS: dict[str, dict] = {}


def plan_sizes(name: str):
    shape, patch, bs, strides = PLANS[name]
    if not full_size():
        shape = tuple(max(8, s // 4) for s in shape)
        patch = tuple(max(4, p // 4) for p in patch)
    return shape, patch, bs, strides


def n_batches(name: str) -> int:
    if not full_size():
        return 2
    return {"3d_fullres_aniso": 12, "3d_fullres_iso": 8, "2d": 6}[name]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Per plan: the same cases as an nnU-Net folder and as nnfast stores (built on first use)."""
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

        from nnfast.io.store import store_path, write_case

        shape, patch, _, _ = plan_sizes(name)
        root = tmp_path_factory.mktemp(f"loader_{name}")
        nn, stores = root / "nnunet", root / "stores"
        nn.mkdir()
        n_cases = 4 if full_size() else 2
        for i in range(n_cases):
            image, seg, locs = ct_like_case(shape, seed=i)
            cid = f"case_{i:03d}"
            seg16 = seg.astype(np.int16)  # nnU-Net's preprocessor writes int16 labels when it has room, as here
            blocks, chunks = comp_blosc2_params(image.shape, patch, image.itemsize)
            bs_, cs_ = comp_blosc2_params(seg16.shape, patch, seg16.itemsize)
            nnUNetDatasetBlosc2.save_case(image, seg16, {"class_locations": locs}, str(nn / cid), chunks=chunks,
                                          blocks=blocks, chunks_seg=cs_, blocks_seg=bs_)
            write_case(store_path(stores, cid), image, seg, locs, {"shape": list(shape)}, "bench", patch)
        cache[name] = (nn, stores)
        return cache[name]

    return get


def _augment(name):
    from nnfast.data.augment_params import AugmentConfig, deep_supervision_scales

    _, patch, _, strides = plan_sizes(name)
    return AugmentConfig.from_patch_size(patch, ds_scales=deep_supervision_scales(strides))


def _nnunet_next(name, nn_folder):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    _, patch, bs, _ = plan_sizes(name)
    aug = _augment(name)
    ds = [list(s) for s in aug.ds_scales]
    tr = nnUNetTrainer.get_training_transforms(patch, aug.rotation, ds, aug.mirror_axes, aug.do_dummy_2d,
                                               use_mask_for_norm=[False], is_cascaded=False,
                                               foreground_labels=[1, 2, 3], regions=None, ignore_label=None)
    lm = LabelManager({"background": 0, "a": 1, "b": 2, "c": 3}, None)
    dl = nnUNetDataLoader(nnUNetDatasetBlosc2(str(nn_folder)), bs, aug.initial_patch_size, patch, lm,
                          oversample_foreground_percent=0.33, transforms=tr)
    np.random.seed(0)
    return dl.generate_train_batch


def _nnfast_next(name, folder, kind):
    from nnfast import native
    from nnfast.data.batch import BatchBuilder, BatchSpec
    from nnfast.data.dataset import NnunetCaseSource, ZarrCaseSource

    native.warmup(("augment", "augment_intensity", "ds_targets"))  # as PatchLoader does before its workers start

    _, _, bs, _ = plan_sizes(name)
    src = NnunetCaseSource(folder) if kind == "b2nd" else ZarrCaseSource(folder)
    builder = BatchBuilder(src, BatchSpec(augment=_augment(name), batch_size=bs, num_channels=1))
    state = {"i": 0}

    def next_batch():
        arrays = builder.allocate()  # fresh arrays per batch, as the in-process loader hands out new tensors
        builder.build(0, state["i"], arrays)
        state["i"] += 1
        return arrays

    return next_batch


def _single_thread():
    import numcodecs.blosc
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    numcodecs.blosc.use_threads = False
    return threadpool_limits(limits=1)


def _record(name, impl, times, bs, extra=None):
    t = float(np.mean(times))
    RESULTS.setdefault(name, {})[impl] = {"s_per_batch": t, "patches_per_s": bs / t, "n": len(times),
                                          **(extra or {})}


@pytest.mark.compat
@pytest.mark.parametrize("impl", ["nnunet", "nnfast_b2nd", "nnfast_zarr"])
@pytest.mark.parametrize("name", list(PLANS))
def test_bench_batch_one_core(benchmark, data, name, impl):
    nn, stores = data(name)
    _, _, bs, _ = plan_sizes(name)
    with _single_thread():
        if impl == "nnunet":
            fn = _nnunet_next(name, nn)
        else:
            fn = _nnfast_next(name, nn if impl == "nnfast_b2nd" else stores, impl.split("_")[1])
        fn()  # warm-up: JIT caches, file handles, first allocations
        times, cpu = [], []

        def timed():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)

        benchmark.group = f"loader batch {name}"
        benchmark.extra_info.update(plan=name, batch_size=bs, impl=impl)
        benchmark.pedantic(timed, rounds=n_batches(name), warmup_rounds=0)
    _record(name, impl, times, bs, {"cpu_s_per_batch": float(np.mean(cpu))})
    benchmark.extra_info["patches_per_s_per_core"] = bs / float(np.mean(times))
    benchmark.extra_info["cpu_s_per_batch"] = float(np.mean(cpu))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", ["3d_fullres_aniso"] if not full_size() else list(PLANS))
def test_bench_loader_workers(benchmark, data, name, workers):
    import psutil

    from nnfast.data.batch import BatchSpec
    from nnfast.data.dataset import ZarrCaseSource
    from nnfast.data.loader import PatchLoader

    _, stores = data(name)
    _, _, bs, _ = plan_sizes(name)
    n = max(4, 2 * n_batches(name)) if full_size() else 3
    spec = BatchSpec(augment=_augment(name), batch_size=bs, num_channels=1)
    with PatchLoader(ZarrCaseSource(stores), spec, num_workers=workers, base_seed=0,
                     num_cached=2 * workers + 2) as loader:
        next(loader)  # start-up (spawn, imports) is not timed
        times = []

        def timed():
            t0 = time.perf_counter()
            next(loader)
            times.append(time.perf_counter() - t0)

        benchmark.group = f"loader workers {name}"
        benchmark.extra_info.update(plan=name, batch_size=bs, workers=workers)
        # let the ring drain first so that the steady state (workers busy) is measured, not the prefetched slots
        for _ in range(loader.num_cached):
            next(loader)
        procs = [psutil.Process(p) for p in loader.worker_pids]
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        benchmark.pedantic(timed, rounds=n, warmup_rounds=0)
        cpu = (sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0) / n  # the workers' CPU seconds per batch
        mem = [p.memory_full_info() for p in procs]
        shm_mb = loader.spec.nbytes * loader.num_cached / 2**20
    rss = max(m.rss for m in mem) / 2**20
    uss = max(m.uss for m in mem) / 2**20
    _record(name, f"loader_{workers}w", times, bs, {"worker_rss_mb": rss, "worker_uss_mb": uss, "shm_mb": shm_mb,
                                                     "cpu_s_per_batch": cpu})
    benchmark.extra_info.update(worker_rss_mb=rss, worker_uss_mb=uss, shm_mb=shm_mb, cpu_s_per_batch=cpu)


def test_zz_report():
    """Print the table (run with ``-s``): patches/s per core, ratio to nnU-Net, cores to feed a step."""
    if not RESULTS:
        pytest.skip("no benchmark ran")
    lines = [f"loader benchmark (NNFAST_BENCH_SCALE={bench_scale():g}), one core each; cores to feed a "
             f"{STEP_MS:.0f} ms training step"]
    for name, res in RESULTS.items():
        shape, patch, bs, _ = plan_sizes(name)
        lines.append(f"{name}: cases {shape}, patch {patch}, batch {bs}")
        ref = res.get("nnunet")
        for impl, r in res.items():
            ratio = f"{r['patches_per_s'] / ref['patches_per_s']:5.2f}x nnU-Net" if ref else ""
            cores = r["s_per_batch"] * 1000 / STEP_MS
            extra = ""
            if "worker_rss_mb" in r:
                extra = (f", worker RSS {r['worker_rss_mb']:.0f} MiB (USS {r['worker_uss_mb']:.0f}), "
                         f"shm {r['shm_mb']:.0f} MiB")
                cores = float("nan")
            cpu_ratio = ""
            if ref and r.get("cpu_s_per_batch", 0) > 0 and "cpu_s_per_batch" in ref:
                cpu_ratio = f" ({ref['cpu_s_per_batch'] / r['cpu_s_per_batch']:5.2f}x by CPU time)"
            lines.append(f"  {impl:12s} {1000 * r['s_per_batch']:8.1f} ms/batch {r['patches_per_s']:7.2f} patches/s "
                         f"{ratio}" + (f"  cores {cores:5.1f}" if cores == cores else "")
                         + f"  CPU {1000 * r.get('cpu_s_per_batch', float('nan')):7.1f} ms/batch{cpu_ratio}" + extra)
    print("\n" + "\n".join(lines))
