"""nnfast's exceptions: one base class; each subclass also inherits the matching builtin so that callers
catching ``ValueError``/``FileNotFoundError``/``RuntimeError`` keep working."""
from __future__ import annotations

__all__ = [
    "NnfastError",
    "SettingsError",
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
    """A worker process died (often killed by the out-of-memory killer)."""


class UnsupportedResamplingError(NnfastError, NotImplementedError):
    """A resampling order / data kind combination that nnfast does not implement (nnU-Net never uses it)."""


# Worker pools and the loader (nnfast.workers, nnfast.parallel, nnfast.data.loader).
__all__ += ["WorkerStartError", "UsageError", "ClosedError"]


class WorkerStartError(NnfastError, RuntimeError):
    """A worker process failed while starting (importing the task's module, running its initializer, opening data)."""


class UsageError(NnfastError, TypeError):
    """An API was given the wrong kind of object (e.g. a function that cannot be sent to worker processes), or asked
    for something its state does not have (the length of an infinite loader)."""


class ClosedError(NnfastError, RuntimeError):
    """An object was used after ``close()`` (e.g. ``next()`` on a closed loader)."""
