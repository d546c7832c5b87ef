"""Cross-validation splits identical to nnU-Net's (sklearn KFold) and its fold selection rules."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nnfast.errors import DatasetError
from nnfast.splits import SPLITS_FILE_NAME, fold_cases, load_or_create_splits, make_splits


def _ids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"case_{i:04d}" for i in rng.permutation(n)]  # unsorted on purpose


@pytest.mark.compat
@pytest.mark.parametrize("n", [5, 6, 7, 12, 13, 41, 100])
def test_equals_nnunet_generate_crossval_split(n):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ids = _ids(n)
    ref = generate_crossval_split(list(np.sort(ids)), seed=12345, n_splits=5)
    ours = make_splits(ids)
    assert ours == [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]} for f in ref]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 80), k=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_equals_sklearn_kfold(n, k, seed):
    KFold = pytest.importorskip("sklearn.model_selection").KFold

    if k > n:
        with pytest.raises(DatasetError):
            make_splits(_ids(n), n_folds=k, seed=seed)
        return
    keys = sorted(_ids(n))
    ours = make_splits(keys, n_folds=k, seed=seed)
    for fold, (tr, va) in zip(ours, KFold(n_splits=k, shuffle=True, random_state=seed).split(keys)):
        assert fold["train"] == [keys[i] for i in tr]
        assert fold["val"] == [keys[i] for i in va]
    # every case validated exactly once
    assert sorted(c for f in ours for c in f["val"]) == keys


def test_duplicates_rejected():
    with pytest.raises(DatasetError, match="case_1"):
        make_splits(["case_1", "case_2", "case_1", "a", "b", "c"])


def test_load_or_create_writes_then_honours_the_file(tmp_path):
    path = tmp_path / SPLITS_FILE_NAME
    ids = _ids(10)
    splits = load_or_create_splits(path, ids)
    assert json.loads(path.read_text()) == splits == make_splits(ids)
    assert [p.name for p in tmp_path.iterdir()] == [SPLITS_FILE_NAME]  # no temporary left behind
    # a user file with 2 folds is used as it is
    user = [{"train": ids[:8], "val": ids[8:]}, {"train": ids[2:], "val": ids[:2]}]
    path.write_text(json.dumps(user))
    assert load_or_create_splits(path, ids) == user


def test_existing_file_naming_unknown_cases_is_an_error(tmp_path):
    path = tmp_path / SPLITS_FILE_NAME
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["zz_missing"]}]))
    with pytest.raises(DatasetError, match="zz_missing"):
        load_or_create_splits(path, ["a", "b", "c"])
    path.write_text(json.dumps({"train": []}))
    with pytest.raises(DatasetError, match="list"):
        load_or_create_splits(path, ["a"])
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="JSON"):
        load_or_create_splits(path, ["a"])


def test_fold_selection_matches_nnunet_do_split():
    ids = _ids(23)
    splits = make_splits(ids)
    tr, va = fold_cases(splits, 3)
    assert (tr, va) == (splits[3]["train"], splits[3]["val"])
    tr, va = fold_cases(splits, "all", ids)
    assert tr == va == sorted(ids)
    # fold >= len(splits): nnU-Net's random 80:20 split with RandomState(12345 + fold)
    for fold in (5, 7):
        keys = np.sort(ids)
        rnd = np.random.RandomState(seed=12345 + fold)
        idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
        idx_val = [i for i in range(len(keys)) if i not in idx_tr]
        tr, va = fold_cases(splits, fold, ids)
        assert tr == [str(keys[i]) for i in idx_tr]
        assert va == [str(keys[i]) for i in idx_val]
        assert len(tr) == 18 and len(va) == 5
    # without case_ids the cases named in the splits are used
    assert fold_cases(splits, 5) == fold_cases(splits, 5, ids)
    for bad in (-1, "3", 1.5, True):
        with pytest.raises(DatasetError):
            fold_cases(splits, bad)
