"""One immutable file holding several named numpy arrays, memory-mapped when read.

A segment is written once and never changed, so one file per segment (instead of a
file per array) keeps the directory small and makes "the segment exists" one atomic
rename. Layout: 8-byte magic, 8-byte little-endian header length, a JSON header
(free-form ``meta`` plus each array's dtype, shape and offset), then the arrays, each
aligned to 64 bytes so that memory-mapped views are aligned for BLAS.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..durable import fsync_directory

MAGIC = b"VSSEG001"
ALIGN = 64


class ArrayFileError(Exception):
    """The file is not an array file, is truncated, or its header is damaged."""


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


class ArrayFileBuilder:
    """Create an array file whose arrays are filled in place (memory-mapped), then commit it.

    For arrays too big to hold in memory (merging segments of millions of rows):
    the sizes are known up front, the data is written chunk by chunk.
    """

    def __init__(self, path: Path, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                 meta: Mapping[str, Any]):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        entries = {}
        # Offsets are relative to the end of the header, so the header can be sized freely.
        offset = 0
        for name, (dtype, shape) in specs.items():
            dtype = np.dtype(dtype)
            offset = _aligned(offset)
            entries[name] = {"dtype": dtype.str, "shape": [int(n) for n in shape], "offset": offset}
            offset += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header = json.dumps({"meta": dict(meta), "arrays": entries}).encode()
        data_start = _aligned(len(MAGIC) + 8 + len(header))
        try:
            with open(self.tmp, "wb") as handle:
                handle.write(MAGIC + struct.pack("<Q", len(header)) + header)
                handle.flush()
                # Reserve the blocks now rather than truncate to a sparse file: writing
                # through the mapping into a hole on a full disk kills the process with
                # SIGBUS, where this raises ENOSPC before anything is written.
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(handle.fileno(), 0, data_start + offset)
                else:  # macOS: no fallocate; a full disk is then found by the mapping
                    handle.truncate(data_start + offset)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        self.size = data_start + offset
        self.arrays: dict[str, np.ndarray] = {}
        for name, entry in entries.items():
            shape = tuple(entry["shape"])
            if int(np.prod(shape, dtype=np.int64)) == 0:
                self.arrays[name] = np.zeros(shape, dtype=np.dtype(entry["dtype"]))
            else:
                self.arrays[name] = np.memmap(self.tmp, dtype=np.dtype(entry["dtype"]), mode="r+",
                                              offset=data_start + entry["offset"], shape=shape)

    def commit(self) -> int:
        """Flush, fsync and rename into place; returns the file size."""
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        self.arrays.clear()
        with open(self.tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.path)
        fsync_directory(self.path.parent)
        return self.size

    def abort(self) -> None:
        self.arrays.clear()
        self.tmp.unlink(missing_ok=True)


def write_array_file(path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
    """Write ``arrays`` and ``meta`` to ``path`` atomically (temporary file, fsync, rename).

    Returns:
        The number of bytes written.
    """
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    builder = ArrayFileBuilder(path, {name: (a.dtype, a.shape) for name, a in arrays.items()}, meta)
    try:
        for name, array in arrays.items():
            if array.size:
                builder.arrays[name][...] = array
        return builder.commit()
    except BaseException:
        builder.abort()
        raise


def read_array_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Memory-map the arrays of ``path`` (read-only views) and return them with the meta.

    Raises:
        ArrayFileError: not an array file, or truncated.
        OSError: the file cannot be opened.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = handle.read(len(MAGIC) + 8)
        if len(start) < len(MAGIC) + 8 or start[:len(MAGIC)] != MAGIC:
            raise ArrayFileError(f"{path} is not a vector segment file")
        (header_len,) = struct.unpack("<Q", start[len(MAGIC):])
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as exc:
            raise ArrayFileError(f"{path} has a damaged header: {exc}") from None
    data_start = _aligned(len(MAGIC) + 8 + header_len)
    arrays: dict[str, np.ndarray] = {}
    for name, entry in header["arrays"].items():
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        begin = data_start + entry["offset"]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin + nbytes > size:
            raise ArrayFileError(f"{path} is truncated ({name} ends past the end of the file)")
        if nbytes == 0:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=begin, shape=shape)
    return arrays, header["meta"]
