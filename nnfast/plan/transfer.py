"""Plans moved between datasets: ``nnfast plan --transfer-from SOURCE --task TARGET`` (nnU-Net's
``nnUNetv2_move_plans_between_datasets``, for pretraining and fine-tuning).

The target gets the source's plans -- every configuration, so the same architecture, patch, spacing, transposition and
normalization schemes -- under the target's dataset name, written as ``<target plans identifier>.json`` in the
target's preprocessed folder. Unlike nnU-Net, which keeps the SOURCE's ``foreground_intensity_properties_per_channel``
in the moved file, nnfast puts in the TARGET's intensity statistics (from its fingerprint) together with its channel
names and labels, so that CT normalization of the target uses the target's intensities. Everything else equals
nnU-Net's moved plans (tested against ``move_plans_between_datasets`` in ``tests/plan/test_transfer.py``).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .. import layout
from ..errors import PlanError
from ..io.atomic import write_json_atomic
from ..settings import Settings, find_dataset_folder
from .schema import Plans

__all__ = ["transfer_plans"]

log = logging.getLogger(__name__)


def transfer_plans(source_task: str | int, target_task: str | int, settings: Settings, *, preset: str | None = None,
                   source_plans: str | None = None, target_plans: str | None = None, replan: bool = False,
                   export_nnunet: bool = False, workers: int = 1) -> tuple[Plans, Path]:
    """Write the plans ``source_plans`` of ``source_task`` for ``target_task`` (see the module docstring).

    ``source_plans`` defaults to the preset's identifier (``nnfast_plans``), ``target_plans`` to ``source_plans``.

    Returns
    -------
    (Plans, Path)
        The moved plans and the file written.

    Raises
    ------
    PlanError
        The source has no such plans (the message lists those it has), the datasets have different numbers of image
        channels, or the target already holds different plans under that identifier (without ``replan``).
    """
    from .api import current_fingerprint, load_dataset_for_task, plans_differences, require_plans_file
    from .planner import load_plans, write_plans
    from .presets import get_preset

    source_id = source_plans or get_preset(preset or "default").plans_identifier
    target_id = layout.check_plans_identifier(target_plans or source_id)
    pre = settings.require("preprocessed")
    try:
        source_dir = find_dataset_folder(source_task, pre)
    except FileNotFoundError:
        raise PlanError(f"the transfer source {source_task} has no preprocessed folder in `{pre}` and so no plans; run "
                        f"`nnfast plan --task {source_task}` first") from None
    plans = load_plans(require_plans_file(source_dir, source_id, source_task))

    info, cases = load_dataset_for_task(target_task, settings)
    out = pre / info.name
    if info.num_channels != plans.num_input_channels:
        raise PlanError(f"plans `{source_id}` of {plans.dataset_name} are for {plans.num_input_channels} image "
                        f"channel(s) but {info.name} has {info.num_channels} ({info.channel_names})")
    fingerprint, _ = current_fingerprint(info, cases, out, workers=workers)
    moved = dataclasses.replace(
        plans, dataset_name=info.name, plans_name=target_id,
        foreground_intensity_properties_per_channel=tuple(fingerprint.foreground_intensity_properties_per_channel),
        channel_names=dict(info.channel_names), labels=dict(info.labels))
    if target_id != source_id:  # nnU-Net: the data identifiers follow the new plans identifier
        configurations = {}
        for name, c in moved.configurations.items():
            if hasattr(c, "data_identifier"):
                ident = c.data_identifier
                new = target_id + ident[len(source_id):] if ident.startswith(source_id) else f"{target_id}_{ident}"
                c = dataclasses.replace(c, data_identifier=new)
            configurations[name] = c
        moved = dataclasses.replace(moved, configurations=configurations)

    path = out / layout.plans_file_name(target_id)
    if path.is_file() and not replan:
        diffs = plans_differences(load_plans(path), moved)
        if diffs:
            raise PlanError(f"plans `{path}` exist and differ from those of {plans.dataset_name}: {'; '.join(diffs)}; "
                            "pass --replan to overwrite them, or --plans NAME for another identifier")
    write_plans(moved, path)
    if export_nnunet:
        from .nnunet_compat import nnunet_name_of, to_nnunet_plans

        write_json_atomic(out / layout.plans_file_name(nnunet_name_of(moved)), to_nnunet_plans(moved, info.raw))
    log.info("moved plans `%s` of %s to %s as `%s`", source_id, plans.dataset_name, info.name, target_id)
    return moved, path
