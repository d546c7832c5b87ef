"""``nnfast preprocess``: plan if needed, then preprocess every training case into zarr case stores.

Output: ``<preprocessed>/<DatasetNNN_Name>/<data_identifier>/<case>.zarr`` per configuration, and
``gt_segmentations/`` (copies of the label files, for evaluation). Resumable: a case whose finished store carries the
current hash (plans + inputs) is skipped; nothing is deleted wholesale; ``force`` recomputes every case.

Where the cases run (``pool``, default ``"auto"``):

* **threads of this process** (``--workers`` up to :data:`THREAD_WORKERS_MAX` and at most the cores available, no
  dask scheduler): every heavy step of a case releases the GIL (SimpleITK's reader, the nogil Numba kernels, NumPy,
  Blosc's compression), so threads run cases side by side without starting worker interpreters (~1-2 s of CPU each:
  Python, Numba, loading the kernels again). The kernels load once, on a thread started with the command while
  verification and fingerprinting run (a cold cache compiles in a background process instead, as below), and the
  arrays verification (or the fingerprint) decoded are kept in a memory-bounded
  :class:`~nnfast.io.decoded_cache.DecodedCache` and preprocessed without reading the files again. The peak memory
  reported is then the one process's, all threads' cases together; an out-of-memory kill stops the whole command
  (the warning before the first case says when the cases may not fit).
* **worker processes** (more workers, or ``pool="processes"``): the pool (:class:`nnfast.parallel.TaskPool`)
  starts before verification when the dataset has no case stores yet (or with ``force``): its workers import and
  load (or, on a cold cache, compile) the kernels on the cores verification and fingerprinting leave idle; a rerun
  whose cases may all be current starts them only once planning says which cases need them. A worker killed by the
  out-of-memory killer is a ``WorkerDiedError`` naming its case.
* a dask scheduler's workers (``scheduler``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from ..layout import GT_FOLDER, case_store_folder
from ..plan.schema import CONFIGURATION_NAMES
from ..settings import Settings

__all__ = ["PreprocessSummary", "ConfigSummary", "preprocess_dataset", "configs_to_run", "PREPROCESSED_CONFIGURATIONS",
           "CONFIG_CHOICES", "compile_in_background", "finish_background"]

log = logging.getLogger(__name__)

ConfigChoice = Literal["2d", "3d_fullres", "3d_lowres", "all"]
#: configurations with case stores of their own (the cascade's second stage reads those of ``3d_fullres``)
PREPROCESSED_CONFIGURATIONS: tuple[str, ...] = tuple(c for c in CONFIGURATION_NAMES if c != "3d_cascade_fullres")
#: what ``config`` of :func:`preprocess_dataset` (and ``nnfast preprocess --config``) accepts
CONFIG_CHOICES: tuple[str, ...] = (*PREPROCESSED_CONFIGURATIONS, "all")

#: the kernel modules a preprocessing worker runs (compiled or loaded once in the parent before workers start)
PREPROCESS_KERNELS = ("crop", "normalize", "resample", "resample_seg", "class_locations")

#: Most ``--workers`` that run as threads of this process with ``pool="auto"`` (and never more than the cores
#: available). Only 2 threads were measured (on 2 cores: ~20 % less CPU than 2 worker processes, benchmarks/README.md
#: "Issue 13 goal 2, fourth pass"); the Python left in a case holds the GIL for part of its time, so many threads
#: would queue on it: more workers run as processes.
THREAD_WORKERS_MAX = 4

PoolChoice = Literal["auto", "threads", "processes"]


@dataclass
class ConfigSummary:
    config: str
    folder: Path
    cases: int = 0
    computed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    voxels_in: int = 0
    bytes_on_disk: int = 0


@dataclass
class PreprocessSummary:
    dataset: str
    configs: list[ConfigSummary] = field(default_factory=list)
    planning_s: float = 0.0
    wall_s: float = 0.0
    peak_rss_parent: int = 0
    peak_rss_children: int = 0
    workers: int = 1
    skipped_configs: list[str] = field(default_factory=list)
    threads: bool = False
    """The cases ran on threads of this process (then ``peak_rss_parent`` holds every thread's cases at once)."""
    reused_reads: int = 0
    """Cases preprocessed from the arrays verification or the fingerprint decoded, without reading their files."""

    def format(self) -> str:
        how = f"{self.workers} thread(s)" if self.threads else f"{self.workers} worker(s)"
        lines = [f"preprocessed {self.dataset} with {how} in {self.wall_s:.1f} s "
                 f"(verify + fingerprint + plan {self.planning_s:.1f} s)"]
        for c in self.configs:
            rate = c.computed / c.wall_s if c.wall_s > 0 and c.computed else 0.0
            mvox = c.voxels_in / c.wall_s / 1e6 if c.wall_s > 0 and c.computed else 0.0
            lines.append(
                f"  {c.config:<11} {c.cases} cases ({c.computed} computed, {c.skipped} already current) in {c.wall_s:.1f} s"
                f" = {rate:.2f} cases/s, {mvox:.1f} Mvoxel/s in; {c.bytes_on_disk / 2**20:.1f} MiB on disk in {c.folder}"
            )
        if self.reused_reads:
            lines.append(f"  inputs read once: {self.reused_reads} case(s) preprocessed from the arrays verification "
                         f"decoded")
        for name in self.skipped_configs:
            lines.append(f"  {name:<11} not planned for this dataset (nnU-Net's rules drop it), skipped")
        if self.threads:
            lines.append(f"  peak memory: {self.peak_rss_parent / 2**20:.0f} MiB (one process: the cases of its "
                         f"{self.workers} preprocessing thread(s) at once"
                         f"{', and the inputs kept decoded' if self.reused_reads else ''})")
        else:
            lines.append(f"  peak memory: {self.peak_rss_parent / 2**20:.0f} MiB main process, "
                         f"{self.peak_rss_children / 2**20:.0f} MiB largest worker")
        return "\n".join(lines)


def configs_to_run(plans, config: ConfigChoice | str) -> tuple[list[str], list[str]]:
    """(configurations to preprocess, requested ones the plans do not have).

    ``all`` means nnU-Net's configurations with case stores of their own; any other name must be a configuration of
    the plans (custom ones such as ``3d_fullres_bs40`` included; an nnU-Net configuration the planner dropped, e.g.
    ``3d_lowres``, is reported as skipped).

    Raises
    ------
    PlanError
        ``config`` names no configuration of the plans nor of nnU-Net.
    """
    if config != "all" and config not in plans.configurations and config not in CONFIGURATION_NAMES:
        from ..errors import PlanError

        raise PlanError(f"--config `{config}` is not a configuration of plans `{plans.plans_name}` of {plans.dataset_name} "
                        f"(available: {', '.join(plans.configurations)}, or all)")
    wanted = list(PREPROCESSED_CONFIGURATIONS) if config == "all" else [config]
    present = [c for c in wanted if c in plans.configurations]
    return present, [c for c in wanted if c not in plans.configurations]


def preprocess_dataset(
    task: str | int,
    settings: Settings,
    *,
    config: ConfigChoice | str = "3d_fullres",
    workers: int = 2,
    scheduler=None,
    gpu_memory_gb: float | None = None,
    verify: bool = True,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    plans_identifier: str | None = None,
    preset: str | None = None,
    replan: bool = False,
    pool: PoolChoice = "auto",
) -> PreprocessSummary:
    """Run verify -> fingerprint -> plan where missing or stale, then preprocess every training case.

    ``pool``: where the cases run without a ``scheduler`` (module docstring): ``"threads"`` of this process,
    ``"processes"``, or ``"auto"`` (threads for ``workers`` up to :data:`THREAD_WORKERS_MAX` and the cores
    available). One worker runs the cases in this process, reading each input once, unless ``"processes"``.

    Missing plans are planned only under the preset's own identifier (``nnfast_plans``, ``nnfast_ResEncM_plans``...);
    another ``plans_identifier`` must exist (``nnfast plan --plans NAME``). The plans on disk are used as they are
    (:func:`nnfast.plan.api.plan_dataset`: re-planned only when the dataset changed; ``gpu_memory_gb`` / ``preset``
    plan missing plans and must agree with existing ones unless ``replan``)."""
    from ..parallel import peak_rss_bytes

    t0 = time.perf_counter()
    threads = _use_threads(workers, scheduler, pool)
    with contextlib.ExitStack() as stack:
        task_pool = None
        decoded = loader = compiler = None
        ahead = min(workers, _training_case_count(task, settings)) if not threads and scheduler is None \
            and workers > 1 else 0
        if threads:
            loader = _KernelLoader()  # loads the kernels (or starts a cold cache's compile) beside verification
            loader.start()
            decoded = _decoded_cache()
        elif ahead > 1 and (force or not _has_case_stores(task, settings)):
            # the workers start (interpreter, imports, kernels: ~2 s of CPU each) while this process verifies,
            # fingerprints and plans on one core, and they compile a cold kernel cache instead of a background process
            task_pool = stack.enter_context(_preprocess_pool(ahead))
        else:
            compiler = compile_in_background(scheduler)  # while verify + fingerprint run (cold cache only)
        try:
            summary = _plan_and_preprocess(task, settings, t0, task_pool, config=config, workers=workers,
                                           scheduler=scheduler, gpu_memory_gb=gpu_memory_gb, verify=verify, force=force,
                                           progress=progress, plans_identifier=plans_identifier, preset=preset,
                                           replan=replan, loader=loader, decoded=decoded)
        finally:
            if decoded is not None:
                decoded.clear()
            if loader is not None:
                loader.join()
                compiler = loader.compiler
    finish_background(compiler)  # a failed background compile: one warning line, its log kept
    summary.wall_s = time.perf_counter() - t0
    summary.peak_rss_parent, summary.peak_rss_children = peak_rss_bytes()
    return summary


def _use_threads(workers: int, scheduler, pool: str) -> bool:
    """Whether the cases run on threads of this process (see the module docstring)."""
    if pool not in ("auto", "threads", "processes"):
        from ..errors import SettingsError

        raise SettingsError(f"pool={pool!r}: expected 'auto', 'threads' or 'processes'")
    if scheduler is not None or pool == "processes":
        return False
    if pool == "threads" or workers <= 1:  # one worker: the cases run in this process anyway
        return True
    from ..native._jit import available_cores

    return workers <= min(THREAD_WORKERS_MAX, available_cores())


def _decoded_cache():
    """The :class:`~nnfast.io.decoded_cache.DecodedCache` of one run: :data:`~nnfast.io.decoded_cache.
    DEFAULT_MEMORY_FRACTION` of the memory available now (nothing kept when that is unknown)."""
    from ..io.decoded_cache import DEFAULT_MEMORY_FRACTION, DecodedCache
    from .memory import available_memory_bytes

    available = available_memory_bytes()
    return DecodedCache(int(available * DEFAULT_MEMORY_FRACTION) if available else 0)


class _KernelLoader(threading.Thread):
    """Loads :data:`PREPROCESS_KERNELS` from Numba's cache into this process while it verifies and fingerprints (the
    preprocessing threads then start with every kernel loaded, instead of queueing on Numba's compiler lock for
    them); on a cold cache it starts the background compile process instead (:func:`compile_in_background`:
    compiling here would hold the GIL verification needs), whose results :meth:`ready` loads. A failed load is
    left to the kernels' first use, which compiles or loads them again and raises in the case that needs them."""

    def __init__(self) -> None:
        super().__init__(name="nnfast-kernel-loader", daemon=True)
        self.compiler = None

    def run(self) -> None:
        try:
            from ..native._jit import is_warm, load_dispatch_machinery, warmup

            if is_warm(PREPROCESS_KERNELS):
                load_dispatch_machinery()
                warmup(PREPROCESS_KERNELS)
            else:
                self.compiler = compile_in_background()
        except Exception as exc:  # the kernels' first use reports a real problem, with its case
            log.debug("loading the preprocessing kernels ahead failed: %s: %s", type(exc).__name__, exc)

    def ready(self) -> None:
        """Wait until the kernels are loaded (a background compile's: loaded here, or compiled if it has not)."""
        self.join()
        if self.compiler is not None:
            from ..native._jit import share_background

            share_background(PREPROCESS_KERNELS)


@contextlib.contextmanager
def _single_threaded_libraries_scope():
    """:func:`single_threaded_libraries` for this process while the block runs (each preprocessing thread is one
    of the ``workers``: ``workers x threads <= cores``), the previous thread counts restored afterwards."""
    import numcodecs.blosc
    import SimpleITK as sitk

    sitk_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    blosc_before = numcodecs.blosc.get_nthreads()
    single_threaded_libraries()
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_before)
        numcodecs.blosc.set_nthreads(blosc_before)


def _preprocess_pool(workers: int):
    """The pool of preprocessing workers (:class:`nnfast.parallel.TaskPool` running :func:`run_case_task`), not
    started yet."""
    from ..parallel import TaskPool
    from .pipeline import run_case_task

    return TaskPool(run_case_task, workers=workers, warmup=PREPROCESS_KERNELS, initializer=single_threaded_libraries)


def _training_case_count(task: str | int, settings: Settings) -> int:
    """The dataset's number of training cases (no more workers than that start ahead); 0 when it cannot be listed
    (the planning then reports why)."""
    from ..plan.api import load_dataset_for_task

    try:
        return len(load_dataset_for_task(task, settings)[1])
    except Exception:  # any problem of the dataset is verification's and planning's to report, with its context
        return 0


def _has_case_stores(task: str | int, settings: Settings) -> bool:
    """Whether the dataset's preprocessed folder already holds case stores: then a run is probably a resumed or
    repeated one with most cases current, and :func:`preprocess_dataset` starts its workers only once planning says
    which cases need them, instead of ahead of it at ~2 s of CPU each for maybe nothing."""
    from ..settings import find_dataset_folder

    if settings.preprocessed is None:
        return False
    try:
        folder = find_dataset_folder(task, Path(settings.preprocessed))
        return any(p.suffix == ".zarr" for sub in folder.iterdir() if sub.is_dir() for p in sub.iterdir())
    except (OSError, ValueError):  # no preprocessed folder for this dataset yet (planning reports real problems)
        return False


def _plan_and_preprocess(task, settings: Settings, t0: float, pool, *, config, workers: int, scheduler,
                         gpu_memory_gb, verify: bool, force: bool, progress, plans_identifier, preset,
                         replan: bool, loader: "_KernelLoader | None" = None, decoded=None) -> PreprocessSummary:
    """:func:`preprocess_dataset` after its workers (``pool``, or none yet) have been started; with ``loader`` (and
    ``decoded``, the cache of the arrays planning reads) the cases run on threads of this process."""
    from ..io.store import is_complete
    from ..parallel import run_in_threads, run_tasks
    from ..plan.api import plan_dataset, plans_path
    from ..plan.presets import get_preset
    from .pipeline import CaseTask, case_hash, configuration_hash, dir_size, run_case_task

    res = plan_dataset(task, settings, workers=workers, scheduler=scheduler, gpu_memory_gb=gpu_memory_gb, verify=verify,
                       plans_identifier=plans_identifier, preset=preset, replan=replan,
                       create=plans_identifier in (None, get_preset(preset or "default").plans_identifier),
                       decoded=decoded)
    summary = PreprocessSummary(dataset=res.info.name, workers=workers, planning_s=time.perf_counter() - t0,
                                threads=loader is not None)
    plans = res.plans
    names, missing = configs_to_run(plans, config)
    summary.skipped_configs = missing
    _copy_ground_truth(res.cases, res.output_folder / GT_FOLDER)
    sizes_in = [sum(os.path.getsize(p) for p in c.image_files) for c in res.cases]

    for name in names:
        t1 = time.perf_counter()
        cfg = plans.configuration(name)
        folder = case_store_folder(res.output_folder, cfg.data_identifier)
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(folder)
        chash = configuration_hash(plans, name)
        tasks, task_sizes = [], []
        cs = ConfigSummary(config=name, folder=folder, cases=len(res.cases))
        for case, size in zip(res.cases, sizes_in):
            h = case_hash(chash, case)
            out = folder / f"{case.case_id}.zarr"
            if not force and is_complete(out, h):
                cs.skipped += 1
                continue
            tasks.append(CaseTask(case, str(plans_path(res.output_folder, res.plans_identifier)), name, str(out), h))
            task_sizes.append(size)
        log.info("%s: %d of %d cases to preprocess (%d current)", name, len(tasks), len(res.cases), cs.skipped)
        if decoded is not None:
            decoded.keep_only([t.case.case_id for t in tasks])  # current cases need no arrays
        if tasks and scheduler is None:
            _warn_if_workers_do_not_fit(res.fingerprint, plans, name, [t.case.case_id for t in tasks], workers,
                                        decoded)
        if tasks:
            keys = [t.case.case_id for t in tasks]
            if loader is not None:
                loader.ready()
                log.info("running %d preprocess %s on %d threads", len(tasks), name, min(workers, len(tasks)))
                hits = decoded.hits if decoded is not None else 0
                stop = threading.Event()  # Ctrl-C or a failed case: the running cases end at their next step
                with _single_threaded_libraries_scope():
                    results = run_in_threads(functools.partial(run_case_task, decoded=decoded, stop=stop), tasks,
                                             workers=workers, keys=keys, sizes=task_sizes, progress=progress,
                                             stop=stop)
                if decoded is not None:
                    summary.reused_reads += decoded.hits - hits
                    decoded.clear()  # another configuration reads the files
            elif pool is not None:
                results = pool.run(tasks, keys=keys, sizes=task_sizes, progress=progress, desc=f"preprocess {name}")
            else:
                results = run_tasks(run_case_task, tasks, workers=workers, keys=keys, sizes=task_sizes,
                                    scheduler=scheduler, progress=progress, desc=f"preprocess {name}",
                                    warmup=PREPROCESS_KERNELS, warmup_in_workers=True,
                                    initializer=single_threaded_libraries)
            cs.computed = len(results)
            cs.voxels_in = sum(r.voxels_in for r in results)
        cs.wall_s = time.perf_counter() - t1
        cs.bytes_on_disk = dir_size(folder)
        summary.configs.append(cs)
    return summary


def compile_in_background(scheduler=None):
    """A process compiling :data:`PREPROCESS_KERNELS` into Numba's cache when it is cold
    (:func:`nnfast.native._jit.warm_in_background`): the local pool's workers, or this process with one worker or a
    dask scheduler (whose workers on this machine load this cache), then compile the rest and load what it compiled.

    On an error, this process's exit stops it. ``scheduler`` is accepted for callers' convenience and not used."""
    from ..native._jit import warm_in_background

    return warm_in_background(PREPROCESS_KERNELS)


def finish_background(proc) -> None:
    """Wait for (briefly) or stop a :func:`compile_in_background` process and warn if it failed
    (:func:`nnfast.native._jit.finish_background`)."""
    from ..native._jit import finish_background as finish

    finish(proc)


def _warn_if_workers_do_not_fit(fingerprint, plans, config_name: str, case_ids: list[str], workers: int,
                                decoded=None) -> None:
    """One warning line, before any case starts, when ``workers`` workers on the largest cases may not fit in the
    memory available (:mod:`nnfast.preprocess.memory`). With ``decoded`` (the inputs kept decoded), entries are first
    dropped, largest first, until the workers' largest cases fit beside what it keeps (never more than fits)."""
    from .memory import PARENT_BYTES, available_memory_bytes, dataset_peaks, workers_warning

    peaks = dataset_peaks(fingerprint, plans, config_name, case_ids)
    available = available_memory_bytes()
    n = min(workers, len(case_ids))
    if decoded is not None and available is not None and decoded.used_bytes:
        short = PARENT_BYTES + sum(sorted(peaks.values(), reverse=True)[:n]) - available
        if short > 0:
            freed = decoded.release(short)
            log.info("preprocess %s: %.0f MiB of decoded inputs dropped to leave room for the cases (they are read "
                     "again)", config_name, freed / 2**20)
            available += freed
    message = workers_warning(list(peaks.values()), n, available)
    if message:
        log.warning("preprocess %s: %s", config_name, message)


def single_threaded_libraries() -> None:
    """Worker initializer: one thread for SimpleITK and Blosc too (they default to every core), so that
    ``workers x threads <= cores`` holds for the whole worker, not only for Numba."""
    import numcodecs.blosc
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    numcodecs.blosc.set_nthreads(1)


def _copy_ground_truth(cases, folder: Path) -> None:
    """Copy label files to ``gt_segmentations`` (nnU-Net does the same; used to evaluate validation predictions)."""
    from ..io.atomic import atomic_target

    folder.mkdir(parents=True, exist_ok=True)
    for c in cases:
        if c.label_file is None:
            continue
        dst = folder / c.label_file.name
        if dst.is_file() and dst.stat().st_size == c.label_file.stat().st_size \
                and dst.stat().st_mtime_ns >= c.label_file.stat().st_mtime_ns:
            continue
        with atomic_target(dst) as tmp:
            shutil.copyfile(c.label_file, tmp)


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove temporary stores left by a crashed run (hidden ``.<case>.zarr.tmp-*`` entries)."""
    for p in folder.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name:
            log.info("removing %s left by an interrupted run", p.name)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

