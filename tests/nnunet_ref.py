"""Run nnU-Net v2 itself (the installed ``nnunetv2``) in a subprocess, on temporary data folders.

nnU-Net reads its data folders from environment variables at import time, so each call runs in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def nnunet_pools_as_threads(set_attr=setattr) -> None:
    """Make nnU-Net run its worker pools as threads of the calling process: the fingerprint extractor's and the
    preprocessor's ``spawn`` pools (an interpreter each, importing torch and nnU-Net: seconds of CPU per pool) and the
    12 processes it forks to list an image folder's files (``create_lists_from_splitted_dataset_folder``, called by
    its planner, preprocessor and predictor; forking a process that holds torch costs more than the listing). The
    same functions run on the same inputs, so nnU-Net's outputs are unchanged. ``set_attr`` is
    ``monkeypatch.setattr`` in-process; a script run in a fresh interpreter embeds :data:`POOLS_AS_THREADS_SOURCE`."""
    import multiprocessing
    import multiprocessing.pool
    import types

    import nnunetv2.utilities.utils as nnunet_utils
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor

    threads = types.ModuleType("multiprocessing_as_threads")
    threads.__getattr__ = lambda name: getattr(multiprocessing, name)  # type: ignore[method-assign]
    threads.get_context = lambda *a, **k: types.SimpleNamespace(Pool=multiprocessing.pool.ThreadPool)  # type: ignore
    set_attr(nnunet_utils, "Pool", multiprocessing.pool.ThreadPool)
    set_attr(fingerprint_extractor, "multiprocessing", threads)
    set_attr(default_preprocessor, "multiprocessing", threads)


#: the source of :func:`nnunet_pools_as_threads`, for scripts that run nnU-Net in a fresh interpreter
POOLS_AS_THREADS_SOURCE = __import__("inspect").getsource(nnunet_pools_as_threads)
_RUNNER = POOLS_AS_THREADS_SOURCE + """
import os, sys
from nnunetv2.experiment_planning import plan_and_preprocess_entrypoints as e
budget = os.environ.get("NNFAST_TEST_FP_SAMPLES")
if budget:  # nnU-Net samples 1e8 foreground voxels; a smaller budget keeps tests fast (sampling noise << tolerance)
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe
    _init = fe.DatasetFingerprintExtractor.__init__
    def _patched(self, *a, **k):
        _init(self, *a, **k)
        self.num_foreground_voxels_for_intensitystats = float(budget)
    fe.DatasetFingerprintExtractor.__init__ = _patched
sys.argv = [sys.argv[1]] + sys.argv[2:]
nnunet_pools_as_threads()  # same outputs, no spawned or forked worker processes
getattr(e, sys.argv[0])()
"""


def run_nnunet(entry: str, args: list[str], raw: Path, preprocessed: Path, results: Path | None = None,
               timeout: float = 600, fingerprint_samples: float | None = 4e6) -> subprocess.CompletedProcess:
    """Call an nnU-Net entry point function of ``plan_and_preprocess_entrypoints`` with CLI ``args``."""
    env = dict(os.environ)
    env.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(preprocessed),
               nnUNet_results=str(results or preprocessed.parent / "results"), nnUNet_compile="f",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if fingerprint_samples:
        env["NNFAST_TEST_FP_SAMPLES"] = str(fingerprint_samples)
    r = subprocess.run([sys.executable, "-c", _RUNNER, entry, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"nnU-Net {entry} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def nnunet_fingerprint(dataset_id: int | list[int], raw: Path, preprocessed: Path, workers: int = 1) -> dict:
    """nnU-Net's ``dataset_fingerprint.json`` of a dataset; for a list of ids, ``{id: fingerprint}`` from one run of
    its command (``-d`` takes several ids: one interpreter importing torch and nnU-Net instead of one per dataset)."""
    ids = [dataset_id] if isinstance(dataset_id, int) else list(dataset_id)
    run_nnunet("extract_fingerprint_entry", ["-d", *map(str, ids), "-np", str(workers)], raw, preprocessed)
    out = {i: json.loads((next(preprocessed.glob(f"Dataset{i:03d}_*")) / "dataset_fingerprint.json").read_text())
           for i in ids}
    return out[dataset_id] if isinstance(dataset_id, int) else out


def load_nnunet_case(folder: Path, case_id: str):
    """Data, seg and properties of a case preprocessed by nnU-Net (blosc2 + pickle, read only in tests)."""
    import pickle

    import blosc2

    data = blosc2.open(str(folder / f"{case_id}.b2nd"), mode="r")[:]
    seg = blosc2.open(str(folder / f"{case_id}_seg.b2nd"), mode="r")[:]
    with open(folder / f"{case_id}.pkl", "rb") as f:
        props = pickle.load(f)  # nnU-Net's own file format; nnfast never writes pickles
    return data, seg, props


def accumulate_in_float32(predict_module, set_attr=setattr) -> None:
    """Make nnU-Net's predictor (``nnunetv2.inference.predict_from_raw_data``, given as ``predict_module``) accumulate
    sliding-window logits and Gaussian weights in float32 instead of float16, as nnfast does, so comparisons can be
    tight. ``set_attr`` is ``monkeypatch.setattr`` in-process; in a subprocess script the function's source is embedded
    (:data:`ACCUMULATE_IN_FLOAT32_SOURCE`) and called with the default ``setattr``."""
    import types

    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    proxy = types.ModuleType("torch_fp32")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]

    def zeros(*a, **k):
        if k.get("dtype") is torch.half:
            k["dtype"] = torch.float32
        return torch.zeros(*a, **k)

    proxy.zeros = zeros  # type: ignore[attr-defined]
    proxy.half = torch.float32  # type: ignore[attr-defined]

    def gaussian(*a, **k):
        return compute_gaussian(*a, **{**k, "dtype": torch.float32})

    gaussian.cache_clear = lambda: None  # type: ignore[attr-defined]
    set_attr(predict_module, "torch", proxy)
    set_attr(predict_module, "compute_gaussian", gaussian)


#: the source of :func:`accumulate_in_float32`, for scripts that run nnU-Net in a fresh interpreter
ACCUMULATE_IN_FLOAT32_SOURCE = __import__("inspect").getsource(accumulate_in_float32)
