"""The vector store: immutable segments searched together, written by appending.

The Lucene / Milvus segment model, on one machine:

- a write (an indexing batch, an API ``PUT`` or ``DELETE``) appends one small
  segment with the new rows and the ids it deletes, then replaces the manifest:
  its cost follows the change, not the catalogue;
- the newest segments are merged into bigger ones by a tiered policy
  (:func:`.planner.plan_merge`), dropping dead rows; merges of more than
  :data:`LOCKED_MERGE_ROWS` rows run outside the commit lock so that API writes are
  never stuck behind them;
- big segments are ANN-encoded with the store's *codec* (:mod:`.codec`), chosen by
  :func:`.planner.plan_index` and re-planned as the catalogue grows; small ones are
  scanned exactly; ANN candidates are re-ranked with the exact float32 vectors;
- readers (every server worker) memory-map the segment files and follow the
  manifest: a change is one ``stat`` away, adopting it costs the new segments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np

from ..durable import writer_gone
from ..errors import ConfigurationError, IndexCorruptError, InvalidRequestError, WriterBusyError
from ..file_locks import file_lock
from .arrayfile import ArrayFileError
from .codec import CODEC_SUFFIXES, MAX_TRAIN_POINTS, Codec, all_cores, search_segment
from .filter_cache import FilterCache, FilteredRows
from .filters import SearchFilters
from .manifest import StoreManifest, Tuning, manifest_key, read_store_manifest, write_store_manifest
from .planner import (
    EXACT_ROW_COST_IN_CODES,
    MIN_ANN_SEGMENT_ROWS,
    IndexPlan,
    TuningTrial,
    choose_tuning,
    escalate,
    needs_compaction,
    needs_replan,
    needs_retune,
    plan_force_merge,
    plan_index,
    plan_merge,
    recall_plateaued,
    search_cost,
)
from .refine import refined_depth
from .row_reads import warm_file
from .segment import SEGMENT_SUFFIX, Segment, VectorRows
from .state import Snapshot, StoreState

logger = logging.getLogger(__name__)

SEGMENTS_DIR = "vectors"
LOCK_FILE = ".commit.lock"
# Exact scan of a filter's rows while they are at most this many bytes of vectors;
# beyond, the ANN lists are searched with the filter as an id selector.
FILTER_EXACT_BYTES = 4 * 1024**2
# ... and while that is cheaper than the ANN path (EXACT_ROW_COST_IN_CODES, in the planner).
DEFAULT_RERANK = 100
# Re-ranking depths tuning tries (with the fewest lists that reach the target at each).
RERANK_STEPS = (DEFAULT_RERANK, 200, 300, 500, 700, 1000, 1500, 2000)
# Tuning re-ranks at most this share of the catalogue: a plan that needs more is
# escalated to finer codes (rebuild) instead.
MAX_RERANK_SHARE = 0.35
TARGET_RECALL = 0.95
# Tuning aims this high on its sample: 200 queries x 10 neighbours measure a recall near
# 0.95 within about 0.005 (one standard error), and the sample's queries are catalogue
# vectors, easier than shoppers' photos. Settings tuned to 0.956 on the sample gave
# 0.948 on the 1M scale benchmark's queries.
TUNING_GOAL = TARGET_RECALL + 0.01
TUNING_QUERIES = 200
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Merges up to this size run while holding the commit lock (well under a second);
# bigger ones are built outside it and installed if their inputs are still current.
LOCKED_MERGE_ROWS = 65_536
# Files not referenced by the manifest are deleted once this old (a merge in
# progress elsewhere writes files before it installs them).
LEFTOVER_GRACE_SECONDS = 3600.0
DEFAULT_LOCK_TIMEOUT = 30.0
# warm_page_cache() leaves ANN lists and re-rank codes bigger than this share of the
# memory this process may use to be read as searches need them (warming them would only
# evict them again).
WARM_MEMORY_SHARE = 0.75


@dataclass(frozen=True)
class StoreHits:
    """Search candidates, best first, one per image id."""

    ids: np.ndarray
    product_ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class StoreStats:
    vectors: int
    rows: int
    segments: int
    ann_segments: int
    index_type: str
    plan: dict
    tuning: dict
    disk_bytes: int


class VectorStore:
    """The vectors of one data directory.

    Args:
        data_dir: the deployment's folder (``manifest.json`` and ``vectors/`` live there).
        backbone, weights_sha256, dim: the network the vectors come from; opening a store
            built by another is a :class:`BackboneMismatchError`.
        recipe, recipe_hash: the recipe (:mod:`visualsearch.recipes`), recorded in a new
            store's manifest.
        memory_budget: bytes the ANN codes may use (the planner's budget).
        read_only: refuse writes (server workers).

    Raises:
        BackboneMismatchError, IndexCorruptError: from :meth:`refresh`.
    """

    def __init__(self, data_dir: Path, *, backbone: str, weights_sha256: str, dim: int,
                 memory_budget: int, read_only: bool = False, recipe: str | None = None,
                 recipe_hash: str | None = None):
        self.data_dir = Path(data_dir)
        self.segments_dir = self.data_dir / SEGMENTS_DIR
        self.identity = {"backbone": backbone, "weights_sha256": weights_sha256, "dim": dim}
        self.recipe = {"recipe": recipe, "recipe_hash": recipe_hash}  # recorded, checked by the catalogue
        self.dim = dim
        self.memory_budget = memory_budget
        self.read_only = read_only
        self._lock = threading.RLock()         # the loaded state (short holds)
        self._write_mutex = threading.Lock()   # one writer thread at a time in this process
        self._state = StoreState()
        self._manifest: StoreManifest | None = None
        self._key: tuple | None = None
        self._loaded: dict[int, Segment] = {}
        self._codecs: dict[str, Codec] = {}
        self._bitmaps: dict[tuple[int, int], np.ndarray] = {}
        self._alive_counts: dict[tuple[int, int], int] = {}
        self._filter_cache = FilterCache()
        self._writer: int | None = None  # the thread holding the commit lock
        self.refresh()

    # --- reading -----------------------------------------------------------------------

    @property
    def manifest(self) -> StoreManifest | None:
        return self._manifest

    def refresh(self) -> None:
        """Adopt the latest committed state (a no-op unless the manifest changed)."""
        if manifest_key(self.data_dir) == self._key and self._key is not None:
            return
        with self._lock:
            self._reload()

    def _reload(self) -> None:
        for _attempt in range(5):
            key = manifest_key(self.data_dir)
            if key == self._key and key is not None:
                return
            manifest = read_store_manifest(self.data_dir)
            if manifest is None:
                self._state.move_to([])
                self._manifest, self._key = None, key
                return
            manifest.check_compatible(**self.identity)
            try:
                segments = [self._segment(manifest, uid, manifest.ann.get(str(uid))) for uid in manifest.segments]
            except FileNotFoundError:
                continue  # a merge replaced files after we read the manifest: read it again
            self._state.move_to(segments)
            self._loaded = {segment.uid: segment for segment in segments}
            self._bitmaps.clear()
            self._alive_counts.clear()
            self._filter_cache.retain(self._loaded)
            self._manifest, self._key = manifest, key
            return
        raise IndexCorruptError(f"the vector index in {self.data_dir} keeps changing under us or lost files")

    def _segment(self, manifest: StoreManifest, uid: int, codec_id: str | None) -> Segment:
        """Segment ``uid`` with the encoding of ``codec_id``, reusing what is loaded.

        Raises:
            FileNotFoundError: a merge or re-plan replaced its files after ``manifest`` was
                read (the caller reads the newer manifest).
            IndexCorruptError: a file the manifest still names is missing or damaged.
        """
        scale = self._codec(manifest, codec_id).refine_scale if codec_id else None
        segment = self._loaded.get(uid)
        if segment is not None and segment.codec_id == codec_id:
            return segment
        try:
            if segment is not None:
                # Same rows, new encoding (a re-plan): keep the mapped rows, load the new codes.
                return segment.with_encoding(self.segments_dir, codec_id, scale)
            return Segment.load(self.segments_dir, uid, codec_id=codec_id, refine_scale=scale)
        except (ArrayFileError, RuntimeError, FileNotFoundError) as exc:
            if not self._still_committed(uid, codec_id):
                raise FileNotFoundError(uid) from None
            raise IndexCorruptError(f"vector segment {uid} is damaged or lost files: {exc}") from None

    def _still_committed(self, uid: int, codec_id: str | None) -> bool:
        """Whether the manifest on disk still names this segment with this encoding (if not,
        a merge or a rebuild replaced it after we read the manifest: read it again)."""
        try:
            current = read_store_manifest(self.data_dir)
        except IndexCorruptError:
            return True
        return current is not None and uid in current.segments and current.ann.get(str(uid)) == codec_id

    def _codec(self, manifest: StoreManifest, codec_id: str) -> Codec:
        codec = self._codecs.get(codec_id)
        if codec is None:
            if codec_id not in manifest.codecs:
                raise IndexCorruptError(f"the vector index names codec {codec_id} but does not describe it: "
                                        "run 'visualsearch rebuild-index'")
            try:
                codec = Codec.load(self.segments_dir, codec_id, manifest.codec_plan(codec_id))
            except RuntimeError as exc:
                if not (self.segments_dir / f"codec-{codec_id}.ivf").exists():
                    raise FileNotFoundError(codec_id) from None
                raise IndexCorruptError(f"codec {codec_id} of the vector index is damaged: {exc}") from None
            self._codecs[codec_id] = codec
        return codec

    def snapshot(self) -> Snapshot:
        self.refresh()
        with self._lock:
            return self._state.snapshot()

    @property
    def count(self) -> int:
        """Live vectors."""
        return self.snapshot().alive_count

    def alive_ids(self) -> np.ndarray:
        """Every id with a live vector, ascending."""
        self.refresh()
        with self._lock:
            return np.flatnonzero(self._state.location >= 0)

    def get_vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, their vectors) for the live rows of ``ids``."""
        self.refresh()
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            uids, rows = self._state.lookup(ids)
            found = uids >= 0
            vectors = np.zeros((int(found.sum()), self.dim), dtype=np.float32)
            out = 0
            for position in np.flatnonzero(found):
                vectors[out] = self._state.segment(int(uids[position])).rows.vectors[rows[position]]
                out += 1
        return ids[found], vectors

    def search(self, queries: np.ndarray, k: int, filters: SearchFilters | None = None, *,
               nprobe: int | None = None, rerank: int | None = None) -> StoreHits:
        """The ``k`` best images for ``queries`` (several queries: an image's best score counts).

        Args:
            queries: (Q, dim) unit vectors.
            k: candidates wanted.
            filters: restrict to rows whose fields pass.
            nprobe, rerank: override the tuned search parameters (used by tuning).

        Raises:
            InvalidRequestError: queries of the wrong shape.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidRequestError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        filters = filters or SearchFilters()
        snap = self.snapshot()
        tuning = self._manifest.tuning if self._manifest else Tuning()
        nprobe = nprobe or tuning.nprobe
        depth = max(k, rerank or tuning.rerank)
        coarse_cache: dict[str, tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}
        found_ids, found_products, found_scores = [], [], []
        candidates: list[tuple[Segment, np.ndarray, np.ndarray]] = []  # ANN: (segment, rows, approx scores)
        for segment in snap.segments:
            alive = snap.alive[segment.uid]
            if filters.active:
                kept = self._filtered_rows(segment, alive, filters, nprobe)
            else:
                kept = FilteredRows(alive, self._alive_count(segment.uid, alive))
            if kept.count == 0:
                continue
            probes = self._probes(segment, kept.count, nprobe)
            if probes is None:
                rows, scores = self._exact(segment, queries, kept, k)
                found_ids.append(np.asarray(segment.rows.ids)[rows])
                found_products.append(np.asarray(segment.rows.product_ids)[rows])
                found_scores.append(scores)
                continue
            bitmap = None
            if kept.count < len(segment):
                bitmap = kept.bitmap if filters.active else self._alive_bitmap(segment, alive)
            candidates.append((segment, *self._ann(segment, queries, probes, depth, bitmap, coarse_cache)))
        for segment, rows, scores in _rerank(candidates, queries, depth, k):
            found_ids.append(np.asarray(segment.rows.ids)[rows])
            found_products.append(np.asarray(segment.rows.product_ids)[rows])
            found_scores.append(scores)
        if not found_ids:
            empty = np.zeros(0, dtype=np.int64)
            return StoreHits(empty, empty, np.zeros(0, dtype=np.float32))
        return _best(np.concatenate(found_ids), np.concatenate(found_products), np.concatenate(found_scores), k)

    def _probes(self, segment: Segment, allowed: int, nprobe: int) -> int | None:
        """Lists to probe in ``segment`` for ``allowed`` of its rows; None: scan them exactly."""
        if segment.ann is None:
            return None
        probes = filtered_probes(nprobe, allowed / len(segment), segment.ann.nlist)
        if filter_scans_exactly(allowed, len(segment), self.dim, probes, segment.ann.nlist):
            return None
        return probes

    def _filtered_rows(self, segment: Segment, alive: np.ndarray, filters: SearchFilters,
                       nprobe: int) -> FilteredRows:
        """The segment's live rows that pass ``filters``, in the form the search path will
        need (bitmap for the lists, rows and vectors for an exact scan); cached."""
        kept = self._filter_cache.get(segment.uid, alive, filters)
        mask = None
        if kept is None:
            mask = alive & segment.filter_mask(filters)
            kept = FilteredRows(alive, int(np.count_nonzero(mask)))
        # None or every row: searched as if unfiltered, nothing more to keep.
        partial = 0 < kept.count < len(segment)
        exact = partial and self._probes(segment, kept.count, nprobe) is None
        if partial and (kept.rows is None if exact else kept.bitmap is None):
            if mask is None:
                mask = alive & segment.filter_mask(filters)
            # A new entry, never a changed one: the cache accounts bytes per entry.
            if exact:
                rows = np.flatnonzero(mask)
                vectors = segment.read_vectors(rows) if len(rows) * self.dim * 4 <= FILTER_EXACT_BYTES else None
                kept = dataclasses.replace(kept, rows=rows, vectors=vectors)
            else:
                kept = dataclasses.replace(kept, bitmap=np.packbits(mask, bitorder="little"))
        if mask is not None:
            self._filter_cache.put(segment.uid, filters, kept)
        return kept

    def _exact(self, segment: Segment, queries: np.ndarray, kept: FilteredRows,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        if kept.count == len(segment):
            rows = None
            vectors = segment.rows.vectors
        elif kept.rows is not None:
            rows = kept.rows
            vectors = kept.vectors if kept.vectors is not None else segment.read_vectors(rows)
        else:  # unfiltered, some rows deleted
            rows = np.flatnonzero(kept.alive)
            vectors = segment.read_vectors(rows)
        scores = queries @ np.asarray(vectors).T  # (Q, n)
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < scores.shape[1] else \
            np.tile(np.arange(scores.shape[1]), (len(queries), 1))
        picked = np.take_along_axis(scores, top, axis=1).ravel()
        top = top.ravel()
        return (top if rows is None else rows[top]), picked

    def _ann(self, segment: Segment, queries: np.ndarray, probes: int, depth: int, bitmap: np.ndarray | None,
             coarse_cache: dict) -> tuple[np.ndarray, np.ndarray]:
        """(rows, approximate scores), both (Q, depth) with -1 rows where fewer were found."""
        codec = self._codecs[segment.codec_id]
        cached = coarse_cache.get(segment.codec_id)
        if cached is None or cached[1][1].shape[1] < probes:
            reduced = codec.reduce(queries)
            cached = coarse_cache[segment.codec_id] = (codec.scanned(queries, reduced), codec.coarse(reduced, probes))
        scanned, (distances, lists) = cached
        coarse = (distances[:, :probes], lists[:, :probes])
        scores, rows = search_segment(segment.ann, scanned, coarse, depth, bitmap)
        return rows, scores

    def _alive_count(self, uid: int, alive: np.ndarray) -> int:
        """Live rows of a segment, counted once per alive mask (masks are replaced, never
        changed): counting 1M-row masks of every segment cost ~3 ms per query at 10M."""
        key = (uid, id(alive))
        count = self._alive_counts.get(key)
        if count is None:
            count = int(np.count_nonzero(alive))
            with self._lock:
                self._alive_counts = {k: v for k, v in self._alive_counts.items() if k[0] != uid}
                self._alive_counts[key] = count
        return count

    def _alive_bitmap(self, segment: Segment, alive: np.ndarray) -> np.ndarray:
        """The segment's live rows as packed bits, once per alive mask (for unfiltered searches)."""
        key = (segment.uid, id(alive))  # an alive mask is replaced, never changed
        bitmap = self._bitmaps.get(key)
        if bitmap is None:
            bitmap = np.packbits(alive, bitorder="little")
            with self._lock:
                self._bitmaps = {k: v for k, v in self._bitmaps.items() if k[0] != segment.uid}
                self._bitmaps[key] = bitmap
        return bitmap

    # --- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the commit lock (between processes and threads), with the latest state loaded.

        Raises:
            WriterBusyError: another writer held it for ``timeout`` seconds.
        """
        if self.read_only:
            raise InvalidRequestError("this vector store was opened read-only")
        if self._writer == threading.get_ident():
            yield  # nested: the caller already holds the lock (and did the big merges' bookkeeping)
            return
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        # The writers' own mutex, not the state lock: searches in this process must not
        # queue behind a writer waiting for another process's commit.
        if not self._write_mutex.acquire(timeout=max(timeout, 0.001)):
            raise WriterBusyError(f"the vector index in {self.data_dir} is busy; try again")
        try:
            with file_lock(self.segments_dir / LOCK_FILE, max(deadline - time.monotonic(), 0.0),
                           f"another process has held the vector index of {self.data_dir} for {timeout:.0f}s; "
                           "try again later"):
                self._writer = threading.get_ident()
                try:
                    with self._lock:
                        self._reload()
                    yield
                finally:
                    self._writer = None
        finally:
            self._write_mutex.release()

    def commit(self, upserts: VectorRows | None = None, deletes: Sequence[int] = (), *,
               merge_limit: int | None = None, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        """Append ``upserts`` (rows replace older rows of the same ids) and delete ``deletes``.

        Args:
            merge_limit: the largest merge this call may perform (None: any size; an API
                write passes a small limit to stay fast).

        Raises:
            WriterBusyError: the commit lock stayed busy.
            OSError: the disk refused the write (nothing was committed).
        """
        upserts = upserts if upserts is not None else VectorRows.empty(self.dim)
        if not len(upserts) and not len(deletes):
            return
        nested = self._writer == threading.get_ident()
        with self.writing(lock_timeout):
            manifest = self._manifest or self._empty_manifest()
            uid = manifest.next_uid
            codec = self._current_codec() if len(upserts) >= MIN_ANN_SEGMENT_ROWS else None
            segment = Segment.write(self.segments_dir, uid, upserts, deletes=deletes, codec=codec)
            self._install([*self._state.segments, segment], manifest, next_uid=uid + 1)
            self._merge_locked(min(LOCKED_MERGE_ROWS, merge_limit or LOCKED_MERGE_ROWS))
        if not nested:
            self.merge(merge_limit)

    def merge(self, limit: int | None = None) -> None:
        """Run the merges the policy asks for, up to ``limit`` rows each (None: any size);
        those above LOCKED_MERGE_ROWS are built outside the commit lock."""
        with self.writing():
            big = self._merge_locked(min(LOCKED_MERGE_ROWS, limit or LOCKED_MERGE_ROWS))
        if big and (limit is None or limit > LOCKED_MERGE_ROWS):
            self._merge_unlocked(limit)

    def _empty_manifest(self) -> StoreManifest:
        plan = plan_index(0, self.dim, self.memory_budget)
        return StoreManifest(**self.identity, **self.recipe, plan=plan.to_dict())

    def _current_codec(self) -> Codec | None:
        manifest = self._manifest
        if manifest is None or manifest.codec is None:
            return None
        return self._codec(manifest, manifest.codec)

    def _install(self, order: list[Segment], manifest: StoreManifest, **changes) -> None:
        """Make ``order`` the committed segment list (caller holds the commit lock)."""
        with self._lock:  # searches see the state before or after, never halfway
            self._install_locked(order, manifest, **changes)

    def _install_locked(self, order: list[Segment], manifest: StoreManifest, **changes) -> None:
        previous = list(self._state.segments)
        codecs = changes.get("codecs", manifest.codecs)
        # A merge encoded outside the lock with a codec a rebuild has dropped since: keep
        # its rows, not its lists (maintenance re-encodes it with the current codec).
        for position, segment in enumerate(order):
            if segment.codec_id is not None and segment.codec_id not in codecs:
                for name in (segment.ann_file, segment.refine_file):
                    if name:
                        (self.segments_dir / name).unlink(missing_ok=True)
                order[position] = Segment(segment.uid, segment.rows, segment.deletes, segment.meta)
        self._state.move_to(order)
        ann = {str(s.uid): s.codec_id for s in order if s.codec_id}
        new = manifest.evolve(segments=tuple(s.uid for s in order), ann=ann, vectors=self._state.alive_count,
                              **changes)
        try:
            write_store_manifest(self.data_dir, new)
        except BaseException:
            self._state.move_to(previous)
            raise
        self._manifest, self._key = new, manifest_key(self.data_dir)
        self._loaded = {segment.uid: segment for segment in order}
        self._bitmaps.clear()
        self._alive_counts.clear()
        self._filter_cache.retain(self._loaded)
        kept = {name for segment in order for name in segment.file_names()}
        for segment in previous:
            for name in segment.file_names():
                if name not in kept:
                    # Readers that mapped the file keep their mapping after the unlink.
                    (self.segments_dir / name).unlink(missing_ok=True)

    # --- merging -------------------------------------------------------------------------

    def _merge_locked(self, limit: int) -> bool:
        """Merge newest segments while the policy asks and they fit ``limit`` rows.
        Returns True when a bigger merge is due."""
        while True:
            sizes = [self._alive_rows(s) for s in self._state.segments]
            span = plan_merge(sizes)
            if span is None:
                return False
            if sum(sizes[span[0]:span[1]]) > limit:
                return True
            self._merge_span(span)

    def _alive_rows(self, segment: Segment) -> int:
        alive = self._state.alive.get(segment.uid)
        return int(np.count_nonzero(alive)) if alive is not None else len(segment)

    def _merge_span(self, span: tuple[int, int]) -> None:
        manifest = self._manifest
        inputs = self._state.segments[span[0]:span[1]]
        uid = manifest.next_uid
        merged = self._write_merged(uid, inputs, self._state.alive, drop_deletes=span[0] == 0)
        order = [*self._state.segments[:span[0]], merged, *self._state.segments[span[1]:]]
        self._install(order, manifest, next_uid=uid + 1)

    def _write_merged(self, uid: int, inputs: Sequence[Segment], alive: dict[int, np.ndarray], *,
                      drop_deletes: bool, codec: Codec | None = None) -> Segment:
        rows = sum(int(np.count_nonzero(alive[s.uid])) for s in inputs)
        codec = codec or (self._current_codec() if rows >= MIN_ANN_SEGMENT_ROWS else None)
        # Deletes aimed at segments older than the merged ones must survive the merge;
        # merging from the oldest segment leaves nothing older to aim at.
        deletes = np.zeros(0, np.int64) if drop_deletes else \
            np.concatenate([np.asarray(s.deletes) for s in inputs] or [np.zeros(0, np.int64)])
        return Segment.write_merged(self.segments_dir, uid, [(s, alive[s.uid]) for s in inputs],
                                    deletes=deletes, codec=codec, dim=self.dim)

    def _merge_unlocked(self, limit: int | None) -> None:
        """Build a big merge outside the commit lock; install it if its inputs are unchanged."""
        while True:
            with self.writing():
                sizes = [self._alive_rows(s) for s in self._state.segments]
                span = plan_merge(sizes)
                if span is None or (limit is not None and sum(sizes[span[0]:span[1]]) > limit):
                    return
                inputs = list(self._state.segments[span[0]:span[1]])
                alive = dict(self._state.alive)
                uid = self._manifest.next_uid
                self._install(list(self._state.segments), self._manifest, next_uid=uid + 1)  # reserve uid
            merged = self._write_merged(uid, inputs, alive, drop_deletes=span[0] == 0)
            with self.writing():
                if not self._replace(inputs, merged):
                    logger.info("segments changed during a merge; dropping segment %s", merged.uid)
                    for name in merged.file_names():
                        (self.segments_dir / name).unlink(missing_ok=True)
                    return

    def _replace(self, inputs: Sequence[Segment], merged: Segment) -> bool:
        uids = [s.uid for s in self._state.segments]
        wanted = [s.uid for s in inputs]
        for start in range(len(uids) - len(wanted) + 1):
            if uids[start:start + len(wanted)] == wanted:
                order = [*self._state.segments[:start], merged, *self._state.segments[start + len(wanted):]]
                self._install(order, self._manifest)
                return True
        return False

    def compact(self, *, force_merge: bool = True) -> bool:
        """Rewrite each segment that holds dead rows without them, one segment at a time
        (so the disk needs room for one more segment, not for a second copy of the
        catalogue), then merge small segments, and with ``force_merge`` pack adjacent
        segments into as few as MAX_SEGMENT_ROWS allows (fewer segments, faster searches).
        Returns True when anything changed."""
        changed = False
        with self.writing():
            # The targets are fixed now: writes arriving meanwhile kill rows somewhere all
            # the time, and chasing them would never end.
            segments = self._state.segments
            targets = [segment.uid for i, segment in enumerate(segments)
                       if self._alive_rows(segment) < len(segment) or (i == 0 and len(segment.deletes))]
        for target in targets:
            with self.writing():
                segments = self._state.segments
                uids = [segment.uid for segment in segments]
                if target not in uids:
                    continue  # merged away meanwhile
                position = uids.index(target)
                inputs = [segments[position]]
                alive = dict(self._state.alive)
                uid = self._manifest.next_uid
                self._install(list(segments), self._manifest, next_uid=uid + 1)  # reserve the uid
            merged = self._write_merged(uid, inputs, alive, drop_deletes=position == 0)
            with self.writing():
                if self._replace(inputs, merged):
                    changed = True
                    continue
            for name in merged.file_names():
                (self.segments_dir / name).unlink(missing_ok=True)
        count = len(self._state.segments)
        self.merge(None)
        if force_merge:
            self._force_merge()
        return changed or len(self._state.segments) != count

    def _force_merge(self) -> None:
        """Pack adjacent segments into as few as the size cap allows (one at a time)."""
        while True:
            with self.writing():
                sizes = [self._alive_rows(s) for s in self._state.segments]
                span = plan_force_merge(sizes)
                if span is None:
                    return
                inputs = list(self._state.segments[span[0]:span[1]])
                alive = dict(self._state.alive)
                uid = self._manifest.next_uid
                self._install(list(self._state.segments), self._manifest, next_uid=uid + 1)  # reserve the uid
            merged = self._write_merged(uid, inputs, alive, drop_deletes=span[0] == 0)
            with self.writing():
                if not self._replace(inputs, merged):
                    for name in merged.file_names():
                        (self.segments_dir / name).unlink(missing_ok=True)
                    return  # the segments changed meanwhile: leave the rest to the next compact

    # --- planning, rebuilding, tuning -------------------------------------------------

    def maintenance(self) -> str | None:
        """What the store needs: "rebuild" (the plan no longer suits the vector count),
        "reencode" (big segments not encoded with the current codec), "tune" (the search
        parameters were never measured with the current codec, or at a much smaller
        catalogue), "compact" (too many dead rows), or None."""
        manifest = self._manifest
        if manifest is None:
            return None
        snap = self.snapshot()
        rows = sum(len(s) for s in snap.segments)
        try:
            replan = needs_replan(manifest.index_plan, snap.alive_count, self.dim, self.memory_budget)
        except ValueError as exc:  # the budget is too small for any plan: keep the current one
            logger.warning("%s; keeping the current index plan", exc)
            replan = False
        if replan:
            return "rebuild"
        if any(s.codec_id != _wanted_codec(s, manifest.codec) for s in snap.segments):
            return "reencode"
        if manifest.codec is not None and (
                manifest.tuning.codec != manifest.codec
                # Tunings made before their size was recorded count as of the plan's size.
                or needs_retune(manifest.tuning.vectors or manifest.index_plan.planned_for, snap.alive_count)):
            return "tune"
        if needs_compaction(snap.alive_count, rows):
            return "compact"
        return None

    def maintain(self) -> str | None:
        """Do what :meth:`maintenance` says; returns what was done."""
        needed = self.maintenance()
        if needed == "rebuild":
            self.rebuild()
        elif needed == "reencode":
            self._reencode(self._current_codec())
            with self.writing():
                self._forget_unused_codecs()
        elif needed == "tune":
            tuning = self.tune()
            plan = self._manifest.index_plan
            better = escalate(plan, self.memory_budget) if plan else None
            if (tuning.recall_at_10 or 0.0) < TARGET_RECALL and better is not None:
                # The catalogue outgrew what these codes can reach: finer ones, as a rebuild would.
                logger.info("recall@10 %.3f with %s after growth: rebuilding with %s", tuning.recall_at_10,
                            plan.description, better.description)
                self.rebuild(plan=better)
                needed = "rebuild"
        elif needed == "compact":
            self.compact(force_merge=False)  # packing every segment is for `visualsearch compact`
        return needed

    def rebuild(self, *, plan: IndexPlan | None = None, tune: bool = True, seed: int = 1234) -> IndexPlan:
        """Re-plan the index for the current vector count (or use ``plan``), train its
        codec, re-encode every segment with it (segment by segment: the stored vectors
        are not rewritten) and tune the search parameters. No model work.

        Searches go on meanwhile, each segment with the encoding it has; writes that
        arrive meanwhile are encoded with the new codec.

        Returns:
            The plan now in force.

        Raises:
            ConfigurationError: the memory budget is too small for the vector count.
        """
        with self.writing():
            manifest = self._manifest
            if manifest is None:
                return plan_index(0, self.dim, self.memory_budget)
            count = self._state.alive_count
        try:
            plan = plan or plan_index(count, self.dim, self.memory_budget)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        while True:
            codec = self._adopt_plan(plan, seed)
            self._reencode(codec)
            with self.writing():
                self._forget_unused_codecs()
            if not tune or plan.kind != "ivf":
                return plan
            tuning = self.tune(seed=seed)
            better = escalate(plan, self.memory_budget)
            if (tuning.recall_at_10 or 0.0) >= TARGET_RECALL or better is None:
                return plan
            logger.info("recall@10 %.3f with %s: rebuilding with %s", tuning.recall_at_10, plan.description,
                        better.description)
            plan = better

    def _adopt_plan(self, plan: IndexPlan, seed: int) -> Codec | None:
        """Train the plan's codec (outside the lock) and make it the one new segments use."""
        with self.writing():
            uid = self._manifest.next_uid
            self._install(list(self._state.segments), self._manifest, next_uid=uid + 1)  # reserve an id
            snap = self._state.snapshot()
        codec = None
        if plan.kind == "ivf":
            codec = Codec.train(f"{uid:08d}", plan, _sample(snap.segments, snap.alive, seed), seed=seed)
            codec.save(self.segments_dir)
            self._codecs[codec.codec_id] = codec
        with self.writing():
            codecs = dict(self._manifest.codecs)
            if codec is not None:
                codecs[codec.codec_id] = plan.to_dict()
            # The previous tuning stays in force (a better guess than nprobe 1) until
            # tune() has measured the new codec; maintenance() asks for that.
            self._install(list(self._state.segments), self._manifest, codecs=codecs,
                          codec=codec.codec_id if codec else None, plan=plan.to_dict())
        return codec

    def _reencode(self, codec: Codec | None) -> None:
        """Give every segment the encoding the current codec calls for, one at a time."""
        done: set[int] = set()
        while True:
            with self.writing():
                wanted_codec = self._manifest.codec
                segment = next((s for s in self._state.segments if s.uid not in done
                                and s.codec_id != _wanted_codec(s, wanted_codec)), None)
            if segment is None or (codec is not None and codec.codec_id != wanted_codec):
                return  # done, or another rebuild took over
            done.add(segment.uid)
            if codec is not None and _wanted_codec(segment, wanted_codec):
                with all_cores():  # a re-plan is batch work, like training
                    encoded = segment.encoded(self.segments_dir, codec)
            else:
                encoded = Segment(segment.uid, segment.rows, segment.deletes, segment.meta)
            with self.writing():
                order = list(self._state.segments)
                uids = [s.uid for s in order]
                # Another rebuild may have replaced the codec meanwhile: then these lists
                # are of a codec on its way out, and that rebuild encodes the segment.
                current = codec is None or self._manifest.codec == codec.codec_id
                if segment.uid in uids and current:
                    order[uids.index(segment.uid)] = encoded
                    self._install(order, self._manifest)
                else:
                    for name in (encoded.ann_file, encoded.refine_file):
                        if name:
                            (self.segments_dir / name).unlink(missing_ok=True)
                    if not current:
                        return

    def _forget_unused_codecs(self) -> None:
        """Drop codecs no segment uses any more (caller holds the commit lock)."""
        manifest = self._manifest
        used = {s.codec_id for s in self._state.segments if s.codec_id} | ({manifest.codec} - {None})
        unused = set(manifest.codecs) - used
        if not unused:
            return
        codecs = {key: value for key, value in manifest.codecs.items() if key in used}
        self._install(list(self._state.segments), manifest, codecs=codecs)
        for codec_id in unused:
            self._codecs.pop(codec_id, None)
            for suffix in CODEC_SUFFIXES:
                (self.segments_dir / f"codec-{codec_id}{suffix}").unlink(missing_ok=True)

    def tune(self, *, queries: int = TUNING_QUERIES, target: float = TUNING_GOAL, seed: int = 1234) -> Tuning:
        """Choose the cheapest ``nprobe`` and re-rank depth whose recall@10 against exact
        search reaches ``target`` on a sample of the catalogue's own vectors, and record it.

        For each re-rank depth it probes more lists until the target is reached or the
        recall stops rising (the depth, not the lists, then limits it); depths whose
        re-ranking alone costs more than the best choice so far are not tried.
        """
        snap = self.snapshot()
        codec = self._manifest.codec if self._manifest else None
        sample_ids, sample = _sample_with_ids(snap, min(queries, snap.alive_count), seed + 1)
        if not len(sample):
            return self._manifest.tuning if self._manifest else Tuning()
        truth = _exact_neighbours(snap, sample, sample_ids, 10)
        count, nlist = snap.alive_count, self._nlist()
        trials: list[TuningTrial] = []
        best = math.inf
        for rerank in RERANK_STEPS:
            if rerank > DEFAULT_RERANK and rerank > count * MAX_RERANK_SHARE:
                break  # that is an exact search in disguise: better codes are the answer (escalate)
            if search_cost(0, rerank, count, nlist) >= best:
                break  # deeper re-ranks only cost more
            recalls: list[float] = []
            for nprobe in [step for step in NPROBE_STEPS if step < nlist] + [nlist]:
                if search_cost(nprobe, rerank, count, nlist) >= best:
                    break
                recalls.append(self._recall(sample, sample_ids, truth, nprobe, rerank))
                trials.append(TuningTrial(nprobe, rerank, recalls[-1]))
                if recalls[-1] >= target:
                    best = search_cost(nprobe, rerank, count, nlist)
                    break
                if recall_plateaued(recalls):
                    break
        trial = choose_tuning(trials, target, count, nlist)
        chosen = Tuning(nprobe=trial.nprobe, rerank=trial.rerank, recall_at_10=round(trial.recall, 4),
                        queries=len(sample), measured_at=time.time(), codec=codec, vectors=count)
        with self.writing():
            if self._manifest.codec != codec:
                # A rebuild replaced the codec while this measured the old one (minutes at
                # 10M): these settings say nothing about the new codec, which tunes itself.
                logger.info("the codec changed while tuning; the measured settings are dropped")
                return chosen
            self._install(list(self._state.segments), self._manifest, tuning=chosen)
        logger.info("tuned the vector index: nprobe %s, re-rank %s, recall@10 %.3f (%d settings tried)",
                    chosen.nprobe, chosen.rerank, chosen.recall_at_10, len(trials))
        return chosen

    def _nlist(self) -> int:
        plan = self._manifest.index_plan if self._manifest else None
        return plan.nlist if plan and plan.nlist else 1

    def _recall(self, sample: np.ndarray, sample_ids: np.ndarray, truth: list[set[int]], nprobe: int,
                rerank: int) -> float:
        hits = 0
        total = 0
        for query, own_id, expected in zip(sample, sample_ids, truth):
            found = self.search(query[None, :], 11, nprobe=nprobe, rerank=rerank)
            got = [i for i in found.ids.tolist() if i != own_id][:10]
            hits += len(expected.intersection(got))
            total += len(expected)
        return hits / total if total else 1.0

    def warm_page_cache(self, *, stop: threading.Event | None = None) -> int:
        """Read what every search reads into the page cache, as a server starts
        (``pg_prewarm`` for the index): each segment's inverted lists (a search
        probes a few of each segment's lists; a cold list is a page fault per page, and at
        10M the first hundreds of searches took 200 ms for them), then its re-rank codes
        (hundreds of candidates per search; each an uncached disk read). Reads in chunks,
        so ``stop`` (set when the process shuts down) ends it within one chunk. The
        float32 vectors are left out: a search reads a few dozen of them.

        Returns:
            The bytes read: 0 when there is nothing to read, or when it would take
            more than WARM_MEMORY_SHARE of the memory this process may use (it would
            only evict itself).
        """
        segments = self.snapshot().segments
        lists = [self.segments_dir / segment.ann_file for segment in segments if segment.ann_file]
        codes = [segment.refine for segment in segments if segment.refine is not None]
        total = sum(_file_size(path) for path in lists) + sum(code.codes.nbytes for code in codes)
        memory = physical_memory()
        if not total or (memory and total > memory * WARM_MEMORY_SHARE):
            if total:
                logger.info("not warming %.1f GB of ANN lists and re-rank codes: more than %d %% of the %.1f GB "
                            "of memory here", total / 1e9, WARM_MEMORY_SHARE * 100, memory / 1e9)
            return 0
        for path in lists:
            warm_file(path, stop=stop)
        for code in codes:
            code.reader.warm(stop=stop)
        return total

    # --- housekeeping --------------------------------------------------------------------

    def collect_leftovers(self) -> list[str]:
        """Delete files no committed state references: temporary files of writes that died,
        and segments or codecs replaced or never installed (after a grace period, since a
        merge elsewhere may be about to install them). Returns the names removed."""
        if not self.segments_dir.is_dir():
            return []
        removed = []
        with self.writing():
            manifest = self._manifest
            keep = set()
            for segment in self._state.segments:
                keep.update(segment.file_names())
            for codec_id in (manifest.codecs if manifest else {}):
                keep.update(f"codec-{codec_id}{suffix}" for suffix in CODEC_SUFFIXES)
            now = time.time()
            for path in self.segments_dir.iterdir():
                name = path.name
                if name == LOCK_FILE or name in keep:
                    continue
                ours = name.endswith((SEGMENT_SUFFIX, *CODEC_SUFFIXES, ".tmp")) or name.startswith(".seg-")
                if not ours:
                    continue
                try:
                    old = now - path.stat().st_mtime > LEFTOVER_GRACE_SECONDS
                except FileNotFoundError:
                    continue
                if old or writer_gone(name):
                    path.unlink(missing_ok=True)
                    removed.append(name)
            for path in self.data_dir.glob(".manifest.json.*.tmp"):
                if writer_gone(path.name) or now - path.stat().st_mtime > LEFTOVER_GRACE_SECONDS:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return removed

    def stats(self) -> StoreStats:
        snap = self.snapshot()
        manifest = self._manifest
        disk = 0
        for segment in snap.segments:
            for name in segment.file_names():
                with contextlib.suppress(FileNotFoundError):
                    disk += (self.segments_dir / name).stat().st_size
        return StoreStats(
            vectors=snap.alive_count, rows=sum(len(s) for s in snap.segments), segments=len(snap.segments),
            ann_segments=sum(1 for s in snap.segments if s.ann is not None),
            index_type=manifest.index_type if manifest else "Flat (exact)",
            plan=dict(manifest.plan) if manifest else {}, tuning=asdict(manifest.tuning) if manifest else {},
            disk_bytes=disk,
        )


def _wanted_codec(segment: Segment, codec: str | None) -> str | None:
    """The encoding a segment should have: the current codec, unless it is too small to need one."""
    return codec if codec is not None and len(segment) >= MIN_ANN_SEGMENT_ROWS else None


def _rerank(candidates: list[tuple[Segment, np.ndarray, np.ndarray]], queries: np.ndarray,
            depth: int, k: int) -> list[tuple[Segment, np.ndarray, np.ndarray]]:
    """Exact scores for the ``depth`` best approximate candidates of each query, over all
    ANN segments together (the segments share a codec, so their approximate scores
    compare): re-ranking reads ``depth`` stored vectors per query, however many
    segments there are. Where the codec keeps re-rank codes (see .refine), the
    candidates are ranked on those first and only the best :func:`refined_depth` of them
    are read exactly."""
    out = []
    for q, query in enumerate(queries):
        picks = _best_rows([(segment, rows[q], scores[q]) for segment, rows, scores in candidates], depth)
        picks = _refined(picks, query, refined_depth(k))
        # Every segment's reads are issued before any is waited for (see .row_reads).
        runs = [segment.prefetch(picked) for segment, picked in picks]
        for (segment, picked), segment_runs in zip(picks, runs):
            exact = segment.read_vectors(picked, runs=segment_runs) @ query
            out.append((segment, picked, exact.astype(np.float32)))
    return out


def _refined(picks: list[tuple[Segment, np.ndarray]], query: np.ndarray,
             keep: int) -> list[tuple[Segment, np.ndarray]]:
    """``picks`` (segment, sorted rows) cut to the ``keep`` best by their re-rank codes,
    over every segment that has them; the rows of segments without (encoded by an
    older codec while a re-plan runs) stay, to be read exactly."""
    coded = [(segment, rows) for segment, rows in picks if segment.refine is not None]
    if sum(len(rows) for _, rows in coded) <= keep:
        return picks
    runs = [segment.refine.reader.prefetch(rows) for segment, rows in coded]
    scored = [(segment, rows, segment.refine.scale.scores(segment.refine.reader.read(rows, runs=segment_runs), query))
              for (segment, rows), segment_runs in zip(coded, runs)]
    return _best_rows(scored, keep) + [(segment, rows) for segment, rows in picks if segment.refine is None]


def _best_rows(parts: list[tuple[Segment, np.ndarray, np.ndarray]], keep: int) -> list[tuple[Segment, np.ndarray]]:
    """The ``keep`` best-scored rows of ``parts`` (segment, rows, scores; row -1: none)
    pooled over all of them, as (segment, its sorted distinct rows) per segment kept."""
    owners = np.concatenate([np.full(len(rows), index) for index, (_, rows, _) in enumerate(parts)] or
                            [np.zeros(0, np.int64)])
    rows = np.concatenate([rows for _, rows, _ in parts] or [np.zeros(0, np.int64)])
    scores = np.concatenate([scores for _, _, scores in parts] or [np.zeros(0, np.float32)])
    valid = rows >= 0
    owners, rows, scores = owners[valid], rows[valid], scores[valid]
    if len(rows) > keep:
        best = np.argpartition(-scores, keep - 1)[:keep]
        owners, rows = owners[best], rows[best]
    return [(parts[index][0], np.unique(rows[owners == index])) for index in np.unique(owners).tolist()]


def _best(ids: np.ndarray, products: np.ndarray, scores: np.ndarray, k: int) -> StoreHits:
    """One entry per id (its best score), the ``k`` best, best first."""
    order = np.lexsort((-scores, ids))  # by id, best score first within an id
    ids, products, scores = ids[order], products[order], scores[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    ids, products, scores = ids[first], products[first], scores[first]
    top = np.argsort(-scores, kind="stable")[:k]
    return StoreHits(ids[top], products[top], scores[top])


def _sample(inputs: Sequence[Segment], alive: dict[int, np.ndarray], seed: int) -> np.ndarray:
    """Up to MAX_TRAIN_POINTS live vectors drawn evenly from the segments."""
    total = sum(int(np.count_nonzero(alive[s.uid])) for s in inputs)
    rng = np.random.default_rng(seed)
    share = min(1.0, MAX_TRAIN_POINTS / max(total, 1))
    parts = []
    for segment in inputs:
        rows = np.flatnonzero(alive[segment.uid])
        if share < 1.0:
            rows = np.sort(rng.choice(rows, int(math.ceil(len(rows) * share)), replace=False)) if len(rows) else rows
        if len(rows):
            parts.append(np.asarray(segment.rows.vectors[rows]))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _sample_with_ids(snap: Snapshot, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = [(segment, np.flatnonzero(snap.alive[segment.uid])) for segment in snap.segments]
    sizes = np.array([len(rows) for _, rows in pool], dtype=np.int64)
    if count <= 0 or sizes.sum() == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    picks = np.sort(rng.choice(int(sizes.sum()), count, replace=False))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    ids, vectors = [], []
    for (segment, rows), start, end in zip(pool, bounds[:-1], bounds[1:]):
        local = picks[(picks >= start) & (picks < end)] - start
        if len(local):
            ids.append(np.asarray(segment.rows.ids)[rows[local]])
            vectors.append(np.asarray(segment.rows.vectors[rows[local]]))
    return np.concatenate(ids), np.concatenate(vectors)


def _exact_neighbours(snap: Snapshot, queries: np.ndarray, own_ids: np.ndarray, k: int) -> list[set[int]]:
    """Exact top-``k`` ids of each query among the live vectors, its own id left out.

    Scores each chunk straight from the segment's mapping (no copy of the chunk) and
    keeps only its best k + 1 per query: at 10M images this reads 51 GB once."""
    best_scores = np.full((len(queries), k + 1), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k + 1), -1, dtype=np.int64)
    chunk = 65_536
    for segment in snap.segments:
        alive = snap.alive[segment.uid]
        ids = np.asarray(segment.rows.ids)
        for start in range(0, len(segment), chunk):
            mask = alive[start:start + chunk]
            if not mask.any():
                continue
            scores = queries @ np.asarray(segment.rows.vectors[start:start + len(mask)]).T
            scores[:, ~mask] = -np.inf
            take = min(k + 1, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            all_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
            all_ids = np.concatenate([best_ids, ids[start + top]], axis=1)
            keep = np.argpartition(-all_scores, k, axis=1)[:, :k + 1]
            best_scores = np.take_along_axis(all_scores, keep, axis=1)
            best_ids = np.take_along_axis(all_ids, keep, axis=1)
    truth = []
    for own, ids_row, scores_row in zip(own_ids, best_ids, best_scores):
        ranked = [int(i) for i, s in zip(ids_row[np.argsort(-scores_row)], np.sort(-scores_row))
                  if i != own and i >= 0 and np.isfinite(s)]
        truth.append(set(ranked[:k]))
    return truth


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # merged away since the snapshot
        return 0


def physical_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit
    (cgroup v2 ``memory.max``) when lower; 0 where the OS does not say."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        memory = 0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return memory
    if limit.isdigit() and (not memory or int(limit) < memory):
        return int(limit)
    return memory


def configure_threads(*, serving: bool = False) -> None:
    """FAISS searches one query at a time here: its OpenMP threads only cost (2.4-9x
    slower than one thread for single queries on 2 cores). Training sets its own.

    A serving process (``serving=True``: the web app, ``visualsearch search``) also
    keeps numpy's BLAS to one thread: its products are one query against at most a few
    thousand vectors, where waking a second thread costs more than it saves (and under
    load, with every worker busy, far more). Batch work (tuning) keeps its threads.
    """
    faiss.omp_set_num_threads(1)
    if serving:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")


def filtered_probes(nprobe: int, share: float, nlist: int) -> int:
    """Lists to probe for a filter keeping ``share`` of a segment's rows: nprobe / sqrt(share).

    The filter leaves about that share of each list, so more lists must be probed. As
    many as nprobe / share (as many allowed candidates as an unfiltered search) over-probes,
    and so does also requiring re-rank-depth allowed candidates. Measured at 1M images in
    one process (`benchmarks.scale --search-only` data, p50 ms; recall@10 from the
    benchmark), nprobe / share -> / sqrt(share): a 2 % category 6.6 -> 3.8 ms (recall
    1.000 -> 0.999), a price range keeping 10 % 6.2 -> 4.7 ms (0.998 -> 0.996), 50 %
    4.0 -> 3.9 ms (0.982 -> 0.977).
    """
    return max(1, min(nlist, math.ceil(nprobe / math.sqrt(share))))


def filter_scans_exactly(allowed_rows: int, segment_rows: int, dim: int, probes: int, nlist: int) -> bool:
    """Whether a filtered search of one ANN segment should scan the allowed rows exactly.

    Exact costs a scattered read and a dot product per allowed row; the ANN path scans
    ``probes`` lists of codes (each about segment_rows / nlist long), checking the filter's
    bitmap. A few allowed rows in a big segment: exact (the lists would be scanned almost
    whole for them). Many: the lists. Never more than FILTER_EXACT_BYTES of vectors.
    """
    if allowed_rows * dim * 4 > FILTER_EXACT_BYTES:
        return False
    scanned_codes = min(segment_rows, probes * segment_rows / max(nlist, 1))
    return allowed_rows * EXACT_ROW_COST_IN_CODES <= scanned_codes
