"""The planning stage end to end: verify -> fingerprint -> plans, with staleness checks.

Files written to ``<preprocessed>/<DatasetNNN_Name>/``:
``nnfast_fingerprint.json`` (the fingerprint plus a signature of the raw files it came from), ``nnfast_plans.json``,
``dataset.json`` (a copy), and with ``export_nnunet`` nnU-Net's ``dataset_fingerprint.json`` and ``nnUNetPlans.json`` so
that nnU-Net v2 can train on the same plans.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import layout
from ..errors import DatasetError
from ..io.atomic import read_json, write_json_atomic
from ..io.dataset import CaseFiles, DatasetInfo, load_dataset
from ..settings import Settings, find_dataset_folder
from ..fingerprint.schema import Fingerprint

if TYPE_CHECKING:
    from .schema import Plans

__all__ = ["PlanningResult", "plan_dataset", "load_dataset_for_task", "fingerprint_path", "plans_path", "load_current_plans"]

log = logging.getLogger(__name__)

FINGERPRINT_FILE = layout.FINGERPRINT_FILE
PLANS_FILE = layout.plans_file_name()
STATE_FILE = "nnfast_state.json"


@dataclass
class PlanningResult:
    info: DatasetInfo
    cases: list[CaseFiles]
    fingerprint: Fingerprint
    plans: Plans
    output_folder: Path
    fingerprint_reused: bool
    plans_reused: bool
    verify_report: object | None = None


def load_dataset_for_task(task: str | int, settings: Settings) -> tuple[DatasetInfo, list[CaseFiles]]:
    root = find_dataset_folder(task, settings.require("raw"))
    return load_dataset(root)


def fingerprint_path(folder: Path) -> Path:
    return Path(folder) / FINGERPRINT_FILE


def plans_path(folder: Path) -> Path:
    return Path(folder) / PLANS_FILE


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def plan_dataset(
    task: str | int,
    settings: Settings,
    *,
    workers: int = 1,
    scheduler=None,
    gpu_memory_gb: float = 8.0,
    verify: bool = True,
    force: bool = False,
    export_nnunet: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> PlanningResult:
    """Verify (unless told not to), fingerprint and plan ``task``; reuse what is current.

    The fingerprint is recomputed when the raw files or ``dataset.json`` changed since it was made (or ``force``); the
    plans when the fingerprint or the planning arguments changed.

    Raises
    ------
    DatasetError
        verification found errors (the message holds the whole report).
    """
    from ..fingerprint.extract import extract_fingerprint, source_signature
    from .planner import plan_experiment, write_plans, load_plans

    info, cases = load_dataset_for_task(task, settings)
    out = settings.require("preprocessed") / info.name
    out.mkdir(parents=True, exist_ok=True)

    if not cases:
        raise DatasetError(f"dataset `{info.root}` has no training cases in imagesTr")
    signature = source_signature(info, cases)
    state_file = out / STATE_FILE
    state = read_json(state_file) if state_file.is_file() else {}

    report = None
    if verify and (force or state.get("verified_signature") != signature):
        from ..verify import verify_dataset

        report = verify_dataset(info.root, workers=workers)
        for w in report.warnings:
            log.warning("%s", w)
        if report.errors:
            shown = "; ".join(p.format(info.root) for p in report.errors[:3])
            more = f"; and {len(report.errors) - 3} more" if len(report.errors) > 3 else ""
            raise DatasetError(
                f"dataset `{info.root}` failed verification with {len(report.errors)} error(s): {shown}{more}; "
                f"`nnfast verify --task {task}` reports every problem with its case"
            )
        state["verified_signature"] = signature
        write_json_atomic(state_file, state)
    elif verify:
        log.info("%s: verification is current (inputs unchanged since it passed)", info.name)
    fp_file = fingerprint_path(out)
    fingerprint = None
    fp_reused = False
    if fp_file.is_file() and not force:
        stored = read_json(fp_file)
        if stored.get("source_signature") == signature:
            try:
                fingerprint = Fingerprint.from_json(stored)
                fp_reused = True
            except Exception:  # unsupported schema: recompute
                fingerprint = None
    if fingerprint is None:
        log.info("extracting the fingerprint of %s (%d cases, %d workers)", info.name, len(cases), workers)
        fingerprint = extract_fingerprint(info, cases, workers=workers, scheduler=scheduler, progress=progress)
        write_json_atomic(fp_file, {**fingerprint.to_json(), "source_signature": signature})

    plan_args = {"gpu_memory_gb": float(gpu_memory_gb), "fingerprint": _hash_json(fingerprint.to_json()),
                 "dataset_json": _hash_json(info.raw)}
    p_file = plans_path(out)
    plans = None
    plans_reused = False
    if p_file.is_file() and not force:
        if state.get("plan_args") == plan_args:
            plans = load_plans(p_file)
            plans_reused = True
    if plans is None:
        plans = plan_experiment(fingerprint, info, gpu_memory_target_in_gb=gpu_memory_gb)
        write_plans(plans, p_file)
        state["plan_args"] = plan_args
        write_json_atomic(state_file, state)
    from ..io.atomic import atomic_target

    with atomic_target(out / "dataset.json") as tmp:
        shutil.copyfile(info.root / "dataset.json", tmp)
    if export_nnunet:
        from .nnunet_compat import to_nnunet_plans

        write_json_atomic(out / "dataset_fingerprint.json", fingerprint.to_nnunet())
        write_json_atomic(out / "nnUNetPlans.json", to_nnunet_plans(plans, info.raw))
    return PlanningResult(info, cases, fingerprint, plans, out, fp_reused, plans_reused, report)


def load_current_plans(task: str | int, settings: Settings):
    """Load the plans of ``task`` from the preprocessed folder (no planning)."""
    from .planner import load_plans

    info, _ = load_dataset_for_task(task, settings)
    p = plans_path(settings.require("preprocessed") / info.name)
    if not p.is_file():
        from ..errors import PlanError

        raise PlanError(f"no plans for {info.name} at `{p}`; run `nnfast plan --task {task}` first")
    return load_plans(p)
