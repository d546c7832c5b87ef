"""Diagnostic: what the training batches of nnU-Net's loader and nnfast's loader contain, on one prepared dataset.

    python -m benchmarks.quality.batch_stats --work quality_runs --dataset real --batches 100

Both loaders read nnU-Net's preprocessed folder of the harness's dataset (fold 0's training cases), with nnU-Net's
default training augmentation (nnU-Net: ``nnUNetTrainer.get_training_transforms`` over ``nnUNetDataLoader``;
nnfast: ``PatchLoader`` with the equivalent ``AugmentConfig``), no deep supervision. Printed per loader: the mean
share of each label in the target patches (with the standard error over batches), the share of image voxels that
are exactly 0 (padding outside the case, or rotated-in zeros) and the image mean/std. A label share that differs by
several standard errors points at a sampling or augmentation difference, without training anything.

Most of a batch statistic's spread is *which cases* the batch drew (the aniso set's cases differ in intensity and
field of view). The last table therefore compares the per-sample image statistics *given the case* (nnfast minus
nnU-Net per case, averaged over the cases with equal weight): that removes the case-draw noise and tests patch
placement and augmentation alone. nnfast's batches of one ``--seed`` draw the same cases whatever ``--ablate`` says
(cases come first from each batch's generator), so replicates that share a seed are not independent on its side.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.datasets import IDS  # noqa: E402


def _stats(batches, per_sample: list | None = None) -> dict:
    rows = []
    for data, target, keys in batches:
        if per_sample is not None:
            for j, k in enumerate(keys):
                d = np.asarray(data[j])
                per_sample.append((k, float((d == 0).mean()), float(d.mean()), float(d.std())))
        t = np.asarray(target)
        d = np.asarray(data)
        row = {f"label_{k}": float((t == k).mean()) for k in (-1, 0, 1, 2)}
        row.update(zero_image=float((d == 0).mean()), image_mean=float(d.mean()), image_std=float(d.std()))
        rows.append(row)
    out = {}
    for k in rows[0]:
        v = np.array([r[k] for r in rows])
        out[k] = (float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))))
    return out


def given_case(a: list, b: list) -> dict:
    """Per-sample (zero share, mean, std) of ``b`` minus ``a`` given the case: per-case mean differences averaged
    with equal weight over the cases both saw, with their standard error. ``a``/``b``: (case, zero, mean, std)."""
    cases = sorted({r[0] for r in a} & {r[0] for r in b})
    out = {}
    for i, name in enumerate(("zero_image", "image_mean", "image_std"), start=1):
        diffs, var = [], []
        for c in cases:
            x = np.array([r[i] for r in a if r[0] == c])
            y = np.array([r[i] for r in b if r[0] == c])
            if len(x) < 2 or len(y) < 2:
                continue
            diffs.append(y.mean() - x.mean())
            var.append(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
        n = len(diffs)
        out[name] = (float(np.mean(diffs)), float(np.sqrt(np.sum(var)) / n)) if n else (float("nan"), float("nan"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="quality_runs")
    p.add_argument("--dataset", default="real", choices=sorted(IDS))
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seeds both loaders (nnU-Net's: numpy/torch; nnfast's: "
                   "base_seed); another seed gives an independent replicate")
    p.add_argument("--ablate", nargs="+", default=[], metavar="AUG",
                   help="switch these augmentations off in both loaders (the harness's --ablate names)")
    args = p.parse_args(argv)
    did, name = IDS[args.dataset]
    pre = Path(args.work) / args.dataset / "preprocessed" / f"Dataset{did:03d}_{name}"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    conf = plans["configurations"]["3d_fullres"]
    folder = pre / conf["data_identifier"]
    train_ids = json.loads((pre / "splits_final.json").read_text())[0]["train"]
    dj = json.loads((pre / "dataset.json").read_text())
    patch = tuple(conf["patch_size"])
    bs = int(conf["batch_size"])

    import torch
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnfast.data.augment_params import AugmentConfig
    from nnfast.data.batch import BatchSpec
    from nnfast.data.dataset import NnunetCaseSource
    from nnfast.data.loader import PatchLoader

    torch.set_num_threads(1)
    aug = AugmentConfig.from_patch_size(patch, ds_scales=None, use_mask_for_norm=tuple(conf["use_mask_for_norm"]))
    fg = [v for v in dj["labels"].values() if isinstance(v, int) and v > 0]
    tr = nnUNetTrainer.get_training_transforms(patch, aug.rotation, None, aug.mirror_axes, aug.do_dummy_2d,
                                               use_mask_for_norm=list(conf["use_mask_for_norm"]), is_cascaded=False,
                                               foreground_labels=fg, regions=None, ignore_label=None)
    if args.ablate:
        from benchmarks.quality.arm_worker import ABLATIONS, _ablate_nnunet_transforms

        if _ablate_nnunet_transforms(tr, args.ablate) < len(args.ablate):
            raise SystemExit(f"--ablate {args.ablate}: not every transform was found in nnU-Net's pipeline")
        aug = dataclasses.replace(aug, **{f: 0.0 for name in args.ablate for f in ABLATIONS[name][0]})
    lm = LabelManager(dj["labels"], None)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dl = nnUNetDataLoader(nnUNetDatasetBlosc2(str(folder), identifiers=train_ids), bs, aug.initial_patch_size, patch,
                          lm, oversample_foreground_percent=0.33, transforms=tr)

    def nn_batches():
        for _ in range(args.batches):
            b = next(dl)
            yield b["data"].numpy(), b["target"].numpy(), list(b["keys"])

    spec = BatchSpec(augment=aug, batch_size=bs, num_channels=1, oversample_foreground_percent=0.33)
    samples_nn: list = []
    samples_ours: list = []
    res = {"patch": patch, "batch_size": bs, "batches": args.batches, "seed": args.seed, "ablate": args.ablate,
           "nnunet": _stats(nn_batches(), samples_nn)}
    with PatchLoader(NnunetCaseSource(folder, train_ids), spec, num_workers=0, base_seed=args.seed) as loader:
        def ours():
            for _ in range(args.batches):
                b = next(loader)
                t = b["target"][0] if isinstance(b["target"], list) else b["target"]
                yield b["data"].numpy(), t.numpy(), list(b["keys"])

        res["nnfast"] = _stats(ours(), samples_ours)
    res["given_case"] = given_case(samples_nn, samples_ours)
    print(json.dumps(res, indent=1))
    print(f"{'':14s} {'nnU-Net':>20s} {'nnfast':>20s}  diff/se")
    for k in res["nnunet"]:
        (a, sa), (b, sb) = res["nnunet"][k], res["nnfast"][k]
        se = float(np.hypot(sa, sb)) or float("nan")
        print(f"{k:14s} {a:12.4f} ± {sa:6.4f} {b:12.4f} ± {sb:6.4f}  {(b - a) / se:+.1f}")
    print("per sample, given the case (case-draw noise removed):  nnfast - nnU-Net  diff/se")
    for k, (d, se) in res["given_case"].items():
        print(f"{k:14s} {d:+12.5f} ± {se:7.5f}  {d / se if se else float('nan'):+.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
