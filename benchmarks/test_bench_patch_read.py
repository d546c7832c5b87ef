"""Patch reads: nnU-Net v2.8.1's blosc2 path vs zarr-python on our store vs our ``CaseReader``.

All readers get the same CT-like cases (float32 image, seg: int16 for nnU-Net as its preprocessor writes it,
int8 for us) and the same random boxes, sampled as nnU-Net's ``nnUNetDataLoader.get_bbox`` does (uniform, and
one in three centred on a stored foreground location, which may stick out of the image and is padded).
One thread everywhere (nnU-Net's loader sets ``blosc2.set_nthreads(1)``; we switch numcodecs' blosc threads
off). Boxes are read into int16 seg like nnU-Net's loader (``cast_cropped_to=np.int16``).

* ``nnunet_blosc2``: per read ``nnUNetDatasetBlosc2.load_case`` (open both ``.b2nd`` mmaps, load the pkl)
  then ``crop_and_pad_nd`` exactly as the loader does; written with ``nnUNetDatasetBlosc2.save_case`` and the
  preprocessor's ``comp_blosc2_params`` (LZ4HC 5, auto filter).
* ``zarr_python``: ``crop_and_pad_nd`` on zarr-python arrays of our store (arrays opened once).
* ``casereader``: our lean reader, opened once per case, reused output buffers.
* ``casereader_reopen``: a fresh ``CaseReader`` per read (worst case: no reader cache in the loader).

Sizes: the real benchmark is ``NNFAST_BENCH_SCALE=1``: image (1, 120, 300, 300), box 56x192x192,
``NNFAST_BENCH_CASES`` (default 4 at full scale) cases, 200 reads. The default scale (0.35) keeps CI
fast. Each benchmark's ``extra_info`` holds ``bytes`` and ``files`` on disk. Run::

    NNFAST_BENCH_SCALE=1 pytest benchmarks/test_bench_patch_read.py --benchmark-columns=median,mean,rounds

Measured (``NNFAST_BENCH_SCALE=1``, 4 cases, 200 boxes x 3 rounds, timings interleaved per box with
``python benchmarks/test_bench_patch_read.py '[{...variant kwargs...}]'`` -- the pytest-benchmark runs
agree but drift more with machine load; busy shared 2-core CPU machine, load 3-9, so absolute ms vary 2x
between runs: nnU-Net 22-35 ms per patch; ratio = median of per-box time ratios; bytes = whole case folders,
nnU-Net 49.1 MB and 12 files for 4 cases, ours 48 files: 12 per case, 7 of them class locations):

=====================================  ============  ==========  ==========  ==============
variant (``write_case`` kwargs)         ours/nnU-Net  reopened    bytes       write s/case
=====================================  ============  ==========  ==========  ==============
LZ4HC 7, 256 KiB chunks (default)      0.66x         0.74x       0.933x      1.8 (nnU-Net 1.9)
LZ4HC 5, 256 KiB                       0.68-0.70x    0.76-0.79x  0.962x      1.1-1.5
LZ4HC 9, 256 KiB                       0.62x         0.70x       0.926x      3.4
LZ4HC 5, 128 KiB (= nnU-Net's block)   0.73x         0.85x       0.936x
LZ4HC 5, 512 KiB                       0.78x         0.87x       0.959x
LZ4HC 5, seg chunks 64 KiB             0.69x         0.76x       0.961x
LZ4 5                                  0.82x         0.94x       1.126x
Zstd 3                                 1.86x         1.96x       0.891x
LZ4HC 5, no shuffle                    0.55x         0.67x       1.177x
=====================================  ============  ==========  ==========  ==============

Re-measured 2026-12-07 (same tool, 2-core machine under load 7-10; nnU-Net 26-41 ms per patch in these runs):
LZ4HC 5 1.00x (0.962x bytes), **LZ4HC 3 1.01x (0.969x bytes; the default since: ~25 % cheaper writes)**, LZ4HC 4
1.02x (0.966x), LZ4HC 1 1.17x (1.106x bytes), LZ4 9 1.22x (1.115x). The 0.66-0.70x above did not reproduce on
this machine for any level (the code at 9134b2f also gave 0.99x), so the reader's lead over nnU-Net is machine-
dependent; the ranking of the levels is not.

Image alone (LZ4HC 7): 11.2 MB per case against nnU-Net's 11.24 MB ``.b2nd``; the rest of the saving is the int8
seg and class locations stored as compressed int32 arrays instead of a pickle. zarr-python on the same store:
3-6x nnU-Net's time (pytest-benchmark run: 117 ms vs 35 ms under load 9). Other shapes (same tool, LZ4HC 5):
2D configuration (60x512x512, 602x602 slices, chunks (1, 1, 256, 256)) 0.29x; Hippocampus-sized case
(36x50x35, box 73x80x64) 0.36x; 3d_fullres initial-patch-sized boxes (77x253x253) 0.65x.
"""
from __future__ import annotations

import itertools
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from nnfast.io.store import store_path, write_case
from nnfast.io.store_reader import CaseReader

FULL_SHAPE = (120, 300, 300)
FULL_PATCH = (56, 192, 192)


def _scale() -> float:
    return float(os.environ.get("NNFAST_BENCH_SCALE", "0.35"))


def bench_sizes() -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(image spatial shape, box size, number of cases, number of reads) for the current scale."""
    s = _scale()
    shape = tuple(max(8, round(v * s)) for v in FULL_SHAPE)
    patch = tuple(max(4, round(v * s)) for v in FULL_PATCH)
    cases = int(os.environ.get("NNFAST_BENCH_CASES", "4" if s >= 1 else "2"))
    reads = 200 if s >= 1 else 60
    return shape, patch, cases, reads


def ct_like_case(shape: tuple[int, int, int], seed: int):
    """A CT-like preprocessed case: CT-normalized float32 image (1, x, y, z), int8 seg with labels 0-3 and -1
    outside a circular field of view, and nnU-Net-style class locations (<=10000 or >=1 % per class)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    body = (y / 0.8) ** 2 + (z / 0.65) ** 2 < 1
    fov = y ** 2 + z ** 2 < 1.1
    hu = np.where(body, np.float32(40), np.float32(-1000)) * np.ones(shape, np.float32)
    hu[np.broadcast_to(body & ((y / 0.72) ** 2 + (z / 0.57) ** 2 >= 1), shape)] = -90  # fat under the skin
    seg = np.zeros(shape, np.int8)
    organs = [((0.1, -0.2, 0.25), (0.6, 0.35, 0.3), 1, 100.0), ((-0.2, 0.15, -0.3), (0.3, 0.15, 0.12), 2, 150.0),
              ((0.15, -0.25, 0.3), (0.15, 0.08, 0.08), 3, 60.0)]
    for c, r, lab, val in organs:
        m = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1
        m = np.broadcast_to(m, shape)
        hu[m] = val
        seg[m] = lab
    hu[np.broadcast_to(((y - 0.45) / 0.1) ** 2 + (z / 0.1) ** 2 < 1, shape)] = 700  # spine
    hu += rng.normal(0, 15, shape).astype(np.float32)
    hu = gaussian_filter(hu, 0.6)  # the correlation that cubic resampling leaves
    image = ((np.clip(hu, -60, 260) - 110) / 45).astype(np.float32)
    image[:, ~fov[0]] = 0
    seg[:, ~fov[0]] = -1
    locs = {}
    for lab in (1, 2, 3):
        idx = np.argwhere(seg == lab)
        n = min(10000, len(idx))
        n = max(n, math.ceil(len(idx) * 0.01))
        sel = idx[rng.choice(len(idx), n, replace=False)] if len(idx) else idx
        locs[lab] = np.concatenate([np.zeros((len(sel), 1), np.int64), sel], 1)
    return image[None], seg[None], locs


def sample_bboxes(shape, patch, locations: list[dict], n: int, seed: int):
    """``n`` (case index, bbox) pairs drawn as nnU-Net's ``get_bbox`` (need_to_pad 0, 1/3 forced foreground)."""
    rng = np.random.default_rng(seed)
    need = [max(0, p - s) for p, s in zip(patch, shape)]
    lbs = [-nd // 2 for nd in need]
    ubs = [s + nd // 2 + nd % 2 - p for s, nd, p in zip(shape, need, patch)]
    out = []
    for i in range(n):
        case = int(rng.integers(len(locations)))
        eligible = [k for k, v in locations[case].items() if len(v)]
        if i % 3 == 2 and eligible:
            locs = locations[case][eligible[rng.integers(len(eligible))]]
            voxel = locs[rng.integers(len(locs))]
            lb = [max(lbs[d], int(voxel[d + 1]) - patch[d] // 2) for d in range(3)]
        else:
            lb = [int(rng.integers(lbs[d], ubs[d] + 1)) for d in range(3)]
        out.append((case, [[lb[d], lb[d] + patch[d]] for d in range(3)]))
    return out


def footprint(paths) -> tuple[int, int]:
    """Total bytes and number of files under ``paths`` (files or directories)."""
    total = files = 0
    for p in paths:
        p = Path(p)
        walk = [(str(p.parent), [], [p.name])] if p.is_file() else os.walk(p)
        for root, _d, names in walk:
            for name in names:
                total += os.path.getsize(os.path.join(root, name))
                files += 1
    return total, files


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    import numcodecs.blosc
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    shape, patch, n_cases, n_reads = bench_sizes()
    root = tmp_path_factory.mktemp("patch_read")
    nn_dir, our_dir = root / "nnunet", root / "nnfast"
    nn_dir.mkdir()
    ids, locations = [], []
    for i in range(n_cases):
        image, seg, locs = ct_like_case(shape, seed=i)
        cid = f"case_{i:03d}"
        ids.append(cid)
        locations.append(locs)
        seg16 = seg.astype(np.int16)
        blocks, chunks = comp_blosc2_params(image.shape, patch, image.itemsize)
        blocks_s, chunks_s = comp_blosc2_params(seg16.shape, patch, seg16.itemsize)
        nnUNetDatasetBlosc2.save_case(image, seg16, {"class_locations": locs}, str(nn_dir / cid), chunks=chunks,
                                      blocks=blocks, chunks_seg=chunks_s, blocks_seg=blocks_s)
        write_case(store_path(our_dir, cid), image, seg, locs, {"shape": list(shape)}, "bench", patch)
    old = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = False
    yield {
        "ids": ids, "patch": patch, "nn_dir": nn_dir, "our_dir": our_dir,
        "boxes": sample_bboxes(shape, patch, locations, n_reads, seed=1234),
    }
    numcodecs.blosc.use_threads = old


def _run(benchmark, read_one, boxes, footprint_paths):
    it = itertools.cycle(boxes)
    benchmark.extra_info["bytes"], benchmark.extra_info["files"] = footprint(footprint_paths)
    benchmark.extra_info["reads"] = len(boxes)
    benchmark.pedantic(read_one, setup=lambda: ((next(it),), {}), rounds=len(boxes),
                       warmup_rounds=min(10, len(boxes)))


def _nnunet_reader(d):
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ds = nnUNetDatasetBlosc2(str(d["nn_dir"]), d["ids"])

    def read_one(item):
        case, bbox = item
        data, seg, _, _props = ds.load_case(d["ids"][case])
        return crop_and_pad_nd(data, bbox, 0), crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)

    return read_one


def _zarr_reader(d):
    import zarr
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    groups = [zarr.open_group(str(store_path(d["our_dir"], cid)), mode="r") for cid in d["ids"]]
    arrays = [(g["image"], g["seg"]) for g in groups]

    def read_one(item):
        case, bbox = item
        image, seg = arrays[case]
        return crop_and_pad_nd(image, bbox, 0), crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)

    return read_one


def _casereader(d, reopen: bool):
    paths = [store_path(d["our_dir"], cid) for cid in d["ids"]]
    readers = [CaseReader(p).open() for p in paths]
    out_image = np.empty((1, *d["patch"]), np.float32)
    out_seg = np.empty((1, *d["patch"]), np.int16)

    def read_one(item):
        case, bbox = item
        reader = CaseReader(paths[case]) if reopen else readers[case]
        return reader.read(bbox, out_image, out_seg)

    return read_one


def _nn_files(d):
    return sorted(d["nn_dir"].iterdir())


def _our_files(d):
    return [store_path(d["our_dir"], cid) for cid in d["ids"]]


@pytest.mark.compat
def test_readers_agree(bench_data):
    """All paths return the same patches (nnU-Net's, zarr-python's and ours) for the benchmark's boxes."""
    d = bench_data
    nn, zp, ours = _nnunet_reader(d), _zarr_reader(d), _casereader(d, reopen=False)
    for item in d["boxes"][:20]:
        a_img, a_seg = nn(item)
        b_img, b_seg = zp(item)
        c_img, c_seg = (x.copy() for x in ours(item))
        np.testing.assert_array_equal(a_img, c_img)
        np.testing.assert_array_equal(b_img, c_img)
        np.testing.assert_array_equal(a_seg, c_seg)
        np.testing.assert_array_equal(b_seg, c_seg)
    reader = pickle.loads(pickle.dumps(CaseReader(store_path(d["our_dir"], d["ids"][0]))))
    assert reader.read(d["boxes"][0][1])[0].shape == (1, *d["patch"])


def test_footprint_not_larger_than_nnunet(bench_data):
    """Our store takes no more bytes than nnU-Net's blosc2 files for the same data."""
    ours, _ = footprint(_our_files(bench_data))
    theirs, _ = footprint(_nn_files(bench_data))
    assert ours <= theirs, (ours, theirs)


@pytest.mark.compat
def test_bench_read_nnunet_blosc2(benchmark, bench_data):
    benchmark.group = "patch read"
    _run(benchmark, _nnunet_reader(bench_data), bench_data["boxes"], _nn_files(bench_data))


def test_bench_read_zarr_python(benchmark, bench_data):
    benchmark.group = "patch read"
    _run(benchmark, _zarr_reader(bench_data), bench_data["boxes"], _our_files(bench_data))


def test_bench_read_casereader(benchmark, bench_data):
    benchmark.group = "patch read"
    _run(benchmark, _casereader(bench_data, reopen=False), bench_data["boxes"], _our_files(bench_data))


def test_bench_read_casereader_reopen(benchmark, bench_data):
    benchmark.group = "patch read"
    _run(benchmark, _casereader(bench_data, reopen=True), bench_data["boxes"], _our_files(bench_data))


# ------------------------------------------------------------------------------------------------------
# Layout/codec exploration with interleaved timing (robust on a shared, busy machine):
#   NNFAST_BENCH_SCALE=1 python benchmarks/test_bench_patch_read.py \
#       '[{}, {"max_chunk_nbytes": 131072}, {"cname": "lz4hc", "clevel": 9}, {"cname": "zstd", "clevel": 3}]'
# Each variant is a dict of ``write_case`` keyword arguments. For every box, nnU-Net's read, our reader
# (opened once) and a freshly opened reader run back to back; the per-box time ratios' median is printed.
# ------------------------------------------------------------------------------------------------------

def _explore(variants: list[dict], rounds: int = 3) -> None:  # pragma: no cover - manual tool
    import json
    import shutil
    import tempfile
    import time

    import numcodecs.blosc
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    from nnfast.io.store import chunk_layout

    numcodecs.blosc.use_threads = False
    shape, patch, n_cases, n_reads = bench_sizes()
    root = Path(tempfile.mkdtemp(prefix="nnfast_patch_read_"))
    try:
        cases = [ct_like_case(shape, seed=i) for i in range(n_cases)]
        d = {"ids": [f"case_{i:03d}" for i in range(n_cases)], "patch": patch, "nn_dir": root / "nnunet"}
        d["nn_dir"].mkdir()
        t0 = time.perf_counter()
        for cid, (image, seg, locs) in zip(d["ids"], cases):
            seg16 = seg.astype(np.int16)
            blocks, chunks = comp_blosc2_params(image.shape, patch, 4)
            blocks_s, chunks_s = comp_blosc2_params(seg16.shape, patch, 2)
            nnUNetDatasetBlosc2.save_case(image, seg16, {"class_locations": locs}, str(d["nn_dir"] / cid),
                                          chunks=chunks, blocks=blocks, chunks_seg=chunks_s, blocks_seg=blocks_s)
        nn_write = (time.perf_counter() - t0) / n_cases
        nn_bytes, nn_files = footprint(_nn_files(d))
        boxes = sample_bboxes(shape, patch, [c[2] for c in cases], n_reads, seed=1234)
        nn = _nnunet_reader(d)
        print(f"image {(1, *shape)}, box {patch}, {n_cases} cases, {n_reads} boxes x {rounds}; nnU-Net blocks "
              f"{tuple(blocks)} chunks {tuple(chunks)}: {nn_bytes / 1e6:.1f} MB, {nn_files} files, "
              f"write {nn_write:.2f} s/case")
        for v in variants:
            d["our_dir"] = root / "nnfast"
            shutil.rmtree(d["our_dir"], ignore_errors=True)
            t0 = time.perf_counter()
            for cid, (image, seg, locs) in zip(d["ids"], cases):
                write_case(store_path(d["our_dir"], cid), image, seg, locs, {}, "x", patch, **v)
            write_s = (time.perf_counter() - t0) / n_cases
            ours, reopen = _casereader(d, reopen=False), _casereader(d, reopen=True)
            times = {"nn": [], "ours": [], "reopen": []}
            for _ in range(rounds):
                for item in boxes:
                    for key, fn in (("nn", nn), ("ours", ours), ("reopen", reopen)):
                        t0 = time.perf_counter()
                        fn(item)
                        times[key].append(time.perf_counter() - t0)
            t = {k: np.array(x) for k, x in times.items()}
            our_bytes, our_files = footprint(_our_files(d))
            cap = v.get("max_chunk_nbytes", 256 * 1024)
            img_chunks = chunk_layout((1, *shape), patch, 4, max_chunk_nbytes=cap).chunks
            seg_chunks = chunk_layout((1, *shape), patch, 1, max_chunk_nbytes=v.get("seg_max_chunk_nbytes") or cap).chunks
            print(f"{json.dumps(v)} image chunks {img_chunks} seg chunks {seg_chunks}: median ms nnU-Net "
                  f"{np.median(t['nn']) * 1e3:.2f}, ours {np.median(t['ours']) * 1e3:.2f} "
                  f"({np.median(t['ours'] / t['nn']):.2f}x per box), reopened {np.median(t['reopen']) * 1e3:.2f} "
                  f"({np.median(t['reopen'] / t['nn']):.2f}x); {our_bytes / 1e6:.1f} MB ({our_bytes / nn_bytes:.3f}x), "
                  f"{our_files} files; write {write_s:.2f} s/case", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    _explore(json.loads(sys.argv[1]) if len(sys.argv) > 1 else [{}])
