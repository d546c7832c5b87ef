"""The three datasets of the quality harness, each prepared once per work folder.

Each dataset ends up as

``<work>/<name>/raw/DatasetNNN_Name``           the training cases (nnU-Net v2 layout), nothing held out in it
``<work>/<name>/heldout/{images,labels}``        cases no arm trains or validates on (images ``_0000``, labels)
``<work>/<name>/preprocessed/DatasetNNN_Name``   nnfast's plans (``nnfast_plans.json``) exported to nnU-Net
                                                  (``nnUNetPlans.json``), nnfast's stores (``nnfast_3d_fullres``),
                                                  nnU-Net's own preprocessing of the same plans
                                                  (``nnUNetPlans_3d_fullres``) and one ``splits_final.json``

Datasets:

* ``iso``: nnfast's synthetic CT generator, small isotropic (1 mm) cases.
* ``aniso``: the same generator with CT-like anisotropic spacing (z 2.5-5 mm, in-plane 0.6-0.9 mm): the plans
  resample z separately and the patch is flat enough for nnU-Net's dummy-2D augmentation (both checked after
  planning and recorded in the dataset summary).
* ``real``: the MNI ICBM152 2009a symmetric template (T1 image, grey- and white-matter probability maps) as
  shipped in nilearn's wheel (see ``SOURCES.md``). It is ONE head, so the cases are non-overlapping blocks of it:
  2 hemispheres x 3 (anterior-posterior) x 3 (inferior-superior) blocks of the template resampled to 2 mm. The
  template is left-right symmetric, so a block and its mirror block are near copies: the held-out cases are both
  hemispheres of three block positions, none of which any arm trains on.

Synthetic seeds 15001/15002 are not used by any test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("iso", "aniso", "real")

#: (dataset id, name) of each dataset
IDS = {"iso": (871, "QualityIso"), "aniso": (872, "QualityAniso"), "real": (873, "QualityMNI")}

NILEARN_VERSION = "0.14.1"
MNI_FILES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
SOURCES_TEXT = Path(__file__).with_name("SOURCES.md")


@dataclass(frozen=True)
class Prepared:
    name: str
    dataset_id: int
    folder_name: str  # DatasetNNN_Name
    raw: Path
    preprocessed: Path
    heldout_images: Path
    heldout_labels: Path
    summary: dict


def _run_nnunet(entry: str, args: list[str], raw: Path, pre: Path) -> None:
    """nnU-Net's plan_and_preprocess entry point in a fresh interpreter (it reads its folders at import)."""
    code = ("import sys\nfrom nnunetv2.experiment_planning import plan_and_preprocess_entrypoints as e\n"
            "sys.argv = [sys.argv[1]] + sys.argv[2:]\ngetattr(e, sys.argv[0])()\n")
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre),
           "nnUNet_results": str(pre.parent / "results_unused"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, entry, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nnU-Net {entry} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def _hold_out(ds_raw: Path, heldout: Path, case_ids: list[str]) -> None:
    """Move ``case_ids`` out of the raw dataset (images + labels) into ``heldout/{images,labels}``."""
    (heldout / "images").mkdir(parents=True, exist_ok=True)
    (heldout / "labels").mkdir(parents=True, exist_ok=True)
    for cid in case_ids:
        for p in sorted((ds_raw / "imagesTr").glob(f"{cid}_*.nii.gz")):
            shutil.move(str(p), heldout / "images" / p.name)
        shutil.move(str(ds_raw / "labelsTr" / f"{cid}.nii.gz"), heldout / "labels" / f"{cid}.nii.gz")
    dj_path = ds_raw / "dataset.json"
    dj = json.loads(dj_path.read_text())
    dj["numTraining"] = len(list((ds_raw / "labelsTr").glob("*.nii.gz")))
    dj_path.write_text(json.dumps(dj, indent=2))


def _synth_raw(kind: str, work: Path, budget) -> tuple[Path, Path, list[str]]:
    from nnfast.convert.msd import convert_msd
    from nnfast.synth import synthesize_msd

    did, name = IDS[kind]
    n_train, n_held = budget.synth_cases
    if kind == "iso":
        msd = synthesize_msd(work / "msd", task_id=did, name=name, num_cases=n_train + n_held, num_test=0, seed=15001,
                             shape_range=budget.iso_shape, spacing_z_range=(1.0, 1.0), spacing_xy_range=(1.0, 1.0),
                             overwrite=True)
    else:
        msd = synthesize_msd(work / "msd", task_id=did, name=name, num_cases=n_train + n_held, num_test=0, seed=15002,
                             shape_range=budget.aniso_shape, overwrite=True)
    raw = work / "raw"
    convert_msd(msd, raw, workers=1)
    ds_raw = raw / f"Dataset{did:03d}_{name}"
    ids = sorted(p.name[:-len(".nii.gz")] for p in (ds_raw / "labelsTr").glob("*.nii.gz"))
    return raw, ds_raw, ids[-n_held:]  # the last cases are held out (the generator's cases are i.i.d.)


def fetch_nilearn_wheel(cache: Path) -> Path:
    """nilearn's wheel (it ships the MNI template files) from PyPI with pip, into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"nilearn-{NILEARN_VERSION}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", f"nilearn=={NILEARN_VERSION}", "--no-deps", "-q",
                        "-d", str(cache)], check=True)
        found = sorted(cache.glob(f"nilearn-{NILEARN_VERSION}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download nilearn=={NILEARN_VERSION} left no wheel in {cache}")
    return found[0]


def mni_blocks(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, zoom: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Cases from the template: (case id, image, labels) for 2 x 3 x 3 non-overlapping blocks after resampling by
    ``zoom`` (arrays in (x, y, z) order as nibabel reads them; labels 1 = grey matter, 2 = white matter where that
    tissue's probability is >= 0.5 and higher than the other's)."""
    from scipy.ndimage import zoom as nd_zoom

    img = nd_zoom(t1.astype(np.float32), zoom, order=1)
    # nilearn's copies store the probabilities as uint8 0..255
    g = nd_zoom(gm.astype(np.float32) / (255.0 if gm.max() > 1 else 1.0), zoom, order=1)
    w = nd_zoom(wm.astype(np.float32) / (255.0 if wm.max() > 1 else 1.0), zoom, order=1)
    lab = np.zeros(img.shape, np.uint8)
    lab[(g >= 0.5) & (g >= w)] = 1
    lab[(w >= 0.5) & (w > g)] = 2
    nx, ny, nz = img.shape
    xs = [(0, nx // 2), (nx - nx // 2, nx)]  # equal halves; the right one is the left one's mirror position
    ys = [(k * ny // 3, (k + 1) * ny // 3) for k in range(3)]
    zs = [(k * nz // 3, (k + 1) * nz // 3) for k in range(3)]
    out = []
    for hi, (x0, x1) in enumerate(xs):
        for yi, (y0, y1) in enumerate(ys):
            for zi, (z0, z1) in enumerate(zs):
                cid = f"mni_{'LR'[hi]}{yi}{zi}"
                out.append((cid, np.ascontiguousarray(img[x0:x1, y0:y1, z0:z1]),
                            np.ascontiguousarray(lab[x0:x1, y0:y1, z0:z1])))
    return out


#: block positions (anterior-posterior, inferior-superior) held out, both hemispheres of each
MNI_HELDOUT_POSITIONS = ("02", "11", "20")


def _real_raw(work: Path, cache: Path) -> tuple[Path, Path, list[str]]:
    import nibabel as nib

    did, name = IDS["real"]
    wheel = fetch_nilearn_wheel(cache)
    src = work / "source"
    src.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for key, member in MNI_FILES.items():
            (src / Path(member).name).write_bytes(z.read(member))
        license_member = next(m for m in z.namelist() if m.endswith("licenses/LICENSE") or m.endswith("/LICENSE"))
        (src / "nilearn_LICENSE").write_bytes(z.read(license_member))
    shutil.copy(SOURCES_TEXT, work / "SOURCES.md")
    t1i = nib.load(str(src / Path(MNI_FILES["t1"]).name))
    arrays = {k: np.asarray(nib.load(str(src / Path(m).name)).dataobj) for k, m in MNI_FILES.items()}
    spacing = float(abs(t1i.affine[0, 0]))
    target = 2.0
    zoom = spacing / target
    raw = work / "raw"
    ds_raw = raw / f"Dataset{did:03d}_{name}"
    for sub in ("imagesTr", "labelsTr"):
        (ds_raw / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([target, target, target, 1.0])
    for cid, image, labels in mni_blocks(arrays["t1"], arrays["gm"], arrays["wm"], zoom):
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(ds_raw / "imagesTr" / f"{cid}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(ds_raw / "labelsTr" / f"{cid}.nii.gz"))
    n = len(list((ds_raw / "labelsTr").glob("*.nii.gz")))
    (ds_raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "grey_matter": 1, "white_matter": 2},
        "numTraining": n, "file_ending": ".nii.gz",
        "description": "blocks of the MNI ICBM152 2009a symmetric template (nilearn's copy); see SOURCES.md"},
        indent=2))
    held = [f"mni_{h}{p}" for p in MNI_HELDOUT_POSITIONS for h in "LR"]
    return raw, ds_raw, held


def _divide_features(ds_pre: Path, divisor: int) -> list[int]:
    """Set 3d_fullres's features per stage to the *planned* ones (kept in ``planned_features.json``) divided by
    ``divisor`` (at least 4), in nnfast's plans and nnU-Net's exported plans alike; returns them. Preprocessing does
    not depend on them."""
    keep = ds_pre / "planned_features.json"
    nn_file, ours_file = ds_pre / "nnUNetPlans.json", ds_pre / "nnfast_plans.json"
    nn, ours = json.loads(nn_file.read_text()), json.loads(ours_file.read_text())
    nn_arch = nn["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    if not keep.is_file():
        keep.write_text(json.dumps(nn_arch["features_per_stage"]))
    planned = json.loads(keep.read_text())
    features = [max(4, int(f) // int(divisor)) for f in planned]
    nn_arch["features_per_stage"] = features
    ours["configurations"]["3d_fullres"]["architecture"]["features_per_stage"] = features
    nn_file.write_text(json.dumps(nn, indent=2))
    ours_file.write_text(json.dumps(ours, indent=2))
    return features


def label_shares(labels_folder: Path, dataset_json: Path) -> dict[str, float]:
    """Each foreground label's share of the voxels of the held-out label files (all cases pooled), by label name:
    which structure is small, i.e. which Dice a few hundred iterations cannot be expected to reach."""
    import nibabel as nib

    names = {int(v): k for k, v in json.loads(dataset_json.read_text())["labels"].items()
             if isinstance(v, int) and v > 0}
    counts = dict.fromkeys(names, 0)
    total = 0
    for f in sorted(labels_folder.glob("*.nii.gz")):
        seg = np.asarray(nib.load(str(f)).dataobj)
        total += seg.size
        for v in names:
            counts[v] += int((seg == v).sum())
    return {names[v]: counts[v] / max(1, total) for v in sorted(names)}


def prepare(name: str, work: Path, budget, cache: Path, log=print) -> Prepared:
    """Prepare dataset ``name`` under ``work/<name>`` (reused when its summary exists)."""
    from nnfast.plan.api import plan_dataset
    from nnfast.preprocess.api import preprocess_dataset
    from nnfast.settings import Settings
    from nnfast.layout import SPLITS_FILE
    from nnfast.splits import load_or_create_splits

    did, dname = IDS[name]
    folder_name = f"Dataset{did:03d}_{dname}"
    root = work / name
    raw, pre = root / "raw", root / "preprocessed"
    heldout = root / "heldout"
    summary_file = root / "dataset_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        changed = "label_shares" not in summary  # a summary written before the shares were recorded
        if changed:
            summary["label_shares"] = label_shares(heldout / "labels", pre / folder_name / "dataset.json")
        if summary.get("features_divisor", 1) != budget.features_divisor:
            summary["features_per_stage"] = _divide_features(pre / folder_name, budget.features_divisor)
            summary["features_divisor"] = budget.features_divisor
            changed = True
        if changed:
            summary_file.write_text(json.dumps(summary, indent=2))
        return Prepared(name, did, folder_name, raw, pre, heldout / "images", heldout / "labels", summary)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if name == "real":
        raw, ds_raw, held = _real_raw(root, cache)
    else:
        raw, ds_raw, held = _synth_raw(name, root, budget)
    _hold_out(ds_raw, heldout, held)
    log(f"[{name}] {len(held)} held-out cases: {', '.join(held)}")
    settings = Settings(raw=raw, preprocessed=pre, results=root / "results_unused")
    res = plan_dataset(did, settings, workers=1, gpu_memory_gb=budget.gpu_memory_gb, export_nnunet=True)
    preprocess_dataset(did, settings, config="3d_fullres", workers=1)
    _run_nnunet("preprocess_entry", ["-d", str(did), "-c", "3d_fullres", "-np", "1", "-plans_name", "nnUNetPlans"],
                raw, pre)
    ds_pre = pre / folder_name
    # one split for every arm: nnU-Net's 5-fold split of the training cases (written by nnfast's split owner)
    train_ids = sorted(p.name[:-len(".nii.gz")] for p in (ds_raw / "labelsTr").glob("*.nii.gz"))
    splits = load_or_create_splits(ds_pre / SPLITS_FILE, train_ids)
    features = _divide_features(ds_pre, budget.features_divisor)
    conf = json.loads((ds_pre / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    patch = conf["patch_size"]
    spacing = conf["spacing"]
    summary = {
        "name": name, "dataset": folder_name, "training_cases": len(train_ids), "heldout_cases": held,
        "fold0_train": len(splits[0]["train"]), "fold0_val": len(splits[0]["val"]),
        "patch_size": patch, "batch_size": conf["batch_size"], "spacing": spacing,
        "n_stages": len(conf["architecture"]["arch_kwargs"]["n_conv_per_stage"]),
        "dummy_2d": bool(max(patch) / patch[0] > 3),  # nnU-Net's ANISO_THRESHOLD rule on the patch
        "separate_z": bool(max(spacing) / min(spacing) > 3),  # nnU-Net's resampling rule on the target spacing
        "plans_gpu_memory_gb": budget.gpu_memory_gb, "features_divisor": budget.features_divisor,
        "features_per_stage": features, "plans_identifier": res.plans_identifier
        if hasattr(res, "plans_identifier") else "nnfast_plans",
        "label_shares": label_shares(heldout / "labels", ds_pre / "dataset.json"),
    }
    summary_file.write_text(json.dumps(summary, indent=2))
    log(f"[{name}] prepared: {json.dumps(summary)}")
    return Prepared(name, did, folder_name, raw, pre, heldout / "images", heldout / "labels", summary)
