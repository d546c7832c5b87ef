"""Streamed preprocessing (``preprocess_case_to_store``: the label map first, every resampling pass giving back the
input it has read, the last pass slab by slab into the shard writer) against the whole-array path
(``preprocess_case`` + ``write_case``): the same store, bit for bit, on anisotropic (separate-z), isotropic,
several-label and two-channel (mask-normalized) cases; and the resampler's sink and release against its plain
result."""
from __future__ import annotations

import json

import numpy as np
import pytest

from factories import make_raw_dataset
from nnfast.io.dataset import load_dataset
from nnfast.io.store import load_case, read_case_metadata, write_case
from nnfast.native.resample import resize_image, resize_image_consuming
from nnfast.plan.api import plan_dataset
from nnfast.plan.planner import load_plans
from nnfast.preprocess.pipeline import CaseTask, preprocess_case, run_case_task
from nnfast.preprocess.resampling import determine_do_sep_z_and_axis
from nnfast.settings import Settings


class _ListSink:
    """Collects boxes of ``step`` voxels along the axes other than the pass's; asks for them in reverse order (any
    order must work)."""

    def __init__(self, shape, step=3):
        self.out = np.full(shape, np.nan, np.float32)
        self.step = step
        self.puts = 0

    def boxes(self, channel, axis, shape):
        r = [[(0, n)] if a == axis else [(s, min(n, s + self.step)) for s in range(0, n, self.step)]
             for a, n in enumerate(shape)]
        return [(a, b, c) for a in r[0] for b in r[1] for c in r[2]][::-1]

    def put(self, channel, origin, box):
        self.out[channel][tuple(slice(o, o + n) for o, n in zip(origin, box.shape))] = box
        self.puts += 1


@pytest.mark.parametrize("in_shape,out_shape,order,step", [
    ((2, 9, 11, 7), (12, 13, 8), 3, 3),  # last pass along x: slabs along y
    ((1, 12, 9, 10), (11, 14, 9), 3, 3),  # last pass along y: slabs along x
    ((1, 8, 10, 6), (7, 9, 13), 1, 3),  # along z
    ((2, 6, 7, 8), (6, 7, 8), 3, 3),  # unchanged shape
    ((1, 9, 8, 7), (11, 8, 5), 0, 3),
    # rows of several pages, so that released pages would read back as zeros: one slab of all y, slabs of x
    ((1, 12, 40, 44), (10, 40, 44), 3, 64),
    ((2, 10, 48, 40), (12, 52, 44), 3, 5),
    ((1, 24, 40, 48), (24, 44, 48), 3, 5),
])
def test_sink_and_release_are_bit_identical(in_shape, out_shape, order, step):
    rng = np.random.default_rng(3)
    data = (rng.normal(size=in_shape) * 100 + 1000).astype(np.float32)
    want = resize_image(data, out_shape, order)
    got = resize_image_consuming([data.copy()], out_shape, order, release=True)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    sink = _ListSink(want.shape, step)
    assert resize_image_consuming([data.copy()], out_shape, order, sink=sink, release=True) is None
    assert sink.puts >= 1
    np.testing.assert_array_equal(sink.out.view(np.uint32), want.view(np.uint32))


def _datasets(root):
    """Raw datasets: CT with 3 labels, anisotropic (4 mm slices: separate z) and isotropic-ish cases upsampled in 3D;
    a two-channel MRI set (z-score within the nonzero mask)."""
    raw = root / "raw"
    shapes = [(12, 40, 44), (14, 44, 40), (10, 38, 42), (18, 50, 46)]
    spacings = [(1.0, 0.8, 0.8), (1.0, 0.8, 0.8), (4.0, 0.8, 0.8), (1.3, 0.9, 1.0)]
    make_raw_dataset(raw, 91, "StreamCT", shapes, spacings, n_labels=3, seed=5)
    make_raw_dataset(raw, 92, "StreamMR", shapes[:3], [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.4, 1.1, 1.2)],
                     kind="mri", seed=6)
    return raw


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    raw = _datasets(root)
    s = Settings(raw=raw, preprocessed=root / "pre", results=root / "res")
    out = []
    for did, name in ((91, "Dataset091_StreamCT"), (92, "Dataset092_StreamMR")):
        plan_dataset(did, s, workers=1)
        out.append((raw / name, s.preprocessed / name / "nnfast_plans.json"))
    return root, out


def _bits(a):
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def test_streamed_store_equals_whole_array_store(planned):
    root, sets = planned
    seen = {"separate_z": 0, "3d": 0, "labels": 0, "mask": 0}
    for raw_ds, plans_file in sets:
        plans = load_plans(plans_file)
        cfg = plans.configuration("3d_fullres")
        _info, cases = load_dataset(raw_ds)
        for case in cases:
            streamed = root / "streamed" / f"{case.case_id}.zarr"
            run_case_task(CaseTask(case, str(plans_file), "3d_fullres", str(streamed), "h"))
            whole = root / "whole" / f"{case.case_id}.zarr"
            data, seg, props, locs = preprocess_case(case, plans, "3d_fullres")
            write_case(whole, data, seg, locs, props, "h", tuple(cfg.patch_size))
            a, b = load_case(streamed), load_case(whole)
            np.testing.assert_array_equal(_bits(a[0]), _bits(b[0]))
            np.testing.assert_array_equal(a[1], b[1])
            assert a[2] == b[2]
            assert a[3].keys() == b[3].keys() and len(a[3]) >= 1
            for k in a[3]:
                np.testing.assert_array_equal(a[3][k], b[3][k])
            assert json.dumps(read_case_metadata(streamed)) == json.dumps(read_case_metadata(whole))
            sp = [props["original_spacing"], props["target_spacing"]]
            sep, _ = determine_do_sep_z_and_axis(cfg.resampling_data.to_json().get("force_separate_z"), *sp)
            changed = props["shape_after_resampling"] != props["shape_after_cropping_and_before_resampling"]
            seen["separate_z" if sep else "3d"] += changed
            seen["labels"] = max(seen["labels"], int(seg.max()))
            seen["mask"] += any(cfg.use_mask_for_norm)
    assert seen["separate_z"] >= 1 and seen["3d"] >= 1, seen  # both resampling paths were exercised
    assert seen["labels"] >= 3 and seen["mask"] >= 1, seen
