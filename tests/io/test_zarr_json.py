"""Case stores written without zarr-python against the same store written by zarr-python: every file byte for byte."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec
from zarr.core.indexing import morton_order_iter

from nnfast.io.store import load_case, write_case
from nnfast.io.zarr_json import morton_order


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _zarr_python_copy(ours: Path, ref: Path) -> None:
    """Write the store ``ours`` again with zarr-python alone, with the settings its metadata records."""
    attrs = json.loads((ours / "zarr.json").read_text())["attributes"]
    meta = attrs["nnfast"]
    image, seg, _props, _locs = load_case(ours)
    root = zarr.open_group(str(ref), mode="w-", zarr_format=3)
    for name, arr, fill in (("seg", seg, -1), ("image", image, 0.0)):
        _, cname, clevel, shuffle = meta[name]["codec"].split("-")
        z = root.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=tuple(meta[name]["chunks"]),
                              shards=tuple(meta[name]["shards"]), fill_value=fill,
                              compressors=[BloscCodec(cname=cname, clevel=int(clevel), shuffle=shuffle)],
                              config={"write_empty_chunks": False})
        z[...] = arr
    keys = json.loads((ours / "class_locations" / "zarr.json").read_text())["attributes"]["keys"]
    cl = root.create_group("class_locations", attributes={"keys": keys})
    for arr_name in keys:
        a = zarr.open_array(str(ours / "class_locations" / arr_name), mode="r")[...]
        z = cl.create_array(arr_name, shape=a.shape, dtype=a.dtype, chunks=(max(1, a.shape[0]), 4),
                            compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")], fill_value=0)
        if a.size:
            z[...] = a
    root.attrs["nnfast"] = meta


def _case(seed: int, seg_dtype, image_dtype=np.float32):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, 13, 37, 29)).astype(image_dtype)
    image[:, :4] = 0  # chunks equal to the fill value are not stored
    seg = np.where(image[:1] > 1, 2, np.where(image[:1] > 0, 1, 0)).astype(seg_dtype)
    seg[:, :2] = -1
    if seg_dtype == np.int16:
        seg[0, 5, 5, 5] = 300
    locs = {1: np.argwhere(seg == 1)[:50], 2: np.argwhere(seg == 2)[:7], (1, 2): [],  # an empty one: no chunk file
            3: np.zeros((2, 4), np.int64)}  # all fill value: no chunk file either (zarr's write_empty_chunks)
    return image, seg, locs


@pytest.mark.parametrize("seg_dtype, image_dtype, patch", [(np.int8, np.float32, (8, 16, 16)),
                                                          (np.int16, np.float32, (8, 16, 16)),
                                                          (np.int8, np.float16, (24, 24))])
def test_store_files_equal_zarr_python(tmp_path, seg_dtype, image_dtype, patch):
    image, seg, locs = _case(3, seg_dtype, image_dtype)
    props = {"spacing": [3.0, 0.7, 0.7], "nan_allowed": float("nan"), "shape": (13, 37, 29), "name": "cäse"}
    ours = tmp_path / "ours.zarr"
    write_case(ours, image, seg, locs, props, "hash123", patch)
    ref = tmp_path / "ref.zarr"
    _zarr_python_copy(ours, ref)
    a, b = _files(ours), _files(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    back = zarr.open_group(str(ours), mode="r")  # and zarr-python reads ours
    np.testing.assert_array_equal(back["image"][...], image)
    np.testing.assert_array_equal(back["seg"][...], seg)


@pytest.mark.parametrize("grid", [(1, 1, 1, 1), (1, 3, 5, 2), (2, 4, 4, 4), (1, 7, 1, 9), (3, 33, 2, 5), (1, 1, 6, 6)])
def test_morton_order_is_zarrs(grid):
    assert morton_order(grid) == [tuple(int(i) for i in c) for c in morton_order_iter(grid)]


def test_case_writer_does_not_import_zarr(tmp_path):
    """A preprocessing worker writes its stores without zarr-python (~0.3 s of CPU to import, ~40 ms per case)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from nnfast.io.store import write_case; "
            "img = np.ones((1, 9, 20, 20), np.float32); seg = np.zeros((1, 9, 20, 20), np.int8); "
            f"write_case({str(tmp_path / 'c.zarr')!r}, img, seg, {{1: [[0, 1, 2, 3]]}}, {{}}, 'h', (8, 16, 16)); "
            "print('zarr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert load_case(tmp_path / "c.zarr")[3][1].tolist() == [[0, 1, 2, 3]]
