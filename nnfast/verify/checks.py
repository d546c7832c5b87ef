"""Verify a raw dataset before anything else touches it, collecting every problem into one report.

Reproduces and extends nnU-Net v2's ``verify_dataset_integrity``. nnU-Net stops at the
first failing assertion, prints, and only warns about origin/direction; :func:`verify_dataset` never stops early
and returns a :class:`~nnfast.verify.report.VerifyReport` with one :class:`~nnfast.verify.report.Problem` per
finding (case, file, expected, found).

Dataset-wide checks (this module):

- ``dataset.json`` exists, is valid JSON, has no key twice in one object (JSON readers keep only the last one, so
  a case listed twice in ``dataset`` silently disappears), and passes
  :func:`nnfast.io.dataset.dataset_json_problems` (required keys, consecutive labels from 0 or
  regions with a matching ``regions_class_order``, ...).
- ``numTraining`` equals the number of training cases found.
- ``imagesTr``/``labelsTr`` exist (unless ``dataset`` lists the files); every file in them is accounted for: an
  image named without the 4-digit channel suffix or with a channel index that ``channel_names`` does not declare
  is an error (nnU-Net would add it to the case as an extra channel); a file with another image ending is a warning
  (ignored), or an error when it duplicates a case's file with the declared ending (``a_0000.nii`` beside
  ``a_0000.nii.gz``: which one is meant?); a label file without images is a warning.
- Duplicate cases: the same id twice in ``dataset`` (see above), two ids pointing at the same file (the same
  data would land in training and validation folds), ids differing only in letter case (their files collide on
  case-insensitive file systems: warning).
- A declared foreground label that no case contains is a warning; a region none of whose labels any case contains
  is an error (its channel could never learn anything).

Per-case checks run on worker threads (:mod:`nnfast.verify.case`), one case per thread at a time, each file
read once.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..io.dataset import CaseFiles, dataset_json_problems, list_training_cases
from ..io.decoded_cache import DecodedCache
from ..io.image import file_suffix
from ..labels import LabelManager
from ..parallel import run_in_threads
from .case import CaseResult, CaseTask, check_case
from .report import Problem, VerifyReport

__all__ = ["verify_dataset", "POOL_MIN_BYTES"]

logger = logging.getLogger(__name__)

#: Below this many bytes of case files, cases are checked in this process even when ``workers > 1``: starting
#: spawn workers (~1-2 s each on a busy machine) costs more than reading that much.
POOL_MIN_BYTES = 32 << 20
_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")
_SCHEMA = "nnU-Net v2's dataset.json format (channel_names, labels, numTraining, file_ending)"


def verify_dataset(root: str | os.PathLike, workers: int = 1, *, fingerprint: bool = False,
                   decoded: "DecodedCache | None" = None) -> VerifyReport:
    """Check the raw dataset at ``root`` and return every problem found.

    Parameters
    ----------
    root : path
        A raw dataset folder (``DatasetNNN_Name`` with ``dataset.json``, ``imagesTr/``, ``labelsTr/``).
    workers : int
        Threads for the per-case checks (reading and checking release the GIL; 1 checks serially, as does a
        dataset smaller than :data:`POOL_MIN_BYTES`). Peak memory is one case per thread.
    fingerprint : bool
        Also fingerprint every case without errors from the arrays read for its checks
        (``report.case_fingerprints``, for :func:`nnfast.fingerprint.extract.extract_fingerprint`'s
        ``precomputed``): planning then reads each file once.
    decoded : DecodedCache, optional
        Keep the arrays of every case without errors in it (:mod:`nnfast.io.decoded_cache`, within its budget), for
        a later step of this process that needs them (``nnfast preprocess`` on threads).

    Returns
    -------
    VerifyReport
        ``.ok`` is False when there is any error; ``.format()`` gives the text report.
    """
    root = Path(root)
    report = VerifyReport(root=root)
    problems = report.problems
    if not root.is_dir():
        problems.append(Problem("error", None, root, "dataset folder does not exist", "a folder", "nothing"))
        return report
    djson = root / "dataset.json"
    d = _load_dataset_json(djson, problems)
    if d is None:
        return report
    for msg in dataset_json_problems(d):
        problems.append(Problem("error", None, djson, "dataset.json is malformed", _SCHEMA, msg))

    channel_names, ending = d.get("channel_names"), d.get("file_ending")
    if not (isinstance(channel_names, dict) and channel_names and isinstance(ending, str) and ending):
        problems.append(Problem("error", None, djson, "cannot list the cases", "usable `channel_names` and "
                                "`file_ending`", "see the dataset.json problems above; case checks skipped"))
        return report
    n_channels = len(channel_names)
    has_list = isinstance(d.get("dataset"), dict)
    if not has_list:
        for sub in ("imagesTr", "labelsTr"):
            if not (root / sub).is_dir():
                problems.append(Problem("error", None, root / sub, f"{sub} folder is missing", "a folder", "nothing"))
    try:
        cases = list_training_cases(root, d)
    except (AttributeError, TypeError, KeyError) as e:
        problems.append(Problem("error", None, djson, "cannot list the cases", "`dataset` entries like "
                                '{"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"}',
                                f"{type(e).__name__}: {e}; case checks skipped"))
        return report
    report.num_cases = len(cases)
    logger.info("verifying %s: %d training case(s), %d channel(s)", root, len(cases), n_channels)

    num_training = d.get("numTraining")
    if isinstance(num_training, int) and num_training != len(cases):
        problems.append(Problem("error", None, djson, "numTraining does not match the training cases",
                                f"{num_training} case(s)", f"{len(cases)} case(s) in "
                                f"{'`dataset`' if has_list else 'imagesTr'}"))
    if has_list:
        _check_listed_files(cases, n_channels, problems)
    else:
        _check_folder_files(root, cases, n_channels, ending, problems)
    _check_case_ids(cases, problems)

    expected, background = _label_sets(d)
    tasks = [
        CaseTask(c.case_id, tuple(str(p) for p in c.image_files), None if c.label_file is None else str(c.label_file),
                 expected, background, fingerprint)
        for c in cases
    ]
    # reading and checking a case releases the GIL (SimpleITK, NumPy): threads, no extra interpreters
    sizes = [_size(t) for t in tasks]
    use = workers if sum(sizes) >= POOL_MIN_BYTES else 1
    check = check_case if decoded is None else functools.partial(check_case, decoded=decoded)
    results: list[CaseResult] = run_in_threads(
        check, tasks, workers=min(max(1, use), max(1, len(tasks))), keys=[t.case_id for t in tasks],
    ) if tasks else []
    seen: set[int] = set()
    for t, r in zip(tasks, results):
        problems.extend(r.problems)
        seen.update(r.labels_found)
        if r.fingerprint is not None:
            report.case_fingerprints[t.case_id] = r.fingerprint
    if expected is not None and results:
        never = [v for v in expected if v not in seen and v not in background]
        if never:
            problems.append(Problem("warning", None, djson, "declared labels never occur in any case",
                                    "every declared foreground label in some case", f"labels {never} absent"))
        problems.extend(_region_label_problems(d, seen, djson))
    logger.info("verified %s: %d error(s), %d warning(s)", root, len(report.errors), len(report.warnings))
    return report


def _region_label_problems(d: dict, seen: set[int], djson: Path) -> list[Problem]:
    """Regions none of whose labels occurs in any label file: that region channel could never be trained."""
    try:
        lm = LabelManager.from_dataset_json(d)
    except DatasetError:
        return []
    out = []
    for name, members in lm.labels.items():
        m = members if isinstance(members, tuple) else (members,)
        if lm.has_regions and name != "ignore" and m != (0,) and not seen.intersection(m):
            out.append(Problem("error", None, djson, f"region `{name}` names labels that no label file contains",
                               f"labels {list(m)} in some file of labelsTr",
                               f"only {sorted(seen)} in the label files"))
    return out


def _size(t: CaseTask) -> float:
    total = 0
    for p in (*t.image_files, t.label_file):
        try:
            total += os.path.getsize(p) if p else 0
        except OSError:
            pass
    return float(total)


def _label_sets(d: dict) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """Declared label values (regions flattened, ignore included) and the non-foreground ones (0 and the ignore
    label), from :class:`nnfast.labels.LabelManager`; ``(None, (0,))`` when the labels are unusable."""
    labels = d.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None, (0,)
    for v in labels.values():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if not isinstance(x, int) or isinstance(x, bool):
                return None, (0,)
    try:
        lm = LabelManager(labels)
    except DatasetError:  # an ignore label that is a list (reported with the dataset.json problems)
        return None, (0,)
    return lm.declared_values, tuple(sorted({0, *((lm.ignore_label,) if lm.has_ignore_label else ())}))


def _load_dataset_json(path: Path, problems: list[Problem]) -> dict | None:
    """Parse dataset.json, reporting keys that occur twice in one object; None when unusable."""
    if not path.is_file():
        problems.append(Problem("error", None, path, "dataset.json is missing", "a dataset.json file (" + _SCHEMA
                                + ")", "no such file"))
        return None
    keep: list[Any] = []
    dups: dict[int, list[str]] = {}

    def hook(pairs):
        obj: dict = {}
        keep.append(obj)  # keep every object alive so that ids stay unique while parsing
        for k, v in pairs:
            if k in obj:
                dups.setdefault(id(obj), []).append(k)
            obj[k] = v
        return obj

    try:
        d = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(Problem("error", None, path, "dataset.json is not valid JSON", "valid JSON", str(e)))
        return None
    if not isinstance(d, dict):
        problems.append(Problem("error", None, path, "dataset.json is malformed", "a JSON object",
                                type(d).__name__))
        return None

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for k in dups.get(id(node), []):
                if where == "dataset":
                    problems.append(Problem("error", k, path, "case is listed twice in `dataset`", "each case id "
                                            "once", f"`{k}` twice; JSON keeps only the last entry"))
                else:
                    problems.append(Problem("error", None, path, "dataset.json has a key twice in one object",
                                            "unique keys", f"`{k}` twice in {where or 'the top level'}; JSON "
                                            "keeps only the last value"))
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    if dups:
        walk(d, "")
    return d


def _check_listed_files(cases: list[CaseFiles], n_channels: int, problems: list[Problem]) -> None:
    """With an explicit ``dataset`` list: one image per declared channel, and no file in two cases."""
    owners: dict[Path, list[str]] = defaultdict(list)
    for c in cases:
        if len(c.image_files) != n_channels:
            problems.append(Problem("error", c.case_id, None, "case lists the wrong number of image files",
                                    f"{n_channels} (one per entry of channel_names)", f"{len(c.image_files)}"))
        for p in (*c.image_files, c.label_file):
            if p is not None:
                owners[Path(os.path.normpath(p))].append(c.case_id)
    for p, ids in owners.items():
        if len(set(ids)) > 1:
            for cid in sorted(set(ids)):
                problems.append(Problem("error", cid, p, "file is used by more than one case",
                                        "each file in one case", f"used by cases {sorted(set(ids))}"))


def _check_folder_files(root: Path, cases: list[CaseFiles], n_channels: int, ending: str,
                        problems: list[Problem]) -> None:
    """Account for every file in imagesTr and labelsTr."""
    case_ids = {c.case_id for c in cases}
    images, labels = root / "imagesTr", root / "labelsTr"
    expected_images = {p.name for c in cases for p in c.image_files}
    declared = f"channel_names declares {n_channels} channel(s): _0000..._{n_channels - 1:04d}"
    if images.is_dir():
        for p in sorted(images.iterdir()):
            name = p.name
            if name.startswith((".", "_")) or not p.is_file():
                continue
            if name.endswith(ending):
                m = _CHANNEL_RE.match(name[: -len(ending)])
                if not m:
                    problems.append(Problem("error", None, p, "image file name lacks the channel suffix",
                                            f"<case>_XXXX{ending} (4-digit channel index)", name))
                elif int(m.group(2)) >= n_channels:
                    problems.append(Problem("error", m.group(1), p, "image file matches no declared channel",
                                            declared, f"channel {m.group(2)}"))
                continue
            _other_ending(p, file_suffix(p), ending, expected_images, "image", problems)
    if labels.is_dir():
        expected_labels = {c.case_id + ending for c in cases}
        for p in sorted(labels.iterdir()):
            name = p.name
            if name.startswith((".", "_")) or not p.is_file():
                continue
            if name.endswith(ending):
                if name[: -len(ending)] not in case_ids:
                    problems.append(Problem("warning", None, p, "label file has no images", f"images "
                                            f"imagesTr/{name[:-len(ending)]}_XXXX{ending}", "none (ignored)"))
                continue
            _other_ending(p, file_suffix(p), ending, expected_labels, "label", problems)


def _other_ending(p: Path, suffix: str, ending: str, expected: set[str], kind: str, problems: list[Problem]) -> None:
    stem = p.name[: -len(suffix)] if suffix and p.name.endswith(suffix) else p.name
    twin = stem + ending
    if twin in expected and (p.parent / twin).exists():
        m = _CHANNEL_RE.match(stem)
        case = (m.group(1) if m else stem) if kind == "image" else stem
        problems.append(Problem("error", case, p, f"duplicate {kind} file with another ending",
                                f"one file: `{twin}` (file_ending {ending})", f"also `{p.name}`; remove one"))
    else:
        problems.append(Problem("warning", None, p, f"file in {p.parent.name} is ignored",
                                f"files ending in {ending}", p.name))


def _check_case_ids(cases: list[CaseFiles], problems: list[Problem]) -> None:
    folded = Counter(c.case_id.casefold() for c in cases)
    for c in cases:
        if folded[c.case_id.casefold()] > 1:
            others = sorted(o.case_id for o in cases if o.case_id.casefold() == c.case_id.casefold())
            problems.append(Problem("warning", c.case_id, None, "case ids differ only in letter case",
                                    "ids that stay distinct on case-insensitive file systems (macOS, Windows)",
                                    f"{others}"))
