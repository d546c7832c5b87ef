"""GPU check of ``nnfast train``'s iteration time: our loader vs no data loading, with/without torch.compile and AMP.

A plain script (not collected by pytest). On a machine without CUDA it prints a message and exits with 0.

What it measures, on one 3d_fullres plan (default: nnfast's planner on a synthetic 160^3 fingerprint at 1 mm ->
patch 128x128x128, batch 2, 6 stages, the plan nnU-Net makes for such data; or ``--task N`` for a preprocessed
dataset):

* ``loader only``: batches per second of :class:`~nnfast.data.loader.PatchLoader` with ``--workers`` processes
  (no GPU work), i.e. the most steps per second the data pipeline can feed;
* training iterations (``nnfast.train.step.train_step``: forward, Dice+CE loss with deep supervision, backward,
  clip, SGD) for every mode in ``--modes``:

  ========================  ==========================================================================
  ``synthetic-fp32``        one batch kept on the GPU and reused (nnU-Net's ``..._noDataLoading`` trainer)
  ``synthetic-amp``         same, float16 autocast + GradScaler (nnU-Net's default precision)
  ``synthetic-amp-compile`` same, ``torch.compile`` (nnU-Net's default on CUDA)
  ``synthetic-bf16-compile``  bfloat16 autocast, compiled
  ``loader-amp``            batches from the loader (pinned, non-blocking copies), AMP
  ``loader-amp-compile``    what ``nnfast train`` does by default on a GPU
  ========================  ==========================================================================

For each mode: warm-up time (includes compilation), median and mean ms per iteration over ``--iterations`` steps
(CUDA-synchronised per step), iterations/s, time spent waiting for the loader, peak GPU memory. If
``loader-amp-compile`` is close to ``synthetic-amp-compile``, the loader keeps the GPU busy.

Run (about 3-5 minutes on an H100, most of it compiling twice)::

    python benchmarks/gpu_check.py                         # synthetic data, default modes
    python benchmarks/gpu_check.py --workers 12 --iterations 50
    python benchmarks/gpu_check.py --task 4 --config 3d_fullres   # a preprocessed dataset (NNFAST_* roots)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODES = ("synthetic-fp32", "synthetic-amp", "synthetic-amp-compile", "synthetic-bf16-compile", "loader-amp",
         "loader-amp-compile")
DEFAULT_MODES = ("synthetic-fp32", "synthetic-amp", "synthetic-amp-compile", "loader-amp", "loader-amp-compile")


def synthetic_plans(shape=(160, 160, 160), spacing=(1.0, 1.0, 1.0), n_cases: int = 4):
    """nnfast's plans for a synthetic fingerprint of ``n_cases`` cases of ``shape`` voxels (one CT channel, labels
    background/organ/lesion)."""
    from nnfast.fingerprint.schema import Fingerprint, IntensityStats
    from nnfast.io.dataset import DatasetInfo
    from nnfast.plan.planner import plan_experiment

    stats = (IntensityStats(mean=0.0, median=0.0, std=1.0, min=-1.0, max=1.0, percentile_99_5=1.0,
                            percentile_00_5=-1.0),)
    fp = Fingerprint(case_ids=tuple(f"case_{i:03d}" for i in range(n_cases)), spacings=(tuple(spacing),) * n_cases,
                     shapes_after_crop=(tuple(shape),) * n_cases, foreground_intensity_properties_per_channel=stats,
                     median_relative_size_after_cropping=1.0)
    ds = DatasetInfo(root=Path("/nonexistent"), name="Dataset999_GpuCheck", channel_names={"0": "CT"},
                     labels={"background": 0, "organ": 1, "lesion": 2}, num_training=n_cases,
                     file_ending=".nii.gz")
    return plan_experiment(fp, ds)


def write_synthetic_stores(folder: Path, shape, patch, n_cases: int) -> None:
    """CT-like preprocessed cases (z-scored image, organ + lesion ellipsoids, -1 outside a body) as case stores."""
    import numpy as np

    from nnfast.io.store import store_path, write_case
    from nnfast.preprocess.class_locations import sample_class_locations

    for i in range(n_cases):
        rng = np.random.default_rng(i)
        grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
        c, r = rng.uniform(-0.2, 0.2, 3), rng.uniform(0.3, 0.5, 3)
        organ = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r)) < 1
        lesion = organ & (sum(((g - ci) / (ri * 0.3)) ** 2 for g, ci, ri in zip(grids, c, r)) < 1)
        body = grids[1] ** 2 + grids[2] ** 2 < 0.9
        seg = np.where(body, 0, -1).astype(np.int8)
        seg[organ] = 1
        seg[lesion] = 2
        image = rng.standard_normal(shape, dtype=np.float32) * 0.3 + seg.astype(np.float32)
        seg, image = seg[None], image[None]
        locs = sample_class_locations(seg, [1, 2], seed=i)
        write_case(store_path(folder, f"case_{i:03d}"), image, seg, locs, {"shape": list(shape)}, "gpu_check",
                   patch)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", help="a preprocessed dataset (NNFAST_PREPROCESSED / nnUNet_preprocessed) instead of "
                                  "synthetic data")
    p.add_argument("--config", default="3d_fullres")
    p.add_argument("--shape", type=int, nargs=3, default=(160, 160, 160), help="synthetic case shape")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check this script on a CPU (48^3 cases, 2 iterations, no compile); timings meaningless")
    return p.parse_args(argv)


def _loader(source, plans, config_name: str, workers: int, seed: int = 0):
    from nnfast.data.batch import BatchSpec
    from nnfast.data.loader import PatchLoader

    spec = BatchSpec.from_plan(plans, config_name, num_channels=source.num_channels, train=True)
    return PatchLoader(source, spec, num_workers=workers, base_seed=seed, pin_memory="auto")


def _loader_only(source, plans, config_name: str, workers: int, n: int) -> tuple[float, float]:
    with _loader(source, plans, config_name, workers) as ld:
        t0 = time.perf_counter()
        for _ in range(min(4, n)):  # workers start, fill the ring
            next(ld)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            next(ld)
        return n / (time.perf_counter() - t0), start_s


def _run_mode(mode: str, plans, config_name: str, conf, source, workers: int, warmup: int, iters: int,
              fixed_batch, device: str = "cuda") -> dict:
    import torch

    from nnfast.network import build_network
    from nnfast.train.config import TrainConfig
    from nnfast.train.loss import build_loss
    from nnfast.train.optim import build_optimizer
    from nnfast.train.step import make_grad_scaler, train_step

    amp = torch.bfloat16 if "bf16" in mode else (torch.float16 if "amp" in mode else None)
    torch.manual_seed(0)
    net = build_network(plans, config_name, plans.num_input_channels, 3).to(device)
    loss_fn = build_loss(conf, None)
    opt = build_optimizer(net.parameters(), TrainConfig())
    scaler = make_grad_scaler(amp, device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = torch.compile(net) if mode.endswith("compile") else net
    ld = None
    if mode.startswith("loader"):
        ld = _loader(source, plans, config_name, workers, seed=1)
        get = lambda: next(ld)  # noqa: E731
    else:
        get = lambda: fixed_batch  # noqa: E731
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            train_step(model, get(), loss_fn, opt, scaler, amp)
        sync()
        warm_s = time.perf_counter() - t0
        times, wait = [], 0.0
        for _ in range(iters):
            t = time.perf_counter()
            batch = get()
            wait += time.perf_counter() - t
            train_step(model, batch, loss_fn, opt, scaler, amp)
            sync()
            times.append(time.perf_counter() - t)
    finally:
        if ld is not None:
            ld.close()
    return {"mode": mode, "warmup_s": warm_s, "median_ms": 1e3 * statistics.median(times),
            "mean_ms": 1e3 * statistics.fmean(times), "it_s": len(times) / sum(times),
            "wait_pct": 100 * wait / sum(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def main(argv=None) -> int:
    args = _args(argv)
    import torch

    device = "cuda"
    if args.cpu_smoke:
        device, args.shape, args.iterations, args.warmup, args.cases = "cpu", (48, 48, 48), 2, 1, 2
        args.modes = [m for m in args.modes if not m.endswith("compile")]
        args.workers = min(args.workers, 1)
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; this script measures GPU training iterations, "
              "nothing to do here.")
        return 0
    from nnfast.data.dataset import ZarrCaseSource

    torch.backends.cudnn.benchmark = True
    tmp = None
    if args.task:
        from nnfast.plan.api import plans_path
        from nnfast.plan.planner import load_plans
        from nnfast.settings import find_dataset_folder, resolve_settings

        pre = find_dataset_folder(args.task, resolve_settings().require("preprocessed"))
        plans = load_plans(plans_path(pre))
        conf = plans.configuration(args.config)
        folder = pre / conf.data_identifier
        what = f"{pre.name} {args.config}"
    else:
        plans = synthetic_plans(tuple(args.shape), n_cases=args.cases)
        conf = plans.configuration(args.config)
        tmp = tempfile.TemporaryDirectory(prefix="nnfast_gpu_check_")
        folder = Path(tmp.name)
        t0 = time.perf_counter()
        write_synthetic_stores(folder, tuple(args.shape), conf.patch_size, args.cases)
        what = f"synthetic {args.cases} x {tuple(args.shape)} ({time.perf_counter() - t0:.0f} s to write)"
    source = ZarrCaseSource(folder)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, cudnn "
              f"{torch.backends.cudnn.version()}, {os.cpu_count()} CPUs")
    print(f"data: {what}; plan {args.config}: patch {tuple(conf.patch_size)}, batch {conf.batch_size}, "
          f"{conf.architecture.n_stages} stages, features {conf.architecture.features_per_stage}")

    rate, start_s = _loader_only(source, plans, args.config, args.workers, max(args.iterations, 20))
    print(f"loader only ({args.workers} workers): {rate:.2f} batches/s (start-up {start_s:.1f} s)\n")
    with _loader(source, plans, args.config, 0) as ld:
        b = next(ld)
    fixed = {"data": b["data"].to(device), "target": [t.to(device) for t in b["target"]]}

    rows = []
    for mode in args.modes:
        try:
            rows.append(_run_mode(mode, plans, args.config, conf, source, args.workers, args.warmup,
                                  args.iterations, fixed, device))
        except Exception as e:  # report and go on (e.g. an inductor problem in one mode)
            print(f"{mode}: failed: {type(e).__name__}: {e}")
        if device == "cuda":
            torch.cuda.empty_cache()
    head = f"{'mode':<24} {'warm-up s':>9} {'median ms':>9} {'mean ms':>8} {'it/s':>6} {'wait %':>6} {'peak GiB':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<24} {r['warmup_s']:>9.1f} {r['median_ms']:>9.1f} {r['mean_ms']:>8.1f} {r['it_s']:>6.2f} "
              f"{r['wait_pct']:>6.1f} {r['peak_gib']:>8.2f}")
    by = {r["mode"]: r for r in rows}
    for a, b in (("loader-amp-compile", "synthetic-amp-compile"), ("loader-amp", "synthetic-amp")):
        if a in by and b in by:
            print(f"{a} / {b}: {by[a]['mean_ms'] / by[b]['mean_ms']:.2f}x time per iteration")
    print(f"an epoch of 250 iterations at the loader-amp-compile rate: "
          f"{250 * by['loader-amp-compile']['mean_ms'] / 1e3:.0f} s" if "loader-amp-compile" in by else "")
    source.close()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
