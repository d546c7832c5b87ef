"""Label counting and rank lookup against np.argwhere (the slow, obviously correct reference)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nnfast.native.class_locations import count_labels, locate_ranked_voxels

DTYPES = (np.uint8, np.int16, np.float32, np.float64)


def layouts(seg):
    yield "C", seg
    yield "F", np.asfortranarray(seg)
    yield "cropped", seg[:, 1:, :, ::2]
    yield "3D", seg[0]


def reference_locations(seg4, label, ranks):
    coords = np.argwhere(seg4 == label)
    return coords[ranks]


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_and_locate_match_argwhere(dtype):
    rng = np.random.default_rng(0)
    lo = 0 if np.dtype(dtype).kind == "u" else -1
    seg = rng.integers(lo, 4, (1, 7, 8, 9)).astype(dtype)
    labels = [3, 1, lo, 2]
    for name, view in layouts(seg):
        seg4 = view if view.ndim == 4 else view[None]
        counts = count_labels(view, labels)
        assert counts.dtype == np.int64
        np.testing.assert_array_equal(counts, [np.count_nonzero(seg4 == lab) for lab in labels], err_msg=name)
        index, ranks = [], []
        for i, c in enumerate(counts):
            r = rng.choice(int(c), min(int(c), 5), replace=False)
            index += [i] * r.size
            ranks += r.tolist()
        perm = rng.permutation(len(ranks))  # request order must not matter
        index = np.array(index)[perm]
        ranks = np.array(ranks)[perm]
        out = locate_ranked_voxels(view, labels, index, ranks)
        assert out.shape == (ranks.size, 4) and out.dtype == np.int64
        for row, i, r in zip(out, index, ranks):
            np.testing.assert_array_equal(row, np.argwhere(seg4 == labels[i])[r], err_msg=name)


def test_duplicate_requests_and_first_last_voxels():
    seg = np.zeros((1, 3, 3, 3), np.int8)
    seg[0, 0, 0, 0] = 5
    seg[0, 2, 2, 2] = 5
    out = locate_ranked_voxels(seg, [5], [0, 0, 0, 0], [1, 0, 1, 1])
    np.testing.assert_array_equal(out, [[0, 2, 2, 2], [0, 0, 0, 0], [0, 2, 2, 2], [0, 2, 2, 2]])


def test_float_labels_match_like_isin():
    seg = np.array([[[1.0, 1.5, np.nan, -1.0, 2.0, 1.0]]], np.float32)
    np.testing.assert_array_equal(count_labels(seg, [1, -1, 2]), [2, 1, 1])
    np.testing.assert_array_equal(locate_ranked_voxels(seg, [1], [0, 0], [0, 1]), [[0, 0, 0, 0], [0, 0, 0, 5]])


def test_all_background_and_absent_labels():
    seg = np.zeros((1, 4, 1, 5), np.int16)
    np.testing.assert_array_equal(count_labels(seg, [1, 2]), [0, 0])
    assert count_labels(seg, []).shape == (0,)
    assert locate_ranked_voxels(seg, [1], [], []).shape == (0, 4)


def test_errors():
    seg = np.zeros((1, 2, 2, 2), np.int8)
    with pytest.raises(ValueError, match="fewer voxels"):
        locate_ranked_voxels(seg, [0], [0], [8])
    with pytest.raises(ValueError, match="distinct"):
        count_labels(seg, [1, 1])
    with pytest.raises(ValueError, match="one channel"):
        count_labels(np.zeros((2, 2, 2, 2), np.int8), [1])
    with pytest.raises(ValueError, match="span"):
        count_labels(seg, [0, 1 << 30])
    with pytest.raises(ValueError, match="label_index"):
        locate_ranked_voxels(seg, [0], [1], [0])
    with pytest.raises(ValueError, match="dtype"):
        count_labels(np.zeros((1, 2, 2, 2), complex), [1])


@given(arrays(np.int8, st.tuples(st.just(1), *[st.integers(1, 6)] * 3), elements=st.integers(-1, 3)),
       st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_property_every_rank_maps_to_its_argwhere_row(seg, seed):
    labels = [-1, 1, 2, 3]
    counts = count_labels(seg, labels)
    index = np.concatenate([np.full(c, i) for i, c in enumerate(counts)]).astype(np.int64)
    ranks = np.concatenate([np.arange(c) for c in counts]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(index.size)
    out = locate_ranked_voxels(seg, labels, index[order], ranks[order])
    expected = np.concatenate([np.argwhere(seg == lab) for lab in labels]).reshape(-1, 4)[order]
    np.testing.assert_array_equal(out, expected)


def test_kernels_run_as_python_with_jit_disabled():
    code = textwrap.dedent(
        """
        import numpy as np
        from nnfast.native.class_locations import count_labels, locate_ranked_voxels
        seg = np.random.default_rng(0).integers(-1, 3, (1, 3, 4, 5)).astype(np.int8)
        c = count_labels(seg, [2, -1])
        assert c.tolist() == [int((seg == 2).sum()), int((seg == -1).sum())]
        out = locate_ranked_voxels(seg, [2, -1], [0, 1, 0], [c[0] - 1, 0, 0])
        assert (out[0] == np.argwhere(seg == 2)[-1]).all() and (out[1] == np.argwhere(seg == -1)[0]).all()
        assert (out[2] == np.argwhere(seg == 2)[0]).all()
        """
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
