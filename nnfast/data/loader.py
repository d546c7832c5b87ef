"""A multiprocess patch loader: nnU-Net v2's batches, built by worker processes into shared memory.

:class:`PatchLoader` is an iterator of batches in nnU-Net's format (``{'data', 'target', 'keys'}``, see
:mod:`nnfast.data.batch`) that a trainer consumes with ``next(loader)``. Batch ``i`` is a pure function of
``(base_seed, i)``, so the stream of batches is the same with 0, 1 or N workers and can resume at any index.

How the work is spread (compare nnU-Net's ``NonDetMultiThreadedAugmenter``):

* ``num_workers=0`` builds every batch in the calling process (debugging, tiny data).
* With ``N`` workers, ``N`` *spawned* processes each own a :class:`~nnfast.data.batch.BatchBuilder`. One
  ``multiprocessing.shared_memory`` block holds a ring of ``num_cached`` batch slots; batch ``i`` is written
  into slot ``i % num_cached`` by whichever worker gets it. Only tiny control messages travel over one pipe
  per worker (``(i, slot)`` to the worker, ``("ok", i, keys, peak_rss)`` back): no array is pickled. The case source
  reaches each worker as JSON (:func:`~nnfast.data.dataset.source_to_json`: folder and case ids).
* At most ``num_cached`` batches are in flight; each new one goes to the worker with the fewest outstanding
  batches. Batches are delivered in index order: ``next()`` waits for batch ``i`` even if ``i + 1`` is ready.
* The workers start (spawn) at construction; :meth:`PatchLoader.wait_ready` waits until they are up and the next
  batch is built, which trainers call before their first epoch (nnU-Net's ``get_dataloaders`` draws a batch there).
* ``next()`` copies the slot into fresh tensors (pinned host memory when CUDA is present, so that
  ``.to(device, non_blocking=True)`` overlaps) before the slot is reused.

Workers, pipes, thread counts, death diagnosis and stopping are the worker core's (:mod:`nnfast.workers`, shared
with :func:`nnfast.parallel.run_tasks`): the parent waits on the workers' pipes and process sentinels together, so a
worker that dies (the out-of-memory killer's SIGKILL, a segfault, SIGBUS from a full ``/dev/shm``) raises
:class:`~nnfast.errors.WorkerDiedError` naming the signal and the batch at once, and an exception inside a worker is
re-raised in the parent with its type and the worker's traceback. Each worker runs one thread (Numba, BLAS, torch),
set in the worker at start-up. ``close()`` (also the context manager, ``__del__`` and an ``atexit`` hook) stops the
workers and unlinks the shared memory; Ctrl-C in ``next()`` closes the loader and re-raises ``KeyboardInterrupt``
(workers ignore SIGINT and exit when the parent's pipe closes, also if the parent is killed).

What stays here and not in the core is the loader's scheduling, because the task pool has none of it: the ring of
shared-memory slots (batch ``i`` in slot ``i % num_cached``, so a slot is reused only after its batch was copied out),
up to ``num_cached`` batches in flight spread over the workers, and delivery in index order. ``run_tasks`` instead
hands one task at a time to a worker and returns each result pickled through its pipe, which for batches is also too
slow: a 16 MiB batch (``(2, 1, 128, 128, 128)`` float32) took 144-156 ms through a spawn pipe and 4 ms to copy out of
the shared-memory slot (measured 2026-12-06 on the 2-core development machine, two runs).

Spawned workers re-import the main module: run scripts that create a loader under
``if __name__ == "__main__":``.
"""
from __future__ import annotations

import atexit
import logging
import sys
import time
import weakref
from typing import TYPE_CHECKING, Callable, Literal, cast

import numpy as np

from ..errors import ClosedError, SettingsError, InputTypeError, WorkerDiedError
from ..ipc import unpack_exception
from ..native._jit import LOADER_WORKER_THREADS
from ..workers import (Worker, create_shared_block, died_error, release_shared_block, start_workers, stop_workers,
                       wait)
from .batch import BatchArrays, BatchBuilder, BatchSpec, allocate_batch, check_source
from .dataset import CaseSource, source_from_json, source_to_json

if TYPE_CHECKING:
    from multiprocessing.shared_memory import SharedMemory

__all__ = ["PatchLoader", "SHM_PREFIX"]

logger = logging.getLogger(__name__)

#: Name prefix of the loader's shared-memory blocks (``/dev/shm/nnfast_ld_<pid>_<random>`` on Linux).
SHM_PREFIX = "nnfast_ld_"
_POLL_S = 0.5            # how often a waiting parent re-checks worker exit codes (the sentinels wake it sooner)
_JOIN_S = 3.0            # grace period for workers to exit on close()

_LIVE: "weakref.WeakSet[PatchLoader]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - runs at interpreter exit
    for loader in list(_LIVE):
        try:
            loader.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------ worker
class _BatchWorker:
    """A loader worker's set-up and task handler (:func:`nnfast.workers.start_workers`): attach the ring, then build
    batch ``index`` into slot ``slot`` for each ``(index, slot)`` task; the reply is the batch's case ids."""

    __name__ = "build batch"

    def __init__(self, source_json: str, spec: BatchSpec, shm_name: str, slot_nbytes: int, n_slots: int,
                 base_seed: int) -> None:
        from multiprocessing import shared_memory

        self.shm = None
        self.views: list[BatchArrays] = []
        self.source = source_from_json(source_json)
        try:
            self.builder = BatchBuilder(self.source, spec)
            self.shm = shared_memory.SharedMemory(name=shm_name)
            self.views = [allocate_batch(spec, self.shm.buf, s * slot_nbytes) for s in range(n_slots)]
        except BaseException:
            self.close()
            raise
        self.base_seed = base_seed

    def __call__(self, index: int, slot: int) -> list[str]:
        return self.builder.build(self.base_seed, index, self.views[slot])[1]

    def close(self) -> None:
        self.views.clear()
        self.source.close()
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:  # pragma: no cover - a view still alive; the mapping goes with the process
                pass


# ------------------------------------------------------------------------------------------------ loader
class PatchLoader:
    """Iterator of nnU-Net-format batches from a :class:`~nnfast.data.dataset.CaseSource`.

    Parameters
    ----------
    source : CaseSource
        The cases to sample from (e.g. one fold's training cases: ``source.subset(ids)``).
    spec : BatchSpec
        What a batch is: patch and batch size, augmentation, deep-supervision scales, oversampling, the cascade's
        labels. From a plan: ``BatchSpec.from_plan(plans, "3d_fullres", train=True)``; without one:
        ``BatchSpec.from_patch_size(patch_size, batch_size, num_channels=...)``; its ``num_channels`` must be the
        source's.
    num_workers : int
        Worker processes; 0 builds batches in this process.
    base_seed : int, optional
        Seed of the batch stream (``SeedSequence([base_seed, i])`` per batch); random when None (see
        :attr:`base_seed`).
    num_batches : int, optional
        Stop after this many batches (``StopIteration``); infinite when None, like nnU-Net's loaders.
    start_batch : int
        Index of the first batch (to resume a run).
    pin_memory : bool or "auto"
        Return tensors in pinned host memory; "auto" = when CUDA is available.
    num_cached : int, optional
        Shared-memory batch slots (batches in flight); default ``max(4, 2 * num_workers)``.

    Raises
    ------
    SettingsError
        ``spec`` is not a :class:`BatchSpec` or does not fit ``source``, bad runtime options, or ``/dev/shm`` has
        too little free space for the ring (all ``ValueError``).
    WorkerDiedError
        From :meth:`__next__`, when a worker died.

    Examples
    --------
    >>> spec = BatchSpec.from_plan(plans, "3d_fullres")                         # doctest: +SKIP
    >>> with PatchLoader(ZarrCaseSource(folder), spec, num_workers=8, base_seed=0) as loader:  # doctest: +SKIP
    ...     batch = next(loader)     # {'data': (2, 1, 56, 192, 192) float32, 'target': [...], 'keys': [...]}
    """

    def __init__(
        self,
        source: CaseSource,
        spec: BatchSpec,
        *,
        num_workers: int = 0,
        base_seed: int | None = None,
        num_batches: int | None = None,
        start_batch: int = 0,
        pin_memory: bool | Literal["auto"] = "auto",
        num_cached: int | None = None,
    ):
        self._closed = True  # until the workers exist; close() is safe on a half-built loader
        self._released = False
        self._workers: list[Worker] = []
        self._shm: SharedMemory | None = None
        self._slots: list[BatchArrays] = []
        self.source = source
        self.spec = _checked_spec(source, spec)
        self.num_workers = int(num_workers)
        if self.num_workers < 0:
            raise SettingsError(f"PatchLoader: num_workers must be >= 0, got {num_workers}")
        if num_batches is not None and int(num_batches) < 0:
            raise SettingsError(f"PatchLoader: num_batches must be >= 0 or None, got {num_batches}")
        # a SeedSequence made without entropy draws an int (NumPy's stubs allow a sequence or None: given entropy)
        self.base_seed = (int(cast(int, np.random.SeedSequence().entropy) % (2**63)) if base_seed is None
                          else int(base_seed))
        self.start_batch = int(start_batch)
        self.num_batches = None if num_batches is None else int(num_batches)
        self._end = None if self.num_batches is None else self.start_batch + self.num_batches
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
        logger.debug("PatchLoader: %s, %d workers, seed %d, %d slots of %d bytes",
                     "train" if self.spec.train else "val", self.num_workers, self.base_seed,
                     self.num_cached if self.num_workers else 0, self.spec.nbytes)

    # -- lifecycle ----------------------------------------------------------------------------------
    def _start(self) -> None:
        from .. import native

        # compile (or load from Numba's cache) before the workers start, not in each of them; only what batches use
        native.warmup(("augment", "augment_intensity", "ds_targets")
                      + (("morphology", "components") if self.spec.cascade_labels else ()))
        slot = self.spec.nbytes
        self._shm = create_shared_block(
            SHM_PREFIX, slot * self.num_cached, f"the loader's ring of {self.num_cached} batch slots",
            "pass a smaller num_cached, use fewer workers")
        self._slots = [allocate_batch(self.spec, self._shm.buf, s * slot) for s in range(self.num_cached)]
        args = (source_to_json(self.source), self.spec, self._shm.name, slot, self.num_cached, self.base_seed)
        self._workers = start_workers(self.num_workers, _BatchWorker, args, threads=LOADER_WORKER_THREADS,
                                      name="nnfast-loader")
        self._dispatch()

    def close(self) -> None:
        """Stop the workers and release the shared memory. Idempotent; the loader cannot be used afterwards."""
        if getattr(self, "_released", True):
            return
        self._released = True
        self._closed = True
        workers, self._workers = self._workers, []
        try:
            stop_workers(workers, graceful=True, join_s=_JOIN_S)
        finally:  # also when a second Ctrl-C interrupts the joins: never leave the shared memory behind
            self._slots = []
            shm, self._shm = self._shm, None
            release_shared_block(shm)
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
            raise InputTypeError("PatchLoader: an infinite loader (num_batches=None) has no length")
        return self.num_batches

    @property
    def next_batch_index(self) -> int:
        """Index of the batch the next ``next()`` returns."""
        return self._next

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    @property
    def shm_name(self) -> str | None:
        """Name of the shared-memory block (None without workers or after close)."""
        return None if self._shm is None else self._shm.name

    @property
    def workers_ready(self) -> bool:
        """Every worker has started (imports done, data opened) and said so; True without workers."""
        return all(w.ready for w in self._workers)

    @property
    def batches_ready(self) -> int:
        """Batches built by the workers and not delivered yet (received messages only: no waiting)."""
        return len(self._done)

    def wait_ready(self) -> float:
        """Block until every worker has started and the next batch is built; returns the seconds waited.

        Spawned workers need seconds to start (import torch and nnfast, load the Numba kernels from the cache; a
        minute on a loaded machine). nnU-Net's trainer pays its loaders' start-up in ``on_train_start`` (its
        ``get_dataloaders`` draws a first batch from each); calling this there (the nnU-Net adapter) or before
        the first epoch (``nnfast train``) does the same, so the start-up is not counted in the first epoch's
        loader wait. Unlike nnU-Net no batch is consumed: the stream stays ``(base_seed, i)``. Returns at once
        without workers or when the loader is exhausted. A worker that dies or fails to start raises (as in
        ``next()``) and closes the loader.
        """
        if self._closed:
            raise ClosedError("PatchLoader: wait_ready() on a closed loader; create a new one")
        t0 = time.perf_counter()
        if self._builder is not None or (self._end is not None and self._next >= self._end):
            return 0.0
        index = self._next
        try:
            self._pump(lambda: index in self._done and self.workers_ready)
        except BaseException:
            self.close()
            raise
        return time.perf_counter() - t0

    def __next__(self) -> dict:
        if self._closed:
            raise ClosedError("PatchLoader: next() on a closed loader; create a new one (start_batch= resumes)")
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
        assert self._builder is not None  # __next__ builds locally only when the loader has a builder
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
            w = min(self._workers, key=lambda w: len(w.tasks))
            i = self._dispatched
            if not w.send((i, i % self.num_cached)):
                w.proc.join(_POLL_S)
                raise self._died(w)
            w.tasks.append(i)
            self._dispatched += 1

    def _wait_for(self, index: int) -> list[str]:
        self._pump(lambda: index in self._done)
        return self._done.pop(index)

    def _pump(self, done: Callable[[], bool]) -> None:
        """Receive the workers' messages until ``done()``; a worker that dies first raises."""
        while not done():
            ready = wait(self._workers, timeout=_POLL_S)
            for w in self._workers:
                if w.conn in ready:
                    self._receive(w)
            for w in self._workers:  # exit codes, also when a pipe message and the death arrive together
                if w.proc.exitcode is not None and not done():
                    while w.conn.poll():  # drain what it sent before dying (it may be an error report)
                        self._receive(w)
                    if not done():
                        raise self._died(w)

    def _receive(self, w: Worker) -> None:
        msg = w.recv()
        if msg is None:
            w.proc.join(_POLL_S * 2)
            raise self._died(w)
        kind, index, payload, _ = msg
        if kind == "ready":
            w.ready = True
        elif kind == "ok":
            w.tasks.remove(index)
            self._done[index] = list(payload)
        else:
            raise _remote_error(index, payload, w)

    def _died(self, w: Worker) -> WorkerDiedError:
        if not w.ready:
            doing = "while starting (importing nnfast/torch or opening the data; its output above says why)"
        else:
            doing = f"while building batch {w.tasks[0]}" if w.tasks else "between batches"
        advice = (f"use fewer loader workers (num_workers={max(1, self.num_workers - 1)} or less) or a smaller "
                  f"num_cached (now {self.num_cached})")
        return died_error(w, role="loader worker process", doing=doing, advice=advice,
                          shm_bytes=self.spec.nbytes * self.num_cached)


# ------------------------------------------------------------------------------------------------ helpers
def _checked_spec(source: CaseSource, spec: BatchSpec) -> BatchSpec:
    """``spec`` if it is a :class:`BatchSpec` that ``source`` can fill (checked here too: with workers, the builders
    are made in the workers)."""
    if not isinstance(spec, BatchSpec):
        raise SettingsError(f"PatchLoader: spec must be a BatchSpec, got {type(spec).__name__}; build it from a plan "
                            "configuration with BatchSpec.from_plan(plans, configuration) or with "
                            "BatchSpec.from_patch_size(patch_size, batch_size, num_channels=...)")
    if int(spec.num_channels) != int(source.num_channels):
        raise SettingsError(f"PatchLoader: the spec's num_channels ({spec.num_channels}) differs from the "
                            f"{source.num_channels} image channel(s) of {source!r}; build the spec with "
                            "num_channels=source.num_channels")
    check_source(source, spec)
    return spec


def _batch_dict(data, targets, keys, spec: BatchSpec) -> dict:
    return {"data": data, "target": targets if spec.augment.ds_scales is not None else targets[0], "keys": keys}


def _remote_error(index: int, payload, w: Worker) -> BaseException:
    where = f"in loader worker {w.pid}" + (f" building batch {index}" if index >= 0 else " while starting")
    exc = unpack_exception(payload)
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} [{where}]",) + exc.args[1:]
    elif sys.version_info >= (3, 11):  # BaseException.add_note is new in 3.11; 3.10 gets no note
        exc.add_note(where)
    return exc


def _want_pin(pin_memory) -> bool:
    if pin_memory == "auto":
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # pragma: no cover
            return False
    return bool(pin_memory)
