"""Training augmentation per sample: nnU-Net v2.8.1's transforms (``nnUNetTrainer.get_training_transforms``, as its
loader worker runs them) vs nnfast's (``sample_spatial`` + ``needed_region`` + ``augment_sample``), one thread.

Inputs, as each pipeline's loader provides them: nnU-Net gets the enlarged ``initial_patch_size`` crop (its
``SpatialTransform`` then rotates/scales inside it or crops the centre); nnfast gets exactly the box
``needed_region`` asked for. Reading the data is not timed in either. Each round is one sample with fresh random
parameters, so the mean is the expected cost per sample (rotation or scaling fires in 36 % of the samples).
Mode ``spatial`` forces rotation (p 1) in both pipelines to isolate the resampling.

Cases (``NNFAST_BENCH_SCALE=1``; the default 0 divides every patch axis by 4 so CI runs in seconds with
``--benchmark-disable``), 1 image channel, labels -1 (outside the nonzero region), 0, 1, 2, deep supervision on:

* ``3d_dummy2d``: 3d_fullres-like patch 56x192x192 (anisotropic: dummy-2D, in-plane +-180 deg),
* ``3d``: 128^3 (full 3D, +-30 deg),
* ``2d``: 256x256 (+-180 deg).

Run (CPU time per sample is the fairer number on a shared machine)::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_augment.py --benchmark-enable \
        --benchmark-timer=time.process_time --benchmark-columns=mean,median,rounds --benchmark-group-by=group

or ``NNFAST_BENCH_SCALE=1 python benchmarks/test_bench_augment.py`` for a table of samples/s per core and ratios.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from nnfast.data.augment_params import AugmentConfig, box_center, deep_supervision_scales, needed_region, sample_spatial
from nnfast.data.transforms import augment_sample

CASES = {
    # patch, strides (pool_op_kernel_sizes) of a typical plan
    "3d_dummy2d": ((56, 192, 192), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]),
    "3d": ((128, 128, 128), [[1, 1, 1]] + [[2, 2, 2]] * 5),
    "2d": ((256, 256), [[1, 1]] + [[2, 2]] * 6),
}


def bench_scale() -> float:
    return float(os.environ.get("NNFAST_BENCH_SCALE", "0") or 0)


def _patch(name: str) -> tuple[int, ...]:
    patch, _ = CASES[name]
    return patch if bench_scale() >= 1 else tuple(max(8, p // 4) for p in patch)


class Setup:
    """A synthetic case larger than the enlarged patch, both pipelines' transforms, and per-sample inputs."""

    def __init__(self, name: str, mode: str, seed: int = 0, n_channels: int = 1, n_labels: int = 3):
        torch.set_num_threads(1)
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        patch = _patch(name)
        strides = CASES[name][1] if bench_scale() >= 1 else CASES[name][1][:4]
        ds = deep_supervision_scales(strides)
        over = {"p_rotation": 1.0} if mode == "spatial" else {}
        mask = (False,) * n_channels
        self.cfg = AugmentConfig.from_patch_size(patch, use_mask_for_norm=mask, ds_scales=ds, **over)
        cfg = self.cfg
        self.nnunet = nnUNetTrainer.get_training_transforms(
            patch, cfg.rotation, [list(s) for s in ds], cfg.mirror_axes, cfg.do_dummy_2d, use_mask_for_norm=list(mask))
        if mode == "spatial":
            sp = next(t for t in self.nnunet.transforms if type(t).__name__ == "SpatialTransform")
            sp.p_rotation = 1.0
        self.rng = np.random.default_rng(seed)
        shape = tuple(i + 24 for i in cfg.initial_patch_size)
        self.case_shape = shape
        rng = np.random.default_rng(seed)
        from scipy.ndimage import zoom

        coarse = rng.normal(size=tuple(max(2, s // 8) for s in shape))
        field = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)[tuple(slice(0, s) for s in shape)]
        self.image = np.stack([(field * (1 + c) + 0.1 * rng.normal(size=shape)).astype(np.float32)
                               for c in range(n_channels)])
        seg = np.zeros(shape, np.int16)
        for lab, thr in enumerate(np.quantile(field, np.linspace(0.55, 0.95, n_labels - 1)), start=1):
            seg[field > thr] = lab
        seg[..., : shape[-1] // 10] = -1
        self.seg = seg[None]
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _random_box(self, size):
        lb = [int(self.rng.integers(0, s - p + 1)) for s, p in zip(self.case_shape, size)]
        return lb, [l + p for l, p in zip(lb, size)]

    def _read(self, lb, ub):
        """``[lb, ub)`` of the case, image padded with 0 and labels with -1 beyond it (as the loaders do)."""
        shape = tuple(b - a for a, b in zip(lb, ub))
        img = np.zeros((self.image.shape[0], *shape), np.float32)
        seg = np.full((1, *shape), -1, np.int16)
        src, dst = [slice(None)], [slice(None)]
        for a, b, n in zip(lb, ub, self.case_shape):
            lo, hi = max(a, 0), min(b, n)
            src.append(slice(lo, max(lo, hi)))
            dst.append(slice(lo - a, max(lo, hi) - a))
        img[tuple(dst)] = self.image[tuple(src)]
        seg[tuple(dst)] = self.seg[tuple(src)]
        return img, seg

    def nnunet_args(self):
        lb, ub = self._random_box(self.cfg.initial_patch_size)
        img, seg = self._read(lb, ub)
        return (), {"image": torch.from_numpy(img), "segmentation": torch.from_numpy(seg)}

    def nnfast_args(self):
        """Spatial parameters, the needed region of a random enlarged box (its centre, as the sampler gives it) and
        that region read from the case (not timed: the loader does it)."""
        lb, ub = self._random_box(self.cfg.initial_patch_size)
        params = sample_spatial(self.rng, self.cfg)
        region = needed_region(params, self.cfg.patch_size, box_center(lb, ub))
        img, seg = self._read(region.lb, region.ub)
        return (img, seg, params, self.rng, self.cfg, region), {}


@pytest.mark.parametrize("mode", ["default", "spatial"])
@pytest.mark.parametrize("name", list(CASES))
def test_bench_augment_nnunet(benchmark, name, mode):
    s = Setup(name, mode)
    benchmark.group = f"augment-{name}-{mode}"
    rounds = 30 if bench_scale() >= 1 else 3
    out = benchmark.pedantic(lambda **kw: s.nnunet(**kw), setup=s.nnunet_args, rounds=rounds, iterations=1)
    assert tuple(out["image"].shape[1:]) == s.cfg.patch_size


@pytest.mark.parametrize("mode", ["default", "spatial"])
@pytest.mark.parametrize("name", list(CASES))
def test_bench_augment_nnfast(benchmark, name, mode):
    from nnfast.native import warmup

    warmup()
    s = Setup(name, mode)
    benchmark.group = f"augment-{name}-{mode}"
    rounds = 60 if bench_scale() >= 1 else 3
    out = benchmark.pedantic(augment_sample, setup=s.nnfast_args, rounds=rounds, iterations=1)
    assert out.image.shape[1:] == s.cfg.patch_size


def _measure(fn, args_fn, n):
    ts = []
    for _ in range(n):
        a, kw = args_fn()
        t0 = time.process_time()
        fn(*a, **kw)
        ts.append(time.process_time() - t0)
    return float(np.mean(ts)), float(np.median(ts))


def main() -> None:  # pragma: no cover - manual measurement
    from nnfast.native import warmup

    warmup()
    n_nnunet = int(os.environ.get("NNFAST_BENCH_N_NNUNET", "40"))
    n_ours = int(os.environ.get("NNFAST_BENCH_N_NNFAST", "120"))
    print(f"{'case':12s} {'mode':8s} {'nnU-Net ms':>11s} {'nnfast ms':>10s} {'nnU-Net /s':>10s} {'nnfast /s':>10s}"
          f" {'ratio':>6s}")
    # NNFAST_BENCH_CASES="3d:default:4:8" measures other settings (case:mode:channels:labels, comma separated)
    todo = [(n, m, 1, 3) for n in CASES for m in ("default", "spatial")]
    if os.environ.get("NNFAST_BENCH_CASES"):
        todo = [(c.split(":")[0], c.split(":")[1], int(c.split(":")[2]), int(c.split(":")[3]))
                for c in os.environ["NNFAST_BENCH_CASES"].split(",")]
    for name, mode, n_ch, n_lab in todo:
        s = Setup(name, mode, n_channels=n_ch, n_labels=n_lab)
        _measure(lambda **kw: s.nnunet(**kw), s.nnunet_args, 2)
        ref, _ = _measure(lambda **kw: s.nnunet(**kw), s.nnunet_args, n_nnunet)
        s2 = Setup(name, mode, seed=1, n_channels=n_ch, n_labels=n_lab)
        ours, _ = _measure(augment_sample, s2.nnfast_args, n_ours)
        label = f"{name}" + (f" {n_ch}ch/{n_lab}l" if (n_ch, n_lab) != (1, 3) else "")
        print(f"{label:12s} {mode:8s} {ref * 1e3:11.1f} {ours * 1e3:10.1f} {1 / ref:10.2f} {1 / ours:10.2f} "
              f"{ref / ours:6.1f}", flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()
