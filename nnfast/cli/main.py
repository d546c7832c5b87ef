"""The ``nnfast`` command: argument parsing only; every subcommand calls the typed API of its stage.

Heavy modules (numpy, numba, torch, zarr) are imported inside the command functions so that ``nnfast --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Sequence, get_args

from .. import __version__
from ..device import DeviceChoice
from ..layout import PLANS_IDENTIFIER, TRAINER_NAME
from ..plan.presets import PRESETS
from ..plan.schema import CONFIGURATION_NAMES
from ..preprocess.api import CONFIG_CHOICES as PREPROCESS_CONFIG_CHOICES
from ..preprocess.api import PREPROCESSED_CONFIGURATIONS

__all__ = ["main", "build_parser"]


def _add_roots(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data folders (default: NNFAST_* or nnU-Net's nnUNet_* environment variables)")
    g.add_argument("--raw", metavar="PATH", help="raw datasets root (NNFAST_RAW / nnUNet_raw)")
    g.add_argument("--preprocessed", metavar="PATH", help="preprocessed root (NNFAST_PREPROCESSED / nnUNet_preprocessed)")
    g.add_argument("--results", metavar="PATH", help="results root (NNFAST_RESULTS / nnUNet_results)")


_CONFIG_HELP = (f"{', '.join(CONFIGURATION_NAMES)} or a custom configuration of the plans (e.g. 3d_fullres_bs40, "
                "nnU-Net's inherits_from); checked against the loaded plans")


def _add_plans(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--plans", metavar="NAME", default=None,
                   help=help or f"plans identifier (default {PLANS_IDENTIFIER}; e.g. nnfast_ResEncM_plans)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _checked(cast, ok, expected: str):
    """An argparse ``type``: ``cast(text)`` that ``ok`` accepts, else an error saying what was ``expected``."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s}")
        return v
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
_tile_step = _checked(float, lambda v: 0 < v <= 1, "a fraction of the patch size in (0, 1]")


def _fold(s: str) -> str:
    """A cross-validation fold: ``all`` or an integer >= 0 (kept as text, as the API takes it)."""
    s = s.strip()
    if s != "all" and not s.isdigit():
        raise argparse.ArgumentTypeError(f"expected a fold number (0, 1, ...) or 'all', got {s!r}")
    return s


def _checkpoint(s: str) -> str:
    """best, final, latest (or checkpoint_best, ... with .pt/.pth) as the checkpoint's file stem."""
    from ..errors import SettingsError
    from ..layout import checkpoint_name

    try:
        return checkpoint_name(s)
    except SettingsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _scheduler(s: str) -> str:
    """``local:N`` (N >= 1) or a dask scheduler address (``tcp://host:port``, ``host:port``)."""
    if s.startswith("local:"):
        n = s.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"expected 'local:N' with N >= 1 worker processes, got {s!r}")
        return s
    address = s.split("://", 1)[1] if "://" in s else s
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected a dask scheduler address such as tcp://host:8786, or local:N, "
                                         f"got {s!r}")
    return s


def _device(s: str) -> str:
    """auto, cpu, cuda, cuda:N, or another device string torch accepts (checked by torch, imported only then)."""
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    import torch

    try:
        torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}") from None
    return s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnfast",
        description="Fast, self-configuring 3D medical image segmentation, compatible with nnU-Net v2.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"nnfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="synthesize a small CT dataset and run the pipeline on it", allow_abbrev=False)
    p.add_argument("--folder", default="nnfast_demo", help="working folder for the demo (default: ./nnfast_demo)")
    p.add_argument("--cases", type=_positive_int, default=10, help="number of synthetic training cases")
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=_positive_int, default=15, help="training epochs (CPU)")
    p.add_argument("--iterations", type=_positive_int, default=20, help="training iterations per epoch")
    p.add_argument("--gpu-memory-gb", type=_positive_float, default=0.25,
                   help="GPU memory target of the demo's plans (small: a patch the CPU trains in minutes)")
    p.add_argument("--skip-training", action="store_true", help="stop after preprocessing")
    p.add_argument("--no-tta", action="store_true",
                   help="validate the held-out cases without mirroring (8x fewer network passes; the test suite's run)")
    _add_common(p)

    p = sub.add_parser("synth", help="write a deterministic synthetic Decathlon-style task", allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder in which Task{ID}_{NAME} is created")
    p.add_argument("--task-id", type=int, default=1)
    p.add_argument("--name", default="SynthCT")
    p.add_argument("--cases", type=_positive_int, default=8)
    p.add_argument("--test-cases", type=_non_negative_int, default=2)
    p.add_argument("--kind", choices=("ct", "mri"), default="ct", help="ct: int16 HU, 1 channel; mri: 4D multi-channel")
    p.add_argument("--min-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="smallest shape (z y x)")
    p.add_argument("--max-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="largest shape (z y x)")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)

    p = sub.add_parser("convert", help="convert a Decathlon task (TaskNN_Name) to nnU-Net v2 layout", allow_abbrev=False)
    p.add_argument("--msd", required=True, metavar="PATH", help="the TaskNN_Name folder")
    p.add_argument("--id", type=int, dest="dataset_id", help="dataset id to use instead of the task's number")
    p.add_argument("--workers", type=_positive_int, default=1)
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("verify", help="check a dataset and report every problem", allow_abbrev=False)
    p.add_argument("--task", required=True, help="7, 007, Dataset007_Name or Task007_Name")
    p.add_argument("--workers", type=_positive_int, default=1)
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("plan", help="verify, extract the fingerprint and write the experiment plans", allow_abbrev=False)
    p.add_argument("--task", required=True)
    p.add_argument("--workers", type=_positive_int, default=1)
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="planner: default (nnU-Net's ExperimentPlanner, PlainConvUNet) or nnU-Net's residual-encoder "
                        "presets resenc-m/-l/-xl (nnUNetPlannerResEncM/L/XL)")
    _add_plans(p, "plans to write (default: the preset's, nnfast_plans / nnfast_ResEncM_plans / ...)")
    p.add_argument("--gpu-memory-gb", type=_positive_float, default=None,
                   help="GPU memory target of the plans (default: the preset's, nnU-Net: 8, 8, 24, 40). Plans on "
                        "disk are never replaced: when this or --target-spacing would change them, give --plans NAME "
                        "to write new plans beside them (or --replan)")
    p.add_argument("--target-spacing", type=_positive_float, nargs=3, metavar=("Z", "Y", "X"),
                   help="3d_fullres target spacing in mm, reader axis order (nnU-Net's -overwrite_target_spacing)")
    p.add_argument("--no-verify", action="store_true", help="skip dataset verification")
    p.add_argument("--force", action="store_true", help="recompute the fingerprint and plans even if current")
    p.add_argument("--replan", action="store_true", help="overwrite the plans on disk (hand edits included)")
    p.add_argument("--transfer-from", metavar="DATASET",
                   help="take the plans (architecture, spacing) of this dataset, with this dataset's intensity "
                        "statistics and labels (nnU-Net's nnUNetv2_move_plans_between_datasets)")
    p.add_argument("--export-nnunet", action="store_true", help="also write nnUNetPlans.json and dataset_fingerprint.json")
    p.add_argument("--scheduler", type=_scheduler, help="dask scheduler address (tcp://host:port) or local:N")
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("preprocess", help="plan if needed, then preprocess every training case", allow_abbrev=False)
    p.add_argument("--task", required=True)
    p.add_argument("--config", default="3d_fullres",
                   help=f"a configuration of the plans ({', '.join(PREPROCESS_CONFIG_CHOICES)}, or a custom one)")
    _add_plans(p)
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--pool", choices=("auto", "threads", "processes"), default="auto",
                   help="run the cases on threads of this process (reads each input once, no worker start-up) or on "
                        "worker processes; auto: threads for --workers up to 4 and the cores available")
    p.add_argument("--scheduler", type=_scheduler, help="dask scheduler address (tcp://host:port) or local:N")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="planner preset when planning is needed")
    p.add_argument("--gpu-memory-gb", type=_positive_float, default=None,
                   help="GPU memory target when planning is needed (plans on disk are used as they are)")
    p.add_argument("--replan", action="store_true", help="re-plan and overwrite the plans on disk")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--force", action="store_true", help="recompute every case even if its store is current")
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("train", help="train one configuration and fold (nnU-Net's trainer; DDP via torchrun)",
                       allow_abbrev=False)
    p.add_argument("--task", required=True)
    p.add_argument("--config", default="3d_fullres", help=_CONFIG_HELP)
    _add_plans(p)
    p.add_argument("--fold", type=_fold, default="0",
                   help="cross-validation fold 0..4 (nnU-Net's split) or 'all' (default 0)")
    p.add_argument("--epochs", type=_positive_int, help="number of epochs (nnU-Net: 1000)")
    p.add_argument("--iterations", type=_positive_int, help="training batches per epoch (nnU-Net: 250)")
    p.add_argument("--val-iterations", type=_non_negative_int,
                   help="validation batches per epoch (nnU-Net: 50; 0 disables)")
    p.add_argument("--device", default="auto", choices=get_args(DeviceChoice))
    p.add_argument("--resume", action="store_true", help="continue from the fold's last checkpoint")
    p.add_argument("--workers", type=_non_negative_int, help="data loader processes (default: NNFAST_LOADER_WORKERS, "
                                               "nnUNet_n_proc_DA, else up to 12 per GPU; 0 = in-process)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the network (CUDA only anyway)")
    p.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"),
                   help="mixed precision on CUDA (auto = fp16 with a GradScaler, nnU-Net's)")
    p.add_argument("--seed", type=int, help="seed of the network initialisation and of the batch streams")
    p.add_argument("--save-every", type=_positive_int, help="write checkpoint_latest every N epochs (50)")
    p.add_argument("--stop-after-epoch", type=_positive_int, metavar="N",
                   help="stop once N epochs are done (checkpoint_latest written; continue later with --resume)")
    p.add_argument("--no-val", action="store_true", help="skip the final validation after training")
    p.add_argument("--validate-only", action="store_true",
                   help="only run the final validation of a trained fold (nnU-Net's --val); for 3d_lowres it also "
                        "writes the cascade's inputs for the fold's validation cases")
    p.add_argument("--val-best", action="store_true", help="validate checkpoint_best instead of checkpoint_final")
    p.add_argument("--npz", action="store_true", help="the final validation also saves softmax probabilities "
                                                     "(needed to ensemble configurations)")
    p.add_argument("--pretrained-weights", metavar="CKPT",
                   help="fine-tune: initialise the network from an nnfast .pt or nnU-Net .pth checkpoint (all but "
                        "the segmentation heads; nnU-Net's -pretrained_weights)")
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("predict", help="segment raw images with a trained configuration (nnU-Net's nnUNetv2_predict)",
                       allow_abbrev=False)
    p.add_argument("-i", "--input", required=True, help="folder of <case>_XXXX<ending> images (one file per channel)")
    p.add_argument("-o", "--output", required=True, help="output folder for <case><ending> segmentations")
    p.add_argument("--task", help="dataset of the trained model (with --config; or give --model-folder)")
    p.add_argument("--config", help="configuration (default 3d_fullres; with --model-folder: the checkpoint's); "
                                    + _CONFIG_HELP)
    _add_plans(p, f"with --task: plans identifier of the model folder (default {PLANS_IDENTIFIER}; nnU-Net: "
                  "nnUNetPlans)")
    p.add_argument("--model-folder", help=f"trainer folder (default <results>/<Dataset>/{TRAINER_NAME}__"
                                          f"{PLANS_IDENTIFIER}__<config>); nnU-Net model folders are read too")
    p.add_argument("--trainer", default=TRAINER_NAME,
                   help=f"with --task: trainer name of the model folder (default {TRAINER_NAME}; nnU-Net: nnUNetTrainer)")
    p.add_argument("--folds", nargs="+", type=_fold,
                   help="folds to ensemble (default: every fold with the checkpoint)")
    p.add_argument("--checkpoint", type=_checkpoint, default="checkpoint_final",
                   help="final (default), best or latest: fold_<k>/checkpoint_<name>.pt (nnU-Net: .pth)")
    p.add_argument("--no-tta", action="store_true", help="disable mirroring test-time augmentation (8x faster in 3D)")
    p.add_argument("--step", type=_tile_step, default=0.5,
                   help="tile step as a fraction of the patch size, in (0, 1] (nnU-Net: 0.5)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write <case>.npz (softmax probabilities, float16) and <case>.json (properties)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=_positive_int, default=2, help="export threads (cases exported concurrently)")
    p.add_argument("--prev-stage-folder", help="cascade: the previous stage's predictions (default: predicted first)")
    p.add_argument("--continue", dest="continue_prediction", action="store_true",
                   help="skip cases whose outputs already exist (outputs are written atomically)")
    p.add_argument("--num-parts", type=_positive_int, default=1,
                   help="split the sorted cases into this many parts (several GPUs or machines; nnU-Net's -num_parts)")
    p.add_argument("--part-id", type=_non_negative_int, default=0,
                   help="which part this run predicts: cases[part_id::num_parts] (0 .. num_parts - 1)")
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("export-model", help="write a trained model as an nnU-Net model zip "
                                            "(nnUNetv2_install_pretrained_model_from_zip installs it)",
                       allow_abbrev=False)
    p.add_argument("--task", required=True, help="dataset of the trained model")
    p.add_argument("--config", nargs="+", default=["3d_fullres"], choices=CONFIGURATION_NAMES,
                   help="configuration(s) to export (default 3d_fullres)")
    p.add_argument("--folds", nargs="+", type=_fold, help="folds to export (default: every fold with the checkpoint)")
    p.add_argument("--checkpoint", default="checkpoint_final", help="checkpoint to export (checkpoint_final/_best)")
    p.add_argument("--trainer", default=TRAINER_NAME, help=f"trainer of the model folder (default {TRAINER_NAME})")
    p.add_argument("--plans", default=PLANS_IDENTIFIER,
                   help=f"plans identifier of the model folder (default {PLANS_IDENTIFIER})")
    p.add_argument("-o", "--output", required=True, metavar="ZIP", help="the zip file to write")
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("install-model", help="install a model zip (from nnfast export-model or nnU-Net's "
                                             "nnUNetv2_export_model_to_zip) into the results root",
                       allow_abbrev=False)
    p.add_argument("zip", help="the model zip")
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("evaluate", help="Dice/IoU of predicted segmentations against references (summary.json)",
                       allow_abbrev=False)
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted segmentations")
    p.add_argument("--ref", required=True, metavar="DIR", help="folder of reference segmentations (same file names)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dataset-json", metavar="FILE",
                   help="labels/regions, ignore label and file ending (default: <pred>/dataset.json if present)")
    g.add_argument("--task", help="use the dataset.json of this dataset (preprocessed folder, else raw)")
    g.add_argument("--labels", nargs="+", type=int, metavar="L", help="evaluate these labels (no dataset.json)")
    p.add_argument("--ignore-label", type=int, help="with --labels: reference value whose voxels are not counted")
    p.add_argument("-o", "--output", metavar="FILE", help="summary file (default: <pred>/summary.json)")
    p.add_argument("--workers", type=_positive_int, default=2)
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("overlay", help="PNG pictures of images with their reference labels (outlines) and "
                                       "predictions (fill), one per case", allow_abbrev=False,
                       epilog="Problems with a case (missing from --pred, a grid that differs from the image, label "
                              "values not in dataset.json) are named in its picture's title and as warnings; the "
                              "exit status is 0 when at least one picture was written, 2 when none could be drawn.")
    p.add_argument("--task", required=True, help="the dataset (7, 007, Dataset007_Name)")
    p.add_argument("--cases", nargs="+", metavar="ID", help="case ids to draw (default: every training case)")
    p.add_argument("--pred", metavar="DIR", help="folder of predicted segmentations <case><file_ending> to draw too")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the <case>.png pictures")
    p.add_argument("--channel", type=int, default=0, help="image channel to show (default 0)")
    p.add_argument("--views", nargs="+", choices=("axial", "coronal", "sagittal"), default=["axial"],
                   help="slices to show, each through the most foreground (default: axial)")
    p.add_argument("--source", default="raw", choices=("raw", *PREPROCESSED_CONFIGURATIONS),
                   help="raw files (default) or the preprocessed stores of a configuration")
    p.add_argument("--workers", type=_positive_int, default=1)
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("find-best", help="rank the cross-validation of every trained configuration and pairwise "
                                         "ensemble, decide postprocessing, print the inference commands",
                       allow_abbrev=False)
    p.add_argument("--task", required=True)
    p.add_argument("--configs", nargs="+", help="configurations to consider (default: every trained one; the order "
                                                "breaks ties); " + _CONFIG_HELP)
    p.add_argument("--plans", nargs="+", metavar="NAME",
                   help="plans identifiers whose models are ranked together (default: every one with trained models)")
    p.add_argument("--folds", nargs="+", type=_non_negative_int, default=[0, 1, 2, 3, 4],
                   help="folds of the cross-validation")
    p.add_argument("--no-ensembles", action="store_true", help="do not ensemble pairs of configurations")
    p.add_argument("--workers", type=_positive_int, default=2)
    _add_roots(p)
    _add_common(p)

    p = sub.add_parser("ensemble", help="average the saved probabilities of several predictions of the same cases",
                       allow_abbrev=False)
    p.add_argument("-i", "--input", nargs="+", required=True, metavar="DIR",
                   help="prediction folders made with --save-probabilities (nnfast's or nnU-Net's --save_probabilities)")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--dataset-json", metavar="FILE", help="labels (default: dataset.json of the first folder)")
    p.add_argument("--save-probabilities", action="store_true", help="also write the averaged probabilities")
    p.add_argument("--workers", type=_positive_int, default=2)
    _add_common(p)

    p = sub.add_parser("apply-postprocessing", help="apply a postprocessing plan (from find-best) to segmentations",
                       allow_abbrev=False)
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="folder of segmentations")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the postprocessed segmentations")
    p.add_argument("--plan", required=True, metavar="FILE",
                   help="postprocessing.json written by `nnfast find-best` (nnU-Net's postprocessing.json or "
                        "postprocessing.pkl work too)")
    p.add_argument("--workers", type=_positive_int, default=2)
    _add_common(p)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    for noisy in ("numba", "distributed", "asyncio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``nnfast`` command (``argv``: the arguments, default ``sys.argv[1:]``); returns the exit status."""
    return _dispatch(build_parser().parse_args(argv))


#: Commands after which :func:`run` ends the process without the interpreter's teardown.
QUICK_EXIT_COMMANDS = frozenset({"predict"})


def run() -> NoReturn:
    """The ``nnfast`` program (console script and ``python -m nnfast.cli``): :func:`main`, then exit.

    After a command of :data:`QUICK_EXIT_COMMANDS` the process ends with ``os._exit`` once its output is flushed:
    ``predict`` has joined its threads and written and renamed every file by then, and the interpreter's teardown
    (unloading the ~2,000 modules of torch, Numba and SciPy) cost 0.7 s of CPU there for nothing (measured, after
    ``import torch`` alone). The ``atexit`` handlers still run first (temporary folders, child processes, shared
    memory), only the module teardown is skipped. Under coverage the usual exit runs: coverage saves its data at exit.
    """
    args = build_parser().parse_args()
    code = _dispatch(args)
    if args.command in QUICK_EXIT_COMMANDS and "coverage" not in sys.modules:
        import atexit

        atexit._run_exitfuncs()  # temporary folders, child processes, shared memory: cleaned up as at a usual exit
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    _setup_logging(args)
    from . import commands

    from ..errors import NnfastError

    try:
        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args)
    except NnfastError as e:
        print(f"nnfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (permissions, a file where a folder belongs, a full disk)
        print(f"nnfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    run()
