"""nnU-Net v2's training transforms for one sample, from the region :func:`~nnfast.data.augment_params.needed_region`
asked for (batchgeneratorsv2 0.3.6 semantics, ``nnUNetTrainer.get_training_transforms`` of nnunetv2 2.8.1).

Order (as nnU-Net): spatial (rotation/scaling resampling, or a pure crop) -> GaussianNoise (p 0.1) ->
GaussianBlur (p 0.2) -> MultiplicativeBrightness (p 0.15) -> Contrast (p 0.15) -> SimulateLowResolution (p 0.25)
-> Gamma inverted (p 0.1) -> Gamma (p 0.3) -> Mirror -> MaskImage (``use_mask_for_norm`` channels) -> label -1 -> 0
-> deep-supervision targets.

Where nnfast does the same work differently (same distributions, same results up to float rounding):

* Mirroring is folded into the spatial step: the resampling (or the crop) writes the patch mirrored. Noise, blur
  (symmetric kernel, reflect padding), brightness, contrast and gamma commute with flips; low resolution does not
  exactly (``nearest-exact`` picks are not symmetric), so it runs with the index maps of the mirrored axes
  reversed, which equals low resolution followed by the flip.
* Brightness and contrast on one channel are one pass (``y = clip(m f x + m mean (1 - f), m min, m max)``,
  ``m > 0``).
* Parameters are drawn from the caller's ``numpy.random.Generator``; the draw order differs from
  batchgeneratorsv2's (its global ``np.random`` and torch RNGs), the distributions do not.

The cascade (``cascade_labels`` given): the labels have a second channel, the previous stage's segmentation, warped
with the labels; after label -1 -> 0 it becomes one float32 channel per foreground label with nnU-Net's random
binary operators and component removal (:mod:`nnfast.data.cascade`), and the targets come from the first channel.

Not reproduced: ``ConvertSegmentationToRegionsTransform`` (region-based training); nnfast does not train regions
yet.

Array conventions: image ``(c, x, y, z)`` (or ``(c, y, z)`` for 2D configurations) float32, labels ``(s, ...)``
int8/int16 (``s == 1``, or 2 for the cascade), -1 outside the nonzero region and outside the stored case.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from nnfast.data.augment_params import AugmentConfig, Region, SpatialParams
from nnfast.data.cascade import CascadeParams, augment_onehot, onehot_into, sample_cascade
from nnfast.errors import ShapeError
from nnfast.native import augment as K
from nnfast.native import augment_intensity as KI
from nnfast.native.ds_targets import TargetDownsampler

__all__ = [
    "IntensityParams",
    "AugmentRecord",
    "AugmentedSample",
    "sample_intensity",
    "augment_sample",
    "spatial_patch",
    "deep_supervision_targets",
    "validation_transform",
]


# --------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class IntensityParams:
    """What the intensity transforms of one sample do. A field is None when its transform did not fire; otherwise
    it has one entry per image channel, None for channels it skips.

    noise_sigma : float, the standard deviation of the Gaussian noise added to every channel.
    blur_sigmas : per channel, one sigma per spatial axis (voxels).
    brightness, contrast : per channel multiplier / contrast factor.
    lowres_scales : per channel, one zoom factor per spatial axis (1 on ignored axes).
    gamma_inverted, gamma : per channel gamma of the inverted (p 0.1) and the plain (p 0.3) gamma transform.
    """

    noise_sigma: float | None
    blur_sigmas: tuple[tuple[float, ...] | None, ...] | None
    brightness: tuple[float | None, ...] | None
    contrast: tuple[float | None, ...] | None
    lowres_scales: tuple[tuple[float, ...] | None, ...] | None
    gamma_inverted: tuple[float | None, ...] | None
    gamma: tuple[float | None, ...] | None


@dataclass(frozen=True)
class AugmentRecord:
    """What fired for one sample (spatial and intensity parameters; the cascade's, when it has them)."""

    spatial: SpatialParams
    intensity: IntensityParams
    cascade: CascadeParams | None = None

    @property
    def fired(self) -> dict[str, bool]:
        """Transform name -> whether it fired (mirror: whether any axis flipped); the cascade's two only for cascade
        samples."""
        i = self.intensity
        out = {
            "rotation": self.spatial.rotated,
            "scaling": self.spatial.scaled,
            "mirror": bool(self.spatial.mirror_axes),
            "noise": i.noise_sigma is not None,
            "blur": i.blur_sigmas is not None,
            "brightness": i.brightness is not None,
            "contrast": i.contrast is not None,
            "lowres": i.lowres_scales is not None,
            "gamma_inverted": i.gamma_inverted is not None,
            "gamma": i.gamma is not None,
        }
        if self.cascade is not None:
            out["binary_operator"] = self.cascade.binary_operators is not None
            out["remove_component"] = self.cascade.remove_component is not None
        return out


class AugmentedSample(NamedTuple):
    """One training (or validation) sample.

    image : (c, *patch_size) float32.
    seg : (s, *patch_size), the input's label dtype, -1 replaced by 0 (the cascade: the labels only, ``s == 1``).
    targets : deep-supervision targets (``targets[0]`` is ``seg`` when the first scale is 1), None without
        deep supervision.
    record : what fired; None for :func:`validation_transform`.
    onehot : the cascade's previous-stage channels ``(n_labels, *patch_size)`` float32, else None.
    """

    image: np.ndarray
    seg: np.ndarray
    targets: list[np.ndarray] | None
    record: AugmentRecord | None
    onehot: np.ndarray | None = None


def _bg_contrast(rng: np.random.Generator, lo: float, hi: float) -> float:
    """batchgeneratorsv2 ``BGContrast``: with probability 0.5 (when ``lo < 1``) ``U(lo, 1)``, else ``U(max(lo, 1), hi)``."""
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo) if lo == hi else float(rng.uniform(lo, hi))


def sample_intensity(rng: np.random.Generator, cfg: AugmentConfig, n_channels: int) -> IntensityParams:
    """Draw the intensity transforms of one sample with nnU-Net's probabilities (no data touched).

    GaussianNoise p 0.1, sigma ``U(0, 0.1)`` shared by all channels; GaussianBlur p 0.2, each channel with p 0.5,
    sigma ``U(0.5, 1)`` per axis; MultiplicativeBrightness p 0.15, per channel ``BGContrast(0.75, 1.25)``;
    Contrast p 0.15, same; SimulateLowResolution p 0.25, each channel with p 0.5, one zoom ``U(0.5, 1)`` for all axes
    (axis 0 kept in dummy-2D); Gamma p 0.1 inverted and p 0.3 plain, per channel ``BGContrast(0.7, 1.5)``.
    """
    nd = cfg.ndim
    chans = range(n_channels)
    noise = _uniform(rng, *cfg.noise_sigma) if rng.random() < cfg.p_noise else None
    blur = None
    if rng.random() < cfg.p_blur:
        blur = tuple(tuple(_uniform(rng, *cfg.blur_sigma) for _ in range(nd))
                     if rng.random() < cfg.blur_p_per_channel else None for _ in chans)
    bright = tuple(_bg_contrast(rng, *cfg.brightness_range) for _ in chans) \
        if rng.random() < cfg.p_brightness else None
    contrast = tuple(_bg_contrast(rng, *cfg.contrast_range) for _ in chans) \
        if rng.random() < cfg.p_contrast else None
    lowres = None
    if rng.random() < cfg.p_lowres:
        per = []
        for _ in chans:
            if rng.random() < cfg.lowres_p_per_channel:
                s = _uniform(rng, *cfg.lowres_scale)
                per.append(tuple(1.0 if (cfg.do_dummy_2d and d == 0) else s for d in range(nd)))
            else:
                per.append(None)
        lowres = tuple(per)
    g_inv = tuple(_bg_contrast(rng, *cfg.gamma_range) for _ in chans) \
        if rng.random() < cfg.p_gamma_inverted else None
    g = tuple(_bg_contrast(rng, *cfg.gamma_range) for _ in chans) if rng.random() < cfg.p_gamma else None
    return IntensityParams(noise, blur, bright, contrast, lowres, g_inv, g)


# --------------------------------------------------------------------------------------------- spatial step
def _crop_into(src: np.ndarray, start: Sequence[int], out: np.ndarray, flips: Sequence[bool], pad_value) -> None:
    """``out[:] = src[:, start:start + P]`` (spatial axes) with ``pad_value`` outside ``src`` and the axes in
    ``flips`` reversed (2 or 3 spatial axes; the copy is :func:`nnfast.native.augment.copy_box`)."""
    size = out.shape[1:]
    src_lo, dst_lo, ext = [], [], []
    full = True
    for s0, p, n, f in zip(start, size, src.shape[1:], flips):
        v0, v1 = max(s0, 0), min(s0 + p, n)
        if v1 <= v0:
            out.fill(pad_value)
            return
        d0, d1 = v0 - s0, v1 - s0
        full &= d0 == 0 and d1 == p
        src_lo.append(v0)
        dst_lo.append(p - d1 if f else d0)
        ext.append(v1 - v0)
    dst = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)
    if not full:
        dst.fill(pad_value)
    src = np.ascontiguousarray(src, dtype=out.dtype)
    if out.ndim == 3:  # 2D configurations: one slice
        K.copy_box(src[:, None], dst[:, None], [0, *src_lo], [0, *dst_lo], [1, *ext], (False, *flips))
    else:
        K.copy_box(src, dst, src_lo, dst_lo, ext, flips)
    if dst is not out:
        out[...] = dst


def spatial_patch(image_region: np.ndarray, seg_region: np.ndarray, params: SpatialParams, cfg: AugmentConfig,
                  region: Region, out_image: np.ndarray | None = None,
                  out_seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The spatially augmented (rotated/scaled or cropped, and mirrored) patch; labels still hold -1.

    Parameters
    ----------
    image_region : (c, *region.shape) float32, the stored voxels of ``region`` (0 beyond the case).
    seg_region : (s, *region.shape) int8/int16, -1 beyond the case.
    params, cfg, region : from :func:`sample_spatial`, :class:`AugmentConfig`, :func:`needed_region`.
    out_image, out_seg : optional C-contiguous outputs (``(c, *patch_size)`` float32, ``(s, *patch_size)``).

    Returns
    -------
    (image (c, *patch_size) float32, seg (s, *patch_size))
    """
    ps = tuple(int(p) for p in cfg.patch_size)
    nd = len(ps)
    if image_region.ndim != nd + 1 or seg_region.ndim != nd + 1 or image_region.shape[1:] != seg_region.shape[1:]:
        raise ShapeError(f"spatial_patch: expected image (c, *spatial) and seg (s, *spatial) with {nd} spatial axes of "
                         f"one shape, got {image_region.shape} and {seg_region.shape}")
    if tuple(image_region.shape[1:]) != region.shape:
        raise ShapeError(f"spatial_patch: the arrays' spatial shape {image_region.shape[1:]} is not the region's "
                         f"{region.shape} (read exactly the box needed_region returned)")
    image_region = np.asarray(image_region, dtype=np.float32)
    flips = tuple(d in params.mirror_axes for d in range(nd))
    if out_image is None:
        out_image = np.empty((image_region.shape[0], *ps), np.float32)
    if out_seg is None:
        out_seg = np.empty((seg_region.shape[0], *ps), seg_region.dtype)
    c = region.centre
    if not params.transformed:
        start = [math.floor(c[d]) - ps[d] // 2 - region.lb[d] for d in range(nd)]
        _crop_into(image_region, start, out_image, flips, 0)
        _crop_into(seg_region, start, out_seg, flips, -1)
        return out_image, out_seg
    a = params.matrix()
    if params.transform_ndim == 3:
        centre = [c[d] - 0.5 - region.lb[d] for d in range(3)]
        return K.warp_3d(image_region, seg_region, a, centre, ps, flips, -1, out_image, out_seg)
    centre = [c[d] - 0.5 - region.lb[d] for d in range(nd - 2, nd)]
    if nd == 2:
        img4, seg4 = image_region[:, None], seg_region[:, None]
        oi, os_ = out_image[:, None], out_seg[:, None]
        K.warp_2d(img4, seg4, a, centre, ps, (False, *flips), -1, oi, os_)
        return out_image, out_seg
    # dummy-2D: crop axis 0 to the patch's slices (normally the region already is exactly those), warp in-plane
    s0 = math.floor(c[0]) - ps[0] // 2 - region.lb[0]
    if s0 != 0 or image_region.shape[1] != ps[0]:
        stack_i = np.empty((image_region.shape[0], ps[0], *image_region.shape[2:]), np.float32)
        stack_s = np.empty((seg_region.shape[0], ps[0], *seg_region.shape[2:]), seg_region.dtype)
        start = [s0, 0, 0]
        _crop_into(image_region, start, stack_i, (False,) * 3, 0)
        _crop_into(seg_region, start, stack_s, (False,) * 3, -1)
        image_region, seg_region = stack_i, stack_s
    return K.warp_2d(image_region, seg_region, a, centre, ps[1:], flips, -1, out_image, out_seg)


# --------------------------------------------------------------------------------------------- intensity step
@functools.lru_cache(maxsize=512)
def _nearest_idx(n_in: int, n_out: int, flipped: bool) -> np.ndarray:
    idx = KI.nearest_exact_indices(n_in, n_out)
    if flipped:  # the map of the mirrored axis: flip o down o flip
        idx = (n_in - 1 - idx[::-1]).copy()
    return idx  # shared by the cache: never modified (read-only flags would compile new kernel signatures)


@functools.lru_cache(maxsize=512)
def _linear_taps(n_in: int, n_out: int, flipped: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i0, i1, lam = KI.linear_taps(n_in, n_out)
    if flipped:
        i0, i1, lam = (n_in - 1 - i0[::-1]).copy(), (n_in - 1 - i1[::-1]).copy(), lam[::-1].copy()
    return i0, i1, lam  # shared by the cache: never modified


def _as3d(x: np.ndarray) -> np.ndarray:
    return x if x.ndim == 3 else x[None]


def _blur_channel(x: np.ndarray, sigmas: Sequence[float]) -> None:
    v = _as3d(x)
    off = 3 - x.ndim
    cur = v
    tmp = np.empty_like(v)
    for d, s in enumerate(sigmas):
        KI.blur_axis(cur, KI.gaussian_kernel_1d(s), d + off, out=tmp)
        cur, tmp = tmp, cur
    if cur is not v:
        v[...] = cur


def _lowres_channel(x: np.ndarray, scales: Sequence[float], flips: Sequence[bool]) -> None:
    shape = x.shape
    # batchgeneratorsv2 keeps the zoom in a float32 tensor and rounds ``size * zoom`` half to even
    new = [round(n * float(np.float32(s))) for n, s in zip(shape, scales)]
    idx = [_nearest_idx(n, m, f) for n, m, f in zip(shape, new, flips)]
    small = KI.gather_nd(x, tuple(idx))
    cur = _as3d(small)
    off = 3 - x.ndim
    resized = [d for d in range(x.ndim) if new[d] != shape[d]]
    for d in resized:  # the last axis resized writes straight into x
        out = _as3d(x) if d == resized[-1] and x.flags.c_contiguous else None
        cur = KI.linear_resize_axis(cur, _linear_taps(new[d], shape[d], flips[d]), d + off, out=out)
    if not resized or not x.flags.c_contiguous:
        x[...] = cur if x.ndim == 3 else cur[0]


def _apply_intensity(image: np.ndarray, p: IntensityParams, flips: Sequence[bool], rng: np.random.Generator) -> None:
    n_c = image.shape[0]
    if p.noise_sigma is not None:
        # torch's normal_ measured ~4x faster than numpy's float32 standard_normal; seeded from ``rng``
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        noise = torch.empty(image.shape, dtype=torch.float32).normal_(0.0, float(p.noise_sigma), generator=gen)
        image += noise.numpy()
    if p.blur_sigmas is not None:
        for c in range(n_c):
            if p.blur_sigmas[c] is not None:
                _blur_channel(image[c], p.blur_sigmas[c])
    if p.brightness is not None or p.contrast is not None:
        for c in range(n_c):
            m = p.brightness[c] if p.brightness is not None else 1.0
            f = p.contrast[c] if p.contrast is not None else None
            if f is None:
                KI.affine_clamp(image[c], m, 0.0)
            else:
                mean, _, lo, hi = KI.channel_stats(image[c])
                KI.affine_clamp(image[c], m * f, m * mean * (1.0 - f), m * lo, m * hi)
    if p.lowres_scales is not None:
        for c in range(n_c):
            if p.lowres_scales[c] is not None:
                _lowres_channel(image[c], p.lowres_scales[c], flips)
    for gammas, invert in ((p.gamma_inverted, True), (p.gamma, False)):
        if gammas is not None:
            for c in range(n_c):
                KI.gamma_inplace(image[c], gammas[c], invert, True)


# --------------------------------------------------------------------------------------------- public
@functools.lru_cache(maxsize=256)
def _downsampler(spatial: tuple[int, ...], scales: tuple[tuple[float, ...], ...]) -> TargetDownsampler:
    return TargetDownsampler(spatial, scales)  # index tables per patch shape, built once


def deep_supervision_targets(seg: np.ndarray, scales: Sequence[Sequence[float]] | None,
                             out: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray] | None:
    """``DownsampleSegForDSTransform``: per scale, ``interpolate(seg, round(shape * scale), mode='nearest-exact')``;
    a scale of all ones returns ``seg`` itself.

    seg: (s, *spatial) integer labels. ``out``: optional per-scale C-contiguous destinations ``(s, *scaled)`` of
    seg's dtype (e.g. a batch's target slots; None entries are allocated). Returns a list of (s, *scaled) arrays of
    seg's dtype, or None."""
    if scales is None:
        return None
    spatial = tuple(int(n) for n in seg.shape[1:])
    for sc in scales:
        if len(sc) != len(spatial):
            raise ShapeError(f"deep_supervision_targets: scale {tuple(sc)} does not match seg spatial shape {spatial}")
    return _downsampler(spatial, tuple(tuple(float(v) for v in sc) for sc in scales))(seg, out)


def augment_sample(image_region: np.ndarray, seg_region: np.ndarray, params: SpatialParams,
                   rng: np.random.Generator, cfg: AugmentConfig, region: Region, *,
                   out_image: np.ndarray | None = None, out_seg: np.ndarray | None = None,
                   intensity: IntensityParams | None = None, cascade_labels: Sequence[int] | None = None,
                   out_onehot: np.ndarray | None = None, cascade: CascadeParams | None = None,
                   out_targets: Sequence[np.ndarray | None] | None = None,
                   spatial_done: bool = False) -> AugmentedSample:
    """nnU-Net's training transforms on one sample.

    Parameters
    ----------
    image_region : (c, *region.shape) float32 (float16 is converted), the stored voxels of ``region``, 0 beyond
        the case.
    seg_region : (s, *region.shape) int8/int16 labels, -1 beyond the case (the cascade: ``s == 2``, the
        previous stage's segmentation second).
    params : from :func:`~nnfast.data.augment_params.sample_spatial` (the same ``params`` that chose ``region``).
    rng : draws the intensity parameters and the noise.
    cfg : the configuration's :class:`AugmentConfig`.
    region : from :func:`~nnfast.data.augment_params.needed_region`.
    out_image, out_seg : optional C-contiguous outputs, e.g. a slot of a batch buffer (``out_seg`` has all
        ``s`` label channels).
    intensity : force these intensity parameters instead of drawing them (tests, debugging).
    cascade_labels : the cascade: the foreground labels, one one-hot channel each (nnU-Net's order).
    out_onehot : optional C-contiguous ``(len(cascade_labels), *patch_size)`` float32 output for them.
    cascade : force these cascade parameters instead of drawing them.
    out_targets : optional per-scale C-contiguous outputs of the down-sampled targets (see
        :func:`deep_supervision_targets`; entries of scale 1 are ignored, that target is ``seg``).
    spatial_done : ``image_region`` and ``seg_region`` already are the patch after the spatial step (a pure crop,
        mirrored: ``params`` neither rotates nor scales), e.g. read mirrored straight into a batch; they are
        augmented in place and ``out_image``/``out_seg`` must be them or None.

    Returns
    -------
    AugmentedSample
        ``(image (c, *patch_size) float32, seg (s, *patch_size), targets, record, onehot)``.

    Raises
    ------
    ValueError
        Array shapes do not match ``region`` / ``cfg``, or the cascade without a second label channel.
    """
    if cascade_labels is not None and seg_region.shape[0] != 2:
        raise ShapeError(f"augment_sample: the cascade needs labels and the previous stage as 2 label channels, got "
                         f"{seg_region.shape[0]}")
    p = sample_intensity(rng, cfg, image_region.shape[0]) if intensity is None else intensity
    if spatial_done:
        ps = tuple(int(v) for v in cfg.patch_size)
        if (params.transformed or image_region.shape[1:] != ps or seg_region.shape[1:] != ps
                or not image_region.flags.c_contiguous or image_region.dtype != np.float32
                or any(o is not None and o is not r for o, r in ((out_image, image_region), (out_seg, seg_region)))):
            raise ShapeError(f"augment_sample: spatial_done needs an unrotated, unscaled sample already cropped to the "
                             f"patch {ps} (C-contiguous float32 image, the outputs being the inputs), got image "
                             f"{image_region.dtype} {image_region.shape} and seg {seg_region.shape}")
        image, seg = image_region, seg_region
    else:
        image, seg = spatial_patch(image_region, seg_region, params, cfg, region, out_image, out_seg)
    flips = tuple(d in params.mirror_axes for d in range(cfg.ndim))
    _apply_intensity(image, p, flips, rng)
    KI.mask_and_relabel(image, seg, cfg.mask_channels)
    onehot = cas = None
    if cascade_labels is not None:
        cas = sample_cascade(rng, cfg, len(cascade_labels)) if cascade is None else cascade
        if out_onehot is None:
            out_onehot = np.empty((len(cascade_labels), *seg.shape[1:]), np.float32)
        onehot = onehot_into(seg[1], cascade_labels, out_onehot)
        augment_onehot(onehot, cas, rng, cfg)
        seg = seg[:1]
    return AugmentedSample(image, seg, deep_supervision_targets(seg, cfg.ds_scales, out_targets),
                           AugmentRecord(params, p, cas),
                           onehot)


def validation_transform(image: np.ndarray, seg: np.ndarray, cfg: AugmentConfig) -> AugmentedSample:
    """nnU-Net's validation transforms: label -1 -> 0 (on a copy of ``seg``) and deep-supervision targets (the
    batch builder adds the cascade's one-hot channels itself).

    image: (c, *patch_size) float32, returned as is; seg: (s, *patch_size) integer labels."""
    if image.shape[1:] != seg.shape[1:]:
        raise ShapeError(f"validation_transform: image {image.shape} and seg {seg.shape} differ in spatial shape")
    seg = np.array(seg, copy=True, order="C")
    seg[seg == -1] = 0
    return AugmentedSample(image, seg, deep_supervision_targets(seg, cfg.ds_scales), None)
