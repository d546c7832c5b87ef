"""TargetDownsampler: every deep-supervision scale at once equals torch's ``interpolate(mode='nearest-exact')``
(batchgeneratorsv2's DownsampleSegForDSTransform), into fresh arrays or the caller's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnfast.errors import ShapeError
from nnfast.native.ds_targets import TargetDownsampler


def _reference(seg: np.ndarray, shape) -> np.ndarray:
    t = torch.from_numpy(seg.astype(np.float32))[None]
    return torch.nn.functional.interpolate(t, size=tuple(shape), mode="nearest-exact")[0].numpy().astype(seg.dtype)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
@pytest.mark.parametrize("spatial, scales", [
    ((7, 33, 20), [(1, 1, 1), (1, 0.5, 0.5), (0.5, 0.25, 0.25), (0.25, 0.125, 0.125)]),
    ((1, 9, 5), [(1, 1, 1), (1, 0.5, 0.5)]),            # one slice, odd sizes
    ((37, 64), [(1, 1), (0.5, 0.5), (0.25, 0.25), (0.125, 0.125)]),
    ((16, 16), [(0.5, 0.5), (0.25, 0.25)]),               # no full-resolution scale
])
@pytest.mark.parametrize("channels", [1, 2])
def test_equals_torch_nearest_exact(dtype, spatial, scales, channels):
    rng = np.random.default_rng(len(spatial) * 10 + channels)
    seg = rng.integers(-1, 4, (channels, *spatial)).astype(dtype)
    ds = TargetDownsampler(spatial, scales)
    got = ds(seg)
    assert len(got) == len(scales)
    for g, sc, shape in zip(got, scales, ds.shapes):
        if all(v == 1 for v in sc):
            assert g is seg and shape is None
            continue
        new = tuple(round(n * v) for n, v in zip(spatial, sc))
        assert shape == new and g.dtype == seg.dtype
        np.testing.assert_array_equal(g, _reference(seg, new))
    # into the caller's arrays (a batch's slots), which are returned
    out = [None if s is None else np.full((channels, *s), 9, dtype) for s in ds.shapes]
    again = ds(seg, out)
    for g, o, a in zip(got, out, again):
        if o is not None:
            assert a is o
            np.testing.assert_array_equal(o, g)


def test_bad_arguments():
    with pytest.raises(ShapeError, match="does not match"):
        TargetDownsampler((8, 8, 8), [(1, 0.5)])
    with pytest.raises(ShapeError, match="shrinks"):
        TargetDownsampler((8, 2), [(0.5, 0.1)])
    ds = TargetDownsampler((8, 8), [(1, 1), (0.5, 0.5)])
    with pytest.raises(ShapeError, match="seg of shape"):
        ds(np.zeros((1, 8, 9), np.int16))
    with pytest.raises(ShapeError, match="out\\[1\\]"):
        ds(np.zeros((1, 8, 8), np.int16), [None, np.zeros((1, 4, 4), np.int8)])
