"""Writing one case store piece by piece: the label map and class locations, then the image, box by box if wanted.

:func:`nnfast.io.store.write_case` writes a case held in memory through :class:`CaseStoreWriter`; streamed preprocessing
(:func:`nnfast.preprocess.pipeline.preprocess_case_to_store`) uses the same writer but hands the image over box by box
(:meth:`CaseStoreWriter.image_sink`) straight from the last resampling pass, so the whole float32 image never exists in
memory. Both produce the same store (format in :mod:`nnfast.io.store`, ``schema_version`` unchanged): the same
metadata, codecs and decoded arrays; only the order of the image's inner chunks inside its shard file may differ (the
shard index says where each one is).

The store is built in a hidden temporary sibling and renamed onto its path by :meth:`CaseStoreWriter.finish`; any
error before that removes the temporary (use the writer as a context manager).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from ..errors import StoreError
from .atomic import temporary_sibling
from .store import (DEFAULT_CHUNK_NBYTES, DEFAULT_CHUNK_NBYTES_2D, DEFAULT_CLEVEL, DEFAULT_CNAME, SCHEMA_VERSION,
                    STORE_SUFFIX, StoreLayout, _json_key, central_sample, choose_shuffle, chunk_layout, class_location_name,
                    install_store, jsonable, open_one_shard, remove_tree, seg_dtype)
from . import store as _store
from .zarr_json import write_group, write_single_chunk_array

__all__ = ["CaseStoreWriter", "BOX_BYTES"]

#: most bytes of one box of a streamed image (the resampler's last pass computes one box at a time; the boxes that
#: hold the shuffle trial's sample are held until it is complete)
BOX_BYTES = 8 * 2**20

logger = logging.getLogger(__name__)


def _array_info(shape, dtype, layout: StoreLayout, codec: str) -> dict:
    return {"shape": [int(s) for s in shape], "dtype": np.dtype(dtype).name, "chunks": list(layout.chunks),
            "shards": list(layout.shards), "codec": codec}


class CaseStoreWriter:
    """One case store under construction at ``path`` (see :func:`nnfast.io.store.write_case` for the parameters).

    Call :meth:`write_seg`, then :meth:`write_image` or :meth:`image_sink` (fed to the end), then :meth:`finish`.
    """

    def __init__(self, path: str | os.PathLike, config_hash: str, patch_size: Sequence[int], *,
                 case_id: str | None = None, cname: Literal["lz4", "lz4hc", "zstd"] = DEFAULT_CNAME,
                 clevel: int = DEFAULT_CLEVEL, shuffle: str = "auto", max_chunk_nbytes: int | None = None,
                 seg_max_chunk_nbytes: int | None = None):
        self.path = Path(path)
        name = self.path.name
        self.case_id = case_id if case_id is not None else (
            name[: -len(STORE_SUFFIX)] if name.endswith(STORE_SUFFIX) else name)
        if not isinstance(config_hash, str):
            raise StoreError(f"config_hash must be a str, got {type(config_hash).__name__}")
        self.config_hash = config_hash
        self.patch_size = [int(p) for p in patch_size]
        self.cname, self.clevel, self.shuffle = cname, int(clevel), shuffle
        # a 2D configuration's chunks are whole slices where the slice is at most 1.5x the patch (store docstring)
        self.whole_slices = len(self.patch_size) == 2
        if max_chunk_nbytes is None:
            max_chunk_nbytes = DEFAULT_CHUNK_NBYTES_2D if self.whole_slices else DEFAULT_CHUNK_NBYTES
        self.max_chunk_nbytes = max_chunk_nbytes
        self.seg_max_chunk_nbytes = seg_max_chunk_nbytes or max_chunk_nbytes
        self._seg_info: dict | None = None
        self._image_info: dict | None = None
        self._sink: _ImageSink | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_sibling(self.path)
        try:
            self.tmp.mkdir()  # its zarr.json (the group and its attributes) is written last, by finish()
        except BaseException:
            remove_tree(self.tmp)
            raise

    def __enter__(self) -> "CaseStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        """Remove the unfinished store."""
        if self._sink is not None:
            self._sink.abort()
        remove_tree(self.tmp)

    def write_seg(self, seg: np.ndarray, class_locations: Mapping[Any, Any] | None) -> None:
        """The label map ``(1, x, y, z)`` (int8, or int16 when the values need it) and the class locations."""
        seg = np.asarray(seg)
        if seg.ndim != 4 or seg.shape[0] != 1 or not np.issubdtype(seg.dtype, np.integer):
            raise StoreError(f"{self.path}: seg must be an integer (1, x, y, z) array, got {seg.dtype} {seg.shape}")
        locations: dict[str, np.ndarray] = {}
        keys: dict[str, int | list[int]] = {}
        for key, locs in (class_locations or {}).items():
            arr_name = class_location_name(key)
            a = np.asarray(locs, dtype=np.int64)
            if a.size == 0:
                a = a.reshape(0, 4)
            if a.ndim != 2 or a.shape[1] != 4:
                raise StoreError(f"{self.path}: class_locations[{key!r}] must be (n, 4) (0, x, y, z) coordinates, "
                                 f"got shape {a.shape}")
            if arr_name in locations:
                raise StoreError(f"{self.path}: class_locations keys collide on name {arr_name!r}")
            locations[arr_name] = a.astype(np.int32)
            keys[arr_name] = _json_key(key)
        seg = seg.astype(seg_dtype(seg), copy=False)
        layout = chunk_layout(seg.shape, self.patch_size, seg.itemsize, max_chunk_nbytes=self.seg_max_chunk_nbytes,
                              whole_slices=self.whole_slices)
        _store.write_one_shard(self.tmp, "seg", np.ascontiguousarray(seg), layout, -1, self.cname, self.clevel,
                               "noshuffle")
        write_group(self.tmp / "class_locations", {"keys": keys})
        for arr_name, a in locations.items():
            write_single_chunk_array(self.tmp / "class_locations" / arr_name, a, 0, "lz4", 5, "shuffle")
        self._seg_info = _array_info(seg.shape, seg.dtype, layout, f"blosc-{self.cname}-{self.clevel}-noshuffle")

    def _image_layout(self, shape, dtype) -> StoreLayout:
        return chunk_layout(shape, self.patch_size, np.dtype(dtype).itemsize, max_chunk_nbytes=self.max_chunk_nbytes,
                            whole_slices=self.whole_slices)

    def write_image(self, image: np.ndarray) -> None:
        """The whole image ``(c, x, y, z)`` (float32 or float16) at once."""
        layout = self._image_layout(image.shape, image.dtype)
        shuffle = choose_shuffle(central_sample(image, layout), self.cname, self.clevel) \
            if self.shuffle == "auto" else self.shuffle
        _store.write_one_shard(self.tmp, "image", np.ascontiguousarray(image), layout, 0.0, self.cname, self.clevel,
                               shuffle)
        self._image_info = _array_info(image.shape, image.dtype, layout,
                                       f"blosc-{self.cname}-{self.clevel}-{shuffle}")

    def image_sink(self, shape: Sequence[int], check: Callable[[], None] | None = None) -> "_ImageSink":
        """A sink for a float32 image of ``shape`` ``(c, x, y, z)`` produced box by box (see
        :func:`nnfast.native.resample.resize_image_consuming`): ``boxes(channel, axis, shape)`` gives the chunk-aligned
        boxes to produce, in order (for channel 0 the ones holding the shuffle trial's sample first), and
        ``put(channel, origin, box)`` compresses and appends a box. Every box must be put before :meth:`finish`.
        ``check``: called before each box is taken; what it raises abandons the store (e.g. a stopping command)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or min(shape) <= 0:
            raise StoreError(f"{self.path}: image must be a non-empty (c, x, y, z) array, got shape {shape}")
        self._sink = _ImageSink(self, shape, self._image_layout(shape, np.float32), check)
        return self._sink

    def finish(self, properties: Mapping[str, Any]) -> None:
        """Write the attributes that say "complete" and rename the store onto its path."""
        props = jsonable(dict(properties), "")
        try:
            if self._sink is not None:
                self._image_info = self._sink.close()
            if self._seg_info is None or self._image_info is None:
                raise StoreError(f"{self.path}: a case store needs its seg and its image before it is finished")
            if self._seg_info["shape"][1:] != self._image_info["shape"][1:]:
                raise StoreError(f"{self.path}: seg must have shape (1, {', '.join(map(str, self._image_info['shape'][1:]))}) "
                                 f"like the image, got {tuple(self._seg_info['shape'])}")
            write_group(self.tmp, {"nnfast": {
                "schema_version": SCHEMA_VERSION,
                "case_id": self.case_id,
                "config_hash": self.config_hash,
                "properties": props,
                "patch_size": self.patch_size,
                "image": self._image_info,
                "seg": self._seg_info,
                "complete": True,
            }})
            install_store(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        logger.debug("wrote case store %s (image %s chunks %s, seg %s)", self.path, self._image_info["shape"],
                     self._image_info["chunks"], self._seg_info["dtype"])


class _ImageSink:
    """Receives an image box by box; holds back channel 0's first boxes until the shuffle trial's sample (the
    central inner chunk, :func:`nnfast.io.store.central_sample`) is complete, then writes through a
    :class:`~nnfast.io.shard_writer.ShardWriter`."""

    def __init__(self, owner: CaseStoreWriter, shape: tuple[int, ...], layout: StoreLayout,
                 check: Callable[[], None] | None = None):
        self.owner, self.shape, self.layout, self.check = owner, shape, layout, check
        self.shuffle = None if owner.shuffle == "auto" else owner.shuffle
        spatial = shape[1:]
        self.sample_box = [((s - w) // 2, (s - w) // 2 + w)
                           for s, w in zip(spatial, (min(c, s) for c, s in zip(layout.chunks[1:], spatial)))]
        self.pending: list[tuple[int, tuple[int, ...], np.ndarray]] = []
        self.needed: set = set()
        self.writer = None
        if self.shuffle is not None:
            self._open()

    def _open(self) -> None:
        assert self.shuffle is not None
        self.writer = open_one_shard(self.owner.tmp, "image", self.shape, np.float32, self.layout, 0.0,
                                     self.owner.cname, self.owner.clevel, self.shuffle)

    def boxes(self, channel: int, axis: int, shape: Sequence[int]) -> list[tuple[tuple[int, int], ...]]:
        """Chunk-aligned boxes tiling ``shape`` (x, y, z), each spanning ``axis`` whole and one inner chunk along the
        first other axis, as many chunks along the second as fit in :data:`BOX_BYTES`; for channel 0 before the
        shuffle is chosen, the boxes that hold its sample first."""
        shape = [int(s) for s in shape]
        others = [a for a in range(3) if a != axis]
        steps = {a: self.layout.chunks[1 + a] for a in others}
        per_chunk = 4 * shape[axis] * steps[others[0]] * steps[others[1]]
        steps[others[1]] *= max(1, min(-(-shape[others[1]] // steps[others[1]]), BOX_BYTES // max(1, per_chunk)))
        ranges = {a: [(s, min(shape[a], s + steps[a])) for s in range(0, shape[a], steps[a])] for a in others}
        boxes = []
        for r0 in ranges[others[0]]:
            for r1 in ranges[others[1]]:
                box = [(0, shape[axis])] * 3
                box[others[0]], box[others[1]] = r0, r1
                boxes.append(tuple(box))
        if channel == 0 and self.writer is None:
            first = [b for b in boxes if all(r[0] < hi and r[1] > lo for r, (lo, hi) in zip(b, self.sample_box))]
            self.needed = set(first)
            boxes = first + [b for b in boxes if b not in self.needed]
        return boxes

    def put(self, channel: int, origin: Sequence[int], block: np.ndarray) -> None:
        if self.check is not None:
            self.check()
        if self.writer is not None:
            self.writer.write_box(block, origin, channel)
            return
        self.pending.append((channel, tuple(origin), block))
        if channel != 0:
            return
        self.needed.discard(tuple((o, o + n) for o, n in zip(origin, block.shape)))
        if self.needed:
            return
        box = self.sample_box
        sample = np.empty([hi - lo for lo, hi in box], np.float32)
        for ch, org, part in self.pending:
            inter = [(max(lo, o), min(hi, o + n)) for (lo, hi), o, n in zip(box, org, part.shape)]
            if ch != 0 or any(a >= b for a, b in inter):
                continue
            sample[tuple(slice(a - lo, b - lo) for (a, b), (lo, _hi) in zip(inter, box))] = \
                part[tuple(slice(a - o, b - o) for (a, b), o in zip(inter, org))]
        self.shuffle = choose_shuffle(sample, self.owner.cname, self.owner.clevel)
        self._open()
        pending, self.pending = self.pending, []
        for ch, org, part in pending:
            self.writer.write_box(part, org, ch)

    def close(self) -> dict:
        if self.writer is None or self.pending:
            raise StoreError(f"{self.owner.path}: the image was not produced to the end")
        self.writer.close()
        return _array_info(self.shape, np.float32, self.layout,
                           f"blosc-{self.owner.cname}-{self.owner.clevel}-{self.shuffle}")

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
