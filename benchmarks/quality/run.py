"""The equal-quality harness (issue 15): nnU-Net v2 vs nnU-Net with nnfast's loader vs nnfast, same budget.

    python -m benchmarks.quality.run --budget cpu            # or: python benchmarks/quality/run.py --budget cpu
    python -m benchmarks.quality.run --budget gpu --work /scratch/quality

For every dataset (``datasets.py``: synthetic ``iso`` and ``aniso``, real ``real``) and seed (default 3), each arm
(``arm_worker.py``: A nnU-Net's trainer and loader, B nnU-Net's trainer with nnfast's loader, C ``nnfast train``)
trains fold 0 of the same plans with the same budget (``budgets.py``) in its own process; then the held-out cases
(which no arm trained or validated on) are predicted with one predictor (nnfast's sliding window, tested equal to
nnU-Net's predictor; the budget says whether with mirroring) and scored with one evaluator, nnU-Net's
``compute_metrics_on_folder``. Seeds run in the outer loop and arms in the inner one, so the arms share the
machine's load alike. Outputs in ``<work>/report_<budget>[_no-<aug>...]/``: ``runs.json`` and ``runs.csv`` (every
run and label), ``summary.md`` (the table, see ``aggregate.py``), ``dice.png`` (seeds as dots). A run whose
``metrics.json`` exists is reused, so an interrupted harness continues where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import aggregate  # noqa: E402
from benchmarks.quality.arm_worker import ABLATIONS  # noqa: E402
from benchmarks.quality.budgets import BUDGETS, Budget  # noqa: E402
from benchmarks.quality.datasets import DATASETS, Prepared, prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAINER_FOLDERS = {"A": "nnUNetTrainer__nnUNetPlans__3d_fullres", "B": "nnUNetTrainerNnfastLoader__nnUNetPlans__3d_fullres",
                   "C": "nnfastTrainer__nnfast_plans__3d_fullres"}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _train(ds: Prepared, arm: str, seed: int, budget: Budget, run_dir: Path, ablate: list[str]) -> dict:
    result_file = run_dir / "train_result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    results = run_dir / "results"
    if results.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(results)
    spec = {"arm": arm, "seed": seed, "name": ds.name, "dataset": ds.folder_name, "raw": str(ds.raw),
            "preprocessed": str(ds.preprocessed), "results": str(results), "device": budget.device,
            "epochs": budget.epochs, "iterations": budget.iterations, "val_iterations": budget.val_iterations,
            "workers": budget.workers, "threads": budget.threads, "ablate": ablate, "result": str(result_file)}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "nnUNet_raw": str(ds.raw), "nnUNet_preprocessed": str(ds.preprocessed),
           "nnUNet_results": str(results), "nnUNet_n_proc_DA": str(budget.workers),
           "NNFAST_LOADER_WORKERS": str(budget.workers), "NNFAST_LOADER_SEED": str(seed), "nnUNet_compile": "f",
           "OMP_NUM_THREADS": str(budget.threads), "MKL_NUM_THREADS": str(budget.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(run_dir / "train.log", "w") as f:
        r = subprocess.run([sys.executable, "-m", "benchmarks.quality.arm_worker", str(run_dir / "spec.json")],
                           env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not result_file.is_file():
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{ds.name} arm {arm} seed {seed} failed (exit {r.returncode}); log {run_dir}/train.log:\n"
                           f"{tail}")
    return json.loads(result_file.read_text())


def _predict_and_score(ds: Prepared, arm: str, budget: Budget, run_dir: Path) -> dict:
    """Held-out cases predicted with nnfast's predictor from the arm's model folder, scored by nnU-Net's evaluator."""
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnfast.infer.predict import PredictOptions, predict_folder
    from nnfast.labels import LabelManager
    from nnfast.settings import Settings

    model = run_dir / "results" / ds.folder_name / TRAINER_FOLDERS[arm]
    pred = run_dir / "heldout_pred"
    settings = Settings(raw=ds.raw, preprocessed=ds.preprocessed, results=run_dir / "results")
    report = predict_folder(ds.heldout_images, pred, PredictOptions(
        model_folder=model, settings=settings, folds=[0], checkpoint_name="checkpoint_final", use_tta=budget.tta,
        device=budget.device, workers=1))
    if report.failed:
        raise RuntimeError(f"prediction of {ds.name} arm {arm} failed for {report.failed}")
    dj = json.loads((ds.preprocessed / ds.folder_name / "dataset.json").read_text())
    lm = LabelManager.from_dataset_json(dj)
    fg = [int(v) for v in lm.foreground_labels]
    res = compute_metrics_on_folder(str(ds.heldout_labels), str(pred), str(run_dir / "summary.json"), SimpleITKIO(),
                                    ".nii.gz", fg, None, 1)
    names = {int(v): k for k, v in dj["labels"].items() if isinstance(v, int)}
    out = {"dice": {names.get(int(k), str(k)): float(v["Dice"]) for k, v in res["mean"].items()},
           "foreground_mean": float(res["foreground_mean"]["Dice"]),
           "per_case": [{"case": Path(c["reference_file"]).name,
                         "dice": {names.get(int(k), str(k)): float(m["Dice"]) for k, m in c["metrics"].items()}}
                        for c in res["metric_per_case"]]}
    metrics_file.write_text(json.dumps(out, indent=2))
    return out


def run(args: argparse.Namespace) -> int:
    budget = BUDGETS[args.budget]
    overrides = {k: v for k, v in (("epochs", args.epochs), ("iterations", args.iterations)) if v is not None}
    if overrides:
        budget = dataclasses.replace(budget, name=budget.name + "-" + "-".join(f"{k}{v}" for k, v in overrides.items()),
                                     **overrides)
    ablate = sorted(set(args.ablate or []))
    tag = budget.name + "".join(f"_no-{a}" for a in ablate)
    work = Path(args.work).resolve()
    report = work / f"report_{tag}"
    report.mkdir(parents=True, exist_ok=True)
    seeds = list(args.seed_list) if args.seed_list else list(range(args.seeds))
    log(f"budget {tag}: {budget.epochs} epochs x {budget.iterations} iterations, {budget.workers} loader worker(s), "
        f"{budget.threads} torch thread(s), device {budget.device}; datasets {args.datasets}, seeds {seeds}, "
        f"arms {args.arms}")
    prepared = {name: prepare(name, work, budget, Path(args.cache).resolve(), log=log) for name in args.datasets}
    import torch

    torch.set_num_threads(budget.threads)
    runs, rows = [], []
    for seed in seeds:
        for name in args.datasets:
            ds = prepared[name]
            for arm in args.arms:
                run_dir = work / name / "runs" / tag / f"{arm}_seed{seed}"
                if args.report_only and not (run_dir / "metrics.json").is_file():
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                tr = _train(ds, arm, seed, budget, run_dir, ablate)
                m = _predict_and_score(ds, arm, budget, run_dir)
                runs.append({"dataset": name, "arm": arm, "seed": seed, "wall_s": tr["wall_s"],
                             "loader_wait_s": tr["loader_wait_s"], "epochs": tr["epochs"],
                             "final_train_loss": tr["final_train_loss"], "dice": m["dice"],
                             "foreground_mean": m["foreground_mean"], "per_case": m["per_case"]})
                for label, d in list(m["dice"].items()) + [("foreground mean", m["foreground_mean"])]:
                    rows.append({"dataset": name, "arm": arm, "seed": seed, "label": label, "dice": d,
                                 "wall_s": tr["wall_s"], "loader_wait_s": tr["loader_wait_s"]})
                log(f"{name} {arm} seed {seed}: Dice {json.dumps({k: round(v, 3) for k, v in m['dice'].items()})}, "
                    f"train {tr['wall_s']:.0f} s (loader wait {tr['loader_wait_s']:.1f} s), "
                    f"{time.perf_counter() - t0:.0f} s with prediction")
                _write_report(report, budget, ablate, prepared, runs, rows, args.arms)
    log(f"done: {report / 'summary.md'}")
    print((report / "summary.md").read_text())
    return 0


def _write_report(report: Path, budget: Budget, ablate: list[str], prepared: dict, runs: list, rows: list,
                  arms: list[str]) -> None:
    summary = aggregate.summarize(rows)
    diffs = aggregate.differences(summary)
    times = aggregate.timings(runs)
    machine = _machine()
    (report / "runs.json").write_text(json.dumps({
        "budget": budget.to_json(), "ablate": ablate, "machine": machine,
        "datasets": {k: v.summary for k, v in prepared.items()}, "runs": runs,
        "summary": [{"dataset": k[0], "arm": k[1], "label": k[2], **v} for k, v in summary.items()],
        "differences": diffs}, indent=2))
    (report / "runs.csv").write_text(aggregate.rows_csv(rows))
    text = aggregate.markdown_table(summary, diffs, times, arms=arms,
                                    label_shares={k: v.summary.get("label_shares") or {} for k, v in prepared.items()})
    (report / "summary.md").write_text(
        f"Budget `{budget.name}`{' with ' + ', '.join('no ' + a for a in ablate) if ablate else ''}: "
        f"{budget.epochs} epochs x {budget.iterations} iterations, {budget.workers} loader worker(s) per arm; "
        f"machine {machine['cpu']} ({machine['nproc']} cores), load {machine['loadavg']}\n\n{text}\n")
    aggregate.plot_dice(rows, report / "dice.png", arms=arms)


def _machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {"cpu": cpu, "nproc": os.cpu_count(), "loadavg": " ".join(load), "time": time.strftime("%Y-%m-%d %H:%M")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), required=True)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--arms", nargs="+", choices=("A", "B", "C"), default=["A", "B", "C"])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1); default 3")
    p.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds instead of --seeds")
    p.add_argument("--ablate", nargs="+", choices=sorted(ABLATIONS), metavar="AUG",
                   help=f"switch these augmentations off in every arm ({', '.join(sorted(ABLATIONS))})")
    p.add_argument("--work", default="quality_runs", help="work folder (datasets, runs, reports); default ./quality_runs")
    p.add_argument("--cache", default="quality_runs/cache", help="where the nilearn wheel is downloaded to")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs that are complete; train nothing")
    p.add_argument("--epochs", type=int, help="override the budget's epochs (smoke tests)")
    p.add_argument("--iterations", type=int, help="override the budget's iterations per epoch (smoke tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
