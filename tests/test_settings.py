
import pytest

from nnfast.errors import DatasetNotFoundError, SettingsError
from nnfast.settings import find_dataset_folder, parse_task, resolve_settings


def test_flag_beats_nnfast_env_beats_nnunet_env(tmp_path):
    env = {"NNFAST_RAW": str(tmp_path / "a"), "nnUNet_raw": str(tmp_path / "b"), "nnUNet_preprocessed": str(tmp_path / "c")}
    s = resolve_settings(env=env)
    assert s.raw == (tmp_path / "a").resolve()
    assert s.preprocessed == (tmp_path / "c").resolve()
    assert s.results is None
    s = resolve_settings(raw=tmp_path / "flag", env=env)
    assert s.raw == (tmp_path / "flag").resolve()


def test_missing_root_names_flag_and_variables():
    s = resolve_settings(env={})
    with pytest.raises(SettingsError) as e:
        s.require("preprocessed")
    msg = str(e.value)
    assert "--preprocessed" in msg and "NNFAST_PREPROCESSED" in msg and "nnUNet_preprocessed" in msg


@pytest.mark.parametrize("task", [7, "7", "007", "Task007_Pancreas", "Dataset007_Pancreas"])
def test_task_forms_resolve(tmp_path, task):
    (tmp_path / "Dataset007_Pancreas").mkdir()
    (tmp_path / "Dataset008_Other").mkdir()
    assert find_dataset_folder(task, tmp_path).name == "Dataset007_Pancreas"


def test_parse_task_rejects_garbage():
    assert parse_task("Task04_Hippocampus") == (4, "Hippocampus")
    with pytest.raises(DatasetNotFoundError):
        parse_task("pancreas")


def test_duplicate_ids_name_both(tmp_path):
    (tmp_path / "Dataset007_A").mkdir()
    (tmp_path / "Dataset007_B").mkdir()
    with pytest.raises(DatasetNotFoundError) as e:
        find_dataset_folder(7, tmp_path)
    assert "Dataset007_A" in str(e.value) and "Dataset007_B" in str(e.value)
    assert find_dataset_folder("Dataset007_B", tmp_path).name == "Dataset007_B"


def test_missing_dataset_is_clear(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="Dataset003_<Name>"):
        find_dataset_folder(3, tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        find_dataset_folder(3, tmp_path / "nope")
