"""``nnfast train``: one training run of one configuration and fold (nnU-Net v2's ``nnUNetTrainer.run_training``).

Files: ``<results>/<Dataset>/nnfastTrainer__nnfast_plans__<config>/fold_<k>/`` (checkpoints, logs, progress plot;
see :mod:`nnfast.layout`). The cross-validation split is ``<preprocessed>/<Dataset>/splits_final.json``
(nnU-Net's, created when missing, a user-written file honoured). Training data:
``<preprocessed>/<Dataset>/<data_identifier>/<case>.zarr``.

One epoch (nnU-Net's order): the learning rate of the epoch is set (poly schedule), ``num_iterations_per_epoch``
training steps, ``num_val_iterations_per_epoch`` validation batches (loss and pseudo-Dice from global TP/FP/FN
counts over all of them, foreground classes), EMA update, logs/plot, checkpoints.

The cascade (``3d_cascade_fullres``): the network gets one extra input channel per foreground label, the
``3d_lowres`` segmentation of the case (nnU-Net's ``MoveSegAsOneHotToDataTransform``), read from
``<results>/<Dataset>/nnfastTrainer__nnfast_plans__3d_lowres/predicted_next_stage/3d_cascade_fullres/``, which the
final validation of each ``3d_lowres`` fold fills for its validation cases (:mod:`nnfast.infer.validation`). Every
case of the fold must have one before training starts.

Region labels (:attr:`nnfast.labels.LabelManager.has_regions`): one sigmoid head per region, region targets from the
loader, Dice + BCE (:class:`~nnfast.train.loss.DiceBCELoss`), pseudo-Dice per region (logit > 0);
``regions_class_order`` comes from the preprocessed folder's dataset.json and is checked before training.
Fine-tuning (``pretrained_weights``): :mod:`nnfast.train.pretrained`, checked before anything is written.

After the last epoch the caller's ``final_validation`` callable (``nnfast train`` passes
:func:`nnfast.infer.validation.validate_fold`) predicts and scores the fold's validation cases; this package imports
neither :mod:`nnfast.infer` nor :mod:`nnfast.evaluate`.

Set-up in steps (:class:`_Run`): start the process (DDP, device, log file) -> restore (checkpoint, settings, trainer
folder) -> the fold's data (split, cascade inputs) -> build the model (precision, network, loss, optimiser, resumed
state) -> build the loaders.

Reproducibility and exact resume: batch ``i`` of the training stream is a pure function of ``(seed, i)`` (see
:mod:`nnfast.data.loader`), with ``i = epoch * iterations + step``; the validation stream likewise. A checkpoint
stores the network, optimiser, GradScaler, LR scheduler, epoch, history, best EMA, torch's generator states and
the index of the next batch of both streams, so ``resume=True`` continues exactly where the checkpoint was taken
(bit-identical weights on CPU; CUDA kernels themselves may be non-deterministic with ``cudnn.benchmark``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, cast

import numpy as np
import torch

from .. import __version__
from ..device import DeviceChoice, resolve_device
from ..errors import DatasetError, PlanError, SettingsError
from ..io.atomic import write_json_atomic
from ..layout import (DATASET_JSON, PLANS_IDENTIFIER, SPLITS_FILE, SUMMARY_FILE, TRAINER_NAME, Fold, case_store_folder,
                      check_fold, checkpoint_file, fold_name, previous_stage_folder, trainer_folder,
                      validation_folder)
from ..settings import Settings, find_dataset_folder
from ..splits import fold_cases, load_or_create_splits
from .checkpoint import (capture_rng_state, find_resume_checkpoint, load_checkpoint, restore_rng_state,
                         save_checkpoint)
from .config import TrainConfig
from .ddp import DistContext, all_reduce_sum, split_batch
from .layout import TRAIN_CONFIG_FILE, prepare_trainer_folder
from .progress import EpochRecord, TrainingHistory, TrainingLogFile, plot_progress, write_progress_files

__all__ = ["train", "TrainResult", "TrainOptions", "FinalValidation"]

log = logging.getLogger(__name__)

_VAL_STREAM, _TRAIN_STREAM = 1, 0
_FOLD_ALL_KEY = 1000  # seed key of fold "all"


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes
    ----------
    output_folder : Path
        The fold folder.
    epochs_completed, num_epochs : int
        Epochs done in total (across resumed runs) and planned.
    epochs_run : int
        Epochs run by this call.
    finished : bool
        ``epochs_completed == num_epochs`` (``checkpoint_final`` written).
    checkpoint : Path or None
        ``checkpoint_final.pt`` when finished, else the latest checkpoint written.
    best_ema, last_ema : float or None
        Best and last EMA pseudo-Dice.
    history : TrainingHistory
    network : torch.nn.Module
        The trained plain module (not compiled, not DDP-wrapped), on the training device.
    world_size : int
        Number of processes that trained together (DDP).
    validation : object
        What the ``final_validation`` callable returned (:func:`nnfast.infer.validation.validate_fold` returns a
        :class:`nnfast.evaluate.metrics.Summary`; None when none was given or it was skipped, ``validation_skipped``
        says why); ``validation_dice`` is its foreground mean Dice.
    """

    output_folder: Path
    dataset: str
    configuration: str
    fold: Fold
    train_config: TrainConfig
    device: str
    epochs_completed: int
    num_epochs: int
    epochs_run: int
    finished: bool
    checkpoint: Path | None
    best_ema: float | None
    last_ema: float | None
    history: TrainingHistory
    network: torch.nn.Module
    wall_s: float
    world_size: int = 1
    validation: Any = None
    validation_dice: float | None = None
    validation_skipped: str | None = None


# ------------------------------------------------------------------------------------------------ set-up helpers
def _labels(plans, pre_dir: Path):
    """The dataset's :class:`~nnfast.labels.LabelManager`: region training (``regions_class_order`` from the
    preprocessed folder's dataset.json, checked now, not after training) or labels ``0..C-1``."""
    from ..labels import LabelManager

    lm = LabelManager.from_plans(plans)
    if lm.has_regions:
        djson = pre_dir / DATASET_JSON
        try:
            rco = json.loads(djson.read_text(encoding="utf-8")).get("regions_class_order")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{plans.dataset_name} defines regions, so training needs `regions_class_order` from "
                               f"`{djson}`, which cannot be read ({e}); run `nnfast preprocess` again") from None
        lm = LabelManager.from_plans(plans, rco)
        try:
            lm.check_regions_class_order()
        except PlanError as e:
            raise PlanError(f"`{djson}`: {e}") from None
        return lm
    values = list(lm.all_labels)
    if values != list(range(len(values))):
        raise PlanError(f"labels of {plans.dataset_name} must be 0..{len(values) - 1}, got {values}")
    return lm


def _missing_previous_stage_error(task, dataset: str, config_name: str, prev: str, folder: Path,
                                  missing: dict[str, str], n_cases: int, splits: list, fold: Fold) -> DatasetError:
    by_fold = sorted({k for k, s in enumerate(splits) for c in missing if c in s.get("val", ())})
    first = next(iter(sorted(missing)))
    folds = (f" (they are validation cases of `{prev}` fold(s) {', '.join(map(str, by_fold))})" if by_fold else "")
    return DatasetError(
        f"`{config_name}` fold {fold} trains on the `{prev}` segmentation of each of its {n_cases} cases, but "
        f"{len(missing)} are missing or out of date in `{folder}`{folds}; e.g. {first}: {missing[first]}. The final "
        f"validation of each `{prev}` fold writes them for its validation cases: train `{prev}` folds 0-4 "
        f"(`nnfast train --task {task} --config {prev} --fold K`), or, for folds already trained, run "
        f"`nnfast train --task {task} --config {prev} --fold K --validate-only`; `3d_fullres` must be preprocessed "
        f"first (`nnfast preprocess --task {task} --config 3d_fullres`).")


def _stream_seeds(seed: int, fold: Fold, rank: int) -> tuple[int, int]:
    """Base seeds of the training and validation batch streams of ``(seed, fold, rank)``."""
    key = _FOLD_ALL_KEY if fold == "all" else int(fold)
    out = []
    for stream in (_TRAIN_STREAM, _VAL_STREAM):
        s = np.random.SeedSequence([int(seed), key, int(rank), stream]).generate_state(2, np.uint64)
        out.append(int((int(s[0]) << 1 ^ int(s[1])) % (2 ** 62)))
    return out[0], out[1]


def _default_workers(device: torch.device, world_size: int) -> int:
    for var in ("NNFAST_LOADER_WORKERS", "nnUNet_n_proc_DA"):
        v = os.environ.get(var)
        if v:
            try:
                return max(0, int(v))
            except ValueError:
                raise SettingsError(f"{var}={v!r} is not an integer; set a whole number or unset it") from None
    cpus = max(1, (os.cpu_count() or 1) // max(1, world_size))
    if device.type == "cuda":
        return min(12, max(1, cpus - 1))
    return min(2, max(0, cpus // 2 - 1))


def _config_diff(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


# ------------------------------------------------------------------------------------------------ the run
class FinalValidation(Protocol):
    """What :func:`train` calls after the last epoch to predict and score the fold's validation cases (nnU-Net's
    ``perform_actual_validation``); :func:`nnfast.infer.validation.validate_fold` is the one nnfast wires in (the
    ``nnfast train`` command passes it). Training does not import inference: the caller decides."""

    def __call__(self, fold_dir: Path, *, settings: Settings, device: Any, checkpoint_name: str,
                 save_probabilities: bool, workers: int) -> Any: ...


@dataclass(frozen=True)
class TrainOptions:
    """How :func:`train` runs (everything but what it trains); see :func:`train` for each field."""

    device: DeviceChoice = "auto"
    resume: bool = False
    num_workers: int | None = None
    num_workers_val: int | None = None
    progress: Callable[[EpochRecord], None] | None = None
    stop_after_epoch: int | None = None
    final_validation: FinalValidation | None = None
    save_probabilities: bool = False
    pretrained_weights: str | os.PathLike | None = None
    plans_identifier: str = PLANS_IDENTIFIER


def train(
    task: str | int,
    settings: Settings,
    config_name: str = "3d_fullres",
    fold: Fold = 0,
    train_config: TrainConfig | None = None,
    *,
    device: DeviceChoice = "auto",
    resume: bool = False,
    num_workers: int | None = None,
    num_workers_val: int | None = None,
    progress: Callable[[EpochRecord], None] | None = None,
    stop_after_epoch: int | None = None,
    final_validation: FinalValidation | None = None,
    save_probabilities: bool = False,
    pretrained_weights: str | os.PathLike | None = None,
    plans_identifier: str = PLANS_IDENTIFIER,
) -> TrainResult:
    """Train ``config_name`` on ``fold`` of ``task`` (see the module docstring for files and semantics).

    Parameters
    ----------
    task : str or int
        Dataset id or folder name (``4``, ``Dataset004_Hippocampus``).
    settings : Settings
        Needs the preprocessed and results roots.
    config_name : str
        ``2d``, ``3d_fullres``, ``3d_lowres`` or ``3d_cascade_fullres``. The cascade's second stage needs the
        first stage's segmentation of every case of the fold (:func:`nnfast.layout.previous_stage_folder`), which
        the final validation of the five ``3d_lowres`` folds writes.
    fold : int or "all"
        Cross-validation fold (0..4 with nnU-Net's split; higher: a seeded 80:20 split) or ``"all"``.
    train_config : TrainConfig, optional
        Hyperparameters; None means the saved config of the run being resumed (``resume=True``), else nnU-Net's
        defaults. Batch and patch size left None come from the plan.
    device : "auto", "cuda" or "cpu"
        "auto": CUDA when available. CPU runs in float32 without ``torch.compile``.
    resume : bool
        Continue from the fold's newest checkpoint (final > latest > best); without one, start fresh (warning).
    num_workers, num_workers_val : int, optional
        Loader processes (0: in this process). Default: ``NNFAST_LOADER_WORKERS`` / ``nnUNet_n_proc_DA``, else 12
        per GPU (fewer on small machines), 0-2 on CPU; validation ``max(1, n // 2)``.
    progress : callable, optional
        Called with each epoch's :class:`EpochRecord` (rank 0 only).
    stop_after_epoch : int, optional
        End this call once this many epochs are completed (in total), writing ``checkpoint_latest`` so that a
        later ``resume=True`` continues exactly (e.g. for time-limited cluster jobs). The LR schedule still follows
        ``num_epochs``.
    final_validation : FinalValidation, optional
        Called once the last epoch is done (rank 0), with the fold folder, to predict and score the validation
        cases: pass :func:`nnfast.infer.validation.validate_fold` for nnU-Net's ``validation/`` folder with
        ``summary.json`` (what ``nnfast train`` does). None: no final validation. A failure there (an
        :class:`~nnfast.errors.NnfastError`) is logged without failing the training (the checkpoints are complete).
    save_probabilities : bool
        The final validation also saves softmax probabilities (nnU-Net's ``--npz``, needed to ensemble
        configurations).
    pretrained_weights : path, optional
        Fine-tune: an nnfast or nnU-Net checkpoint whose weights initialise the network (nnU-Net's
        ``-pretrained_weights``; :mod:`nnfast.train.pretrained`: every parameter but the segmentation heads and, with
        another input channel count, the first convolution). Checked before any training work; not with ``resume``.

    Raises
    ------
    SettingsError
        Bad fold/device/settings, or a DDP launch without rendezvous variables.
    PlanError
        No plans, or plans changed since the run being resumed.
    DatasetError
        The configuration was not preprocessed, or (the cascade) previous-stage segmentations are missing.
    """
    options = TrainOptions(device=device, resume=resume, num_workers=num_workers, num_workers_val=num_workers_val,
                           progress=progress, stop_after_epoch=stop_after_epoch, final_validation=final_validation,
                           save_probabilities=save_probabilities, pretrained_weights=pretrained_weights,
                           plans_identifier=plans_identifier)
    run = _Run(task, settings, config_name, fold, train_config, options)
    try:
        return run.execute()
    finally:
        run.close()


@dataclass
class _Restored:
    """What the restore step decided: the checkpoint to continue from (None: a new run) and the settings."""

    checkpoint: dict | None
    checkpoint_path: Path | None
    cfg: TrainConfig


@dataclass
class _FoldData:
    """The fold's cases and the source their batches are read from."""

    train_ids: list[str]
    val_ids: list[str]
    source: Any  # nnfast.data.dataset.ZarrCaseSource


@dataclass
class _Model:
    """The network (wrapped for compile/DDP as trained, and plain), its loss, optimiser and precision, with the
    state a resumed checkpoint restored."""

    net: torch.nn.Module
    plain_net: torch.nn.Module
    num_input_channels: int
    loss_fn: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp_dtype: Any
    compiled: bool
    current_epoch: int = 0
    best_ema: float | None = None
    history: TrainingHistory = dataclasses.field(default_factory=TrainingHistory)
    next_train_batch: int = 0
    next_val_batch: int = 0


@dataclass
class _Loaders:
    """The training and validation batch streams of this rank."""

    train: Any  # nnfast.data.loader.PatchLoader
    val: Any
    num_workers: int
    num_workers_val: int
    batch_size: int  # per rank
    mirror_axes: tuple[int, ...]
    ready_s: float = 0.0  # waited for the workers' start-up and first batches (PatchLoader.wait_ready)


class _Run:
    """State of one :func:`train` call (a class only to keep the steps readable)."""

    # set by _setup() from the restored model; declared because mypy cannot infer them from its tuple assignment
    current_epoch: int
    best_ema: float | None
    history: TrainingHistory

    def __init__(self, task, settings: Settings, config_name: str, fold, train_config: TrainConfig | None,
                 options: TrainOptions):
        self.t_start = time.perf_counter()
        self.settings = settings
        self.config_name = config_name
        self.fold = check_fold(fold)
        self.options = options
        self.resume = bool(options.resume)
        self.progress = options.progress
        self.stop_after_epoch = options.stop_after_epoch
        self.final_validation = options.final_validation
        self.save_probabilities = bool(options.save_probabilities)
        self.loaders: list = []
        self.ctx = DistContext()

        from ..plan.api import require_plans_file
        from ..plan.planner import load_plans

        self.pre_dir = find_dataset_folder(task, settings.require("preprocessed"))
        self.dataset = self.pre_dir.name
        self.plans_identifier = options.plans_identifier
        self.plans_file = require_plans_file(self.pre_dir, self.plans_identifier, task)
        self.plans = load_plans(self.plans_file)
        self.conf = self.plans.configuration(config_name)
        self.root = trainer_folder(settings.require("results"), self.dataset, config_name,
                                   plans_identifier=self.plans_identifier)
        self.out = self.root / fold_name(self.fold)
        self.labels = _labels(self.plans, self.pre_dir)
        self.num_classes, self.ignore_label = self.labels.num_segmentation_heads, self.labels.ignore_label
        self.task = task
        self.prev_stage_dir = None
        self.cascade_labels: tuple[int, ...] | None = None
        if self.conf.previous_stage is not None:
            self.prev_stage_dir = previous_stage_folder(settings.require("results"), self.dataset,
                                                        self.conf.previous_stage, config_name,
                                                        plans_identifier=self.plans_identifier)
            self.cascade_labels = self.labels.foreground_labels
        self.data_dir = case_store_folder(self.pre_dir, self.conf.data_identifier)
        from ..io.store import list_case_ids

        self.case_ids = list_case_ids(self.data_dir) if self.data_dir.is_dir() else []
        if not self.case_ids:
            raise DatasetError(f"`{self.data_dir}` holds no preprocessed cases; run `nnfast preprocess --task {task} "
                               f"--config {config_name}` first")
        self.train_config_arg = train_config
        self.pretrained = self._check_pretrained(options.pretrained_weights)

    def _check_pretrained(self, path) -> tuple[Path, dict] | None:
        """Read the pretrained weights and check them against this configuration's network (built on the meta
        device: no memory, no time) before anything is written."""
        if path is None:
            return None
        from ..network import build_network, network_input_channels
        from .pretrained import plan_pretrained, read_network_weights

        if self.resume:
            raise SettingsError("--pretrained-weights starts a new training from those weights; it cannot be "
                                "combined with --resume (nnU-Net refuses the same)")
        path = Path(path)
        weights = read_network_weights(path)
        in_ch = network_input_channels(self.plans, self.config_name, len(self.labels.foreground_labels))
        with torch.device("meta"):
            net = build_network(self.plans, self.config_name, in_ch, self.num_classes)
        plan_pretrained(net, weights, path)
        return path, weights

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        for ld in self.loaders:
            try:
                ld.close()
            except Exception:  # pragma: no cover
                log.debug("closing a loader failed", exc_info=True)
        self.loaders = []
        self.ctx.teardown()

    def execute(self) -> TrainResult:
        self._setup()
        start = self.current_epoch
        end = self.cfg.num_epochs
        if self.stop_after_epoch is not None:
            end = max(start, min(end, int(self.stop_after_epoch)))
        last_ckpt = None
        for epoch in range(start, end):
            rec = self._epoch(epoch)
            self.current_epoch = epoch + 1
            last_ckpt = self._after_epoch(rec, is_last_of_call=(epoch == end - 1)) or last_ckpt
        finished = self.current_epoch >= self.cfg.num_epochs
        if finished and end > start:
            last_ckpt = self._finish()
        elif finished:
            last_ckpt = checkpoint_file(self.out, "checkpoint_final")
            self.logfile.write(f"training was already complete ({self.current_epoch} epochs)")
        for ld in self.loaders:
            ld.close()
        self.loaders = []
        result = TrainResult(
            output_folder=self.out, dataset=self.dataset, configuration=self.config_name, fold=self.fold,
            train_config=self.cfg, device=str(self.device), epochs_completed=self.current_epoch,
            num_epochs=self.cfg.num_epochs, epochs_run=self.current_epoch - start, finished=finished,
            checkpoint=last_ckpt if last_ckpt is not None and last_ckpt.is_file() else None,
            best_ema=self.best_ema, last_ema=self.history.last_ema, history=self.history,
            network=self.plain_net, wall_s=0.0, world_size=self.ctx.world_size)
        if finished and self.final_validation is not None and self.ctx.is_main:
            self._final_validation(result)
        result.wall_s = time.perf_counter() - self.t_start
        return result

    # -- set-up -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        """The steps before the first epoch: process and device, restore, the fold's data, model, loaders."""
        self._start_process()
        restored = self._restore()
        self.cfg = restored.cfg
        data = self._fold_data()
        self.val_ids = list(data.val_ids)
        model = self._build_model(restored)
        self.net, self.plain_net, self.num_input_channels = model.net, model.plain_net, model.num_input_channels
        self.loss_fn, self.optimizer, self.scheduler = model.loss_fn, model.optimizer, model.scheduler
        self.scaler, self.amp_dtype = model.scaler, model.amp_dtype
        self.current_epoch, self.best_ema, self.history = model.current_epoch, model.best_ema, model.history
        loaders = self._build_loaders(data, model.next_train_batch, model.next_val_batch)
        self.train_loader, self.val_loader = loaders.train, loaders.val
        self.num_workers = loaders.num_workers
        self.mirror_axes = loaders.mirror_axes
        self._next_val = model.next_val_batch
        self._log_start(restored, data, model, loaders)

    def _start_process(self) -> None:
        """Join the DDP process group (when launched by torchrun), pick the device, open the log file."""
        want = self.options.device
        self.ctx = DistContext.setup("cuda" if (want == "cuda" or (want == "auto" and torch.cuda.is_available()))
                                     else "cpu")
        self.device = resolve_device(want, local_rank=self.ctx.local_rank, strict=True)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.deterministic = False
        self.logfile = TrainingLogFile(self.out / "training_log.txt", enabled=self.ctx.is_main)

    def _restore(self) -> _Restored:
        """The checkpoint to resume from and the hyperparameters (given > the resumed run's > defaults; batch and
        patch size from the plan when unset); rank 0 prepares the trainer folder and writes ``train_config.json``."""
        main = self.ctx.is_main
        ckpt_path = find_resume_checkpoint(self.out) if self.resume else None
        if self.resume and ckpt_path is None:
            log.warning("--resume: no checkpoint in %s, starting a new training", self.out)
        if not self.resume and main and find_resume_checkpoint(self.out) is not None:
            log.warning("%s already holds checkpoints; starting over (they are replaced as training goes); "
                        "use --resume to continue instead", self.out)
        ckpt = load_checkpoint(ckpt_path, map_location=self.device) if ckpt_path is not None else None

        cfg = self.train_config_arg
        if cfg is None:
            cfg = TrainConfig.from_json(ckpt["train_config"]) if ckpt is not None else TrainConfig()
        elif ckpt is not None:
            diff = _config_diff(TrainConfig.from_json(ckpt["train_config"]), cfg)
            if diff:
                log.warning("resuming with changed settings (checkpoint -> now): %s", diff)
        cfg = TrainConfig.from_plan(self.plans, self.config_name, **dataclasses.asdict(cfg))

        if main:
            prepare_trainer_folder(self.root, self.pre_dir, self.plans_file, self.plans, self.config_name,
                                   self.resume and ckpt is not None)
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / TRAIN_CONFIG_FILE, cfg.to_json())
        return _Restored(checkpoint=ckpt, checkpoint_path=ckpt_path, cfg=cfg)

    def _fold_data(self) -> _FoldData:
        """The fold's training and validation cases (rank 0 creates ``splits_final.json``, the others read it)
        and, for the cascade, the check that every case has the first stage's segmentation."""
        from ..data.dataset import ZarrCaseSource

        main = self.ctx.is_main
        splits_file = self.pre_dir / SPLITS_FILE
        splits = []
        if self.fold != "all":
            if main:
                splits = load_or_create_splits(splits_file, self.case_ids)
            self.ctx.barrier()
            if not main:
                splits = load_or_create_splits(splits_file, self.case_ids)
        tr_ids, val_ids = fold_cases(splits, self.fold, self.case_ids)
        if not tr_ids:
            raise DatasetError(f"fold {self.fold} of {self.dataset} has no training cases")
        source = ZarrCaseSource(self.data_dir, previous_stage_folder=self.prev_stage_dir)
        if self.prev_stage_dir is not None:  # before any heavy work: every case needs the first stage's output
            fold_ids = sorted(set(tr_ids) | set(val_ids))
            missing = source.subset(fold_ids).missing_previous_stage()
            if missing:
                assert self.conf.previous_stage is not None  # prev_stage_dir is set only for a cascade's 2nd stage
                raise _missing_previous_stage_error(self.task, self.dataset, self.config_name,
                                                    self.conf.previous_stage, self.prev_stage_dir, missing,
                                                    len(fold_ids), splits, self.fold)
        return _FoldData(train_ids=list(tr_ids), val_ids=list(val_ids), source=source)

    def _build_model(self, restored: _Restored) -> _Model:
        """Precision, network, loss, optimiser and LR schedule (seeded: a fresh run is reproducible), the resumed
        checkpoint's state loaded into them, then SyncBatchNorm / ``torch.compile`` / DDP wrapping."""
        from ..network import build_network, network_input_channels
        from .loss import build_loss
        from .optim import PolyLRScheduler, build_optimizer
        from .step import make_grad_scaler, resolve_amp, resolve_compile

        cfg, ckpt = restored.cfg, restored.checkpoint
        amp_dtype = resolve_amp(cfg.amp, self.device)
        if amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.warning("amp=bf16 requested but this GPU does not support bfloat16; using float16")
            amp_dtype = torch.float16
        scaler = make_grad_scaler(amp_dtype, self.device)
        do_compile = resolve_compile(cfg.compile, self.device) and self.device.type == "cuda"
        if cfg.compile == "on" and self.device.type != "cuda":
            log.warning("torch.compile is only used on CUDA; training on %s without it", self.device)

        torch.manual_seed(cfg.seed)
        in_ch = network_input_channels(self.plans, self.config_name, len(self.labels.foreground_labels))
        net: torch.nn.Module = build_network(self.plans, self.config_name, in_ch, self.num_classes,
                                             deep_supervision=cfg.deep_supervision).to(self.device)
        lowest = 1e-6 if (self.ctx.is_ddp and not do_compile) else 0.0  # nnU-Net: DDP needs a grad for every param
        loss_fn = build_loss(self.conf, self.ignore_label, deep_supervision=cfg.deep_supervision,
                             lowest_weight=lowest, ddp=self.ctx.is_ddp, regions=self.labels.has_regions)
        optimizer = build_optimizer(net.parameters(), cfg)
        scheduler = PolyLRScheduler.from_config(optimizer, cfg)
        if self.pretrained is not None and ckpt is None:
            from .pretrained import load_pretrained_weights

            plan = load_pretrained_weights(net, *self.pretrained)
            self.logfile.write(f"pretrained weights from {plan.path}: {len(plan.copied)} entries copied; kept "
                               "initialised: " + ("; ".join(f"{k} ({why})" for k, why in plan.skipped) or "none"))
        model = _Model(net=net, plain_net=net, num_input_channels=in_ch, loss_fn=loss_fn, optimizer=optimizer,
                       scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, compiled=do_compile)
        if ckpt is not None:
            net.load_state_dict(ckpt["network_weights"])
            optimizer.load_state_dict(ckpt["optimizer_state"])
            if scaler is not None and ckpt.get("grad_scaler_state") is not None:
                scaler.load_state_dict(ckpt["grad_scaler_state"])
            if ckpt.get("lr_scheduler_state"):
                scheduler.load_state_dict(ckpt["lr_scheduler_state"])
                # the schedule follows the current settings (num_epochs may have been raised on resume)
                scheduler.initial_lr, scheduler.max_steps = cfg.initial_lr, cfg.num_epochs
                scheduler.exponent = cfg.poly_exponent
            model.current_epoch = int(ckpt["current_epoch"])
            model.best_ema = None if ckpt.get("best_ema") is None else float(ckpt["best_ema"])
            model.history = TrainingHistory.from_dict(ckpt.get("history") or {})
            model.history.truncate(model.current_epoch)
            model.next_train_batch = int(ckpt["loader"]["next_train_batch"])
            model.next_val_batch = int(ckpt["loader"]["next_val_batch"])
            restore_rng_state(ckpt.get("rng"))
            if model.current_epoch > cfg.num_epochs:
                raise SettingsError(f"the checkpoint `{restored.checkpoint_path}` has {model.current_epoch} epochs, "
                                    f"more than num_epochs={cfg.num_epochs}; pass a larger --epochs")
        if self.ctx.is_ddp:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # a no-op for nnU-Net's InstanceNorm nets
        model.plain_net = net
        if do_compile:
            net = cast(torch.nn.Module, torch.compile(net))  # an OptimizedModule; torch types the result as a callable
        if self.ctx.is_ddp:
            # without deep supervision the decoder's other segmentation heads get no gradient
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not cfg.deep_supervision)
        model.net = net
        return model

    def _build_loaders(self, data: _FoldData, next_train: int, next_val: int) -> _Loaders:
        """This rank's training and validation loaders (its share of the global batch and of the oversampled
        samples), continuing at the batch indices of a resumed checkpoint."""
        from ..data.batch import BatchSpec
        from ..data.loader import PatchLoader

        cfg = self.cfg
        assert cfg.batch_size is not None  # TrainConfig.from_plan (in _restore) filled it in
        bs, oversample = split_batch(cfg.batch_size, self.ctx.world_size, self.ctx.rank,
                                     cfg.oversample_foreground_percent)
        seed_tr, seed_val = _stream_seeds(cfg.seed, self.fold, self.ctx.rank)
        opts = self.options
        nw = _default_workers(self.device, self.ctx.world_size) if opts.num_workers is None \
            else max(0, int(opts.num_workers))
        nwv = (0 if nw == 0 else max(1, nw // 2)) if opts.num_workers_val is None \
            else max(0, int(opts.num_workers_val))
        key = self.labels.annotated_classes_key
        spec = BatchSpec.from_plan(self.plans, self.config_name, num_channels=data.source.num_channels,
                                   patch_size=cfg.patch_size, batch_size=bs, deep_supervision=cfg.deep_supervision,
                                   oversample_foreground_percent=oversample, annotated_classes_key=key,
                                   cascade_labels=self.cascade_labels,
                                   labels=self.labels if self.labels.has_regions else None)
        pin = self.device.type == "cuda"

        def make_loader(ids: list[str], num_workers: int, base_seed: int, train: bool, start_batch: int):
            # the one PatchLoader call of training
            loader = PatchLoader(data.source.subset(ids), spec.with_train(train), num_workers=num_workers,
                                 base_seed=base_seed, start_batch=start_batch, pin_memory=pin)
            self.loaders.append(loader)
            return loader

        train_loader = make_loader(data.train_ids, nw, seed_tr, True, next_train)
        val_loader = None
        if cfg.num_val_iterations_per_epoch > 0 and data.val_ids:
            val_loader = make_loader(data.val_ids, nwv, seed_val, False, next_val)
        elif cfg.num_val_iterations_per_epoch > 0:
            log.warning("fold %s has no validation cases: no pseudo-Dice, no best checkpoint", self.fold)
        # the workers' start-up (seconds; a minute under load) before the first epoch, as nnU-Net's on_train_start
        ready_s = sum(ld.wait_ready() for ld in (train_loader, val_loader) if ld is not None)
        return _Loaders(train=train_loader, val=val_loader, num_workers=nw, num_workers_val=nwv, batch_size=bs,
                        mirror_axes=tuple(int(a) for a in train_loader.spec.augment.mirror_axes), ready_s=ready_s)

    def _log_start(self, restored: _Restored, data: _FoldData, model: _Model, loaders: _Loaders) -> None:
        cfg, ckpt_path = self.cfg, restored.checkpoint_path
        tr_ids, val_ids = data.train_ids, data.val_ids
        self.logfile.write(
            "",
            f"nnfast {__version__} training {self.dataset} {self.config_name} fold {self.fold} on {self.device}"
            + (f" ({self.ctx.world_size} processes)" if self.ctx.is_ddp else ""),
            f"{'resuming from ' + ckpt_path.name + ' at epoch ' + str(model.current_epoch) if ckpt_path is not None else 'new run'}",
            f"{len(tr_ids)} training / {len(val_ids)} validation cases; batch {cfg.batch_size}"
            + (f" ({loaders.batch_size} per rank)" if self.ctx.is_ddp else "") + f", patch {cfg.patch_size}, "
            f"{cfg.num_epochs} epochs x {cfg.num_iterations_per_epoch} + {cfg.num_val_iterations_per_epoch} batches",
            f"amp {model.amp_dtype or 'off'}, compile {model.compiled}, loader workers {loaders.num_workers} + "
            f"{loaders.num_workers_val} (ready in {loaders.ready_s:.1f} s), seed {cfg.seed}",
            f"{model.num_input_channels} input channels"
            + (f" ({len(self.cascade_labels)} of them the `{self.conf.previous_stage}` "
               f"segmentation from `{self.prev_stage_dir}`)" if self.cascade_labels else ""),
            "train config: " + json.dumps(cfg.to_json()),
        )
        log.info("training %s %s fold %s on %s: %d train / %d val cases, %d epochs (starting at %d), amp %s, "
                 "compile %s, %d loader workers", self.dataset, self.config_name, self.fold, self.device,
                 len(tr_ids), len(val_ids), cfg.num_epochs, model.current_epoch, model.amp_dtype, model.compiled,
                 loaders.num_workers)

    # -- one epoch ----------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> EpochRecord:
        from .step import train_step

        cfg = self.cfg
        t_start = time.time()
        self.net.train()
        self.scheduler.step(epoch)
        lr = float(self.optimizer.param_groups[0]["lr"])
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(cfg.num_iterations_per_epoch):
            tw = time.perf_counter()
            batch = next(self.train_loader)
            wait += time.perf_counter() - tw
            loss_sum += train_step(self.net, batch, self.loss_fn, self.optimizer, self.scaler, self.amp_dtype,
                                   cfg.grad_clip)
        loss_sum = all_reduce_sum(loss_sum, self.ctx)
        train_loss = float(loss_sum) / (cfg.num_iterations_per_epoch * self.ctx.world_size)
        if not math.isfinite(train_loss):
            log.warning("epoch %d: the training loss is %s", epoch, train_loss)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        val_loss, dice = self._validate()
        val_s = time.perf_counter() - t1
        mean, ema = self.history.append(train_loss=train_loss, val_loss=val_loss, dice_per_class=dice, lr=lr,
                                        start=t_start, end=time.time(), train_wait_s=wait, train_s=train_s,
                                        val_s=val_s)
        new_best = self.history.last_ema is not None and (self.best_ema is None or ema > self.best_ema)
        if new_best:
            self.best_ema = float(ema)
        return EpochRecord(epoch=epoch, num_epochs=cfg.num_epochs, train_loss=train_loss, val_loss=val_loss,
                           dice_per_class=tuple(float(v) for v in dice), mean_fg_dice=mean, ema_fg_dice=ema, lr=lr,
                           epoch_time=self.history.epoch_times()[-1], train_wait_s=wait, new_best=new_best)

    def _validate(self) -> tuple[float, list[float]]:
        """Validation loss and global pseudo-Dice per foreground class over this epoch's validation batches."""
        from .step import pseudo_dice, validation_step

        regions = self.labels.has_regions
        n_fg = self.num_classes if regions else self.num_classes - 1  # every region head is foreground
        if self.val_loader is None:
            return float("nan"), [float("nan")] * n_fg
        self.net.eval()
        counts = torch.zeros((3, n_fg), dtype=torch.int64, device=self.device)
        loss_sum = torch.zeros((2,), dtype=torch.float64, device=self.device)  # (sum of losses, batches)
        for _ in range(self.cfg.num_val_iterations_per_epoch):
            r = validation_step(self.net, next(self.val_loader), self.loss_fn, self.amp_dtype, self.ignore_label,
                                regions)
            counts[0] += r.tp
            counts[1] += r.fp
            counts[2] += r.fn
            loss_sum[0] += r.loss.double()
            loss_sum[1] += 1
        self._next_val = self.val_loader.next_batch_index
        counts = all_reduce_sum(counts, self.ctx).cpu()
        loss_sum = all_reduce_sum(loss_sum, self.ctx).cpu()
        dice = pseudo_dice(counts[0], counts[1], counts[2])
        return float(loss_sum[0] / loss_sum[1]), [float(v) for v in dice]

    # -- bookkeeping after an epoch -----------------------------------------------------------------
    def _after_epoch(self, rec: EpochRecord, is_last_of_call: bool) -> Path | None:
        written = None
        if self.ctx.is_main:
            self.logfile.epoch(rec)
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f, pseudo dice %s (EMA %.4f), lr %.3g, %.1f s",
                     rec.epoch, rec.num_epochs, rec.train_loss, rec.val_loss,
                     [round(v, 4) for v in rec.dice_per_class], rec.ema_fg_dice, rec.lr, rec.epoch_time)
            write_progress_files(self.out, self.history)
            try:
                plot_progress(self.history, self.out / "progress.png")
            except Exception as e:  # a plotting problem must not end a training
                log.warning("could not draw progress.png: %s", e)
            final_epoch = self.current_epoch == self.cfg.num_epochs
            periodic = self.current_epoch % self.cfg.save_every == 0
            if (periodic or is_last_of_call) and not final_epoch:
                written = self._save("checkpoint_latest")
            if rec.new_best:
                self._save("checkpoint_best")
            if self.progress is not None:
                self.progress(rec)
        return written

    def _payload(self) -> dict[str, Any]:
        assert self.cfg.patch_size is not None  # TrainConfig.from_plan (in _restore) filled it in
        return {
            "network_weights": self.plain_net.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
            "lr_scheduler_state": self.scheduler.state_dict(),
            "current_epoch": int(self.current_epoch),
            "best_ema": self.best_ema,
            "history": self.history.to_dict(),
            "rng": capture_rng_state(),
            "loader": {"next_train_batch": int(self.train_loader.next_batch_index),
                       "next_val_batch": int(self._next_val)},
            "train_config": self.cfg.to_json(),
            "dataset": self.dataset,
            "configuration": self.config_name,
            "fold": self.fold,
            "trainer_name": TRAINER_NAME,
            "plans_name": self.plans_identifier,
            "inference_allowed_mirroring_axes": list(self.mirror_axes),
            "num_input_channels": int(self.num_input_channels),
            "num_classes": int(self.num_classes),
            "patch_size": list(self.cfg.patch_size),
            "nnfast_version": __version__,
            "torch_version": str(torch.__version__),
        }

    def _save(self, name: str) -> Path:
        path = checkpoint_file(self.out, name)
        save_checkpoint(path, self._payload())
        log.debug("wrote %s (epoch %d)", path, self.current_epoch)
        return path

    def _finish(self) -> Path | None:
        path = None
        if self.ctx.is_main:
            path = self._save("checkpoint_final")
            for suffix in (".pt", ".json"):
                checkpoint_file(self.out, "checkpoint_latest").with_suffix(suffix).unlink(missing_ok=True)
            self.logfile.write(f"training done: {self.current_epoch} epochs, best EMA pseudo Dice "
                               f"{self.best_ema if self.best_ema is not None else float('nan'):.4f}")
        self.ctx.barrier()
        return path

    def _final_validation(self, result: TrainResult) -> None:
        from ..errors import NnfastError

        if not self.val_ids:
            result.validation_skipped = "the fold has no validation cases"
            return
        self.logfile.write(f"final validation of {len(self.val_ids)} case(s)")
        assert self.final_validation is not None  # execute() calls this only when a final validation was given
        try:
            result.validation = self.final_validation(
                self.out, settings=self.settings, device=self.device, checkpoint_name="checkpoint_final",
                save_probabilities=self.save_probabilities, workers=max(1, min(8, self.num_workers)))
        except NnfastError as e:  # the training itself is complete: report, do not fail
            log.error("final validation failed: %s", e)
            self.logfile.write(f"final validation failed: {e}")
            result.validation_skipped = f"failed: {e}"
        else:
            fg = (getattr(result.validation, "foreground_mean", None) or {}).get("Dice")
            result.validation_dice = None if fg is None else float(fg)
            self.logfile.write(f"final validation done: foreground mean Dice {fg} "
                               f"({validation_folder(self.out) / SUMMARY_FILE})")
