"""nnU-Net compatibility: case sources read what nnU-Net's own dataset + crop give, batches look like nnU-Net's
loader's, and the real ``nnUNetTrainer`` trains a few iterations on nnfast's loader (patched instance, subclass,
and the ``-tr nnUNetTrainerNnfastLoader`` lookup)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnfast.data.dataset import NnunetCaseSource, ZarrCaseSource, open_case_source
from nnfast.errors import CaseNotFoundError, DatasetError

nnunetv2 = pytest.importorskip("nnunetv2")

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


def random_boxes(shape, n, seed):
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        size = rng.integers(1, [s + 12 for s in shape])
        lb = rng.integers([1 - s for s in size], shape)  # overlaps the case on every axis, may stick out
        boxes.append([[int(a), int(a + b)] for a, b in zip(lb, size)])
    boxes.append([[0, s] for s in shape])
    boxes.append([[-3, s + 5] for s in shape])
    return boxes


@pytest.mark.compat
@pytest.mark.parametrize("kind", ["nnunet", "zarr"])
def test_sources_read_what_nnunet_load_case_and_crop_give(ld_cases_2ch, kind):
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    stores, nn, cases = ld_cases_2ch
    ds = nnUNetDatasetBlosc2(str(nn))
    src = NnunetCaseSource(nn) if kind == "nnunet" else ZarrCaseSource(stores)
    assert src.case_ids == tuple(ds.identifiers)
    assert src.num_channels == 2
    for cid in src.case_ids:
        data, seg, _, props = ds.load_case(cid)
        assert src.shape(cid) == tuple(data.shape[1:])
        locs = src.class_locations(cid)
        assert set(locs) == set(props["class_locations"])
        for k, v in props["class_locations"].items():
            np.testing.assert_array_equal(locs[k], v)
        for bbox in random_boxes(src.shape(cid), 12, seed=len(cid)):
            ref_img = crop_and_pad_nd(data, bbox, 0)
            ref_seg = crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)
            img, sg = src.read(cid, bbox)
            assert img.dtype == np.float32 and sg.dtype == np.int16
            np.testing.assert_array_equal(img, ref_img)
            np.testing.assert_array_equal(sg, ref_seg)
            # into caller buffers (a batch slot), any layout
            out_i = np.full((2, *(u - lb for lb, u in bbox)), 7, np.float32)
            out_s = np.full((1, *(u - lb for lb, u in bbox)), 7, np.int16)
            src.read(cid, bbox, out_i, out_s)
            np.testing.assert_array_equal(out_i, ref_img)
            np.testing.assert_array_equal(out_s, ref_seg)
        # a box entirely outside the case: nnfast pads as everywhere else (0 / -1); crop_and_pad_nd returns zeros
        # of the stored dtype there, a case its loader never reaches (every sampled box overlaps the case)
        img, sg = src.read(cid, [[s + 2, s + 6] for s in src.shape(cid)])
        assert (img == 0).all() and (sg == -1).all()


def test_sources_pickle_reopen_and_validate(ld_cases, tmp_path):
    import pickle

    stores, nn, _ = ld_cases
    for src in (ZarrCaseSource(stores), NnunetCaseSource(nn)):
        src.read("case_000", [[0, 2], [0, 3], [0, 4]])
        clone = pickle.loads(pickle.dumps(src))
        assert len(pickle.dumps(src)) < 1000  # folder and ids only
        a, b = src.read("case_001", [[-1, 4], [2, 9], [30, 40]]), clone.read("case_001", [[-1, 4], [2, 9], [30, 40]])
        np.testing.assert_array_equal(a[0], b[0])
        sub = src.subset(["case_002"])
        assert sub.case_ids == ("case_002",) and type(sub) is type(src)
        with pytest.raises(CaseNotFoundError, match="case_999"):
            src.subset(["case_999"])
        with pytest.raises(DatasetError, match="bbox"):
            src.read("case_000", [[0, 2], [0, 3]])
        with pytest.raises(DatasetError, match="out_image"):
            src.read("case_000", [[0, 2], [0, 3], [0, 4]], np.empty((1, 2, 3, 5), np.float32))
    assert isinstance(open_case_source(stores), ZarrCaseSource)
    assert isinstance(open_case_source(nn), NnunetCaseSource)
    with pytest.raises(DatasetError, match="neither"):
        open_case_source(tmp_path)
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(DatasetError, match="old .npz"):
        NnunetCaseSource(tmp_path)


def test_properties_pickles_are_loaded_as_data_only(ld_cases, tmp_path):
    """nnU-Net's own .pkl files load (arrays, dtypes, numpy scalars); a file that names a function is refused before
    anything is built, and so are non-pickles and non-dicts."""
    import os
    import pickle
    from collections import OrderedDict

    nn = ld_cases[1]
    src = NnunetCaseSource(nn)
    props = src.properties("case_000")
    with open(nn / "case_000.pkl", "rb") as f:
        assert set(props) == set(pickle.load(f))  # what nnU-Net wrote, same keys
    assert all(isinstance(v, np.ndarray) for v in props["class_locations"].values())
    for name in ("case_000", "case_001"):
        for suffix in (".b2nd", "_seg.b2nd"):
            (tmp_path / f"{name}{suffix}").symlink_to(nn / f"case_000{suffix}")
    ok = {"spacing": [np.float64(1.5), 2.0], "n": np.int64(3), "o": OrderedDict(a=(1, 2)), "s": {1, 2},
          "class_locations": {1: np.zeros((2, 4), np.int64)}}
    for protocol in (2, 4, 5):
        (tmp_path / "case_000.pkl").write_bytes(pickle.dumps(ok, protocol=protocol))
        got = NnunetCaseSource(tmp_path).properties("case_000")
        assert got["n"] == 3 and got["o"] == ok["o"] and got["s"] == {1, 2} and got["class_locations"][1].shape == (2, 4)
    (tmp_path / "case_001.pkl").write_bytes(pickle.dumps({"class_locations": {1: os.system}}))
    with pytest.raises(DatasetError, match=r"case_001.pkl refers to `(posix|nt|os)\.system`.*refuses"):
        NnunetCaseSource(tmp_path).class_locations("case_001")
    (tmp_path / "case_001.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a readable nnU-Net properties file"):
        NnunetCaseSource(tmp_path).properties("case_001")
    (tmp_path / "case_001.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DatasetError, match="holds a list"):
        NnunetCaseSource(tmp_path).properties("case_001")


def test_class_location_cache_is_bounded(ld_cases):
    src = NnunetCaseSource(ld_cases[1], location_cache_bytes=1, max_open=2)
    for cid in src.case_ids:
        src.class_locations(cid)
        src.shape(cid)
    assert len(src._locations) == 1 and len(src._cases) == 2
    locs = src.class_locations("case_000")
    assert all(v.dtype == np.int32 and v.shape[1] == 4 and not v.flags.writeable for v in locs.values())


@pytest.mark.compat
def test_batches_look_like_nnunet_loaders(ld_cases):
    """nnU-Net's nnUNetDataLoader + its training transforms vs nnfast on the same folder: same structure,
    dtypes, shapes, label values; validation batches without augmentation are plain crops in both."""
    import torch
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnfast.data.augment_params import AugmentConfig
    from nnfast.data.batch import BatchSpec
    from nnfast.data.loader import PatchLoader

    nn = ld_cases[1]
    patch, ds = (8, 16, 16), [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    aug = AugmentConfig.from_patch_size(patch, ds_scales=ds)
    tr = nnUNetTrainer.get_training_transforms(patch, aug.rotation, ds, aug.mirror_axes, aug.do_dummy_2d,
                                               use_mask_for_norm=[False], is_cascaded=False,
                                               foreground_labels=[1, 2], regions=None, ignore_label=None)
    lm = LabelManager({"background": 0, "a": 1, "b": 2}, None)
    dl = nnUNetDataLoader(nnUNetDatasetBlosc2(str(nn)), 3, aug.initial_patch_size, patch, lm,
                          oversample_foreground_percent=0.33, transforms=tr)
    ref = next(dl)
    with PatchLoader(NnunetCaseSource(nn), BatchSpec(augment=aug, batch_size=3, num_channels=1), base_seed=0) as loader:
        ours = next(loader)
    assert ref["data"].dtype == ours["data"].dtype == torch.float32
    assert ref["data"].shape == ours["data"].shape
    assert isinstance(ref["target"], list) and isinstance(ours["target"], list)
    assert [(t.dtype, t.shape) for t in ref["target"]] == [(t.dtype, t.shape) for t in ours["target"]]
    for b in (ref, ours):
        assert set(torch.unique(b["target"][0]).tolist()) <= {0, 1, 2}
    assert [str(k) for k in ref["keys"]] != [] and len(ours["keys"]) == 3


SCRIPT = r"""
import json, os, sys, time
import numpy as np, torch
t0 = time.time()
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnfast.data.loader import PatchLoader
from nnfast.data.nnunet_adapter import install_nnunet_trainer, use_nnfast_loader

ds = sys.argv[1]
folder = os.path.join(nnUNet_preprocessed, ds)
plans = load_json(os.path.join(folder, "nnUNetPlans.json"))
for c in plans["configurations"].values():  # the loader is under test: narrow networks (8 first-stage features)
    if "architecture" in c:
        kw = c["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [min(8 * 2 ** i, f) for i, f in enumerate(kw["features_per_stage"])]
dj = load_json(os.path.join(folder, "dataset.json"))
out = {}

def trainer(cls=nnUNetTrainer):
    p = dict(plans); p["continue_training"] = False
    tr = cls(p, "3d_fullres", 0, dj, device=torch.device("cpu"))
    tr.num_epochs, tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch = 1, 2, 1
    return tr

def describe(b):
    t = b["target"]
    t = t if isinstance(t, list) else [t]
    return {"data": [str(b["data"].dtype), list(b["data"].shape)], "target": [[str(x.dtype), list(x.shape)] for x in t],
            "labels": sorted(set(torch.unique(t[0]).tolist())), "n_keys": len(b["keys"]),
            "finite": bool(torch.isfinite(b["data"]).all())}

# nnU-Net's own loaders (nnUNet_n_proc_DA=0: in-process)
ref = trainer()
ref.initialize()
dl_tr, dl_val = ref.get_dataloaders()
out["nnunet_train"], out["nnunet_val"] = describe(next(dl_tr)), describe(next(dl_val))

# ours on a patched instance, one worker process for training
tr = use_nnfast_loader(trainer(), num_workers=1, base_seed=3)
tr.on_train_start()
out["loader_types"] = [type(tr.dataloader_train).__name__, type(tr.dataloader_val).__name__]
out["workers"] = [tr.dataloader_train.num_workers, tr.dataloader_val.num_workers]
# on_train_start paid the workers' start-up, as nnU-Net's own get_dataloaders does (it draws a first batch)
out["ready"] = [[ld.workers_ready, ld.batches_ready >= 1, ld.next_batch_index]
                for ld in (tr.dataloader_train, tr.dataloader_val)]
pids = tr.dataloader_train.worker_pids + tr.dataloader_val.worker_pids
tr.on_train_epoch_start()
losses = []
for _ in range(tr.num_iterations_per_epoch):
    b = next(tr.dataloader_train)
    out["ours_train"] = describe(b)
    losses.append(float(tr.train_step(b)["loss"]))
tr.on_validation_epoch_start()
with torch.no_grad():
    vb = next(tr.dataloader_val)
    out["ours_val"] = describe(vb)
    out["val_loss"] = float(tr.validation_step(vb)["loss"])
out["losses"] = losses
shm = tr.dataloader_train.shm_name
tr.on_train_end()
out["closed"] = [tr.dataloader_train.shm_name, tr.dataloader_val.shm_name, os.path.exists("/dev/shm/" + shm)]
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
out["alive_after_end"] = [alive(p) for p in pids]

# nnUNetv2_train -tr nnUNetTrainerNnfastLoader: nnU-Net's lookup (get_trainer_from_args) after
# install_nnunet_trainer() wrote its module into nnunetv2/training/nnUNetTrainer/ (removed again here); the test runs
# this on a private copy of the nnunetv2 package, so that nnU-Net's lookups in other processes never see the stub
import nnunetv2
out["nnunetv2_path"] = nnunetv2.__path__[0]
stub = install_nnunet_trainer()
try:
    found = get_trainer_from_args(ds, "3d_fullres", 0, "nnUNetTrainerNnfastLoader", device=torch.device("cpu"))
finally:
    stub.unlink()
out["found"] = type(found).__module__ + "." + type(found).__name__
# the nnUNet_extTrainer folder variant: the search nnU-Net runs over each listed folder
ext = os.environ["nnUNet_extTrainer"]
cls = recursive_find_python_class(ext, "nnUNetTrainerNnfastLoader", None, base_folder=ext,
                                  cleanup_imports_from_base_folder=True)
out["found_ext"] = cls.__module__ + "." + cls.__name__
sub = trainer(type(found))
sub.on_train_start()   # NNFAST_LOADER_WORKERS / nnUNet_n_proc_DA=0: in-process
b = next(sub.dataloader_train)
out["subclass_train"] = describe(b)
out["subclass_loss"] = float(sub.train_step(b)["loss"])
sub.dataloader_train.close(); sub.dataloader_val.close()
out["seconds"] = time.time() - t0
print("RESULT " + json.dumps(out))
"""


@pytest.mark.compat
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_nnunet_trainer_runs_on_nnfast_loader(tmp_path):
    sys.path.insert(0, str(TESTS))
    from factories import make_raw_dataset
    from nnunet_ref import run_nnunet

    from nnfast.data.nnunet_adapter import install_nnunet_trainer

    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "results"
    make_raw_dataset(raw, 991, "LoaderAdapter", [(16, 48, 48), (18, 44, 50), (14, 50, 46), (16, 46, 48)],
                     [(3.0, 1.0, 1.0)] * 4)
    run_nnunet("plan_and_preprocess_entry", ["-d", "991", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], raw, pre)
    ds_dir = pre / "Dataset991_LoaderAdapter"
    # 4 cases are too few for nnU-Net's 5-fold split: give it one fold
    (ds_dir / "splits_final.json").write_text(json.dumps([{"train": ["case_000", "case_001", "case_002"],
                                                             "val": ["case_003"]}]))
    ext = tmp_path / "ext_trainers"
    install_nnunet_trainer(ext)
    # the default install target is nnU-Net's own trainer folder: a private copy of the package, first on the path,
    # keeps the stub away from the installed nnunetv2 that concurrent tests (pytest -n 2) search for trainers
    site = tmp_path / "site"
    shutil.copytree(nnunetv2.__path__[0], site / "nnunetv2", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f", "nnUNet_extTrainer": str(ext), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", SCRIPT, ds_dir.name], env=env, capture_output=True, text=True,
                       timeout=540, cwd=tmp_path)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["loader_types"] == ["PatchLoader", "PatchLoader"] and out["workers"] == [1, 1]
    for mine, ref in (("ours_train", "nnunet_train"), ("ours_val", "nnunet_val"), ("subclass_train", "nnunet_train")):
        assert out[mine]["data"] == out[ref]["data"] == ["torch.float32", [2, 1, 16, 48, 48]]
        assert out[mine]["target"] == out[ref]["target"]
        assert out[mine]["target"][0] == ["torch.int16", [2, 1, 16, 48, 48]]
        assert set(out[mine]["labels"]) <= {0, 1, 2} and out[mine]["finite"] and out[mine]["n_keys"] == 2
    assert all(np.isfinite(out["losses"])) and np.isfinite(out["val_loss"]) and np.isfinite(out["subclass_loss"])
    assert out["closed"] == [None, None, False]
    assert out["ready"] == [[True, True, 0], [True, True, 0]]
    assert out["alive_after_end"] == [False, False]
    assert out["found"] == out["found_ext"] == "nnfast.data.nnunet_adapter.nnUNetTrainerNnfastLoader"
    assert Path(out["nnunetv2_path"]) == site / "nnunetv2"
    assert not (site / "nnunetv2" / "training" / "nnUNetTrainer" / "nnfast_loader_trainer.py").exists()
    assert not (Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / "nnfast_loader_trainer.py").exists()


def test_install_writes_an_importing_module(tmp_path):
    from nnfast.data.nnunet_adapter import TRAINER_MODULE_NAME, install_nnunet_trainer

    p = install_nnunet_trainer(tmp_path / "t")
    assert p == tmp_path / "t" / TRAINER_MODULE_NAME
    assert "from nnfast.data.nnunet_adapter import nnUNetTrainerNnfastLoader" in p.read_text()
    assert [f.name for f in p.parent.iterdir()] == [TRAINER_MODULE_NAME]


def test_module_imports_without_nnunetv2():
    code = ("import sys; sys.modules['nnunetv2'] = None\n"
            "import nnfast.data.nnunet_adapter as a\n"
            "assert callable(a.use_nnfast_loader)\n"
            "try:\n    a.nnUNetTrainerNnfastLoader\nexcept ImportError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERR" in r.stdout and "pip install nnunetv2" in r.stdout
