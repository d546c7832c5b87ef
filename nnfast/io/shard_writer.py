"""Writing one zarr v3 shard file directly: inner chunks encoded with Blosc and appended, index at the end.

The case store (:mod:`nnfast.io.store`) keeps each array as ONE shard (``sharding_indexed``, inner codecs
``bytes`` little endian + ``blosc``, index codecs ``bytes`` + ``crc32c``, index at the end). zarr-python writes such
a shard through its asyncio codec pipeline, which for a preprocessed CT case costs about twice the Blosc compression
itself, and holds the whole array plus the whole encoded shard in memory. :class:`ShardWriter` produces the same
file (the array metadata is still written by zarr-python, so ``zarr.open`` reads it): each inner chunk is copied into
a fill-padded buffer, skipped when it equals the fill value everywhere (zarr's ``write_empty_chunks=False``),
compressed by numcodecs' Blosc (the library zarr's ``BloscCodec`` calls, same ``typesize``/``blocksize``) and
appended to the file; the index of ``(offset, nbytes)`` pairs (``2**64 - 1`` twice for a chunk not stored) and its
crc32c follow when the writer is closed. A shard without any stored chunk is not written at all, as zarr does.

Slabs along one spatial axis (of ``(c, x, y, z)``), of all channels or of one, can be added one at a time and in any
order (:meth:`ShardWriter.write_slab`), so a caller that produces the array slab by slab never holds it whole
(:mod:`nnfast.preprocess.streaming` resamples a case's image straight into it); chunks may sit in the file in any order,
the index says where each one is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["ShardWriter", "shard_file"]

_MISSING = np.uint64(2**64 - 1)
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def shard_file(array_dir: str | os.PathLike, ndim: int) -> Path:
    """The file of the only shard of a one-shard array: ``<array_dir>/c/0/0/.../0`` (zarr v3 default key encoding)."""
    return Path(array_dir, "c", *(["0"] * ndim))


def _morton_order(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Chunk coordinates in the order zarr-python puts them in a shard (Morton order), so that a shard written in
    one piece is byte for byte zarr's; C order where that helper is not available."""
    try:
        from zarr.core.indexing import morton_order_iter
    except ImportError:  # pragma: no cover - zarr moved its helper: any order is a valid shard
        return [tuple(int(i) for i in c) for c in np.ndindex(*grid)]
    return [tuple(int(i) for i in c) for c in morton_order_iter(grid)]


class ShardWriter:
    """Write a one-shard zarr v3 array's chunk data to ``<array_dir>/c/0/0/0/0``, slab by slab along one axis.

    Parameters
    ----------
    array_dir : path-like
        Folder of the array (its ``zarr.json`` is written by the caller, e.g. zarr's ``create_array``).
    shape : tuple of 4 int
        ``(c, x, y, z)`` shape of the array.
    dtype : numpy dtype
    chunks : tuple of 4 int
        Inner chunk shape ``(1, cx, cy, cz)``.
    fill_value : scalar
        Chunks equal to it everywhere (edge padding included) are not stored.
    cname, clevel, shuffle : the Blosc settings of the array's metadata.
    """

    def __init__(self, array_dir: str | os.PathLike, shape: Sequence[int], dtype, chunks: Sequence[int], fill_value,
                 cname: str, clevel: int, shuffle: str):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = tuple(int(c) for c in chunks)
        if len(self.shape) != 4 or len(self.chunks) != 4 or self.chunks[0] != 1:
            raise ValueError(f"ShardWriter: shape and chunks must be (c, x, y, z) with one channel per chunk, got "
                             f"{self.shape} and {self.chunks}")
        self.grid = tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))
        self.fill = self.dtype.type(fill_value)
        self.cname, self.clevel, self.shuffle = cname, int(clevel), _SHUFFLE[shuffle]
        self.path = shard_file(array_dir, 4)
        self._index = np.full((int(np.prod(self.grid)), 2), _MISSING, dtype="<u8")
        self._buf = np.empty(self.chunks[1:], dtype=self.dtype)
        uint = np.dtype(f"u{self.dtype.itemsize}")
        self._bits = self._buf.view(uint)
        self._fill_bits = np.array(self.fill, dtype=self.dtype).view(uint)
        self._order = _morton_order(self.grid)
        self._file = None
        self._offset = 0
        self._next_x = 0
        self._axis: int | None = None
        self._done: np.ndarray | None = None

    def write_slab(self, slab: np.ndarray, *, axis: int = 1, start: int | None = None,
                   channel: int | None = None) -> None:
        """Add the rows ``[start, start + n)`` of spatial ``axis`` (1, 2 or 3 of ``(c, x, y, z)``).

        ``slab`` is ``(c, ...)`` with ``n`` rows along ``axis`` and the array's whole extent along the other spatial
        axes, or, with ``channel``, the 3D ``(x, y, z)`` part of that one channel. ``start`` defaults to where the
        previous slab ended; it must be a multiple of the chunk along ``axis`` and ``n`` too, except for the slab
        that reaches the end of the array. Slabs may come in any order; every slab of one writer is along the same
        axis (the index says where each chunk sits in the file, so the order only changes the file's layout).
        """
        if channel is not None:
            slab = slab[None]
        chans = range(self.shape[0]) if channel is None else range(int(channel), int(channel) + 1)
        if self._axis is None:
            self._axis = int(axis)
            self._done = np.zeros((self.shape[0], self.grid[self._axis]), bool)
        if axis != self._axis or axis not in (1, 2, 3):
            raise ValueError(f"ShardWriter: slabs must all be along one spatial axis (1, 2 or 3); got axis {axis} "
                             f"after axis {self._axis}")
        x0 = self._next_x if start is None else int(start)
        n = slab.shape[axis]
        want = list(self.shape)
        want[0], want[axis] = len(chans), n
        if tuple(slab.shape) != tuple(want) or chans.stop > self.shape[0] or x0 + n > self.shape[axis]:
            raise ValueError(f"ShardWriter: slab {slab.shape} at {x0} along axis {axis} does not fit array "
                             f"{self.shape}" + ("" if channel is None else f" (channel {channel})"))
        cx = self.chunks[axis]
        if x0 % cx or (n % cx and x0 + n != self.shape[axis]):
            raise ValueError(f"ShardWriter: slabs must cover whole chunks of {cx} rows (slab of {n} at x={x0})")
        from numcodecs import blosc

        _, gx, gy, gz = self.grid
        buf, bits = self._buf, self._bits
        typesize = self.dtype.itemsize
        cname = self.cname.encode()
        rows = range(x0 // cx, -(-(x0 + n) // cx))
        for coord in self._order:
            ch = coord[0]
            if ch not in chans or coord[axis] not in rows:
                continue
            lo = [coord[a] * self.chunks[a] for a in range(4)]
            lo[0], lo[axis] = ch - chans.start, lo[axis] - x0
            part = slab[lo[0], lo[1]:lo[1] + self.chunks[1], lo[2]:lo[2] + self.chunks[2],
                        lo[3]:lo[3] + self.chunks[3]]
            if part.shape == buf.shape:
                buf[...] = part
            else:
                buf.fill(self.fill)
                buf[:part.shape[0], :part.shape[1], :part.shape[2]] = part
            if (bits == self._fill_bits).all():  # bitwise, as zarr: -0.0 is stored under a fill of 0.0
                continue
            enc = blosc.compress(buf, cname, self.clevel, self.shuffle, 0, typesize)
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "wb")
            self._file.write(enc)
            _, ix, iy, iz = coord
            flat = ((ch * gx + ix) * gy + iy) * gz + iz
            self._index[flat] = (self._offset, len(enc))
            self._offset += len(enc)
        self._done[chans.start:chans.stop, rows.start:rows.stop] = True
        self._next_x = x0 + n

    def complete(self) -> bool:
        """True when every chunk of the array has been written (or skipped as fill)."""
        return self._done is not None and bool(self._done.all())

    def close(self) -> None:
        """Write the index and its crc32c; every row must have been written."""
        if not self.complete():
            axis = self._axis or 1
            rows = 0 if self._done is None else int(self._done.all(axis=0).sum()) * self.chunks[axis]
            raise ValueError(f"ShardWriter: {min(rows, self.shape[axis])} of {self.shape[axis]} rows written")
        if self._file is None:  # nothing stored: no shard file, as zarr
            return
        import google_crc32c

        raw = self._index.tobytes()
        self._file.write(raw)
        self._file.write(int(google_crc32c.value(raw)).to_bytes(4, "little"))
        self._file.close()
        self._file = None

    def abort(self) -> None:
        """Close the file without finishing it (the caller removes the temporary store)."""
        if self._file is not None:
            self._file.close()
            self._file = None
