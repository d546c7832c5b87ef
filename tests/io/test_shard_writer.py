"""The direct shard writer against zarr-python: the same bytes in one piece, the same array slab by slab."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from nnfast.io import store as S
from nnfast.io.shard_writer import ShardWriter, shard_file
from nnfast.io.store_reader import open_array


def _arrays():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 11, 23, 17)).astype(np.float32)
    a[:, :5] = 0  # chunks equal to the fill value are not stored
    a[1, -1, :3] = -0.0  # bitwise different from the fill 0.0: stored, as zarr does
    seg = (a > 0.5).astype(np.int8) - (a == 0).astype(np.int8)
    zeros = np.zeros((1, 3, 5, 7), np.float32)  # nothing stored: no shard file
    return [(a, 0.0, "shuffle"), (seg[:1], -1, "noshuffle"), (zeros, 0.0, "shuffle"),
            (np.full((1, 4, 4, 4), -1, np.int16), -1, "noshuffle")]


@pytest.mark.parametrize("case", range(4))
def test_shard_bytes_equal_zarr_python(tmp_path, case):
    arr, fill, shuffle = _arrays()[case]
    layout = S.chunk_layout(arr.shape, (8, 16, 16), arr.itemsize)
    codec = S.blosc_codec("lz4hc", 5, shuffle)
    ref = zarr.open_group(str(tmp_path / "ref"), mode="w-", zarr_format=3)
    S.create_sharded(ref, "x", arr.shape, arr.dtype, layout, fill, codec)[...] = arr
    ours = zarr.open_group(str(tmp_path / "ours"), mode="w-", zarr_format=3)
    S.write_sharded(ours, "x", arr, layout, fill, codec)
    f_ref, f_ours = shard_file(tmp_path / "ref" / "x", 4), shard_file(tmp_path / "ours" / "x", 4)
    assert f_ref.exists() == f_ours.exists()
    if f_ref.exists():
        assert f_ours.read_bytes() == f_ref.read_bytes()
    back = zarr.open_group(str(tmp_path / "ours"), mode="r")["x"][...]
    np.testing.assert_array_equal(back.view(f"u{arr.itemsize}"), arr.view(f"u{arr.itemsize}"))


def test_slab_by_slab_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(2, 37, 20, 9)).astype(np.float32)
    layout = S.chunk_layout(arr.shape, (8, 16, 16), 4)
    cx = layout.chunks[1]
    codec = S.blosc_codec("lz4hc", 5, "shuffle")
    g = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    S.create_sharded(g, "x", arr.shape, arr.dtype, layout, 0.0, codec)
    w = S.sharded_writer(g, "x", arr.shape, arr.dtype, layout, 0.0, codec)
    with pytest.raises(ValueError, match="whole chunks"):
        w.write_slab(arr[:, :cx + 1])
    for x0 in range(0, arr.shape[1], 2 * cx):
        w.write_slab(arr[:, x0:x0 + 2 * cx])
    w.close()
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path), mode="r")["x"][...], arr)
    out = np.empty((2, 10, 20, 9), np.float32)
    reader = open_array(tmp_path / "x", force_zarr=False)
    reader.read_into((0, 20, 0, 0), (2, 30, 20, 9), out)
    np.testing.assert_array_equal(out, arr[:, 20:30])


def test_unfinished_writer_refuses_to_close(tmp_path):
    w = ShardWriter(tmp_path / "x", (1, 8, 4, 4), np.float32, (1, 4, 4, 4), 0.0, "lz4", 5, "shuffle")
    w.write_slab(np.ones((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="4 of 8 rows"):
        w.close()
    w.abort()


def test_boxes_in_any_order_read_back(tmp_path):
    """Chunk-aligned boxes of one channel at a time, in a shuffled order (streamed preprocessing writes them so)."""
    rng = np.random.default_rng(2)
    arr = rng.normal(size=(2, 21, 30, 19)).astype(np.float32)
    arr[1, :8] = 0  # fill chunks are skipped box by box too
    layout = S.chunk_layout(arr.shape, (8, 16, 16), 4)
    _, cx, cy, cz = layout.chunks
    codec = S.blosc_codec("lz4hc", 3, "shuffle")
    g = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    S.create_sharded(g, "x", arr.shape, arr.dtype, layout, 0.0, codec)
    w = S.sharded_writer(g, "x", arr.shape, arr.dtype, layout, 0.0, codec)
    with pytest.raises(ValueError, match="whole chunks"):
        w.write_box(arr[0, :cx, 1:cy + 1], (0, 1, 0), 0)
    boxes = [(c, x, y) for c in range(2) for x in range(0, 21, cx) for y in range(0, 30, 2 * cy)]
    for i in rng.permutation(len(boxes)):
        c, x, y = boxes[i]
        assert not w.complete()
        w.write_box(arr[c, x:x + cx, y:y + 2 * cy], (x, y, 0), c)
    assert w.complete()
    w.close()
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path), mode="r")["x"][...], arr)
