"""The planning stage end to end: verify -> fingerprint -> plans, with staleness checks.

Files written to ``<preprocessed>/<DatasetNNN_Name>/``:
``nnfast_fingerprint.json`` (the fingerprint plus a signature of the raw files it came from), ``<plans identifier>.json``
(``nnfast_plans.json``, ``nnfast_ResEncM_plans.json``, ... several side by side), ``dataset.json`` (a copy),
``nnfast_state.json`` (what each plans file was planned with and from which data), and with ``export_nnunet``
nnU-Net's ``dataset_fingerprint.json`` and ``nnUNetPlans.json`` / ``nnUNetResEncUNetMPlans.json`` ... so that nnU-Net v2
can train on the same plans.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .. import layout
from ..errors import DatasetError, PlanError
from ..io.atomic import read_json, write_json_atomic
from ..io.dataset import CaseFiles, DatasetInfo, load_dataset
from ..settings import Settings, find_dataset_folder
from ..fingerprint.schema import Fingerprint

if TYPE_CHECKING:
    from types import EllipsisType

    from .schema import Plans

__all__ = ["PlanningResult", "plan_dataset", "load_dataset_for_task", "fingerprint_path", "plans_path", "load_current_plans",
           "available_plans", "require_plans_file", "plans_differences", "current_fingerprint"]

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
    plans_identifier: str = layout.PLANS_IDENTIFIER


def load_dataset_for_task(task: str | int, settings: Settings) -> tuple[DatasetInfo, list[CaseFiles]]:
    root = find_dataset_folder(task, settings.require("raw"))
    return load_dataset(root)


def fingerprint_path(folder: Path) -> Path:
    return Path(folder) / FINGERPRINT_FILE


def plans_path(folder: Path, plans_identifier: str = layout.PLANS_IDENTIFIER) -> Path:
    """``<preprocessed>/<Dataset>/<plans identifier>.json``."""
    return Path(folder) / layout.plans_file_name(plans_identifier)


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _stored_fingerprint(out: Path, signature: str) -> Fingerprint | None:
    """The fingerprint stored in ``out`` when it was made from the files of ``signature`` (else None)."""
    fp_file = fingerprint_path(out)
    if fp_file.is_file():
        stored = read_json(fp_file)
        if stored.get("source_signature") == signature:
            try:
                return Fingerprint.from_json(stored)
            except Exception:  # unsupported schema: recompute
                pass
    return None


def current_fingerprint(info: DatasetInfo, cases: list[CaseFiles], out: Path, signature: str | None = None, *,
                        workers: int = 1, scheduler=None, force: bool = False,
                        progress: Callable[[int, int, str], None] | None = None,
                        precomputed: dict | None = None, stored: Fingerprint | None | EllipsisType = ...,
                        decoded=None) -> tuple[Fingerprint, bool]:
    """(fingerprint, reused): the stored fingerprint in ``out`` if it was made from the current files, else a new one
    (written; ``precomputed`` case fingerprints, e.g. verification's, are used instead of reading those cases;
    ``decoded``: a :class:`~nnfast.io.decoded_cache.DecodedCache` that keeps the arrays of the cases read).
    ``stored``: what :func:`_stored_fingerprint` returned for ``signature`` when the caller already read it (default:
    read it here)."""
    from ..fingerprint.extract import extract_fingerprint, source_signature

    if signature is None:
        signature = source_signature(info, cases)
    fp_file = fingerprint_path(out)
    if not force:
        if stored is ...:
            stored = _stored_fingerprint(out, signature)
        if isinstance(stored, Fingerprint):
            return stored, True
    log.info("extracting the fingerprint of %s (%d cases, %d workers%s)", info.name, len(cases), workers,
             f", {len(precomputed)} made during verification" if precomputed else "")
    fingerprint = extract_fingerprint(info, cases, workers=workers, scheduler=scheduler, progress=progress,
                                      precomputed=precomputed, decoded=decoded)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(fp_file, {**fingerprint.to_json(), "source_signature": signature})
    return fingerprint, False


def _matching_fingerprints(report, cases: list[CaseFiles]) -> dict:
    """Verification's case fingerprints of exactly these cases' files (verification lists the cases itself)."""
    made = getattr(report, "case_fingerprints", None) or {}
    return {c.case_id: made[c.case_id] for c in cases if c.case_id in made}


def plans_differences(old, new, limit: int = 6) -> list[str]:
    """``path: old -> new`` for every field in which two plans differ (their JSON; nnfast's version, the schema version
    and ``plans_name`` -- the file name is the identifier -- ignored, so that plans of an older nnfast compare equal)."""
    a, b = old.to_json(), new.to_json()
    for d in (a, b):
        for k in ("nnfast_version", "schema_version", "plans_name"):
            d.pop(k, None)
    out: list[str] = []

    def walk(x, y, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                walk(x.get(k, "<missing>"), y.get(k, "<missing>"), f"{path}.{k}" if path else str(k))
        elif x != y:
            out.append(f"{path}: {x} -> {y}")

    walk(a, b, "")
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def plan_dataset(
    task: str | int,
    settings: Settings,
    *,
    workers: int = 1,
    scheduler=None,
    gpu_memory_gb: float | None = None,
    preset: str | None = None,
    plans_identifier: str | None = None,
    target_spacing: Sequence[float] | None = None,
    verify: bool = True,
    force: bool = False,
    replan: bool = False,
    export_nnunet: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    create: bool = True,
    decoded=None,
) -> PlanningResult:
    """Verify (unless told not to), fingerprint and plan ``task``; reuse what is current.

    The fingerprint is recomputed when the raw files or ``dataset.json`` changed since it was made (or ``force``).

    Plans are the user's: plans already on disk under ``plans_identifier`` (default: the preset's, ``nnfast_plans``)
    are used as they are, hand edits included. They are re-planned (with the arguments recorded when they were made)
    only when the dataset's files changed since, and that is logged with what differs. Planning arguments given here
    (``preset``, ``gpu_memory_gb``, ``target_spacing``) that would plan something else than the file on disk raise
    :class:`~nnfast.errors.PlanError` listing the differences, unless ``replan`` (or ``force``) says to overwrite;
    ``plans_identifier`` writes such plans beside the others instead. ``create=False``: plans that do not exist yet
    are an error (listing those that do) instead of being planned. ``decoded``: a
    :class:`~nnfast.io.decoded_cache.DecodedCache` in which verification and fingerprinting leave the arrays they
    read (``nnfast preprocess`` on threads then reads each file once).

    Raises
    ------
    DatasetError
        verification found errors (the message holds the whole report).
    PlanError
        the plans on disk differ from what the given arguments plan (and neither ``replan`` nor ``force``), or the
        dataset changed under hand-edited plans.
    """
    from ..fingerprint.extract import source_signature
    from .planner import load_plans, plan_experiment, write_plans
    from .presets import DEFAULT_PRESET, get_preset, preset_for_planner

    preset_obj = get_preset(preset or DEFAULT_PRESET)  # unknown preset: UsageError before any work
    identifier = plans_identifier or preset_obj.plans_identifier
    layout.check_plans_identifier(identifier)
    info, cases = load_dataset_for_task(task, settings)
    out = settings.require("preprocessed") / info.name
    out.mkdir(parents=True, exist_ok=True)

    if not create:
        require_plans_file(out, identifier, task)
    if not cases:
        raise DatasetError(f"dataset `{info.root}` has no training cases in imagesTr")
    signature = source_signature(info, cases)
    state_file = out / STATE_FILE
    state = read_json(state_file) if state_file.is_file() else {}

    report = None
    stored = None if force else _stored_fingerprint(out, signature)  # read once, for verification and below
    if verify and (force or state.get("verified_signature") != signature):
        from ..verify import verify_dataset

        # verification reads every file: it fingerprints the cases too when the stored fingerprint is stale (one read
        # per file), except with dask, where the fingerprint runs on the cluster
        fingerprint_too = scheduler is None and stored is None
        report = verify_dataset(info.root, workers=workers, fingerprint=fingerprint_too, decoded=decoded)
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
    precomputed = _matching_fingerprints(report, cases) if report is not None else None
    fingerprint, fp_reused = current_fingerprint(info, cases, out, signature, workers=workers, scheduler=scheduler,
                                                 force=force, progress=progress, precomputed=precomputed,
                                                 stored=stored, decoded=decoded if scheduler is None else None)

    data_hashes = {"fingerprint": _hash_json(fingerprint.to_json()), "dataset_json": _hash_json(info.raw)}
    requested = {"preset": preset, "gpu_memory_gb": None if gpu_memory_gb is None else float(gpu_memory_gb),
                 "target_spacing": None if target_spacing is None else [float(v) for v in target_spacing]}
    records = state.setdefault("plans", {})
    record = records.get(identifier)
    p_file = plans_path(out, identifier)

    def make(args: dict) -> Plans:
        return plan_experiment(fingerprint, info, gpu_memory_target_in_gb=args.get("gpu_memory_gb"),
                               overwrite_target_spacing=args.get("target_spacing"),
                               preset=args.get("preset") or DEFAULT_PRESET, plans_identifier=identifier)

    def file_hash() -> str:
        return hashlib.sha256(p_file.read_bytes()).hexdigest()[:16]

    explicit = {k: v for k, v in requested.items() if v is not None}
    args = {"preset": None, "gpu_memory_gb": None, "target_spacing": None, **explicit}
    plans: Plans
    plans_reused = False
    if p_file.is_file() and not (force or replan):
        on_disk = load_plans(p_file)
        recorded_args = dict((record or {}).get("args") or {})
        if not recorded_args:  # plans from elsewhere (an older nnfast, an import, a copy): what they say they are
            known = preset_for_planner(on_disk.experiment_planner)
            recorded_args = {"preset": known.name if known is not None else None, "gpu_memory_gb": None,
                             "target_spacing": None}
        new_args = any(recorded_args.get(k) != v for k, v in explicit.items())
        args = {**recorded_args, **explicit}
        changed_data = record is not None and record.get("data") != data_hashes
        plans, plans_reused = on_disk, True
        if new_args or changed_data:
            candidate = make(args)
            diffs = plans_differences(on_disk, candidate)
            edited = record is not None and record.get("file") != file_hash()
            if diffs and changed_data and not new_args and not edited:
                log.warning("%s: the dataset's files changed since plans `%s` were made: re-planned (%s)", info.name,
                            identifier, "; ".join(diffs))
                plans, plans_reused = candidate, False
            elif diffs:
                why = ("the dataset's files changed since they were made, and they were edited by hand" if not new_args
                       else f"planning with {', '.join(f'{k}={v}' for k, v in explicit.items())} would change them")
                raise PlanError(
                    f"plans `{p_file}` exist and {why}: {'; '.join(diffs)}; pass --replan to overwrite them, or "
                    f"--plans NAME to write the new plans beside them")
        if plans_reused:
            records[identifier] = {"args": args, "data": data_hashes,
                                   "file": (record or {}).get("file") or file_hash()}
            write_json_atomic(state_file, state)
    else:
        plans = make(args)
    if not plans_reused:
        write_plans(plans, p_file)
        records[identifier] = {"args": args, "data": data_hashes, "file": file_hash()}
        state.pop("plan_args", None)  # the record of nnfast versions before plans identifiers
        write_json_atomic(state_file, state)
    from ..io.atomic import atomic_target

    with atomic_target(out / "dataset.json") as tmp:
        shutil.copyfile(info.root / "dataset.json", tmp)
    if export_nnunet:
        from .nnunet_compat import nnunet_name_of, to_nnunet_plans

        write_json_atomic(out / "dataset_fingerprint.json", fingerprint.to_nnunet())
        write_json_atomic(out / layout.plans_file_name(nnunet_name_of(plans)), to_nnunet_plans(plans, info.raw))
    return PlanningResult(info, cases, fingerprint, plans, out, fp_reused, plans_reused, report, identifier)


def available_plans(folder: Path) -> list[str]:
    """The nnfast plans identifiers in a preprocessed dataset folder (``<identifier>.json`` files that are nnfast plans)."""
    found = []
    for f in sorted(Path(folder).glob("*.json")):
        try:
            d = read_json(f)
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "schema_version" in d and "configurations" in d and "plans_name" in d:
            found.append(f.stem)
    return found


def require_plans_file(dataset_dir: Path, plans_identifier: str = layout.PLANS_IDENTIFIER,
                       task: str | int | None = None) -> Path:
    """The plans file of ``plans_identifier`` in a preprocessed dataset folder.

    Raises
    ------
    PlanError
        It does not exist; the message lists the plans identifiers that do.
    """
    p = plans_path(dataset_dir, plans_identifier)
    if not p.is_file():
        there = available_plans(dataset_dir) if Path(dataset_dir).is_dir() else []
        listed = f"plans on disk: {', '.join(there)}" if there else "no plans on disk"
        hint = f"`nnfast plan --task {task}`" if task is not None else "`nnfast plan`"
        raise PlanError(f"plans `{plans_identifier}` do not exist in `{dataset_dir}` ({listed}); run {hint}"
                        f"{'' if plans_identifier == layout.PLANS_IDENTIFIER else f' --plans {plans_identifier}'} "
                        "first or pick one of those")
    return p


def load_current_plans(task: str | int, settings: Settings, plans_identifier: str = layout.PLANS_IDENTIFIER):
    """Load the plans ``plans_identifier`` of ``task`` from the preprocessed folder (no planning)."""
    from .planner import load_plans

    info, _ = load_dataset_for_task(task, settings)
    return load_plans(require_plans_file(settings.require("preprocessed") / info.name, plans_identifier, task))
