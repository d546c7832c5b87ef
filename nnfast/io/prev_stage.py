"""Previous-stage segmentations of nnU-Net's cascade (``predicted_next_stage``), one zarr v3 store per case.

The cascade's second stage (``3d_cascade_fullres``) trains on the image plus the first stage's (``3d_lowres``)
segmentation of every training case, on the full-resolution preprocessed grid. As in nnU-Net, the first stage's
final validation writes them: each fold predicts its validation cases, so the five folds together cover every case
with a prediction from a network that did not train on it. Layout (nnU-Net's, with zarr instead of blosc2)::

    <results>/<Dataset>/nnfastTrainer__nnfast_plans__3d_lowres/predicted_next_stage/3d_cascade_fullres/
                    (nnfast.layout.previous_stage_folder; this module only reads and writes the stores)
        <case_id>.zarr/
            zarr.json       group; attributes["nnfast"]: schema_version, kind, case_id, shape, source; written LAST
            seg/            int8 (int16 when labels need it) (1, x, y, z), fill value 0, one shard of small chunks

Axis order is nnU-Net's after transposition (the low-resolution axis first), the grid that of the case's
full-resolution store (``<preprocessed>/<Dataset>/<data_identifier>/<case_id>.zarr``), so a training box reads the
same voxels from both. Stores are written under a hidden temporary name and renamed when complete, like the case
stores (:mod:`nnfast.io.store`); ``source`` records which configuration and fold predicted the case.
:class:`PreviousStageReader` reads boxes with the lean shard reader of :mod:`nnfast.io.store_reader`, padding
with -1 outside the case like the labels (nnU-Net's ``crop_and_pad_nd(seg_prev, bbox, -1)``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import StoreError
from .atomic import temporary_sibling
from .store import DEFAULT_CHUNK_NBYTES, STORE_SUFFIX, blosc_codec, chunk_layout, install_store, jsonable, \
    read_group_attrs, remove_tree, seg_dtype, write_sharded
from .store_reader import CaseReader, open_array, parse_bbox

__all__ = ["PREVIOUS_STAGE_KIND", "PREVIOUS_STAGE_SCHEMA_VERSION", "write_previous_stage",
           "read_previous_stage_metadata", "previous_stage_complete", "missing_previous_stage",
           "PreviousStageReader"]

logger = logging.getLogger(__name__)

PREVIOUS_STAGE_KIND = "previous_stage_segmentation"
PREVIOUS_STAGE_SCHEMA_VERSION = 1
_AGAIN = "predict the previous stage again (its final validation: nnfast train --validate-only)"


def write_previous_stage(path: str | os.PathLike, seg: np.ndarray, *, patch_size: Sequence[int],
                         source: Mapping[str, Any] | None = None, case_id: str | None = None) -> None:
    """Write one case's previous-stage segmentation atomically (see the module docstring).

    Parameters
    ----------
    path : path-like
        ``<folder>/<case_id>.zarr``; an existing store there is replaced only once the new one is complete.
    seg : ndarray, integer, shape (x, y, z) or (1, x, y, z)
        Labels on the full-resolution preprocessed grid, nnU-Net axis order (values >= 0).
    patch_size : sequence of 3 int
        The second stage's patch size; decides the chunking.
    source : mapping, optional
        JSON-able description of what predicted it (configuration, fold, checkpoint).
    case_id : str, optional
        Defaults to the name of ``path`` without ``.zarr``.

    Raises
    ------
    StoreError
        Bad shape or dtype, negative labels, or the rename failed.
    """
    import zarr

    path = Path(path)
    if case_id is None:
        case_id = path.name[: -len(STORE_SUFFIX)] if path.name.endswith(STORE_SUFFIX) else path.name
    seg = np.asarray(seg)
    if seg.ndim == 3:
        seg = seg[None]
    if seg.ndim != 4 or seg.shape[0] != 1 or min(seg.shape) <= 0:
        raise StoreError(f"{path}: a previous-stage segmentation must be (x, y, z) or (1, x, y, z), got {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer) and seg.dtype != np.bool_:
        raise StoreError(f"{path}: a previous-stage segmentation must hold integer labels, got {seg.dtype}")
    if seg.size and int(seg.min()) < 0:
        raise StoreError(f"{path}: a previous-stage segmentation holds negative labels ({int(seg.min())})")
    if seg.dtype == np.bool_:
        seg = seg.astype(np.int8)
    seg = np.ascontiguousarray(seg.astype(seg_dtype(seg), copy=False))
    layout = chunk_layout(seg.shape, patch_size, seg.itemsize, max_chunk_nbytes=DEFAULT_CHUNK_NBYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        write_sharded(root, "seg", seg, layout, 0, blosc_codec("lz4hc", 5, "noshuffle"))
        root.attrs["nnfast"] = {  # written last: the attribute that says "complete"
            "schema_version": PREVIOUS_STAGE_SCHEMA_VERSION,
            "kind": PREVIOUS_STAGE_KIND,
            "case_id": case_id,
            "shape": [int(s) for s in seg.shape[1:]],
            "dtype": seg.dtype.name,
            "source": jsonable(dict(source or {}), "[source]"),
            "complete": True,
        }
        install_store(tmp, path)
    except BaseException:
        remove_tree(tmp)
        raise
    logger.debug("wrote previous-stage segmentation %s %s", path, seg.shape[1:])


def read_previous_stage_metadata(path: str | os.PathLike) -> dict:
    """The ``nnfast`` attributes of a complete previous-stage store.

    Raises
    ------
    StoreError
        No store at ``path``, not a previous-stage store, incomplete, or another schema.
    """
    path = Path(path)
    attrs = read_group_attrs(path, "previous-stage segmentation", _AGAIN, _AGAIN,
                             schema_version=PREVIOUS_STAGE_SCHEMA_VERSION, redo=_AGAIN)
    if attrs.get("kind") != PREVIOUS_STAGE_KIND:
        raise StoreError(f"`{path}` is not an nnfast previous-stage segmentation")
    return attrs


def _problem(path: Path, shape: Sequence[int] | None) -> str | None:
    """Why ``path`` is not a usable previous-stage store (of spatial ``shape`` when given), or None."""
    try:
        attrs = read_previous_stage_metadata(path)
    except StoreError as e:
        return str(e)
    have = [int(s) for s in attrs.get("shape", ())]
    if shape is not None and have != [int(s) for s in shape]:
        return (f"`{path}` has shape {tuple(have)} but the preprocessed case has {tuple(int(s) for s in shape)} "
                "(preprocessed again since?); predict the previous stage again")
    if not (path / "seg" / "zarr.json").is_file():
        return f"`{path}` has no seg array; predict the previous stage again"
    return None


def previous_stage_complete(path: str | os.PathLike, shape: Sequence[int] | None = None) -> bool:
    """True iff ``path`` holds a complete previous-stage store (of spatial ``shape`` when given); never raises."""
    return _problem(Path(path), shape) is None


def missing_previous_stage(folder: str | os.PathLike, shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """Cases of ``shapes`` (case id -> spatial shape) without a usable store in ``folder``: id -> reason."""
    problems = {cid: _problem(Path(folder) / f"{cid}{STORE_SUFFIX}", shape) for cid, shape in shapes.items()}
    return {cid: why for cid, why in problems.items() if why is not None}


class PreviousStageReader:
    """Reads boxes of one previous-stage store (lazily opened; pickles as its path).

    Parameters
    ----------
    path : path-like
        ``<folder>/<case_id>.zarr`` written by :func:`write_previous_stage`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._seg = None

    def open(self) -> "PreviousStageReader":
        if self._seg is None:
            read_previous_stage_metadata(self.path)
            seg = open_array(self.path / "seg", False)
            if len(seg.shape) != 4 or seg.shape[0] != 1:
                seg.close()
                raise StoreError(f"`{self.path}`: seg must be (1, x, y, z), got {seg.shape}")
            self._seg = seg
        return self

    def close(self) -> None:
        if self._seg is not None:
            self._seg.close()
            self._seg = None

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"PreviousStageReader({str(self.path)!r})"

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(x, y, z)``."""
        self.open()
        return tuple(int(s) for s in self._seg.shape[1:])

    def read(self, bbox: Sequence[Sequence[int]], out: np.ndarray | None = None) -> np.ndarray:
        """Labels of the half-open box ``bbox`` (``[[lb, ub], ...]`` per spatial axis), -1 outside the case.

        Returns
        -------
        ndarray (1, *box), the stored dtype or ``out``'s (e.g. int16)

        Raises
        ------
        StoreError
            Bad box or buffer.
        """
        self.open()
        shape = self._seg.shape[1:]
        lbs, ubs, box = parse_bbox(bbox, len(shape), self.path)
        if out is None:
            out = np.empty((1, *box), self._seg.dtype)
        elif not isinstance(out, np.ndarray) or out.shape != (1, *box):
            raise StoreError(f"{self.path}: out must be an ndarray of shape {(1, *box)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        CaseReader._fill(self._seg, out, lbs, ubs, shape, -1, None)
        return out
