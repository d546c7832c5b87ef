"""nnfast's preprocessed case store: one zarr v3 group per case, written atomically.

Format (``schema_version`` 1)
-----------------------------
A preprocessed folder holds one directory per case, ``<folder>/<case_id>.zarr/``, a zarr v3 group::

    <case_id>.zarr/
        zarr.json                 group; attributes["nnfast"] (see below), written LAST
        image/                    float32 (c, x, y, z), fill value 0
        seg/                      int8, or int16 when labels need it, (1, x, y, z), fill value -1
        class_locations/          group; one int32 array (n, 4) per foreground class or region
            1/  2/  1_2_3/  -1_1_2/ ...

* Axis order is nnU-Net's after transposition: channel first, then the three spatial axes (the low-resolution
  axis first), ``c`` image channels. ``seg`` is -1 outside the nonzero region (nnU-Net's convention).
* ``image`` and ``seg`` are each ONE shard (``sharding_indexed`` codec, index at the end, crc32c-checked) that
  covers the whole array, so a case is ~6 small files. Inside the shard, inner chunks are ``(1, cx, cy, cz)``:
  one channel per chunk, spatial extent from :func:`chunk_layout` (small: about a quarter to half of the
  patch per axis, 256 KiB of voxels by default) so that a patch read decodes little more than the patch; a 2D
  configuration's chunks are whole slices (``(1, 1, y, z)``) where the slice is at most 1.5x the patch per axis
  (a 2D sample's region covers most of such a slice; stores written before this rule had 256 KiB chunks there and
  read the same, the reader takes any chunking).
  Inner chunks are ``bytes`` (little endian) + ``blosc`` (LZ4HC level 3 by default, byte shuffle for the image
  unless a trial compression prefers none). Inner chunks equal to the fill value are not written (zarr's
  ``write_empty_chunks=False``), and the seg shard file is absent when the whole seg is -1.
* ``class_locations/<key>``: int32 arrays ``(n, 4)`` of voxel coordinates ``(0, x, y, z)`` (nnU-Net's layout:
  a leading channel coordinate), one chunk each. ``key`` is the label (``"3"``) or the region's labels
  joined by ``_`` (``"1_2_3"``; the ignore-label key ``(-1, 1, 2)`` becomes ``"-1_1_2"``). The group attribute
  ``keys`` maps each name back to its JSON key (an int or a list of ints), so the keys round-trip exactly.
* Root attribute ``nnfast`` (a dict): ``schema_version``, ``case_id``, ``config_hash`` (the caller's string that
  identifies the plan/configuration that produced the case), ``properties`` (the caller's JSON-able dict:
  spacing, geometry, bbox, shapes, ...), ``image``/``seg`` (shape, dtype, chunks, shards, codec) and
  ``complete: true``. This attribute is written after every array, inside a hidden temporary directory
  ``.<case_id>.zarr.tmp-<pid>-<rand>`` next to the target, which is then renamed onto ``<case_id>.zarr``. A
  crash therefore never leaves a store that looks finished; :func:`is_complete` is the resume test.

The store opens with plain ``zarr.open(path)`` (notebooks, napari). The hot path of training does not use
zarr-python: :class:`nnfast.io.store_reader.CaseReader` parses the metadata and the shard index itself and
decodes only the inner chunks a patch touches.

Defaults (LZ4HC level 3 + shuffle, 256 KiB inner chunks) were chosen with ``benchmarks/test_bench_patch_read.py``:
on a CT-like (1, 120, 300, 300) case with 56x192x192 boxes, :class:`~nnfast.io.store_reader.CaseReader` reads as
fast as nnU-Net v2.8.1's blosc2 path or faster (0.68-1.01x its time, depending on the machine) at 0.97x its bytes
(zarr-python: 3-6x); the table of variants is in that file's docstring. The write is the largest cost of ``nnfast
preprocess`` (``benchmarks/README.md``): level 3 compresses ~25 % faster than level 5 for +0.7 % bytes and the same
patch-read time (1.01x vs 1.00x nnU-Net's, one interleaved run); level 1 is 3x faster but 1.11x nnU-Net's bytes and
1.17x its read time, plain LZ4 1.12x the bytes; level 2 (re-measured 12-07 for issue 13 goal 2: 2.3-2.9x faster
to compress than level 3) is 1.09x nnU-Net's bytes and 1.16-1.21x its read time, so level 3 stays. The shards are
written by :class:`~nnfast.io.shard_writer.ShardWriter` and the metadata by :mod:`nnfast.io.zarr_json` (the bytes
zarr-python writes, without its pipeline; a preprocessing worker never imports zarr).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from ..errors import StoreError
from .atomic import temporary_sibling

__all__ = [
    "SCHEMA_VERSION",
    "STORE_SUFFIX",
    "DEFAULT_CNAME",
    "DEFAULT_CLEVEL",
    "DEFAULT_CHUNK_NBYTES",
    "DEFAULT_CHUNK_NBYTES_2D",
    "StoreLayout",
    "chunk_layout",
    "seg_dtype",
    "jsonable",
    "blosc_codec",
    "write_sharded",
    "write_one_shard",
    "open_one_shard",
    "install_store",
    "remove_tree",
    "store_path",
    "list_case_ids",
    "write_case",
    "central_sample",
    "choose_shuffle",
    "read_case_metadata",
    "is_complete",
    "load_case",
    "read_class_locations",
    "class_location_name",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STORE_SUFFIX = ".zarr"
DEFAULT_CNAME: Literal["lz4", "lz4hc", "zstd"] = "lz4hc"
DEFAULT_CLEVEL = 3
#: Byte cap of one inner chunk (logical, uncompressed). With 56x192x192 patches this gives (1, 16, 64, 64) for
#: float32 images and (1, 32, 128, 64) for int8 segs (see the table in the module docstring).
DEFAULT_CHUNK_NBYTES = 256 * 1024
#: Byte cap of one inner chunk of a 2D configuration's store, whose chunks are whole slices where the slice is at most
#: 1.5x the patch per axis (:func:`chunk_layout` with ``whole_slices``): a 2D sample reads a region of about the patch
#: or larger (rotation), so one decode of the slice beats 2x2 to 3x3 partial chunks around it.
DEFAULT_CHUNK_NBYTES_2D = 4 * 1024 * 1024
#: chunks never extend past this multiple of the patch per axis (nnU-Net v2.8's ``max_chunk_to_patch_ratio``)
_MAX_CHUNK_TO_PATCH = 1.5

Shuffle = Literal["auto", "shuffle", "noshuffle", "bitshuffle"]


@dataclass(frozen=True)
class StoreLayout:
    """Chunking of one stored array.

    Attributes
    ----------
    chunks : tuple of int
        Inner chunk shape ``(1, cx, cy, cz)``: the unit of compression and of partial reads.
    shards : tuple of int
        Shard shape ``(c, X, Y, Z)``: a multiple of ``chunks`` per axis covering the whole array, so the
        array is stored as one shard file.
    """

    chunks: tuple[int, ...]
    shards: tuple[int, ...]

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shards, self.chunks))


def _ceil_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _prev_pow2_below(n: int) -> int:
    return 1 if n <= 1 else 1 << ((n - 1).bit_length() - 1)


def chunk_layout(
    image_shape: Sequence[int],
    patch_size: Sequence[int],
    itemsize: int,
    *,
    max_chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
    whole_slices: bool = False,
) -> StoreLayout:
    """Inner chunk and shard shape for an array ``(c, x, y, z)`` read by patches of ``patch_size``.

    The rule is nnU-Net v2.8's *block* rule of ``comp_blosc2_params`` with a different byte cap: start per
    spatial axis from the next power of two of the patch (clamped to the image), then halve the axis that is
    largest relative to its target extent ``min(image, floor(1.5 * patch))`` (ties: the later axis) until the
    chunk holds at most ``max_chunk_nbytes``. The channel axis is always 1. In zarr the inner chunk is the
    decode unit (blosc2's 128 KiB blocks play that role in nnU-Net), so it stays small; the shard holds the
    whole array.

    Parameters
    ----------
    image_shape : sequence of 4 int
        ``(c, x, y, z)`` shape of the stored array.
    patch_size : sequence of 2 or 3 int
        Spatial patch size of the configuration. A 2D patch ``(py, pz)`` is read one slice of axis ``x`` at a
        time, so its chunks are ``(1, 1, cy, cz)``.
    itemsize : int
        Bytes per voxel (4 for float32 images, 1 or 2 for segs).
    max_chunk_nbytes : int, optional
        Cap on the uncompressed bytes of one inner chunk.
    whole_slices : bool, optional
        2D patches only: an in-plane axis at most ``floor(1.5 * patch)`` long starts from its whole extent instead
        of the patch's power of two (then the byte cap applies as above), so that with a cap that allows it a chunk
        is a whole slice. :func:`write_case` sets it, with :data:`DEFAULT_CHUNK_NBYTES_2D`, for 2D configurations:
        a 2D sample reads a region of about the patch or larger (rotation); on 320^2 slices with 256^2 patches one
        decode of the slice measured 1.6x faster per batch than the 2x2 chunks of 256^2 it otherwise touches
        (``benchmarks/README.md``, loader rows of 12-07). Without it the rule equals nnU-Net's (at a 128 KiB cap).

    Returns
    -------
    StoreLayout

    Raises
    ------
    StoreError
        If a shape is not 4D/positive, the patch is not 2D/3D/positive or ``itemsize`` is not positive.
    """
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 4 or any(s <= 0 for s in image_shape):
        raise StoreError(f"chunk_layout: image_shape must be 4 positive ints (c, x, y, z), got {image_shape}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) not in (2, 3) or any(p <= 0 for p in patch):
        raise StoreError(f"chunk_layout: patch_size must be 2 or 3 positive ints, got {tuple(patch_size)}")
    if int(itemsize) <= 0 or int(max_chunk_nbytes) <= 0:
        raise StoreError(f"chunk_layout: itemsize and max_chunk_nbytes must be positive, got {itemsize}, "
                         f"{max_chunk_nbytes}")
    is_2d = len(patch) == 2
    patch3 = (1, *patch) if is_2d else patch
    spatial = image_shape[1:]
    target = [max(1, min(s, math.floor(_MAX_CHUNK_TO_PATCH * p))) for s, p in zip(spatial, patch3)]
    chunk = [min(_ceil_pow2(p), s) for p, s in zip(patch3, spatial)]
    if is_2d:
        chunk[0] = 1
        if whole_slices:
            chunk[1:] = [s if s <= t else c for s, t, c in zip(spatial[1:], target[1:], chunk[1:])]
    budget = max(1, int(max_chunk_nbytes) // int(itemsize))
    while math.prod(chunk) > budget:
        axes = [ax for ax in range(3) if chunk[ax] > 1]
        if not axes:  # pragma: no cover - a single voxel always fits a positive budget
            break
        ax = max(axes, key=lambda a: (chunk[a] / target[a], a))
        chunk[ax] = _prev_pow2_below(chunk[ax])
    chunks = (1, *chunk)
    shards = (image_shape[0], *(-(-s // c) * c for s, c in zip(spatial, chunk)))
    return StoreLayout(chunks=chunks, shards=shards)


def store_path(folder: str | os.PathLike, case_id: str) -> Path:
    """``<folder>/<case_id>.zarr``: where a case's store lives."""
    return Path(folder) / f"{case_id}{STORE_SUFFIX}"


def list_case_ids(folder: str | os.PathLike) -> list[str]:
    """Sorted ids of the case stores in ``folder`` (complete or not; hidden temporaries are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p.name[: -len(STORE_SUFFIX)]
        for p in folder.iterdir()
        if p.name.endswith(STORE_SUFFIX) and not p.name.startswith(".") and p.is_dir()
    )


# ----------------------------------------------------------------------------------------------------------
# class location keys
# ----------------------------------------------------------------------------------------------------------

def class_location_name(key: int | Sequence[int] | str) -> str:
    """Array name of a class-locations key: ``3 -> "3"``, ``(1, 2, 3) -> "1_2_3"``, ``(-1, 1) -> "-1_1"``."""
    if isinstance(key, str):
        parts = key.split("_")
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise StoreError(f"class_locations key {key!r} is not a label or '_'-joined labels")
        return key
    if isinstance(key, (int, np.integer)):
        return str(int(key))
    try:
        labels = [int(k) for k in key]
    except TypeError as e:
        raise StoreError(f"class_locations key {key!r} must be an int label or a tuple of labels") from e
    if not labels:
        raise StoreError("class_locations key must not be an empty tuple")
    return "_".join(str(k) for k in labels)


def _json_key(key: int | Sequence[int] | str) -> int | list[int]:
    if isinstance(key, str):
        parts = [int(p) for p in key.split("_")]
        return parts[0] if len(parts) == 1 else parts
    if isinstance(key, (int, np.integer)):
        return int(key)
    return [int(k) for k in key]


def _restore_key(value: int | list[int]) -> int | tuple[int, ...]:
    return int(value) if isinstance(value, int) else tuple(int(v) for v in value)


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------

def jsonable(obj: Any, where: str) -> Any:
    """Convert numpy scalars/arrays and tuples to plain JSON types; reject anything else."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise StoreError(f"properties{where}: keys must be strings for JSON, got {k!r}")
            out[k] = jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise StoreError(f"properties{where}: {type(obj).__name__} is not JSON-able; store it as a list/number/string")


def seg_dtype(seg: np.ndarray) -> np.dtype:
    """The on-disk dtype of a segmentation: int8 when its values fit, else int16."""
    if seg.dtype == np.int8:
        return np.dtype(np.int8)
    if seg.size == 0:
        return np.dtype(np.int8)
    lo, hi = int(seg.min()), int(seg.max())
    if lo >= -128 and hi <= 127:
        return np.dtype(np.int8)
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    raise StoreError(f"seg values span [{lo}, {hi}]; labels must fit int16 (-1 marks outside the nonzero region)")


def central_sample(arr: np.ndarray, layout: StoreLayout) -> np.ndarray:
    """The central inner chunk of channel 0 of ``arr`` (c, x, y, z): the sample of the shuffle trial."""
    spatial = arr.shape[1:]
    slab = [min(c, s) for c, s in zip(layout.chunks[1:], spatial)]
    sl = tuple(slice((s - w) // 2, (s - w) // 2 + w) for s, w in zip(spatial, slab))
    return np.ascontiguousarray(arr[(0, *sl)])


def choose_shuffle(sample: np.ndarray, cname: str, clevel: int) -> str:
    """nnU-Net v2.8's filter trial: compress ``sample`` with and without byte shuffle and keep the smaller (resampled
    intensities favour shuffle, quantized ones not).

    One chunk (:func:`central_sample`), not the 2x2x2 chunks nnfast used to try: LZ4HC without shuffle is slow on
    float data, and the larger trial cost a third of writing a CT case while choosing the same filter on every case
    measured."""
    from numcodecs import Blosc

    sample = np.ascontiguousarray(sample)
    sizes = {}
    for name, flag in (("noshuffle", Blosc.NOSHUFFLE), ("shuffle", Blosc.SHUFFLE)):
        sizes[name] = len(Blosc(cname=cname, clevel=clevel, shuffle=flag).encode(sample))
    return "shuffle" if sizes["shuffle"] < sizes["noshuffle"] else "noshuffle"


def blosc_codec(cname: str, clevel: int, shuffle: str):
    """zarr v3's Blosc codec (``cname``, ``clevel``, ``shuffle`` as zarr names them)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle)


def write_sharded(group, name: str, arr: np.ndarray, layout: StoreLayout, fill_value, codec) -> None:
    """Write ``arr`` as array ``name`` of the zarr ``group`` with the chunks and shards of ``layout``.

    A one-shard 4D array with a Blosc codec is written by :func:`write_one_shard` (metadata and shard without
    zarr-python: the same files, ~2x faster and without a copy of the array), any other layout by zarr-python."""
    if _is_one_shard(arr.shape, layout):
        write_one_shard(Path(str(group.store.root), group.path), name, arr, layout, fill_value, codec.cname.value,
                        codec.clevel, codec.shuffle.value)
        return
    z = create_sharded(group, name, arr.shape, arr.dtype, layout, fill_value, codec)
    z[...] = arr  # the whole sharded array in one call (writing slabs would rewrite the shard)


def _is_one_shard(shape, layout: StoreLayout) -> bool:
    return len(shape) == 4 and tuple(layout.shards) == (shape[0], *(-(-s // c) * c for s, c in zip(shape[1:],
                                                                                                   layout.chunks[1:])))


def open_one_shard(folder: str | os.PathLike, name: str, shape, dtype, layout: StoreLayout, fill_value, cname: str,
                   clevel: int, shuffle: str):
    """Array ``name`` of the group at ``folder`` as ONE shard covering a ``(c, x, y, z)`` array: its ``zarr.json``
    written (:mod:`nnfast.io.zarr_json`, zarr-python's bytes) and a :class:`~nnfast.io.shard_writer.ShardWriter`
    for its data, to be closed (or aborted) by the caller."""
    from .shard_writer import ShardWriter
    from .zarr_json import write_sharded_array_json

    if not _is_one_shard(shape, layout):
        raise StoreError(f"{folder}/{name}: {layout} is not one shard covering an array of shape {tuple(shape)}")
    array_dir = Path(folder, name)
    write_sharded_array_json(array_dir, shape, dtype, layout.chunks, layout.shards, fill_value, cname, clevel,
                             shuffle)
    return ShardWriter(array_dir, shape, dtype, layout.chunks, fill_value, cname, clevel, shuffle)


def write_one_shard(folder: str | os.PathLike, name: str, arr: np.ndarray, layout: StoreLayout, fill_value,
                    cname: str, clevel: int, shuffle: str) -> None:
    """Write ``arr`` ``(c, x, y, z)`` as array ``name`` of the group at ``folder`` (:func:`open_one_shard`)."""
    w = open_one_shard(folder, name, arr.shape, arr.dtype, layout, fill_value, cname, clevel, shuffle)
    try:
        w.write_slab(arr)
        w.close()
    except BaseException:
        w.abort()
        raise


def create_sharded(group, name: str, shape, dtype, layout: StoreLayout, fill_value, codec):
    """Create (metadata only) array ``name`` of ``group`` with the chunks and shards of ``layout``."""
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=layout.chunks,
        shards=layout.shards,
        compressors=[codec],
        fill_value=fill_value,
        config={"write_empty_chunks": False},
    )


def sharded_writer(group, name: str, shape, dtype, layout: StoreLayout, fill_value, codec):
    """A :class:`~nnfast.io.shard_writer.ShardWriter` for array ``name`` of ``group`` (created by
    :func:`create_sharded`; one shard covering the array, one channel per inner chunk)."""
    from .shard_writer import ShardWriter

    return ShardWriter(Path(str(group.store.root), group.path, name), shape, dtype, layout.chunks, fill_value,
                       codec.cname.value, codec.clevel, codec.shuffle.value)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def install_store(tmp: Path, path: Path) -> None:
    """Move the complete store ``tmp`` onto ``path``; an existing ``path`` is removed only afterwards."""
    if not os.path.lexists(path):
        try:
            os.replace(tmp, path)
            return
        except OSError as e:  # someone created ``path`` meanwhile: fall through to the replacing path
            if not os.path.lexists(path):
                raise StoreError(f"could not rename {tmp} to {path}: {e}") from e
    if _rename_exchange(tmp, path):
        old = tmp  # now holds the previous store
    else:
        old = temporary_sibling(path)  # hidden ".<name>.tmp-*": cleaned up like any temporary if we crash
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
    remove_tree(old)


def remove_tree(p: Path) -> None:
    """Remove a store (folder) or file at ``p``, ignoring errors (cleanup of temporaries)."""
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def write_case(
    path: str | os.PathLike,
    image: np.ndarray,
    seg: np.ndarray,
    class_locations: Mapping[Any, Any] | None,
    properties: Mapping[str, Any],
    config_hash: str,
    patch_size: Sequence[int],
    *,
    case_id: str | None = None,
    cname: Literal["lz4", "lz4hc", "zstd"] = DEFAULT_CNAME,
    clevel: int = DEFAULT_CLEVEL,
    shuffle: Shuffle = "auto",
    max_chunk_nbytes: int | None = None,
    seg_max_chunk_nbytes: int | None = None,
) -> None:
    """Write one preprocessed case as a zarr v3 store at ``path`` (atomically; see the module docstring).

    Parameters
    ----------
    path : path-like
        Target directory, normally ``store_path(folder, case_id)``. An existing store there is replaced only
        once the new one is complete.
    image : ndarray, float32 (or float16), shape (c, x, y, z)
        Preprocessed image, nnU-Net axis order.
    seg : ndarray, integer, shape (1, x, y, z)
        Segmentation, -1 outside the nonzero region; stored as int8, or int16 when the values need it.
    class_locations : mapping or None
        ``{label or tuple of labels: array (n, 4)}`` of sampled voxel coordinates ``(0, x, y, z)``;
        empty lists allowed (nnU-Net's format).
    properties : mapping
        JSON-able per-case properties (numpy scalars/arrays and tuples are converted to JSON numbers/lists).
    config_hash : str
        Identifies the plan/configuration; :func:`is_complete` compares it.
    patch_size : sequence of 2 or 3 int
        The configuration's patch size; decides the chunking (:func:`chunk_layout`).
    case_id : str, optional
        Defaults to the name of ``path`` without ``.zarr``.
    cname, clevel : codec of the blosc compressor (LZ4HC level 3 by default).
    shuffle : {"auto", "shuffle", "noshuffle", "bitshuffle"}
        Image filter; ``"auto"`` trial-compresses a central slab both ways (nnU-Net v2.8's rule). The seg
        (one byte per voxel) always uses no shuffle.
    max_chunk_nbytes, seg_max_chunk_nbytes : int
        Inner-chunk byte caps for image and seg (seg defaults to the image's cap). Default: a 3D patch
        :data:`DEFAULT_CHUNK_NBYTES`; a 2D patch :data:`DEFAULT_CHUNK_NBYTES_2D` with whole-slice chunks
        (:func:`chunk_layout`'s ``whole_slices``).

    Raises
    ------
    StoreError
        On bad shapes/dtypes/keys/properties, or when the rename fails.
    """
    from .case_writer import CaseStoreWriter

    path = Path(path)
    image = np.asarray(image)
    seg = np.asarray(seg)
    if image.ndim != 4 or image.dtype not in (np.float32, np.float16):
        raise StoreError(f"{path}: image must be float32/float16 (c, x, y, z), got {image.dtype} {image.shape}")
    if seg.ndim != 4 or seg.shape[0] != 1 or seg.shape[1:] != image.shape[1:]:
        raise StoreError(f"{path}: seg must have shape (1, {', '.join(map(str, image.shape[1:]))}) like the "
                         f"image, got {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer):
        raise StoreError(f"{path}: seg must be an integer array, got {seg.dtype}")
    if min(image.shape) <= 0:
        raise StoreError(f"{path}: empty image {image.shape}")
    seg = seg.astype(seg_dtype(seg), copy=False)
    props = jsonable(dict(properties), "")  # before anything is written: a bad property fails first
    with CaseStoreWriter(path, config_hash, patch_size, case_id=case_id, cname=cname, clevel=clevel, shuffle=shuffle,
                         max_chunk_nbytes=max_chunk_nbytes, seg_max_chunk_nbytes=seg_max_chunk_nbytes) as w:
        w.write_seg(seg, class_locations)
        w.write_image(image)
        w.finish(props)


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------

def read_group_attrs(path: Path, what: str = "case store", missing: str = "run preprocessing for this case",
                     unreadable: str = "delete it and rerun preprocessing", *, schema_version: int | None = None,
                     redo: str = "rerun preprocessing") -> dict:
    """The ``nnfast`` attributes of the zarr v3 group at ``path``, read from its ``zarr.json`` (no zarr import); with
    ``schema_version``, only of a complete store of that schema.

    ``what`` names the kind of store in messages; ``missing`` / ``unreadable`` / ``redo`` say what to do.

    Raises
    ------
    StoreError
        No ``zarr.json``, an unreadable one, a group without ``nnfast`` attributes, or (with ``schema_version``) an
        incomplete store or one of another schema.
    """
    meta_file = path / "zarr.json"
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise StoreError(f"no {what} at {path} ({meta_file} is missing); {missing}") from e
    except (OSError, ValueError) as e:
        raise StoreError(f"{what} {path}: cannot read {meta_file}: {e}; {unreadable}") from e
    attrs = meta.get("attributes", {}).get("nnfast") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or not isinstance(attrs, dict):
        raise StoreError(f"{path} is not an nnfast {what} (no 'nnfast' attributes in {meta_file})")
    if schema_version is not None:
        if attrs.get("schema_version") != schema_version:
            raise StoreError(f"{what} {path} has schema_version {attrs.get('schema_version')!r}, this nnfast "
                             f"reads {schema_version}; {redo}")
        if attrs.get("complete") is not True:
            raise StoreError(f"{what} {path} is incomplete; {redo}")
    return attrs


def read_case_metadata(path: str | os.PathLike) -> dict:
    """The ``nnfast`` attributes of a complete case store (read as JSON, without zarr).

    Returns
    -------
    dict
        ``schema_version``, ``case_id``, ``config_hash``, ``properties``, ``patch_size``, ``image`` and ``seg``
        (each ``{"shape", "dtype", "chunks", "shards", "codec"}``) and ``complete``.

    Raises
    ------
    StoreError
        If there is no store at ``path``, it is not an nnfast store, is incomplete or has another schema.
    """
    return read_group_attrs(Path(path), schema_version=SCHEMA_VERSION)


def is_complete(path: str | os.PathLike, config_hash: str) -> bool:
    """True iff ``path`` holds a finished store of this schema written with ``config_hash`` (never raises
    for missing or damaged stores: those are simply not complete)."""
    path = Path(path)
    try:
        attrs = read_case_metadata(path)
    except StoreError:
        return False
    if attrs.get("config_hash") != config_hash:
        return False
    return (path / "image" / "zarr.json").is_file() and (path / "seg" / "zarr.json").is_file()


def read_class_locations(path: str | os.PathLike) -> dict[int | tuple[int, ...], np.ndarray]:
    """Class locations of a case store, keys restored to ints / tuples, values int64 ``(n, 4)`` arrays."""
    import zarr

    path = Path(path)
    read_case_metadata(path)
    group = zarr.open_group(str(path / "class_locations"), mode="r")
    keys = dict(group.attrs.get("keys", {}))
    out: dict[int | tuple[int, ...], np.ndarray] = {}
    for arr_name, json_key in keys.items():
        out[_restore_key(json_key)] = np.asarray(group[arr_name][...], dtype=np.int64).reshape(-1, 4)
    return out


def load_case(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Read a whole case with zarr-python.

    Returns
    -------
    image : ndarray float32 (c, x, y, z)
    seg : ndarray int8/int16 (1, x, y, z)
    properties : dict
        The caller's properties as written (tuples come back as lists).
    class_locations : dict
        ``{int or tuple: int64 (n, 4)}``.

    Raises
    ------
    StoreError
        If the store is missing, incomplete or of another schema.
    """
    import zarr

    path = Path(path)
    attrs = read_case_metadata(path)
    root = zarr.open_group(str(path), mode="r")
    image = root["image"][...]
    seg = root["seg"][...]
    return image, seg, attrs["properties"], read_class_locations(path)
