"""Implementations of the ``nnfast`` subcommands: call the stage APIs, print results."""
from __future__ import annotations

import argparse
import functools
import sys
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["cmd_demo", "cmd_synth", "cmd_convert", "cmd_verify", "cmd_plan", "cmd_preprocess", "cmd_train",
           "cmd_predict"]


def _settings(args: argparse.Namespace):
    from ..settings import resolve_settings

    return resolve_settings(getattr(args, "raw", None), getattr(args, "preprocessed", None), getattr(args, "results", None))


@contextmanager
def progress_bar(desc: str, quiet: bool = False):
    """A ``progress(done, total, key)`` callable backed by tqdm on a terminal, silent otherwise."""
    bar = None

    def update(done: int, total: int, key: str) -> None:
        nonlocal bar
        if quiet or not sys.stderr.isatty():
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="case", dynamic_ncols=True)
        bar.set_postfix_str(key, refresh=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _fmt_list(v) -> str:
    if isinstance(v, (list, tuple)):
        if v and isinstance(v[0], (list, tuple)):
            return " ".join("x".join(str(int(x)) for x in s) for s in v)
        return "x".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v)
    return str(v)


def format_plans_table(plans) -> str:
    """A readable table of every configuration of ``plans``."""
    from ..plan.schema import CONFIGURATION_NAMES

    names = [n for n in CONFIGURATION_NAMES if n in plans.configurations] + \
        [n for n in plans.configurations if n not in CONFIGURATION_NAMES]
    cfgs = [plans.configuration(n) for n in names]
    rows = [
        ("spacing (mm)", lambda c: _fmt_list([round(float(x), 4) for x in c.spacing])),
        ("median shape", lambda c: _fmt_list(list(c.median_image_size_in_voxels))),
        ("patch size", lambda c: _fmt_list(list(c.patch_size))),
        ("batch size", lambda c: str(c.batch_size)),
        ("network", lambda c: c.architecture.network_class),
        ("stages", lambda c: str(c.architecture.n_stages)),
        ("features", lambda c: ",".join(str(f) for f in c.architecture.features_per_stage)),
        ("strides", lambda c: _fmt_list(c.architecture.strides)),
        ("kernels", lambda c: _fmt_list(c.architecture.kernel_sizes)),
        ("batch dice", lambda c: str(c.batch_dice)),
        ("normalization", lambda c: ",".join(c.normalization_schemes)),
        ("mask for norm", lambda c: ",".join(str(x) for x in c.use_mask_for_norm)),
        ("previous stage", lambda c: str(c.previous_stage or "-")),
    ]
    table = [["", *names]] + [[label, *(f(c) for c in cfgs)] for label, f in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [f"plans `{plans.plans_name}` for {plans.dataset_name} (transpose {list(plans.transpose_forward)})"]
    for i, r in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..synth import synthesize_msd

    kwargs = {}
    if args.min_shape or args.max_shape:
        if not (args.min_shape and args.max_shape):
            raise UsageError("--min-shape and --max-shape go together")
        kwargs["shape_range"] = tuple(zip(args.min_shape, args.max_shape))
    path = synthesize_msd(Path(args.out), task_id=args.task_id, name=args.name, num_cases=args.cases,
                          num_test=args.test_cases, seed=args.seed, kind=args.kind, **kwargs)
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..convert.msd import convert_msd

    raw = _settings(args).require("raw")
    path = convert_msd(Path(args.msd), raw, workers=args.workers, dataset_id=args.dataset_id)
    print(path)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..settings import find_dataset_folder
    from ..verify import verify_dataset

    root = find_dataset_folder(args.task, _settings(args).require("raw"))
    report = verify_dataset(root, workers=args.workers)
    print(report.format())
    return 1 if report.errors else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..plan.api import plan_dataset

    t0 = time.perf_counter()
    if args.transfer_from is not None:
        from ..plan.transfer import transfer_plans

        plans, path = transfer_plans(args.transfer_from, args.task, _settings(args), preset=args.preset,
                                     source_plans=args.plans, target_plans=args.plans, replan=args.replan,
                                     export_nnunet=args.export_nnunet)
        if not args.quiet:
            print(format_plans_table(plans))
            print(f"\nwrote {path} (plans of {args.transfer_from}) in {time.perf_counter() - t0:.2f} s")
        return 0
    with progress_bar("fingerprint", args.quiet) as prog:
        res = plan_dataset(args.task, _settings(args), workers=args.workers, scheduler=args.scheduler,
                           gpu_memory_gb=args.gpu_memory_gb, preset=args.preset, plans_identifier=args.plans,
                           target_spacing=args.target_spacing, verify=not args.no_verify, force=args.force,
                           replan=args.replan, export_nnunet=args.export_nnunet, progress=prog)
    if not args.quiet:
        print(format_plans_table(res.plans))
        reused = " (fingerprint reused)" if res.fingerprint_reused else ""
        kept = "kept the plans on disk" if res.plans_reused else "wrote the plans"
        print(f"\n{kept} `{res.plans_identifier}` in {res.output_folder}{reused} in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from ..preprocess.api import preprocess_dataset

    with progress_bar("preprocess", args.quiet) as prog:
        summary = preprocess_dataset(args.task, _settings(args), config=args.config, workers=args.workers,
                                     scheduler=args.scheduler, gpu_memory_gb=args.gpu_memory_gb,
                                     verify=not args.no_verify, force=args.force, progress=prog,
                                     plans_identifier=args.plans, preset=args.preset, replan=args.replan,
                                     pool=args.pool)
    if not args.quiet:
        print(summary.format())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..convert.msd import convert_msd
    from ..layout import SUMMARY_PICTURE, VALIDATION_FOLDER
    from ..plan.api import plan_dataset
    from ..settings import Settings, dataset_folder_name
    from ..synth import synthesize_msd

    t0 = time.perf_counter()
    root = Path(args.folder).resolve()
    settings = Settings(raw=root / "raw", preprocessed=root / "preprocessed", results=root / "results")
    for p in (settings.raw, settings.preprocessed, settings.results):
        p.mkdir(parents=True, exist_ok=True)
    task_id, name = 901, "DemoCT"
    from ..preprocess.api import compile_in_background

    compile_in_background()  # on a cold cache: compiles while the demo synthesizes, converts and plans
    steps = 5 if args.skip_training else 7
    raw_ds = settings.raw / dataset_folder_name(task_id, name)
    if not raw_ds.is_dir():
        print(f"[1/{steps}] synthesizing {args.cases} CT-like cases in {root / 'msd'}")
        msd = synthesize_msd(root / "msd", task_id=task_id, name=name, num_cases=args.cases, num_test=2, seed=args.seed,
                             kind="ct", shape_range=DEMO_SHAPE_RANGE, overwrite=True)
        print(f"[2/{steps}] converting {msd.name} -> {raw_ds.name}")
        convert_msd(msd, settings.raw, workers=args.workers)
    else:
        print(f"[1-2/{steps}] reusing {raw_ds}")
    print(f"[3/{steps}] verifying, [4/{steps}] fingerprinting and planning")
    res = plan_dataset(task_id, settings, workers=args.workers, gpu_memory_gb=args.gpu_memory_gb)
    if res.verify_report is not None:
        print(f"      verification: {len(res.verify_report.errors)} errors, {len(res.verify_report.warnings)} warnings")
    else:
        print("      verification: current (inputs unchanged since it passed)")
    print()
    print(format_plans_table(res.plans))
    print()
    from ..preprocess.api import preprocess_dataset

    print(f"[5/{steps}] preprocessing 3d_fullres")
    summary = preprocess_dataset(task_id, settings, config="3d_fullres", workers=args.workers,
                                 gpu_memory_gb=args.gpu_memory_gb)
    print(summary.format())
    if args.skip_training:
        print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; data in {root}")
        return 0

    import torch

    from ..infer.predict import PredictOptions, predict_folder
    from ..infer.validation import validate_fold
    from ..train.config import TrainConfig
    from ..train.trainer import train

    from ..native import available_cores

    torch.set_num_threads(available_cores())  # the loader runs in this process, between steps
    cfg = TrainConfig.from_plan(res.plans, "3d_fullres", num_epochs=args.epochs, num_iterations_per_epoch=args.iterations,
                                num_val_iterations_per_epoch=max(2, args.iterations // 5), save_every=args.epochs)
    print(f"\n[6/{steps}] training 3d_fullres fold 0 on the CPU: {cfg.num_epochs} epochs x {cfg.num_iterations_per_epoch} "
          f"iterations, patch {'x'.join(map(str, cfg.patch_size))}, batch {cfg.batch_size}")

    no_tta = args.no_tta
    result = train(task_id, settings, "3d_fullres", fold=0, train_config=cfg, device="cpu", num_workers=0,
                   final_validation=functools.partial(validate_fold, use_tta=False) if no_tta else validate_fold)
    if result.validation is not None:
        how = "sliding window" if no_tta else "sliding window + mirroring"
        print(f"      held-out validation cases of fold 0 ({how}, original geometry):")
        print("      " + result.validation.format().replace("\n", "\n      "))
        pictures = _demo_pictures(task_id, settings, result, root / "overlays", args.workers)
        if pictures is not None:
            print(f"      pictures: {pictures} (held-out cases: reference outlined, prediction filled), "
                  f"{result.output_folder / VALIDATION_FOLDER / SUMMARY_PICTURE}")
    else:
        print(f"      final validation skipped: {result.validation_skipped}")
    out = root / "predictions"
    print(f"\n[7/{steps}] predicting the test images {raw_ds / 'imagesTs'} -> {out}")
    report = predict_folder(raw_ds / "imagesTs", out, PredictOptions(task=task_id, config="3d_fullres", settings=settings,
                                                                     folds=[0], device="cpu", use_tta=False))
    print(f"      wrote {len(report.written)} segmentation(s); {len(report.failed)} failed")
    dice = result.validation_dice
    dice_text = f"; foreground Dice on held-out cases {dice:.3f}" if dice is not None else ""
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s{dice_text}")
    print(f"data in {root}; training curves in {result.output_folder / 'progress.png'}")
    return 0


def _demo_pictures(task_id: int, settings, result, folder: Path, workers: int) -> Path | None:
    """``nnfast overlay`` of the demo's held-out cases with their validation predictions, and the validation's
    ``summary.png``; None without matplotlib."""
    from ..layout import SUMMARY_PICTURE, VALIDATION_FOLDER
    from ..visualize.api import overlay_dataset
    from ..visualize.summary_plot import plot_summary

    try:
        overlay_dataset(task_id, settings, folder, cases=list(result.validation.case_ids),
                        pred_dir=result.output_folder / VALIDATION_FOLDER, workers=workers)
        plot_summary(result.validation, result.output_folder / VALIDATION_FOLDER / SUMMARY_PICTURE)
    except ImportError as e:  # matplotlib is an optional extra
        print(f"      pictures not drawn ({e}); install matplotlib for them")
        return None
    return folder


# small cases, and plans for a small GPU memory budget (a small patch, 4 stages), keep the demo's CPU training to minutes
DEMO_SHAPE_RANGE = ((24, 36), (72, 96), (72, 96))


def cmd_train(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..layout import fold_folder
    from ..settings import find_dataset_folder
    from ..train.config import TrainConfig
    from ..train.layout import load_saved_train_config
    from ..train.trainer import train

    settings = _settings(args)
    if args.validate_only:
        return _validate_only(args, settings)
    if args.val_best:
        raise UsageError("--val-best needs --validate-only (training validates checkpoint_final)")
    overrides = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations,
                 "num_val_iterations_per_epoch": args.val_iterations, "amp": args.amp,
                 "compile": "off" if args.no_compile else None, "seed": args.seed, "save_every": args.save_every}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    fold = args.fold if args.fold == "all" else args.fold.strip()
    cfg = None
    if args.resume:
        if overrides:  # the resumed run's settings, changed only where a flag says so
            dataset = find_dataset_folder(args.task, settings.require("preprocessed")).name
            saved = load_saved_train_config(fold_folder(settings.require("results"), dataset, args.config, fold,
                                                        plans_identifier=_plans_id(args)))
            cfg = (saved or TrainConfig()).replace(**overrides)
    else:
        cfg = TrainConfig(**overrides)
    quiet = args.quiet

    def report(rec) -> None:
        if quiet:
            return
        dice = ", ".join(f"{v:.4f}" for v in rec.dice_per_class)
        best = "  *best*" if rec.new_best else ""
        print(f"epoch {rec.epoch + 1}/{rec.num_epochs}: loss {rec.train_loss:.4f} (val {rec.val_loss:.4f}), "
              f"pseudo dice [{dice}] EMA {rec.ema_fg_dice:.4f}, lr {rec.lr:.2e}, {rec.epoch_time:.1f} s"
              f" (data wait {rec.train_wait_s:.1f} s){best}", flush=True)

    res = train(args.task, settings, args.config, fold, cfg, device=args.device, resume=args.resume,
                num_workers=args.workers, progress=report, stop_after_epoch=args.stop_after_epoch,
                final_validation=None if args.no_val else _final_validation(), save_probabilities=args.npz,
                pretrained_weights=args.pretrained_weights, plans_identifier=_plans_id(args))
    if not quiet:
        state = "finished" if res.finished else f"stopped after {res.epochs_completed} of {res.num_epochs} epochs"
        best = "n/a" if res.best_ema is None else f"{res.best_ema:.4f}"
        print(f"training {state} in {res.wall_s:.1f} s ({res.epochs_run} epochs this run); best EMA pseudo dice "
              f"{best}; output in {res.output_folder}")
        if res.validation_skipped:
            print(f"final validation skipped: {res.validation_skipped}")
        elif res.validation is not None:
            dice = "n/a" if res.validation_dice is None else f"{res.validation_dice:.4f}"
            print(f"final validation: foreground mean Dice {dice}; metrics in "
                  f"{res.output_folder / 'validation' / 'summary.json'}")
    return 0


def _plans_id(args: argparse.Namespace) -> str:
    """``--plans`` (checked) or the default plans identifier."""
    from ..layout import PLANS_IDENTIFIER, check_plans_identifier

    return check_plans_identifier(args.plans) if getattr(args, "plans", None) else PLANS_IDENTIFIER


def _final_validation():
    """What ``nnfast train`` runs after the last epoch: nnfast's inference on the fold's validation cases."""
    from ..infer.validation import validate_fold

    return validate_fold


def _validate_only(args: argparse.Namespace, settings) -> int:
    from ..layout import fold_folder, validation_folder
    from ..settings import find_dataset_folder

    dataset = find_dataset_folder(args.task, settings.require("preprocessed")).name
    fold = args.fold if args.fold == "all" else args.fold.strip()
    folder = fold_folder(settings.require("results"), dataset, args.config, fold, plans_identifier=_plans_id(args))
    checkpoint = "checkpoint_best" if args.val_best else "checkpoint_final"
    summary = _final_validation()(folder, settings=settings, device=args.device, checkpoint_name=checkpoint,
                                  save_probabilities=args.npz, workers=max(1, args.workers or 1))
    if not args.quiet:
        fg = (getattr(summary, "foreground_mean", None) or {}).get("Dice")
        dice = "n/a" if fg is None else f"{fg:.4f}"
        print(f"validation of {args.config} fold {fold} ({checkpoint}): foreground mean Dice {dice}; metrics in "
              f"{validation_folder(folder) / 'summary.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..errors import CaseNotFoundError, UsageError
    from ..infer.predict import PredictOptions, predict_folder

    if args.model_folder is None and args.task is None:
        raise UsageError("give --task (with --config) or --model-folder")
    if args.part_id >= args.num_parts:
        raise UsageError(f"--part-id {args.part_id} must be smaller than --num-parts {args.num_parts}")
    if not Path(args.input).is_dir():
        raise CaseNotFoundError(f"input folder `{args.input}` does not exist or is not a folder (-i/--input: the "
                                "folder of <case>_XXXX images)")
    options = PredictOptions(model_folder=args.model_folder, task=args.task, config=args.config,
                             trainer=args.trainer, plans_identifier=_plans_id(args),
                             settings=_settings(args), folds=args.folds, checkpoint_name=args.checkpoint,
                             use_tta=not args.no_tta, step=args.step, save_probabilities=args.save_probabilities,
                             device=args.device, workers=args.workers, previous_stage_folder=args.prev_stage_folder,
                             continue_prediction=args.continue_prediction, num_parts=args.num_parts,
                             part_id=args.part_id)
    with progress_bar("predict", args.quiet) as prog:
        report = predict_folder(Path(args.input), Path(args.output), options, progress=prog)
    if not args.quiet or report.failed:
        print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------- model zips
__all__ += ["cmd_export_model", "cmd_install_model"]


def cmd_export_model(args: argparse.Namespace) -> int:
    from ..infer.model_zip import export_model

    out = export_model(_settings(args).require("results"), args.task, Path(args.output), args.config,
                       folds=args.folds, checkpoint_name=args.checkpoint, trainer=args.trainer,
                       plans_identifier=args.plans)
    if not args.quiet:
        print(f"wrote {out} (install with `nnUNetv2_install_pretrained_model_from_zip {out}` or "
              f"`nnfast install-model {out}`)")
    return 0


def cmd_install_model(args: argparse.Namespace) -> int:
    from ..infer.model_zip import install_model

    folders = install_model(Path(args.zip), _settings(args).require("results"))
    if not args.quiet:
        print("\n".join([f"installed {len(folders)} model folder(s):"] + [f"  {f}" for f in folders]))
    return 0


# ------------------------------------------------------------------------------- evaluation and model selection
__all__ += ["cmd_evaluate", "cmd_find_best", "cmd_ensemble", "cmd_apply_postprocessing"]


def _evaluation_labels(args: argparse.Namespace):
    """What ``nnfast evaluate`` evaluates: --labels, --dataset-json, --task's dataset.json, or <pred>/dataset.json."""
    from ..errors import CaseNotFoundError
    from ..settings import find_dataset_folder

    if args.labels:
        return list(args.labels)
    if args.dataset_json:
        return Path(args.dataset_json)
    if args.task:
        s = _settings(args)
        for root in (s.preprocessed, s.raw):
            if root is not None:
                try:
                    candidate = find_dataset_folder(args.task, root) / "dataset.json"
                except FileNotFoundError:
                    continue
                if candidate.is_file():
                    return candidate
        raise CaseNotFoundError(f"no dataset.json for task {args.task} in the preprocessed or raw folder")
    if (Path(args.pred) / "dataset.json").is_file():
        return Path(args.pred) / "dataset.json"
    raise CaseNotFoundError("say what to evaluate: --dataset-json FILE, --task N or --labels L [L ...] "
                            f"(`{args.pred}` holds no dataset.json)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate.metrics import evaluate_folder

    labels = _evaluation_labels(args)
    from ..layout import SUMMARY_FILE

    output = Path(args.output) if args.output else Path(args.pred) / SUMMARY_FILE
    with progress_bar("evaluate", args.quiet) as prog:
        summary = evaluate_folder(Path(args.pred), Path(args.ref), labels, args.workers,
                                  ignore_label=args.ignore_label, output_file=output, progress=prog)
    picture = _summary_picture(summary, output)
    if not args.quiet:
        print(summary.format())
        print(f"written to {output}" + (f" and {picture}" if picture else ""))
    return 0


def _summary_picture(summary, summary_file: Path) -> Path | None:
    """Draw ``summary.png`` beside the summary file; a missing matplotlib costs the picture only."""
    from ..visualize.summary_plot import plot_summary, summary_plot_path

    try:
        return plot_summary(summary, summary_plot_path(summary_file))
    except ImportError as e:  # matplotlib is an optional extra
        print(f"nnfast evaluate: summary.png not drawn ({e}); install matplotlib for it", file=sys.stderr)
        return None


def cmd_find_best(args: argparse.Namespace) -> int:
    from ..evaluate.find_best import find_best_configuration

    with progress_bar("find-best", args.quiet) as prog:
        best = find_best_configuration(args.task, _settings(args), args.configs, tuple(args.folds), plans=args.plans,
                                       workers=args.workers, allow_ensembling=not args.no_ensembles, progress=prog)
    print(best.format())
    print(f"\nwritten to {best.info_file}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from ..evaluate.ensemble import ensemble_folders

    with progress_bar("ensemble", args.quiet) as prog:
        written = ensemble_folders([Path(f) for f in args.input], Path(args.output), args.workers,
                                   dataset_json=Path(args.dataset_json) if args.dataset_json else None,
                                   save_probabilities=args.save_probabilities, progress=prog)
    if not args.quiet:
        print(f"ensembled {len(written)} case(s) from {len(args.input)} folders into {args.output}")
    return 0


def cmd_apply_postprocessing(args: argparse.Namespace) -> int:
    from ..evaluate.postprocessing import PostprocessingPlan, apply_postprocessing

    plan = PostprocessingPlan.load(Path(args.plan))
    with progress_bar("postprocess", args.quiet) as prog:
        written = apply_postprocessing(Path(args.input), Path(args.output), plan, args.workers, progress=prog)
    if not args.quiet:
        steps = "; ".join(s.describe() for s in plan.steps) or "no steps (files copied)"
        print(f"postprocessed {len(written)} case(s) into {args.output}: {steps}")
    return 0


# ------------------------------------------------------------------------------- pictures
__all__ += ["cmd_overlay"]


def cmd_overlay(args: argparse.Namespace) -> int:
    from ..visualize.api import overlay_dataset

    with progress_bar("overlay", args.quiet) as prog:
        report = overlay_dataset(args.task, _settings(args), Path(args.output), cases=args.cases,
                                 pred_dir=Path(args.pred) if args.pred else None, workers=args.workers,
                                 channel=args.channel, views=tuple(args.views), source=args.source, progress=prog)
    if not args.quiet or not report.written:  # the problems of each case are logged as warnings already
        print(report.format(details=False), file=sys.stdout if report.written else sys.stderr)
    return 0 if report.written else 2
