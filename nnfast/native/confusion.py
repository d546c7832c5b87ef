"""Joint histogram of a reference and a predicted label map: every per-label/region TP/FP/FN/TN in one pass.

nnU-Net's ``compute_metrics`` builds two boolean masks per label or region and sums four mask products over the
whole volume for each (``evaluation/evaluate_predictions.py``): about ten passes per label. Every one of those
counts is a sum over a few cells of the joint histogram ``C[bin(ref), bin(pred)]``, where a bin is one of the
label values of interest (the labels that appear in the labels/regions and the ignore label) or "any other value".
:func:`joint_histogram` computes ``C`` in one pass; :mod:`nnfast.evaluate.metrics` turns it into the counts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnfast.errors import InputTypeError, ShapeError, UsageError

from ._jit import register_warmup, serial

__all__ = ["joint_histogram", "joint_histogram_runs"]


_BLOCK = 32  # voxels compared at once for uniform blocks


@serial
def _joint_histogram(ref, pred, lut, lo, out):
    """out[bin(ref[i]), bin(pred[i])] += 1 for every i; bin(v) = lut[v - lo] inside the table, else the last bin.

    ref, pred: 1D integer arrays of equal length. lut: 1D int64. out: (n_bins, n_bins) int64, accumulated into.
    """
    n_lut = lut.shape[0]
    other = out.shape[0] - 1
    n = ref.shape[0]
    n_blocks = n // _BLOCK
    for b in range(n_blocks):
        i = b * _BLOCK
        r0 = ref[i]
        p0 = pred[i]
        # label maps are piecewise constant: count a whole block at once when both maps are uniform on it
        # (two separate OR-reductions so that LLVM vectorises them)
        differs = False
        for k in range(_BLOCK):
            differs |= ref[i + k] != r0
        for k in range(_BLOCK):
            differs |= pred[i + k] != p0
        if not differs:
            r = r0 - lo
            p = p0 - lo
            br = lut[r] if r >= 0 and r < n_lut else other
            bp = lut[p] if p >= 0 and p < n_lut else other
            out[br, bp] += _BLOCK
            continue
        for k in range(i, i + _BLOCK):
            r = ref[k] - lo
            p = pred[k] - lo
            br = lut[r] if r >= 0 and r < n_lut else other
            bp = lut[p] if p >= 0 and p < n_lut else other
            out[br, bp] += 1
    for k in range(n_blocks * _BLOCK, n):
        r = ref[k] - lo
        p = pred[k] - lo
        br = lut[r] if r >= 0 and r < n_lut else other
        bp = lut[p] if p >= 0 and p < n_lut else other
        out[br, bp] += 1


@serial
def _joint_histogram_runs(ref, pred, runs, lut, lo, out):
    """Like :func:`_joint_histogram` over the voxels of ``runs`` (rows z, y, x_start, x_end) of 3D ``ref``/``pred``."""
    n_lut = lut.shape[0]
    other = out.shape[0] - 1
    for r in range(runs.shape[0]):
        z = runs[r, 0]
        y = runs[r, 1]
        for x in range(runs[r, 2], runs[r, 3]):
            a = ref[z, y, x] - lo
            b = pred[z, y, x] - lo
            br = lut[a] if a >= 0 and a < n_lut else other
            bp = lut[b] if b >= 0 and b < n_lut else other
            out[br, bp] += 1


def _flat_pair(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1D views of two equally shaped arrays that enumerate the voxels in the same order (no copy when possible)."""
    if ref.flags.c_contiguous and pred.flags.c_contiguous:
        return ref.reshape(-1), pred.reshape(-1)
    if ref.flags.f_contiguous and pred.flags.f_contiguous:
        return ref.ravel(order="F"), pred.ravel(order="F")
    return np.ascontiguousarray(ref).reshape(-1), np.ascontiguousarray(pred).reshape(-1)


def _prepare(ref, pred, values):
    if not isinstance(ref, np.ndarray) or not isinstance(pred, np.ndarray):
        raise InputTypeError("ref and pred must be numpy arrays")
    if ref.shape != pred.shape:
        raise ShapeError(f"ref and pred must have the same shape; got {ref.shape} and {pred.shape}")
    for name, a in (("ref", ref), ("pred", pred)):
        if a.dtype.kind not in "iub":
            raise ShapeError(f"{name} must be an integer label map; got dtype {a.dtype}")
    vals = [int(v) for v in values]
    if len(set(vals)) != len(vals):
        raise UsageError(f"values must be distinct; got {vals}")
    if ref.dtype == np.bool_:
        ref = ref.view(np.uint8)
    if pred.dtype == np.bool_:
        pred = pred.view(np.uint8)
    lo = min(vals) if vals else 0
    lut = np.full(max(vals) - lo + 1 if vals else 1, len(vals), np.int64)
    for k, v in enumerate(vals):
        lut[v - lo] = k
    out = np.zeros((len(vals) + 1, len(vals) + 1), np.int64)
    return ref, pred, lut, np.int64(lo), out


def joint_histogram(ref: np.ndarray, pred: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Count voxel pairs ``(ref value, pred value)``, with every value outside ``values`` in one extra bin.

    Parameters
    ----------
    ref, pred : ndarray, same shape (any number of axes, e.g. (z, y, x)), integer or boolean dtypes (may differ),
        any layout
        Reference and predicted label maps.
    values : sequence of int, distinct
        The label values to keep apart; bin ``k`` holds value ``values[k]``, bin ``len(values)`` everything else.

    Returns
    -------
    ndarray of int64, shape (len(values) + 1, len(values) + 1)
        ``C[i, j]`` = number of voxels with ``ref`` in bin ``i`` and ``pred`` in bin ``j``.

    Raises
    ------
    TypeError, ValueError
        Non-array input, differing shapes, non-integer dtypes, repeated values.
    """
    ref, pred, lut, lo, out = _prepare(ref, pred, values)
    r, p = _flat_pair(ref, pred)
    _joint_histogram(r, p, lut, lo, out)
    return out


def joint_histogram_runs(ref: np.ndarray, pred: np.ndarray, runs: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """:func:`joint_histogram` restricted to the voxels of ``runs``.

    Parameters
    ----------
    ref, pred : ndarray, 2D or 3D, same shape, integer/boolean dtypes, any layout (2D arrays count as (1, y, x))
    runs : ndarray of int, shape (n, 4)
        Rows ``(z, y, x_start, x_end)``, half-open in x, as
        :func:`nnfast.native.components.runs_outside_largest_component` returns them.
    values : sequence of int, distinct

    Returns
    -------
    ndarray of int64, shape (len(values) + 1, len(values) + 1)
    """
    ref, pred, lut, lo, out = _prepare(ref, pred, values)
    if ref.ndim == 2:
        ref, pred = ref[None], pred[None]
    if ref.ndim != 3:
        raise ShapeError(f"ref and pred must be 2D or 3D; got shape {ref.shape}")
    runs = np.ascontiguousarray(runs, np.int64).reshape(-1, 4)
    if runs.shape[0]:
        if runs[:, :3].min() < 0 or runs[:, 0].max() >= ref.shape[0] or runs[:, 1].max() >= ref.shape[1] \
                or runs[:, 3].max() > ref.shape[2]:
            raise ShapeError(f"runs reach outside the arrays of shape {ref.shape}")
        _joint_histogram_runs(ref, pred, runs, lut, lo, out)
    return out


@register_warmup
def _warmup() -> None:
    for dr in (np.uint8, np.int16, np.int32):
        for dp in (np.uint8, np.int16, np.int32):
            joint_histogram(np.zeros(3, dr), np.ones(3, dp), [0, 1])
            joint_histogram_runs(np.zeros((1, 1, 3), dr), np.ones((1, 1, 3), dp), np.array([[0, 0, 0, 2]]), [0, 1])
