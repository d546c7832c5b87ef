"""CaseReader returns exactly what zarr-python returns (padded like nnU-Net's crop_and_pad_nd) for any box."""
from __future__ import annotations

import multiprocessing
import pickle
import shutil

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.errors import StoreError
from nnfast.io.store import store_path, write_case
from nnfast.io.store_reader import CaseReader

SHAPE = (13, 37, 29)


def reference(path, name, bbox, pad, channels=None):
    """Slow and obvious: read the in-bounds part with zarr-python, then np.pad to the box."""
    arr = zarr.open(str(path), mode="r")[name]
    shape = arr.shape[1:]
    lo = [min(max(lb, 0), s) for (lb, _ub), s in zip(bbox, shape)]
    hi = [max(min(ub, s), l) for (_lb, ub), s, l in zip(bbox, shape, lo)]
    data = arr[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]
    if channels is not None:
        data = data[list(channels)]
    if data.size == 0:
        return np.full((data.shape[0], *(ub - lb for lb, ub in bbox)), pad, dtype=arr.dtype)
    widths = [(0, 0)] + [(a - lb, ub - b) for (lb, ub), a, b in zip(bbox, lo, hi)]
    return np.pad(data, widths, constant_values=pad)


def make(tmp, name, channels=2, seg_dtype=np.int8, patch=(8, 16, 16), seed=0, all_bg=False, **kw):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(channels, *SHAPE)).astype(np.float32)
    image[:, :4, :20] = 0  # whole inner chunks equal to the fill value: not stored
    high = 200 if seg_dtype == np.int16 else 4
    seg = rng.integers(0, high, size=(1, *SHAPE)).astype(seg_dtype)
    seg[:, :, :9] = -1
    if all_bg:
        seg[...] = -1
    kw.setdefault("max_chunk_nbytes", 2048)
    path = store_path(tmp, name)
    write_case(path, image, seg, {1: np.argwhere(seg == 1)[:10]}, {"spacing": [3.0, 1.0, 1.0]}, "h", patch, **kw)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reader")
    return {
        "multichannel_int8": make(tmp, "a", channels=3),
        "int16_seg": make(tmp, "b", channels=1, seg_dtype=np.int16, seed=1),
        "2d_layout": make(tmp, "c", channels=2, patch=(16, 16), seed=2),
        "empty_seg": make(tmp, "d", channels=1, all_bg=True, seed=3),
        "one_chunk": make(tmp, "e", channels=1, max_chunk_nbytes=1 << 20, seed=4),
        "uncompressed_shuffle": make(tmp, "f", channels=1, seed=5, shuffle="noshuffle", cname="lz4", clevel=0),
    }


def random_box(rng, size=None, margin=12):
    box = []
    for s in SHAPE:
        if size is None:
            lb = int(rng.integers(-margin, s + margin))
            ub = lb + int(rng.integers(1, s + margin))
        else:
            lb = int(rng.integers(-margin, s + margin - 1))
            ub = lb + size
        box.append([lb, ub])
    return box


def check(reader, path, bbox, channels=None, **kw):
    img, seg = reader.read(bbox, channels=channels, **kw)
    np.testing.assert_array_equal(img, reference(path, "image", bbox, 0, channels))
    np.testing.assert_array_equal(seg, reference(path, "seg", bbox, -1))
    return img, seg


@pytest.mark.parametrize("name", ["multichannel_int8", "int16_seg", "2d_layout", "empty_seg", "one_chunk",
                                  "uncompressed_shuffle"])
def test_random_boxes_equal_zarr(stores, name):
    path = stores[name]
    reader = CaseReader(path)
    assert not reader.uses_zarr_fallback
    rng = np.random.default_rng(42)
    for _ in range(40):
        img, seg = check(reader, path, random_box(rng))
        assert img.dtype == np.float32
        assert seg.dtype == (np.int16 if name == "int16_seg" else np.int8)


def test_2d_slices(stores):
    path = stores["2d_layout"]
    reader = CaseReader(path)
    meta_chunks = reader.metadata["image"]["chunks"]
    assert meta_chunks[1] == 1  # one slice per chunk along the first spatial axis
    for x in (-1, 0, 5, SHAPE[0] - 1, SHAPE[0]):
        img, _ = check(reader, path, [[x, x + 1], [-3, 30], [2, 29]])
        assert img.shape == (2, 1, 33, 27)


def test_box_equal_to_the_array_and_fully_outside(stores):
    path = stores["multichannel_int8"]
    reader = CaseReader(path)
    img, seg = check(reader, path, [[0, s] for s in SHAPE])
    np.testing.assert_array_equal(img, zarr.open(str(path))["image"][:])
    img, seg = check(reader, path, [[-20, -5], [0, 4], [0, 4]])
    assert (img == 0).all() and (seg == -1).all()
    img, seg = check(reader, path, [[0, 4], [SHAPE[1], SHAPE[1] + 3], [0, 4]])
    assert (seg == -1).all()


def test_channel_selection(stores):
    path = stores["multichannel_int8"]
    reader = CaseReader(path)
    rng = np.random.default_rng(7)
    for channels in ([2], [0, 2], [2, 0, 1], [1, 1]):
        img, _ = check(reader, path, random_box(rng), channels=channels)
        assert img.shape[0] == len(channels)
    with pytest.raises(StoreError, match="channels"):
        reader.read([[0, 2]] * 3, channels=[3])


def test_reuses_output_buffers(stores):
    path = stores["multichannel_int8"]
    reader = CaseReader(path)
    out_img = np.full((3, 10, 10, 10), 7, np.float32)
    out_seg = np.full((1, 10, 10, 10), 7, np.int16)  # int16 like nnU-Net's loader, from an int8 store
    rng = np.random.default_rng(3)
    for _ in range(10):
        bbox = random_box(rng, size=10)
        img, seg = reader.read(bbox, out_img, out_seg)
        assert img is out_img and seg is out_seg
        np.testing.assert_array_equal(img, reference(path, "image", bbox, 0))
        np.testing.assert_array_equal(seg, reference(path, "seg", bbox, -1))
    # a view into a batch buffer works too
    batch = np.zeros((2, 3, 10, 10, 10), np.float32)
    reader.read([[0, 10]] * 3, batch[1], seg=False)
    np.testing.assert_array_equal(batch[1], reference(path, "image", [[0, 10]] * 3, 0))
    assert (batch[0] == 0).all()


def _flipped(a, flip):
    return np.flip(a, axis=tuple(d + 1 for d, f in enumerate(flip) if f))


@pytest.mark.parametrize("name", ["multichannel_int8", "int16_seg", "2d_layout", "empty_seg", "one_chunk",
                                  "uncompressed_shuffle"])
@pytest.mark.parametrize("force_zarr", [False, True])
def test_mirrored_reads_equal_the_flipped_box(stores, name, force_zarr):
    """``flip`` writes the box mirrored, padding included: into C-contiguous buffers (the chunk-copy kernel, with a
    cast from int8 labels to int16), into non-contiguous views (numpy's copy), through zarr-python, channels picked."""
    path = stores[name]
    reader = CaseReader(path, force_zarr=force_zarr)
    n_ch = reader.num_channels
    rng = np.random.default_rng(11)
    for i in range(24):
        bbox = random_box(rng)
        box = tuple(ub - lb for lb, ub in bbox)
        flip = tuple(bool(v) for v in rng.integers(0, 2, 3))
        if i % 3 == 0:
            flip = (True, True, True)
        channels = [n_ch - 1, 0] if i % 4 == 1 else None
        ref_img = _flipped(reference(path, "image", bbox, 0, channels), flip)
        ref_seg = _flipped(reference(path, "seg", bbox, -1), flip)
        img, seg = reader.read(bbox, channels=channels, flip=flip)
        np.testing.assert_array_equal(img, ref_img)
        np.testing.assert_array_equal(seg, ref_seg)
        out_img = np.full((len(channels or range(n_ch)), *box), 7, np.float32)
        out_seg = np.full((1, *box), 7, np.int16)
        reader.read(bbox, out_img, out_seg, channels=channels, flip=flip)
        np.testing.assert_array_equal(out_img, ref_img)
        np.testing.assert_array_equal(out_seg, ref_seg)
        # views with gaps between rows: not C-contiguous, numpy copies them
        big_img = np.full((out_img.shape[0], *box[:2], box[2] + 3), 7, np.float32)
        big_seg = np.full((1, *box[:2], box[2] + 3), 7, np.int16)
        reader.read(bbox, big_img[..., 1:-2], big_seg[..., 1:-2], channels=channels, flip=flip)
        np.testing.assert_array_equal(big_img[..., 1:-2], ref_img)
        np.testing.assert_array_equal(big_seg[..., 1:-2], ref_seg)
        assert (big_img[..., :1] == 7).all() and (big_seg[..., -2:] == 7).all()
    with pytest.raises(StoreError, match="flip"):
        reader.read([[0, 4]] * 3, flip=(True, False))


def test_mirrored_reads_other_layouts(tmp_path, stores):
    """Unsharded and uncompressed stores take the generic path: mirrored reads there too."""
    for k, layout in enumerate([dict(chunks=(1, 4, 8, 8), compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=3)),
                                dict(chunks=(1, 4, 8, 8), shards=(2, 8, 16, 16), compressors=None)]):
        path = tmp_path / f"copy{k}.zarr"
        shutil.copytree(stores["multichannel_int8"], path)
        _rewrite_image(path, **layout)
        reader = CaseReader(path)
        assert not reader.uses_zarr_fallback
        rng = np.random.default_rng(12)
        for _ in range(10):
            bbox = random_box(rng)
            flip = tuple(bool(v) for v in rng.integers(0, 2, 3))
            img, seg = reader.read(bbox, flip=flip)
            np.testing.assert_array_equal(img, _flipped(reference(path, "image", bbox, 0), flip))
            np.testing.assert_array_equal(seg, _flipped(reference(path, "seg", bbox, -1), flip))


def test_bad_buffers_and_boxes(stores):
    reader = CaseReader(stores["multichannel_int8"])
    with pytest.raises(StoreError, match="shape"):
        reader.read([[0, 4]] * 3, out_image=np.empty((3, 4, 4, 5), np.float32))
    with pytest.raises(StoreError, match="dtype"):
        reader.read([[0, 4]] * 3, out_image=np.empty((3, 4, 4, 4), np.int32))
    with pytest.raises(StoreError, match="out_seg"):
        reader.read([[0, 4]] * 3, out_seg=np.empty((1, 4, 4, 4), np.uint8))
    with pytest.raises(StoreError, match="pairs"):
        reader.read([[0, 4]] * 2)
    with pytest.raises(StoreError, match="upper bound"):
        reader.read([[0, 4], [5, 4], [0, 4]])


def test_seg_false_skips_seg(stores):
    reader = CaseReader(stores["int16_seg"])
    img, seg = reader.read([[1, 5]] * 3, seg=False)
    assert seg is None and img.shape == (1, 4, 4, 4)


def test_metadata_properties(stores):
    reader = CaseReader(stores["multichannel_int8"])
    assert reader.shape == SHAPE and reader.num_channels == 3
    assert reader.image_dtype == np.float32 and reader.seg_dtype == np.int8
    assert reader.properties == {"spacing": [3.0, 1.0, 1.0]}
    assert set(reader.class_locations()) == {1}
    assert "a.zarr" in repr(reader)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_property_any_box_matches_zarr(stores, data):
    path = stores["multichannel_int8"]
    reader = CaseReader(path)
    bbox = []
    for s in SHAPE:
        lb = data.draw(st.integers(-2 * s, 2 * s))
        ub = data.draw(st.integers(lb, lb + 2 * s))
        bbox.append([lb, ub])
    img, seg = reader.read(bbox)
    assert img.shape == (3, *(ub - lb for lb, ub in bbox))
    np.testing.assert_array_equal(img, reference(path, "image", bbox, 0))
    np.testing.assert_array_equal(seg, reference(path, "seg", bbox, -1))


@pytest.mark.compat
def test_matches_nnunet_crop_and_pad_nd(stores):
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    path = stores["multichannel_int8"]
    image, seg = (zarr.open(str(path))[k][:] for k in ("image", "seg"))
    reader = CaseReader(path)
    rng = np.random.default_rng(11)
    for _ in range(30):
        # boxes overlap the array, as nnU-Net samples them (for a box entirely outside, crop_and_pad_nd
        # returns zeros even for the seg; we pad it with -1 like every other outside voxel)
        bbox = [[lb, lb + 9] for lb in (int(rng.integers(-8, s)) for s in SHAPE)]
        img, sg = reader.read(bbox, out_seg=np.empty((1, 9, 9, 9), np.int16))
        np.testing.assert_array_equal(img, crop_and_pad_nd(image, bbox, 0))
        np.testing.assert_array_equal(sg, crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16))


# ------------------------------------------------------------------------------------------------------
# other layouts: lean generic path and zarr-python fallback
# ------------------------------------------------------------------------------------------------------

def _rewrite_image(path, **create_kwargs):
    root = zarr.open_group(str(path), mode="r+")
    data = root["image"][:]
    del root["image"]
    arr = root.create_array("image", shape=data.shape, dtype=data.dtype, fill_value=0, **create_kwargs)
    arr[...] = data


@pytest.mark.parametrize("layout, fallback", [
    (dict(chunks=(1, 4, 8, 8)), False),  # unsharded blosc: lean, one file per chunk
    (dict(chunks=(1, 4, 8, 8), shards=(2, 8, 16, 16), compressors=None), False),  # several shards, raw bytes
    (dict(chunks=(1, 5, 8, 8), compressors=zarr.codecs.ZstdCodec()), True),  # zstd: zarr-python
    (dict(chunks=(2, 4, 8, 8), filters=[zarr.codecs.TransposeCodec(order=(0, 3, 2, 1))]), True),
])
def test_other_layouts(tmp_path, stores, layout, fallback):
    path = tmp_path / "copy.zarr"
    shutil.copytree(stores["multichannel_int8"], path)
    if "compressors" not in layout:
        layout["compressors"] = zarr.codecs.BloscCodec(cname="lz4", clevel=3)
    _rewrite_image(path, **layout)
    reader = CaseReader(path)
    assert reader.uses_zarr_fallback is fallback
    rng = np.random.default_rng(5)
    for _ in range(15):
        check(reader, path, random_box(rng))
    check(reader, path, random_box(rng), channels=[2, 0])


def test_numcodecs_decode_path_equals_direct_path(stores, monkeypatch):
    """Without c-blosc's exported ``blosc_decompress_ctx`` the reader decodes through numcodecs: same bytes."""
    import nnfast.io.store_reader as store_reader

    assert store_reader._BLOSC_DECOMPRESS_CTX is not None  # the fast path is what the other tests exercised
    assert store_reader._decompress_ctx() is not None  # loaded on first use, not at import
    monkeypatch.setattr(store_reader, "_BLOSC_DECOMPRESS_CTX", None)
    path = stores["multichannel_int8"]
    reader = CaseReader(path)
    rng = np.random.default_rng(8)
    for _ in range(10):
        check(reader, path, random_box(rng))


def test_force_zarr(stores):
    path = stores["int16_seg"]
    reader = CaseReader(path, force_zarr=True)
    assert reader.uses_zarr_fallback
    rng = np.random.default_rng(9)
    for _ in range(10):
        check(reader, path, random_box(rng))


def test_damaged_shard_index_is_reported(tmp_path, stores):
    path = tmp_path / "damaged.zarr"
    shutil.copytree(stores["multichannel_int8"], path)
    shard = path / "image" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="crc32c"):
        CaseReader(path).open()


def test_damaged_chunk_is_reported(tmp_path, stores):
    path = tmp_path / "damaged.zarr"
    shutil.copytree(stores["one_chunk"], path)
    shard = path / "image" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0x01  # the blosc header's uncompressed size of the first chunk
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="damaged"):
        CaseReader(path).read([[0, 4]] * 3)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no case store"):
        CaseReader(tmp_path / "nope.zarr").read([[0, 1]] * 3)


# ------------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------------

def test_pickles_as_path_only(stores):
    path = stores["multichannel_int8"]
    reader = CaseReader(path).open()
    state = reader.__getstate__()
    assert state == {"path": str(path), "force_zarr": False}
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._image is None  # reopens lazily
    check(clone, path, [[-2, 6], [30, 40], [3, 9]])
    reader.close()
    check(reader, path, [[-2, 6], [30, 40], [3, 9]])  # reopens after close


_FORK_READER = None


def _read_in_child(bbox):
    img, seg = _FORK_READER.read(bbox)
    return img.copy(), seg.copy()


def test_fork_safe(stores):
    global _FORK_READER
    path = stores["multichannel_int8"]
    _FORK_READER = CaseReader(path)
    _FORK_READER.read([[0, 5]] * 3)  # opened and used in the parent before forking
    rng = np.random.default_rng(17)
    boxes = [random_box(rng) for _ in range(6)]
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(_read_in_child, boxes)
    finally:
        _FORK_READER = None
    for bbox, (img, seg) in zip(boxes, results):
        np.testing.assert_array_equal(img, reference(path, "image", bbox, 0))
        np.testing.assert_array_equal(seg, reference(path, "seg", bbox, -1))


def test_blosc_library_is_loaded_on_first_use_not_at_import():
    import subprocess
    import sys

    code = ("import nnfast.io.store_reader as r\n"
            "assert r._BLOSC_DECOMPRESS_CTX is r._UNLOADED\n"
            "ctx = r._decompress_ctx()\n"
            "assert ctx is not r._UNLOADED and r._decompress_ctx() is ctx\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
