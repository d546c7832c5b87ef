"""Augmentation settings and per-sample spatial parameters (nnU-Net v2's defaults), sampled before any data is read.

nnU-Net's loader reads an enlarged patch (``initial_patch_size``, ~4-5x the final voxels in 3D) so that
``SpatialTransform`` can rotate and scale inside it. nnfast samples the spatial parameters first, then asks
:func:`needed_region` for the box of stored voxels the final patch actually touches: exactly the patch when
neither rotation nor scaling fires (about 2/3 of the samples), the bounding box of the rotated/scaled sampling
grid plus one voxel for interpolation otherwise.

Reproduced rules (nnunetv2 2.8.1, batchgeneratorsv2 0.3.6)
---------------------------------------------------------
* ``nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size``: 2D rotation +-180 deg, +-15 deg when
  ``max(patch) / min(patch) > 1.5``, mirror axes (0, 1); 3D dummy-2D when ``max(patch) / patch[0] > 3``
  (``ANISO_THRESHOLD``), then +-180 deg in-plane, else +-30 deg; mirror axes (0, 1, 2); ``initial_patch_size`` from
  ``get_patch_size(patch, rot, rot, rot, (0.85, 1.25))`` with axis 0 kept in dummy-2D.
* ``SpatialTransform.get_parameters`` with ``p_rotation=0.2``, ``p_rot_per_axis=1``, ``p_scaling=0.2``,
  ``scaling=(0.7, 1.4)``, ``p_synchronize_scaling_across_axes=1``: one draw decides rotation, one scaling;
  with rotation every axis gets an angle ``U(rot)``; with scaling one factor ``U(0.7, 1.4)`` for all axes. The
  affine is ``Rz @ Ry @ Rx @ S`` in 3D (angles[0] about axis 0) and ``R(angles[-1]) @ S`` in 2D; larger scale
  factors mean smaller objects (the grid spans more voxels).
* ``random_crop=False``: the patch centre is the centre of the enlarged box (``lb + initial_patch_size / 2``, possibly
  half-integer); a pure crop starts at ``floor(centre) - patch // 2``.
* ``MirrorTransform``: each allowed axis flips with probability 0.5 (sampled here, so the resampling can write the
  mirrored patch directly).
* The cascade's transforms of the previous stage's one-hot channels (``ApplyRandomBinaryOperatorTransform`` p 0.4,
  ``RemoveRandomConnectedComponentFromOneHotEncodingTransform`` p 0.2, each label with p 0.5): their settings are
  fields here, their sampling and application live in :mod:`nnfast.data.cascade`.

Coordinates: stored-array voxel ``i`` lies at coordinate ``i``; patch voxel ``k`` (per axis ``0 <= k < P``) samples
``centre - 0.5 + A @ (k - (P - 1) / 2)`` (``grid_sample`` with ``align_corners=False`` on the enlarged patch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from nnfast.errors import ConfigError, ShapeError

if TYPE_CHECKING:  # pragma: no cover
    from nnfast.plan.schema import ConfigurationPlan

__all__ = [
    "ANISO_THRESHOLD",
    "AugmentConfig",
    "SpatialParams",
    "Region",
    "get_patch_size",
    "deep_supervision_scales",
    "sample_spatial",
    "box_center",
    "needed_region",
    "rotation_matrix",
]

ANISO_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD
_DEG = 2.0 * np.pi / 360.0


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_2d(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s], [s, c]])


def get_patch_size(final_patch_size: Sequence[int], rot_x, rot_y, rot_z, scale_range) -> tuple[int, ...]:
    """nnU-Net's ``get_patch_size`` (``training/data_augmentation/compute_initial_patch_size.py``).

    Each rotation (the largest magnitude of a range, capped at 90 deg) rotates the patch-size vector about one axis
    at a time (as a row vector times batchgenerators' rotation matrix); the per-axis maximum of ``|coords|`` over
    those and the unrotated vector is divided by ``min(scale_range)`` and truncated to int.
    """
    def _mag(r):
        return max(abs(v) for v in r) if isinstance(r, (tuple, list)) else r

    cap = 90.0 * _DEG
    rx, ry, rz = (min(cap, _mag(r)) for r in (rot_x, rot_y, rot_z))
    coords = np.asarray(final_patch_size, dtype=np.float64)
    best = coords.copy()
    if coords.size == 3:
        for m in (_rot_x(rx), _rot_y(ry), _rot_z(rz)):
            best = np.maximum(best, np.abs(coords @ m))
    elif coords.size == 2:
        best = np.maximum(best, np.abs(coords @ _rot_2d(rx)))
    else:
        raise ShapeError(f"get_patch_size: expected a 2D or 3D patch size, got {tuple(final_patch_size)}")
    return tuple(int(v) for v in best / min(scale_range))


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> tuple[tuple[float, ...], ...]:
    """nnU-Net's ``_get_deep_supervision_scales``: ``1 / cumprod(strides)`` per stage, the last stage dropped."""
    cum = np.cumprod(np.vstack([np.asarray(s, dtype=np.float64) for s in strides]), axis=0)
    return tuple(tuple(float(v) for v in 1.0 / row) for row in cum[:-1])


@dataclass(frozen=True)
class AugmentConfig:
    """nnU-Net v2's training augmentation for one configuration (``nnUNetTrainer.get_training_transforms``).

    Build it with :meth:`from_patch_size` or :meth:`from_configuration`; every probability and range below is nnU-Net's
    default. Angles are radians. ``patch_size`` is the final patch in nnU-Net axis order (2 or 3 axes).
    """

    patch_size: tuple[int, ...]
    rotation: tuple[float, float]
    do_dummy_2d: bool
    mirror_axes: tuple[int, ...]
    initial_patch_size: tuple[int, ...]
    use_mask_for_norm: tuple[bool, ...] = ()
    ds_scales: tuple[tuple[float, ...], ...] | None = None
    # SpatialTransform
    p_rotation: float = 0.2
    p_rot_per_axis: float = 1.0
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_synchronize_scaling: float = 1.0
    # intensity transforms, in application order
    p_noise: float = 0.1
    noise_sigma: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    blur_p_per_channel: float = 0.5
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_scale: tuple[float, float] = (0.5, 1.0)
    lowres_p_per_channel: float = 0.5
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    # the cascade's previous-stage channels (3d_cascade_fullres only; see nnfast.data.cascade)
    p_binary_operator: float = 0.4
    binary_operator_p_per_label: float = 0.5
    strel_size: tuple[float, float] = (1.0, 8.0)
    p_remove_component: float = 0.2
    remove_component_p_per_label: float = 0.5
    remove_component_max_fraction: float = 0.15

    def __post_init__(self) -> None:
        if len(self.patch_size) not in (2, 3):
            raise ConfigError(f"AugmentConfig: patch_size must have 2 or 3 axes, got {self.patch_size}")
        if len(self.initial_patch_size) != len(self.patch_size):
            raise ConfigError(f"AugmentConfig: initial_patch_size {self.initial_patch_size} and patch_size "
                              f"{self.patch_size} differ in length")
        if self.do_dummy_2d and len(self.patch_size) != 3:
            raise ConfigError("AugmentConfig: dummy-2D augmentation needs a 3D patch")
        if any(a < 0 or a >= len(self.patch_size) for a in self.mirror_axes):
            raise ConfigError(f"AugmentConfig: mirror axes {self.mirror_axes} out of range for {self.patch_size}")
        if self.ds_scales is not None and any(len(s) != len(self.patch_size) for s in self.ds_scales):
            raise ConfigError(f"AugmentConfig: every deep-supervision scale needs {len(self.patch_size)} entries, got "
                              f"{self.ds_scales}")

    @property
    def ndim(self) -> int:
        """Number of spatial axes of a patch (2 or 3)."""
        return len(self.patch_size)

    @property
    def transform_ndim(self) -> int:
        """Dimensionality of the rotation/scaling: 2 for 2D configurations and dummy-2D, else 3."""
        return 2 if (self.ndim == 2 or self.do_dummy_2d) else 3

    @property
    def mask_channels(self) -> tuple[int, ...]:
        """Image channels that ``MaskImageTransform`` zeroes where the label is negative."""
        return tuple(i for i, m in enumerate(self.use_mask_for_norm) if m)

    @classmethod
    def from_patch_size(
        cls,
        patch_size: Sequence[int],
        *,
        use_mask_for_norm: Sequence[bool] = (),
        ds_scales: Sequence[Sequence[float]] | None = None,
        **overrides,
    ) -> "AugmentConfig":
        """nnU-Net's rotation / dummy-2D / mirroring / initial patch size rules for ``patch_size``.

        Parameters
        ----------
        patch_size : final patch, 2 or 3 ints, nnU-Net axis order.
        use_mask_for_norm : per input channel, from the plan.
        ds_scales : deep-supervision scales (see :func:`deep_supervision_scales`), None without deep supervision.
        overrides : any other field of :class:`AugmentConfig` (e.g. ``p_rotation=0`` for a no-rotation variant).

        Raises
        ------
        ValueError
            ``patch_size`` does not have 2 or 3 axes.
        """
        ps = tuple(int(p) for p in patch_size)
        if len(ps) == 2:
            dummy = False
            deg = 15.0 if max(ps) / min(ps) > 1.5 else 180.0
            mirror = (0, 1)
        elif len(ps) == 3:
            dummy = (max(ps) / ps[0]) > ANISO_THRESHOLD
            deg = 180.0 if dummy else 30.0
            mirror = (0, 1, 2)
        else:
            raise ConfigError(f"AugmentConfig.from_patch_size: patch_size must have 2 or 3 axes, got {ps}")
        rot = (-deg * _DEG, deg * _DEG)
        initial = list(get_patch_size(ps, rot, rot, rot, (0.85, 1.25)))
        if dummy:
            initial[0] = ps[0]
        kw = dict(patch_size=ps, rotation=rot, do_dummy_2d=dummy, mirror_axes=mirror,
                  initial_patch_size=tuple(initial), use_mask_for_norm=tuple(bool(b) for b in use_mask_for_norm),
                  ds_scales=None if ds_scales is None else tuple(tuple(float(v) for v in s) for s in ds_scales))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_configuration(cls, conf: "ConfigurationPlan", *, deep_supervision: bool = True,
                           **overrides) -> "AugmentConfig":
        """The augmentation nnU-Net trains ``conf`` with (patch size, ``use_mask_for_norm``, deep-supervision
        scales from the architecture's strides)."""
        ds = deep_supervision_scales(conf.architecture.strides) if deep_supervision else None
        return cls.from_patch_size(conf.patch_size, use_mask_for_norm=conf.use_mask_for_norm, ds_scales=ds,
                                   **overrides)


def rotation_matrix(angles: Sequence[float], scale: Sequence[float]) -> np.ndarray:
    """batchgeneratorsv2's affine: ``Rz @ Ry @ Rx @ diag(scale)`` for 3 angles (angle ``i`` about axis ``i``),
    ``R(angles[-1]) @ diag(scale)`` for a 2D transform (``len(scale) == 2``)."""
    if len(scale) == 3:
        return _rot_z(angles[2]) @ _rot_y(angles[1]) @ _rot_x(angles[0]) @ np.diag(np.asarray(scale, np.float64))
    if len(scale) == 2:
        return _rot_2d(angles[-1]) @ np.diag(np.asarray(scale, np.float64))
    raise ShapeError(f"rotation_matrix: expected 2 or 3 scale factors, got {len(scale)}")


@dataclass(frozen=True)
class SpatialParams:
    """Spatial augmentation of one sample (drawn by :func:`sample_spatial`, no data touched).

    ``angles`` has ``transform_ndim`` entries (radians; zeros unless ``rotated``); the 2D transform uses
    ``angles[-1]``. ``scales`` likewise (ones unless ``scaled``). ``mirror_axes`` are the patch axes to flip.
    """

    transform_ndim: int
    rotated: bool
    scaled: bool
    angles: tuple[float, ...]
    scales: tuple[float, ...]
    mirror_axes: tuple[int, ...]

    @property
    def transformed(self) -> bool:
        """Whether the patch is resampled (rotation or scaling fired); otherwise it is a pure crop."""
        return self.rotated or self.scaled

    def matrix(self) -> np.ndarray | None:
        """The (transform_ndim, transform_ndim) affine, None for a pure crop (computed once per sample: the region
        and the warp both ask; the returned array must not be modified)."""
        if not self.transformed:
            return None
        m = self.__dict__.get("_matrix")
        if m is None:
            m = rotation_matrix(self.angles, self.scales)
            object.__setattr__(self, "_matrix", m)
        return m


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """batchgeneratorsv2's ``sample_scalar`` for a range: ``lo`` when the range is empty, else ``U(lo, hi)``."""
    if lo == hi:
        return float(lo)
    return float(rng.uniform(lo, hi))


def sample_spatial(rng: np.random.Generator, cfg: AugmentConfig) -> SpatialParams:
    """Draw rotation, scaling and mirroring for one sample with nnU-Net's probabilities.

    Rotation fires with ``p_rotation``; every axis of the transform then gets ``U(rotation)`` (kept with
    ``p_rot_per_axis``). Scaling fires with ``p_scaling``; one factor ``U(scaling)`` for all axes (with
    ``p_synchronize_scaling``, else one per axis). Each of ``mirror_axes`` flips with ``p_mirror``.
    """
    nd = cfg.transform_ndim
    rotated = bool(rng.random() < cfg.p_rotation)
    scaled = bool(rng.random() < cfg.p_scaling)
    if rotated:
        angles = [_uniform(rng, *cfg.rotation) for _ in range(nd)]
        if cfg.p_rot_per_axis < 1:
            angles = [a if rng.random() <= cfg.p_rot_per_axis else 0.0 for a in angles]
    else:
        angles = [0.0] * nd
    if scaled:
        if rng.random() <= cfg.p_synchronize_scaling:
            scales = [_uniform(rng, *cfg.scaling)] * nd
        else:
            scales = [_uniform(rng, *cfg.scaling) for _ in range(nd)]
    else:
        scales = [1.0] * nd
    mirror = tuple(a for a in cfg.mirror_axes if rng.random() < cfg.p_mirror)
    return SpatialParams(nd, rotated, scaled, tuple(angles), tuple(scales), mirror)


def box_center(lbs: Sequence[int], ubs: Sequence[int]) -> tuple[float, ...]:
    """Patch centre for nnU-Net's enlarged box ``[lbs, ubs)`` (``SpatialTransform`` with ``random_crop=False``
    centres the patch at ``shape / 2`` of what the loader gives it)."""
    return tuple(lb + (ub - lb) / 2.0 for lb, ub in zip(lbs, ubs))


@dataclass(frozen=True)
class Region:
    """A box of stored voxels ``[lb, ub)`` per axis (may extend past the array: the reader pads image 0,
    labels -1) and the patch centre in stored coordinates."""

    lb: tuple[int, ...]
    ub: tuple[int, ...]
    centre: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(u - l for l, u in zip(self.lb, self.ub))

    @property
    def bbox(self) -> list[list[int]]:
        """nnU-Net/acvl_utils bbox format ``[[lb, ub], ...]``."""
        return [[l, u] for l, u in zip(self.lb, self.ub)]


def _crop_bounds(c: float, p: int) -> tuple[int, int]:
    lb = math.floor(c) - p // 2
    return lb, lb + p


def needed_region(params: SpatialParams, patch_size: Sequence[int], center: Sequence[float],
                  clip_to: Sequence[Sequence[int]] | None = None) -> Region:
    """The box of stored voxels the final patch depends on.

    Pure crop: ``[floor(center) - P // 2, + P)`` per axis. Rotated/scaled: the bounding box of the sampling grid
    (its corners, the map being affine) widened to the voxels bilinear interpolation reads, ``[floor(min),
    floor(max) + 2)``. Dummy-2D: axis 0 is always a pure crop.

    Parameters
    ----------
    params : from :func:`sample_spatial`.
    patch_size : final patch size (2 or 3 ints, nnU-Net axis order).
    center : patch centre in stored coordinates (:func:`box_center` of the sampler's enlarged box).
    clip_to : optional ``[[lb, ub], ...]`` box to intersect with. Passing the sampler's enlarged box reproduces
        nnU-Net exactly: its ``SpatialTransform`` only sees the enlarged patch and pads beyond it (image 0, label
        -1) even where the case has data, which happens when rotation and scaling together reach past the box
        (``get_patch_size`` assumes scale >= 0.85 and one rotation axis at a time). Without it the real voxels are
        used.

    Returns
    -------
    Region
    """
    ps = tuple(int(p) for p in patch_size)
    c = tuple(float(v) for v in center)
    if len(ps) != len(c):
        raise ShapeError(f"needed_region: patch_size {ps} and center {c} differ in length")
    nd = len(ps)
    lb = [0] * nd
    ub = [0] * nd
    a = params.matrix()
    first_t = nd - params.transform_ndim  # axes before this one are cropped (dummy-2D axis 0)
    if params.transform_ndim > nd:
        raise ShapeError(f"needed_region: a {params.transform_ndim}D transform does not fit a {nd}D patch")
    for d in range(first_t if a is not None else nd):
        lb[d], ub[d] = _crop_bounds(c[d], ps[d])
    if a is not None:
        # the grid's corners map to centre +- sum_j |a_kj| half_j along axis k (the extremes of an affine map over a
        # box); plain Python: numpy's per-call overhead on 2x2 / 3x3 arrays cost ~0.1 ms per sample
        t = params.transform_ndim
        half = [(p - 1) / 2.0 for p in ps[first_t:]]
        eps = 1e-6
        for k, row in enumerate(a.tolist()):
            ext = 0.0
            for j in range(t):
                ext += abs(row[j]) * half[j]
            mid = c[first_t + k] - 0.5
            lb[first_t + k] = int(math.floor(mid - ext - eps))
            ub[first_t + k] = int(math.floor(mid + ext + eps)) + 2
    if clip_to is not None:
        if len(clip_to) != nd:
            raise ShapeError(f"needed_region: clip_to {clip_to} must have {nd} axes")
        for d, (cl, cu) in enumerate(clip_to):
            lb[d] = max(lb[d], int(cl))
            ub[d] = max(lb[d], min(ub[d], int(cu)))
    return Region(tuple(lb), tuple(ub), c)
