"""Previous-stage segmentation stores (the cascade's ``predicted_next_stage``)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import zarr

from nnfast.errors import StoreError
from nnfast.io.prev_stage import (PreviousStageReader, missing_previous_stage, previous_stage_complete,
                                  read_previous_stage_metadata, write_previous_stage)
from nnfast.io.store import store_path


def _labels(shape, seed=0, hi=3):
    return np.random.default_rng(seed).integers(0, hi, shape).astype(np.uint8)


def test_write_read_roundtrip_with_padding(tmp_path):
    seg = _labels((9, 21, 17))
    path = store_path(tmp_path, "case_000")
    write_previous_stage(path, seg, patch_size=(8, 16, 16), source={"configuration": "3d_lowres", "fold": 2})
    meta = read_previous_stage_metadata(path)
    assert meta["shape"] == [9, 21, 17] and meta["source"] == {"configuration": "3d_lowres", "fold": 2}
    assert meta["case_id"] == "case_000" and meta["dtype"] == "int8"
    assert previous_stage_complete(path, (9, 21, 17)) and not previous_stage_complete(path, (9, 21, 18))
    # opens with plain zarr as (1, x, y, z)
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["seg"][...], seg[None])
    r = PreviousStageReader(path)
    assert r.shape == (9, 21, 17)
    box = [[-2, 5], [3, 25], [0, 17]]
    got = r.read(box, np.empty((1, 7, 22, 17), np.int16))
    want = np.full((7, 22, 17), -1, np.int16)
    want[2:, :18] = seg[0:5, 3:21]
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(r.read([[20, 30], [0, 1], [0, 1]]), -1)  # wholly outside
    r2 = pickle.loads(pickle.dumps(r))  # pickles as its path, reopens lazily
    np.testing.assert_array_equal(r2.read([[0, 9], [0, 21], [0, 17]])[0], seg)
    r.close()
    r2.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_wide_labels_and_replacement(tmp_path):
    path = tmp_path / "a.zarr"
    seg = np.zeros((1, 4, 5, 6), np.int32)
    seg[0, 1, 2, 3] = 300
    write_previous_stage(path, seg, patch_size=(4, 4, 4))
    assert read_previous_stage_metadata(path)["dtype"] == "int16"
    write_previous_stage(path, np.ones((4, 5, 6), bool), patch_size=(4, 4, 4))  # replaces the old store
    np.testing.assert_array_equal(PreviousStageReader(path).read([[0, 4], [0, 5], [0, 6]]), 1)


@pytest.mark.parametrize("bad, match", [(np.zeros((3, 4)), r"\(x, y, z\)"), (np.zeros((2, 3, 4, 5), np.int8), r"\(x, y, z\)"),
                                        (np.zeros((3, 4, 5), np.float32), "integer"),
                                        (np.full((3, 4, 5), -1, np.int8), "negative")])
def test_bad_arrays(tmp_path, bad, match):
    with pytest.raises(StoreError, match=match):
        write_previous_stage(tmp_path / "x.zarr", bad, patch_size=(4, 4, 4))
    assert not list(tmp_path.iterdir())


def test_missing_damaged_and_stale_stores_are_named(tmp_path):
    write_previous_stage(tmp_path / "ok.zarr", _labels((4, 5, 6)), patch_size=(4, 4, 4))
    write_previous_stage(tmp_path / "old.zarr", _labels((4, 5, 7)), patch_size=(4, 4, 4))
    broken = tmp_path / "broken.zarr"
    write_previous_stage(broken, _labels((4, 5, 6)), patch_size=(4, 4, 4))
    meta = json.loads((broken / "zarr.json").read_text())
    meta["attributes"]["nnfast"]["complete"] = False
    (broken / "zarr.json").write_text(json.dumps(meta))
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w")
    got = missing_previous_stage(tmp_path, {c: (4, 5, 6) for c in ("ok", "old", "broken", "other", "absent")})
    assert set(got) == {"old", "broken", "other", "absent"}
    assert "(4, 5, 7)" in got["old"] and "incomplete" in got["broken"]
    assert "not an nnfast previous-stage" in got["other"] and "no previous-stage segmentation" in got["absent"]
    with pytest.raises(StoreError, match="no previous-stage"):
        PreviousStageReader(tmp_path / "absent.zarr").read([[0, 1]] * 3)
    with pytest.raises(StoreError, match="bbox"):
        PreviousStageReader(tmp_path / "ok.zarr").read([[0, 1]] * 2)
