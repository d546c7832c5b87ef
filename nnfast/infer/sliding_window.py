"""Sliding-window prediction of one preprocessed case (nnU-Net v2's ``predict_sliding_window_return_logits``).

nnU-Net rule (``nnunetv2/inference/sliding_window_prediction.py`` and ``nnUNetPredictor``, v2.8.1):

- the image is padded with zeros to at least the patch size, content centred (``acvl_utils``'s ``pad_nd_image``:
  ``diff // 2`` below, the rest above), and the padding is removed from the result;
- tiles start at :func:`compute_steps` positions along every axis;
- each tile is predicted, optionally averaged over every non-empty combination of the allowed mirror axes (test-time
  augmentation: 8 forward passes in 3D, 4 in 2D), multiplied by the Gaussian importance map
  (:func:`gaussian_importance_map`) and added to the accumulated logits; the importance map is added to a weight map;
- at the end the logits are divided by the weights;
- a 2D configuration on a 3D image predicts every slice along the first axis with 2D tiles.

Differences from nnU-Net, on purpose:

- Accumulation is in **float32** (nnU-Net: float16, on the GPU and, with ``perform_everything_on_device=False``, on
  the CPU too). float16 sums of Gaussian-weighted logits lose about 3 decimal digits and can overflow to ``inf``
  (nnU-Net then aborts and suggests fp32). The accumulator lives on the compute device when it fits in
  ``device_memory_fraction`` of the free device memory, else in CPU memory (nnU-Net tries the device and falls back
  to the CPU after an out-of-memory error).
- Several tiles can go through the network in one batch (``batch_tiles``); the network's InstanceNorm is per
  sample, so this changes nothing but speed. nnU-Net predicts one tile per forward pass.
- The weight map is built once from the Gaussian and the tile positions (it does not depend on the data).

Axis order: ``data`` is ``(c, x, y, z)`` in nnU-Net's axis order after transposition; the patch size is the plan's
(3 entries for 3D, 2 for 2D configurations, which then cover the last two axes).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..device import resolve_device
from ..errors import GeometryError

__all__ = [
    "compute_steps",
    "gaussian_importance_map",
    "mirror_combinations",
    "tile_positions",
    "predict_sliding_window",
]

log = logging.getLogger(__name__)


def compute_steps(image_size: Sequence[int], patch: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Start positions of the tiles along every axis (nnU-Net's ``compute_steps_for_sliding_window``).

    ``num_steps = ceil((size - patch) / (patch * step)) + 1`` per axis, spread evenly from 0 to ``size - patch``
    and rounded half to even (``np.round``). E.g. size 110, patch 64, step 0.5 -> ``[0, 23, 46]``.

    Parameters
    ----------
    image_size : sequence of int
        Spatial size of the (padded) image, each ``>= patch``.
    patch : sequence of int
        Tile size, same number of axes.
    step : float
        Tile step as a fraction of the patch size, in ``(0, 1]``.

    Returns
    -------
    list of lists of int
        The start positions along each axis.

    Raises
    ------
    GeometryError
        If the image is smaller than the patch along an axis, the lengths differ or ``step`` is out of range.
    """
    if len(image_size) != len(patch):
        raise GeometryError(f"image size {tuple(image_size)} and patch size {tuple(patch)} must have the same number "
                            "of axes")
    if not 0 < step <= 1:
        raise GeometryError(f"the tile step must be in (0, 1] (a fraction of the patch size); got {step}")
    if any(int(i) < int(p) for i, p in zip(image_size, patch)):
        raise GeometryError(f"image size {tuple(image_size)} must be at least the patch size {tuple(patch)} on every "
                            "axis (pad the image first)")
    steps = []
    for size, p in zip(image_size, patch):
        size, p = int(size), int(p)
        n = int(np.ceil((size - p) / (p * step))) + 1
        if n > 1:
            width = (size - p) / (n - 1)
            steps.append([int(np.round(width * i)) for i in range(n)])
        else:
            steps.append([0])
    return steps


@lru_cache(maxsize=8)
def _gaussian_cached(patch: tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    # nnU-Net blurs a unit impulse with scipy's 3D ``gaussian_filter`` (mode "constant", truncate 4): one 1D pass per
    # axis over the whole patch, ~0.5 s for 56x224x224, plus ~0.4 s to import scipy.ndimage. An impulse is a product
    # of 1D impulses, and blurring a 1D impulse places the normalized kernel (scipy's ``_gaussian_kernel1d``: exp of
    # -x^2 / (2 sigma^2) on -radius..radius, divided by its sum) around it, every other term of the correlation being
    # an exact zero. So every voxel is the product of the per-axis kernels, multiplied in scipy's axis order: the map
    # is bit-identical (tests/infer/test_sliding_window.py compares it with nnU-Net's ``compute_gaussian``).
    g = np.ones((), np.float64)
    for p in patch:
        sigma = p * sigma_scale
        radius = int(4.0 * float(sigma) + 0.5)
        x = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 / (sigma * sigma) * x ** 2)
        kernel = kernel / kernel.sum()
        offset = np.arange(p) - p // 2
        line = np.where(np.abs(offset) <= radius, kernel[np.clip(offset + radius, 0, 2 * radius)], 0.0)
        g = g[..., None] * line
    g /= np.max(g) / value_scaling_factor
    g = g.astype(np.float32)
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    g.setflags(write=False)
    return g


def gaussian_importance_map(patch: Sequence[int], sigma_scale: float = 1.0 / 8,
                            value_scaling_factor: float = 10.0) -> np.ndarray:
    """nnU-Net's Gaussian tile weighting (``compute_gaussian``).

    A unit impulse at the patch centre (``p // 2``) blurred with ``scipy.ndimage.gaussian_filter`` (sigma
    ``p * sigma_scale`` per axis, ``mode='constant'``), scaled so that its maximum is ``value_scaling_factor``,
    computed in float64 and stored as float32; zeros (far corners) are replaced by the smallest nonzero value so
    that no voxel has weight 0.

    Parameters
    ----------
    patch : sequence of int
        Tile size (2 or 3 axes).
    sigma_scale : float
        Sigma as a fraction of the patch size (nnU-Net: 1/8).
    value_scaling_factor : float
        Maximum of the map (nnU-Net's predictor: 10).

    Returns
    -------
    ndarray, shape ``patch``, float32, read-only (cached)
    """
    return _gaussian_cached(tuple(int(p) for p in patch), float(sigma_scale), float(value_scaling_factor))


def mirror_combinations(mirror_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """Every non-empty combination of ``mirror_axes`` in nnU-Net's order (singles first, then pairs, ...)."""
    if not mirror_axes:
        return []
    axes = [int(a) for a in mirror_axes]
    return [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]


def tile_positions(image_size: Sequence[int], patch: Sequence[int], step: float = 0.5) -> list[tuple[int, ...]]:
    """Start corners of every tile, in nnU-Net's order (the first axis varies slowest).

    For a 2D patch on a 3D ``image_size`` the first coordinate is the slice index and the tiles cover the last two
    axes.
    """
    image_size = [int(s) for s in image_size]
    if len(patch) == len(image_size) - 1:
        steps = [list(range(image_size[0]))] + compute_steps(image_size[1:], patch, step)
    else:
        steps = compute_steps(image_size, patch, step)
    return list(itertools.product(*steps))


def _pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """``pad_nd_image``'s centred zero padding of the last ``len(patch)`` axes of ``shape`` up to ``patch``."""
    lead = len(shape) - len(patch)
    pads = [(0, 0)] * lead
    for s, p in zip(shape[lead:], patch):
        diff = max(int(p) - int(s), 0)
        pads.append((diff // 2, diff // 2 + diff % 2))
    return pads


def _accumulator_device(compute_device, nbytes: int, fraction: float):
    """The compute device when the accumulator fits in ``fraction`` of its free memory, else the CPU."""
    import torch

    if compute_device.type != "cuda":
        return torch.device("cpu")
    try:
        free, _total = torch.cuda.mem_get_info(compute_device)
    except Exception:  # pragma: no cover - exotic backends
        return torch.device("cpu")
    return compute_device if nbytes <= fraction * free else torch.device("cpu")


def predict_sliding_window(
    network,
    data: np.ndarray,
    patch: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    use_gaussian: bool = True,
    mirror_axes: Sequence[int] | None = None,
    device="auto",
    batch_tiles: int = 1,
    *,
    amp: bool | None = None,
    device_memory_fraction: float = 0.5,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Logits of ``network`` for a whole preprocessed case, by Gaussian-weighted sliding-window tiles.

    Parameters
    ----------
    network : torch.nn.Module
        Maps ``(b, c, *patch)`` float32 to logits ``(b, num_classes, *patch)`` (deep supervision off). It is put
        in eval mode and moved to ``device``.
    data : ndarray, shape (c, x, y, z), float32
        The preprocessed case (nnU-Net axis order). Not modified. A torch tensor is accepted too.
    patch : sequence of int
        The configuration's patch size: 3 entries, or 2 for a 2D configuration (each slice along ``x`` is then
        predicted on its own).
    num_classes : int
        Output channels of the network.
    step : float
        Tile step as a fraction of the patch (nnU-Net: 0.5).
    use_gaussian : bool
        Weight tiles with :func:`gaussian_importance_map` (else uniformly).
    mirror_axes : sequence of int or None
        Spatial axes of the patch (0-based) to mirror for test-time augmentation; None or empty: no TTA.
    device : str or torch.device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    batch_tiles : int
        Tiles per forward pass.
    amp : bool or None
        float16 autocast for the network; None: on for CUDA, off elsewhere (as nnU-Net).
    device_memory_fraction : float
        The accumulator stays on a CUDA device when it needs at most this fraction of the free device memory.
    out : ndarray, optional
        float32 C-contiguous ``(num_classes, x, y, z)`` array to add this prediction to (fold ensembling); the
        result is written there and returned.

    Returns
    -------
    ndarray, shape (num_classes, x, y, z), float32
        Averaged logits on ``data``'s grid (padding removed).

    Raises
    ------
    GeometryError
        If ``data`` is not 4D, the patch has the wrong number of axes, a mirror axis does not exist or ``step`` is
        out of range.
    """
    import torch

    if isinstance(data, np.ndarray):
        if data.ndim != 4:
            raise GeometryError(f"data must have shape (c, x, y, z); got {data.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    else:
        tensor = data.float().contiguous()
        if tensor.ndim != 4:
            raise GeometryError(f"data must have shape (c, x, y, z); got {tuple(tensor.shape)}")
    patch = tuple(int(p) for p in patch)
    nd = len(patch)
    if nd not in (2, 3):
        raise GeometryError(f"the patch size must have 2 or 3 entries; got {patch}")
    mirror = mirror_combinations(mirror_axes)
    if mirror and max(max(c) for c in mirror) >= nd:
        raise GeometryError(f"mirror axes {tuple(mirror_axes)} do not exist for a {nd}D patch {patch}")
    batch_tiles = max(1, int(batch_tiles))
    dev = resolve_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)

    shape = tuple(int(s) for s in tensor.shape[1:])
    pads = _pad_amounts(tensor.shape, patch)
    padded = any(lo or hi for lo, hi in pads)
    if padded:
        flat = [v for lo_hi in reversed(pads) for v in lo_hi]  # F.pad takes the last axis first
        tensor = torch.nn.functional.pad(tensor, flat, mode="constant", value=0.0)
    pshape = tuple(int(s) for s in tensor.shape[1:])
    corners = tile_positions(pshape, patch, step)

    acc_bytes = (num_classes + 1) * int(np.prod(pshape)) * 4
    acc_dev = _accumulator_device(dev, acc_bytes, device_memory_fraction)
    if out is not None and (out.shape != (num_classes, *shape) or out.dtype != np.float32
                            or not out.flags.c_contiguous):
        raise GeometryError(f"out must be a C-contiguous float32 array of shape {(num_classes, *shape)}; got "
                            f"{out.shape} {out.dtype}")
    acc = torch.zeros((num_classes, *pshape), dtype=torch.float32, device=acc_dev)
    weight = torch.zeros(pshape, dtype=torch.float32, device=acc_dev)
    gauss = torch.from_numpy(np.array(gaussian_importance_map(patch)) if use_gaussian else np.ones(patch, np.float32))
    gauss_acc = gauss.to(acc_dev)
    gauss_dev = gauss.to(dev)
    for corner in corners:  # the weight map depends on the tile layout only
        weight[_spatial_slicer(corner, patch)] += gauss_acc
    source = tensor.to(dev) if dev.type == "cuda" else tensor
    n_fwd = len(corners) * (1 + len(mirror))
    log.debug("sliding window: %s padded to %s, %d tiles of %s, %d forward passes, batch %d, accumulate on %s",
              shape, pshape, len(corners), patch, n_fwd, batch_tiles, acc_dev)

    network = network.to(dev)
    network.eval()
    flip_dims = [tuple(a + 2 for a in comb) for comb in mirror]
    with torch.inference_mode():
        autocast = torch.autocast(dev.type, dtype=torch.float16) if use_amp else contextlib.nullcontext()
        with autocast:
            for b0 in range(0, len(corners), batch_tiles):
                batch_corners = corners[b0:b0 + batch_tiles]
                x = torch.stack([_tile(source, c, patch) for c in batch_corners]).to(dev, non_blocking=True)
                pred = network(x).float()
                for dims in flip_dims:
                    pred += torch.flip(network(torch.flip(x, dims)), dims).float()
                if flip_dims:
                    pred /= len(flip_dims) + 1
                pred *= gauss_dev
                pred = pred.to(acc_dev)
                for i, c in enumerate(batch_corners):
                    acc[(slice(None), *_spatial_slicer(c, patch))] += pred[i]
        acc /= weight
        del weight
    if padded:
        crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads[1:], shape))
        acc = acc[(slice(None), *crop)]
    result = acc.cpu()
    if out is not None:
        out_t = torch.from_numpy(out)
        out_t += result
        return out
    return np.ascontiguousarray(result.numpy())


def _spatial_slicer(corner: tuple[int, ...], patch: tuple[int, ...]) -> tuple:
    """Spatial index of a tile: for a 2D patch ``corner = (slice, y, z)`` and the slice axis is an integer."""
    if len(corner) == len(patch):
        return tuple(slice(c, c + p) for c, p in zip(corner, patch))
    return (corner[0], *(slice(c, c + p) for c, p in zip(corner[1:], patch)))


def _tile(source, corner: tuple[int, ...], patch: tuple[int, ...]):
    return source[(slice(None), *_spatial_slicer(corner, patch))]
