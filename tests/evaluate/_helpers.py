"""Helpers for the evaluation tests (imported as ``evaluate._helpers``): label maps written as real NIfTI files, and
nnU-Net's evaluation functions run in this process (its spawn pools would start a fresh interpreter importing torch
for every call)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from factories import write_image

SPACING = (2.0, 0.8, 0.8)


class _InlinePool:
    """Drop-in for ``multiprocessing.Pool`` that runs ``starmap`` here, in order."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]

    def map(self, fn, iterable):
        return [fn(a) for a in iterable]


class _InlineMultiprocessing:
    class _Context:
        Pool = _InlinePool

    @staticmethod
    def get_context(_method=None):
        return _InlineMultiprocessing._Context


def make_nnunet_inline(monkeypatch):
    """Make nnU-Net's evaluation, postprocessing and ensembling modules use an in-process pool."""
    import nnunetv2.ensembling.ensemble as ens
    import nnunetv2.evaluation.evaluate_predictions as ev
    import nnunetv2.postprocessing.remove_connected_components as pp

    for mod in (ev, pp, ens):
        monkeypatch.setattr(mod, "multiprocessing", _InlineMultiprocessing)
    return True


def write_seg(arr: np.ndarray, path: Path, spacing=SPACING) -> Path:
    """Write a label map (z, y, x) as uint8 NIfTI."""
    return write_image(np.asarray(arr, np.uint8), Path(path), spacing)


def ellipsoid(shape, center, radii) -> np.ndarray:
    """Boolean ellipsoid in voxel coordinates."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) < 1


def nan_equal(a, b, path="") -> None:
    """Assert two JSON-like structures are equal, NaN equal to NaN, floats exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            nan_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            nan_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        if np.isnan(a):
            assert np.isnan(b), f"{path}: {a} != {b}"
        else:
            assert a == b, f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
