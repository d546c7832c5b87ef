"""Drop-in use of nnfast's :class:`~nnfast.data.loader.PatchLoader` inside nnU-Net v2's ``nnUNetTrainer``.

nnU-Net's trainer gets its data from ``get_dataloaders()`` (two ``NonDetMultiThreadedAugmenter`` over
``nnUNetDataLoader`` + batchgeneratorsv2 transforms). This module replaces exactly that
method; the network, loss, optimizer, logging, checkpoints and final validation stay nnU-Net's. The loaders are
built from the trainer's own state: plans/configuration, fold split (``do_split``, so ``splits_final.json``),
per-rank batch size and oversampling, ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` (rotation,
dummy-2D, initial patch size, mirror axes; also as overridden by trainer variants such as
``nnUNetTrainerNoMirroring``), deep-supervision scales and ``use_mask_for_norm``. Cases are read from the
trainer's ``preprocessed_dataset_folder`` through :class:`~nnfast.data.dataset.NnunetCaseSource`, or from a
folder of nnfast case stores (``folder=``; the trainer still needs its own folder for ``initialize`` and the
final validation).

Three ways to use it
--------------------
1. Patch an existing trainer instance (the one-line change)::

       from nnfast.data.nnunet_adapter import use_nnfast_loader
       trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cuda"))
       use_nnfast_loader(trainer)          # num_workers defaults to nnU-Net's get_allowed_n_proc_DA()
       trainer.run_training()

2. Instantiate the subclass :class:`nnUNetTrainerNnfastLoader` directly from Python (same arguments as
   ``nnUNetTrainer``).

3. Select it on nnU-Net's command line: ``nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerNnfastLoader``.
   nnU-Net looks trainers up by class name among the modules of ``nnunetv2/training/nnUNetTrainer/`` and, since
   2.6, of the folders listed in the ``nnUNet_extTrainer`` environment variable. :func:`install_nnunet_trainer`
   writes a two-line module that imports the class into either place::

       python -c "from nnfast.data.nnunet_adapter import install_nnunet_trainer; install_nnunet_trainer()"
       # or, without writing into site-packages:
       python -c "from nnfast.data.nnunet_adapter import install_nnunet_trainer as i; i('/opt/nnfast_trainers')"
       export nnUNet_extTrainer=/opt/nnfast_trainers

Settings of the subclass come from environment variables read when the loaders are built:
``NNFAST_LOADER_WORKERS`` (default nnU-Net's ``nnUNet_n_proc_DA`` rule), ``NNFAST_LOADER_SEED`` (default random,
written to the training log), ``NNFAST_LOADER_FOLDER`` (nnfast stores to read instead of nnU-Net's folder).

What differs from nnU-Net's loader: the same sampling rules and transform distributions with nnfast's
implementation (see :mod:`nnfast.data.batch` and :mod:`nnfast.data.transforms`), deterministic batch streams,
and only the default ``nnUNetTrainer`` augmentation: a trainer variant that overrides
``get_training_transforms`` (DA5, NoDA, ...) gets a warning and nnU-Net's default transforms. The cascade
(``3d_cascade_fullres``) reads the previous stage's segmentations from the trainer's
``folder_with_segs_from_previous_stage`` (nnU-Net's ``predicted_next_stage`` ``.b2nd`` files; with nnfast stores,
from ``previous_stage_folder=`` / ``NNFAST_LOADER_PREVIOUS_STAGE``: nnfast's own ``predicted_next_stage`` folder).
Region-based training (the trainer's ``label_manager.has_regions``): targets are region channels (the ignore mask
last), built from the label map at every deep-supervision scale, which nnU-Net's ``DC_and_BCE_loss`` and its
region ``validation_step`` take as they are (int16 0/1 instead of bool: both cast).

Importing this module does not need nnunetv2; only :class:`nnUNetTrainerNnfastLoader` does (ImportError with
the install hint otherwise).
"""
from __future__ import annotations

import logging
import os
import types
from pathlib import Path
from typing import Any

from ..errors import DatasetError, SettingsError
from .augment_params import AugmentConfig
from .batch import BatchSpec
from .dataset import NnunetCaseSource, ZarrCaseSource
from .loader import PatchLoader

__all__ = ["build_nnunet_loaders", "use_nnfast_loader", "install_nnunet_trainer", "nnUNetTrainerNnfastLoader",
           "TRAINER_MODULE_NAME"]

logger = logging.getLogger(__name__)

#: File name of the module :func:`install_nnunet_trainer` writes.
TRAINER_MODULE_NAME = "nnfast_loader_trainer.py"
_VAL_SEED_OFFSET = 0x5EED_0F_7A1  # the validation stream: another seed than training's
_RANK_SEED_STRIDE = 1_000_003


def _nnunet_missing(exc: BaseException) -> ImportError:
    return ImportError("nnfast's nnU-Net trainer adapter needs nnU-Net v2: pip install nnunetv2 (or pip install "
                       f"'nnfast[compat]') [{exc}]")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise SettingsError(f"{name}={v!r} is not an integer; set it to a whole number or unset it") from None


def _augment_config(trainer) -> AugmentConfig:
    rotation, dummy_2d, initial, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    cm = trainer.configuration_manager
    ds = trainer._get_deep_supervision_scales()
    rot = tuple(float(r) for r in rotation) if isinstance(rotation, (tuple, list)) else (-float(rotation),
                                                                                         float(rotation))
    return AugmentConfig(
        patch_size=tuple(int(p) for p in cm.patch_size),
        rotation=rot,
        do_dummy_2d=bool(dummy_2d),
        mirror_axes=tuple(int(a) for a in (mirror_axes or ())),
        initial_patch_size=tuple(int(p) for p in initial),
        use_mask_for_norm=tuple(bool(b) for b in cm.use_mask_for_norm),
        ds_scales=None if ds is None else tuple(tuple(float(v) for v in s) for s in ds),
    )


def build_nnunet_loaders(trainer, *, num_workers: int | None = None, num_workers_val: int | None = None,
                         base_seed: int | None = None, folder: str | os.PathLike | None = None,
                         num_cached: int | None = None,
                         previous_stage_folder: str | os.PathLike | None = None) -> tuple[PatchLoader, PatchLoader]:
    """nnfast loaders (train, val) equivalent to what ``trainer.get_dataloaders()`` would return.

    Like nnU-Net's, they return with their workers started and a first batch built
    (:meth:`~nnfast.data.loader.PatchLoader.wait_ready`), so the start-up falls in ``on_train_start``.

    Parameters
    ----------
    trainer : nnunetv2 ``nnUNetTrainer`` (initialized, as in ``on_train_start``)
    num_workers : worker processes of the training loader; default ``NNFAST_LOADER_WORKERS`` or nnU-Net's
        ``get_allowed_n_proc_DA()``; 0 builds batches in the main process.
    num_workers_val : validation workers; default ``max(1, num_workers // 2)`` (0 when ``num_workers`` is 0).
    base_seed : seed of the batch streams; default ``NNFAST_LOADER_SEED`` or random. It is written to the
        training log; DDP ranks derive their own.
    folder : read nnfast case stores (or another nnU-Net folder) from here instead of
        ``trainer.preprocessed_dataset_folder``; default ``NNFAST_LOADER_FOLDER``.
    num_cached : shared-memory batch slots per loader (see :class:`PatchLoader`).
    previous_stage_folder : the cascade: where the previous stage's segmentations are; default
        ``NNFAST_LOADER_PREVIOUS_STAGE``, else the trainer's ``folder_with_segs_from_previous_stage``.

    Raises
    ------
    DatasetError
        The cascade and some case has no previous-stage segmentation (named, before any worker starts).
    """
    lm = trainer.label_manager
    regions = None
    if lm.has_regions:
        from ..labels import LabelManager

        regions = LabelManager.from_dataset_json(trainer.dataset_json)
    try:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    except ImportError as e:  # pragma: no cover
        raise _nnunet_missing(e) from e
    if type(trainer).get_training_transforms is not nnUNetTrainer.get_training_transforms:
        logger.warning("%s overrides get_training_transforms; nnfast's loader applies nnU-Net's default "
                       "augmentation instead", type(trainer).__name__)
    if num_workers is None:
        num_workers = _env_int("NNFAST_LOADER_WORKERS")
    if num_workers is None:
        num_workers = get_allowed_n_proc_DA()
    num_workers = max(0, int(num_workers))
    if num_workers_val is None:
        num_workers_val = 0 if num_workers == 0 else max(1, num_workers // 2)
    if base_seed is None:
        base_seed = _env_int("NNFAST_LOADER_SEED")
    if base_seed is None:
        import numpy as np

        base_seed = int(np.random.SeedSequence().entropy % (2**62))
    seed = int(base_seed) + _RANK_SEED_STRIDE * int(getattr(trainer, "local_rank", 0))
    folder = folder if folder is not None else (os.environ.get("NNFAST_LOADER_FOLDER") or None)

    prev = cascade_labels = None
    if trainer.is_cascaded:
        prev = previous_stage_folder or os.environ.get("NNFAST_LOADER_PREVIOUS_STAGE") or \
            trainer.folder_with_segs_from_previous_stage
        cascade_labels = tuple(int(v) for v in lm.foreground_labels)

    tr_keys, val_keys = trainer.do_split()
    keys = list(tr_keys) + list(val_keys)
    if folder is None:
        base = NnunetCaseSource(trainer.preprocessed_dataset_folder, keys, previous_stage_folder=prev)
    elif _has_stores(folder):
        base = ZarrCaseSource(folder, keys, previous_stage_folder=prev)
    else:
        base = NnunetCaseSource(folder, keys, previous_stage_folder=prev)
    missing = base.missing_previous_stage()
    if missing:
        first = sorted(missing)[0]
        raise DatasetError(f"the cascade trains on the previous stage's segmentation of every case, but {len(missing)} "
                           f"of {len(keys)} are missing in `{prev}` (e.g. {first}: {missing[first]}); run the "
                           "previous stage's final validation for all five folds first (nnUNetv2_train ... --val, "
                           "or nnfast train --validate-only with nnfast stores)")
    aug = _augment_config(trainer)
    key = tuple([-1] + list(lm.all_labels)) if lm.has_ignore_label else None
    pin = trainer.device.type == "cuda"
    batch_size = int(getattr(trainer, "batch_size", None) or trainer.configuration_manager.batch_size)
    spec = BatchSpec(augment=aug, batch_size=batch_size, num_channels=base.num_channels,
                     oversample_foreground_percent=float(trainer.oversample_foreground_percent),
                     probabilistic_oversampling=bool(trainer.probabilistic_oversampling),
                     annotated_classes_key=key, cascade_labels=tuple(cascade_labels) if cascade_labels else None,
                     labels=regions)
    common = dict(pin_memory=pin, num_batches=None, num_cached=num_cached)
    n_tr, n_val = int(trainer.num_iterations_per_epoch), int(trainer.num_val_iterations_per_epoch)
    epoch = int(getattr(trainer, "current_epoch", 0))
    train = PatchLoader(base.subset(tr_keys), spec, num_workers=num_workers, base_seed=seed,
                        start_batch=epoch * n_tr, **common)
    val = None
    try:
        val = PatchLoader(base.subset(val_keys), spec.with_train(False), num_workers=num_workers_val,
                          base_seed=seed + _VAL_SEED_OFFSET, start_batch=epoch * n_val, **common)
        # nnU-Net's get_dataloaders draws a first batch from each loader: its workers' start-up is paid here, in
        # on_train_start, not in the first epoch. Ours wait for their workers and first batch (none consumed).
        ready_s = train.wait_ready() + val.wait_ready()
    except BaseException:
        train.close()
        if val is not None:
            val.close()
        raise
    base.close()
    if hasattr(trainer, "print_to_log_file"):
        trainer.print_to_log_file(
            f"nnfast loader: seed {int(base_seed)}, {num_workers} train / {num_workers_val} val workers (ready in "
            f"{ready_s:.1f} s), patch {aug.patch_size} (initial {aug.initial_patch_size}), batch {batch_size}, "
            f"reading {type(base).__name__}({base.folder})" + (f", previous stage from {prev}" if prev else ""))
    return train, val


def _has_stores(folder) -> bool:
    from ..io.store import list_case_ids

    return bool(list_case_ids(folder))


def _close_loaders(trainer) -> None:
    for name in ("dataloader_train", "dataloader_val"):
        dl = getattr(trainer, name, None)
        if isinstance(dl, PatchLoader):
            dl.close()


def use_nnfast_loader(trainer, **kwargs: Any):
    """Make an existing nnU-Net trainer instance use nnfast's loader; returns the trainer.

    Replaces the instance's ``get_dataloaders`` with :func:`build_nnunet_loaders` (``kwargs`` are passed on) and
    wraps its ``on_train_end`` so that the loaders' workers and shared memory are released at the end of
    training. Call before ``run_training()`` / ``on_train_start()``.
    """
    trainer.get_dataloaders = types.MethodType(lambda self: build_nnunet_loaders(self, **kwargs), trainer)
    original_end = trainer.on_train_end

    def on_train_end(self):
        try:
            original_end()
        finally:
            _close_loaders(self)

    trainer.on_train_end = types.MethodType(on_train_end, trainer)
    return trainer


def install_nnunet_trainer(target: str | os.PathLike | None = None) -> Path:
    """Write a module that makes ``nnUNetTrainerNnfastLoader`` findable by ``nnUNetv2_train -tr``.

    Parameters
    ----------
    target : folder to write :data:`TRAINER_MODULE_NAME` into. Default: nnU-Net's own
        ``nnunetv2/training/nnUNetTrainer/`` (needs write access to the installed package; redo after
        reinstalling nnunetv2). Any other folder works when it is listed in ``nnUNet_extTrainer``.

    Returns
    -------
    Path of the written module.
    """
    if target is None:
        try:
            import nnunetv2
        except ImportError as e:
            raise _nnunet_missing(e) from e
        target = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    path = target / TRAINER_MODULE_NAME
    text = ('"""Written by nnfast.data.nnunet_adapter.install_nnunet_trainer: makes `nnUNetv2_train -tr '
            'nnUNetTrainerNnfastLoader` use nnfast\'s loader."""\n'
            "from nnfast.data.nnunet_adapter import nnUNetTrainerNnfastLoader  # noqa: F401\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


try:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as _nnUNetTrainer
except ImportError as _exc:  # nnunetv2 absent: the rest of the module works, the class raises on access
    _nnUNetTrainer = None
    _IMPORT_ERROR = _exc

if _nnUNetTrainer is not None:
    class nnUNetTrainerNnfastLoader(_nnUNetTrainer):
        """``nnUNetTrainer`` whose ``get_dataloaders`` returns nnfast :class:`PatchLoader` s (settings: see the
        module docstring of :mod:`nnfast.data.nnunet_adapter`)."""

        def get_dataloaders(self):
            return build_nnunet_loaders(self)

        def on_train_end(self):
            try:
                super().on_train_end()
            finally:
                _close_loaders(self)
else:
    def __getattr__(name: str):
        if name == "nnUNetTrainerNnfastLoader":
            raise _nnunet_missing(_IMPORT_ERROR)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
