"""Lean patch reader for nnfast case stores (the training loader's hot path).

zarr-python spends ~5-7 ms of machinery per patch read (asyncio, codec pipelines, index decoding per call),
more than decoding itself. :class:`CaseReader` instead parses each array's ``zarr.json`` and its shard
index once, memory-maps the shard file, and for a box decodes exactly the inner chunks the box touches with
the c-blosc that numcodecs ships (``blosc_decompress_ctx``, one thread) into a reused per-thread scratch chunk, copying
the overlap into caller-provided output buffers. Boxes may extend past the array (nnU-Net's ``crop_and_pad_nd``): the image is padded with 0, the
seg with -1. A box can be written mirrored (``flip``), as the training loader reads samples without rotation or
scaling straight into the batch. Into C-contiguous buffers the overlap is copied (and mirrored, and cast: int8
labels into int16 slots) by the Numba kernel :func:`nnfast.native.augment.copy_chunk`, ~2x numpy's strided
assignment (~4x into a mirrored view); Numba is imported on the first such read, not with this module.

Understood layouts (anything else is read through zarr-python, :attr:`CaseReader.uses_zarr_fallback`): zarr
v3, regular chunk grid, ``default`` or ``v2`` chunk key encoding, numeric data type, codecs either
``[sharding_indexed]`` with inner ``[bytes, blosc?]`` and index ``[bytes, crc32c?]`` (index at start or end),
or unsharded ``[bytes, blosc?]``.

Processes and threads: a reader opens lazily on its first use, pickles as its path only, and holds nothing
that breaks across ``fork`` (read-only ``mmap`` objects and numpy buffers; the context decoder has no
threads or locks, and its c-blosc symbol is loaded on the first read of a process, not at import). One reader must not be used by two threads at once; the decode buffer is one per thread, shared by all readers.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from numcodecs.blosc import decompress as _decompress

from ..errors import StoreError
from .store import read_case_metadata

__all__ = ["CaseReader", "open_array", "parse_bbox"]

_MISSING = (1 << 64) - 1
_BLOSC_HEADER = struct.Struct("<I4xI")  # blosc1 header from byte 4: nbytes, (blocksize), cbytes


def _load_blosc_decompress_ctx():
    """c-blosc's ``blosc_decompress_ctx`` from numcodecs' own extension module, or None.

    Calling it through ctypes skips numcodecs' per-call buffer checks (a few us per chunk, ~3 % of a patch
    read), and unlike ``numcodecs.blosc.decompress`` in a process's main thread it never starts blosc's
    thread pool (12 loader workers x 8 blosc threads would oversubscribe the cores) and takes no global lock. The chunk
    header is validated against the shard index before each call. If the symbol is not exported (another
    numcodecs build), ``numcodecs.blosc.decompress`` is used instead.
    """
    try:
        import numcodecs.blosc

        fn = ctypes.CDLL(numcodecs.blosc.__file__).blosc_decompress_ctx
    except (OSError, AttributeError):  # pragma: no cover - depends on the numcodecs build
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_UNLOADED = object()
#: ``blosc_decompress_ctx`` once loaded (None: not exported, numcodecs decodes); loaded on first use, not at import
_BLOSC_DECOMPRESS_CTX: object = _UNLOADED


def _decompress_ctx():
    """The ctypes ``blosc_decompress_ctx`` (or None), loaded on the first call of this process."""
    global _BLOSC_DECOMPRESS_CTX
    if _BLOSC_DECOMPRESS_CTX is _UNLOADED:
        _BLOSC_DECOMPRESS_CTX = _load_blosc_decompress_ctx()
    return _BLOSC_DECOMPRESS_CTX


_TLS = threading.local()


def _thread_scratch(nbytes: int) -> np.ndarray:
    """This thread's decode buffer (uint8, at least ``nbytes``), shared by every array of every open reader: a chunk
    is decoded and copied out before the next decode, so one buffer per thread suffices, and open readers cost no
    chunk-sized memory each (a loader worker keeps up to 64 cases open; 2D stores have whole-slice chunks)."""
    buf = getattr(_TLS, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(int(nbytes), 2 * (0 if buf is None else buf.size)) + 64, np.uint8)
        off = (-buf.ctypes.data) % 64  # aligned for the decoder and the typed views
        buf = buf[off:]
        _TLS.buf = buf
    return buf


def _mirrored(out: np.ndarray, flip: Sequence[bool]) -> np.ndarray:
    """``out`` reversed along the spatial axes (1, 2, 3) in ``flip``: index ``t`` of the view is ``n - 1 - t`` of
    ``out`` there (a box read mirrored, as the training loader's mirroring writes a patch)."""
    if not any(flip):
        return out
    return out[(slice(None), *(slice(None, None, -1) if f else slice(None) for f in flip))]


_COPY_CHUNK = None
#: dtype kind -> smallest itemsize the chunk-copy kernel takes (Numba has no float16 arrays; bool is read by numpy)
_KERNEL_KINDS = {"i": 1, "u": 1, "f": 4}


def _chunk_kernel():
    """:func:`nnfast.native.augment._copy_chunk`, imported on the first read (importing Numba costs ~0.3 s, which
    opening a store should not)."""
    global _COPY_CHUNK
    if _COPY_CHUNK is None:
        from ..native.augment import _copy_chunk

        _COPY_CHUNK = _copy_chunk
    return _COPY_CHUNK


class _Unsupported(Exception):
    """The array's layout is not one the lean path decodes (use zarr-python)."""


def _parse_fill(value, dtype: np.dtype):
    if isinstance(value, str):
        special = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}
        if value not in special:
            raise _Unsupported(f"fill value {value!r}")
        value = special[value]
    if isinstance(value, (list, dict)):
        raise _Unsupported(f"fill value {value!r}")
    return np.array(value, dtype=dtype)[()]


def _bytes_dtype(codec: dict, data_type: str) -> np.dtype:
    try:
        dtype = np.dtype(data_type)
    except TypeError as e:
        raise _Unsupported(f"data type {data_type!r}") from e
    if dtype.kind not in "biuf":
        raise _Unsupported(f"data type {data_type!r}")
    endian = (codec.get("configuration") or {}).get("endian")
    if endian == "big":
        return dtype.newbyteorder(">")
    if endian not in (None, "little"):
        raise _Unsupported(f"endian {endian!r}")
    return dtype.newbyteorder("<")


def _parse_array_codecs(codecs: list, data_type: str) -> tuple[np.dtype, bool]:
    """``[bytes, blosc?]`` -> (on-disk dtype, is_blosc)."""
    if not codecs or codecs[0].get("name") != "bytes" or len(codecs) > 2:
        raise _Unsupported(f"codecs {[c.get('name') for c in codecs]}")
    dtype = _bytes_dtype(codecs[0], data_type)
    if len(codecs) == 2:
        if codecs[1].get("name") != "blosc":
            raise _Unsupported(f"compressor {codecs[1].get('name')!r}")
        return dtype, True
    return dtype, False


class _LeanArray:
    """One zarr v3 array: metadata, per-chunk (buffer, offset, length) table, and a region reader."""

    def __init__(self, array_dir: Path):
        self.dir = array_dir
        meta_file = array_dir / "zarr.json"
        try:
            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError as e:
            raise StoreError(f"array metadata {meta_file} is missing; the case store is damaged, rerun "
                             f"preprocessing for it") from e
        self.meta = meta
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise _Unsupported("not a zarr v3 array")
        if meta.get("storage_transformers"):
            raise _Unsupported("storage transformers")
        self.shape = tuple(int(s) for s in meta["shape"])
        grid = meta.get("chunk_grid", {})
        if grid.get("name") != "regular":
            raise _Unsupported(f"chunk grid {grid.get('name')!r}")
        outer = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        cke = meta.get("chunk_key_encoding", {})
        sep = (cke.get("configuration") or {}).get("separator")
        if cke.get("name") == "default":
            self._key_prefix, self._sep = ["c"], sep or "/"
        elif cke.get("name") == "v2":
            self._key_prefix, self._sep = [], sep or "."
        else:
            raise _Unsupported(f"chunk key encoding {cke.get('name')!r}")
        codecs = meta.get("codecs", [])
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
            conf = codecs[0]["configuration"]
            self.chunks = tuple(int(c) for c in conf["chunk_shape"])
            self.disk_dtype, self._blosc = _parse_array_codecs(conf["codecs"], meta["data_type"])
            index_codecs = conf.get("index_codecs", [])
            names = [c.get("name") for c in index_codecs]
            if names not in (["bytes"], ["bytes", "crc32c"]) or (
                    (index_codecs[0].get("configuration") or {}).get("endian", "little") != "little"):
                raise _Unsupported(f"shard index codecs {names}")
            self._index_crc = names == ["bytes", "crc32c"]
            self._index_at_end = conf.get("index_location", "end") == "end"
            if any(o % c for o, c in zip(outer, self.chunks)):
                raise _Unsupported("shard shape not a multiple of the inner chunk shape")
            self.shard_shape = outer
        else:
            self.chunks = outer
            self.disk_dtype, self._blosc = _parse_array_codecs(codecs, meta["data_type"])
            self.shard_shape = None
        if len(self.chunks) != len(self.shape) or len(outer) != len(self.shape):
            raise _Unsupported("chunk rank differs from array rank")
        self.dtype = self.disk_dtype.newbyteorder("=")
        self.fill_value = _parse_fill(meta.get("fill_value", 0), self.dtype)
        self.grid = tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))
        self._strides = [int(np.prod(self.grid[d + 1:], dtype=np.int64)) for d in range(len(self.grid))]
        self._chunk_nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self._scratch_src = None  # the thread's buffer the views below were made from (see _scratch_views)
        self._buffers: list = []  # (mmap, memoryview) per shard file
        self._views: list = []
        self._addrs: list[int] = []  # start address of each mapped shard (valid until close())
        n = int(np.prod(self.grid, dtype=np.int64))
        # per chunk (flat C index over the chunk grid): buffer id (-1 = not stored), offset, length
        self._buf_id: list[int] = []
        self._offset: list[int] = []
        self._length: list[int] = []
        if self.shard_shape is not None:
            self._load_shards(n)
        # unsharded chunks are read from their own files on demand (see _chunk_bytes)

    # -- shards -------------------------------------------------------------------------------------
    def _key(self, coords: Sequence[int]) -> Path:
        parts = self._key_prefix + [str(int(c)) for c in coords]
        if not parts:
            parts = ["0"]
        return self.dir / self._sep.join(parts)

    def _load_shards(self, n: int) -> None:
        cps = tuple(s // c for s, c in zip(self.shard_shape, self.chunks))
        n_inner = int(np.prod(cps, dtype=np.int64))
        index_nbytes = 16 * n_inner + (4 if self._index_crc else 0)
        shard_grid = tuple(-(-s // c) for s, c in zip(self.shape, self.shard_shape))
        buf_id = np.full(n, -1, np.int64)
        offset = np.zeros(n, np.int64)
        length = np.zeros(n, np.int64)
        inner = np.indices(cps).reshape(len(cps), -1)
        strides = np.array(self._strides, np.int64)[:, None]
        grid = np.array(self.grid, np.int64)[:, None]
        for shard in itertools.product(*(range(g) for g in shard_grid)):
            file = self._key(shard)
            try:
                fd = os.open(file, os.O_RDONLY)
            except FileNotFoundError:
                continue  # the whole shard equals the fill value
            try:
                size = os.fstat(fd).st_size
                if size < index_nbytes:
                    raise StoreError(f"shard {file} has {size} bytes, less than its {index_nbytes}-byte index; "
                                     f"the store is damaged, rerun preprocessing for this case")
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            view = memoryview(mm)
            self._buffers.append((mm, view))
            self._views.append(view)
            probe = np.frombuffer(view, dtype=np.uint8)
            self._addrs.append(probe.ctypes.data)
            del probe  # releases its buffer export, so that close() can unmap
            start = size - index_nbytes if self._index_at_end else 0
            raw = view[start:start + index_nbytes]
            if self._index_crc:
                self._check_crc(raw[:-4], raw[-4:], file)
            index = np.frombuffer(raw[: 16 * n_inner], dtype="<u8").reshape(n_inner, 2)
            present = ~((index[:, 0] == _MISSING) & (index[:, 1] == _MISSING))
            if np.any(index[present, 0] + index[present, 1] > size):
                raise StoreError(f"shard {file}: its index points beyond the file end ({size} bytes); the store "
                                 f"is damaged, rerun preprocessing for this case")
            coords = inner + (np.array(shard, np.int64) * np.array(cps, np.int64))[:, None]
            sel = present & np.all(coords < grid, axis=0)
            flat = (coords[:, sel] * strides).sum(axis=0)
            buf_id[flat] = len(self._views) - 1
            offset[flat] = index[sel, 0].astype(np.int64)
            length[flat] = index[sel, 1].astype(np.int64)
        # plain lists: indexing them with Python ints is several times faster than indexing numpy arrays
        self._buf_id, self._offset, self._length = buf_id.tolist(), offset.tolist(), length.tolist()

    @staticmethod
    def _check_crc(payload: memoryview, stored: memoryview, file: Path) -> None:
        try:
            import google_crc32c
        except ImportError:  # pragma: no cover - zarr depends on it
            return
        if google_crc32c.value(bytes(payload)) != int.from_bytes(bytes(stored), "little"):
            raise StoreError(f"shard index of {file} fails its crc32c check; the store is damaged, rerun "
                             f"preprocessing for this case")

    def _chunk_bytes(self, flat: int, coords: tuple[int, ...]):
        """Encoded bytes of one chunk, or None if it is not stored (equal to the fill value)."""
        if self.shard_shape is not None:
            b = self._buf_id[flat]
            if b < 0:
                return None
            off = self._offset[flat]
            return self._views[b][off:off + self._length[flat]]
        try:
            with open(self._key(coords), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _scratch_views(self):
        """``(chunk-shaped array, byte view, address)`` of this thread's decode buffer (:func:`_thread_scratch`)."""
        buf = _thread_scratch(self._chunk_nbytes)
        if buf is not self._scratch_src:
            arr = buf[:self._chunk_nbytes].view(self.disk_dtype).reshape(self.chunks)
            self._scratch_views_cache = (arr, memoryview(arr).cast("B"), arr.ctypes.data)
            self._scratch_src = buf
        return self._scratch_views_cache

    def _decode(self, raw) -> np.ndarray:
        """The decoded chunk (the thread's scratch buffer, valid until the next decode in this thread, or a
        read-only view of ``raw`` if uncompressed)."""
        if self._blosc:
            scratch, dest, _ = self._scratch_views()
            _decompress(raw, dest)
            return scratch
        if len(raw) != self._chunk_nbytes:
            raise StoreError(f"{self.dir}: a chunk has {len(raw)} bytes, expected {self._chunk_nbytes}; the "
                             f"store is damaged, rerun preprocessing for this case")
        return np.frombuffer(raw, dtype=self.disk_dtype).reshape(self.chunks)

    # -- reading ------------------------------------------------------------------------------------
    def read_into(self, lo: Sequence[int], hi: Sequence[int], out: np.ndarray, at: Sequence[int] | None = None,
                  flip: Sequence[bool] | None = None) -> None:
        """Copy ``array[lo:hi]`` (in bounds, non-empty) into ``out``: channel ``lo[0] + k`` into ``out[k]``, the
        spatial box at ``at`` (default 0; ``out`` then has shape ``hi - lo``), mirrored within ``out`` along the
        spatial axes in ``flip`` (:func:`_mirrored`)."""
        at = [0] * (len(lo) - 1) if at is None else [int(v) for v in at]
        flip = (False,) * (len(lo) - 1) if flip is None else tuple(bool(f) for f in flip)
        if (self.shard_shape is not None and self._blosc and len(lo) == 4 and self.chunks[0] == 1
                and self.disk_dtype.isnative and out.flags.c_contiguous and _KERNEL_KINDS.get(self.dtype.kind, 99)
                <= self.dtype.itemsize and _KERNEL_KINDS.get(out.dtype.kind, 99) <= out.dtype.itemsize):
            self._read_sharded_4d(lo, hi, out, at, flip)
            return
        parts = []
        for d, (a, b, c) in enumerate(zip(lo, hi, self.chunks)):
            stride = self._strides[d]
            axis = []
            for ci in range(a // c, (b - 1) // c + 1):
                o = ci * c
                s, e = max(a, o), min(b, o + c)
                axis.append((ci * stride, ci, slice(s - a, e - a), slice(s - o, e - o)))
            parts.append(axis)
        out = _mirrored(out, flip)[(slice(None), *(slice(t, t + b - a) for t, a, b in zip(at, lo[1:], hi[1:])))]
        for combo in itertools.product(*parts):
            flat = 0
            for p in combo:
                flat += p[0]
            out_sl = tuple(p[2] for p in combo)
            raw = self._chunk_bytes(flat, tuple(p[1] for p in combo))
            if raw is None:
                out[out_sl] = self.fill_value
            else:
                out[out_sl] = self._decode(raw)[tuple(p[3] for p in combo)]

    def _read_sharded_4d(self, lo, hi, out: np.ndarray, at: list[int], flip: tuple[bool, ...]) -> None:
        """The hot loop of :meth:`read_into` for (c, x, y, z) blosc shards with one channel per chunk and a
        C-contiguous ``out``: each chunk is decoded into the thread's scratch and its overlap copied (mirrored where
        asked) by the :func:`~nnfast.native.augment.copy_chunk` kernel, which also casts (int8 labels into int16
        slots) at ~2x numpy's strided copy, ~4x when mirrored. Everything else is inlined."""
        copy = _chunk_kernel()
        buf_id, offset, length, views = self._buf_id, self._offset, self._length, self._views
        scratch, dest, dest_addr = self._scratch_views()
        src = scratch[0]
        fill = self.fill_value
        ctx, addrs, nbytes = _decompress_ctx(), self._addrs, self._chunk_nbytes
        header = _BLOSC_HEADER.unpack_from
        # per spatial axis and chunk: (flat offset, first voxel in the chunk, extent, first voxel in out)
        axes = []
        for d in range(1, 4):
            a, b, c, n = lo[d], hi[d], self.chunks[d], out.shape[d]
            stride = self._strides[d]
            axis = []
            for ci in range(a // c, (b - 1) // c + 1):
                o = ci * c
                s, e = max(a, o), min(b, o + c)
                u = at[d - 1] + s - a
                axis.append((ci * stride, s - o, e - s, n - u - (e - s) if flip[d - 1] else u))
            axes.append(axis)
        p1, p2, p3 = axes
        f1, f2, f3 = flip
        s0 = self._strides[0]
        for k, ch in enumerate(range(lo[0], hi[0])):
            dst = out[k]
            f0 = ch * s0
            for g1, a1, e1, o1 in p1:
                f01 = f0 + g1
                for g2, a2, e2, o2 in p2:
                    f012 = f01 + g2
                    for g3, a3, e3, o3 in p3:
                        flat = f012 + g3
                        b = buf_id[flat]
                        if b < 0:
                            dst[o1:o1 + e1, o2:o2 + e2, o3:o3 + e3] = fill
                            continue
                        off = offset[flat]
                        if ctx is None:
                            _decompress(views[b][off:off + length[flat]], dest)
                        elif header(views[b], off + 4) != (nbytes, length[flat]) or ctx(
                                addrs[b] + off, dest_addr, nbytes, 1) != nbytes:
                            raise StoreError(f"{self.dir}: chunk {flat} does not decode to {nbytes} bytes; "
                                             f"the store is damaged, rerun preprocessing for this case")
                        copy(src, dst, a1, a2, a3, o1, o2, o3, e1, e2, e3, f1, f2, f3)

    def close(self) -> None:
        self._views = []
        self._addrs = []
        for mm, view in self._buffers:
            view.release()
            mm.close()
        self._buffers = []


class _ZarrArray:
    """Fallback: the same interface over zarr-python."""

    def __init__(self, array_dir: Path):
        import zarr

        self._arr = zarr.open_array(str(array_dir), mode="r")
        self.shape = tuple(self._arr.shape)
        self.dtype = np.dtype(self._arr.dtype)

    def read_into(self, lo, hi, out, at=None, flip=None) -> None:
        at = [0] * (len(lo) - 1) if at is None else [int(v) for v in at]
        view = _mirrored(out, flip or ())[(slice(None), *(slice(t, t + b - a) for t, a, b in zip(at, lo[1:], hi[1:])))]
        view[...] = self._arr[tuple(slice(a, b) for a, b in zip(lo, hi))]

    def close(self) -> None:
        pass


def open_array(array_dir: Path, force_zarr: bool):
    """A read-only array of a store (``image``/``seg`` folder): the lean reader, or zarr-python when ``force_zarr`` or
    when the lean reader cannot read the layout."""
    if not force_zarr:
        try:
            return _LeanArray(array_dir)
        except (_Unsupported, KeyError, TypeError, ValueError) as e:
            if isinstance(e, StoreError):
                raise
            reason = e
    else:
        reason = "forced"
    import logging

    logging.getLogger(__name__).debug("%s: reading through zarr-python (%s)", array_dir, reason)
    return _ZarrArray(array_dir)


def parse_bbox(bbox: Sequence[Sequence[int]], ndim: int, where, error: type[Exception] = StoreError
               ) -> tuple[list[int], list[int], tuple[int, ...]]:
    """``(lower bounds, upper bounds, box shape)`` of a half-open ``[[lb, ub], ...]`` box over ``ndim`` axes.

    Raises
    ------
    StoreError (or ``error``)
        Wrong number of axes or an upper bound below its lower bound (``where`` names the store or source).
    """
    if len(bbox) != ndim:
        raise error(f"{where}: bbox needs {ndim} [lb, ub) pairs, got {bbox!r}")
    lbs = [int(b[0]) for b in bbox]
    ubs = [int(b[1]) for b in bbox]
    box = tuple(u - lb for lb, u in zip(lbs, ubs))
    if min(box) < 0:
        raise error(f"{where}: bbox {bbox!r} has an upper bound below its lower bound")
    return lbs, ubs, box


class CaseReader:
    """Reads boxes of one case store (``<case_id>.zarr``) with minimal overhead.

    Parameters
    ----------
    path : path-like
        A complete case store written by :func:`nnfast.io.store.write_case`.
    force_zarr : bool
        Read through zarr-python even where the lean path applies (for testing and debugging).

    Notes
    -----
    The store is opened on first use; construction costs nothing. Pickling keeps only ``path`` and
    ``force_zarr``; an unpickled reader reopens lazily in its process.
    """

    def __init__(self, path: str | os.PathLike, *, force_zarr: bool = False):
        self.path = Path(path)
        self.force_zarr = bool(force_zarr)
        self._image = None
        self._seg = None
        self._meta: dict | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def open(self) -> "CaseReader":
        """Parse metadata and shard indexes now (otherwise done on first use)."""
        if self._image is None:
            meta = read_case_metadata(self.path)
            image = open_array(self.path / "image", self.force_zarr)
            try:
                seg = open_array(self.path / "seg", self.force_zarr)
            except BaseException:
                image.close()
                raise
            if len(image.shape) != 4 or len(seg.shape) != 4 or image.shape[1:] != seg.shape[1:]:
                image.close()
                seg.close()
                raise StoreError(f"{self.path}: image {image.shape} and seg {seg.shape} must be (c, x, y, z) and "
                                 f"(1, x, y, z) with equal spatial shape")
            self._meta, self._image, self._seg = meta, image, seg
        return self

    def close(self) -> None:
        """Release the memory maps (the reader reopens on next use)."""
        for arr in (self._image, self._seg):
            if arr is not None:
                arr.close()
        self._image = self._seg = None

    def __enter__(self) -> "CaseReader":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "force_zarr": self.force_zarr}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], force_zarr=state["force_zarr"])

    def __repr__(self) -> str:
        return f"CaseReader({str(self.path)!r})"

    # -- metadata -----------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        """The store's ``nnfast`` attributes (see :func:`nnfast.io.store.read_case_metadata`)."""
        self.open()
        return self._meta

    @property
    def properties(self) -> dict:
        return self.metadata["properties"]

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(x, y, z)``."""
        self.open()
        return self._image.shape[1:]

    @property
    def num_channels(self) -> int:
        self.open()
        return self._image.shape[0]

    @property
    def image_dtype(self) -> np.dtype:
        self.open()
        return self._image.dtype

    @property
    def seg_dtype(self) -> np.dtype:
        self.open()
        return self._seg.dtype

    @property
    def uses_zarr_fallback(self) -> bool:
        """True if either array is read through zarr-python."""
        self.open()
        return isinstance(self._image, _ZarrArray) or isinstance(self._seg, _ZarrArray)

    def class_locations(self) -> dict:
        """``{label or tuple: int64 (n, 4)}`` read from the store (not cached; cache it in the caller)."""
        from .store import read_class_locations

        return read_class_locations(self.path)

    # -- reading ------------------------------------------------------------------------------------
    def read(
        self,
        bbox: Sequence[Sequence[int]],
        out_image: np.ndarray | None = None,
        out_seg: np.ndarray | None = None,
        channels: Sequence[int] | None = None,
        *,
        seg: bool = True,
        flip: Sequence[bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the box ``bbox`` of image and seg, padding outside the array (image 0, seg -1).

        Parameters
        ----------
        bbox : sequence of 3 ``[lb, ub)`` pairs
            Half-open box per spatial axis ``(x, y, z)``; may extend past the array on any side.
        out_image : ndarray, optional
            Buffer of shape ``(n_channels, ub - lb ...)`` to fill (any layout; dtype same kind as the
            image). Reusing it saves the page faults of a fresh allocation.
        out_seg : ndarray, optional
            Buffer of shape ``(1, ub - lb ...)`` (e.g. int16 like nnU-Net's loader, or the stored dtype).
        channels : sequence of int, optional
            Image channels to read, in this order; all by default.
        seg : bool
            Also read the segmentation (set False for inference).
        flip : sequence of 3 bool, optional
            Write the box mirrored along these spatial axes (``out[:, ::-1]`` on axis ``x``, ...), padding included:
            the crop and mirroring of the training loader's samples without rotation or scaling, in one pass.

        Returns
        -------
        image : ndarray (n_channels, *box) of the image dtype (or ``out_image``'s)
        seg : ndarray (1, *box) of the seg dtype (or ``out_seg``'s), or None if ``seg=False``

        Raises
        ------
        StoreError
            If ``bbox`` has the wrong length or ``ub < lb``, a channel is out of range, or a buffer has the
            wrong shape or an incompatible dtype.
        """
        self.open()
        shape = self._image.shape[1:]
        lbs, ubs, box = parse_bbox(bbox, len(shape), self.path)
        n_ch = self._image.shape[0]
        if channels is None:
            chans = None
            n_out = n_ch
        else:
            chans = [int(c) for c in channels]
            if any(c < 0 or c >= n_ch for c in chans):
                raise StoreError(f"{self.path}: channels {chans} out of range for {n_ch} image channels")
            n_out = len(chans)
        if flip is None:
            flips = (False,) * len(shape)
        else:
            flips = tuple(bool(f) for f in flip)
            if len(flips) != len(shape):
                raise StoreError(f"{self.path}: flip needs one bool per spatial axis ({len(shape)}), got {flip!r}")
        out_image = self._buffer(out_image, (n_out, *box), self._image.dtype, "out_image")
        self._fill(self._image, out_image, lbs, ubs, shape, 0, chans, flips)
        if not seg:
            return out_image, None
        out_seg = self._buffer(out_seg, (1, *box), self._seg.dtype, "out_seg")
        self._fill(self._seg, out_seg, lbs, ubs, shape, -1, None, flips)
        return out_image, out_seg

    def _buffer(self, out, shape, dtype, name) -> np.ndarray:
        if out is None:
            return np.empty(shape, dtype=dtype)
        if not isinstance(out, np.ndarray) or out.shape != shape:
            raise StoreError(f"{self.path}: {name} must be an ndarray of shape {shape}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        if not np.can_cast(dtype, out.dtype, casting="same_kind"):
            raise StoreError(f"{self.path}: {name} dtype {out.dtype} cannot hold {dtype} values")
        return out

    @staticmethod
    def _fill(arr, out, lbs, ubs, shape, pad, chans, flip=None) -> None:
        flip = (False,) * len(shape) if flip is None else flip
        v_lo = [max(lb, 0) for lb in lbs]
        v_hi = [min(ub, s) for ub, s in zip(ubs, shape)]
        if any(h <= lo for lo, h in zip(v_lo, v_hi)):
            out[...] = pad
            return
        padded = _mirrored(out, flip)  # the padding lands where the mirrored box puts it
        for d in range(len(shape)):
            if lbs[d] < 0:
                padded[(slice(None),) * (d + 1) + (slice(0, -lbs[d]),)] = pad
            if ubs[d] > shape[d]:
                padded[(slice(None),) * (d + 1) + (slice(shape[d] - lbs[d], None),)] = pad
        at = [lo - lb for lo, lb in zip(v_lo, lbs)]
        if chans is None:
            arr.read_into([0, *v_lo], [arr.shape[0], *v_hi], out, at, flip)
        else:
            for i, c in enumerate(chans):
                arr.read_into([c, *v_lo], [c + 1, *v_hi], out[i:i + 1], at, flip)
