"""nnfast's exceptions: one base class; each subclass also inherits the matching builtin so that callers
catching ``ValueError``/``FileNotFoundError``/``RuntimeError`` keep working."""
from __future__ import annotations

__all__ = [
    "NnfastError",
    "SettingsError",
    "UsageError",
    "ConfigError",
    "ShapeError",
    "InputTypeError",
    "MissingDependencyError",
    "NotSupportedError",
    "FileFormatError",
    "DatasetError",
    "DatasetNotFoundError",
    "CaseNotFoundError",
    "ImageReadError",
    "GeometryError",
    "LabelError",
    "PlanError",
    "WorkerDiedError",
    "StoreError",
    "UnsupportedResamplingError",
]


class NnfastError(Exception):
    """Base class of every error nnfast raises on purpose."""


class SettingsError(NnfastError, ValueError):
    """A data root or setting is missing or invalid; the message says which variable or flag to set."""


class UsageError(NnfastError, ValueError):
    """Arguments that do not fit together or lie out of range (a flag, a count, a fold); the message names them."""


class ConfigError(NnfastError, ValueError):
    """A training, augmentation or inference setting (a mode name, a weight, a schedule step) is invalid."""


class ShapeError(NnfastError, ValueError):
    """Arrays or sizes whose shape, dtype, axis count or layout does not fit what the function needs."""


class InputTypeError(NnfastError, TypeError):
    """An argument of the wrong type (not an array, not a network nnfast knows, state that is not JSON, a function that
    cannot be sent to worker processes), or a question the object cannot answer (the length of an infinite loader)."""


class MissingDependencyError(NnfastError, ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` command that adds it."""


class NotSupportedError(NnfastError, NotImplementedError):
    """A feature nnfast does not implement (yet); the message says what to use instead."""


class FileFormatError(NnfastError, ValueError):
    """A file nnfast reads is corrupt or not in its format (invalid JSON, a text file where a binary one belongs)."""


class DatasetError(NnfastError, ValueError):
    """A dataset (its ``dataset.json`` or its files) is malformed."""


class DatasetNotFoundError(NnfastError, FileNotFoundError):
    """No dataset matches the requested task/dataset id, or more than one does."""


class CaseNotFoundError(NnfastError, FileNotFoundError):
    """A file that a case needs is missing."""


class ImageReadError(NnfastError, ValueError):
    """An image file cannot be read (truncated, corrupt, unsupported dimensionality)."""


class GeometryError(NnfastError, ValueError):
    """Images of one case disagree in shape, spacing, origin or direction."""


class LabelError(NnfastError, ValueError):
    """A label map holds values that are not the declared, consecutive, non-negative integer labels."""


class PlanError(NnfastError, ValueError):
    """Plans are missing, stale or inconsistent with the request."""


class StoreError(NnfastError, ValueError):
    """A preprocessed case store is missing, incomplete or written for another plan."""


class WorkerDiedError(NnfastError, RuntimeError):
    """A worker process died (often killed by the out-of-memory killer).

    Attributes
    ----------
    exitcode : int or None
        The worker's exit code (negative: the signal that killed it); None when unknown (a dask worker). Set by
        :func:`nnfast.workers.died_error` and :mod:`nnfast.parallel`.
    case : str or None
        The case the worker was processing, when known. Set by :func:`nnfast.parallel.run_tasks` only.
    """

    # declared for the type checker; the code that raises the error sets them (no class default)
    exitcode: int | None
    case: str | None


class UnsupportedResamplingError(NnfastError, NotImplementedError):
    """A resampling order / data kind combination that nnfast does not implement (nnU-Net never uses it)."""


# Worker pools and the loader (nnfast.workers, nnfast.parallel, nnfast.data.loader).
__all__ += ["WorkerStartError", "ClosedError"]


class WorkerStartError(NnfastError, RuntimeError):
    """A worker process failed while starting (importing the task's module, running its initializer, opening data)."""


class ClosedError(NnfastError, RuntimeError):
    """An object was used after ``close()`` (e.g. ``next()`` on a closed loader)."""
