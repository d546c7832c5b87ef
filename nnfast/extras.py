"""Optional dependencies: nnfast's extras and the one place that imports them on demand.

``dask[distributed]`` (``--scheduler``), ``matplotlib`` (``progress.png``) and ``psutil`` (worker memory in
dead-worker messages) are not needed by the pipeline itself; ``pip install "nnfast[all]"`` installs every one.
A code path that needs a missing one calls :func:`require`, which raises
:class:`~nnfast.errors.MissingDependencyError` naming the ``pip install`` command.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["EXTRAS", "require"]

#: module imported -> (extra that installs it, pip requirement)
EXTRAS: dict[str, tuple[str, str]] = {
    "distributed": ("dask", "dask[distributed]"),
    "dask": ("dask", "dask[distributed]"),
    "matplotlib": ("plot", "matplotlib"),
    "psutil": ("psutil", "psutil"),
}


def require(module: str, purpose: str) -> ModuleType:
    """Import the optional ``module`` (one of :data:`EXTRAS`), or say how to install it.

    Parameters
    ----------
    module : str
        Top-level module name, e.g. ``"distributed"``.
    purpose : str
        What needs it, for the message ("running tasks on a dask cluster (--scheduler)").

    Raises
    ------
    MissingDependencyError
        ``module`` cannot be imported; the message names the extra's ``pip install`` command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra, requirement = EXTRAS[module]
        raise MissingDependencyError(
            f"{purpose} needs {requirement}, which is not installed: pip install \"nnfast[{extra}]\" "
            f"(or \"nnfast[all]\" for every optional dependency)") from e
