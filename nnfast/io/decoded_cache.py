"""Decoded input arrays kept in memory between the steps of one command that read the same files (read once).

``nnfast preprocess`` verifies and fingerprints every training case (decoding each NIfTI file once) and then, on
threads of the same process, preprocesses the cases, which would decode every file a second time. A
:class:`DecodedCache` holds what verification (or the fingerprint) decoded, within a memory budget, and preprocessing
takes each case's arrays from it instead of reading the files again.

A case is taken only when its input files are the ones that were read: each entry records every file's path, size
and modification time (``stat`` before the read) and :meth:`DecodedCache.take` compares them with the files now; a
changed, replaced or missing file is a miss and the caller reads the files. An entry is handed out once (the taker
owns the arrays and may free their pages as it goes). When an entry does not fit the budget, the largest entries are
dropped first (the new one too, when it is the largest); a dropped case is read again. Thread-safe.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .image import ImageGeometry

__all__ = ["DecodedCase", "DecodedCache", "file_signature", "DEFAULT_MEMORY_FRACTION"]

log = logging.getLogger(__name__)

#: Share of the memory available when the cache is made that ``nnfast preprocess`` lets it hold.
DEFAULT_MEMORY_FRACTION = 0.25

Signature = tuple[tuple[str, int, int], ...]


def file_signature(paths: Sequence[str | os.PathLike | None]) -> Signature | None:
    """``((path, size, mtime_ns), ...)`` of the given files (``None`` entries skipped); ``None`` when one cannot be
    stat-ed."""
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
        except OSError:
            return None
        out.append((os.fspath(p), int(st.st_size), int(st.st_mtime_ns)))
    return tuple(out)


@dataclass
class DecodedCase:
    """One case as it was decoded.

    ``images``: the arrays of its channel files, each ``(c_i, z, y, x)`` in the file's dtype (reader order, as
    :func:`nnfast.io.image.read_image` returns them; or one stacked array as :func:`~nnfast.io.image.read_images`
    with ``dtype=None`` returns it); ``geometry``: the first channel file's; ``label``: the label file's array
    ``(1, z, y, x)``, as read or as :func:`~nnfast.io.image.read_label` converts it; ``signature``: the
    :func:`file_signature` of the image files then the label file, taken before they were read."""

    images: list[np.ndarray]
    geometry: ImageGeometry
    label: np.ndarray
    signature: Signature

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.images) + self.label.nbytes)


class DecodedCache:
    """Decoded cases by case id, at most ``budget_bytes`` of arrays (see the module docstring).

    Attributes ``hits``, ``misses`` (a take that found nothing usable) and ``dropped`` (entries evicted or refused
    for the budget, or released with :meth:`release`) count what happened, for logs and tests."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: dict[str, DecodedCase] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.dropped = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, case_id: str, entry: DecodedCase) -> bool:
        """Keep ``entry`` for ``case_id`` (replacing an older one) if the budget allows, dropping larger entries to
        make room; returns whether it was kept."""
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(case_id, None)
            if old is not None:
                self._used -= old.nbytes
            while self._used + size > self.budget_bytes:
                largest = max(self._entries, key=lambda k: self._entries[k].nbytes, default=None)
                if largest is None or self._entries[largest].nbytes <= size:
                    self.dropped += 1
                    return False  # the new entry is the largest: keep the others
                self._used -= self._entries.pop(largest).nbytes
                self.dropped += 1
            self._entries[case_id] = entry
            self._used += size
            return True

    @staticmethod
    def sign(cache: "DecodedCache | None", files: Sequence[str | os.PathLike | None]) -> Signature | None:
        """What a reader takes before it reads ``files`` (image files, then the label file) for ``cache``: their
        :func:`file_signature` (``None`` without a cache, or when one cannot be stat-ed: nothing is kept then)."""
        return file_signature(files) if cache is not None else None

    def keep(self, case_id: str, signature: Signature | None, images: list[np.ndarray], geometry: ImageGeometry,
             label: np.ndarray) -> bool:
        """:meth:`put` the arrays a reader decoded from the files of ``signature`` (:meth:`sign`, taken before the
        read); nothing when it is ``None``. Returns whether they were kept."""
        return signature is not None and self.put(case_id, DecodedCase(list(images), geometry, label, signature))

    def take(self, case_id: str, files: Sequence[str | os.PathLike | None]) -> DecodedCase | None:
        """Remove and return the entry of ``case_id`` when ``files`` (image files, then the label file) are the
        files it was read from, unchanged; ``None`` otherwise (the caller reads the files)."""
        with self._lock:
            entry = self._entries.pop(case_id, None)
            if entry is not None:
                self._used -= entry.nbytes
        if entry is not None and file_signature(files) == entry.signature:
            self.hits += 1
            return entry
        if entry is not None:
            log.debug("case %s: its files changed since they were read; reading them again", case_id)
        self.misses += 1
        return None

    def release(self, nbytes: int) -> int:
        """Drop entries, largest first, until ``nbytes`` are freed (or none is left); returns the bytes freed."""
        freed = 0
        with self._lock:
            while freed < nbytes and self._entries:
                largest = max(self._entries, key=lambda k: self._entries[k].nbytes)
                n = self._entries.pop(largest).nbytes
                self._used -= n
                freed += n
                self.dropped += 1
        return freed

    def keep_only(self, case_ids: Sequence[str]) -> None:
        """Drop the entries of every case not in ``case_ids`` (those nobody will take)."""
        wanted = set(case_ids)
        with self._lock:
            for k in [k for k in self._entries if k not in wanted]:
                self._used -= self._entries.pop(k).nbytes

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._used = 0
