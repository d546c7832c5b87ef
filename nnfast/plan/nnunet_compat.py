"""Adapter between nnfast :class:`~nnfast.plan.schema.Plans` and nnU-Net v2's ``nnUNetPlans.json``.

- :func:`to_nnunet_plans` writes the dict nnU-Net v2's planner of the plans' preset (``ExperimentPlanner``,
  ``nnUNetPlannerResEncM/L/XL``; :mod:`nnfast.plan.presets`) would have saved for the same dataset (``plans_name``
  ``nnUNetPlans`` / ``nnUNetResEncUNetMPlans`` ..., data identifiers ``nnUNetPlans_<configuration>`` or
  ``<plans name>_<configuration>``, the PlainConvUNet or ResidualEncoderUNet ``architecture`` block with the torch class paths nnU-Net writes, resampling function names and kwargs,
  ``DefaultPreprocessor``, ``LabelManager``, the image reader/writer chosen from the file ending). nnU-Net's
  ``PlansManager`` loads it and builds the same network.
- :func:`from_nnunet_plans` reads an nnU-Net plans dict so that nnfast can preprocess/train with existing nnU-Net plans.
  Only what nnfast can honour is accepted (PlainConvUNet or ResidualEncoderUNet with BasicBlockD, InstanceNorm, LeakyReLU, no dropout,
  ``resample_data_or_seg_to_shape``, ``DefaultPreprocessor``); anything else raises :class:`~nnfast.errors.PlanError`.
  Custom configurations other than nnU-Net's four are skipped with a log message.

Round trip: ``from_nnunet_plans(to_nnunet_plans(p, dj), dj) == p`` (up to nnfast's version string).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from ..errors import PlanError
from ..fingerprint.schema import IntensityStats
from .presets import PRESETS, nnunet_plans_name, preset_for_planner
from .schema import (
    CONFIGURATION_NAMES,
    Architecture,
    ConfigurationPlan,
    InheritedConfiguration,
    Plans,
    Resampling,
)

__all__ = ["NNUNET_PLANS_NAME", "NETWORK_CLASS_NAMES", "nnunet_name_of", "to_nnunet_plans", "from_nnunet_plans",
           "image_reader_writer_for"]

log = logging.getLogger(__name__)

NNUNET_PLANS_NAME = "nnUNetPlans"
_NETWORK_MODULE = "dynamic_network_architectures.architectures.unet"
#: nnfast's ``Architecture.network_class`` -> the ``network_class_name`` nnU-Net's plans hold
NETWORK_CLASS_NAMES = {name: f"{_NETWORK_MODULE}.{name}" for name in ("PlainConvUNet", "ResidualEncoderUNet")}
_CONV_OP = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}
_NORM_OP = {2: "torch.nn.modules.instancenorm.InstanceNorm2d", 3: "torch.nn.modules.instancenorm.InstanceNorm3d"}
_NONLIN = "torch.nn.LeakyReLU"
_NONLIN_ALIASES = {"torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU"}
_KW_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
_RESAMPLING_FN = "resample_data_or_seg_to_shape"
_PREPROCESSOR = "DefaultPreprocessor"
_DEFAULT_LEAKY_SLOPE = 0.01

# nnU-Net's reader/writer registry order (imageio/reader_writer_registry.py LIST_OF_IO_CLASSES) and endings
_IO_CLASSES = (
    ("NaturalImage2DIO", (".png", ".bmp", ".tif")),
    ("SimpleITKIO", (".nii.gz", ".nrrd", ".mha", ".gipl")),
    ("Tiff3DIO", (".tif", ".tiff")),
    ("NibabelIO", (".nii.gz", ".nrrd", ".mha", ".nii")),
)


def image_reader_writer_for(dataset_json: Mapping[str, Any]) -> str:
    """nnU-Net's reader/writer class name for a dataset (``overwrite_image_reader_writer`` or first by file ending).

    nnU-Net additionally tries to open an example image and falls through to the next class on failure (e.g. 3D .tif
    files go to Tiff3DIO); without reading files we return the first class that claims the ending.

    Raises
    ------
    PlanError
        If no nnU-Net reader supports the file ending.
    """
    override = dataset_json.get("overwrite_image_reader_writer")
    if override and override != "None":
        return str(override)
    ending = str(dataset_json.get("file_ending", "")).lower()
    for name, endings in _IO_CLASSES:
        if ending in endings:
            return name
    raise PlanError(f"no nnU-Net image reader supports file ending {ending!r} (dataset.json `file_ending`)")


def _resampling_kwargs(r: Resampling, is_seg: bool) -> dict[str, Any]:
    return {"is_seg": is_seg, "order": r.order, "order_z": r.order_z, "force_separate_z": r.force_separate_z}


def _nnunet_data_identifier(identifier: str, plans_name: str, nnfast_plans_name: str = "",
                            shares_default_data: bool = False) -> str:
    """nnfast's ``<plans identifier>_<config>`` -> ``<nnU-Net plans name>_<config>``; ``nnfast_<config>`` (the default
    plans' data, shared by the presets) -> ``nnUNetPlans_<config>``, as nnU-Net's residual planners share it.

    ``shares_default_data``: nnU-Net's residual planners name their ``2d`` and ``3d_fullres`` data ``nnUNetPlans_*``
    even with an overwritten target spacing (nnfast keeps such data apart, under its own identifier)."""
    if shares_default_data:
        for cfg in ("2d", "3d_fullres"):
            if identifier.endswith("_" + cfg):
                return f"{NNUNET_PLANS_NAME}_{cfg}"
    prefixes = [p for p in {nnfast_plans_name, *(pr.plans_identifier for pr in PRESETS.values()
                                                 if pr.nnunet_plans_name == plans_name)} if p]
    for prefix in sorted(prefixes, key=len, reverse=True):
        if identifier.startswith(prefix + "_"):
            return f"{plans_name}_{identifier[len(prefix) + 1:]}"
    head, sep, tail = identifier.partition("_")
    return f"nnUNetPlans_{tail}" if sep else f"nnUNetPlans_{identifier}"


def _arch_to_nnunet(a: Architecture) -> dict[str, Any]:
    nd = a.ndim
    nonlin_kwargs: dict[str, Any] = {"inplace": True}
    if a.nonlin_negative_slope != _DEFAULT_LEAKY_SLOPE:
        nonlin_kwargs["negative_slope"] = a.nonlin_negative_slope
    per_stage_key = "n_blocks_per_stage" if a.network_class == "ResidualEncoderUNet" else "n_conv_per_stage"
    return {
        "network_class_name": NETWORK_CLASS_NAMES[a.network_class],
        "arch_kwargs": {
            "n_stages": a.n_stages,
            "features_per_stage": list(a.features_per_stage),
            "conv_op": _CONV_OP[nd],
            "kernel_sizes": [list(k) for k in a.kernel_sizes],
            "strides": [list(s) for s in a.strides],
            per_stage_key: list(a.n_conv_per_stage),
            "n_conv_per_stage_decoder": list(a.n_conv_per_stage_decoder),
            "conv_bias": a.conv_bias,
            "norm_op": _NORM_OP[nd],
            "norm_op_kwargs": {"eps": a.norm_eps, "affine": a.norm_affine},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": _NONLIN,
            "nonlin_kwargs": nonlin_kwargs,
        },
        "_kw_requires_import": list(_KW_REQUIRES_IMPORT),
    }


def _config_to_nnunet(c: ConfigurationPlan, plans_name: str, nnfast_plans_name: str = "",
                      shares_default_data: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "data_identifier": _nnunet_data_identifier(c.data_identifier, plans_name, nnfast_plans_name,
                                                   shares_default_data),
        "preprocessor_name": _PREPROCESSOR,
        "batch_size": c.batch_size,
        "patch_size": list(c.patch_size),
        "median_image_size_in_voxels": list(c.median_image_size_in_voxels),
        "spacing": list(c.spacing),
        "normalization_schemes": list(c.normalization_schemes),
        "use_mask_for_norm": list(c.use_mask_for_norm),
        "resampling_fn_data": _RESAMPLING_FN,
        "resampling_fn_seg": _RESAMPLING_FN,
        "resampling_fn_data_kwargs": _resampling_kwargs(c.resampling_data, False),
        "resampling_fn_seg_kwargs": _resampling_kwargs(c.resampling_seg, True),
        "resampling_fn_probabilities": _RESAMPLING_FN,
        "resampling_fn_probabilities_kwargs": _resampling_kwargs(c.resampling_probabilities, False),
        "architecture": _arch_to_nnunet(c.architecture),
        "batch_dice": c.batch_dice,
    }
    for k in ("next_stage", "previous_stage", "inherits_from"):
        if getattr(c, k) is not None:
            d[k] = getattr(c, k)
    return d


def nnunet_name_of(plans: Plans) -> str:
    """The nnU-Net plans name (and file stem) of nnfast plans: ``nnUNetPlans`` for the default plans,
    ``nnUNetResEncUNetMPlans`` etc. for the presets' plans, a name that already is nnU-Net's kept, else
    ``nnUNetPlans_<plans identifier>``."""
    preset = preset_for_planner(plans.experiment_planner)
    if preset is not None and plans.plans_name in (preset.plans_identifier, preset.nnunet_plans_name, "nnfastPlans"):
        return preset.nnunet_plans_name
    if plans.plans_name.startswith("nnUNet"):
        return plans.plans_name
    return nnunet_plans_name(plans.plans_name)


def to_nnunet_plans(plans: Plans, dataset_json: Mapping[str, Any]) -> dict[str, Any]:
    """The ``nnUNetPlans.json`` content nnU-Net v2 would write for these plans.

    Parameters
    ----------
    plans : Plans
        nnfast plans (e.g. from :func:`nnfast.plan.planner.plan_experiment`).
    dataset_json : mapping
        The dataset's ``dataset.json`` (for the image reader/writer class).

    Returns
    -------
    dict
        JSON-serializable; key order as nnU-Net writes it. An extra top-level ``nnfast`` entry records provenance
        (nnU-Net ignores unknown keys).
    """
    plans_name = nnunet_name_of(plans)
    preset = preset_for_planner(plans.experiment_planner)
    configurations: dict[str, Any] = {}
    for name, c in plans.configurations.items():
        if isinstance(c, InheritedConfiguration) and c.overrides:
            parent = _config_to_nnunet(plans.configuration(c.inherits_from), plans_name, plans.plans_name,
                                       preset is not None and preset.residual)
            own = _config_to_nnunet(plans.configuration(name), plans_name, plans.plans_name,
                                    preset is not None and preset.residual)
            configurations[name] = {"inherits_from": c.inherits_from,
                                    **{k: v for k, v in own.items() if parent.get(k) != v and k != "inherits_from"}}
        elif isinstance(c, InheritedConfiguration):
            configurations[name] = c.to_json()
        else:
            configurations[name] = _config_to_nnunet(c, plans_name, plans.plans_name,
                                                     preset is not None and preset.residual)
    return {
        "dataset_name": plans.dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": list(plans.original_median_spacing_after_transp),
        "original_median_shape_after_transp": list(plans.original_median_shape_after_transp),
        "image_reader_writer": image_reader_writer_for(dataset_json),
        "transpose_forward": list(plans.transpose_forward),
        "transpose_backward": list(plans.transpose_backward),
        "configurations": configurations,
        "experiment_planner_used": preset.nnunet_planner if preset is not None
        else plans.experiment_planner.split(".")[-1],
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(i): s.to_json() for i, s in enumerate(plans.foreground_intensity_properties_per_channel)
        },
        "nnfast": {
            "experiment_planner": plans.experiment_planner,
            "version": plans.nnfast_version,
            "plans_name": plans.plans_name,
        },
    }


def _resampling_from_nnunet(c: Mapping[str, Any], kind: str, where: str) -> Resampling:
    fn = c.get(f"resampling_fn_{kind}")
    if fn != _RESAMPLING_FN:
        raise PlanError(f"{where}: resampling_fn_{kind} is {fn!r}; nnfast implements only {_RESAMPLING_FN!r}")
    kw = c.get(f"resampling_fn_{kind}_kwargs") or {}
    extra = set(kw) - {"is_seg", "order", "order_z", "force_separate_z"}
    if extra:
        raise PlanError(f"{where}: resampling_fn_{kind}_kwargs has unsupported keys {sorted(extra)}")
    return Resampling.from_json({"order": kw.get("order", 1 if kind != "data" else 3), "order_z": kw.get("order_z", 0),
                                 "force_separate_z": kw.get("force_separate_z")})


def _arch_from_nnunet(a: Mapping[str, Any], where: str) -> Architecture:
    cls = str(a.get("network_class_name", ""))
    short = cls.split(".")[-1]
    if short not in NETWORK_CLASS_NAMES or cls not in (short, NETWORK_CLASS_NAMES[short]):
        raise PlanError(f"{where}: network class {cls!r} is not supported; nnfast implements "
                        f"{', '.join(NETWORK_CLASS_NAMES.values())}")
    kw = a.get("arch_kwargs", {})
    residual = short == "ResidualEncoderUNet"
    per_stage_key = "n_blocks_per_stage" if residual else "n_conv_per_stage"
    unsupported = {k: kw[k] for k in ("block", "bottleneck_channels", "stem_channels", "stochastic_depth_p",
                                      "squeeze_excitation", "pool_type") if kw.get(k) not in (None, "conv")}
    if unsupported.get("block", "").split(".")[-1] == "BasicBlockD":
        unsupported.pop("block")
    if unsupported.get("stem_channels") == _first(kw.get("features_per_stage")):
        unsupported.pop("stem_channels")
    if unsupported:
        raise PlanError(f"{where}: arch_kwargs {unsupported} are not supported")
    conv = str(kw.get("conv_op") or "")
    nd = len(kw["strides"][0]) if kw.get("strides") else 0
    if not conv.endswith(f"Conv{nd}d"):
        raise PlanError(f"{where}: conv_op {conv!r} does not fit {nd}D strides (Conv2d/Conv3d only)")
    norm = str(kw.get("norm_op") or "")
    if "InstanceNorm" not in norm:
        raise PlanError(f"{where}: norm_op {norm!r} is not supported (InstanceNorm only)")
    if kw.get("dropout_op") is not None:
        raise PlanError(f"{where}: dropout_op {kw.get('dropout_op')!r} is not supported (no dropout)")
    if kw.get("nonlin") not in _NONLIN_ALIASES:
        raise PlanError(f"{where}: nonlin {kw.get('nonlin')!r} is not supported (LeakyReLU only)")
    if kw.get("nonlin_first", False):
        raise PlanError(f"{where}: nonlin_first=True is not supported")
    norm_kw = kw.get("norm_op_kwargs") or {}
    nonlin_kw = kw.get("nonlin_kwargs") or {}
    n_stages = int(kw["n_stages"])

    def per_stage(v: Any, n: int) -> tuple[int, ...]:
        return (int(v),) * n if isinstance(v, int) else tuple(int(x) for x in v)

    per_stage_key = "n_blocks_per_stage" if short == "ResidualEncoderUNet" else "n_conv_per_stage"
    if short == "ResidualEncoderUNet":
        extra = {k for k in ("block", "bottleneck_channels", "stem_channels") if kw.get(k) is not None}
        if extra:
            raise PlanError(f"{where}: ResidualEncoderUNet arch_kwargs {sorted(extra)} are not supported (BasicBlockD, "
                            "the default stem)")
    try:
        return Architecture(
            n_stages=n_stages,
            features_per_stage=per_stage(kw["features_per_stage"], n_stages),
            kernel_sizes=tuple(tuple(int(x) for x in k) for k in kw["kernel_sizes"]),
            strides=tuple(tuple(int(x) for x in s) for s in kw["strides"]),
            n_conv_per_stage=per_stage(kw[per_stage_key], n_stages),
            n_conv_per_stage_decoder=per_stage(kw["n_conv_per_stage_decoder"], n_stages - 1),
            conv_bias=bool(kw.get("conv_bias", False)),
            norm_eps=float(norm_kw.get("eps", 1e-5)),
            norm_affine=bool(norm_kw.get("affine", False)),
            nonlin_negative_slope=float(nonlin_kw.get("negative_slope", _DEFAULT_LEAKY_SLOPE)),
            network_class=short,  # type: ignore[arg-type]
        )
    except KeyError as e:
        raise PlanError(f"{where}: arch_kwargs lacks {e}") from None


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) and v else v


def _nnfast_data_identifier(identifier: str, plans_name: str) -> str:
    """Inverse of :func:`_nnunet_data_identifier`: ``nnUNetPlans_<config>`` -> ``nnfast_<config>``; a preset's own
    ``nnUNetResEncUNetMPlans_<config>`` -> ``nnfast_ResEncM_plans_<config>``."""
    if identifier.startswith(f"{NNUNET_PLANS_NAME}_"):
        return "nnfast_" + identifier[len(NNUNET_PLANS_NAME) + 1:]
    for p in PRESETS.values():
        if p.nnunet_plans_name == plans_name and identifier.startswith(f"{plans_name}_"):
            return f"{p.plans_identifier}_{identifier[len(plans_name) + 1:]}"
    prefix = f"{plans_name}_"
    return "nnfast_" + (identifier[len(prefix):] if identifier.startswith(prefix) else identifier)


def _config_from_nnunet(name: str, c: Mapping[str, Any], plans_name: str) -> ConfigurationPlan:
    where = f"nnU-Net plans configuration `{name}`"
    if "architecture" not in c:
        raise PlanError(f"{where} uses nnU-Net's old plans format (no `architecture`); re-run "
                        "nnUNetv2_plan_experiment or `nnfast plan`")
    if c.get("preprocessor_name", _PREPROCESSOR) != _PREPROCESSOR:
        raise PlanError(f"{where}: preprocessor {c.get('preprocessor_name')!r} is not supported ({_PREPROCESSOR} only)")
    try:
        return ConfigurationPlan(
            name=name,
            data_identifier=_nnfast_data_identifier(str(c["data_identifier"]), plans_name),
            batch_size=int(c["batch_size"]),
            patch_size=tuple(int(v) for v in c["patch_size"]),
            median_image_size_in_voxels=tuple(
                v if isinstance(v, int) else float(v) for v in c["median_image_size_in_voxels"]),
            spacing=tuple(float(v) for v in c["spacing"]),
            normalization_schemes=tuple(str(s) for s in c["normalization_schemes"]),
            use_mask_for_norm=tuple(bool(b) for b in c["use_mask_for_norm"]),
            resampling_data=_resampling_from_nnunet(c, "data", where),
            resampling_seg=_resampling_from_nnunet(c, "seg", where),
            resampling_probabilities=_resampling_from_nnunet(c, "probabilities", where),
            architecture=_arch_from_nnunet(c["architecture"], where),
            batch_dice=bool(c["batch_dice"]),
            previous_stage=c.get("previous_stage"),
            next_stage=_single_stage(c.get("next_stage"), where),
            inherits_from=c.get("inherits_from"),
        )
    except KeyError as e:
        raise PlanError(f"{where} lacks {e}") from None


def _single_stage(v: Any, where: str) -> str | None:
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            raise PlanError(f"{where}: several next stages {v} are not supported")
        v = v[0]
    return v


def _resolve_nnunet(configs: Mapping[str, Any], name: str, visited: tuple[str, ...] = ()) -> dict[str, Any]:
    if name not in configs:
        raise PlanError(f"nnU-Net plans: configuration `{name}` is referenced but missing")
    if name in visited:
        raise PlanError(f"nnU-Net plans: configurations inherit in a circle: {' -> '.join((*visited, name))}")
    c = dict(configs[name])
    if "inherits_from" in c:
        base = _resolve_nnunet(configs, c["inherits_from"], (*visited, name))
        base.update(c)
        c = base
    return c


def from_nnunet_plans(d: Mapping[str, Any], dataset_json: Mapping[str, Any] | None = None) -> Plans:
    """nnfast :class:`Plans` from an nnU-Net v2 plans dict.

    Parameters
    ----------
    d : mapping
        Content of ``nnUNetPlans.json`` (or another plans file of the same format).
    dataset_json : mapping, optional
        The dataset's ``dataset.json``; supplies ``channel_names`` and ``labels`` (nnU-Net keeps them there, not in the
        plans). Without it both are left empty.

    Returns
    -------
    Plans
        Data identifiers become ``nnfast_<configuration>``. Configurations other than ``2d``, ``3d_fullres``,
        ``3d_lowres`` and ``3d_cascade_fullres`` are skipped.

    Raises
    ------
    PlanError
        If the plans use something nnfast does not implement or miss a required key.
    """
    plans_name = str(d.get("plans_name", NNUNET_PLANS_NAME))
    raw = d.get("configurations")
    if not isinstance(raw, Mapping) or not raw:
        raise PlanError("nnU-Net plans have no `configurations`")
    configurations: dict[str, Any] = {}
    for name, c in raw.items():
        if name not in CONFIGURATION_NAMES:
            log.info("skipping nnU-Net configuration `%s` (nnfast knows %s)", name, CONFIGURATION_NAMES)
            continue
        child_keys = set(c) - {"inherits_from", "previous_stage", "next_stage"}
        if "inherits_from" in c and not child_keys:
            configurations[name] = InheritedConfiguration(
                name=name, inherits_from=c["inherits_from"], previous_stage=c.get("previous_stage"),
                next_stage=_single_stage(c.get("next_stage"), name))
        else:
            configurations[name] = _config_from_nnunet(name, _resolve_nnunet(raw, name), plans_name)
    for name, c in configurations.items():
        if isinstance(c, InheritedConfiguration) and c.inherits_from not in configurations:
            raise PlanError(f"nnU-Net plans: `{name}` inherits from `{c.inherits_from}`, which nnfast cannot use")

    props = d.get("foreground_intensity_properties_per_channel") or d.get("foreground_intensity_properties_by_modality")
    if props is None:
        raise PlanError("nnU-Net plans lack `foreground_intensity_properties_per_channel`")
    meta = d.get("nnfast") or {}
    dj = dataset_json or {}
    try:
        return Plans(
            dataset_name=str(d["dataset_name"]),
            plans_name=str(meta.get("plans_name", plans_name)),
            original_median_spacing_after_transp=tuple(float(v) for v in d["original_median_spacing_after_transp"]),
            original_median_shape_after_transp=tuple(int(v) for v in d["original_median_shape_after_transp"]),
            transpose_forward=tuple(int(v) for v in d["transpose_forward"]),
            transpose_backward=tuple(int(v) for v in d["transpose_backward"]),
            foreground_intensity_properties_per_channel=tuple(
                IntensityStats.from_json(props[str(i)]) for i in range(len(props))),
            channel_names={str(k): str(v) for k, v in (dj.get("channel_names") or dj.get("modality") or {}).items()},
            labels={k: (tuple(v) if isinstance(v, list) else v) for k, v in (dj.get("labels") or {}).items()},
            configurations=configurations,
            experiment_planner=str(meta.get("experiment_planner", d.get("experiment_planner_used", "ExperimentPlanner"))),
            **({"nnfast_version": str(meta["version"])} if "version" in meta else {}),
        )
    except KeyError as e:
        raise PlanError(f"nnU-Net plans lack {e}") from None
