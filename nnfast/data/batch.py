"""One training or validation batch, built deterministically from ``(base_seed, batch_index)``.

Every random choice of batch ``i`` comes from ``np.random.default_rng(np.random.SeedSequence([base_seed, i]))``,
drawn in a fixed order (cases, forced-foreground flags, then per sample: patch box, spatial parameters,
intensity parameters, noise). A batch is therefore the same whichever process builds it and whatever the number
of loader workers, and a run can resume at any batch index.

Per sample (nnU-Net v2's ``nnUNetDataLoader.generate_train_batch`` + ``nnUNetTrainer.get_training_transforms``):

1. case uniform with replacement; the last ``round(bs * 0.33)`` samples are forced to contain foreground
   (:mod:`nnfast.data.sampler`);
2. nnU-Net's enlarged box (``initial_patch_size``) from ``get_bbox``; its centre is the patch centre;
3. spatial parameters first (rotation/scaling p 0.2 each, mirroring), then only the stored region the final
   patch needs is read (:func:`~nnfast.data.augment_params.needed_region`): exactly the patch when no rotation or
   scaling fires, instead of nnU-Net's 4-5x larger box; such a patch is read mirrored straight into the batch when
   the source can (``reads_mirrored``: :class:`~nnfast.data.dataset.ZarrCaseSource`), with no scratch copy;
4. augmentation (:func:`~nnfast.data.transforms.augment_sample`) written straight into the batch array, labels
   -1 -> 0, deep-supervision targets (``nearest-exact`` downsampling).

Validation batches (``train=False``) read the final patch (no enlargement), with the same foreground
oversampling as nnU-Net's validation loader, and apply only the validation transforms (labels -1 -> 0,
deep-supervision targets).

2D configurations sample a box ``(1, y, z)`` in the 3D case (a random slice) and squeeze the singleton axis.

The cascade (``BatchSpec.cascade_labels`` set, a source that reads the previous stage): the previous stage's
segmentation is read and warped as a second label channel and becomes one input channel per foreground label after
the image channels (:mod:`nnfast.data.cascade`; nnU-Net's ``MoveSegAsOneHotToDataTransform`` and its
augmentations), drawn after the intensity parameters.

Batch layout (nnU-Net's): ``data`` float32 ``(b, c, *patch_size)`` (``c`` = image channels, plus the cascade's
one-hot channels); ``target`` one int16 ``(b, 1, *shape_k)``
array per deep-supervision scale (highest resolution first), or one ``(b, 1, *patch_size)`` array without deep
supervision; ``keys`` the case ids. Region training (``BatchSpec.labels`` set, a
:class:`~nnfast.labels.LabelManager` with regions): each target is ``(b, r, *shape_k)`` int16 0/1, one channel per
foreground region plus, with an ignore label, the ignore mask last (:meth:`~nnfast.labels.LabelManager.region_targets`
of the label map at that scale; nnU-Net converts before ``DownsampleSegForDSTransform``, and nearest-exact
downsampling commutes with a voxel-wise conversion, so the targets are the same). Axes are nnU-Net's ``(x, y, z)`` after transposition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np

from ..errors import DatasetError, SettingsError
from .augment_params import AugmentConfig, box_center, deep_supervision_scales, needed_region, sample_spatial
from .cascade import onehot_into
from .dataset import CaseSource
from .heap import keep_freed_memory
from .sampler import SamplerConfig, forced_foreground, get_bbox, sample_batch_cases
from .transforms import augment_sample, deep_supervision_targets

if TYPE_CHECKING:  # pragma: no cover
    from ..labels import LabelManager
    from ..plan.schema import Plans

__all__ = ["BatchSpec", "BatchArrays", "BatchBuilder", "batch_rng", "allocate_batch", "check_source"]

TARGET_DTYPE = np.int16  # nnU-Net's loader crops labels to int16 and its transforms keep that dtype
_ALIGN = 64


def batch_rng(base_seed: int, batch_index: int) -> np.random.Generator:
    """The generator of batch ``batch_index``: ``default_rng(SeedSequence([base_seed, batch_index]))``."""
    return np.random.default_rng(np.random.SeedSequence([int(base_seed), int(batch_index)]))


@dataclass(frozen=True)
class BatchSpec:
    """Everything that decides the shape and content of a batch (picklable; sent to loader workers).

    Attributes
    ----------
    augment : AugmentConfig
        Final patch size (2 or 3 axes), nnU-Net's enlarged ``initial_patch_size``, rotation/mirroring and the
        deep-supervision scales (``augment.ds_scales``, None without deep supervision).
    batch_size : int
    num_channels : int
        Image channels of the cases.
    train : bool
        Training transforms and enlarged boxes (True) or validation (False).
    oversample_foreground_percent, probabilistic_oversampling : nnU-Net's oversampling settings.
    annotated_classes_key : tuple or None
        ``(-1, *all_labels)`` when the dataset has an ignore label (nnU-Net's ``annotated_classes_key``).
    clip_to_sampled_box : bool
        Treat voxels outside nnU-Net's enlarged box as padding even where the case has data, as nnU-Net's
        ``SpatialTransform`` does (it only sees that box). Matters only for strong rotation + scaling.
    cascade_labels : tuple of int or None
        The cascade: the foreground labels, one extra input channel each, made from the previous stage's
        segmentation (the source must read it as a second label channel).
    labels : LabelManager or None
        Region training: the dataset's labels (with regions); targets become region channels. None: label maps.
    """

    augment: AugmentConfig
    batch_size: int
    num_channels: int
    train: bool = True
    oversample_foreground_percent: float = 0.33
    probabilistic_oversampling: bool = False
    annotated_classes_key: tuple[int, ...] | None = None
    clip_to_sampled_box: bool = True
    cascade_labels: tuple[int, ...] | None = None
    labels: "LabelManager | None" = None
    sampler: SamplerConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise SettingsError(f"BatchSpec: batch_size must be >= 1, got {self.batch_size}")
        if int(self.num_channels) < 1:
            raise SettingsError(f"BatchSpec: num_channels must be >= 1, got {self.num_channels}")
        if self.cascade_labels is not None:
            labels = tuple(int(v) for v in self.cascade_labels)
            if not labels or min(labels) < 1:
                raise SettingsError(f"BatchSpec: cascade_labels must be the foreground labels (>= 1), got "
                                 f"{self.cascade_labels}")
            object.__setattr__(self, "cascade_labels", labels)
        if self.labels is not None and not self.labels.has_regions:
            raise SettingsError(f"BatchSpec: labels are for region training; {self.labels!r} has no regions")
        ps = tuple(int(p) for p in self.augment.patch_size)
        initial = tuple(int(p) for p in (self.augment.initial_patch_size if self.train else ps))
        if len(ps) == 2:
            ps, initial = (1, *ps), (1, *initial)
        object.__setattr__(self, "sampler", SamplerConfig(
            patch_size=ps, initial_patch_size=initial, batch_size=int(self.batch_size),
            oversample_foreground_percent=float(self.oversample_foreground_percent),
            probabilistic_oversampling=bool(self.probabilistic_oversampling),
            annotated_classes_key=self.annotated_classes_key))

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("augment", "batch_size", "num_channels", "train",
                                              "oversample_foreground_percent", "probabilistic_oversampling",
                                              "annotated_classes_key", "clip_to_sampled_box", "cascade_labels", "labels")}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "cascade_labels", None)
        object.__setattr__(self, "labels", None)
        for k, v in state.items():
            object.__setattr__(self, k, v)
        self.__post_init__()

    @property
    def is_2d(self) -> bool:
        return self.augment.ndim == 2

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.augment.patch_size)

    @property
    def num_input_channels(self) -> int:
        """Channels of ``data``: the image channels, plus one per cascade label."""
        return int(self.num_channels) + (len(self.cascade_labels) if self.cascade_labels else 0)

    @property
    def num_seg_channels(self) -> int:
        """Label channels read per sample: 2 for the cascade (labels, previous stage), else 1."""
        return 1 if self.cascade_labels is None else 2

    @property
    def data_shape(self) -> tuple[int, ...]:
        """``(b, c, *patch_size)`` with ``c`` = :attr:`num_input_channels`."""
        return (int(self.batch_size), self.num_input_channels, *self.patch_size)

    @property
    def num_target_channels(self) -> int:
        """Channels of a target: 1 (a label map), or the region channels (plus the ignore mask)."""
        if self.labels is None:
            return 1
        return len(self.labels.foreground_regions) + (1 if self.labels.has_ignore_label else 0)

    @property
    def target_shapes(self) -> list[tuple[int, ...]]:
        """``(b, t, *shape)`` per deep-supervision scale (``round(patch * scale)``), or the patch's alone;
        ``t`` = :attr:`num_target_channels`."""
        scales = self.augment.ds_scales
        b, t = int(self.batch_size), self.num_target_channels
        if scales is None:
            return [(b, t, *self.patch_size)]
        return [(b, t, *(round(p * s) for p, s in zip(self.patch_size, sc))) for sc in scales]

    @property
    def nbytes(self) -> int:
        """Bytes of one batch in the :func:`allocate_batch` layout (each array 64-byte aligned)."""
        return sum(_aligned(math.prod(s) * np.dtype(d).itemsize) for s, d in self._arrays())

    def _arrays(self) -> list[tuple[tuple[int, ...], Any]]:
        return [(self.data_shape, np.float32), *((s, TARGET_DTYPE) for s in self.target_shapes)]

    def with_train(self, train: bool) -> "BatchSpec":
        return replace(self, train=bool(train))

    @classmethod
    def from_plan(cls, plans: "Plans", configuration: str, *, num_channels: int | None = None, train: bool = True,
                  deep_supervision: bool = True, patch_size: Sequence[int] | None = None,
                  batch_size: int | None = None, **fields) -> "BatchSpec":
        """nnU-Net's loader settings for one configuration of a plan.

        Parameters
        ----------
        plans : Plans
            nnfast plans (anything with ``configuration(name)``); the patch size, batch size, ``use_mask_for_norm``
            and the deep-supervision scales (``1 / cumprod(strides)`` of the architecture, nnU-Net's
            ``_get_deep_supervision_scales``) come from ``plans.configuration(configuration)``.
        configuration : str
            Configuration name, e.g. ``"3d_fullres"``.
        num_channels : int, optional
            Image channels of the cases; default ``plans.num_input_channels``.
        train : bool
            Training (augmented, nnU-Net's enlarged boxes) or validation batches.
        deep_supervision : bool
            Targets at every deep-supervision scale (True) or the full-resolution target only.
        patch_size, batch_size : optional
            Override the plan's (a trainer's patch size; one DDP rank's share of the global batch).
        fields
            Further :class:`BatchSpec` fields: ``oversample_foreground_percent``, ``probabilistic_oversampling``,
            ``annotated_classes_key``, ``clip_to_sampled_box``, ``cascade_labels``, ``labels``.

        Raises
        ------
        PlanError
            The plan has no such configuration.
        SettingsError
            Bad settings (batch size < 1, a patch size without 2 or 3 axes, ...).
        """
        conf = plans.configuration(configuration)
        if num_channels is None:
            num_channels = plans.num_input_channels
        ds = deep_supervision_scales(conf.architecture.strides) if deep_supervision else None
        aug = AugmentConfig.from_patch_size(conf.patch_size if patch_size is None else patch_size,
                                            use_mask_for_norm=conf.use_mask_for_norm or (), ds_scales=ds)
        return cls(augment=aug, batch_size=int(conf.batch_size if batch_size is None else batch_size),
                   num_channels=int(num_channels), train=bool(train), **fields)

    @classmethod
    def from_patch_size(cls, patch_size: Sequence[int], batch_size: int, *, num_channels: int, train: bool = True,
                        ds_scales: Sequence[Sequence[float]] | None = None, use_mask_for_norm: Sequence[bool] = (),
                        **fields) -> "BatchSpec":
        """Batches without a plan: nnU-Net's augmentation rules for ``patch_size`` (2 or 3 axes, nnU-Net axis order;
        :meth:`AugmentConfig.from_patch_size`), ``ds_scales`` per-axis deep-supervision scales (None: one target).
        For a full :class:`AugmentConfig` (e.g. an nnU-Net trainer's), call ``BatchSpec(augment=..., ...)``."""
        aug = AugmentConfig.from_patch_size(patch_size, use_mask_for_norm=use_mask_for_norm, ds_scales=ds_scales)
        return cls(augment=aug, batch_size=int(batch_size), num_channels=int(num_channels), train=bool(train),
                   **fields)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class BatchArrays:
    """The arrays of one batch (see the module docstring for shapes and dtypes)."""

    data: np.ndarray
    targets: list[np.ndarray]


def allocate_batch(spec: BatchSpec, buffer: memoryview | bytearray | None = None, offset: int = 0) -> BatchArrays:
    """Arrays of one batch: fresh ones, or views into ``buffer`` starting at ``offset`` (``spec.nbytes`` bytes,
    e.g. a shared-memory slot)."""
    arrays = []
    pos = int(offset)
    for shape, dtype in spec._arrays():
        if buffer is None:
            arrays.append(np.empty(shape, dtype))
        else:
            n = math.prod(shape)
            arrays.append(np.frombuffer(buffer, dtype=dtype, count=n, offset=pos).reshape(shape))
            pos += _aligned(n * np.dtype(dtype).itemsize)
    return BatchArrays(arrays[0], arrays[1:])


class _Scratch:
    """Growable flat buffers for the region a sample reads and, for the cascade, its warped labels (reused: fresh
    arrays cost page faults)."""

    def __init__(self) -> None:
        self._img = np.empty(0, np.float32)
        self._seg = np.empty(0, TARGET_DTYPE)
        self._patch_seg = np.empty(0, TARGET_DTYPE)

    def views(self, c: int, box: Sequence[int], s: int = 1) -> tuple[np.ndarray, np.ndarray]:
        n = math.prod(box)
        if self._img.size < c * n:
            self._img = np.empty(int(c * n * 1.25) + 1, np.float32)
        if self._seg.size < s * n:
            self._seg = np.empty(int(s * n * 1.25) + 1, TARGET_DTYPE)
        return self._img[:c * n].reshape(c, *box), self._seg[:s * n].reshape(s, *box)

    def patch_seg(self, s: int, patch: Sequence[int]) -> np.ndarray:
        n = s * math.prod(patch)
        if self._patch_seg.size < n:
            self._patch_seg = np.empty(n, TARGET_DTYPE)
        return self._patch_seg[:n].reshape(s, *patch)


def check_source(source: CaseSource, spec: BatchSpec) -> None:
    """Raise :class:`~nnfast.errors.SettingsError` (a ``ValueError``) unless ``source`` reads the label channels
    ``spec`` needs: the previous stage exactly when the spec has ``cascade_labels``."""
    n_seg = int(getattr(source, "num_seg_channels", 1))
    if n_seg != spec.num_seg_channels:
        raise SettingsError(
            f"{source!r} reads {n_seg} label channel(s) but the batches need {spec.num_seg_channels}: the cascade "
            "needs both a source with previous_stage_folder and cascade_labels (the foreground labels), other "
            "configurations neither")


class BatchBuilder:
    """Builds batches of ``spec`` from ``source``.

    Parameters
    ----------
    source : CaseSource
        The cases to sample from (``source.case_ids``).
    spec : BatchSpec

    Notes
    -----
    Not thread-safe (it reuses scratch buffers); use one builder per thread or process.
    """

    def __init__(self, source: CaseSource, spec: BatchSpec):
        if not source.case_ids:
            raise DatasetError("BatchBuilder: the source has no cases; check the split and the preprocessed folder")
        check_source(source, spec)
        keep_freed_memory()  # samples reuse their scratch pages instead of faulting fresh ones (nnfast.data.heap)
        self.source = source
        self.spec = spec
        self._case_ids = list(source.case_ids)
        self._scratch = _Scratch()
        sc = spec.augment.ds_scales
        # the full-resolution label map can be written straight into the batch (not for region targets)
        self._first_is_full = (sc is None or all(v == 1 for v in sc[0])) and spec.labels is None
        # unrotated, unscaled samples are read mirrored straight into the batch when the source can (ZarrCaseSource)
        self._mirrored_reads = (self._first_is_full and spec.cascade_labels is None
                                and bool(getattr(source, "reads_mirrored", False)))

    def allocate(self) -> BatchArrays:
        return allocate_batch(self.spec)

    def build(self, base_seed: int, batch_index: int, out: BatchArrays | None = None) -> tuple[BatchArrays, list[str]]:
        """Build batch ``batch_index`` into ``out`` (allocated when None).

        Returns
        -------
        (arrays, keys) : the filled :class:`BatchArrays` and the case id of each sample.
        """
        spec = self.spec
        if out is None:
            out = self.allocate()
        elif out.data.shape != spec.data_shape or [t.shape for t in out.targets] != spec.target_shapes:
            raise SettingsError(f"BatchBuilder.build: out has data {out.data.shape} and targets "
                             f"{[t.shape for t in out.targets]}, expected {spec.data_shape} and {spec.target_shapes}")
        rng = batch_rng(base_seed, batch_index)
        keys = sample_batch_cases(self._case_ids, spec.batch_size, rng)
        force = forced_foreground(spec.sampler, rng)
        for j, case_id in enumerate(keys):
            shape = self.source.shape(case_id)
            need_locs = force[j] or spec.sampler.has_ignore
            locs = self.source.class_locations(case_id) if need_locs else None
            lbs, ubs = get_bbox(spec.sampler, shape, force[j], locs, rng)
            if spec.train:
                self._train_sample(case_id, lbs, ubs, rng, out, j)
            else:
                self._val_sample(case_id, lbs, ubs, out, j)
        return out, keys

    # -- per sample ---------------------------------------------------------------------------------
    def _train_sample(self, case_id, lbs, ubs, rng, out: BatchArrays, j: int) -> None:
        spec = self.spec
        aug = spec.augment
        params = sample_spatial(rng, aug)
        first = 1 if spec.is_2d else 0  # 2D: axis 0 of the case is the slice axis
        centre = box_center(lbs[first:], ubs[first:])
        clip = [[lb, ub] for lb, ub in zip(lbs[first:], ubs[first:])] if spec.clip_to_sampled_box else None
        region = needed_region(params, aug.patch_size, centre, clip_to=clip)
        bbox = ([[lbs[0], lbs[0] + 1]] if spec.is_2d else []) + region.bbox
        if self._mirrored_reads and not params.transformed and region.shape == spec.patch_size and all(
                lb == math.floor(c) - p // 2 for lb, c, p in zip(region.lb, region.centre, spec.patch_size)):
            # a pure crop: read it mirrored straight into the batch (no scratch region, no copy)
            image, seg = out.data[j], out.targets[0][j]
            flips = tuple(d in params.mirror_axes for d in range(aug.ndim))
            read = cast(Any, self.source).read  # ZarrCaseSource.read(..., flip=): not part of the CaseSource protocol
            if spec.is_2d:
                read(case_id, bbox, image[:, None], seg[:, None], flip=(False, *flips))
            else:
                read(case_id, bbox, image, seg, flip=flips)
            res = augment_sample(image, seg, params, rng, aug, region, out_image=image, out_seg=seg,
                                 out_targets=[t[j] for t in out.targets], spatial_done=True)
            self._store_targets(res.seg, res.targets, out, j)  # written in place already: nothing to copy
            return
        box = [u - lb for lb, u in bbox]
        img, seg = self._scratch.views(spec.num_channels, box, spec.num_seg_channels)
        self.source.read(case_id, bbox, img, seg)
        if spec.is_2d:
            img, seg = img[:, 0], seg[:, 0]
        # label-map targets at the lower scales are written straight into the batch (region targets are converted)
        out_targets = [t[j] for t in out.targets] if self._first_is_full else None
        if spec.cascade_labels is None:
            out_seg = out.targets[0][j] if self._first_is_full else None
            res = augment_sample(img, seg, params, rng, aug, region, out_image=out.data[j], out_seg=out_seg,
                                 out_targets=out_targets)
        else:
            c = spec.num_channels
            res = augment_sample(img, seg, params, rng, aug, region, out_image=out.data[j][:c],
                                 out_seg=self._scratch.patch_seg(2, spec.patch_size),
                                 cascade_labels=spec.cascade_labels, out_onehot=out.data[j][c:],
                                 out_targets=out_targets)
        self._store_targets(res.seg, res.targets, out, j)

    def _val_sample(self, case_id, lbs, ubs, out: BatchArrays, j: int) -> None:
        spec = self.spec
        bbox = [[lb, ub] for lb, ub in zip(lbs, ubs)]
        box = [u - lb for lb, u in bbox]
        c = spec.num_channels
        if self._first_is_full and spec.cascade_labels is None:
            seg = out.targets[0][j]
        else:
            seg = self._scratch.views(c, box, spec.num_seg_channels)[1]
            seg = seg[:, 0] if spec.is_2d else seg
        image = out.data[j][:c]
        if spec.is_2d:
            self.source.read(case_id, bbox, image[:, None], seg[:, None])
        else:
            self.source.read(case_id, bbox, image, seg)
        seg[seg == -1] = 0  # RemoveLabelTansform(-1, 0); no MaskImageTransform in nnU-Net's validation pipeline
        if spec.cascade_labels is not None:  # MoveSegAsOneHotToDataTransform
            onehot_into(seg[1], spec.cascade_labels, out.data[j][c:])
            seg = seg[:1]
        self._store_targets(seg, deep_supervision_targets(seg, spec.augment.ds_scales), out, j)

    def _store_targets(self, seg: np.ndarray, targets: list[np.ndarray] | None, out: BatchArrays, j: int) -> None:
        lm = self.spec.labels
        if lm is not None:  # ConvertSegmentationToRegionsTransform, at every scale
            for k, t in enumerate(targets if targets is not None else [seg]):
                lm.region_targets(t[0], out=out.targets[k][j])
            return
        if targets is None:
            if not np.shares_memory(seg, out.targets[0][j]):
                out.targets[0][j] = seg
            return
        for k, t in enumerate(targets):
            dst = out.targets[k][j]
            if not np.shares_memory(t, dst):
                dst[...] = t
