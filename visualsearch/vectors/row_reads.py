"""Scattered rows of a memory-mapped array, read with ``pread`` and the reads issued together.

Re-ranking reads a few hundred scattered rows per query (of the float32 vectors, and of
the 8-bit re-rank codes where a plan has them). Two things matter once such a file
outgrows the page cache:

- reads issued together: one blocking read after another costs a disk round trip
  each, where requests issued together are served in parallel by the device's queue
  (10M images, rows evicted: 107 -> 52 ms p50, ``benchmarks.cold_reads``);
- ``pread`` into a private buffer rather than faulting rows in through the mapping:
  a fault pulls a whole page-cache folio (up to 2 MiB) into the process, so a
  server's resident memory grew by about 1 MB per re-ranked row.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np

# warm() reads this much at a time.
WARM_CHUNK_BYTES = 1024**2


class RowReader:
    """Reads rows of one memory-mapped 2-d array (or of an in-memory one, by indexing)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        # Opened now, while the file surely exists: a merge may delete it later, and a
        # search that took its snapshot before must still read it (as the mapping can).
        self._fd: int | None = None
        if isinstance(array, np.memmap) and array.size:
            try:
                self._fd = os.open(array.filename, os.O_RDONLY)
                weakref.finalize(self, os.close, self._fd)
            except FileNotFoundError:
                pass  # read through the mapping instead

    def prefetch(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """Ask the kernel to start reading ``rows`` (sorted), all at once, without
        waiting; returns the runs of consecutive rows for :meth:`read`. On cached rows
        it costs one system call a run."""
        runs = consecutive_runs(rows)
        if self._fd is None or not hasattr(os, "posix_fadvise"):
            return runs
        for offset, length in self._byte_ranges(rows, runs):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        return runs

    def read(self, rows: np.ndarray, *, runs: list[tuple[int, int]] | None = None) -> np.ndarray:
        """The rows at positions ``rows`` (sorted), as a new array.

        Args:
            runs: what :meth:`prefetch` returned for ``rows`` when the caller issued the
                reads already (several files' reads go out together); else this does.

        Raises:
            OSError: the file is shorter than its header said.
        """
        if self._fd is None or len(rows) == 0:
            return np.asarray(self.array[rows])
        if runs is None:
            runs = self.prefetch(rows)
        out = np.empty((len(rows), self.array.shape[1]), dtype=self.array.dtype)
        for (start, end), (offset, length) in zip(runs, self._byte_ranges(rows, runs)):
            if os.preadv(self._fd, [memoryview(out[start:end]).cast("B")], offset) != length:
                raise OSError(f"short read of {self.array.filename} at row {int(rows[start])}")
        return out

    def warm(self, *, stop=None) -> None:
        """Read the whole array into the page cache (see :func:`warm_range`)."""
        if self._fd is not None:
            warm_range(self._fd, self.array.offset, self.array.offset + self.array.nbytes, stop=stop)

    def _byte_ranges(self, rows: np.ndarray, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(file offset, length) of each run's rows."""
        row_bytes = self.array.shape[1] * self.array.dtype.itemsize
        return [(self.array.offset + int(rows[start]) * row_bytes, (end - start) * row_bytes)
                for start, end in runs]


def warm_file(path: Path, *, stop=None) -> None:
    """Read the file at ``path`` into the page cache (see :func:`warm_range`); a file gone
    meanwhile (merged away) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        warm_range(fd, 0, os.fstat(fd).st_size, stop=stop)
    finally:
        os.close(fd)


def warm_range(fd: int, start: int, end: int, *, stop=None) -> None:
    """Read bytes ``start``-``end`` of ``fd`` into the page cache, WARM_CHUNK_BYTES at a
    time, into one scratch buffer (only the page cache keeps them); ``stop``: a
    threading.Event that ends it between chunks.

    Plain reads, not ``posix_fadvise(WILLNEED)``: Linux caps each WILLNEED at the
    device's readahead window (128 KiB here), so advising 64 MiB chunks cached 1.2 GB
    of 15 GB at 10M images."""
    buffer = memoryview(bytearray(min(WARM_CHUNK_BYTES, max(end - start, 0))))
    for offset in range(start, end, WARM_CHUNK_BYTES):
        if stop is not None and stop.is_set():
            return
        if os.preadv(fd, [buffer[:min(WARM_CHUNK_BYTES, end - offset)]], offset) <= 0:
            return  # the file is shorter than it was: nothing more to read


def consecutive_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) positions of the runs of consecutive values in sorted ``rows``: one
    read per run (filters often select neighbours)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return list(zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(rows)]]).tolist()))
