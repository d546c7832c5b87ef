"""The hook between training and inference: nnU-Net's ``perform_actual_validation`` after the last epoch.

:func:`run_final_validation` calls ``nnfast.infer.predict.validate_fold`` (implemented in
:mod:`nnfast.infer.validation`), which predicts the fold's validation cases with the fold's checkpoint and scores
them, in nnU-Net's layout::

    fold_<k>/validation/<case><ending>     segmentations (what ``nnfast find-best`` gathers across folds)
    fold_<k>/validation/<case>.npz/.json   softmax probabilities, with ``save_probabilities`` (nnU-Net's --npz)
    fold_<k>/validation/summary.json       nnU-Net's metrics (per case, mean per label, foreground mean)

Without nnfast's inference it raises :class:`InferenceUnavailableError`, which :func:`nnfast.train.trainer.train`
turns into a warning: training never fails for want of inference.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from ..errors import NnfastError
from ..settings import Settings

__all__ = ["InferenceUnavailableError", "run_final_validation"]


class InferenceUnavailableError(NnfastError, NotImplementedError):
    """The final validation needs nnfast's inference (``nnfast.infer.predict.validate_fold``), which is not
    available in this installation."""


def run_final_validation(fold_dir: Path | str, *, settings: Settings, device: Any = "auto",
                         checkpoint_name: str = "checkpoint_final", save_probabilities: bool = False,
                         workers: int = 1) -> Any:
    """Predict the fold's validation cases with a checkpoint and score them (see the module docstring).

    Parameters
    ----------
    fold_dir : path
        The fold folder (:func:`nnfast.train.layout.fold_folder`).
    settings : Settings
        Data roots: the raw images of the validation cases, the preprocessed folder (split, ground truth).
    device : str or torch.device
    checkpoint_name : str
        ``checkpoint_final`` (nnU-Net's default) or ``checkpoint_best``.
    save_probabilities : bool
        Also write softmax probabilities (needed to ensemble configurations later).
    workers : int
        Export / evaluation processes.

    Returns
    -------
    object
        What ``validate_fold`` returns (a :class:`nnfast.evaluate.metrics.Summary`).

    Raises
    ------
    InferenceUnavailableError
        ``nnfast.infer.predict`` or its ``validate_fold`` does not exist.
    """
    try:
        predict = importlib.import_module("nnfast.infer.predict")
    except ModuleNotFoundError as e:
        if e.name not in ("nnfast.infer", "nnfast.infer.predict"):
            raise  # a dependency of the inference stage is missing: a real error, not an absent stage
        raise InferenceUnavailableError(
            "the final validation needs nnfast's inference (nnfast.infer.predict), which this installation does "
            f"not have; the trained checkpoints in `{fold_dir}` are complete, predict the validation cases later"
        ) from e
    fn = getattr(predict, "validate_fold", None)
    if fn is None:
        raise InferenceUnavailableError("nnfast.infer.predict has no validate_fold(fold_dir, ...); the final "
                                        "validation cannot run with this version of nnfast.infer")
    kwargs: dict[str, Any] = dict(settings=settings, device=device, checkpoint_name=checkpoint_name)
    params = inspect.signature(fn).parameters
    for name, value in (("save_probabilities", save_probabilities), ("workers", workers)):
        if name in params:
            kwargs[name] = value
    return fn(Path(fold_dir), **kwargs)
