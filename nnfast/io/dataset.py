"""A raw dataset in nnU-Net v2's layout: ``dataset.json`` and the training cases it names.

Layout (``DatasetNNN_Name/``): ``imagesTr/<case>_<XXXX><ending>`` one file per channel, ``labelsTr/<case><ending>``,
``dataset.json`` with ``channel_names``, ``labels``, ``numTraining``, ``file_ending`` (and optionally ``dataset``, an explicit
file list, ``regions_class_order``). Listing is lenient (missing files are reported by :mod:`nnfast.verify`, not here).
What the labels mean, and their validation, belong to :mod:`nnfast.labels` (``DatasetInfo.label_manager``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..labels import LabelManager, label_problems

__all__ = ["REQUIRED_KEYS", "CaseFiles", "DatasetInfo", "load_dataset_json", "list_training_cases", "load_dataset"]

REQUIRED_KEYS = ("labels", "channel_names", "numTraining", "file_ending")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one training case: one image file per channel (in channel order) and the label file."""

    case_id: str
    image_files: tuple[Path, ...]
    label_file: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """A parsed ``dataset.json`` and where it lives."""

    root: Path
    name: str  # folder name, e.g. Dataset007_Pancreas
    channel_names: dict[str, str]
    labels: dict[str, Any]  # name -> int or tuple of ints (regions)
    num_training: int
    file_ending: str
    regions_class_order: tuple[int, ...] | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @cached_property
    def label_manager(self) -> LabelManager:
        """What the labels mean (:class:`nnfast.labels.LabelManager`), built once."""
        return LabelManager(self.labels, self.regions_class_order)

    @property
    def has_regions(self) -> bool:
        return self.label_manager.has_regions

    @property
    def label_values(self) -> list[int]:
        """All label integers declared (regions flattened), sorted, ignore label included."""
        return list(self.label_manager.declared_values)

    @property
    def ignore_label(self) -> int | None:
        return self.label_manager.ignore_label

    @property
    def foreground_labels(self) -> list[int]:
        """Declared labels other than background (0) and the ignore label."""
        return list(self.label_manager.foreground_labels)


def load_dataset_json(path: Path) -> dict:
    """Read and validate ``dataset.json``; raises :class:`DatasetError` naming every problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"`{path}` does not exist; every dataset needs a dataset.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"`{path}` is not valid JSON: {e}") from None
    problems = dataset_json_problems(d)
    if problems:
        raise DatasetError(f"`{path}` is malformed: " + "; ".join(problems))
    return d


def dataset_json_problems(d: Any) -> list[str]:
    """Every problem with a parsed dataset.json (empty list when fine)."""
    if not isinstance(d, dict):
        return [f"expected a JSON object at the top level, found {type(d).__name__}"]
    problems = [f"required key `{k}` is missing" for k in REQUIRED_KEYS if k not in d]
    if "channel_names" not in d and "modality" in d:
        problems.append("it has the Decathlon key `modality`: convert it first with `nnfast convert --msd`")
    if "channel_names" in d:
        cn = d["channel_names"]
        if not isinstance(cn, dict) or not cn:
            problems.append(f"`channel_names` must be a non-empty object such as {{\"0\": \"CT\"}}, found {cn!r}")
        elif sorted(cn.keys(), key=lambda k: (len(k), k)) != [str(i) for i in range(len(cn))]:
            problems.append(f"`channel_names` keys must be \"0\"..\"{len(cn) - 1}\", found {list(cn.keys())}")
    if "labels" in d:
        problems.extend(label_problems(d["labels"], check_numbering=not problems,
                                       regions_class_order=d.get("regions_class_order")))
    if "numTraining" in d and (not isinstance(d["numTraining"], int) or d["numTraining"] < 1):
        problems.append(f"`numTraining` must be a positive integer, found {d['numTraining']!r}")
    if "file_ending" in d and (not isinstance(d["file_ending"], str) or not d["file_ending"].startswith(".")):
        problems.append(f"`file_ending` must be a string such as \".nii.gz\", found {d['file_ending']!r}")
    return problems


def list_training_cases(root: Path, d: dict) -> list[CaseFiles]:
    """List training cases as nnU-Net does (``dataset`` key if present, else ``imagesTr``), sorted by case id.

    Case ids come from ``imagesTr`` file names ``<case>_XXXX<ending>``; image paths for every declared channel and the label
    path are returned whether or not they exist. Hidden files (``.``/``_`` prefix) are ignored.
    """
    root = Path(root)
    ending = d["file_ending"]
    n_ch = len(d["channel_names"])
    if "dataset" in d and isinstance(d["dataset"], dict):
        cases = []
        for cid, entry in sorted(d["dataset"].items()):
            imgs = tuple(_resolve(root, p) for p in entry.get("images", []))
            lab = entry.get("label")
            cases.append(CaseFiles(cid, imgs, _resolve(root, lab) if lab else None))
        return cases
    images_dir = root / "imagesTr"
    ids: set[str] = set()
    if images_dir.is_dir():
        for p in images_dir.iterdir():
            n = p.name
            if n.startswith((".", "_")) or not n.endswith(ending):
                continue
            stem = n[: -len(ending)]
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                ids.add(stem[:-5])
    out = []
    for cid in sorted(ids):
        imgs = tuple(images_dir / f"{cid}_{c:04d}{ending}" for c in range(n_ch))
        out.append(CaseFiles(cid, imgs, root / "labelsTr" / f"{cid}{ending}"))
    return out


def _resolve(root: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (root / q)


def load_dataset(root: Path) -> tuple[DatasetInfo, list[CaseFiles]]:
    """Load ``root/dataset.json`` and list the training cases."""
    root = Path(root)
    d = load_dataset_json(root / "dataset.json")
    info = DatasetInfo(
        root=root,
        name=root.name,
        channel_names={str(k): str(v) for k, v in d["channel_names"].items()},
        labels={k: (tuple(v) if isinstance(v, list) else v) for k, v in d["labels"].items()},
        num_training=int(d["numTraining"]),
        file_ending=d["file_ending"],
        regions_class_order=tuple(d["regions_class_order"]) if d.get("regions_class_order") else None,
        raw=d,
    )
    return info, list_training_cases(root, d)
