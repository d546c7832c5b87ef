"""Cheap integrity checks of NIfTI files that SimpleITK does not make.

SimpleITK (ITK 5.4) reads a *truncated* ``.nii.gz`` without any error and returns an array whose tail is zeros or
garbage (measured: a file cut to half its bytes, or missing only its last 20 bytes, reads "fine"). It does detect
a corrupt deflate stream or a CRC mismatch. :func:`nifti_integrity_problem` closes the gap without decompressing the
whole file in the common case: it parses the NIfTI-1/2 header (the first few hundred decompressed bytes) to get the
size the file must have, and compares it with the gzip trailer's ``ISIZE`` field (the uncompressed size modulo
2**32, the last four bytes). Only when those disagree (a truncated file, or a valid but unusual multi-member gzip
stream) is the whole stream decompressed, in 1 MiB pieces, to decide.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["nifti_integrity_problem", "nifti_header_info", "nifti_nonfinite_counts", "NiftiHeader"]

_CHUNK = 1 << 20


class NiftiHeader(NamedTuple):
    """The fields of a single-file NIfTI-1/2 header that size and type the data block."""

    ndim: int
    dims: tuple[int, ...]  # dim[1..ndim], file order (x, y, z, t, ...)
    datatype: int
    bitpix: int
    vox_offset: int
    byteorder: str  # "<" or ">"

    @property
    def data_bytes(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return (n * self.bitpix + 7) // 8

    @property
    def file_bytes(self) -> int:
        """Bytes the (uncompressed) file must hold: header, extensions and data."""
        return self.vox_offset + self.data_bytes


def nifti_header_info(raw: bytes) -> NiftiHeader | None:
    """Parse the start of an (uncompressed) NIfTI-1/2 stream; None when it is not a single-file NIfTI-1/2 header."""
    if len(raw) < 348:
        return None
    for end in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(end + "i", raw[:4])
        if sizeof_hdr == 348:
            if raw[344:347] != b"n+1":
                return None
            dim = struct.unpack(end + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(end + "hh", raw[70:74])
            (vox_offset,) = struct.unpack(end + "f", raw[108:112])
            break
        if sizeof_hdr == 540 and len(raw) >= 540:
            if raw[4:7] != b"n+2":
                return None
            datatype, bitpix = struct.unpack(end + "hh", raw[12:16])
            dim = struct.unpack(end + "8q", raw[16:80])
            (vox_offset,) = struct.unpack(end + "q", raw[168:176])
            break
    else:
        return None
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or vox_offset < 0:
        return None
    dims = tuple(int(d) for d in dim[1 : ndim + 1])
    if any(d < 1 for d in dims):
        return None
    return NiftiHeader(ndim, dims, int(datatype), int(bitpix), int(vox_offset), end)


def _stream_size(path: Path) -> tuple[int, str | None]:
    """Decompress a gzip file fully (all members, bounded memory); returns (uncompressed bytes, problem or None).

    Zero padding or other bytes that do not start a gzip member after a complete member are ignored, as gzip does.
    """
    total = 0
    member_bytes = 0
    d = zlib.decompressobj(31)
    with open(path, "rb") as f:
        buf = f.read(_CHUNK)
        while True:
            if not buf:
                buf = f.read(_CHUNK)
                if not buf:
                    return total, "the gzip stream ends early (no end-of-stream marker): the file is truncated"
            try:
                out = d.decompress(buf, 8 * _CHUNK)
            except zlib.error as e:
                if member_bytes == 0 and total > 0:  # trailing bytes that are not another member
                    return total, None
                return total, f"the gzip stream is corrupt after {total} decompressed bytes ({e})"
            total += len(out)
            member_bytes += len(out)
            if d.eof:
                buf = d.unused_data
                while not buf.strip(b"\0"):
                    buf = f.read(_CHUNK)
                    if not buf:
                        return total, None
                d = zlib.decompressobj(31)
                member_bytes = 0
                continue
            buf = d.unconsumed_tail


def nifti_integrity_problem(path: str | os.PathLike) -> str | None:
    """Describe why the NIfTI file ``path`` is truncated or corrupt, or return None when it looks intact.

    Only ``.nii`` and ``.nii.gz`` files are checked (others, and files that are not single-file NIfTI-1/2, return
    None and are left to the image reader). Cost for an intact file: one 64 KiB read, decompressing ~0.5 KiB,
    and reading 4 bytes at the end.
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii.gz") or name.endswith(".nii")):
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "the file does not exist"
    if size == 0:
        return "the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        gz = head[:2] == b"\x1f\x8b"
        if not gz:  # uncompressed (ITK also reads a plain NIfTI that is named .nii.gz)
            info = nifti_header_info(head)
            if info is None:
                return None
            need = info.file_bytes
            if size < need:
                return f"the file is truncated: it has {size} bytes but its header needs {need}"
            return None
        d = zlib.decompressobj(31)
        try:
            raw = d.decompress(head, 544)
        except zlib.error as e:
            return f"the gzip stream is corrupt at its start ({e})"
        info = nifti_header_info(raw)
        if info is None:
            return None
        need = info.file_bytes
        if size >= 18:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
            if isize == need % (1 << 32):
                return None
    total, problem = _stream_size(path)
    if problem is not None:
        return problem
    if total < need:
        return f"the file is truncated: it decompresses to {total} bytes but its header needs {need}"
    return None


_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def nifti_nonfinite_counts(path: str | os.PathLike) -> tuple[int, int] | None:
    """Count NaN and infinite voxels stored in a float NIfTI file, reading its raw data block.

    SimpleITK cannot show them: libnifti's ``nifti_read_buffer`` (used by ITK's NIfTI reader) replaces every
    non-finite float with 0 while reading. This decompresses the file once more, in 1 MiB pieces.

    Returns
    -------
    (n_nan, n_inf), or None when ``path`` is not a readable single-file float32/float64 NIfTI.
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii.gz") or name.endswith(".nii")):
        return None
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        gz = head[:2] == b"\x1f\x8b"
        try:
            raw = zlib.decompressobj(31).decompress(head, 544) if gz else head[:544]
        except zlib.error:
            return None
        info = nifti_header_info(raw)
        if info is None or info.datatype not in _FLOAT_TYPES:
            return None
        dtype = np.dtype(info.byteorder + _FLOAT_TYPES[info.datatype])
        f.seek(0)
        d = zlib.decompressobj(31) if gz else None
        skip, left = info.vox_offset, info.data_bytes
        carry = b""
        n_nan = n_inf = 0
        while left > 0:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            if d is not None:
                try:
                    chunk = d.decompress(chunk)
                except zlib.error:
                    return None
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            chunk = carry + chunk[:left]
            usable = len(chunk) - len(chunk) % dtype.itemsize
            carry = chunk[usable:]
            values = np.frombuffer(chunk[:usable], dtype=dtype)
            left -= usable
            n_nan += int(np.count_nonzero(np.isnan(values)))
            n_inf += int(np.count_nonzero(np.isinf(values)))
    return n_nan, n_inf
