"""Intensity normalization kernels (nnU-Net v2's CT and z-score schemes), fused into one pass over the image.

Arithmetic is float32 like nnU-Net's in-place numpy code (``np.clip``, ``-=``, ``/=`` on float32 with scalars that
NumPy 2 casts to float32), so results match it bit for bit; moments are accumulated in float64.
"""
from __future__ import annotations

import numpy as np

from nnfast.errors import PlanError, ShapeError

from ._jit import register_warmup, run_slabs, serial

__all__ = ["ct_normalize", "zscore_normalize", "masked_moments"]


@serial
def _ct_normalize(img, out, lo, hi, mean, std):
    flat_in = img.ravel()
    flat_out = out.ravel()
    for i in range(flat_in.size):
        v = np.float32(flat_in[i])
        if v < lo:
            v = lo
        elif v > hi:
            v = hi
        flat_out[i] = (v - mean) / std


def ct_normalize(image: np.ndarray, lower: float, upper: float, mean: float, std: float, out: np.ndarray | None = None):
    """nnU-Net's CTNormalization of one channel: clip to [lower, upper], subtract ``mean``, divide by ``max(std, 1e-8)``.

    Parameters
    ----------
    image : ndarray, any real dtype, any shape (one channel, e.g. (x, y, z))
    lower, upper, mean, std : dataset foreground statistics (p0.5, p99.5, mean, std) from the fingerprint
    out : optional float32 C-contiguous output of the same shape (may be ``image`` itself if float32 C-contiguous)

    Returns
    -------
    float32 ndarray of ``image.shape``
    """
    image = np.ascontiguousarray(image)
    if out is None:
        out = np.empty(image.shape, np.float32)
    if out.shape != image.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ShapeError(f"out must be a C-contiguous float32 array of shape {image.shape}, got {out.dtype} {out.shape}")
    if not np.isfinite([lower, upper, mean, std]).all():
        raise PlanError(f"CT normalization needs finite statistics, got lower={lower}, upper={upper}, mean={mean}, std={std}")
    lo, hi, mu, sd = np.float32(lower), np.float32(upper), np.float32(mean), np.float32(max(std, 1e-8))
    img, dst = _slabbable(image, out)
    # x-slabs on the threads this process may use (kernel_threads); elementwise, so the same floats
    run_slabs(lambda a, b: _ct_normalize(img[a:b], dst[a:b], lo, hi, mu, sd), img.shape[0], items=img.size)
    return out


def _slabbable(*arrays):
    """The arrays with at least one axis to cut into slabs (a 0-d array becomes shape (1,), sharing memory)."""
    return tuple(a if a.ndim else a.reshape(1) for a in arrays)


@serial
def _masked_moments(img, mask):
    flat = img.ravel()
    m = mask.ravel()
    n = 0
    s = 0.0
    for i in range(flat.size):
        if m[i]:
            n += 1
            s += flat[i]
    if n == 0:
        return 0, np.nan, np.nan
    mean = s / n
    ss = 0.0
    for i in range(flat.size):
        if m[i]:
            d = flat[i] - mean
            ss += d * d
    return n, mean, np.sqrt(ss / n)


@serial
def _all_moments(img):
    flat = img.ravel()
    n = flat.size
    s = 0.0
    for i in range(n):
        s += flat[i]
    mean = s / n
    ss = 0.0
    for i in range(n):
        d = flat[i] - mean
        ss += d * d
    return mean, np.sqrt(ss / n)


def masked_moments(image: np.ndarray, mask: np.ndarray | None) -> tuple[int, float, float]:
    """Count, mean and standard deviation (ddof 0, float64 accumulation) of ``image`` where ``mask`` (all if None)."""
    image = np.ascontiguousarray(image)
    if mask is None:
        if image.size == 0:
            return 0, float("nan"), float("nan")
        mean, std = _all_moments(image)
        return image.size, float(mean), float(std)
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    if mask.shape != image.shape:
        raise ShapeError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    n, mean, std = _masked_moments(image, mask)
    return int(n), float(mean), float(std)


@serial
def _zscore_masked(img, mask, out, mean, std):
    flat_in = img.ravel()
    flat_out = out.ravel()
    m = mask.ravel()
    for i in range(flat_in.size):
        v = np.float32(flat_in[i])
        flat_out[i] = (v - mean) / std if m[i] else v


@serial
def _zscore_all(img, out, mean, std):
    flat_in = img.ravel()
    flat_out = out.ravel()
    for i in range(flat_in.size):
        flat_out[i] = (np.float32(flat_in[i]) - mean) / std


def zscore_normalize(image: np.ndarray, mask: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """nnU-Net's ZScoreNormalization of one channel.

    With ``mask`` (nnU-Net: ``seg >= 0``, the nonzero region) mean/std come from the masked voxels and only those are
    normalized (the rest keeps its value, which is 0 outside the nonzero region); without, the whole channel is used.
    The divisor is ``max(std, 1e-8)``.
    """
    image = np.ascontiguousarray(image)
    if out is None:
        out = np.empty(image.shape, np.float32)
    if out.shape != image.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ShapeError(f"out must be a C-contiguous float32 array of shape {image.shape}")
    n, mean, std = masked_moments(image, mask)
    if n == 0:
        out[...] = image
        return out
    std32 = np.float32(max(std, 1e-8))
    mean32 = np.float32(mean)
    img, dst = _slabbable(image, out)
    if mask is None:
        def slab(a, b):
            _zscore_all(img[a:b], dst[a:b], mean32, std32)
    else:
        (m,) = _slabbable(np.ascontiguousarray(mask, dtype=np.bool_))

        def slab(a, b):
            _zscore_masked(img[a:b], m[a:b], dst[a:b], mean32, std32)
    # x-slabs on the threads this process may use; the moments above stay serial (their float64 sums)
    run_slabs(slab, img.shape[0], items=img.size)
    return out


@register_warmup
def _warmup() -> None:
    """Compile the signatures preprocessing passes: float32 images (other dtypes compile on first use)."""
    for dt in (np.float32,):
        a = np.zeros((2, 2, 2), dt)
        ct_normalize(a, -1.0, 1.0, 0.0, 1.0)
        zscore_normalize(a, np.ones((2, 2, 2), bool))
        zscore_normalize(a, None)
