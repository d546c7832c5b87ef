"""Trained models for inference: a trainer folder's plans, checkpoints and the network they fit.

Layout (:mod:`nnfast.layout`; written by :mod:`nnfast.train.trainer`,
``<results>/<Dataset>/nnfastTrainer__<plans identifier>__<config>/``)::

    <plans identifier>.json      the plans the networks were built from (nnfast_plans.json, nnfast_ResEncM_plans.json)
    dataset.json                 the dataset's dataset.json (file ending, labels, regions_class_order)
    fold_<k>/<checkpoint>.pt     torch.save of plain containers and tensors (loads with ``weights_only=True``):
                                 ``network_weights`` (state dict), ``configuration``, ``num_input_channels``,
                                 ``num_classes``, ``inference_allowed_mirroring_axes``, ...
    fold_<k>/<checkpoint>.json   the same metadata without tensors

nnU-Net v2 model folders (what ``nnUNetv2_train`` writes: ``plans.json``, ``dataset.json``,
``fold_<k>/checkpoint_{final,best}.pth``) load the same way: the plans go through :mod:`nnfast.plan.nnunet_compat`
(PlainConvUNet and ResidualEncoderUNet), the configuration comes from the checkpoint's ``init_args``.

Checkpoints are read with ``torch.load(weights_only=True)`` and the small allowlist of
:mod:`nnfast.io.torch_checkpoint` (numpy scalars in nnU-Net's checkpoints): no pickled code runs. A bare state dict
(tests, external tools) is accepted too; the metadata then comes from the sidecar or the plans. Everything is checked
here, before any case is read: missing folds, unknown architectures, weights whose channel or class counts do not fit
the dataset, truncated files.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import layout
from ..errors import CaseNotFoundError, PlanError, SettingsError, StoreError
from ..labels import LabelManager

__all__ = [
    "TrainedModel",
    "model_folder_for",
    "available_folds",
    "read_plans_and_dataset_json",
    "load_model",
]

log = logging.getLogger(__name__)

_PLANS_FILES = (layout.plans_file_name(), "plans.json")


@dataclass
class TrainedModel:
    """Everything inference needs from a trained configuration: plans, labels, one state dict per fold.

    Attributes
    ----------
    folder : Path
        The trainer folder (holding ``fold_<k>``).
    plans : Plans
        The plans the network was built from.
    config_name : str
        Configuration the folds were trained for.
    dataset_json : dict
        The dataset's dataset.json (``file_ending``, ``labels``, ``regions_class_order``).
    folds : tuple
        Fold names in the order of ``weights``.
    weights : list of dict
        State dicts (CPU tensors), one per fold.
    mirror_axes : tuple of int
        Test-time mirroring axes allowed by training (patch axes).
    num_input_channels, num_classes : int
        Network input channels (image channels, plus one per foreground label for the cascade's second stage) and
        segmentation heads.
    labels : LabelManager
        Meaning of the output channels.
    """

    folder: Path
    plans: Any
    config_name: str
    dataset_json: dict
    folds: tuple
    weights: list = field(repr=False)
    mirror_axes: tuple[int, ...]
    num_input_channels: int
    num_classes: int
    labels: LabelManager = field(repr=False)

    @property
    def configuration(self):
        return self.plans.configuration(self.config_name)

    @property
    def file_ending(self) -> str:
        return str(self.dataset_json.get("file_ending", ".nii.gz"))

    @property
    def num_image_channels(self) -> int:
        return self.plans.num_input_channels

    def build_network(self):
        """A fresh network of this configuration (deep supervision off) holding the first fold's weights."""
        from ..network import build_network

        net = build_network(self.plans, self.config_name, self.num_input_channels, self.num_classes,
                            deep_supervision=False)
        net.load_state_dict(self.weights[0])
        return net


def model_folder_for(results_root: Path | str, task: str | int, config_name: str, *,
                     trainer: str = layout.TRAINER_NAME, plans_identifier: str = layout.PLANS_IDENTIFIER) -> Path:
    """``<results>/<Dataset>/<trainer>__<plans>__<config>`` of ``task`` (:func:`nnfast.layout.trainer_folder`).

    Raises
    ------
    DatasetNotFoundError
        No dataset folder of ``task`` in the results root.
    """
    from ..settings import find_dataset_folder

    ds = find_dataset_folder(task, Path(results_root))
    return layout.trainer_folder(ds.parent, ds.name, config_name, trainer=trainer, plans_identifier=plans_identifier)


def _checkpoint_path(fold_dir: Path, checkpoint_name: str) -> Path | None:
    name = checkpoint_name
    for suffix in (".pt", ".pth"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix in (".pt", ".pth"):
        p = fold_dir / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def available_folds(model_folder: Path | str, checkpoint_name: str = "checkpoint_final") -> list:
    """Folds of ``model_folder`` that hold ``checkpoint_name`` (``fold_all`` excluded, as nnU-Net does)."""
    out = []
    for d in sorted(Path(model_folder).glob("fold_*")):
        fold = layout.parse_fold_name(d.name)
        if isinstance(fold, int) and d.is_dir() and _checkpoint_path(d, checkpoint_name) is not None:
            out.append(fold)
    return sorted(out)


def _load_plans(folder: Path):
    from ..plan.planner import load_plans

    parts = folder.name.split("__")  # <trainer>__<plans identifier>__<config>: that plans file first
    names = ((layout.plans_file_name(parts[1]),) if len(parts) == 3 else ()) + _PLANS_FILES
    for name in dict.fromkeys(names):
        p = folder / name
        if p.is_file():
            try:
                return load_plans(p)
            except PlanError:
                from ..plan.nnunet_compat import from_nnunet_plans

                dj = folder / layout.DATASET_JSON
                try:
                    d = json.loads(p.read_text())
                    return from_nnunet_plans(d, json.loads(dj.read_text()) if dj.is_file() else None)
                except ValueError as e:  # PlanError, JSONDecodeError
                    raise PlanError(f"plans file `{p}`: {e}") from None
    raise PlanError(f"model folder `{folder}` has no plans ({' or '.join(_PLANS_FILES)}); it is not a trained "
                    "nnfast model folder (train with `nnfast train`, or copy the plans next to the folds)")


def read_plans_and_dataset_json(model_folder: Path | str) -> tuple[Any, dict]:
    """The plans and dataset.json of a trainer folder, without torch (what :func:`load_model` reads besides the
    weights; a folder without ``dataset.json`` gets one built from the plans, ``.nii.gz`` files).

    Raises
    ------
    PlanError
        No readable plans in the folder.
    """
    folder = Path(model_folder)
    plans = _load_plans(folder)
    dj_path = folder / layout.DATASET_JSON
    dataset_json = json.loads(dj_path.read_text()) if dj_path.is_file() else {
        "labels": dict(plans.labels), "channel_names": dict(plans.channel_names), "file_ending": ".nii.gz"}
    return plans, dataset_json


#: checkpoint entries that are training state, not needed (nor kept) for inference
_TRAINING_STATE = ("optimizer_state", "grad_scaler_state", "lr_scheduler_state", "rng", "logging")


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state dict, metadata) of a checkpoint file (nnfast's ``.pt`` or nnU-Net's ``.pth``, read with
    :func:`nnfast.io.torch_checkpoint.load_torch_checkpoint`); metadata from the file or its JSON sidecar."""
    from ..io.torch_checkpoint import load_torch_checkpoint

    data = load_torch_checkpoint(path)
    if not isinstance(data, dict):
        raise StoreError(f"checkpoint `{path}` holds a {type(data).__name__}, expected a dict")
    meta: dict = {}
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            meta.update(json.loads(side.read_text()))
        except (OSError, ValueError):
            log.warning("ignoring unreadable checkpoint sidecar %s", side)
    if "network_weights" in data:
        meta.update({k: v for k, v in data.items() if k != "network_weights" and not hasattr(v, "shape")
                     and k not in _TRAINING_STATE})
        weights = data["network_weights"]
    else:  # a bare state dict
        weights = data
    if not isinstance(weights, dict) or not weights or not all(hasattr(v, "shape") for v in weights.values()):
        raise StoreError(f"checkpoint `{path}` does not hold a network state dict (`network_weights`)")
    return weights, meta


def _check_counts(weights: dict, path: Path, n_in: int, n_classes: int, dataset_json_file: Path) -> None:
    """The checkpoint's input channels and segmentation heads against what the plans and dataset.json say (a
    checkpoint copied from another dataset fails here, with both counts, before any case is read)."""
    first = next((k for k in ("encoder.stem.convs.0.conv.weight", "encoder.stages.0.0.convs.0.conv.weight")
                  if k in weights), None)
    heads = sorted((k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[2]))
    if first is not None and int(weights[first].shape[1]) != n_in:
        raise StoreError(f"checkpoint `{path}` takes {int(weights[first].shape[1])} input channel(s) but the model "
                         f"folder's plans and `{dataset_json_file}` give {n_in}; the checkpoint belongs to another "
                         "dataset or configuration")
    if heads and int(weights[heads[-1]].shape[0]) != n_classes:
        raise StoreError(f"checkpoint `{path}` has {int(weights[heads[-1]].shape[0])} output channel(s) but "
                         f"`{dataset_json_file}` defines {n_classes} labels/regions; the checkpoint belongs to another "
                         "dataset")


def load_model(model_folder: Path | str, folds: Sequence | None = None,
               checkpoint_name: str = "checkpoint_final", config_name: str | None = None) -> TrainedModel:
    """Load the plans, dataset.json and per-fold weights of a trained configuration.

    Parameters
    ----------
    model_folder : path
        The trainer folder (``.../nnfastTrainer__nnfast_plans__<config>``).
    folds : sequence of int or "all", optional
        Folds to ensemble; None: every ``fold_<k>`` holding the checkpoint.
    checkpoint_name : str
        ``checkpoint_final`` (default), ``checkpoint_best`` or ``checkpoint_latest``, or ``final``/``best``/``latest``
        (:func:`nnfast.layout.checkpoint_name`; ``.pt``/``.pth`` optional).
    config_name : str, optional
        Expected configuration; default: the checkpoint's (or the folder name's ``__<config>`` suffix).

    Raises
    ------
    CaseNotFoundError
        The folder, a fold or its checkpoint is missing.
    PlanError
        Plans are missing or do not hold the configuration; folds were trained for different configurations.
    StoreError
        A checkpoint is unreadable or its weights do not fit the network.
    """
    folder = Path(model_folder)
    checkpoint_name = layout.checkpoint_name(checkpoint_name)
    if not folder.is_dir():
        raise CaseNotFoundError(f"model folder `{folder}` does not exist; train the configuration first "
                                "(`nnfast train`) or pass the right --model-folder / --task / --config")
    if folds is None:
        folds = available_folds(folder, checkpoint_name)
        if not folds:
            raise CaseNotFoundError(f"no fold in `{folder}` holds `{checkpoint_name}`; finish training or pick "
                                    "another --checkpoint")
    folds = tuple("all" if str(f) == "all" else int(f) for f in folds)
    plans, dataset_json = read_plans_and_dataset_json(folder)
    dj_path = folder / layout.DATASET_JSON
    weights, metas = [], []
    for f in folds:
        fold_dir = folder / layout.fold_name(f)
        path = _checkpoint_path(fold_dir, checkpoint_name)
        if path is None:
            stem = checkpoint_name.removesuffix(".pth").removesuffix(".pt")
            ext = ".pth" if (folder / "plans.json").is_file() else ".pt"  # a folder nnUNetv2_train wrote: .pth
            raise CaseNotFoundError(f"fold {f}: `{fold_dir / stem}{ext}` does not exist; train that fold or "
                                    f"choose folds from {available_folds(folder, checkpoint_name)}")
        w, meta = _read_checkpoint(path)
        weights.append(w)
        metas.append(meta)
    for m in metas:  # nnU-Net's checkpoints keep the configuration in init_args
        if m.get("configuration") is None and isinstance(m.get("init_args"), dict):
            m["configuration"] = m["init_args"].get("configuration")
    cfgs = {m.get("configuration") for m in metas} - {None}
    if len(cfgs) > 1:
        raise PlanError(f"folds {folds} of `{folder}` were trained for different configurations {sorted(cfgs)}")
    recorded = next(iter(cfgs), None)
    trained = recorded or folder.name.rsplit("__", 1)[-1]
    if config_name is not None and recorded is not None and config_name != recorded:
        raise PlanError(f"`{folder}` holds `{trained}` checkpoints, not `{config_name}`")
    name = config_name or trained
    conf = plans.configuration(name)  # raises PlanError naming the available ones
    labels = LabelManager.from_plans(plans, dataset_json.get("regions_class_order"))
    labels.check_regions_class_order()
    from ..network import build_network, network_input_channels

    meta = metas[0]  # nnfast records the network's input channels; nnU-Net's checkpoints do not
    n_in = int(meta.get("num_input_channels") or network_input_channels(plans, name, len(labels.foreground_labels)))
    n_classes = int(meta.get("num_classes") or labels.num_segmentation_heads)
    if n_classes != labels.num_segmentation_heads:
        raise PlanError(f"checkpoint of `{folder}` has {n_classes} outputs but the labels define "
                        f"{labels.num_segmentation_heads}")
    for f, w in zip(folds, weights):
        _check_counts(w, _checkpoint_path(folder / layout.fold_name(f), checkpoint_name) or folder, n_in, n_classes,
                      dj_path)
    axes = meta.get("inference_allowed_mirroring_axes")
    mirror_axes = tuple(int(a) for a in axes) if axes is not None else tuple(range(conf.ndim))
    model = TrainedModel(folder=folder, plans=plans, config_name=name, dataset_json=dataset_json, folds=folds,
                         weights=weights, mirror_axes=mirror_axes, num_input_channels=n_in, num_classes=n_classes,
                         labels=labels)
    net = build_network(plans, name, n_in, n_classes, deep_supervision=False)
    for f, w in zip(folds, weights):
        try:
            net.load_state_dict(w)
        except RuntimeError as e:
            raise StoreError(f"fold {f} of `{folder}`: weights do not fit the `{name}` network ({e})") from e
    if any(a >= conf.ndim for a in mirror_axes):
        raise SettingsError(f"mirror axes {mirror_axes} do not exist for the {conf.ndim}D configuration `{name}`")
    return model
