"""Tests of the zarr v3 case store: layout rule, round trips, atomic replacement and completeness checks."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.errors import StoreError
from nnfast.io import store as store_mod
from nnfast.io.store import (
    SCHEMA_VERSION,
    chunk_layout,
    class_location_name,
    is_complete,
    list_case_ids,
    load_case,
    read_case_metadata,
    read_class_locations,
    store_path,
    write_case,
)


def make_case(shape=(2, 11, 23, 17), seed=0, seg_max=3, seg_dtype=np.int8):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    image[:, :3] = 0  # a slab of zeros: inner chunks equal to the fill value are not stored
    seg = rng.integers(0, seg_max + 1, size=(1, *shape[1:])).astype(seg_dtype)
    seg[:, :, :4] = -1
    locs = {1: np.argwhere(seg == 1)[:7], (1, 2): np.argwhere(seg >= 1)[:5], 3: []}
    return image, seg, locs


def write(path, image, seg, locs=None, props=None, h="hash-a", patch=(8, 16, 16), **kw):
    kw.setdefault("max_chunk_nbytes", 1024)  # tiny chunks so that small test arrays span many
    write_case(path, image, seg, locs if locs is not None else {}, props or {"spacing": [1.0, 2.0, 3.0]}, h,
               patch, **kw)


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# ------------------------------------------------------------------------------------------------------
# chunk_layout
# ------------------------------------------------------------------------------------------------------

def test_chunk_layout_3d_fullres_default():
    lay = chunk_layout((1, 120, 300, 300), (56, 192, 192), 4)
    assert lay.chunks == (1, 16, 64, 64)
    assert lay.shards == (1, 128, 320, 320)
    assert lay.chunks_per_shard == (1, 8, 5, 5)


def test_chunk_layout_multichannel_and_seg():
    lay = chunk_layout((4, 120, 300, 300), (56, 192, 192), 1)
    assert lay.chunks[0] == 1 and lay.shards[0] == 4
    assert math.prod(lay.chunks) <= 256 * 1024
    assert lay.chunks == (1, 32, 128, 64)


def test_chunk_layout_2d_reads_single_slices():
    lay = chunk_layout((1, 120, 512, 512), (512, 512), 4)
    assert lay.chunks == (1, 1, 256, 256)
    assert lay.shards == (1, 120, 512, 512)


def test_chunk_layout_2d_whole_slices():
    # slices at most 1.5x the patch become one chunk when the cap allows; larger ones keep the patch's power of two
    assert chunk_layout((1, 40, 320, 320), (256, 256), 4, max_chunk_nbytes=4 << 20, whole_slices=True).chunks == \
        (1, 1, 320, 320)
    assert chunk_layout((1, 40, 320, 700), (256, 256), 4, max_chunk_nbytes=4 << 20, whole_slices=True).chunks == \
        (1, 1, 320, 256)
    # the byte cap still holds, and without the flag (or for 3D patches) the rule is unchanged
    assert math.prod(chunk_layout((1, 40, 320, 320), (256, 256), 4, whole_slices=True).chunks) * 4 <= 256 * 1024
    assert chunk_layout((1, 40, 320, 320), (256, 256), 4, max_chunk_nbytes=4 << 20).chunks == (1, 1, 256, 256)
    assert chunk_layout((1, 120, 300, 300), (56, 192, 192), 4, whole_slices=True).chunks == (1, 16, 64, 64)


def test_write_case_2d_store_has_whole_slice_chunks(tmp_path):
    """A 2D configuration's store (default caps) decodes one chunk per slice read; 3D keeps small chunks."""
    from nnfast.io.store_reader import CaseReader

    image, seg, locs = make_case(shape=(1, 5, 40, 36))
    path2d, path3d = store_path(tmp_path, "a"), store_path(tmp_path, "b")
    write_case(path2d, image, seg, locs, {}, "h", (32, 32))
    write_case(path3d, image, seg, locs, {}, "h", (4, 8, 8))
    assert read_case_metadata(path2d)["image"]["chunks"] == [1, 1, 40, 36]
    assert read_case_metadata(path2d)["seg"]["chunks"] == [1, 1, 40, 36]
    assert read_case_metadata(path3d)["image"]["chunks"] == [1, 4, 8, 8]
    with CaseReader(path2d) as r:
        img, sg = r.read([[4, 5], [-3, 30], [5, 41]])
    np.testing.assert_array_equal(img[:, :, 3:, :31], image[:, 4:5, :30, 5:])
    assert np.abs(image[:, 4]).sum() > 0
    assert (img[:, :, :3] == 0).all() and (sg[:, :, :3] == -1).all() and (sg[:, :, :, 31:] == -1).all()
    np.testing.assert_array_equal(sg[:, :, 3:, :31], seg[:, 4:5, :30, 5:])


def test_chunk_layout_image_smaller_than_patch():
    lay = chunk_layout((1, 36, 50, 35), (40, 56, 40), 4)
    assert all(c <= s for c, s in zip(lay.chunks[1:], (36, 50, 35)))
    assert all(s % c == 0 for s, c in zip(lay.shards, lay.chunks))


@pytest.mark.parametrize("bad", [
    dict(image_shape=(120, 300, 300), patch_size=(5, 5, 5), itemsize=4),
    dict(image_shape=(1, 0, 3, 3), patch_size=(5, 5, 5), itemsize=4),
    dict(image_shape=(1, 3, 3, 3), patch_size=(5,), itemsize=4),
    dict(image_shape=(1, 3, 3, 3), patch_size=(5, 0, 5), itemsize=4),
    dict(image_shape=(1, 3, 3, 3), patch_size=(5, 5, 5), itemsize=0),
])
def test_chunk_layout_rejects_bad_arguments(bad):
    with pytest.raises(StoreError):
        chunk_layout(**bad)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 700), st.integers(1, 700), st.integers(1, 700))
patches = st.one_of(st.tuples(st.integers(1, 300), st.integers(1, 300), st.integers(1, 300)),
                    st.tuples(st.integers(1, 1024), st.integers(1, 1024)))


@settings(max_examples=200, deadline=None)
@given(shape=shapes, patch=patches, itemsize=st.sampled_from([1, 2, 4]),
       cap=st.sampled_from([4096, 128 * 1024, 256 * 1024, 1 << 20]))
def test_chunk_layout_invariants(shape, patch, itemsize, cap):
    lay = chunk_layout(shape, patch, itemsize, max_chunk_nbytes=cap)
    assert lay.chunks[0] == 1 and lay.shards[0] == shape[0]
    assert math.prod(lay.chunks) * itemsize <= max(cap, itemsize)
    for c, s, sh in zip(lay.chunks[1:], shape[1:], lay.shards[1:]):
        assert 1 <= c <= s
        assert sh % c == 0 and sh >= s and sh - c < s  # one shard covers the array, no empty chunk row
    if len(patch) == 2:
        assert lay.chunks[1] == 1


@pytest.mark.compat
@settings(max_examples=150, deadline=None)
@given(shape=shapes, patch=patches, itemsize=st.sampled_from([1, 2, 4]))
def test_chunk_layout_at_128k_equals_nnunet_block_rule(shape, patch, itemsize):
    """With a 128 KiB cap our inner chunk is exactly nnU-Net v2.8's blosc2 block."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    blocks, _ = comp_blosc2_params(shape, patch, itemsize)
    assert chunk_layout(shape, patch, itemsize, max_chunk_nbytes=128 * 1024).chunks == tuple(blocks)


# ------------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------------

def test_round_trip_and_metadata(tmp_path):
    image, seg, locs = make_case()
    path = store_path(tmp_path, "case_007")
    props = {"spacing": (1.0, np.float64(0.5), 0.5), "bbox": np.array([[0, 5], [1, 9]]), "n": np.int64(3),
             "nested": {"shape_before_cropping": [11, 23, 17]}}
    write(path, image, seg, locs, props, h="cfg-1")
    img2, seg2, props2, locs2 = load_case(path)
    np.testing.assert_array_equal(img2, image)
    np.testing.assert_array_equal(seg2, seg)
    assert img2.dtype == np.float32 and seg2.dtype == np.int8
    assert props2 == {"spacing": [1.0, 0.5, 0.5], "bbox": [[0, 5], [1, 9]], "n": 3,
                      "nested": {"shape_before_cropping": [11, 23, 17]}}
    assert set(locs2) == {1, (1, 2), 3}
    np.testing.assert_array_equal(locs2[1], locs[1])
    np.testing.assert_array_equal(locs2[(1, 2)], locs[(1, 2)])
    assert locs2[3].shape == (0, 4) and locs2[1].dtype == np.int64
    meta = read_case_metadata(path)
    assert meta["schema_version"] == SCHEMA_VERSION and meta["case_id"] == "case_007"
    assert meta["config_hash"] == "cfg-1" and meta["complete"] is True
    assert meta["image"]["shape"] == list(image.shape) and meta["seg"]["dtype"] == "int8"
    assert meta["image"]["chunks"][0] == 1
    assert siblings(path) == []


def test_plain_zarr_open_reads_equal_arrays(tmp_path):
    image, seg, locs = make_case()
    path = store_path(tmp_path, "c")
    write(path, image, seg, locs)
    root = zarr.open(str(path), mode="r")
    np.testing.assert_array_equal(root["image"][:], image)
    np.testing.assert_array_equal(root["seg"][:], seg)
    np.testing.assert_array_equal(root["class_locations"]["1_2"][:], locs[(1, 2)])
    assert root.attrs["nnfast"]["complete"] is True
    # one shard file per array
    shard_files = [f for _r, _d, fs in os.walk(path / "image") for f in fs if f != "zarr.json"]
    assert len(shard_files) == 1


def test_seg_dtype_follows_labels(tmp_path):
    image, seg, _ = make_case()
    seg16 = seg.astype(np.int16)
    write(tmp_path / "a.zarr", image, seg16)  # values fit int8: stored as int8
    assert load_case(tmp_path / "a.zarr")[1].dtype == np.int8
    seg16[0, 5, 5, 5] = 300
    write(tmp_path / "b.zarr", image, seg16)
    out = load_case(tmp_path / "b.zarr")[1]
    assert out.dtype == np.int16 and out[0, 5, 5, 5] == 300
    np.testing.assert_array_equal(out, seg16)
    with pytest.raises(StoreError, match="int16"):
        write(tmp_path / "c.zarr", image, seg16.astype(np.int32) * 200)


def test_all_background_seg_and_zero_image(tmp_path):
    image = np.zeros((1, 9, 10, 11), np.float32)
    seg = np.full((1, 9, 10, 11), -1, np.int8)
    write(tmp_path / "e.zarr", image, seg)
    img2, seg2, _, locs = load_case(tmp_path / "e.zarr")
    np.testing.assert_array_equal(img2, image)
    np.testing.assert_array_equal(seg2, seg)
    assert locs == {}


@pytest.mark.parametrize("cname", ["lz4", "lz4hc", "zstd"])
@pytest.mark.parametrize("shuffle", ["auto", "noshuffle", "bitshuffle"])
def test_codecs_round_trip(tmp_path, cname, shuffle):
    image, seg, _ = make_case(seed=3)
    write(tmp_path / "x.zarr", image, seg, cname=cname, shuffle=shuffle)
    np.testing.assert_array_equal(load_case(tmp_path / "x.zarr")[0], image)
    assert read_case_metadata(tmp_path / "x.zarr")["image"]["codec"].startswith(f"blosc-{cname}-")


def test_class_location_names():
    assert class_location_name(3) == "3"
    assert class_location_name(np.int16(3)) == "3"
    assert class_location_name((1, 2, 3)) == "1_2_3"
    assert class_location_name((-1, 1, 2)) == "-1_1_2"
    assert class_location_name("1_2") == "1_2"
    with pytest.raises(StoreError):
        class_location_name("liver")
    with pytest.raises(StoreError):
        class_location_name(())


def test_string_keys_round_trip_to_ints_and_tuples(tmp_path):
    image, seg, _ = make_case()
    locs = {"2": np.zeros((2, 4), np.int64), "1_2": np.ones((1, 4), np.int64), "-1_1_2_3": []}
    write(tmp_path / "k.zarr", image, seg, locs)
    assert set(read_class_locations(tmp_path / "k.zarr")) == {2, (1, 2), (-1, 1, 2, 3)}


@pytest.mark.parametrize("kind", ["image_ndim", "image_dtype", "seg_shape", "seg_float", "hash", "props",
                                  "locs_shape", "locs_collide"])
def test_bad_inputs_raise_store_error(tmp_path, kind):
    image, seg, locs = make_case()
    kwargs = dict(locs=locs, props=None, h="h")
    if kind == "image_ndim":
        image = image[0]
    elif kind == "image_dtype":
        image = image.astype(np.float64)
    elif kind == "seg_shape":
        seg = seg[:, :-1]
    elif kind == "seg_float":
        seg = seg.astype(np.float32)
    elif kind == "hash":
        kwargs["h"] = 123
    elif kind == "props":
        kwargs["props"] = {"obj": object()}
    elif kind == "locs_shape":
        kwargs["locs"] = {1: np.zeros((3, 3))}
    elif kind == "locs_collide":
        kwargs["locs"] = {1: [], "1": []}
    with pytest.raises(StoreError):
        write(tmp_path / "bad.zarr", image, seg, kwargs["locs"], kwargs["props"], kwargs["h"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------
# atomicity
# ------------------------------------------------------------------------------------------------------

def _fail_on(monkeypatch, name, exc=RuntimeError):
    real = store_mod.write_one_shard

    def failing(folder, arr_name, *args, **kwargs):
        if arr_name == name:
            raise exc("injected failure while writing " + arr_name)
        return real(folder, arr_name, *args, **kwargs)

    monkeypatch.setattr(store_mod, "write_one_shard", failing)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    image, seg, locs = make_case()
    path = store_path(tmp_path, "c")
    _fail_on(monkeypatch, "seg", exc)
    with pytest.raises(exc):
        write(path, image, seg, locs)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_rewrite_keeps_the_old_store(tmp_path, monkeypatch):
    image, seg, locs = make_case(seed=1)
    path = store_path(tmp_path, "c")
    write(path, image, seg, locs, h="old")
    _fail_on(monkeypatch, "seg")
    with pytest.raises(RuntimeError):
        write(path, image + 1, seg, locs, h="new")
    assert is_complete(path, "old")
    np.testing.assert_array_equal(load_case(path)[0], image)
    assert siblings(path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_rewrite_replaces_complete_store(tmp_path, monkeypatch, exchange):
    image, seg, locs = make_case(seed=2)
    path = store_path(tmp_path, "c")
    write(path, image, seg, locs, h="old")
    if not exchange:
        monkeypatch.setattr(store_mod, "_rename_exchange", lambda a, b: False)
    write(path, image * 2, seg, {}, h="new")
    assert is_complete(path, "new") and not is_complete(path, "old")
    np.testing.assert_array_equal(load_case(path)[0], image * 2)
    assert load_case(path)[3] == {}
    assert siblings(path) == []


def test_second_rename_failure_restores_old_store(tmp_path, monkeypatch):
    image, seg, locs = make_case(seed=2)
    path = store_path(tmp_path, "c")
    write(path, image, seg, locs, h="old")
    monkeypatch.setattr(store_mod, "_rename_exchange", lambda a, b: False)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new store in
            raise OSError("injected rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        write(path, image * 3, seg, locs, h="new")
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert is_complete(path, "old")
    assert siblings(path) == []


# ------------------------------------------------------------------------------------------------------
# completeness / metadata
# ------------------------------------------------------------------------------------------------------

def _edit_root_attrs(path, **changes):
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["nnfast"].update(changes)
    meta_file.write_text(json.dumps(meta))


def test_is_complete_semantics(tmp_path):
    image, seg, locs = make_case()
    path = store_path(tmp_path, "c")
    assert not is_complete(path, "h")
    write(path, image, seg, locs, h="h")
    assert is_complete(path, "h")
    assert not is_complete(path, "other")
    _edit_root_attrs(path, complete=False)
    assert not is_complete(path, "h")
    with pytest.raises(StoreError, match="incomplete"):
        read_case_metadata(path)
    _edit_root_attrs(path, complete=True, schema_version=SCHEMA_VERSION + 1)
    assert not is_complete(path, "h")
    with pytest.raises(StoreError, match="schema_version"):
        load_case(path)
    (path / "zarr.json").write_text("{not json")
    assert not is_complete(path, "h")


def test_is_complete_needs_the_arrays(tmp_path):
    image, seg, locs = make_case()
    path = store_path(tmp_path, "c")
    write(path, image, seg, locs, h="h")
    os.remove(path / "seg" / "zarr.json")
    assert not is_complete(path, "h")


def test_read_case_metadata_errors(tmp_path):
    with pytest.raises(StoreError, match="no case store"):
        read_case_metadata(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an nnfast case store"):
        read_case_metadata(tmp_path / "plain.zarr")


def test_list_case_ids_ignores_temporaries(tmp_path):
    image, seg, _ = make_case()
    for cid in ("b", "a"):
        write(store_path(tmp_path, cid), image, seg)
    (tmp_path / ".c.zarr.tmp-1-abc").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert list_case_ids(tmp_path) == ["a", "b"]
    assert list_case_ids(tmp_path / "nope") == []
