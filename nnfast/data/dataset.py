"""Where training patches come from: nnfast case stores or nnU-Net v2's preprocessed folder.

A *case source* answers the three questions the batch builder asks about a case: its spatial shape, its
foreground class locations, and the voxels of a box (``read``). Boxes may stick out of the case on any side;
what lies outside is padded with 0 (image) and -1 (labels), nnU-Net's ``crop_and_pad_nd`` rule. Both sources
below give identical answers for identical data, so the loader does not care which one it reads.

* :class:`ZarrCaseSource` reads nnfast's zarr v3 case stores (``<folder>/<case_id>.zarr``) through the lean
  :class:`~nnfast.io.store_reader.CaseReader`.
* :class:`NnunetCaseSource` reads nnU-Net v2's preprocessed configuration folder (``<case>.b2nd``,
  ``<case>_seg.b2nd``, ``<case>.pkl``), so that nnU-Net users can train from the data they already have. It needs
  ``blosc2`` (nnfast's ``compat`` extra), imported only when such a source opens a case.

A source describes itself as JSON (:func:`source_to_json`: its class and its folder, case ids and settings; pickling
gives the same state) and reopens its files lazily, so the loader sends that text to its spawned worker processes
(:func:`source_from_json`). Each keeps a bounded number of cases open and a bounded cache of class locations (nnU-Net keeps
up to ~10 000 locations per class and case; a dataset of 1 000 cases would otherwise cost a worker ~1 GB).

The cascade (``3d_cascade_fullres``): a source opened with ``previous_stage_folder`` also reads the first stage's
segmentation of each case (nnfast's ``predicted_next_stage/<config>/<case>.zarr`` stores, see
:mod:`nnfast.io.prev_stage`, or nnU-Net's ``<case>.b2nd`` files for :class:`NnunetCaseSource`) as a second label
channel: ``read`` then fills ``out_seg`` of shape ``(2, *box)`` (labels, previous stage), both padded with -1,
nnU-Net's ``nnUNetDataset.load_case`` + ``crop_and_pad_nd`` of ``seg_prev``.

Not supported: nnU-Net's unpacked ``.npy``/``.npz`` folders (nnU-Net < 2.6).

Array conventions: image ``(c, x, y, z)`` float32 (nnU-Net axis order, low-resolution axis first), labels
``(s, x, y, z)`` (``s`` = :attr:`num_seg_channels`: 1, or 2 with a previous stage) read as int16 by default
(nnU-Net's loader casts crops to int16), -1 outside the nonzero region.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import CaseNotFoundError, DatasetError, InputTypeError, MissingDependencyError
from ..io.prev_stage import PreviousStageReader, missing_previous_stage
from ..io.store import list_case_ids, read_case_metadata, store_path
from ..io.store_reader import CaseReader, parse_bbox

__all__ = ["CaseSource", "ZarrCaseSource", "NnunetCaseSource", "open_case_source", "source_to_json",
           "source_from_json"]

logger = logging.getLogger(__name__)

#: Cases a source keeps open at once (file handles / memory maps).
DEFAULT_MAX_OPEN = 64
#: Bytes of class locations a source keeps in memory (least recently used cases are dropped).
DEFAULT_LOCATION_CACHE_BYTES = 256 * 2**20


@runtime_checkable
class CaseSource(Protocol):
    """What the batch builder needs from a dataset (see the module docstring).

    ``case_ids`` are the cases to sample from, sorted. Implementations must pickle cheaply (folder + ids) and
    reopen their files lazily in the process that unpickles them.
    """

    case_ids: tuple[str, ...]

    @property
    def num_channels(self) -> int:
        """Number of image channels."""

    @property
    def num_seg_channels(self) -> int:
        """Label channels ``read`` fills: 1, or 2 when the source reads a previous stage (the cascade)."""

    def shape(self, case_id: str) -> tuple[int, ...]:
        """Spatial shape ``(x, y, z)`` of a case."""

    def class_locations(self, case_id: str) -> Mapping[Any, np.ndarray]:
        """``{label or region tuple: (n, 4) integer array of (0, x, y, z)}`` (nnU-Net's format)."""

    def read(self, case_id: str, bbox: Sequence[Sequence[int]], out_image: np.ndarray | None = None,
             out_seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(c, *box)`` and labels ``(num_seg_channels, *box)`` of the half-open box ``bbox`` (``[[lb, ub],
        ...]`` per spatial axis), padded with 0 / -1 outside the case; written into ``out_*`` when given."""

    def subset(self, case_ids: Sequence[str]) -> "CaseSource":
        """The same source restricted to ``case_ids`` (e.g. one fold's training cases)."""

    def close(self) -> None:
        """Release open files (the source reopens on next use)."""


# ----------------------------------------------------------------------------------------------- caches
class _LRU:
    """A small least-recently-used cache with a count and a byte budget; evicted values get ``on_evict``."""

    def __init__(self, max_items: int, max_bytes: int | None = None, on_evict=None):
        self.max_items = max(1, int(max_items))
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self._d: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self.nbytes = 0

    def get(self, key):
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key, value, nbytes: int = 0) -> None:
        if key in self._d:
            self._drop(key)
        self._d[key] = value
        self._sizes[key] = nbytes
        self.nbytes += nbytes
        while len(self._d) > 1 and (len(self._d) > self.max_items
                                    or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            self._drop(next(iter(self._d)))

    def _drop(self, key) -> None:
        v = self._d.pop(key)
        self.nbytes -= self._sizes.pop(key)
        if self.on_evict is not None:
            self.on_evict(v)

    def clear(self) -> None:
        while self._d:
            self._drop(next(iter(self._d)))

    def __len__(self) -> int:
        return len(self._d)


def _compact_locations(locs: Mapping[Any, Any]) -> tuple[dict, int]:
    """Class locations as int32 ``(n, 4)`` arrays (half of nnU-Net's int64) and their byte count."""
    out = {}
    total = 0
    for k, v in locs.items():
        a = np.asarray(v)
        if a.size == 0:
            a = np.zeros((0, 4), np.int32)
        else:
            a = np.ascontiguousarray(a.reshape(-1, a.shape[-1]), dtype=np.int32)
        a.setflags(write=False)
        key = tuple(int(i) for i in k) if isinstance(k, (tuple, list)) else int(k)
        out[key] = a
        total += a.nbytes
    return out, total


def _out(out: np.ndarray | None, shape: tuple[int, ...], dtype, name: str, where: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray) or out.shape != shape:
        raise DatasetError(f"{where}: {name} must be an ndarray of shape {shape}, got "
                           f"{getattr(out, 'shape', type(out).__name__)}")
    return out


def _resolve_ids(available: Sequence[str], case_ids: Sequence[str] | None, folder: Path, what: str) -> tuple[str, ...]:
    if case_ids is None:
        ids = sorted(available)
    else:
        have = set(available)
        ids = sorted(str(c) for c in case_ids)
        missing = [c for c in ids if c not in have]
        if missing:
            raise CaseNotFoundError(f"{folder}: no {what} for case(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                                    f" ({len(have)} cases there); check the split or the folder")
    if not ids:
        raise DatasetError(f"{folder}: no {what} found; preprocess the dataset first or point to the folder that "
                           f"holds them")
    return tuple(ids)


# ------------------------------------------------------------------------------------------- nnfast stores
class _FolderSource:
    """What both case sources share: a folder, its case ids, an optional previous-stage folder, and caches rebuilt
    (not pickled) in each process."""

    folder: Path
    case_ids: tuple[str, ...]
    max_open: int
    location_cache_bytes: int
    previous_stage_folder: Path | None = None

    def _init_caches(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def num_seg_channels(self) -> int:
        return 1 if self.previous_stage_folder is None else 2

    def _seg_out(self, out_seg: np.ndarray | None, box: tuple[int, ...], where: str) -> np.ndarray:
        return _out(out_seg, (self.num_seg_channels, *box), np.int16, "out_seg", where)

    def __getstate__(self) -> dict:
        return {"folder": str(self.folder), "case_ids": self.case_ids, "max_open": self.max_open,
                "location_cache_bytes": self.location_cache_bytes,
                "previous_stage_folder": None if self.previous_stage_folder is None else str(self.previous_stage_folder)}

    def __setstate__(self, state: dict) -> None:
        self.folder = Path(state["folder"])
        self.case_ids = tuple(state["case_ids"])
        self.max_open = state["max_open"]
        self.location_cache_bytes = state["location_cache_bytes"]
        prev = state.get("previous_stage_folder")
        self.previous_stage_folder = None if prev is None else Path(prev)
        self._init_caches()

    def __repr__(self) -> str:
        prev = "" if self.previous_stage_folder is None else f", previous stage {str(self.previous_stage_folder)!r}"
        return f"{type(self).__name__}({str(self.folder)!r}, {len(self.case_ids)} cases{prev})"


class ZarrCaseSource(_FolderSource):
    """Cases of an nnfast preprocessed folder (``<folder>/<case_id>.zarr`` stores).

    Parameters
    ----------
    folder : path-like
        The configuration's folder of case stores.
    case_ids : sequence of str, optional
        Cases to use (all stores in ``folder`` by default).
    max_open : int
        Readers kept open at once.
    location_cache_bytes : int
        Budget of the class-location cache.
    previous_stage_folder : path-like, optional
        The cascade: folder of the first stage's segmentations (``<case_id>.zarr`` previous-stage stores, see
        :mod:`nnfast.io.prev_stage`), read as a second label channel. :meth:`missing_previous_stage` lists the
        cases without a usable one.

    Raises
    ------
    DatasetError
        ``folder`` holds no case store.
    CaseNotFoundError
        A requested case has no store.
    """

    def __init__(self, folder: str | os.PathLike, case_ids: Sequence[str] | None = None, *,
                 max_open: int = DEFAULT_MAX_OPEN, location_cache_bytes: int = DEFAULT_LOCATION_CACHE_BYTES,
                 previous_stage_folder: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.case_ids = _resolve_ids(list_case_ids(self.folder), case_ids, self.folder, "case store (*.zarr)")
        self.max_open = int(max_open)
        self.location_cache_bytes = int(location_cache_bytes)
        self.previous_stage_folder = None if previous_stage_folder is None else Path(previous_stage_folder)
        self._init_caches()

    def _init_caches(self) -> None:
        self._readers = _LRU(self.max_open, on_evict=lambda r: r.close())
        self._prev = _LRU(self.max_open, on_evict=lambda r: r.close())
        self._locations = _LRU(1 << 30, self.location_cache_bytes)
        self._num_channels: int | None = None

    def previous_stage_reader(self, case_id: str) -> PreviousStageReader:
        """The (cached, open) reader of a case's previous-stage segmentation.

        Raises
        ------
        DatasetError
            The source has no previous-stage folder.
        StoreError
            The case's previous-stage store is missing or damaged.
        """
        if self.previous_stage_folder is None:
            raise DatasetError(f"{self!r} reads no previous stage")
        r = self._prev.get(case_id)
        if r is None:
            r = PreviousStageReader(store_path(self.previous_stage_folder, case_id)).open()
            self._prev.put(case_id, r)
        return r

    def missing_previous_stage(self) -> dict[str, str]:
        """Cases without a complete previous-stage store of their own shape: case id -> reason (empty when all
        are there, or when the source reads no previous stage)."""
        if self.previous_stage_folder is None:
            return {}
        shapes = {c: read_case_metadata(store_path(self.folder, c))["image"]["shape"][1:] for c in self.case_ids}
        return missing_previous_stage(self.previous_stage_folder, shapes)

    def reader(self, case_id: str) -> CaseReader:
        """The (cached, open) :class:`CaseReader` of a case."""
        r = self._readers.get(case_id)
        if r is None:
            r = CaseReader(store_path(self.folder, case_id)).open()
            self._readers.put(case_id, r)
        return r

    @property
    def num_channels(self) -> int:
        if self._num_channels is None:
            self._num_channels = self.reader(self.case_ids[0]).num_channels
        return self._num_channels

    def shape(self, case_id: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.reader(case_id).shape)

    def class_locations(self, case_id: str) -> Mapping[Any, np.ndarray]:
        locs = self._locations.get(case_id)
        if locs is None:
            locs, nbytes = _compact_locations(self.reader(case_id).class_locations())
            self._locations.put(case_id, locs, nbytes)
        return locs

    #: :meth:`read` takes ``flip`` (the batch builder reads unrotated samples mirrored straight into the batch)
    reads_mirrored = True

    def read(self, case_id: str, bbox: Sequence[Sequence[int]], out_image: np.ndarray | None = None,
             out_seg: np.ndarray | None = None, flip: Sequence[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`CaseSource.read`; ``flip`` (3 bools) writes the box mirrored along those axes
        (:meth:`~nnfast.io.store_reader.CaseReader.read`); not with a previous stage."""
        r = self.reader(case_id)
        where = f"{r.path}"
        lbs, ubs, box = parse_bbox(bbox, 3, where, DatasetError)
        out_image = _out(out_image, (r.num_channels, *box), np.float32, "out_image", where)
        out_seg = self._seg_out(out_seg, box, where)
        if flip is not None and self.previous_stage_folder is not None:
            raise DatasetError(f"{self!r}: mirrored reads are not supported with a previous stage")
        r.read(bbox, out_image, out_seg[:1], flip=flip)
        if self.previous_stage_folder is not None:
            self.previous_stage_reader(case_id).read(bbox, out_seg[1:2])
        return out_image, out_seg

    def subset(self, case_ids: Sequence[str]) -> "ZarrCaseSource":
        return ZarrCaseSource(self.folder, case_ids, max_open=self.max_open,
                              location_cache_bytes=self.location_cache_bytes,
                              previous_stage_folder=self.previous_stage_folder)

    def close(self) -> None:
        self._readers.clear()
        self._prev.clear()


# --------------------------------------------------------------------------------- nnU-Net's preprocessed
def _import_blosc2():
    try:
        import blosc2
    except ImportError as e:  # pragma: no cover - blosc2 is installed where nnU-Net is
        raise MissingDependencyError("reading nnU-Net's preprocessed folders (.b2nd files) needs blosc2: "
                                     "pip install blosc2 (or pip install 'nnfast[compat]')") from e
    return blosc2


class _B2Case:
    """One nnU-Net case: its two blosc2 arrays (and the previous stage's ``(x, y, z)`` segmentation for the
    cascade), opened read-only (memory-mapped where the OS allows)."""

    def __init__(self, folder: Path, case_id: str, prev_folder: Path | None = None):
        blosc2 = _import_blosc2()
        kw = {} if os.name == "nt" else {"mmap_mode": "r"}  # nnU-Net: no mmap on Windows (its issue #2723)
        dparams = {"nthreads": 1}
        img_path, seg_path = folder / f"{case_id}.b2nd", folder / f"{case_id}_seg.b2nd"
        for p in (img_path, seg_path):
            if not p.is_file():
                raise CaseNotFoundError(f"{p} does not exist; is {folder} an nnU-Net v2 preprocessed folder "
                                        f"(nnUNetv2_preprocess output)?")
        self.image = blosc2.open(urlpath=str(img_path), mode="r", dparams=dparams, **kw)
        self.seg = blosc2.open(urlpath=str(seg_path), mode="r", dparams=dparams, **kw)
        if len(self.image.shape) != 4 or len(self.seg.shape) != 4 or self.image.shape[1:] != self.seg.shape[1:]:
            raise DatasetError(f"{folder}/{case_id}: image {self.image.shape} and seg {self.seg.shape} must be "
                               f"(c, x, y, z) and (1, x, y, z) with equal spatial shape")
        self.prev = None
        if prev_folder is not None:
            prev_path = prev_folder / f"{case_id}.b2nd"
            if not prev_path.is_file():
                raise CaseNotFoundError(f"{prev_path} does not exist: the previous stage's segmentation of "
                                        f"{case_id} (nnU-Net writes it in the previous stage's final validation)")
            self.prev = blosc2.open(urlpath=str(prev_path), mode="r", dparams=dparams, **kw)
            if tuple(self.prev.shape[-3:]) != tuple(self.image.shape[1:]) or len(self.prev.shape) not in (3, 4):
                raise DatasetError(f"{prev_path} has shape {self.prev.shape} but the case has "
                                   f"{self.image.shape[1:]}; predict the previous stage again")


def _fill_box(arr, out: np.ndarray, lbs: Sequence[int], ubs: Sequence[int], pad, channel_axis: bool = True) -> None:
    """``out[:] = arr[:, lbs:ubs]`` with ``pad`` outside ``arr`` (``arr`` is sliced once, for the overlap); an
    ``arr`` without ``channel_axis`` fills ``out[0]``."""
    if not channel_axis:
        out = out[0]
    shape = arr.shape[1:] if channel_axis else arr.shape
    v_lo = [max(lb, 0) for lb in lbs]
    v_hi = [min(ub, s) for ub, s in zip(ubs, shape)]
    if any(h <= lo for lo, h in zip(v_lo, v_hi)):
        out[...] = pad
        return
    inner = tuple(slice(lo - lb, h - lb) for lo, h, lb in zip(v_lo, v_hi, lbs))
    if any(lb < 0 for lb in lbs) or any(ub > s for ub, s in zip(ubs, shape)):
        out[...] = pad
    lead = (slice(None),) if channel_axis else ()
    chunk = arr[(*lead, *(slice(lo, h) for lo, h in zip(v_lo, v_hi)))]
    np.copyto(out[(*lead, *inner)], chunk, casting="same_kind")


def _load_nnunet_properties(path: Path) -> dict:
    """An nnU-Net properties file, read with :func:`nnfast.io.safe_pickle.load_data_pickle` (data only)."""
    from ..io.safe_pickle import load_data_pickle

    props = load_data_pickle(
        path,
        refuse=lambda name: DatasetError(
            f"{path} refers to `{name}`; nnU-Net's properties files hold only containers, numbers and numpy "
            "arrays, so nnfast refuses to load it (it could run code); preprocess the dataset again with "
            "nnUNetv2_preprocess"),
        unreadable=lambda reason: DatasetError(
            f"{path} is not a readable nnU-Net properties file ({reason}); preprocess the dataset again with "
            "nnUNetv2_preprocess"))
    if not isinstance(props, dict):
        raise DatasetError(f"{path} holds a {type(props).__name__}, not nnU-Net's properties dict")
    return props


class NnunetCaseSource(_FolderSource):
    """Cases of nnU-Net v2's preprocessed configuration folder (e.g. ``nnUNet_preprocessed/Dataset001_X/
    nnUNetPlans_3d_fullres``), read as ``nnUNetDatasetBlosc2.load_case`` + ``crop_and_pad_nd`` would.

    Parameters
    ----------
    folder : path-like
        The folder with ``<case>.b2nd``, ``<case>_seg.b2nd`` and ``<case>.pkl`` per case.
    case_ids : sequence of str, optional
        Cases to use (all in ``folder`` by default).
    max_open, location_cache_bytes : see :class:`ZarrCaseSource`.
    previous_stage_folder : path-like, optional
        The cascade: nnU-Net's ``<results>/<Dataset>/<trainer>__<plans>__3d_lowres/predicted_next_stage/
        3d_cascade_fullres`` folder (``<case>.b2nd`` per case), read as a second label channel.

    Notes
    -----
    Class locations come from nnU-Net's per-case ``.pkl`` (its ``properties['class_locations']``), nnU-Net's own
    format and the only pickle nnfast reads. It is loaded with an allowlist (plain containers, numbers, strings,
    numpy arrays, dtypes and scalars): a file that refers to anything else (a function, a class, a module) is
    refused before it is built, so a tampered file cannot run code. nnfast itself never writes pickles.

    Raises
    ------
    DatasetError
        ``folder`` holds no ``.b2nd`` case (or only nnU-Net's old unpacked ``.npy``/``.npz`` files).
    CaseNotFoundError
        A requested case is missing.
    ImportError
        ``blosc2`` is not installed (on first read).
    """

    def __init__(self, folder: str | os.PathLike, case_ids: Sequence[str] | None = None, *,
                 max_open: int = DEFAULT_MAX_OPEN, location_cache_bytes: int = DEFAULT_LOCATION_CACHE_BYTES,
                 previous_stage_folder: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.previous_stage_folder = None if previous_stage_folder is None else Path(previous_stage_folder)
        available = self.list_cases(self.folder)
        if not available and self.folder.is_dir() and any(p.suffix in (".npz", ".npy") for p in self.folder.iterdir()):
            raise DatasetError(f"{self.folder} holds nnU-Net's old .npz/.npy format; nnfast reads nnU-Net v2.6+ "
                               f"blosc2 folders (.b2nd): rerun nnUNetv2_preprocess with a current nnU-Net")
        self.case_ids = _resolve_ids(available, case_ids, self.folder, "nnU-Net case (<case>.b2nd)")
        self.max_open = int(max_open)
        self.location_cache_bytes = int(location_cache_bytes)
        self._init_caches()

    @staticmethod
    def list_cases(folder: str | os.PathLike) -> list[str]:
        """Sorted case ids of an nnU-Net v2 preprocessed folder (``<case>.b2nd`` files)."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        return sorted(p.name[:-5] for p in folder.iterdir()
                      if p.name.endswith(".b2nd") and not p.name.endswith("_seg.b2nd"))

    def _init_caches(self) -> None:
        self._cases = _LRU(self.max_open)
        self._locations = _LRU(1 << 30, self.location_cache_bytes)
        self._num_channels: int | None = None

    def _case(self, case_id: str) -> _B2Case:
        c = self._cases.get(case_id)
        if c is None:
            c = _B2Case(self.folder, case_id, self.previous_stage_folder)
            self._cases.put(case_id, c)
        return c

    def missing_previous_stage(self) -> dict[str, str]:
        """Cases without a previous-stage ``<case>.b2nd`` file: case id -> reason (see :class:`ZarrCaseSource`)."""
        if self.previous_stage_folder is None:
            return {}
        return {c: f"{self.previous_stage_folder / (c + '.b2nd')} does not exist" for c in self.case_ids
                if not (self.previous_stage_folder / f"{c}.b2nd").is_file()}

    @property
    def num_channels(self) -> int:
        if self._num_channels is None:
            self._num_channels = int(self._case(self.case_ids[0]).image.shape[0])
        return self._num_channels

    def shape(self, case_id: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._case(case_id).image.shape[1:])

    def properties(self, case_id: str) -> dict:
        """nnU-Net's per-case properties (its ``.pkl``, read with an allowlist: see the class notes), uncached.

        Raises
        ------
        CaseNotFoundError
            No ``.pkl`` next to the case.
        DatasetError
            The file refers to something other than data, or is not a pickled dict.
        """
        path = self.folder / f"{case_id}.pkl"
        if not path.is_file():
            raise CaseNotFoundError(f"{path} does not exist; nnU-Net writes it next to {case_id}.b2nd")
        return _load_nnunet_properties(path)

    def class_locations(self, case_id: str) -> Mapping[Any, np.ndarray]:
        locs = self._locations.get(case_id)
        if locs is None:
            props = self.properties(case_id)
            if "class_locations" not in props:
                raise DatasetError(f"{self.folder / (case_id + '.pkl')} has no 'class_locations'; preprocess the "
                                   f"dataset with nnU-Net v2")
            locs, nbytes = _compact_locations(props["class_locations"])
            self._locations.put(case_id, locs, nbytes)
        return locs

    def read(self, case_id: str, bbox: Sequence[Sequence[int]], out_image: np.ndarray | None = None,
             out_seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        c = self._case(case_id)
        where = f"{self.folder / case_id}"
        lbs, ubs, box = parse_bbox(bbox, 3, where, DatasetError)
        out_image = _out(out_image, (int(c.image.shape[0]), *box), np.float32, "out_image", where)
        out_seg = self._seg_out(out_seg, box, where)
        _fill_box(c.image, out_image, lbs, ubs, 0)
        _fill_box(c.seg, out_seg[:1], lbs, ubs, -1)
        if c.prev is not None:
            _fill_box(c.prev, out_seg[1:2], lbs, ubs, -1, channel_axis=len(c.prev.shape) == 4)
        return out_image, out_seg

    def subset(self, case_ids: Sequence[str]) -> "NnunetCaseSource":
        return NnunetCaseSource(self.folder, case_ids, max_open=self.max_open,
                                location_cache_bytes=self.location_cache_bytes,
                                previous_stage_folder=self.previous_stage_folder)

    def close(self) -> None:
        self._cases.clear()


def open_case_source(folder: str | os.PathLike, case_ids: Sequence[str] | None = None,
                     previous_stage_folder: str | os.PathLike | None = None) -> CaseSource:
    """The right source for ``folder``: nnfast stores if it holds any ``*.zarr``, else nnU-Net's ``.b2nd`` files
    (with the cascade's ``previous_stage_folder`` when given).

    Raises
    ------
    DatasetError
        ``folder`` holds neither.
    """
    folder = Path(folder)
    if list_case_ids(folder):
        return ZarrCaseSource(folder, case_ids, previous_stage_folder=previous_stage_folder)
    if NnunetCaseSource.list_cases(folder):
        return NnunetCaseSource(folder, case_ids, previous_stage_folder=previous_stage_folder)
    raise DatasetError(f"{folder} holds neither nnfast case stores (*.zarr) nor nnU-Net preprocessed cases (*.b2nd); "
                       f"run `nnfast preprocess` or nnUNetv2_preprocess for this configuration")


def source_to_json(source: CaseSource) -> str:
    """``source`` as JSON text: its class (``module:qualname``) and its ``__getstate__`` (folder, case ids,
    settings; no open files). :func:`source_from_json` rebuilds it in another process.

    Raises
    ------
    TypeError
        The source's state is not plain JSON (a custom source: give it a JSON-able ``__getstate__`` and a matching
        ``__setstate__``, or use the loader with ``num_workers=0``).
    """
    cls = type(source)
    state = source.__getstate__() if hasattr(source, "__getstate__") else None
    try:
        return json.dumps({"class": f"{cls.__module__}:{cls.__qualname__}", "state": state})
    except TypeError as e:
        raise InputTypeError(f"{cls.__name__}: loader workers receive a case source as JSON, but its state is not JSON "
                             f"({e}); give it a JSON-able __getstate__/__setstate__ or use num_workers=0") from e


def source_from_json(text: str) -> CaseSource:
    """The source :func:`source_to_json` described (its files reopen on first use)."""
    import importlib

    d = json.loads(text)
    module, _, qualname = d["class"].partition(":")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    obj = cls.__new__(cls)
    obj.__setstate__(d["state"])
    return obj
