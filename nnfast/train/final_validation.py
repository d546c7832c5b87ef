"""The hook between training and inference: nnU-Net's ``perform_actual_validation`` after the last epoch.

nnfast's inference (``nnfast.infer``) is a separate stage. :func:`run_final_validation` calls
``nnfast.infer.predict.validate_fold`` when that exists and raises :class:`InferenceUnavailableError` otherwise;
:func:`nnfast.train.trainer.train` turns that error into a warning, so training never fails for want of inference.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import NnfastError
from ..settings import Settings

__all__ = ["InferenceUnavailableError", "run_final_validation"]


class InferenceUnavailableError(NnfastError, NotImplementedError):
    """The final validation needs nnfast's inference (``nnfast.infer.predict.validate_fold``), which is not
    available in this installation."""


def run_final_validation(fold_dir: Path | str, *, settings: Settings, device: Any = "auto",
                         checkpoint_name: str = "checkpoint_final") -> Any:
    """Predict the fold's validation cases with a checkpoint and score them, through nnfast's inference.

    Calls ``nnfast.infer.predict.validate_fold(fold_dir, settings=settings, device=device,
    checkpoint_name=checkpoint_name)`` and returns what it returns (expected: nnU-Net's ``validation/`` folder with
    the predictions and ``summary.json`` inside ``fold_dir``). The network's deep supervision is irrelevant here: the
    hook reads the checkpoint from disk.

    Parameters
    ----------
    fold_dir : path
        The fold folder (:func:`nnfast.train.layout.fold_folder`).
    settings : Settings
        Data roots (the validation cases' preprocessed data and ground truth).
    device : str or torch.device
    checkpoint_name : str
        ``checkpoint_final`` (nnU-Net's default) or ``checkpoint_best``.

    Raises
    ------
    InferenceUnavailableError
        ``nnfast.infer.predict`` or its ``validate_fold`` does not exist.
    """
    try:
        infer_predict = importlib.import_module("nnfast.infer.predict")
    except ModuleNotFoundError as e:
        if e.name not in ("nnfast.infer", "nnfast.infer.predict"):
            raise  # a dependency of the inference stage is missing: that is a real error
        raise InferenceUnavailableError(
            "the final validation needs nnfast's inference (nnfast.infer.predict), which this installation does "
            f"not have; the trained checkpoints in `{fold_dir}` are complete, predict the validation cases later"
        ) from e
    fn = getattr(infer_predict, "validate_fold", None)
    if fn is None:
        raise InferenceUnavailableError("nnfast.infer.predict has no validate_fold(fold_dir, ...); the final "
                                        "validation cannot run with this version of nnfast.infer")
    return fn(Path(fold_dir), settings=settings, device=device, checkpoint_name=checkpoint_name)
