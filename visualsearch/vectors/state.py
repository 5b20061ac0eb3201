"""Which rows of the segments are alive: the newest row of each id, unless deleted since.

``location[id]`` holds the live row of each image id as ``uid << ROW_BITS | row``
(-1: none); image ids are the catalogue's dense integer keys, so a flat table is
the fastest map (8 bytes per id ever assigned). Per segment, a boolean mask tells
searches which rows are alive. Appending segments updates both in time
proportional to the new rows; any other change (a merge replaced segments) rebuilds
them from the segments in order, which is linear in the catalogue but vectorised.

Masks are replaced, never modified, so a search that took a :class:`Snapshot` keeps
a consistent view while a refresh runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .segment import Segment

# 32 bits of row (4 billion rows a segment) and 31 of segment uid (2 billion commits).
ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1


@dataclass(frozen=True)
class Snapshot:
    """The segments (oldest first) and their alive masks at one moment."""

    segments: tuple[Segment, ...]
    alive: dict[int, np.ndarray]
    alive_count: int


class StoreState:
    """Mutable; callers serialise changes and lookups (the store holds a lock)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.location = np.full(0, -1, dtype=np.int64)
        self.alive: dict[int, np.ndarray] = {}
        self.alive_count = 0

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(self.segments), dict(self.alive), self.alive_count)

    # --- changes ----------------------------------------------------------------------

    def move_to(self, order: Sequence[Segment]) -> None:
        """Adopt ``order`` (the committed segment list): appended segments are applied
        incrementally; anything else rebuilds the state from scratch."""
        current = [segment.uid for segment in self.segments]
        wanted = [segment.uid for segment in order]
        if wanted[:len(current)] == current:
            # Same rows under the same uids; a segment object may carry a new encoding.
            self.segments[:] = order[:len(current)]
            for segment in order[len(current):]:
                self._append(segment)
        else:
            self._rebuild(order)

    def _rebuild(self, order: Sequence[Segment]) -> None:
        self.segments = []
        self.location = np.full(self._table_size(order), -1, dtype=np.int64)
        for segment in order:
            if len(segment.deletes):
                self.location[segment.deletes] = -1
            if len(segment):
                self.location[segment.rows.ids] = _encode(segment.uid, len(segment))
            self.segments.append(segment)
        self.alive = {}
        self.alive_count = 0
        for segment in order:
            mask = self.location[segment.rows.ids] == _encode(segment.uid, len(segment)) if len(segment) \
                else np.zeros(0, dtype=bool)
            self.alive[segment.uid] = mask
            self.alive_count += int(np.count_nonzero(mask))

    def _append(self, segment: Segment) -> None:
        self._grow(self._table_size([segment]))
        alive = dict(self.alive)  # a new dict: snapshots taken before keep theirs
        for ids in (segment.deletes, segment.rows.ids):
            if len(ids):
                self._kill(alive, np.asarray(ids))
        if len(segment):
            self.location[segment.rows.ids] = _encode(segment.uid, len(segment))
        alive[segment.uid] = np.ones(len(segment), dtype=bool)
        self.alive_count += len(segment)
        self.segments.append(segment)
        self.alive = alive

    def _kill(self, alive: dict[int, np.ndarray], ids: np.ndarray) -> None:
        old = self.location[ids]
        old = old[old >= 0]
        if not len(old):
            return
        uids, rows = old >> ROW_BITS, old & ROW_MASK
        for uid in np.unique(uids).tolist():
            mask = alive[uid].copy()
            mask[rows[uids == uid]] = False
            alive[uid] = mask
        self.location[ids] = -1
        self.alive_count -= len(old)

    def _grow(self, size: int) -> None:
        if size > len(self.location):
            grown = np.full(max(size, len(self.location) * 5 // 4), -1, dtype=np.int64)
            grown[:len(self.location)] = self.location
            self.location = grown

    @staticmethod
    def _table_size(segments: Sequence[Segment]) -> int:
        top = -1
        for segment in segments:
            for ids in (segment.rows.ids, segment.deletes):
                if len(ids):
                    low = int(np.min(ids))
                    if low < 0:
                        raise ValueError(f"negative image id {low} in segment {segment.name}")
                    top = max(top, int(np.max(ids)))
        return top + 1

    # --- lookups ------------------------------------------------------------------------

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uid, row) of each id's live row; uid -1 where the id has none."""
        ids = np.asarray(ids, dtype=np.int64)
        codes = np.full(len(ids), -1, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.location))
        codes[inside] = self.location[ids[inside]]
        uids = np.where(codes >= 0, codes >> ROW_BITS, -1)
        return uids, codes & ROW_MASK

    def segment(self, uid: int) -> Segment:
        for segment in self.segments:
            if segment.uid == uid:
                return segment
        raise KeyError(uid)


def _encode(uid: int, rows: int) -> np.ndarray:
    return (np.int64(uid) << ROW_BITS) | np.arange(rows, dtype=np.int64)
