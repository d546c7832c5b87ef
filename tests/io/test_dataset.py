import json

import pytest

from factories import make_raw_dataset
from nnfast.errors import DatasetError
from nnfast.io.dataset import dataset_json_problems, load_dataset, load_dataset_json

GOOD = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2, "file_ending": ".nii.gz"}


def test_good_dataset_json_has_no_problems():
    assert dataset_json_problems(GOOD) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"labels": None}, "`labels` is missing"),
        ({"channel_names": None, "modality": {"0": "CT"}}, "convert it first"),
        ({"labels": {"background": 0, "a": 2}}, "consecutive"),
        ({"labels": {"background": 0, "a": -1}}, "negative"),
        ({"labels": {"a": 1, "b": 2}}, "background as 0"),
        ({"labels": {"background": 0, "a": 1.5}}, "integer"),
        ({"numTraining": 0}, "numTraining"),
        ({"file_ending": "nii.gz"}, "file_ending"),
        ({"channel_names": {"1": "CT"}}, "channel_names"),
        ({"labels": {"background": 0, "a": 1, "ignore": 1}}, "ignore label"),
    ],
)
def test_malformed_dataset_json(change, expected):
    d = dict(GOOD)
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    problems = dataset_json_problems(d)
    assert any(expected in p for p in problems), problems


def test_invalid_json_file(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset_json(tmp_path / "dataset.json")


def test_listing_ignores_hidden_files_and_lists_all_channels(tmp_path):
    root = make_raw_dataset(tmp_path, 1, "X", [(4, 8, 8)] * 2, [(1, 1, 1)] * 2, kind="mri")
    (root / "imagesTr" / ".case_009_0000.nii.gz").write_bytes(b"")
    info, cases = load_dataset(root)
    assert [c.case_id for c in cases] == ["case_000", "case_001"]
    assert [p.name for p in cases[0].image_files] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert cases[1].label_file.name == "case_001.nii.gz"
    assert info.num_channels == 2 and info.foreground_labels == [1, 2]


def test_explicit_dataset_key_is_honoured(tmp_path):
    root = make_raw_dataset(tmp_path, 2, "Y", [(4, 8, 8)], [(1, 1, 1)])
    d = json.loads((root / "dataset.json").read_text())
    d["dataset"] = {"custom": {"images": ["imagesTr/case_000_0000.nii.gz"], "label": "labelsTr/case_000.nii.gz"}}
    (root / "dataset.json").write_text(json.dumps(d))
    _, cases = load_dataset(root)
    assert [c.case_id for c in cases] == ["custom"] and cases[0].image_files[0].is_file()


def test_label_questions_go_to_the_label_manager(tmp_path):
    root = make_raw_dataset(tmp_path, 3, "Z", [(4, 8, 8)], [(1, 1, 1)])
    d = json.loads((root / "dataset.json").read_text())
    d["labels"] = {"background": 0, "a": 1, "b": 2, "ignore": 3}
    (root / "dataset.json").write_text(json.dumps(d))
    info, _ = load_dataset(root)
    lm = info.label_manager
    assert lm is info.label_manager  # built once
    assert (info.has_regions, info.ignore_label, info.label_values, info.foreground_labels) == (
        lm.has_regions, lm.ignore_label, list(lm.declared_values), list(lm.foreground_labels))
    assert info.label_values == [0, 1, 2, 3] and info.foreground_labels == [1, 2] and info.ignore_label == 3
    # the numbering rules are checked only when the rest of dataset.json is fine (as before the LabelManager)
    assert dataset_json_problems({**GOOD, "channel_names": {"1": "CT"}, "labels": {"background": 0, "a": 2}}) == [
        "`channel_names` keys must be \"0\"..\"0\", found ['1']"]
