"""Binary morphology with nnU-Net's ball / disk against skimage's footprints, a brute-force shifted-OR reference and
batchgeneratorsv2's FFT implementations (``binary_{dilation,erosion,opening,closing}_torch``)."""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.morphology import ball, disk

import nnfast.native.morphology as morph
from nnfast.native.morphology import binary_operation, footprint, footprint_shift_threshold

OPS = ("dilation", "erosion", "opening", "closing")
SLOW = numba.config.DISABLE_JIT  # pure-Python kernels: smaller inputs, fewer cases


# --------------------------------------------------------------------------------------------- references
def _sk_footprint(radius, ndim):
    return ball(radius, dtype=bool) if ndim == 3 else disk(radius, dtype=bool)


def _shift_reduce(x, fp, pad_value):
    """OR (pad 0) or AND (pad 1) of ``x[p + j - floor((k - 1) / 2)]`` over the footprint indices ``j``."""
    k = fp.shape[0]
    c = (k - 1) // 2
    xp = np.pad(x, [(c, k - 1 - c)] * x.ndim, constant_values=pad_value)
    out = np.full(x.shape, pad_value)
    for j in np.argwhere(fp):
        window = xp[tuple(slice(a, a + n) for a, n in zip(j, x.shape))]
        out = (out | window) if not pad_value else (out & window)
    return out


def _brute(mask, radius, op):
    """Obviously correct: dilation zero-pads, erosion one-pads (erosion = ~dilation(~x) with ~x zero-padded)."""
    fp = _sk_footprint(radius, mask.ndim)
    m = mask != 0
    dil = lambda x: _shift_reduce(x, fp, False)  # noqa: E731
    ero = lambda x: _shift_reduce(x, fp, True)  # noqa: E731
    return {"dilation": lambda: dil(m), "erosion": lambda: ero(m),
            "opening": lambda: dil(ero(m)), "closing": lambda: ero(dil(m))}[op]()


@pytest.fixture
def one_torch_thread():
    """Two torch threads on a busy 2-core machine spin for ~0.2 s per small FFT; one is 30x faster here."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torch_ref(mask, radius, op):
    import torch
    from batchgeneratorsv2.transforms.nnunet import random_binary_operator as rbo

    fn = getattr(rbo, f"binary_{op}_torch")
    return fn(torch.from_numpy(mask != 0), torch.from_numpy(_sk_footprint(radius, mask.ndim))).numpy()


def _mask(shape, seed, kind="mixed"):
    rng = np.random.default_rng(seed)
    if kind == "empty":
        return np.zeros(shape, bool)
    if kind == "full":
        return np.ones(shape, bool)
    blobs = ndi.gaussian_filter(rng.random(shape), rng.uniform(1, 3)) > 0.5
    noise = rng.random(shape) < rng.uniform(0.0, 0.03)
    holes = rng.random(shape) < rng.uniform(0.0, 0.03)
    return (blobs | noise) & ~holes


def _tie_radius(rng, ndim=3):
    """A radius in [1, 8) whose skimage ball keeps some but not all offsets lying exactly on the sphere."""
    while True:
        r = float(rng.uniform(1, 8))
        _, lo, hi, _ = morph._plan(r, ndim)
        if lo <= hi:
            return r


SHAPES_3D = [(1, 20, 17), (9, 33, 21), (40, 40, 40), (1, 1, 1), (5, 1, 1), (12, 7, 1)]
SHAPES_2D = [(33, 21), (1, 17), (40, 40), (1, 1)]
if SLOW:
    SHAPES_3D = [(1, 9, 7), (6, 8, 7), (1, 1, 1), (5, 1, 1)]
    SHAPES_2D = [(13, 9), (1, 7), (1, 1)]


def _cases(n, seed):
    """(mask, radius, op): 3D and 2D, odd and even footprints, tie radii, empty and full masks."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ndim = 3 if i % 3 else 2
        shapes = SHAPES_3D if ndim == 3 else SHAPES_2D
        shape = shapes[i % len(shapes)]
        kind = ("empty", "full")[i % 2] if i % 11 == 5 else "mixed"
        if i % 5 == 0:
            radius = _tie_radius(rng, 3) if ndim == 3 else float(rng.integers(1, 8))
        elif i % 5 == 1:
            radius = float(rng.integers(1, 8)) + 0.5 * (i % 2)  # integer or half-integer: odd / even footprint
        else:
            radius = float(rng.uniform(1, 8))
        out.append((_mask(shape, seed * 1000 + i, kind), radius, OPS[i % 4]))
    return out


# --------------------------------------------------------------------------------------------- footprint
def test_footprint_equals_skimage_ball_and_disk():
    rng = np.random.default_rng(0)
    radii = [*rng.uniform(1, 8, 400), *range(1, 9), *(k / 2 for k in range(1, 17)), *rng.uniform(0.01, 1, 30), 23.7]
    for r in radii:
        for ndim in (2, 3):
            got = footprint(r, ndim)
            ref = _sk_footprint(r, ndim)
            assert got.dtype == np.bool_ and got.shape == ref.shape, (r, ndim)
            np.testing.assert_array_equal(got, ref, err_msg=f"radius {r}, ndim {ndim}")
    assert footprint(2.5, 3).shape == (6, 6, 6)
    assert footprint(np.float32(3), 2).shape == (7, 7)


def test_shift_threshold_describes_the_footprint_up_to_ties():
    rng = np.random.default_rng(1)
    for r in [*rng.uniform(1, 8, 200), *range(1, 9), 2.5, 3.5]:
        for ndim in (2, 3):
            fp = footprint(r, ndim)
            sft, T = footprint_shift_threshold(r, ndim)
            k = fp.shape[0]
            u = (np.arange(k) - (k - 1) // 2 + sft) ** 2
            v = sum(np.expand_dims(u, tuple(a for a in range(ndim) if a != ax)) for ax in range(ndim))
            clear = np.abs(v - T) > 1e-9 * max(1.0, T)  # exact ties are decided by skimage's rounding
            np.testing.assert_array_equal(fp[clear], (v <= T)[clear], err_msg=f"radius {r}, ndim {ndim}")
            if ndim == 3 and k > 1:
                assert sft in (0.0, -0.5) and T == ((k - 1) / 2) ** 2
    assert footprint_shift_threshold(2.0, 3) == (0.0, 4.0)
    assert footprint_shift_threshold(2.5, 3) == (-0.5, 6.25)
    assert footprint_shift_threshold(2.3, 2) == pytest.approx((-0.3, 2.3 ** 2))


def test_ties_occur_and_integer_radii_have_none_to_resolve():
    # ball(r) depends on int(2r + 1) only, up to floating point decisions on the sphere: some radii keep lattice
    # points with |d|^2 == T that others drop, so no single threshold describes them
    rng = np.random.default_rng(2)
    r = _tie_radius(rng)
    k = int(2 * r + 1)
    assert k % 2 == 1
    assert not np.array_equal(footprint(r, 3), footprint((k - 1) / 2, 3))
    for r in range(1, 9):
        for ndim in (2, 3):
            _, lo, hi, offsets = morph._plan(float(r), ndim)
            assert lo > hi and offsets.shape == (0, 3)


# --------------------------------------------------------------------------------------------- operations
def test_single_voxel_dilation_is_the_reflected_footprint():
    # out[p] = x[p + d] over the footprint offsets d, so one voxel grows into the footprint mirrored about it,
    # including the sphere points that skimage's rounding kept or dropped
    rng = np.random.default_rng(4)
    radii = [*rng.uniform(1, 8, 6 if SLOW else 60), *(_tie_radius(rng) for _ in range(3 if SLOW else 20))]
    for r in radii:
        for ndim in (3, 2):
            fp = footprint(r, ndim)
            k = fp.shape[0]
            c = (k - 1) // 2
            x = np.zeros((k + 2,) * ndim, bool)
            x[(k - c,) * ndim] = True
            expected = np.zeros_like(x)
            expected[(slice(1, k + 1),) * ndim] = np.flip(fp)
            np.testing.assert_array_equal(binary_operation(x, r, "dilation"), expected, err_msg=f"r={r} {ndim}D")


@pytest.mark.parametrize("force_envelope", [False, True], ids=["window", "envelope"])
def test_operations_equal_brute_force(force_envelope, monkeypatch):
    if force_envelope:
        monkeypatch.setattr(morph, "_WINDOW_MAX", 0)
    for mask, radius, op in _cases(24 if SLOW else 120, seed=3 + force_envelope):
        got = binary_operation(mask, radius, op)
        assert got.dtype == np.bool_ and got.shape == mask.shape
        np.testing.assert_array_equal(got, _brute(mask, radius, op), err_msg=f"{op} r={radius} {mask.shape}")


@pytest.mark.compat
@pytest.mark.parametrize("force_envelope", [False, True], ids=["window", "envelope"])
def test_operations_equal_batchgeneratorsv2(force_envelope, monkeypatch, one_torch_thread):
    if force_envelope:
        monkeypatch.setattr(morph, "_WINDOW_MAX", 0)
    for mask, radius, op in _cases(24 if SLOW else 160, seed=5 + force_envelope):
        np.testing.assert_array_equal(binary_operation(mask, radius, op), _torch_ref(mask, radius, op),
                                      err_msg=f"{op} r={radius} {mask.shape}")


@pytest.mark.compat
def test_many_random_radii_equal_batchgeneratorsv2(one_torch_thread):
    rng = np.random.default_rng(7)
    shape3, shape2 = ((7, 11, 9), (13, 10)) if SLOW else ((21, 26, 19), (45, 38))
    m3 = _mask(shape3, 70)
    m2 = _mask(shape2, 71)
    for i in range(20 if SLOW else 400):
        r = float(rng.uniform(1, 8))
        op = OPS[i % 4]
        for m in (m3, m2):
            np.testing.assert_array_equal(binary_operation(m, r, op), _torch_ref(m, r, op), err_msg=f"{op} r={r}")


def test_empty_and_full_masks():
    for shape in ((6, 7, 5), (1, 1, 1), (9, 4)):
        for r in (1.0, 2.5, 5.3):
            for op in OPS:
                empty = binary_operation(np.zeros(shape, bool), r, op)
                full = binary_operation(np.ones(shape, bool), r, op)
                # outside the array is background for dilation, foreground for erosion
                assert not empty.any() and full.all(), (shape, r, op)


def test_radius_below_one_and_empty_footprints():
    rng = np.random.default_rng(8)
    mask = _mask((6, 7, 5), 80)
    for r in (0.2, 0.49, 0.5, 0.7, 0.9, 0.99):
        for m in (mask, mask[2]):
            for op in OPS:
                np.testing.assert_array_equal(binary_operation(m, r, op), _brute(m, r, op), err_msg=f"{op} r={r}")
    assert not footprint(0.3, 3).any()
    m = rng.random((4, 5, 6)) < 0.5
    assert not binary_operation(m, 0.3, "dilation").any() and binary_operation(m, 0.3, "erosion").all()


def test_large_radius_takes_the_envelope_path_and_stays_exact():
    mask = _mask((9, 31) if SLOW else (30, 41), 90)
    sft, lo, hi, _ = morph._plan(48.7, 2)
    assert math.ceil(-sft + math.sqrt(hi)) - math.floor(-sft - math.sqrt(hi)) + 1 > morph._WINDOW_MAX
    for op in ("dilation", "closing"):
        np.testing.assert_array_equal(binary_operation(mask, 48.7, op), _brute(mask, 48.7, op))
    blob = np.zeros((25, 25), bool)
    blob[12, 12] = True
    np.testing.assert_array_equal(binary_operation(blob, 11.0, "dilation"), _brute(blob, 11.0, "dilation"))


# --------------------------------------------------------------------------------------------- dtypes, layout, out
def test_dtypes_and_layouts_agree():
    mask = _mask((7, 10, 9) if SLOW else (17, 20, 19), 100)
    r = 2.5
    for op in ("dilation", "opening"):
        ref = binary_operation(mask, r, op)
        variants = [mask.astype(dt) for dt in (np.uint8, np.int8, np.int16, np.float32, np.float64)]
        variants += [mask.astype(np.float32) * 3.5, np.asfortranarray(mask), np.asfortranarray(mask.astype(np.uint8)),
                     mask.astype(">f4")]
        for v in variants:
            np.testing.assert_array_equal(binary_operation(v, r, op), ref, err_msg=f"{op} {v.dtype}")
        big = np.zeros((mask.shape[0], mask.shape[1], 2 * mask.shape[2]), bool)
        big[:, :, ::2] = mask
        np.testing.assert_array_equal(binary_operation(big[:, :, ::2], r, op), ref)  # strided view
        np.testing.assert_array_equal(binary_operation(mask.T, r, op), ref.T)  # the ball is symmetric
    m2 = mask[3]
    np.testing.assert_array_equal(binary_operation(np.asfortranarray(m2), 3.3, "closing"), _brute(m2, 3.3, "closing"))


def test_mask_is_not_modified_and_out_is_filled():
    mask = _mask((8, 9, 10), 110).astype(np.uint8)
    before = mask.copy()
    out = np.zeros(mask.shape, bool)
    res = binary_operation(mask, 3.2, "closing", out=out)
    assert res is out
    np.testing.assert_array_equal(mask, before)
    np.testing.assert_array_equal(out, _brute(mask, 3.2, "closing"))
    out2 = np.ones(mask.shape[1:], bool)
    assert binary_operation(mask[0], 1.7, "erosion", out=out2) is out2
    np.testing.assert_array_equal(out2, _brute(mask[0], 1.7, "erosion"))
    zero = np.zeros((0, 4, 5), bool)
    assert binary_operation(zero, 2.0, "dilation").shape == (0, 4, 5)


def test_errors():
    m = np.zeros((4, 5, 6), bool)
    with pytest.raises(TypeError, match="mask must be a numpy array"):
        binary_operation([[0, 1], [1, 0]], 2.0, "dilation")
    with pytest.raises(ValueError, match="2D"):
        binary_operation(np.zeros(5, bool), 2.0, "dilation")
    with pytest.raises(ValueError, match="2D"):
        binary_operation(np.zeros((2, 3, 4, 5), bool), 2.0, "dilation")
    with pytest.raises(ValueError, match="dtype"):
        binary_operation(m.astype(np.int32), 2.0, "dilation")
    with pytest.raises(ValueError, match="op must be one of"):
        binary_operation(m, 2.0, "dilate")
    for bad in (0, -1.0, float("nan"), float("inf"), "3", True, None):
        with pytest.raises(ValueError, match="radius"):
            binary_operation(m, bad, "dilation")
    with pytest.raises(TypeError, match="out must be a numpy array"):
        binary_operation(m, 2.0, "dilation", out=[0])
    for bad_out in (np.zeros((4, 5, 7), bool), np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 6), bool, order="F")):
        with pytest.raises(ValueError, match="out must be a writeable C-contiguous bool array"):
            binary_operation(m, 2.0, "dilation", out=bad_out)
    with pytest.raises(ValueError, match="overlap"):
        binary_operation(m, 2.0, "dilation", out=m)
    with pytest.raises(ValueError, match="ndim"):
        footprint(2.0, 4)
    with pytest.raises(ValueError, match="radius"):
        footprint_shift_threshold(-2.0, 3)


def test_warmup_runs():
    from nnfast.native import warmup

    warmup(("morphology",))
