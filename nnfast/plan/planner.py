"""The experiment planner: nnU-Net v2's default ``ExperimentPlanner`` rules, reproduced without torch.

:func:`plan_experiment` turns a :class:`~nnfast.fingerprint.schema.Fingerprint` and the dataset's ``dataset.json``
into :class:`~nnfast.plan.schema.Plans` whose every number equals what
``nnunetv2.experiment_planning.experiment_planners.default_experiment_planner.ExperimentPlanner(...).plan_experiment()``
writes (tested field by field in ``tests/plan/test_planner_parity.py``). The VRAM proxy comes from
:mod:`nnfast.plan.vram` instead of instantiating the network, so planning takes milliseconds.

The rules (nnU-Net v2.8.1):

1. Full-resolution target spacing: per-axis median of the case spacings; if the coarsest axis is more than 3x the
   others (spacing) AND has fewer than 1/3 of the voxels of the smallest other axis (median cropped shape), its target
   is the 10th percentile of its spacings instead (at least the largest other spacing + 1e-5).
2. Transposition: the coarsest target-spacing axis goes first.
3. Median shape after resampling: median over cases of ``round(spacing / target * shape)``.
4. Per configuration: initial patch with aspect ratio 1/spacing and the volume of 256^3 (2D: 2048^2), clipped to the
   median shape; topology from :func:`~nnfast.plan.topology.get_pool_and_conv_props`; shrink the axis with the largest
   patch/median ratio until the VRAM proxy fits the reference (560e6 3D / 85e6 2D at 8 GB, batch 2 / 12); batch size
   from the remaining headroom, capped so one batch covers at most 5 % of the dataset's voxels, at least 2.
5. 3d_lowres: raise the spacing by 1.03 per step (the anisotropic axes first) until the full-resolution patch covers at
   least 25 % of the median image; keep it only if it halves the voxel count. batch_dice: 2d True, 3d_fullres True
   only if there is a lowres stage, lowres False. ``3d_cascade_fullres`` = 3d_fullres with ``previous_stage``.
6. Normalization: channel name ``CT`` -> CTNormalization, ``noNorm`` / ``zscore`` / ``rescale_to_0_1`` / ``rgb_to_0_1``
   -> their schemes, anything else -> ZScoreNormalization; the nonzero mask is used (ZScore only) when cropping to the
   nonzero region kept less than 3/4 of the voxels (median).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import PlanError
from ..fingerprint.schema import Fingerprint
from ..io.atomic import read_json, write_json_atomic
from ..io.dataset import DatasetInfo
from ..layout import PLANS_IDENTIFIER, data_identifier
from .presets import DEFAULT_PRESET, PlannerPreset, get_preset
from .schema import (
    Architecture,
    ConfigurationPlan,
    InheritedConfiguration,
    Plans,
    Resampling,
)
from .topology import get_pool_and_conv_props
from .vram import compute_conv_feature_map_size

__all__ = [
    "ANISO_THRESHOLD",
    "plan_experiment",
    "determine_fullres_target_spacing",
    "determine_transpose",
    "normalization_schemes_for",
    "write_plans",
    "load_plans",
]

log = logging.getLogger(__name__)

# nnU-Net v2 ExperimentPlanner constants (default_experiment_planner.py, configuration.py)
ANISO_THRESHOLD = 3
BASE_NUM_FEATURES = 32
MAX_FEATURES_2D = 512
MAX_FEATURES_3D = 320
REFERENCE_VAL_3D = 560_000_000
REFERENCE_VAL_2D = 85_000_000
REFERENCE_VAL_CORRESP_GB = 8
REFERENCE_BS_2D = 12
REFERENCE_BS_3D = 2
FEATUREMAP_MIN_EDGE_LENGTH = 4
CONVS_PER_STAGE_ENCODER = 2
CONVS_PER_STAGE_DECODER = 2
MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05
LOWRES_CREATION_THRESHOLD = 0.25
LOWRES_SPACING_FACTOR = 1.03
MAX_NUMPOOL = 999999

PLANS_NAME = "nnfastPlans"  # kept for imports; plans now record their plans identifier as ``plans_name``

_NORMALIZATION_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}
# schemes that leave voxels outside the nonzero mask at 0 when the mask is used (nnU-Net class attribute)
_MASK_CAPABLE = {"ZScoreNormalization"}

_RESAMPLING_DATA = Resampling(order=3, order_z=0, force_separate_z=None)
_RESAMPLING_SEG = Resampling(order=1, order_z=0, force_separate_z=None)
_RESAMPLING_PROBABILITIES = Resampling(order=1, order_z=0, force_separate_z=None)


def determine_fullres_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Target spacing of ``3d_fullres`` (nnU-Net ``determine_fullres_target_spacing``).

    Parameters
    ----------
    spacings : ndarray, shape (n_cases, 3), float64
        Case spacings in reader axis order, mm.
    shapes : ndarray, shape (n_cases, 3)
        Case shapes after cropping, reader axis order, voxels.

    Returns
    -------
    ndarray, shape (3,), float64
        Target spacing in reader axis order (not transposed).
    """
    target = np.percentile(spacings, 50, 0)
    target_size = np.percentile(shapes, 50, 0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    max_other_spacing = max(target[a] for a in others)
    min_other_size = min(target_size[a] for a in others)
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max_other_spacing
    aniso_voxels = target_size[worst] * ANISO_THRESHOLD < min_other_size
    if aniso_spacing and aniso_voxels:
        t = np.percentile(spacings[:, worst], 10)
        if t < max_other_spacing:  # never finer than the other axes
            t = max(max_other_spacing, t) + 1e-5
        target[worst] = t
    return target


def determine_transpose(target_spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(transpose_forward, transpose_backward)``: the coarsest axis first, the others in order (first max wins)."""
    first = int(np.argmax(target_spacing))
    forward = (first, *[a for a in range(3) if a != first])
    backward = tuple(forward.index(a) for a in range(3))
    return forward, backward


def normalization_schemes_for(
    channel_names: dict[str, str], median_relative_size_after_cropping: float
) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """Normalization scheme per channel and whether it uses the nonzero mask (nnU-Net's rule).

    Channel names are matched case-insensitively; unknown names (T1, T2, FLAIR, MRI, ...) get z-scoring.
    """
    names = [channel_names[k] for k in channel_names]  # dataset.json order, as nnU-Net iterates .values()
    schemes = tuple(_NORMALIZATION_BY_CHANNEL_NAME.get(n.casefold(), "ZScoreNormalization") for n in names)
    if median_relative_size_after_cropping < 3 / 4.0:
        mask = tuple(s in _MASK_CAPABLE for s in schemes)
    else:
        mask = (False,) * len(schemes)
    return schemes, mask


def _features_per_stage(n_stages: int, max_features: int) -> tuple[int, ...]:
    return tuple(min(max_features, BASE_NUM_FEATURES * 2 ** i) for i in range(n_stages))


def _architecture(topology_strides, kernel_sizes, max_features: int,
                  preset: PlannerPreset | None = None) -> Architecture:
    n = len(topology_strides)
    if preset is not None and preset.residual:
        assert preset.blocks_per_stage_encoder is not None and preset.blocks_per_stage_decoder is not None
        if n > len(preset.blocks_per_stage_encoder):  # nnU-Net would fail on a too short tuple as well
            raise PlanError(f"{preset.name}: {n} stages, but the preset defines residual blocks for at most "
                            f"{len(preset.blocks_per_stage_encoder)}")
        per_stage, decoder = preset.blocks_per_stage_encoder[:n], preset.blocks_per_stage_decoder[:n - 1]
    else:
        per_stage, decoder = (CONVS_PER_STAGE_ENCODER,) * n, (CONVS_PER_STAGE_DECODER,) * (n - 1)
    return Architecture(
        n_stages=n,
        features_per_stage=_features_per_stage(n, max_features),
        kernel_sizes=tuple(kernel_sizes),
        strides=tuple(topology_strides),
        n_conv_per_stage=tuple(per_stage),
        n_conv_per_stage_decoder=tuple(decoder),
        network_class="ResidualEncoderUNet" if preset is not None and preset.residual else "PlainConvUNet",
    )


class _Planner:
    """Per-run state: dataset constants and the VRAM-estimate cache shared by all configurations."""

    def __init__(self, num_input_channels: int, num_classes: int, gpu_memory_target_in_gb: float,
                 normalization: tuple[tuple[str, ...], tuple[bool, ...]],
                 preset: PlannerPreset | None = None) -> None:
        self.preset = preset or get_preset(DEFAULT_PRESET)
        self.num_input_channels = num_input_channels
        self.num_classes = num_classes
        self.gpu_memory_target_in_gb = gpu_memory_target_in_gb
        self.normalization = normalization
        self._cache: dict[tuple, int] = {}

    def _estimate(self, patch_size: tuple[int, ...], arch: Architecture) -> int:
        key = (patch_size, arch.strides)
        if key not in self._cache:
            # nnU-Net builds the network without deep supervision: only the last segmentation head counts
            self._cache[key] = compute_conv_feature_map_size(
                patch_size, arch, self.num_input_channels, self.num_classes, deep_supervision=False)
        return self._cache[key]

    def configuration(self, name: str, spacing: np.ndarray, median_shape: Sequence[float], data_identifier: str,
                      approximate_n_voxels_dataset: float) -> ConfigurationPlan:
        """nnU-Net ``get_plans_for_configuration`` (``batch_dice`` is set by the caller)."""
        ndim = len(spacing)
        if not all(s > 0 for s in spacing):
            raise PlanError(f"configuration `{name}`: every target spacing must be > 0 mm, found {list(spacing)}")
        max_features = MAX_FEATURES_2D if ndim == 2 else MAX_FEATURES_3D

        # initial patch: aspect ratio 1/spacing (isotropic in mm), volume 256^3 (2D: 2048^2), clipped to median shape
        inv = 1 / np.asarray(spacing, dtype=np.float64)
        edge, power = (256, 3) if ndim == 3 else (2048, 2)
        initial = [round(v) for v in inv * (edge ** power / np.prod(inv)) ** (1 / power)]
        initial = [min(i, j) for i, j in zip(initial, median_shape[:ndim])]

        topo = get_pool_and_conv_props(spacing, initial, FEATUREMAP_MIN_EDGE_LENGTH, MAX_NUMPOOL)
        patch_size = topo.patch_size
        if 0 in patch_size:  # nnU-Net dies here with OverflowError (batch size from a zero VRAM estimate)
            raise PlanError(
                f"configuration `{name}`: the median image size at spacing {[float(s) for s in spacing]} mm is "
                f"{[float(m) for m in median_shape[:ndim]]} voxels, which has an empty axis; choose a finer "
                "overwrite_target_spacing")
        preset = self.preset
        arch = _architecture(topo.strides, topo.kernel_sizes, max_features, preset)
        estimate = self._estimate(patch_size, arch)

        reference = (preset.reference_val_2d if ndim == 2 else preset.reference_val_3d) * \
            (self.gpu_memory_target_in_gb / preset.reference_corresp_gb)
        ref_bs = REFERENCE_BS_2D if ndim == 2 else REFERENCE_BS_3D
        divisible_by = topo.shape_must_be_divisible_by
        # the default planner asks for room for batch 2; the residual presets compare the estimate itself (the
        # expressions are nnU-Net's, in its operation order, so that the floating-point comparisons agree)
        def too_large(estimate: int) -> bool:
            return estimate > reference if preset.residual else estimate / ref_bs * 2 > reference

        while too_large(estimate):
            # shrink the axis that is largest relative to the median shape; nnU-Net picks it with np.argsort(...)[-1],
            # which we call too so that ties resolve identically
            ratios = [p / m for p, m in zip(patch_size, median_shape[:ndim])]
            axis = int(np.argsort(ratios)[-1])
            # step by the divisor of the tentatively shrunk patch so that e.g. 224 is not skipped on the way 256 -> 192
            trial = list(patch_size)
            trial[axis] -= divisible_by[axis]
            trial_topo = get_pool_and_conv_props(spacing, trial, FEATUREMAP_MIN_EDGE_LENGTH, MAX_NUMPOOL)
            step = trial_topo.shape_must_be_divisible_by[axis]
            if step == divisible_by[axis]:
                topo = trial_topo  # same input as the recompute below: reuse it
            else:
                shrunk = list(patch_size)
                shrunk[axis] -= step
                topo = get_pool_and_conv_props(spacing, shrunk, FEATUREMAP_MIN_EDGE_LENGTH, MAX_NUMPOOL)
            patch_size = topo.patch_size
            divisible_by = topo.shape_must_be_divisible_by
            arch = _architecture(topo.strides, topo.kernel_sizes, max_features, preset)
            estimate = self._estimate(patch_size, arch)

        batch_size = round((reference / estimate) * ref_bs)
        bs_5_percent = round(approximate_n_voxels_dataset * preset.max_dataset_covered /
                             np.prod(patch_size, dtype=np.float64))
        batch_size = max(min(batch_size, bs_5_percent), MIN_BATCH_SIZE)

        schemes, mask = self.normalization
        return ConfigurationPlan(
            name=name,
            data_identifier=data_identifier,
            batch_size=int(batch_size),
            patch_size=tuple(int(p) for p in patch_size),
            median_image_size_in_voxels=tuple(
                int(m) if isinstance(m, int) else float(m) for m in median_shape[:ndim]),
            spacing=tuple(float(s) for s in spacing),
            normalization_schemes=schemes,
            use_mask_for_norm=mask,
            resampling_data=_RESAMPLING_DATA,
            resampling_seg=_RESAMPLING_SEG,
            resampling_probabilities=_RESAMPLING_PROBABILITIES,
            architecture=arch,
            batch_dice=False,
        )


def _validate(fingerprint: Fingerprint, dataset: DatasetInfo, gpu_memory_target_in_gb: float,
              overwrite_target_spacing: Sequence[float] | None) -> None:
    n = len(fingerprint.spacings)
    where = f"fingerprint of {dataset.name}"
    if n == 0:
        raise PlanError(f"{where} has no cases; extract the fingerprint of a dataset with training cases first")
    if len(fingerprint.shapes_after_crop) != n:
        raise PlanError(f"{where} has {n} spacings but {len(fingerprint.shapes_after_crop)} shapes")
    bad = [i for i, (sp, sh) in enumerate(zip(fingerprint.spacings, fingerprint.shapes_after_crop))
           if len(sp) != 3 or len(sh) != 3 or not all(s > 0 for s in sp) or not all(s > 0 for s in sh)]
    if bad:
        i = bad[0]
        raise PlanError(f"{where}: case {i} has spacing {fingerprint.spacings[i]} and shape "
                        f"{fingerprint.shapes_after_crop[i]}; expected 3 positive values each "
                        f"({len(bad)} such case(s)); re-extract the fingerprint")
    n_ch = len(fingerprint.foreground_intensity_properties_per_channel)
    if n_ch != dataset.num_channels:
        raise PlanError(f"{where} has intensity statistics for {n_ch} channel(s) but dataset.json declares "
                        f"{dataset.num_channels} ({dataset.channel_names}); re-extract the fingerprint")
    if not len(dataset.labels):
        raise PlanError(f"dataset.json of {dataset.name} declares no labels")
    if not 0 < gpu_memory_target_in_gb < float("inf"):
        raise PlanError(f"gpu_memory_target_in_gb (--gpu-memory-gb) must be a finite number > 0, got "
                        f"{gpu_memory_target_in_gb}")
    if overwrite_target_spacing is not None:
        if len(overwrite_target_spacing) != 3 or not all(float(s) > 0 for s in overwrite_target_spacing):
            raise PlanError(f"overwrite_target_spacing must be 3 positive spacings in mm (reader axis order), got "
                            f"{list(overwrite_target_spacing)}")


def plan_experiment(
    fingerprint: Fingerprint,
    dataset: DatasetInfo,
    gpu_memory_target_in_gb: float | None = None,
    overwrite_target_spacing: Sequence[float] | None = None,
    preset: str = DEFAULT_PRESET,
    plans_identifier: str | None = None,
) -> Plans:
    """Plan the 2d, 3d_fullres and (if useful) 3d_lowres / 3d_cascade_fullres configurations of a dataset.

    Parameters
    ----------
    fingerprint : Fingerprint
        The dataset fingerprint (spacings and cropped shapes in reader axis order).
    dataset : DatasetInfo
        The parsed ``dataset.json`` (channel names, labels, ``numTraining``, name).
    gpu_memory_target_in_gb : float, optional
        nnU-Net's ``-gpu_memory_target`` (scales the VRAM reference linearly); default: the preset's (8, 8, 24, 40).
    overwrite_target_spacing : sequence of 3 float, optional
        Replace the full-resolution target spacing (reader axis order, mm), like nnU-Net's
        ``-overwrite_target_spacing``; also decides the transposition and seeds 3d_lowres.
    preset : str
        ``default`` (nnU-Net's ``ExperimentPlanner``), ``resenc-m``, ``resenc-l`` or ``resenc-xl``
        (``nnUNetPlannerResEncM/L/XL``; :mod:`nnfast.plan.presets`).
    plans_identifier : str, optional
        Recorded as ``plans_name`` and used for data identifiers; default: the preset's (``nnfast_plans``,
        ``nnfast_ResEncM_plans``, ...).

    Returns
    -------
    Plans
        Configurations in nnU-Net's order; data identifiers ``nnfast_<configuration>`` (the cascade shares
        ``nnfast_3d_fullres``) -- except that plans under another identifier give ``<identifier>_<configuration>`` to
        every configuration whose preprocessed data would differ from the default plans' (``3d_lowres``; all of them
        with ``overwrite_target_spacing``), as nnU-Net's residual planners do.

    Raises
    ------
    PlanError
        If the fingerprint is empty or inconsistent with ``dataset`` or an argument is out of range.
    """
    p = get_preset(preset)
    if gpu_memory_target_in_gb is None:
        gpu_memory_target_in_gb = p.default_gpu_memory_gb
    identifier = plans_identifier or p.plans_identifier
    _validate(fingerprint, dataset, gpu_memory_target_in_gb, overwrite_target_spacing)
    spacings = np.asarray(fingerprint.spacings, dtype=np.float64)
    shapes = np.asarray(fingerprint.shapes_after_crop, dtype=np.int64)

    if overwrite_target_spacing is not None:
        fullres_spacing = np.array([float(s) for s in overwrite_target_spacing], dtype=np.float64)
    else:
        fullres_spacing = determine_fullres_target_spacing(spacings, shapes)
    forward, backward = determine_transpose(fullres_spacing)
    tf = list(forward)
    fullres_spacing_t = fullres_spacing[tf]

    # median shape after resampling to the target spacing (compute_new_shape per case), transposed
    new_shapes = [[int(round(float(sp) / float(ts) * int(sh))) for sp, ts, sh in zip(case_sp, fullres_spacing, case_sh)]
                  for case_sp, case_sh in zip(fingerprint.spacings, fingerprint.shapes_after_crop)]
    median_shape_t = np.median(np.asarray(new_shapes), 0)[tf]
    n_training = dataset.num_training
    approx_voxels = float(np.prod(median_shape_t, dtype=np.float64) * n_training)

    planner = _Planner(
        num_input_channels=dataset.num_channels,
        num_classes=len(dataset.labels),
        gpu_memory_target_in_gb=float(gpu_memory_target_in_gb),
        normalization=normalization_schemes_for(dataset.channel_names,
                                                fingerprint.median_relative_size_after_cropping),
        preset=p,
    )

    def ident(cfg: str) -> str:
        own = identifier != PLANS_IDENTIFIER and (cfg == "3d_lowres" or overwrite_target_spacing is not None)
        return data_identifier(cfg, prefix=identifier) if own else data_identifier(cfg)

    fullres = lowres = None
    if median_shape_t[0] != 1:
        fullres = planner.configuration("3d_fullres", fullres_spacing_t, median_shape_t, ident("3d_fullres"),
                                        approx_voxels)
        lowres = _plan_lowres(planner, fullres_spacing_t, median_shape_t, fullres.patch_size, n_training,
                              ident("3d_lowres"))
        fullres = _with(fullres, batch_dice=lowres is not None)
        if lowres is not None:
            lowres = _with(lowres, batch_dice=False, next_stage="3d_cascade_fullres")

    plan_2d = planner.configuration("2d", fullres_spacing_t[1:], median_shape_t[1:], ident("2d"), approx_voxels)
    plan_2d = _with(plan_2d, batch_dice=True)

    configurations: dict[str, Any] = {"2d": plan_2d}
    if lowres is not None:
        configurations["3d_lowres"] = lowres
    if fullres is not None:
        configurations["3d_fullres"] = fullres
        if lowres is not None:
            configurations["3d_cascade_fullres"] = InheritedConfiguration(
                name="3d_cascade_fullres", inherits_from="3d_fullres", previous_stage="3d_lowres")

    median_spacing = np.median(spacings, 0)[tf]
    median_shape = np.median(shapes, 0)[tf]
    plans = Plans(
        dataset_name=dataset.name,
        plans_name=identifier,
        original_median_spacing_after_transp=tuple(float(v) for v in median_spacing),
        original_median_shape_after_transp=tuple(int(round(v)) for v in median_shape),
        transpose_forward=forward,
        transpose_backward=backward,
        foreground_intensity_properties_per_channel=tuple(fingerprint.foreground_intensity_properties_per_channel),
        channel_names=dict(dataset.channel_names),
        labels=dict(dataset.labels),
        configurations=configurations,
        experiment_planner=p.experiment_planner,
    )
    for name, c in configurations.items():
        if isinstance(c, ConfigurationPlan):
            log.info("%s: patch %s, batch %d, spacing %s, %d stages", name, c.patch_size, c.batch_size,
                     tuple(round(s, 4) for s in c.spacing), c.architecture.n_stages)
    return plans


def _with(conf: ConfigurationPlan, **changes: Any) -> ConfigurationPlan:
    return dataclasses.replace(conf, **changes)


def _plan_lowres(planner: _Planner, fullres_spacing_t: np.ndarray, median_shape_t: np.ndarray,
                 fullres_patch: Sequence[int], n_training: int, data_identifier: str) -> ConfigurationPlan | None:
    """nnU-Net's 3d_lowres search: coarsen by 1.03 per step until the patch covers >= 25 % of the median image."""
    median_num_voxels = np.prod(median_shape_t, dtype=np.float64)
    num_voxels_in_patch = np.prod(fullres_patch, dtype=np.float64)
    lowres_spacing = np.array(fullres_spacing_t, dtype=np.float64)
    lowres = None
    steps = 0
    while num_voxels_in_patch / median_num_voxels < LOWRES_CREATION_THRESHOLD:
        max_spacing = max(lowres_spacing)
        coarse_gap = (max_spacing / lowres_spacing) > 2
        if np.any(coarse_gap):
            lowres_spacing[coarse_gap] *= LOWRES_SPACING_FACTOR  # catch the fine axes up first
        else:
            lowres_spacing *= LOWRES_SPACING_FACTOR
        scaled = fullres_spacing_t / lowres_spacing * median_shape_t
        median_num_voxels = np.prod(scaled, dtype=np.float64)
        lowres = planner.configuration(
            "3d_lowres", lowres_spacing.copy(), tuple(round(v) for v in scaled), data_identifier,
            float(np.prod(median_num_voxels) * n_training))
        num_voxels_in_patch = np.prod(lowres.patch_size, dtype=np.int64)
        steps += 1
    if np.prod(median_shape_t, dtype=np.float64) / median_num_voxels < 2:
        if lowres is not None:
            log.info("dropping 3d_lowres: it would hold more than half the voxels of 3d_fullres (%s vs %s)",
                     lowres.median_image_size_in_voxels, tuple(median_shape_t))
        return None
    log.debug("3d_lowres found after %d spacing steps", steps)
    return lowres


def write_plans(plans: Plans, path: Path | str) -> None:
    """Write ``plans`` as JSON to ``path`` atomically (temporary name, then rename)."""
    write_json_atomic(Path(path), plans.to_json())


def load_plans(path: Path | str) -> Plans:
    """Read plans written by :func:`write_plans`.

    Raises
    ------
    PlanError
        If the file does not exist, is not JSON, or has another schema version.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plans file `{path}` does not exist; run `nnfast plan` for this dataset first")
    try:
        d = read_json(path)
    except ValueError as e:
        raise PlanError(f"plans file `{path}` is not valid JSON ({e}); run `nnfast plan` again") from None
    if not isinstance(d, dict):
        raise PlanError(f"plans file `{path}` holds a {type(d).__name__}, expected a JSON object")
    try:
        return Plans.from_json(d)
    except PlanError as e:
        raise PlanError(f"`{path}`: {e}") from None
