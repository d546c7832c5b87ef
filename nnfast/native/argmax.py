"""Reductions over the class axis for exporting predictions: a running argmax, merging two of them, softmax.

nnU-Net's export (``convert_predicted_logits_to_segmentation_with_correct_shape``) resamples every class of the
logits and then takes ``np.argmax`` over axis 0, or a softmax for the probabilities. :mod:`nnfast.infer.export`
resamples a few classes at a time instead and folds each group into a running maximum and its class index
(:func:`argmax_update`), so memory stays ``O(voxels)`` whatever the number of classes; groups of classes done on
different threads are combined with :func:`argmax_merge`. Ties keep the lower class index, as ``np.argmax`` does.

Arrays are flattened over space: ``(C, n)`` with ``C`` classes and ``n`` voxels (any spatial axis order; the caller
reshapes). Values are float32 (nnU-Net's logits dtype); the wrappers convert other float inputs where they are read
only and refuse outputs they cannot write in place.
"""
from __future__ import annotations

import numpy as np

from ._jit import register_warmup, serial

__all__ = ["argmax_update", "argmax_merge", "softmax_inplace", "argmax_channels"]


# --------------------------------------------------------------------------------------------- kernels
@serial
def _argmax_update(chunk, first, best, label):
    """Fold ``chunk`` (k, n) of classes ``first .. first + k - 1`` into the running ``best`` (n,) / ``label`` (n,).

    Strict ``>``: on ties the lower class index stays (``np.argmax`` semantics when called in class order)."""
    k, n = chunk.shape
    for i in range(n):
        b = best[i]
        lab = label[i]
        for c in range(k):
            v = chunk[c, i]
            if v > b:
                b = v
                lab = first + c
        best[i] = b
        label[i] = lab


@serial
def _argmax_merge(best, label, best2, label2):
    """Merge a running argmax of higher classes (``best2``/``label2``) into ``best``/``label`` (strict ``>``)."""
    for i in range(best.shape[0]):
        if best2[i] > best[i]:
            best[i] = best2[i]
            label[i] = label2[i]


@serial
def _softmax_inplace(x):
    """Softmax over axis 0 of ``x`` (k, n) float32, in place; float64 per-voxel sums."""
    k, n = x.shape
    for i in range(n):
        m = x[0, i]
        for c in range(1, k):
            if x[c, i] > m:
                m = x[c, i]
        s = 0.0
        for c in range(k):
            e = np.exp(np.float32(x[c, i] - m))
            x[c, i] = e
            s += e
        inv = 1.0 / s
        for c in range(k):
            x[c, i] = np.float32(x[c, i] * inv)


# --------------------------------------------------------------------------------------------- wrappers
def _running(best: np.ndarray, label: np.ndarray, what: str) -> int:
    """Check a running argmax (float32 ``best`` and integer ``label``, both (n,), C-contiguous, writeable); its n."""
    for name, a in ((f"{what}best", best), (f"{what}label", label)):
        if not isinstance(a, np.ndarray) or a.ndim != 1 or not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"{name} must be a writeable, C-contiguous 1D numpy array")
    if best.dtype != np.float32:
        raise TypeError(f"{what}best must be float32; got {best.dtype}")
    if label.dtype.kind not in "iu":
        raise TypeError(f"{what}label must be an integer array; got {label.dtype}")
    if best.shape != label.shape:
        raise ValueError(f"{what}best {best.shape} and {what}label {label.shape} differ in shape")
    return best.shape[0]


def _classes(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (k, n) array (a copy only when needed)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must have shape (classes, voxels); got {x.shape}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold numbers; got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def argmax_update(chunk: np.ndarray, first: int, best: np.ndarray, label: np.ndarray) -> None:
    """Fold classes ``first .. first + k - 1`` into a running argmax, in place.

    Parameters
    ----------
    chunk : (k, n) array
        The values of ``k`` consecutive classes at ``n`` voxels (converted to float32 if needed).
    first : int
        Class index of ``chunk[0]``.
    best : (n,) float32, C-contiguous
        Running maximum (start from ``-inf``); updated in place.
    label : (n,) integer, C-contiguous
        Class index of ``best`` (start from 0); updated in place.

    Raises
    ------
    ValueError, TypeError
        Shapes, dtypes or layouts that do not fit, or class indices ``label`` cannot hold.
    """
    n = _running(best, label, "")
    chunk = _classes(chunk, "chunk")
    if chunk.shape[1] != n:
        raise ValueError(f"chunk has {chunk.shape[1]} voxels but best has {n}")
    first = int(first)
    if first < 0 or first + chunk.shape[0] - 1 > np.iinfo(label.dtype).max:
        raise ValueError(f"class indices {first}..{first + chunk.shape[0] - 1} do not fit label's {label.dtype}")
    _argmax_update(chunk, first, best, label)


def argmax_merge(best: np.ndarray, label: np.ndarray, best2: np.ndarray, label2: np.ndarray) -> None:
    """Merge the running argmax ``best2``/``label2`` of higher classes into ``best``/``label``, in place (ties keep
    ``label``, the lower classes). Arrays as in :func:`argmax_update`; ``label2`` has ``label``'s dtype."""
    n = _running(best, label, "")
    best2 = np.ascontiguousarray(best2)
    label2 = np.ascontiguousarray(label2)
    if best2.dtype != np.float32 or best2.shape != (n,) or label2.shape != (n,) or label2.dtype != label.dtype:
        raise ValueError(f"best2/label2 must be float32/{label.dtype} of shape ({n},); got {best2.dtype} "
                         f"{best2.shape} and {label2.dtype} {label2.shape}")
    _argmax_merge(best, label, best2, label2)


def softmax_inplace(x: np.ndarray) -> None:
    """Softmax over axis 0 of ``x`` (classes, voxels) float32, in place (float32 exponentials of ``x - max``,
    float64 per-voxel sums, as exact as ``torch.softmax`` in float32).

    Raises
    ------
    ValueError, TypeError
        ``x`` is not a writeable, C-contiguous 2D float32 array.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not x.flags.c_contiguous or not x.flags.writeable:
        raise ValueError("softmax_inplace: x must be a writeable, C-contiguous (classes, voxels) numpy array")
    if x.dtype != np.float32:
        raise TypeError(f"softmax_inplace: x must be float32; got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("softmax_inplace: x has no classes")
    _softmax_inplace(x)


def argmax_channels(x: np.ndarray, dtype=np.uint8) -> np.ndarray:
    """``np.argmax(x, axis=0)`` for an array ``x`` of shape (C, ...) in one pass, as ``dtype``.

    ``x`` is compared in float32 (nnU-Net's logits and probabilities dtype); ties keep the lower class. Any memory
    order; the result has ``x.shape[1:]``.

    Raises
    ------
    ValueError, TypeError
        ``x`` has no class axis or no classes, does not hold numbers, or ``dtype`` cannot hold ``C - 1``.
    """
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"argmax_channels: x must have a non-empty class axis first; got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"argmax_channels: x must hold numbers; got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(x.shape[0], -1)
    best = np.full(flat.shape[1], -np.inf, np.float32)
    label = np.zeros(flat.shape[1], dtype)
    argmax_update(flat, 0, best, label)
    return label.reshape(x.shape[1:])


@register_warmup
def _warmup() -> None:
    for dtype in (np.uint8, np.uint16):
        x = np.zeros((2, 3), np.float32)
        best = np.full(3, -np.inf, np.float32)
        label = np.zeros(3, dtype)
        _argmax_update(x, 0, best, label)
        _argmax_merge(best, label, best.copy(), label.copy())
    _softmax_inplace(np.zeros((2, 3), np.float32))
