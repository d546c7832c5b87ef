"""JIT and thread policy for nnfast (the one place that decides them).

Rules (they avoid Numba's known pitfalls: cache keys that ignore ``parallel=``, lazy compiles inside workers,
oversubscribed threads):

* :func:`serial` kernels are compiled with ``cache=True`` and ``nogil=True``. Every kernel is serial: processes
  (the worker pools of :mod:`nnfast.workers`) and, for GIL-free kernels, threads are the unit of parallelism. A
  ``parallel=True`` kernel, if one is ever needed, gets its own decorator here and is never cached (Numba's cache key
  ignores ``parallel=``), and writes per-thread buffers instead of racing on a shared output.
* Both cores on one case: a kernel whose work splits into independent slabs (rows of the output, x-slabs of a volume)
  runs the same cached serial kernel on slabs from threads (:func:`run_slabs`; the kernels release the GIL). No
  ``parallel=True`` variant is compiled: the slab results are those of the serial kernel bit for bit, and a cold
  start compiles nothing more. :func:`kernel_threads` decides how many: Numba's thread count (a pool's worker has 1,
  :func:`limit_threads`; a process on its own has its cores: ``--workers 1``, prediction, export), and 1 on any
  thread but the main one (a thread pool already shares the cores).
* ``fastmath`` stays off everywhere: parity with nnU-Net's float arithmetic matters more than the last
  few percent.
* Threads: :func:`threads_per_worker` is the single place where ``workers x threads <= cores`` is decided, for both
  worker pools (:func:`nnfast.parallel.run_tasks` and :class:`nnfast.data.loader.PatchLoader`). A worker process
  gets its count at start-up (:mod:`nnfast.workers` sets :data:`THREAD_ENV` before NumPy/Numba/torch load, then calls
  :func:`limit_threads`); the parent's environment is never changed.
* Modules register warm-up callables with :func:`register_warmup`; :func:`warmup` compiles the signatures the
  pipeline uses (only those: a signature costs ~0.3-2.5 s to compile, the cold start's whole cost; any other
  compiles on first use), so the parent compiles (or loads from cache) before workers start and no worker stalls on
  a lazy compile mid-run. :func:`warmup_shared` splits that compile between the processes of a pool instead: they
  start together, each compiles the modules no other has claimed (a lock file per module) and loads the rest from
  the cache the others wrote, so a cold start compiles on every core and a warm one only loads.
  :func:`warm_in_background` starts that compile in a spawned process early (``nnfast preprocess`` does during
  verification and fingerprinting); it compiles only when the cache is not known to be warm (:func:`is_warm`: a
  stamp per module beside Numba's cache files, written after its warm-up). The pool's workers share its lock folder
  (:func:`warmup_lock_dir`), so they wait for what it is compiling and load it. All of this is the fallback: the
  install compiles every module's warm-up into the cache already (:mod:`nnfast.native.precompile`, run by
  ``setup.py``), and then a first run only loads.

Numba is imported when a kernel is defined or a thread limit applied, not when this module is imported, so that a
worker can set :data:`THREAD_ENV` first.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

__all__ = ["serial", "run_slabs", "kernel_threads", "slab_threads", "register_warmup", "warmup", "warmup_shared", "warmup_lock_dir", "warm_in_background",
           "finish_background", "share_background",
           "is_warm", "available_cores", "threads_per_worker", "limit_threads",
           "THREAD_ENV", "LOADER_WORKER_THREADS"]

_SERIAL_FLAGS = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")

#: Thread-count variables a worker process sets before importing the libraries that read them once: BLAS/OpenMP
#: (NumPy, SciPy, torch's intra-op pool), Numba, SimpleITK (ITK) and Blosc.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMBA_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "BLOSC_NTHREADS")

_WARMUPS: list[Callable[[], None]] = []


def serial(func):
    """Compile ``func`` as a cached, serial, GIL-free kernel."""
    import numba

    return numba.njit(**_SERIAL_FLAGS)(func)


#: Fewest work items (voxels, output samples) per slab thread: below it, a thread's start-up costs more than it saves.
MIN_ITEMS_PER_THREAD = 1 << 16

_EXECUTORS: dict = {}
_OVERRIDE: "list[tuple[int, int]]" = []


def kernel_threads() -> int:
    """Threads one kernel call may use in this thread (see the module docstring)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return 1
    if _OVERRIDE:
        return _OVERRIDE[-1][0]
    if "numba" not in sys.modules:
        return 1
    return max(1, min(sys.modules["numba"].get_num_threads(), available_cores()))


class slab_threads:
    """``with slab_threads(n, min_items=...):`` kernels called from the main thread use ``n`` slab threads (and
    slabs of at least ``min_items``, default :data:`MIN_ITEMS_PER_THREAD`): for tests and benchmarks."""

    def __init__(self, threads: int, min_items: "int | None" = None):
        self.value = (max(1, int(threads)), MIN_ITEMS_PER_THREAD if min_items is None else max(1, int(min_items)))

    def __enter__(self):
        _OVERRIDE.append(self.value)
        return self

    def __exit__(self, *exc):
        _OVERRIDE.remove(self.value)


def run_slabs(func: Callable[[int, int], None], n: int, *, items: int = 0, threads: "int | None" = None) -> None:
    """Call ``func(start, stop)`` on contiguous slabs covering ``range(n)``: one call when there is one thread, else
    one slab per thread, run concurrently (``func`` must write disjoint outputs per slab and release the GIL).

    ``items`` (default ``n``): the work of all of ``range(n)``, so that each thread gets at least
    :data:`MIN_ITEMS_PER_THREAD`. ``threads`` defaults to :func:`kernel_threads`.
    """
    t = kernel_threads() if threads is None else max(1, int(threads))
    min_items = _OVERRIDE[-1][1] if _OVERRIDE else MIN_ITEMS_PER_THREAD
    t = min(t, n, max(1, (items or n) // min_items))
    if t <= 1:
        if n > 0:
            func(0, n)
        return
    ex = _EXECUTORS.get(t)
    if ex is None:
        from concurrent.futures import ThreadPoolExecutor

        ex = _EXECUTORS[t] = ThreadPoolExecutor(t - 1, thread_name_prefix="nnfast-slab")
    bounds = [n * i // t for i in range(t + 1)]
    futures = [ex.submit(func, bounds[i], bounds[i + 1]) for i in range(1, t)]
    func(bounds[0], bounds[1])  # this thread does the first slab
    for f in futures:
        f.result()


def register_warmup(func: Callable[[], None]) -> Callable[[], None]:
    """Register a zero-argument callable that calls kernels on tiny inputs of every used signature."""
    _WARMUPS.append(func)
    return func


def warmup(modules: "tuple[str, ...] | None" = None) -> None:
    """Compile (or load from the on-disk cache) every registered kernel signature.

    ``modules`` limits this to the named kernel modules (e.g. ``("crop", "resample")``): loading every kernel costs
    ~1.4 s even from the cache, which a command that uses a few of them should not pay.
    """
    import importlib

    if modules is None:
        from . import kernels_index  # noqa: F401  (imports every kernel module, registering its warm-up)
    else:
        for name in modules:
            importlib.import_module(f"{__package__}.{name}")
    for func in list(_WARMUPS):
        if modules is None or func.__module__.rsplit(".", 1)[-1] in modules:
            func()
    for name in modules or ():
        _mark_warm(name)


_LOCK_DIR: "str | None" = None


def warmup_lock_dir() -> str:
    """The folder of this process's warm-up locks (:func:`warmup_shared`), shared by its pools and its background
    compile; created on first use, removed when the process exits."""
    global _LOCK_DIR
    if _LOCK_DIR is None:
        import atexit
        import shutil
        import tempfile

        _LOCK_DIR = tempfile.mkdtemp(prefix="nnfast-warmup-")
        atexit.register(shutil.rmtree, _LOCK_DIR, True)
    return _LOCK_DIR


def _stamp(name: str) -> "tuple[str, str] | None":
    """(path, content) of the stamp that says kernel module ``name``'s warm-up is in Numba's cache; ``None`` when
    its kernels are not cached (``NUMBA_DISABLE_JIT``, no writable cache folder).

    The content names the numba version, the CPU and a hash of the module's source, as Numba's cache index does
    (numba >= 0.68 stamps sources by content, numba PR #10659), not its mtime: a cache compiled into a wheel at build time, or into a
    copy of the tree, stays warm once the files are installed or copied with new mtimes."""
    import importlib

    try:
        mod = importlib.import_module(f"{__package__}.{name}")
        cache_dir = next(obj._cache._cache_path for obj in vars(mod).values()
                         if getattr(getattr(obj, "_cache", None), "_cache_path", None))
        import hashlib

        import llvmlite.binding
        import numba

        with open(mod.__file__, "rb") as f:
            source = hashlib.sha256(f.read()).hexdigest()
        cpu = numba.config.CPU_NAME or llvmlite.binding.get_host_cpu_name()
        return (os.path.join(cache_dir, f"nnfast-warm-{name}.stamp"),
                f"numba {numba.__version__} cpu {cpu} source {source}\n")
    except Exception:
        return None


def _mark_warm(name: str) -> None:
    stamp = _stamp(name)
    if stamp is not None:
        try:
            with open(stamp[0], "w") as f:
                f.write(stamp[1])
        except OSError:
            pass


def is_warm(modules: "tuple[str, ...]") -> bool:
    """Whether the warm-ups of ``modules`` have run against Numba's current cache (this numba, these sources).

    A heuristic for skipping work, never for correctness: a kernel missing from the cache compiles on first use."""
    for name in modules:
        stamp = _stamp(name)
        try:
            if stamp is None or open(stamp[0]).read() != stamp[1]:
                return False
        except OSError:
            return False
    return True


def _compile_unless_warm(modules: "tuple[str, ...]", lock_dir: str) -> None:
    import numba

    if not numba.config.DISABLE_JIT and not is_warm(modules):
        warmup_shared(modules, 0, 1, lock_dir)


_BACKGROUND_RUNNING: dict = {}
_BACKGROUND = ("import sys; from nnfast.native._jit import _compile_unless_warm; "
               "_compile_unless_warm(tuple(sys.argv[2].split(',')), sys.argv[1])")


def warm_in_background(modules: "tuple[str, ...]"):
    """Start a process that compiles ``modules`` into Numba's cache unless :func:`is_warm` (through
    :func:`warmup_shared` and :func:`warmup_lock_dir`, so that pools started later wait for what it compiles).

    The check runs in that process too: this one imports neither Numba nor the kernels (a warm run pays one
    short-lived interpreter on another core). It is a plain ``python -c`` subprocess, not a pool worker; its output
    goes to a log file in :func:`warmup_lock_dir` (``proc.nnfast_log``), which :func:`finish_background` turns into
    a one-line warning, and keeps, when the process failed (whatever it failed to compile, the pool compiles).
    Returns the ``subprocess.Popen``: hand it to :func:`finish_background` when the work that needs the kernels is
    done; this process's exit terminates it otherwise. While one for the same modules still runs, that one is
    returned."""
    import atexit
    import subprocess
    import threading

    key = tuple(modules)
    running = _BACKGROUND_RUNNING.get(key)
    if running is not None and running.poll() is None:
        return running
    lock_dir = warmup_lock_dir()
    log_path = os.path.join(lock_dir, f"compile-{len(_BACKGROUND_RUNNING)}.log")
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-c", _BACKGROUND, lock_dir, ",".join(modules)],
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    proc.nnfast_log = log_path  # type: ignore[attr-defined]
    proc.nnfast_modules = key  # type: ignore[attr-defined]
    _BACKGROUND_RUNNING[key] = proc
    threading.Thread(target=proc.wait, name="nnfast-compile-reaper", daemon=True).start()  # no zombie once done
    atexit.register(lambda: proc.poll() is None and proc.terminate())
    return proc


def share_background(modules: "tuple[str, ...]") -> None:
    """When a :func:`warm_in_background` compile that includes ``modules`` is running in this process, take those
    modules' share of it here (:func:`warmup_shared`): wait for what it is compiling and load it, or compile what it
    has not started, instead of compiling the same signatures beside it on first use (fingerprinting calls crop's
    kernels while the background compile is still at them). Without a running background compile: nothing."""
    wanted = set(modules)
    for key, proc in list(_BACKGROUND_RUNNING.items()):
        if proc.poll() is None and wanted <= set(key):
            warmup_shared(tuple(modules), 1, 2, warmup_lock_dir())
            return


#: Where :func:`finish_background` keeps the output of a background compile that failed (the lock folder it was
#: written to is removed when this process exits).
FAILED_COMPILE_LOG = "nnfast-background-compile.log"


def finish_background(proc, timeout_s: float = 10.0) -> "str | None":
    """Wait up to ``timeout_s`` for a :func:`warm_in_background` process (``None``: nothing to do), terminate it after
    that (the work that needed it is done), and report a failure: when it exited with an error, its log is copied to
    ``<tempdir>/``:data:`FAILED_COMPILE_LOG` and one warning line names the error and that file. Returns the
    warning (``None`` when it succeeded or was terminated here). The kernels it did not compile were compiled by
    the processes that used them (:func:`warmup_shared` takes over a dead holder's lock)."""
    import logging
    import shutil
    import subprocess
    import tempfile

    if proc is None:
        return None
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
        return None
    if proc.returncode == 0 or proc.returncode < 0:  # done, or stopped by a signal (this process's terminate())
        return None
    log_path = getattr(proc, "nnfast_log", None)
    last, kept = "no output", None
    if log_path and os.path.isfile(log_path):
        try:
            with open(log_path, "rb") as f:
                lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            if lines:
                last = lines[-1]
            kept = os.path.join(tempfile.gettempdir(), FAILED_COMPILE_LOG)
            shutil.copyfile(log_path, kept)
        except OSError:
            kept = None
    modules = ",".join(getattr(proc, "nnfast_modules", ()))
    message = (f"the background compile of Numba kernels ({modules}) failed with exit code {proc.returncode}: "
               f"{last[:300]}; the kernels were compiled where they ran instead"
               + (f" (full output: {kept})" if kept else ""))
    logging.getLogger(__name__).warning("%s", message)
    return message


def warmup_shared(modules: "tuple[str, ...]", index: int, count: int, lock_dir: str, *, wait: bool = True) -> None:
    """:func:`warmup` of ``modules`` in process ``index`` of ``count`` that warm up the same modules at once.

    Each process walks the modules from its own starting point (``index * len(modules) // count``) and compiles a
    module only when it gets that module's lock (``<lock_dir>/<module>.lock``, ``flock``) without waiting; a module
    another process holds is done last, after waiting for its lock, and then loads from Numba's on-disk cache. So no
    module is compiled twice at the same time and a cold start compiles on ``count`` cores. A lock is released
    when its holder exits, also when it dies. Without ``fcntl`` (Windows) this is :func:`warmup`.

    ``wait=False`` (the install-time compile, :mod:`nnfast.native.precompile`: the cache is the product, not the
    kernels in this process): a module another process holds is left to it, and one it has finished (:func:`is_warm`)
    is not loaded again.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        warmup(tuple(modules))
        return
    mods = list(modules)
    start = (index * len(mods) // max(1, count)) if mods else 0
    deferred = []
    for blocking, todo in ((False, mods[start:] + mods[:start]), (True, deferred if wait else [])):
        for name in todo:
            fd = os.open(os.path.join(lock_dir, f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    deferred.append(name)
                    continue
                if not wait and is_warm((name,)):
                    continue
                warmup((name,))
            finally:
                os.close(fd)  # closing releases the lock


def load_dispatch_machinery() -> None:
    """Import on this thread what Numba imports at a process's first kernel call (its typing and lowering registries,
    SciPy's BLAS bindings: ~1 s of imports), as its dispatcher does it (under Numba's compiler lock).

    A thread started afterwards then only loads and runs kernels, and can run beside another thread's long import
    (``nnfast predict`` prepares its first case while torch is imported) without two threads importing the same
    modules at once, which can hand one of them a half-initialized module.
    """
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.registry import cpu_target

    with global_compiler_lock:
        cpu_target.target_context.refresh()


def available_cores() -> int:
    """Cores this process may use (CPU affinity aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


#: Threads of each patch-loader worker: batches are built with serial kernels, and the training process beside the
#: workers keeps the other cores (the trainer chooses ``workers < cores``).
LOADER_WORKER_THREADS = 1


def threads_per_worker(workers: int) -> int:
    """Threads each of ``workers`` processes (or threads) may use: ``cores // workers``, at least 1.

    The one rule for every pool, so that ``workers x threads <= cores`` (the task pool's default; the patch loader's
    workers take :data:`LOADER_WORKER_THREADS`).
    """
    return max(1, available_cores() // max(1, int(workers)))


def limit_threads(threads: int) -> int:
    """Limit this process's thread pools to ``threads``: Numba (capped at ``NUMBA_NUM_THREADS``), BLAS/OpenMP already
    loaded (through ``threadpoolctl`` when installed), and torch, SimpleITK and Blosc when they are imported (a
    library imported later reads :data:`THREAD_ENV`, which worker processes set first). Returns Numba's count."""
    import numba

    threads = max(1, int(threads))
    numba_threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(numba_threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional; THREAD_ENV covers libraries loaded later
        pass
    else:
        threadpool_limits(limits=threads)
    if (torch := _imported("torch")) is not None:
        torch.set_num_threads(threads)
    if (sitk := _imported("SimpleITK")) is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if (blosc := _imported("numcodecs.blosc")) is not None:
        blosc.set_nthreads(threads)
    if (blosc2 := _imported("blosc2")) is not None:
        blosc2.set_nthreads(threads)
    return numba_threads


def _imported(name: str):
    """Module ``name`` if it is imported, else ``None``; when another thread is still importing it (a dask worker's
    other task), this waits for that import to finish instead of using the half-initialized module."""
    if name not in sys.modules:
        return None
    import importlib

    return importlib.import_module(name)  # blocks on the module's import lock while it initializes
