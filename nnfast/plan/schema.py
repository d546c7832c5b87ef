"""Plans: what the experiment planner decided, as frozen dataclasses written as versioned JSON.

Same content as nnU-Net v2's ``nnUNetPlans.json`` (see :mod:`nnfast.plan.nnunet_compat` for the exact nnU-Net file),
in nnfast's own, explicit layout:

- :class:`Architecture`: the PlainConvUNet topology of one configuration.
- :class:`Resampling`: order / order_z / force_separate_z of one resampling step.
- :class:`ConfigurationPlan`: one configuration (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``).
- :class:`InheritedConfiguration`: a configuration stored as a reference to another plus a few overrides (nnU-Net's
  ``inherits_from``; the cascade's full-resolution stage is ``3d_fullres`` with ``previous_stage='3d_lowres'``).
- :class:`Plans`: dataset-level values (transposition, median spacing/shape, intensity statistics) and the
  configurations. :meth:`Plans.configuration` resolves inheritance.

Axis order: every spacing / shape / patch size here is in nnU-Net's axis order AFTER transposition (the
low-resolution axis first); spacings in mm, sizes in voxels. ``transpose_forward`` maps reader axes to that order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

from ..errors import PlanError
from ..fingerprint.schema import IntensityStats

__all__ = [
    "PLANS_SCHEMA_VERSION",
    "READABLE_SCHEMA_VERSIONS",
    "NETWORK_CLASSES",
    "ConfigurationName",
    "CONFIGURATION_NAMES",
    "NORMALIZATION_SCHEMES",
    "Architecture",
    "Resampling",
    "ConfigurationPlan",
    "InheritedConfiguration",
    "Plans",
    "nnfast_version",
]

PLANS_SCHEMA_VERSION = 2
#: versions :meth:`Plans.from_json` reads (1: PlainConvUNet only, before ``network_class`` could vary)
READABLE_SCHEMA_VERSIONS = (1, 2)
#: the network classes a plan may name (dynamic-network-architectures' names)
NETWORK_CLASSES: tuple[str, ...] = ("PlainConvUNet", "ResidualEncoderUNet")

ConfigurationName = Literal["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
CONFIGURATION_NAMES: tuple[str, ...] = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")

#: nnU-Net's normalization class names (``preprocessing/normalization/default_normalization_schemes.py``).
NORMALIZATION_SCHEMES: tuple[str, ...] = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)


def nnfast_version() -> str:
    """The installed nnfast version (``0+unknown`` when running from an uninstalled tree)."""
    try:
        from importlib.metadata import version

        return version("nnfast")
    except Exception:  # pragma: no cover - only without package metadata
        return "0+unknown"


def _ints(seq: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in seq)


def _floats(seq: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in seq)


def _numbers(seq: Any) -> tuple[float, ...]:
    """Keep ints as ints and floats as floats (nnU-Net writes float medians for 3d_fullres, ints for 3d_lowres)."""
    return tuple(int(v) if isinstance(v, int) and not isinstance(v, bool) else float(v) for v in seq)


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise PlanError(f"{where}: required key `{key}` is missing (found keys {sorted(d)}); re-run `nnfast plan`")
    return d[key]


@dataclass(frozen=True)
class Architecture:
    """A dynamic-network-architectures ``PlainConvUNet`` or ``ResidualEncoderUNet`` with nnU-Net's defaults.

    ``network_class`` names the class. For ``PlainConvUNet`` ``n_conv_per_stage[s]`` is the number of convs of encoder
    stage ``s``; for ``ResidualEncoderUNet`` it is the number of residual blocks (nnU-Net's ``n_blocks_per_stage``, also
    available under that name, and the JSON key of such plans): a stem conv, then per stage ``BasicBlockD`` blocks of
    two convs each, the first strided (skip: avg-pool + 1x1 conv where the size or width changes; built by
    :mod:`nnfast.network_residual`).
    ``n_conv_per_stage_decoder`` is the convs per decoder stage for both.

    Conv kernels and strides per encoder stage are in nnU-Net axis order; stage 0 has stride 1 on every axis.
    Norm is InstanceNorm (eps ``norm_eps``, affine ``norm_affine``), nonlinearity LeakyReLU (``nonlin_negative_slope``),
    no dropout, convs with bias ``conv_bias``. The decoder upsamples with transposed convs (kernel = stride) and ends every
    stage in a 1x1 segmentation conv.
    """

    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    conv_bias: bool = True
    norm: Literal["InstanceNorm"] = "InstanceNorm"
    norm_eps: float = 1e-5
    norm_affine: bool = True
    nonlin: Literal["LeakyReLU"] = "LeakyReLU"
    nonlin_negative_slope: float = 0.01
    network_class: Literal["PlainConvUNet", "ResidualEncoderUNet"] = "PlainConvUNet"

    def __post_init__(self) -> None:
        if self.network_class not in NETWORK_CLASSES:
            raise PlanError(f"architecture: network_class {self.network_class!r} is not one of {NETWORK_CLASSES}")
        n = self.n_stages
        lengths = {
            "features_per_stage": len(self.features_per_stage),
            "kernel_sizes": len(self.kernel_sizes),
            "strides": len(self.strides),
            "n_conv_per_stage": len(self.n_conv_per_stage),
        }
        bad = {k: v for k, v in lengths.items() if v != n}
        if n < 1 or bad or len(self.n_conv_per_stage_decoder) != n - 1:
            raise PlanError(
                f"architecture with n_stages={n} needs {n} features_per_stage, kernel_sizes, strides and "
                f"n_conv_per_stage and {n - 1} n_conv_per_stage_decoder; found {lengths} and "
                f"{len(self.n_conv_per_stage_decoder)} n_conv_per_stage_decoder"
            )
        dims = {len(k) for k in self.kernel_sizes} | {len(s) for s in self.strides}
        if len(dims) != 1 or dims.pop() not in (2, 3):
            raise PlanError(f"kernel_sizes {self.kernel_sizes} and strides {self.strides} must all have 2 or 3 axes")

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.strides[0])

    @property
    def residual(self) -> bool:
        """True for ``ResidualEncoderUNet``."""
        return self.network_class == "ResidualEncoderUNet"

    @property
    def n_blocks_per_stage(self) -> tuple[int, ...]:
        """Residual blocks per encoder stage (``ResidualEncoderUNet``; the same tuple as ``n_conv_per_stage``)."""
        return self.n_conv_per_stage

    @property
    def num_pool_per_axis(self) -> tuple[int, ...]:
        """How often each axis is downsampled by stride 2."""
        return tuple(sum(1 for s in self.strides if s[a] == 2) for a in range(self.ndim))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("kernel_sizes", "strides"):
            d[k] = [list(v) for v in d[k]]
        for k in ("features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder"):
            d[k] = list(d[k])
        if self.residual:
            d["n_blocks_per_stage"] = d.pop("n_conv_per_stage")
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Architecture":
        where = "plans architecture"
        network_class = str(d.get("network_class", "PlainConvUNet"))
        if network_class not in NETWORK_CLASSES or d.get("norm", "InstanceNorm") != "InstanceNorm" \
                or d.get("nonlin", "LeakyReLU") != "LeakyReLU":
            raise PlanError(f"{where}: only {' or '.join(NETWORK_CLASSES)} with InstanceNorm and LeakyReLU is "
                            f"supported, found {network_class}/{d.get('norm')}/{d.get('nonlin')}")
        per_stage_key = "n_blocks_per_stage" if network_class == "ResidualEncoderUNet" else "n_conv_per_stage"
        return cls(
            n_stages=int(_require(d, "n_stages", where)),
            features_per_stage=_ints(_require(d, "features_per_stage", where)),
            kernel_sizes=tuple(_ints(k) for k in _require(d, "kernel_sizes", where)),
            strides=tuple(_ints(s) for s in _require(d, "strides", where)),
            n_conv_per_stage=_ints(_require(d, per_stage_key, where)),
            n_conv_per_stage_decoder=_ints(_require(d, "n_conv_per_stage_decoder", where)),
            conv_bias=bool(d.get("conv_bias", True)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            norm_affine=bool(d.get("norm_affine", True)),
            nonlin_negative_slope=float(d.get("nonlin_negative_slope", 0.01)),
            network_class=network_class,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Resampling:
    """Settings of nnU-Net's ``resample_data_or_seg_to_shape`` for one kind of data.

    ``order`` is the spline order in-plane (or in 3D); ``order_z`` the order along the low-resolution axis when it is
    resampled separately; ``force_separate_z`` None lets the anisotropy rule decide.
    """

    order: int
    order_z: int = 0
    force_separate_z: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"order": self.order, "order_z": self.order_z, "force_separate_z": self.force_separate_z}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Resampling":
        fsz = d.get("force_separate_z")
        return cls(order=int(d["order"]), order_z=int(d.get("order_z", 0)),
                   force_separate_z=None if fsz is None else bool(fsz))


@dataclass(frozen=True)
class ConfigurationPlan:
    """One fully specified configuration (nnU-Net's per-configuration plans entry).

    ``median_image_size_in_voxels`` keeps nnU-Net's types: float medians for ``3d_fullres``/``2d``, rounded ints for
    ``3d_lowres``. ``normalization_schemes`` and ``use_mask_for_norm`` have one entry per input channel.
    """

    name: str
    data_identifier: str
    batch_size: int
    patch_size: tuple[int, ...]
    median_image_size_in_voxels: tuple[float, ...]
    spacing: tuple[float, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    resampling_data: Resampling
    resampling_seg: Resampling
    resampling_probabilities: Resampling
    architecture: Architecture
    batch_dice: bool
    previous_stage: str | None = None
    next_stage: str | None = None
    inherits_from: str | None = None

    def __post_init__(self) -> None:
        nd = len(self.patch_size)
        if nd not in (2, 3) or len(self.spacing) != nd or len(self.median_image_size_in_voxels) != nd \
                or self.architecture.ndim != nd:
            raise PlanError(
                f"configuration `{self.name}`: patch_size {self.patch_size}, spacing {self.spacing}, median size "
                f"{self.median_image_size_in_voxels} and the architecture ({self.architecture.ndim}D) must agree on "
                "2 or 3 axes"
            )
        if len(self.normalization_schemes) != len(self.use_mask_for_norm):
            raise PlanError(f"configuration `{self.name}`: {len(self.normalization_schemes)} normalization schemes but "
                            f"{len(self.use_mask_for_norm)} use_mask_for_norm entries")
        if self.batch_size < 1:
            raise PlanError(f"configuration `{self.name}`: batch_size must be >= 1, found {self.batch_size}")

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "data_identifier": self.data_identifier,
            "batch_size": self.batch_size,
            "patch_size": list(self.patch_size),
            "median_image_size_in_voxels": list(self.median_image_size_in_voxels),
            "spacing": list(self.spacing),
            "normalization_schemes": list(self.normalization_schemes),
            "use_mask_for_norm": list(self.use_mask_for_norm),
            "resampling_data": self.resampling_data.to_json(),
            "resampling_seg": self.resampling_seg.to_json(),
            "resampling_probabilities": self.resampling_probabilities.to_json(),
            "architecture": self.architecture.to_json(),
            "batch_dice": self.batch_dice,
        }
        for k in ("previous_stage", "next_stage", "inherits_from"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> "ConfigurationPlan":
        where = f"plans configuration `{name}`"
        return cls(
            name=name,
            data_identifier=str(_require(d, "data_identifier", where)),
            batch_size=int(_require(d, "batch_size", where)),
            patch_size=_ints(_require(d, "patch_size", where)),
            median_image_size_in_voxels=_numbers(_require(d, "median_image_size_in_voxels", where)),
            spacing=_floats(_require(d, "spacing", where)),
            normalization_schemes=tuple(str(s) for s in _require(d, "normalization_schemes", where)),
            use_mask_for_norm=tuple(bool(b) for b in _require(d, "use_mask_for_norm", where)),
            resampling_data=Resampling.from_json(_require(d, "resampling_data", where)),
            resampling_seg=Resampling.from_json(_require(d, "resampling_seg", where)),
            resampling_probabilities=Resampling.from_json(_require(d, "resampling_probabilities", where)),
            architecture=Architecture.from_json(_require(d, "architecture", where)),
            batch_dice=bool(_require(d, "batch_dice", where)),
            previous_stage=d.get("previous_stage"),
            next_stage=d.get("next_stage"),
            inherits_from=d.get("inherits_from"),
        )


@dataclass(frozen=True)
class InheritedConfiguration:
    """A configuration defined as another one plus overrides (nnU-Net's ``{"inherits_from": ...}`` entries, e.g. a
    custom ``"3d_fullres_bs40": {"inherits_from": "3d_fullres", "batch_size": 40}``).

    ``overrides`` holds the other keys as written in the plans file (:meth:`ConfigurationPlan.to_json` keys); like
    nnU-Net, the parent's entry updated with them is the configuration.
    """

    name: str
    inherits_from: str
    previous_stage: str | None = None
    next_stage: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"inherits_from": self.inherits_from, **self.overrides}
        if self.previous_stage is not None:
            d["previous_stage"] = self.previous_stage
        if self.next_stage is not None:
            d["next_stage"] = self.next_stage
        return d


Configuration = Union[ConfigurationPlan, InheritedConfiguration]


@dataclass(frozen=True)
class Plans:
    """Everything the experiment planner decided for one dataset (nnU-Net v2 ``nnUNetPlans.json`` content).

    ``original_median_spacing_after_transp`` / ``original_median_shape_after_transp`` are the medians of the
    fingerprint's raw spacings / cropped shapes, transposed. ``transpose_forward[i]`` is the reader axis that becomes
    axis ``i``; ``transpose_backward`` is its inverse. ``configurations`` keeps nnU-Net's insertion order
    (``2d``, ``3d_lowres``, ``3d_fullres``, ``3d_cascade_fullres``); use :meth:`configuration` to get one resolved.
    """

    dataset_name: str
    plans_name: str
    original_median_spacing_after_transp: tuple[float, ...]
    original_median_shape_after_transp: tuple[int, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    foreground_intensity_properties_per_channel: tuple[IntensityStats, ...]
    channel_names: dict[str, str]
    labels: dict[str, Any]
    configurations: dict[str, Configuration]
    experiment_planner: str = "nnfast.ExperimentPlanner"
    nnfast_version: str = field(default_factory=nnfast_version)
    schema_version: int = PLANS_SCHEMA_VERSION

    @property
    def available_configurations(self) -> list[str]:
        return list(self.configurations)

    @property
    def num_input_channels(self) -> int:
        return len(self.channel_names)

    def configuration(self, name: str) -> ConfigurationPlan:
        """The configuration ``name`` with inheritance resolved (nnU-Net ``PlansManager.get_configuration`` semantics).

        Raises
        ------
        PlanError
            If ``name`` is not in these plans or the inheritance chain is circular.
        """
        return self._resolve(name, ())

    def _resolve(self, name: str, visited: tuple[str, ...]) -> ConfigurationPlan:
        if name not in self.configurations:
            raise PlanError(f"configuration `{name}` is not in the plans of {self.dataset_name} (available: "
                            f"{self.available_configurations}); plan again or pick another configuration")
        if name in visited:
            raise PlanError(f"configurations inherit in a circle: {' -> '.join((*visited, name))}")
        conf = self.configurations[name]
        if isinstance(conf, ConfigurationPlan):
            return conf
        parent = self._resolve(conf.inherits_from, (*visited, name))
        # nnU-Net: parent dict updated with the child's keys; keys the child lacks come from the parent
        if conf.overrides:
            try:
                parent = ConfigurationPlan.from_json(name, {**parent.to_json(), **conf.overrides})
            except (KeyError, TypeError, ValueError) as e:
                raise PlanError(f"configuration `{name}` of plans `{self.plans_name}`: its overrides "
                                f"{sorted(conf.overrides)} of `{conf.inherits_from}` are invalid ({e})") from None
        return dataclasses.replace(
            parent,
            name=name,
            inherits_from=conf.inherits_from,
            previous_stage=conf.previous_stage if conf.previous_stage is not None else parent.previous_stage,
            next_stage=conf.next_stage if conf.next_stage is not None else parent.next_stage,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_name,
            "experiment_planner": self.experiment_planner,
            "nnfast_version": self.nnfast_version,
            "original_median_spacing_after_transp": list(self.original_median_spacing_after_transp),
            "original_median_shape_after_transp": list(self.original_median_shape_after_transp),
            "transpose_forward": list(self.transpose_forward),
            "transpose_backward": list(self.transpose_backward),
            "channel_names": dict(self.channel_names),
            "labels": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in self.labels.items()},
            "foreground_intensity_properties_per_channel": {
                str(i): s.to_json() for i, s in enumerate(self.foreground_intensity_properties_per_channel)
            },
            "configurations": {k: c.to_json() for k, c in self.configurations.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Plans":
        """Parse :meth:`to_json` output.

        Raises
        ------
        PlanError
            If the schema version is not this nnfast's or a required key is missing.
        """
        version = d.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            hint = " (this looks like an nnU-Net plans file: use nnfast.plan.nnunet_compat.from_nnunet_plans)" \
                if version is None and "configurations" in d else ""
            raise PlanError(f"plans schema version {version!r} is not supported (this nnfast reads "
                            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
                            f"{hint}; re-run `nnfast plan`")
        where = "plans"
        props = _require(d, "foreground_intensity_properties_per_channel", where)
        configurations: dict[str, Configuration] = {}
        for name, c in _require(d, "configurations", where).items():
            if "inherits_from" in c and "architecture" not in c:
                configurations[name] = InheritedConfiguration(
                    name=name, inherits_from=c["inherits_from"], previous_stage=c.get("previous_stage"),
                    next_stage=c.get("next_stage"),
                    overrides={k: v for k, v in c.items() if k not in ("inherits_from", "previous_stage", "next_stage")})
            else:
                configurations[name] = ConfigurationPlan.from_json(name, c)
        return cls(
            dataset_name=str(_require(d, "dataset_name", where)),
            plans_name=str(_require(d, "plans_name", where)),
            original_median_spacing_after_transp=_floats(_require(d, "original_median_spacing_after_transp", where)),
            original_median_shape_after_transp=_ints(_require(d, "original_median_shape_after_transp", where)),
            transpose_forward=_ints(_require(d, "transpose_forward", where)),
            transpose_backward=_ints(_require(d, "transpose_backward", where)),
            foreground_intensity_properties_per_channel=tuple(
                IntensityStats.from_json(props[str(i)]) for i in range(len(props))),
            channel_names={str(k): str(v) for k, v in _require(d, "channel_names", where).items()},
            labels={k: (tuple(v) if isinstance(v, list) else v) for k, v in _require(d, "labels", where).items()},
            configurations=configurations,
            experiment_planner=str(d.get("experiment_planner", "nnfast.ExperimentPlanner")),
            nnfast_version=str(d.get("nnfast_version", "0+unknown")),
            schema_version=PLANS_SCHEMA_VERSION,
        )
