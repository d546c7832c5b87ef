"""Cross-validation splits identical to nnU-Net v2's ``splits_final.json``.

nnU-Net (``nnUNetTrainer.do_split``, ``utilities/crossval_split.py``) sorts the case identifiers and splits them with
scikit-learn's ``KFold(n_splits=5, shuffle=True, random_state=12345)``. That KFold shuffles ``arange(n)`` with
``np.random.RandomState(seed).shuffle`` and cuts the shuffled order into contiguous folds, the first ``n % k`` of
size ``n // k + 1`` and the rest ``n // k``; each fold's validation and training indices are reported in ascending
order. :func:`make_splits` does exactly that with NumPy only (scikit-learn is needed by the tests alone).

A ``splits_final.json`` already present (written by nnfast, nnU-Net or the user) is used as is. A fold beyond the
file's folds gets nnU-Net's seeded random 80:20 split; fold ``"all"`` trains and validates on every case.

Shared by training (the fold's training and validation cases) and inference (the final validation predicts the
fold's validation cases). This module does not import torch.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DatasetError
from .io.atomic import write_json_atomic
from .layout import SPLITS_FILE, Fold

__all__ = ["Split", "Fold", "SPLITS_FILE_NAME", "make_splits", "load_or_create_splits", "fold_cases"]

log = logging.getLogger(__name__)

SPLITS_FILE_NAME = SPLITS_FILE

#: one fold: ``{"train": [...], "val": [...]}``
Split = dict[str, list[str]]


def _unique_sorted(case_ids: Sequence[str], where: str) -> list[str]:
    ids = [str(c) for c in case_ids]
    dups = sorted(c for c, n in Counter(ids).items() if n > 1)
    if dups:
        raise DatasetError(f"{where}: case identifiers must be unique, these occur more than once: {dups[:10]}")
    return sorted(ids)


def make_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = 12345) -> list[Split]:
    """nnU-Net's ``generate_crossval_split`` on the sorted ``case_ids``.

    Parameters
    ----------
    case_ids : sequence of str
        Training case identifiers (any order; they are sorted first, as nnU-Net does).
    n_folds : int
        Number of folds (5).
    seed : int
        ``random_state`` of the shuffle (12345).

    Returns
    -------
    list of dict
        ``n_folds`` entries ``{"train": [...], "val": [...]}``; every case is validated in exactly one fold.

    Raises
    ------
    DatasetError
        If there are fewer cases than folds or duplicate identifiers.
    """
    keys = _unique_sorted(case_ids, "cross-validation split")
    n = len(keys)
    if n_folds < 2:
        raise DatasetError(f"cross-validation needs at least 2 folds, got n_folds={n_folds}")
    if n < n_folds:
        raise DatasetError(f"cannot make {n_folds} cross-validation folds from {n} training case(s); add cases, "
                           "use fewer folds, or train with fold 'all'")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    splits: list[Split] = []
    start = 0
    for size in sizes:
        in_val = np.zeros(n, dtype=bool)
        in_val[order[start:start + size]] = True
        start += int(size)
        splits.append({"train": [keys[i] for i in np.flatnonzero(~in_val)],
                       "val": [keys[i] for i in np.flatnonzero(in_val)]})
    return splits


def _parse_splits(data: Any, path: Path) -> list[Split]:
    if not isinstance(data, list) or not data:
        raise DatasetError(f"splits file `{path}` must hold a non-empty JSON list of {{\"train\": [...], "
                           f"\"val\": [...]}} objects, found {type(data).__name__}")
    out: list[Split] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not {"train", "val"} <= set(entry):
            raise DatasetError(f"splits file `{path}`: fold {i} must be an object with `train` and `val` lists, "
                               f"found {entry if not isinstance(entry, dict) else sorted(entry)}")
        fold: Split = {}
        for k in ("train", "val"):
            v = entry[k]
            if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                raise DatasetError(f"splits file `{path}`: fold {i} `{k}` must be a list of case identifiers")
            fold[k] = list(v)
        out.append(fold)
    return out


def load_or_create_splits(path: Path | str, case_ids: Sequence[str], n_folds: int = 5,
                          seed: int = 12345) -> list[Split]:
    """Read ``path`` (usually ``<preprocessed>/splits_final.json``) or create it with :func:`make_splits`.

    An existing file is honoured as it is (user-defined splits, any number of folds) after checking that it names
    only cases in ``case_ids``. A new file is written atomically.

    Raises
    ------
    DatasetError
        If an existing file is malformed or names unknown cases, or a new split cannot be made.
    """
    path = Path(path)
    known = set(_unique_sorted(case_ids, "cross-validation split"))
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DatasetError(f"splits file `{path}` cannot be read as JSON ({e}); fix or delete it to get nnU-Net's "
                               "default 5-fold split") from e
        splits = _parse_splits(data, path)
        for i, fold in enumerate(splits):
            unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
            if unknown:
                raise DatasetError(
                    f"splits file `{path}`: fold {i} names {len(unknown)} case(s) that are not in the training data, "
                    f"e.g. {unknown[:5]}; fix the file or delete it to get nnU-Net's default split")
            if set(fold["train"]) & set(fold["val"]):
                log.warning("splits file %s: fold %d validates on cases it also trains on", path, i)
        log.info("using %d split(s) from %s", len(splits), path)
        return splits
    splits = make_splits(sorted(known), n_folds=n_folds, seed=seed)
    write_json_atomic(path, splits)
    log.info("created a new %d-fold cross-validation split in %s", n_folds, path)
    return splits


def fold_cases(splits: Sequence[Split], fold: Fold, case_ids: Sequence[str] | None = None,
               seed: int = 12345) -> tuple[list[str], list[str]]:
    """Training and validation cases of ``fold`` (nnU-Net's ``do_split``).

    Parameters
    ----------
    splits : sequence of dict
        From :func:`load_or_create_splits`.
    fold : int or "all"
        ``"all"``: train = validation = every case. ``fold < len(splits)``: that split. Otherwise nnU-Net's random
        80:20 split of the sorted cases with ``np.random.RandomState(seed + fold)`` (training cases in the drawn
        order, validation cases sorted).
    case_ids : sequence of str, optional
        All training cases (for ``"all"`` and the 80:20 split); default: every case named in ``splits``.
    seed : int
        Base seed of the 80:20 split (12345).

    Returns
    -------
    (train, val) : tuple of lists of str

    Raises
    ------
    DatasetError
        If ``fold`` is negative or not an int / ``"all"``.
    """
    if case_ids is None:
        keys = sorted({c for s in splits for k in ("train", "val") for c in s[k]})
    else:
        keys = _unique_sorted(case_ids, "fold selection")
    if fold == "all":
        return list(keys), list(keys)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 0:
        raise DatasetError(f"fold must be a non-negative integer or 'all', got {fold!r}")
    fold = int(fold)
    if fold < len(splits):
        return list(splits[fold]["train"]), list(splits[fold]["val"])
    log.info("fold %d requested but the splits hold %d fold(s): using a random (seeded) 80:20 split", fold,
             len(splits))
    rnd = np.random.RandomState(seed=seed + fold)
    idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
    chosen = set(int(i) for i in idx_tr)
    return [keys[int(i)] for i in idx_tr], [keys[i] for i in range(len(keys)) if i not in chosen]
