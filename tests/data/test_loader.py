"""PatchLoader: nnU-Net's batch format, identical batch streams with 0, 1 and 2 workers, worker death, worker
errors, Ctrl-C, and no shared memory left behind."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from nnfast.data.batch import BatchSpec
from nnfast.data.dataset import NnunetCaseSource, ZarrCaseSource
from nnfast.data.loader import SHM_PREFIX, PatchLoader
from nnfast.errors import CaseNotFoundError, WorkerDiedError

DS = ((1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
SPEC = BatchSpec.from_patch_size((8, 16, 16), 3, num_channels=1, ds_scales=DS)  # the cases have one channel
SETTINGS = dict(base_seed=7)


def our_shm() -> set[str]:
    """nnfast loader blocks of this process in /dev/shm."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"{SHM_PREFIX}{os.getpid()}_")}


@pytest.fixture(scope="module")
def source(ld_cases):
    return ZarrCaseSource(ld_cases[0])


def flat(batch) -> list[np.ndarray]:
    t = batch["target"]
    return [batch["data"].numpy(), *(x.numpy() for x in (t if isinstance(t, list) else [t]))]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for u, v in zip(flat(x), flat(y)):
            assert u.dtype == v.dtype
            np.testing.assert_array_equal(u, v)


def test_in_process_format(source):
    with PatchLoader(source, SPEC, num_workers=0, num_batches=3, **SETTINGS) as loader:
        assert len(loader) == 3
        batches = list(loader)
        assert loader.next_batch_index == 3
    assert len(batches) == 3
    b = batches[0]
    assert set(b) == {"data", "target", "keys"}
    assert isinstance(b["data"], torch.Tensor) and b["data"].dtype == torch.float32
    assert tuple(b["data"].shape) == (3, 1, 8, 16, 16)
    assert isinstance(b["target"], list) and [tuple(t.shape) for t in b["target"]] == [(3, 1, 8, 16, 16),
                                                                                      (3, 1, 4, 8, 8)]
    assert all(t.dtype == torch.int16 for t in b["target"])
    assert isinstance(b["keys"], list) and all(isinstance(k, str) for k in b["keys"])
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_without_deep_supervision_target_is_a_tensor(source):
    loader = PatchLoader(source, BatchSpec.from_patch_size((8, 16, 16), 2, num_channels=source.num_channels),
                         base_seed=0)
    b = next(loader)
    loader.close()
    assert isinstance(b["target"], torch.Tensor) and tuple(b["target"].shape) == (2, 1, 8, 16, 16)


def test_settings_from_a_plan_configuration(source):
    from nnfast.plan.schema import Architecture, ConfigurationPlan, Resampling

    arch = Architecture(n_stages=3, features_per_stage=(8, 16, 32), kernel_sizes=((3, 3, 3),) * 3,
                        strides=((1, 1, 1), (2, 2, 2), (1, 2, 2)), n_conv_per_stage=(2, 2, 2),
                        n_conv_per_stage_decoder=(2, 2))
    r = Resampling(order=1)
    conf = ConfigurationPlan(name="3d_fullres", data_identifier="x", batch_size=2, patch_size=(8, 16, 16),
                             median_image_size_in_voxels=(20.0, 40.0, 40.0), spacing=(1.0, 1.0, 1.0),
                             normalization_schemes=("ZScoreNormalization",), use_mask_for_norm=(False,),
                             resampling_data=r, resampling_seg=r, resampling_probabilities=r, architecture=arch,
                             batch_dice=False)
    class FakePlans:  # nnfast Plans resolve a configuration by name
        def configuration(self, name):
            assert name == "3d_fullres"
            return conf

    spec = BatchSpec.from_plan(FakePlans(), "3d_fullres", num_channels=source.num_channels)
    with PatchLoader(source, spec, base_seed=0) as loader:
        b = next(loader)
    assert tuple(b["data"].shape) == (2, 1, 8, 16, 16)
    assert [tuple(t.shape) for t in b["target"]] == [(2, 1, 8, 16, 16), (2, 1, 4, 8, 8)]
    with pytest.raises(ValueError, match="config"):  # a plan configuration is not a BatchSpec
        PatchLoader(source, conf)

    spec_bs = BatchSpec.from_plan(FakePlans(), "3d_fullres", num_channels=source.num_channels, batch_size=2)
    with PatchLoader(source, spec_bs, base_seed=0) as loader:
        c = next(loader)
    np.testing.assert_array_equal(c["data"].numpy(), b["data"].numpy())


def test_resume_at_a_batch_index(source):
    with PatchLoader(source, SPEC, num_batches=4, **SETTINGS) as full:
        stream = list(full)
    with PatchLoader(source, SPEC, num_batches=2, start_batch=2, **SETTINGS) as tail:
        assert_same(list(tail), stream[2:])
    with PatchLoader(source, SPEC, num_batches=1, **{**SETTINGS, "base_seed": 8}) as other:
        b = next(other)
    assert not np.array_equal(b["data"].numpy(), stream[0]["data"].numpy())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_batches_with_0_1_2_workers_then_ctrl_c(source, monkeypatch):
    n = 7
    before = our_shm()
    # start both worker loaders first: their start-up (spawn, imports) overlaps the in-process reference
    one_loader = PatchLoader(source, SPEC, num_workers=1, num_batches=n, num_cached=3, **SETTINGS)
    loader = PatchLoader(source, SPEC, num_workers=2, **SETTINGS)  # infinite
    with PatchLoader(source, SPEC, num_workers=0, num_batches=n, **SETTINGS) as ref_loader:
        ref = list(ref_loader)
    with one_loader:
        assert one_loader.shm_name in our_shm()
        one_name = one_loader.shm_name
        one = list(one_loader)
    assert one_name not in our_shm()  # unlinked on normal close
    assert_same(one, ref)
    two = [next(loader) for _ in range(n)]
    assert_same(two, ref)
    assert loader.shm_name in our_shm()
    pids = loader.worker_pids
    # Ctrl-C while waiting for a batch: the loader closes and re-raises
    import multiprocessing.connection as mpc

    real_wait = mpc.wait
    calls = []

    def interrupted(*a, **k):  # the first wait (for a batch) is interrupted; close() joins with later ones
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_wait(*a, **k)

    loader._done.clear()  # forget batches already received, so that next() has to wait
    monkeypatch.setattr(mpc, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        next(loader)
    monkeypatch.undo()
    assert our_shm() == before
    assert loader._workers == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_raises_within_seconds_and_cleans_up(source):
    before = our_shm()
    loader = PatchLoader(source, SPEC, num_workers=1, num_cached=2, **SETTINGS)
    next(loader)  # the worker is up
    pid = loader.worker_pids[0]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match="SIGKILL") as info:
        for _ in range(10):  # up to num_cached batches may already be finished
            next(loader)
    assert time.monotonic() - t0 < 5.0
    assert "out-of-memory" in str(info.value)
    assert our_shm() == before
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    loader.close()  # idempotent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worker_exception_is_reraised_with_its_type(ld_cases, tmp_path):
    nn = ld_cases[1]
    if not any(nn.glob("*.b2nd")):
        pytest.skip("needs nnunetv2 to write the nnU-Net folder")
    # one case whose properties file is missing: the first forced-foreground sample needs its class locations
    for suffix in (".b2nd", "_seg.b2nd"):
        (tmp_path / f"case_000{suffix}").symlink_to(nn / f"case_000{suffix}")
    before = our_shm()
    loader = PatchLoader(NnunetCaseSource(tmp_path), SPEC, num_workers=1, **SETTINGS)
    with pytest.raises(CaseNotFoundError, match="batch 0") as info:
        next(loader)
    assert "case_000.pkl" in str(info.value)
    assert "Traceback" in str(info.value.__cause__)
    assert our_shm() == before
    assert loader._workers == []


@pytest.mark.timeout(120)
def test_wait_ready_starts_the_workers_before_the_first_batch_and_keeps_the_stream(source):
    with PatchLoader(source, SPEC, num_workers=0, num_batches=2, **SETTINGS) as ref_loader:
        assert ref_loader.wait_ready() == 0.0 and ref_loader.workers_ready
        ref = list(ref_loader)
    before = our_shm()
    with PatchLoader(source, SPEC, num_workers=1, num_batches=2, num_cached=2, **SETTINGS) as loader:
        # spawned at construction, but nothing has been heard from the worker yet (it is importing)
        assert not loader.workers_ready and loader.batches_ready == 0
        assert loader.wait_ready() > 0.0
        # what nnU-Net's get_dataloaders guarantees by drawing a batch: the worker is up, a batch is built
        assert loader.workers_ready and loader.batches_ready >= 1
        assert loader.next_batch_index == 0  # nothing consumed
        pids = loader.worker_pids
        got = list(loader)
        assert loader.wait_ready() == 0.0  # exhausted
    assert_same(got, ref)
    assert our_shm() == before
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(120)
def test_dropped_loader_releases_its_shared_memory(source):
    import gc

    loader = PatchLoader(source, SPEC, num_workers=1, **SETTINGS)
    name, pids = loader.shm_name, loader.worker_pids
    assert name in our_shm()
    del loader
    gc.collect()
    assert name not in our_shm()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_settings(source):
    with pytest.raises(ValueError, match="num_workers"):
        PatchLoader(source, SPEC, num_workers=-1, **SETTINGS)
    with pytest.raises(ValueError, match="differs"):  # the spec must fit the source
        PatchLoader(source, BatchSpec.from_patch_size((8, 16, 16), 2, num_channels=2))
