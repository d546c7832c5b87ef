"""Topology rule (``get_pool_and_conv_props``, ``pad_shape``) against nnU-Net v2's ``network_topology`` functions."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.plan.topology import Topology, get_pool_and_conv_props, get_shape_must_be_divisible_by, pad_shape

# examples computed with nnU-Net's get_pool_and_conv_props
EXAMPLES = [
    ((1.0, 1.0, 1.0), (36, 50, 35), (3, 3, 3), (40, 56, 40)),
    ((2.5, 0.8, 0.8), (96, 160, 160), (4, 5, 5), (96, 160, 160)),
    ((3.0, 0.75, 0.75), (64, 192, 192), (3, 5, 5), (64, 192, 192)),
    ((0.8, 0.8), (512, 512), (7, 7), (512, 512)),
]


@pytest.mark.parametrize("spacing,patch,numpool,padded", EXAMPLES)
def test_documented_examples(spacing, patch, numpool, padded):
    t = get_pool_and_conv_props(spacing, patch)
    assert t.num_pool_per_axis == numpool
    assert t.patch_size == padded
    assert len(t.strides) == len(t.kernel_sizes) == max(numpool) + 1
    assert t.strides[0] == (1,) * len(spacing)
    assert t.kernel_sizes[-1] == (3,) * len(spacing)


def test_anisotropic_kernels_and_strides():
    t = get_pool_and_conv_props((3.0, 0.75, 0.75), (64, 192, 192))
    assert t.kernel_sizes[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert t.strides[:4] == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    t = get_pool_and_conv_props((2.5, 0.8, 0.8), (96, 160, 160))
    assert t.strides[1] == (1, 2, 2) and t.strides[2:] == ((2, 2, 2),) * 4
    assert t.kernel_sizes[0] == (1, 3, 3) and t.kernel_sizes[1] == (3, 3, 3)


def test_single_axis_needs_three_times_min_size():
    # only axis 2 can pool (others < 8); it needs >= 12 voxels to be pooled alone
    assert get_pool_and_conv_props((1.0, 1.0, 1.0), (4, 4, 11)).num_pool_per_axis == (0, 0, 0)
    assert get_pool_and_conv_props((1.0, 1.0, 1.0), (4, 4, 12)).num_pool_per_axis == (0, 0, 1)


def test_small_patch_no_pooling_and_unpack_order():
    num_pool, strides, kernels, patch, div = get_pool_and_conv_props((1.0, 1.0), (5, 7))
    assert num_pool == (0, 0) and strides == ((1, 1),) and kernels == ((3, 3),) and patch == (5, 7) and div == (1, 1)


def test_pad_shape_and_divisor():
    assert pad_shape((40, 33, 1), (8, 8, 1)) == (40, 40, 1)
    assert pad_shape((35.5, 32.5), (8, 1)) == (40, 33)
    assert pad_shape((17, 16), 4) == (20, 16)
    assert get_shape_must_be_divisible_by((0, 3, 5)) == (1, 8, 32)
    with pytest.raises(ValueError, match="2 entries"):
        pad_shape((1, 2, 3), (1, 2))


def _nnunet():
    from nnunetv2.experiment_planning.experiment_planners import network_topology

    return network_topology


def _as_plain(t):
    num_pool, strides, kernels, patch, div = t
    return (tuple(int(v) for v in num_pool), tuple(tuple(int(v) for v in s) for s in strides),
            tuple(tuple(int(v) for v in k) for k in kernels), tuple(int(v) for v in patch), tuple(int(v) for v in div))


_sizes = st.one_of(st.integers(1, 600), st.integers(2, 1200).map(lambda v: v / 2))  # medians can be x.5


@pytest.mark.compat
@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    dim=st.sampled_from([2, 3]),
    spacing=st.lists(st.floats(0.05, 12.0, allow_nan=False), min_size=3, max_size=3),
    patch=st.lists(_sizes, min_size=3, max_size=3),
    min_fmap=st.sampled_from([4, 4, 2, 5]),
    max_numpool=st.sampled_from([999999, 999999, 3, 5]),
)
def test_matches_nnunet(dim, spacing, patch, min_fmap, max_numpool):
    nt = _nnunet()
    ref = nt.get_pool_and_conv_props(spacing[:dim], patch[:dim], min_fmap, max_numpool)
    ours = get_pool_and_conv_props(spacing[:dim], patch[:dim], min_fmap, max_numpool)
    assert isinstance(ours, Topology)
    assert _as_plain(ours) == _as_plain(ref)


@pytest.mark.compat
@settings(max_examples=200, deadline=None, derandomize=True)
@given(shape=st.lists(_sizes, min_size=1, max_size=3), data=st.data())
def test_pad_shape_matches_nnunet(shape, data):
    div = data.draw(st.lists(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), min_size=len(shape), max_size=len(shape)))
    ref = _nnunet().pad_shape(shape, div)
    assert pad_shape(shape, div) == tuple(int(v) for v in ref)
