"""What crosses the pipes between nnfast's parent processes and its worker processes.

Both worker pools (:mod:`nnfast.parallel` for per-case tasks, :mod:`nnfast.data.loader` for training batches) send
exceptions back to their parent, and :mod:`nnfast.parallel` sends its workers the function to run (a reference to
a module-level function and its initializer). Those are pickled here, in flight only — the transport
``multiprocessing`` itself uses for every message — because a reference to code has no JSON form. Data does not go
through here: tasks carry file paths (plans, properties and checkpoints are versioned JSON and state dicts on disk),
the loader sends its case source as JSON (:func:`nnfast.data.dataset.source_to_json`), and arrays never cross a
pipe: workers write results to files or shared memory.
"""
from __future__ import annotations

import pickle
import traceback
from typing import Any, NamedTuple

__all__ = ["dumps", "loads", "PackedError", "pack_exception", "unpack_exception", "send_error", "RemoteTraceback"]


def dumps(obj: Any) -> bytes:
    """Serialize the function a worker runs (a module-level function, its initializer and their arguments)."""
    return pickle.dumps(obj)


def loads(blob: bytes) -> Any:
    """The inverse of :func:`dumps`, in the worker (or of an exception, in the parent)."""
    return pickle.loads(blob)


class PackedError(NamedTuple):
    """An exception on its way to the parent: pickled when possible, always with its type, message and traceback."""

    blob: bytes | None
    type_name: str
    message: str
    traceback: str


class RemoteTraceback(Exception):
    """A worker's formatted traceback, attached as the ``__cause__`` of the exception re-raised in the parent."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


def pack_exception(exc: BaseException) -> PackedError:
    """Pack ``exc`` with its traceback. ``SystemExit``/``KeyboardInterrupt`` become a ``RuntimeError`` so that a
    task cannot end the parent quietly; an exception that does not survive pickling travels as text only."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if not isinstance(exc, Exception):
        exc = RuntimeError(f"the task raised {type(exc).__name__}({exc})")
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # a class defined inside a function pickles but does not load
    except Exception:
        blob = None
    return PackedError(blob, type(exc).__name__, str(exc), tb)


def unpack_exception(packed: PackedError | tuple) -> BaseException:
    """The exception of :func:`pack_exception` (same type and attributes), or a ``RuntimeError`` naming its type
    when it could not travel; its ``__cause__`` is the worker's traceback."""
    packed = PackedError(*packed)
    exc: BaseException | None = None
    if packed.blob is not None:
        try:
            exc = pickle.loads(packed.blob)
        except Exception:
            exc = None
    if exc is None:
        exc = RuntimeError(f"{packed.type_name}: {packed.message}")
    exc.__cause__ = RemoteTraceback(packed.traceback)
    return exc


def send_error(conn, index: int, exc: BaseException, *extra: Any) -> bool:
    """Send ``("error", index, pack_exception(exc), *extra)`` over ``conn``; False when the parent is gone."""
    try:
        conn.send(("error", index, tuple(pack_exception(exc)), *extra))
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False
