"""A raw dataset in nnU-Net v2's layout: ``dataset.json`` and the training cases it names.

Layout (``DatasetNNN_Name/``): ``imagesTr/<case>_<XXXX><ending>`` one file per channel, ``labelsTr/<case><ending>``,
``dataset.json`` with ``channel_names``, ``labels``, ``numTraining``, ``file_ending`` (and optionally ``dataset``, an explicit
file list, ``regions_class_order``). Listing is lenient (missing files are reported by :mod:`nnfast.verify`, not here).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError

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

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in self.labels.values())

    @property
    def label_values(self) -> list[int]:
        """All label integers declared (regions flattened), sorted, ignore label included."""
        vals: set[int] = set()
        for v in self.labels.values():
            if isinstance(v, (list, tuple)):
                vals.update(int(x) for x in v)
            else:
                vals.add(int(v))
        return sorted(vals)

    @property
    def ignore_label(self) -> int | None:
        v = self.labels.get("ignore")
        return int(v) if v is not None else None

    @property
    def foreground_labels(self) -> list[int]:
        """Declared labels other than background (0) and the ignore label."""
        ign = self.ignore_label
        return [v for v in self.label_values if v != 0 and v != ign]


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
        lab = d["labels"]
        if not isinstance(lab, dict) or not lab:
            problems.append(f"`labels` must be a non-empty object such as {{\"background\": 0, \"organ\": 1}}, found {lab!r}")
        else:
            for k, v in lab.items():
                vals = v if isinstance(v, (list, tuple)) else [v]
                if not vals or not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
                    problems.append(f"label `{k}` must map to an integer (or a list of integers for a region), found {v!r}")
                elif any(x < 0 for x in vals):
                    problems.append(f"label `{k}` is negative ({v!r}); labels must be non-negative integers")
            if not problems:
                plain = sorted(
                    int(v) for k, v in lab.items() if not isinstance(v, (list, tuple)) and k != "ignore"
                )
                if 0 not in plain and not any(isinstance(v, (list, tuple)) for v in lab.values()):
                    problems.append("`labels` must declare background as 0")
                elif plain and plain != list(range(plain[0], plain[0] + len(plain))):
                    problems.append(f"labels must be consecutive integers starting at 0, found {plain}")
                ign = lab.get("ignore")
                if isinstance(ign, int) and plain and ign <= max(plain):
                    problems.append(f"the ignore label ({ign}) must be the highest label (others go up to {max(plain)})")
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
