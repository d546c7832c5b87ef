"""The zarr v3 nodes of a case store written without zarr-python: the same ``zarr.json`` bytes and chunk files.

A preprocessing worker writes a case store per case (:class:`nnfast.io.case_writer.CaseStoreWriter`). Going through
zarr-python for its six small metadata documents and class-location arrays cost ~0.3 s of CPU to import zarr in
every worker and ~40 ms per case in zarr's asyncio machinery (measured on a 24-case CT set, ``benchmarks/README.md``):
more than resampling the label map. This module writes exactly what zarr-python 3.1 writes for the nodes nnfast
uses (``json.dumps(..., indent=2)`` of the same keys in the same order; chunk bytes through numcodecs' Blosc, the
library zarr's ``BloscCodec`` calls, with the same ``typesize`` and ``blocksize``), so stores open with
``zarr.open`` as before and ``tests/io/test_zarr_json.py`` compares every file byte for byte with zarr-python's.

Nodes: groups with attributes (:func:`write_group`), one-shard arrays whose shard
:class:`~nnfast.io.shard_writer.ShardWriter` writes (:func:`write_sharded_array_json`), and small one-chunk arrays
(:func:`write_single_chunk_array`, the class locations). :func:`morton_order` is zarr's order of the inner chunks in
a shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["ZARR_JSON", "write_group", "write_sharded_array_json", "write_single_chunk_array", "morton_order",
           "blosc_config"]

ZARR_JSON = "zarr.json"
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _dump(path: Path, doc: Mapping[str, Any]) -> None:
    """``doc`` as zarr-python 3.1 writes a node's metadata (``json.dumps(indent=2, allow_nan=True)``)."""
    path.write_bytes(json.dumps(doc, indent=2, allow_nan=True).encode())


def write_group(folder: str | os.PathLike, attributes: Mapping[str, Any] | None = None) -> None:
    """The ``zarr.json`` of a group at ``folder`` (created if missing) with JSON-able ``attributes``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _dump(folder / ZARR_JSON, {"attributes": dict(attributes or {}), "zarr_format": 3, "node_type": "group"})


def _bytes_codec(dtype: np.dtype) -> dict:
    return {"name": "bytes"} if dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}


def blosc_config(dtype, cname: str, clevel: int, shuffle: str) -> dict:
    """zarr's ``blosc`` codec entry for chunks of ``dtype``."""
    if shuffle not in _SHUFFLE:
        raise ValueError(f"blosc shuffle must be one of {sorted(_SHUFFLE)}, got {shuffle!r}")
    return {"name": "blosc", "configuration": {"typesize": int(np.dtype(dtype).itemsize), "cname": str(cname),
                                                "clevel": int(clevel), "shuffle": shuffle, "blocksize": 0}}


def _fill_json(dtype: np.dtype, fill_value) -> int | float:
    return float(fill_value) if dtype.kind == "f" else int(fill_value)


def _array_doc(shape: Sequence[int], dtype: np.dtype, grid_chunks: Sequence[int], fill_value, codecs: list) -> dict:
    return {
        "shape": [int(s) for s in shape],
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(c) for c in grid_chunks]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": _fill_json(dtype, fill_value),
        "codecs": codecs,
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def write_sharded_array_json(folder: str | os.PathLike, shape: Sequence[int], dtype, chunks: Sequence[int],
                             shards: Sequence[int], fill_value, cname: str, clevel: int, shuffle: str) -> None:
    """The ``zarr.json`` of a sharded array at ``folder``: shards of ``shards`` (here: one covering the array), inner
    chunks of ``chunks``, ``bytes`` + ``blosc`` inside, the index (``bytes`` + ``crc32c``) at the end of the shard,
    ``write_empty_chunks=False`` (not part of the metadata). The shard itself: :class:`~nnfast.io.shard_writer.
    ShardWriter`."""
    dtype = np.dtype(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sharding = {"name": "sharding_indexed", "configuration": {
        "chunk_shape": [int(c) for c in chunks],
        "codecs": [_bytes_codec(dtype), blosc_config(dtype, cname, clevel, shuffle)],
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        "index_location": "end",
    }}
    _dump(folder / ZARR_JSON, _array_doc(shape, dtype, shards, fill_value, [sharding]))


def write_single_chunk_array(folder: str | os.PathLike, arr: np.ndarray, fill_value, cname: str, clevel: int,
                             shuffle: str) -> None:
    """A small array stored as one chunk of ``max(1, n)`` along the first axis (the class locations: ``(n, 4)``
    int32), ``bytes`` + ``blosc``; like zarr, a chunk equal to the fill value everywhere (or an empty array) has
    no chunk file."""
    from numcodecs import blosc

    arr = np.ascontiguousarray(arr)
    dtype = arr.dtype
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunk_shape = [max(1, int(arr.shape[0])), *(int(s) for s in arr.shape[1:])]
    _dump(folder / ZARR_JSON, _array_doc(arr.shape, dtype, chunk_shape, fill_value,
                                         [_bytes_codec(dtype), blosc_config(dtype, cname, clevel, shuffle)]))
    if arr.size == 0:
        return
    uint = np.dtype(f"u{dtype.itemsize}")
    if (arr.view(uint) == np.array(fill_value, dtype=dtype).view(uint)).all():
        return
    data = arr.astype(dtype.newbyteorder("<"), copy=False)
    enc = blosc.compress(data, str(cname).encode(), int(clevel), _SHUFFLE[shuffle], 0, dtype.itemsize)
    target = folder.joinpath("c", *(["0"] * arr.ndim))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(enc)


def morton_order(grid: Sequence[int]) -> list[tuple[int, ...]]:
    """Every chunk coordinate of a shard's ``grid`` in zarr's order (Morton / Z-order: the coordinates' bits
    interleaved, a dimension dropping out once its bits are used up), so that a shard written in one piece is
    byte for byte zarr-python's."""
    grid = tuple(int(g) for g in grid)
    n = int(np.prod(grid))
    if n == 0:
        return []
    coords = np.stack([g.ravel() for g in np.meshgrid(*[np.arange(g, dtype=np.int64) for g in grid],
                                                         indexing="ij")], axis=1)
    bits = [(g - 1).bit_length() for g in grid]
    code = np.zeros(n, dtype=np.int64)
    out_bit = 0
    for bit in range(max(bits, default=0)):
        for dim, nbits in enumerate(bits):
            if bit < nbits:
                code |= ((coords[:, dim] >> bit) & 1) << out_bit
                out_bit += 1
    return [tuple(int(v) for v in row) for row in coords[np.argsort(code, kind="stable")]]
