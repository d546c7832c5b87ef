"""A multiprocess patch loader: nnU-Net v2's batches, built by worker processes into shared memory.

:class:`PatchLoader` is an iterator of batches in nnU-Net's format (``{'data', 'target', 'keys'}``, see
:mod:`nnfast.data.batch`) that a trainer consumes with ``next(loader)``. Batch ``i`` is a pure function of
``(base_seed, i)``, so the stream of batches is the same with 0, 1 or N workers and can resume at any index.

How the work is spread (compare nnU-Net's ``NonDetMultiThreadedAugmenter``):

* ``num_workers=0`` builds every batch in the calling process (debugging, tiny data).
* With ``N`` workers, ``N`` *spawned* processes each own a :class:`~nnfast.data.batch.BatchBuilder`. One
  ``multiprocessing.shared_memory`` block holds a ring of ``num_cached`` batch slots; batch ``i`` is written
  into slot ``i % num_cached`` by whichever worker gets it. Only tiny control messages travel over one pipe
  per worker (``(i, slot)`` to the worker, ``("ok", i, keys)`` back): no array is pickled. The case source
  reaches each worker as JSON (:func:`~nnfast.data.dataset.source_to_json`: folder and case ids).
* At most ``num_cached`` batches are in flight; each new one goes to the worker with the fewest outstanding
  batches. Batches are delivered in index order: ``next()`` waits for batch ``i`` even if ``i + 1`` is ready.
* ``next()`` copies the slot into fresh tensors (pinned host memory when CUDA is present, so that
  ``.to(device, non_blocking=True)`` overlaps) before the slot is reused.

Robustness: the parent waits on the workers' pipes and process sentinels together, so a worker that dies (the
out-of-memory killer's SIGKILL, a segfault, SIGBUS from a full ``/dev/shm``) raises
:class:`~nnfast.errors.WorkerDiedError` naming the signal and the batch at once, and an exception inside a
worker is re-raised in the parent with its type and the worker's traceback. ``close()`` (also the context
manager, ``__del__`` and an ``atexit`` hook) stops the workers and unlinks the shared memory; Ctrl-C in
``next()`` closes the loader and re-raises ``KeyboardInterrupt`` (workers ignore SIGINT and exit when the
parent's pipe closes, also if the parent is killed).

Spawned workers re-import the main module: run scripts that create a loader under
``if __name__ == "__main__":``.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import time
import uuid
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from ..errors import SettingsError, WorkerDiedError
from ..ipc import send_error, unpack_exception
from .augment_params import AugmentConfig, deep_supervision_scales
from .batch import BatchArrays, BatchBuilder, BatchSpec, allocate_batch, check_source
from .dataset import CaseSource, source_from_json, source_to_json

if TYPE_CHECKING:  # pragma: no cover
    from ..plan.schema import ConfigurationPlan, Plans

__all__ = ["PatchLoader", "SHM_PREFIX"]

logger = logging.getLogger(__name__)

#: Name prefix of the loader's shared-memory blocks (``/dev/shm/nnfast_ld_<pid>_<random>`` on Linux).
SHM_PREFIX = "nnfast_ld_"
_POLL_S = 0.5            # how often a waiting parent re-checks worker exit codes (the sentinels wake it sooner)
_JOIN_S = 3.0            # grace period for workers to exit on close()
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

_LIVE: "weakref.WeakSet[PatchLoader]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - runs at interpreter exit
    for loader in list(_LIVE):
        try:
            loader.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------ worker
def _worker_main(conn, source_json: str, spec: BatchSpec, shm_name: str, slot_nbytes: int, n_slots: int,
                 base_seed: int) -> None:
    """Entry point of a spawned worker: attach the ring, then build the batches the parent asks for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    shm = None
    views: list[BatchArrays] = []
    try:
        import torch
        from multiprocessing import shared_memory

        torch.set_num_threads(1)
        source = source_from_json(source_json)
        builder = BatchBuilder(source, spec)
        shm = shared_memory.SharedMemory(name=shm_name)
        views = [allocate_batch(spec, shm.buf, s * slot_nbytes) for s in range(n_slots)]
    except BaseException as exc:
        send_error(conn, -1, exc)
        return
    try:
        conn.send(("ready", -1, None))
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if task is None:
                return
            index, slot = task
            try:
                _, keys = builder.build(base_seed, index, views[slot])
            except BaseException as exc:
                if not send_error(conn, index, exc):
                    return
                continue
            try:
                conn.send(("ok", index, keys))
            except (BrokenPipeError, EOFError, OSError):
                return
    finally:
        views.clear()
        source.close()
        if shm is not None:
            try:
                shm.close()
            except BufferError:  # pragma: no cover - a view still alive; the mapping goes with the process
                pass


class _Worker:
    __slots__ = ("proc", "conn", "pending", "ready")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.pending: list[int] = []
        self.ready = False


# ------------------------------------------------------------------------------------------------ loader
class PatchLoader:
    """Iterator of nnU-Net-format batches from a :class:`~nnfast.data.dataset.CaseSource`.

    Parameters
    ----------
    source : CaseSource
        The cases to sample from (e.g. one fold's training cases: ``source.subset(ids)``).
    config : ConfigurationPlan, optional
        A plan configuration: patch size, batch size, ``use_mask_for_norm`` and deep-supervision scales from it.
    plans, configuration : alternatively nnfast :class:`~nnfast.plan.schema.Plans` and a configuration name
        (``config = plans.configuration(configuration)``).
    patch_size, batch_size : explicit settings (override ``config``); ``patch_size`` has 2 or 3 axes.
    augment : AugmentConfig, optional
        Full augmentation settings (overrides what ``config``/``patch_size`` would give, e.g. an nnU-Net trainer's
        rotation and mirror axes).
    num_workers : int
        Worker processes; 0 builds batches in this process.
    base_seed : int, optional
        Seed of the batch stream (``SeedSequence([base_seed, i])`` per batch); random when None (see
        :attr:`base_seed`).
    train : bool
        Training (augmented, enlarged boxes) or validation batches.
    num_batches : int, optional
        Stop after this many batches (``StopIteration``); infinite when None, like nnU-Net's loaders.
    start_batch : int
        Index of the first batch (to resume a run).
    pin_memory : bool or "auto"
        Return tensors in pinned host memory; "auto" = when CUDA is available.
    deep_supervision_scales : "auto", None or sequence of per-axis scales
        "auto": from ``config``'s strides when a config is given, else none (or ``augment.ds_scales``).
    oversample_foreground_percent, probabilistic_oversampling, annotated_classes_key, use_mask_for_norm,
    clip_to_sampled_box : see :class:`~nnfast.data.batch.BatchSpec` / :class:`AugmentConfig`.
    num_cached : int, optional
        Shared-memory batch slots (batches in flight); default ``max(4, 2 * num_workers)``.
    cascade_labels : sequence of int, optional
        The cascade (``3d_cascade_fullres``): the foreground labels; ``source`` must read the previous stage
        (``previous_stage_folder``), whose segmentation becomes one input channel per label after the image.

    Raises
    ------
    ValueError
        Neither ``config`` nor ``patch_size``/``batch_size`` given, or bad settings.
    SettingsError
        ``/dev/shm`` has too little free space for the ring.
    WorkerDiedError
        From :meth:`__next__`, when a worker died.

    Examples
    --------
    >>> with PatchLoader(ZarrCaseSource(folder), config=plans.configuration("3d_fullres"),
    ...                  num_workers=8, base_seed=0) as loader:  # doctest: +SKIP
    ...     batch = next(loader)     # {'data': (2, 1, 56, 192, 192) float32, 'target': [...], 'keys': [...]}
    """

    def __init__(
        self,
        source: CaseSource,
        *,
        config: "ConfigurationPlan | None" = None,
        plans: "Plans | None" = None,
        configuration: str | None = None,
        patch_size: Sequence[int] | None = None,
        batch_size: int | None = None,
        augment: AugmentConfig | None = None,
        num_workers: int = 0,
        base_seed: int | None = None,
        train: bool = True,
        num_batches: int | None = None,
        start_batch: int = 0,
        pin_memory: bool | Literal["auto"] = "auto",
        deep_supervision_scales: Any = "auto",
        oversample_foreground_percent: float = 0.33,
        probabilistic_oversampling: bool = False,
        annotated_classes_key: tuple[int, ...] | None = None,
        use_mask_for_norm: Sequence[bool] | None = None,
        clip_to_sampled_box: bool = True,
        num_cached: int | None = None,
        cascade_labels: Sequence[int] | None = None,
    ):
        self._closed = True  # until the workers exist; close() is safe on a half-built loader
        self._released = False
        self._workers: list[_Worker] = []
        self._shm = None
        self._slots: list[BatchArrays] = []
        self.source = source
        if plans is not None:
            if config is not None or configuration is None:
                raise ValueError("PatchLoader: give either config= or plans= with configuration=")
            config = plans.configuration(configuration)
        self.spec = _make_spec(source, config, patch_size, batch_size, augment, train, deep_supervision_scales,
                               oversample_foreground_percent, probabilistic_oversampling, annotated_classes_key,
                               use_mask_for_norm, clip_to_sampled_box, cascade_labels)
        self.num_workers = int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"PatchLoader: num_workers must be >= 0, got {num_workers}")
        if num_batches is not None and int(num_batches) < 0:
            raise ValueError(f"PatchLoader: num_batches must be >= 0 or None, got {num_batches}")
        self.base_seed = int(np.random.SeedSequence().entropy % (2**63)) if base_seed is None else int(base_seed)
        self.start_batch = int(start_batch)
        self.num_batches = None if num_batches is None else int(num_batches)
        self._end = None if num_batches is None else self.start_batch + self.num_batches
        self._next = self.start_batch        # next batch index to deliver
        self._dispatched = self.start_batch  # next batch index to hand to a worker
        self._done: dict[int, list[str]] = {}
        self.pin_memory = _want_pin(pin_memory)
        self.num_cached = max(1, int(num_cached)) if num_cached is not None else max(4, 2 * self.num_workers)
        self._builder: BatchBuilder | None = None
        self._closed = False
        _LIVE.add(self)
        if self.num_workers == 0:
            self._builder = BatchBuilder(source, self.spec)
        else:
            try:
                self._start()
            except BaseException:
                self.close()
                raise
        logger.debug("PatchLoader: %s, %d workers, seed %d, %d slots of %d bytes", "train" if train else "val",
                     self.num_workers, self.base_seed, self.num_cached if self.num_workers else 0, self.spec.nbytes)

    # -- lifecycle ----------------------------------------------------------------------------------
    def _start(self) -> None:
        import multiprocessing as mp
        from multiprocessing import shared_memory

        from .. import native

        # compile (or load from Numba's cache) before the workers start, not in each of them; only what batches use
        native.warmup(("augment", "augment_intensity")
                      + (("morphology", "components") if self.spec.cascade_labels else ()))
        slot = self.spec.nbytes
        total = slot * self.num_cached
        _check_shm_space(total, self.num_cached)
        self._shm = shared_memory.SharedMemory(name=f"{SHM_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}",
                                               create=True, size=max(1, total))
        self._slots = [allocate_batch(self.spec, self._shm.buf, s * slot) for s in range(self.num_cached)]
        ctx = mp.get_context("spawn")
        source_json = source_to_json(self.source)
        saved = {k: os.environ.get(k) for k in _THREAD_ENV}
        try:  # one thread per worker (BLAS/OpenMP/Numba read these at import in the child)
            for k in _THREAD_ENV:
                os.environ[k] = "1"
            for _ in range(self.num_workers):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_worker_main, name="nnfast-loader",
                                   args=(child, source_json, self.spec, self._shm.name, slot, self.num_cached,
                                         self.base_seed), daemon=True)
                proc.start()
                child.close()
                self._workers.append(_Worker(proc, parent))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._dispatch()

    def close(self) -> None:
        """Stop the workers and release the shared memory. Idempotent; the loader cannot be used afterwards."""
        if getattr(self, "_released", True):
            return
        self._released = True
        self._closed = True
        workers, self._workers = self._workers, []
        try:
            _stop_workers(workers)
        finally:  # also when a second Ctrl-C interrupts the joins: never leave the shared memory behind
            for w in workers:
                w.conn.close()
            self._slots = []
            shm, self._shm = self._shm, None
            if shm is not None:
                try:
                    shm.close()
                except BufferError:  # a view is still referenced somewhere; unlinking still frees the name
                    logger.debug("PatchLoader.close: shared memory still has exported views")
                try:
                    shm.unlink()
                except FileNotFoundError:
                    pass
            self._builder = None
            try:
                self.source.close()
            except Exception:  # pragma: no cover
                pass
            _LIVE.discard(self)

    def __enter__(self) -> "PatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"PatchLoader({'train' if self.spec.train else 'val'}, patch {self.spec.patch_size}, batch "
                f"{self.spec.batch_size}, {self.num_workers} workers, seed {self.base_seed}, next {self._next})")

    # -- iteration ----------------------------------------------------------------------------------
    def __iter__(self) -> "PatchLoader":
        return self

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("PatchLoader: an infinite loader (num_batches=None) has no length")
        return self.num_batches

    @property
    def next_batch_index(self) -> int:
        """Index of the batch the next ``next()`` returns."""
        return self._next

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    @property
    def shm_name(self) -> str | None:
        """Name of the shared-memory block (None without workers or after close)."""
        return None if self._shm is None else self._shm.name

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("PatchLoader: next() on a closed loader")
        if self._end is not None and self._next >= self._end:
            raise StopIteration
        index = self._next
        try:
            if self._builder is not None:
                batch = self._build_local(index)
            else:
                keys = self._wait_for(index)
                batch = self._to_torch(self._slots[index % self.num_cached], keys)
                self._dispatch(freed=1)
        except BaseException:
            self.close()
            raise
        self._next = index + 1
        return batch

    def _build_local(self, index: int) -> dict:
        import torch

        spec = self.spec
        data = torch.empty(spec.data_shape, dtype=torch.float32, pin_memory=self.pin_memory)
        targets = [torch.empty(s, dtype=torch.int16, pin_memory=self.pin_memory) for s in spec.target_shapes]
        arrays = BatchArrays(data.numpy(), [t.numpy() for t in targets])
        _, keys = self._builder.build(self.base_seed, index, arrays)
        return _batch_dict(data, targets, keys, spec)

    def _to_torch(self, slot: BatchArrays, keys: list[str]) -> dict:
        import torch

        if self.pin_memory:
            data = torch.empty(slot.data.shape, dtype=torch.float32, pin_memory=True)
            np.copyto(data.numpy(), slot.data)
            targets = []
            for t in slot.targets:
                tt = torch.empty(t.shape, dtype=torch.int16, pin_memory=True)
                np.copyto(tt.numpy(), t)
                targets.append(tt)
        else:
            data = torch.from_numpy(slot.data.copy())
            targets = [torch.from_numpy(t.copy()) for t in slot.targets]
        return _batch_dict(data, targets, keys, self.spec)

    def _dispatch(self, freed: int = 0) -> None:
        """Hand out batches until ``num_cached`` are in flight (the slot of batch ``i`` is ``i % num_cached``)."""
        limit = self._next + freed + self.num_cached
        if self._end is not None:
            limit = min(limit, self._end)
        while self._dispatched < limit:
            w = min(self._workers, key=lambda w: len(w.pending))
            i = self._dispatched
            try:
                w.conn.send((i, i % self.num_cached))
            except (BrokenPipeError, ConnectionResetError, EOFError):
                w.proc.join(_POLL_S)
                raise self._died(w) from None
            w.pending.append(i)
            self._dispatched += 1

    def _wait_for(self, index: int) -> list[str]:
        from multiprocessing.connection import wait

        while index not in self._done:
            conns = {w.conn: w for w in self._workers}
            sentinels = {w.proc.sentinel: w for w in self._workers}
            ready = wait([*conns, *sentinels], timeout=_POLL_S)
            for obj in ready:
                if obj in conns:
                    self._receive(conns[obj])
            for w in self._workers:  # exit codes, also when a pipe message and the death arrive together
                if w.proc.exitcode is not None and index not in self._done:
                    while w.conn.poll():  # drain what it sent before dying (it may be an error report)
                        self._receive(w)
                    if index not in self._done:
                        raise self._died(w)
        return self._done.pop(index)

    def _receive(self, w: _Worker) -> None:
        try:
            kind, index, payload = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(_POLL_S * 2)
            raise self._died(w) from None
        if kind == "ready":
            w.ready = True
        elif kind == "ok":
            w.pending.remove(index)
            self._done[index] = list(payload)
        else:
            raise _remote_error(index, payload, w)

    def _died(self, w: _Worker) -> WorkerDiedError:
        code = w.proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}" if code is not None else "closed its pipe"
        what = f"while building batch {w.pending[0]}" if w.pending else "between batches"
        if not w.ready:
            what = "while starting (importing nnfast/torch or opening the data; its output above says why)"
        hint = ""
        if code == -signal.SIGKILL:
            hint = (" (SIGKILL usually means the out-of-memory killer stopped it: use fewer loader workers or a "
                    "smaller num_cached)")
        elif code == -getattr(signal, "SIGBUS", 7):
            hint = (f" (SIGBUS usually means /dev/shm is full: this loader needs "
                    f"{self.spec.nbytes * self.num_cached / 2**20:.0f} MiB there; enlarge it, e.g. docker "
                    f"--shm-size, or lower num_cached)")
        elif code == -getattr(signal, "SIGSEGV", 11):
            hint = " (a crash in native code, or a corrupt input file)"
        err = WorkerDiedError(f"loader worker process {w.proc.pid} {how}{hint} {what}")
        err.exitcode = code
        return err


# ------------------------------------------------------------------------------------------------ helpers
def _stop_workers(workers: list[_Worker]) -> None:
    """Ask politely (``None``), then SIGTERM, then SIGKILL; join and release every worker."""
    for w in workers:
        try:
            while not w.ready and w.conn.poll():  # did it finish starting?
                w.ready = w.conn.recv()[0] == "ready" or w.ready
            w.conn.send(None)
        except (BrokenPipeError, EOFError, OSError, ValueError):
            pass
        if not w.ready:  # still importing: nobody reads the pipe yet, no point in waiting
            w.proc.terminate()
    deadline = time.monotonic() + _JOIN_S
    for w in workers:
        w.proc.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.proc.is_alive():
            w.proc.terminate()
    deadline = time.monotonic() + _JOIN_S
    for w in workers:
        w.proc.join(max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.proc.close()


def _batch_dict(data, targets, keys, spec: BatchSpec) -> dict:
    return {"data": data, "target": targets if spec.augment.ds_scales is not None else targets[0], "keys": keys}


def _remote_error(index: int, payload, w: _Worker) -> BaseException:
    where = f"in loader worker {w.proc.pid}" + (f" building batch {index}" if index >= 0 else " while starting")
    exc = unpack_exception(payload)
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} [{where}]",) + exc.args[1:]
    else:
        try:
            exc.add_note(where)
        except AttributeError:  # pragma: no cover - Python 3.10
            pass
    return exc


def _want_pin(pin_memory) -> bool:
    if pin_memory == "auto":
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # pragma: no cover
            return False
    return bool(pin_memory)


def _check_shm_space(total: int, n_slots: int) -> None:
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # no /dev/shm (macOS, Windows): nothing to check
        return
    free = st.f_bavail * st.f_frsize
    if total > free:
        raise SettingsError(f"the loader's shared-memory ring needs {total / 2**20:.0f} MiB ({n_slots} batch slots) "
                            f"but /dev/shm has {free / 2**20:.0f} MiB free; pass a smaller num_cached, use fewer "
                            f"workers, or enlarge /dev/shm (docker: --shm-size)")


def _make_spec(source, config, patch_size, batch_size, augment, train, ds, oversample, probabilistic,
               annotated_key, use_mask_for_norm, clip, cascade_labels) -> BatchSpec:
    if batch_size is None:
        if config is None:
            raise ValueError("PatchLoader: give a plan configuration (config=) or batch_size and patch_size")
        batch_size = config.batch_size
    umn = use_mask_for_norm
    if umn is None and config is not None:
        umn = config.use_mask_for_norm
    if augment is None:
        if patch_size is None:
            if config is None:
                raise ValueError("PatchLoader: give a plan configuration (config=), patch_size or augment")
            patch_size = config.patch_size
        augment = AugmentConfig.from_patch_size(patch_size, use_mask_for_norm=umn or ())
        if isinstance(ds, str) and ds == "auto" and config is not None:
            ds = deep_supervision_scales(config.architecture.strides)
    elif patch_size is not None and tuple(int(p) for p in patch_size) != tuple(augment.patch_size):
        raise ValueError(f"PatchLoader: patch_size {tuple(patch_size)} differs from augment.patch_size "
                         f"{augment.patch_size}")
    if not (isinstance(ds, str) and ds == "auto"):
        augment = replace(augment, ds_scales=None if ds is None else tuple(tuple(float(v) for v in s) for s in ds))
    if use_mask_for_norm is not None:
        augment = replace(augment, use_mask_for_norm=tuple(bool(b) for b in use_mask_for_norm))
    spec = BatchSpec(augment=augment, batch_size=int(batch_size), num_channels=int(source.num_channels),
                     train=bool(train), oversample_foreground_percent=float(oversample),
                     probabilistic_oversampling=bool(probabilistic), annotated_classes_key=annotated_key,
                     clip_to_sampled_box=bool(clip), cascade_labels=tuple(cascade_labels) if cascade_labels else None)
    check_source(source, spec)  # here too: with workers, the builders are made in the workers
    return spec
