"""Writing one zarr v3 shard file directly: inner chunks encoded with Blosc and appended, index at the end.

The case store (:mod:`nnfast.io.store`) keeps each array as ONE shard (``sharding_indexed``, inner codecs
``bytes`` little endian + ``blosc``, index codecs ``bytes`` + ``crc32c``, index at the end). zarr-python writes such
a shard through its asyncio codec pipeline, which for a preprocessed CT case costs about twice the Blosc compression
itself, and holds the whole array plus the whole encoded shard in memory. :class:`ShardWriter` produces the same
file (the array metadata is written beside it by :mod:`nnfast.io.zarr_json`, zarr-python's bytes, so ``zarr.open`` reads it): each inner chunk is copied into
a fill-padded buffer, skipped when it equals the fill value everywhere (zarr's ``write_empty_chunks=False``),
compressed by numcodecs' Blosc (the library zarr's ``BloscCodec`` calls, same ``typesize``/``blocksize``) and
appended to the file; the index of ``(offset, nbytes)`` pairs (``2**64 - 1`` twice for a chunk not stored) and its
crc32c follow when the writer is closed. A shard without any stored chunk is not written at all, as zarr does.

Slabs along one spatial axis (of ``(c, x, y, z)``) or chunk-aligned 3D boxes of one channel can be added one at a time
and in any order (:meth:`ShardWriter.write_slab`, :meth:`ShardWriter.write_box`), so a caller that produces the array
piece by piece never holds it whole (streamed preprocessing resamples a case's image straight into it:
:func:`nnfast.preprocess.pipeline.preprocess_case_to_store`); chunks may sit in the file in any order, the index says
where each one is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .zarr_json import morton_order

__all__ = ["ShardWriter", "shard_file"]

_MISSING = np.uint64(2**64 - 1)
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def shard_file(array_dir: str | os.PathLike, ndim: int) -> Path:
    """The file of the only shard of a one-shard array: ``<array_dir>/c/0/0/.../0`` (zarr v3 default key encoding)."""
    return Path(array_dir, "c", *(["0"] * ndim))


class ShardWriter:
    """Write a one-shard zarr v3 array's chunk data to ``<array_dir>/c/0/0/0/0``, slab by slab along one axis.

    Parameters
    ----------
    array_dir : path-like
        Folder of the array (its ``zarr.json`` is written by the caller: :func:`nnfast.io.store.open_one_shard`).
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
        self._order = morton_order(self.grid)
        self._file = None
        self._offset = 0
        self._next_x = 0
        self._done = np.zeros(self.grid, bool)

    def write_slab(self, slab: np.ndarray, *, axis: int = 1, start: int | None = None,
                   channel: int | None = None) -> None:
        """Add the rows ``[start, start + n)`` of spatial ``axis`` (1, 2 or 3 of ``(c, x, y, z)``).

        ``slab`` is ``(c, ...)`` with ``n`` rows along ``axis`` and the array's whole extent along the other spatial
        axes, or, with ``channel``, the 3D ``(x, y, z)`` part of that one channel. ``start`` defaults to where the
        previous slab ended; it must be a multiple of the chunk along ``axis`` and ``n`` too, except for the slab
        that reaches the end of the array. Slabs (and boxes, :meth:`write_box`) may come in any order.
        """
        if axis not in (1, 2, 3):
            raise ValueError(f"ShardWriter: slabs are along a spatial axis (1, 2 or 3); got axis {axis}")
        x0 = self._next_x if start is None else int(start)
        origin = [0, 0, 0]
        origin[axis - 1] = x0
        n = slab.shape[axis if channel is None else axis - 1]
        if x0 % self.chunks[axis] or (n % self.chunks[axis] and x0 + n != self.shape[axis]):
            raise ValueError(f"ShardWriter: slabs must cover whole chunks of {self.chunks[axis]} rows (slab of {n} "
                             f"at x={x0})")
        want = list(self.shape)
        want[axis] = n
        if channel is None:
            if tuple(slab.shape) != tuple(want):
                raise ValueError(f"ShardWriter: slab {slab.shape} at {x0} along axis {axis} does not fit array "
                                 f"{self.shape}")
            self.write_box(slab, origin)
        else:
            if tuple(slab.shape) != tuple(want[1:]):
                raise ValueError(f"ShardWriter: slab {slab.shape} of channel {channel} at {x0} along axis {axis} "
                                 f"does not fit array {self.shape}")
            self.write_box(slab, origin, channel)
        self._next_x = x0 + n

    def write_box(self, box: np.ndarray, origin: Sequence[int], channel: int | None = None) -> None:
        """Add the 3D block ``box`` of channel ``channel`` whose first voxel is at spatial ``origin`` (x, y, z), or
        with ``channel`` None the 4D block ``box`` of every channel (chunks in zarr's order across channels too).

        The block must cover whole inner chunks: ``origin`` a multiple of the chunk per axis, and the block's extent
        too except where it reaches the end of the array. Blocks may come in any order (the index says where each
        chunk sits in the file, so the order only changes the file's layout); every chunk once.
        """
        origin = [int(o) for o in origin]
        if channel is None:
            if box.ndim != 4 or box.shape[0] != self.shape[0]:
                raise ValueError(f"ShardWriter: a box of every channel is (c, x, y, z) with c = {self.shape[0]}; got "
                                 f"shape {box.shape}")
            chans = range(self.shape[0])
        else:
            chans = range(int(channel), int(channel) + 1)
            if box.ndim != 3 or not 0 <= int(channel) < self.shape[0]:
                raise ValueError(f"ShardWriter: a box of one channel is a 3D block; got shape {box.shape}, channel "
                                 f"{channel}")
            box = box[None]
        if len(origin) != 3:
            raise ValueError(f"ShardWriter: origin must be (x, y, z); got {tuple(origin)}")
        lo_c, hi_c = [], []
        for ax in range(3):
            o, n, c, s = origin[ax], box.shape[1 + ax], self.chunks[1 + ax], self.shape[1 + ax]
            if o < 0 or o + n > s or o % c or (n % c and o + n != s):
                raise ValueError(f"ShardWriter: box {box.shape} at {tuple(origin)} must cover whole chunks "
                                 f"{self.chunks[1:]} of array {self.shape}")
            lo_c.append(o // c)
            hi_c.append(-(-(o + n) // c))
        from numcodecs import blosc

        _, cx, cy, cz = self.chunks
        _, gx, gy, gz = self.grid
        buf, bits = self._buf, self._bits
        typesize = self.dtype.itemsize
        cname = self.cname.encode()
        for ch, ix, iy, iz in self._order:
            if ch not in chans or not (lo_c[0] <= ix < hi_c[0] and lo_c[1] <= iy < hi_c[1] and lo_c[2] <= iz < hi_c[2]):
                continue
            x0, y0, z0 = ix * cx - origin[0], iy * cy - origin[1], iz * cz - origin[2]
            part = box[ch - chans.start, x0:x0 + cx, y0:y0 + cy, z0:z0 + cz]
            if part.shape == buf.shape:
                buf[...] = part
            else:
                buf.fill(self.fill)
                buf[:part.shape[0], :part.shape[1], :part.shape[2]] = part
            self._done[ch, ix, iy, iz] = True
            if (bits == self._fill_bits).all():  # bitwise, as zarr: -0.0 is stored under a fill of 0.0
                continue
            enc = blosc.compress(buf, cname, self.clevel, self.shuffle, 0, typesize)
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "wb")
            self._file.write(enc)
            flat = ((ch * gx + ix) * gy + iy) * gz + iz
            self._index[flat] = (self._offset, len(enc))
            self._offset += len(enc)

    def complete(self) -> bool:
        """True when every chunk of the array has been written (or skipped as fill)."""
        return bool(self._done.all())

    def close(self) -> None:
        """Write the index and its crc32c; every row must have been written."""
        if not self.complete():
            rows = int(self._done.all(axis=(0, 2, 3)).sum()) * self.chunks[1]
            raise ValueError(f"ShardWriter: {min(rows, self.shape[1])} of {self.shape[1]} rows (x) written, or not "
                             f"every chunk of them")
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
