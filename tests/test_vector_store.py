"""VectorStore against brute force: every index type, writes and merges, filters, readers, crashes, damage.

The store is small here (a few thousand 32-dimensional vectors), so its size
thresholds are lowered (:func:`ann_thresholds`) to make the IVF paths run: ANN
searches, bitmap-filtered ANN searches, ANN-encoded merges and re-encodings.

A rebuild re-encodes each segment in place (``seg-<uid>.<codec>.ivf`` next to the
untouched ``seg-<uid>.vseg``) and a compaction rewrites one segment at a time, so
neither leaves the store in one segment: tests assert the invariants instead (every
segment big enough has the current codec's lists, no dead rows after a compaction,
no stale files, results equal to brute force).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import visualsearch
from visualsearch.errors import BackboneMismatchError, IndexCorruptError, InvalidRequestError, WriterBusyError
from visualsearch.vectors import IndexPlan, SearchFilters, VectorRows, VectorStore, row_reads, row_tokens
from visualsearch.vectors import planner as planner_module
from visualsearch.vectors import refine as refine_module
from visualsearch.vectors import segment as segment_module
from visualsearch.vectors import store as store_module
from visualsearch.vectors.filter_cache import FilterCache, FilteredRows
from visualsearch.vectors.manifest import MANIFEST_NAME, read_store_manifest
from visualsearch.vectors.planner import MERGE_FACTOR
from visualsearch.vectors.segment import ANN_SUFFIX, SEGMENT_SUFFIX, Segment, ann_file_name, segment_name

DIM = 32
BACKBONE, SHA = "test_tiny", "ab" * 32
BUDGET = 1024**3
ROWS = 3000
NLIST = 16
REPO = Path(visualsearch.__file__).resolve().parent.parent
CENTRES = np.random.default_rng(7).standard_normal((40, DIM)).astype(np.float32)

PLANS: dict[str, IndexPlan | None] = {
    "flat": None,  # what the planner picks for 3,000 x 32
    "ivf": IndexPlan(kind="ivf", dim=DIM, planned_for=ROWS, nlist=NLIST, encoding="SQ8", code_bytes=DIM),
    "ivf_pca": IndexPlan(kind="ivf", dim=DIM, planned_for=ROWS, nlist=NLIST, reduce_dim=16, encoding="SQ8",
                         code_bytes=16),
    # What the planner picks for long vectors: 1-bit codes of every dimension, lists assigned in PCA space.
    "ivf_rabitq": IndexPlan(kind="ivf", dim=DIM, planned_for=ROWS, nlist=NLIST, reduce_dim=16, encoding="RaBitQ",
                            code_bytes=12),
    # Past 8 GiB of vectors: candidates ranked again on 8-bit codes before the exact re-rank.
    "ivf_rabitq_refine": IndexPlan(kind="ivf", dim=DIM, planned_for=ROWS, nlist=NLIST, reduce_dim=16,
                                   encoding="RaBitQ", code_bytes=12, refine="SQ8"),
}
DESCRIPTIONS = {"flat": "Flat (exact)", "ivf": "IVF16,SQ8 + exact re-rank",
                "ivf_pca": "PCA16,IVF16,SQ8 + exact re-rank",
                "ivf_rabitq": "IVF16,RaBitQ (lists assigned in PCA16) + exact re-rank",
                "ivf_rabitq_refine": "IVF16,RaBitQ (lists assigned in PCA16) + SQ8 re-rank + exact re-rank"}
# Lowered thresholds (see the module docstring): filters passing at most this many rows
# of a segment are scanned exactly, and segments of this many rows are ANN-encoded.
EXACT_FILTER_ROWS = 150
ANN_SEGMENT_ROWS = 256


# --- data and the brute-force oracle ------------------------------------------------------------

CATEGORIES = ("Électronique", "ÉLECTRONIQUE", "électronique", "Straße", "STRASSE", "Shoes", "Bags")
BRANDS = ("Acme", "Globex", "Initech")
COLOURS = ("red", "Red", "RED", "blue", "green")
SIZES = ("S", "M", "L")


@dataclass(frozen=True)
class Row:
    id: int
    product_id: int
    vector: np.ndarray
    price: float | None
    category: str
    brand: str
    attributes: dict[str, Any] = field(default_factory=dict)


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, count: int) -> np.ndarray:
    """Unit vectors around 40 fixed centres (like embeddings of a few product kinds)."""
    return unit(CENTRES[rng.integers(0, len(CENTRES), count)] + 0.35 * rng.standard_normal((count, DIM)))


def make_rows(rng: np.random.Generator, ids, *, product_id: int | None = None) -> list[Row]:
    ids = [int(i) for i in ids]
    vectors = clustered(rng, len(ids))
    rows = []
    for image_id, vector in zip(ids, vectors):
        price = None if rng.random() < 0.05 else round(float(rng.uniform(5, 200)), 2)
        sizes = sorted(str(s) for s in rng.choice(SIZES, int(rng.integers(0, 3)), replace=False))
        rows.append(Row(id=image_id, product_id=image_id // 2 if product_id is None else product_id,
                        vector=vector, price=price, category=str(rng.choice(CATEGORIES)),
                        brand=str(rng.choice(BRANDS)),
                        attributes={"colour": str(rng.choice(COLOURS)), "in_stock": bool(rng.random() < 0.5),
                                    "sizes": sizes}))
    return rows


def to_vector_rows(rows: list[Row]) -> VectorRows:
    return VectorRows.build(
        ids=[r.id for r in rows], product_ids=[r.product_id for r in rows],
        vectors=np.stack([r.vector for r in rows]) if rows else np.zeros((0, DIM), np.float32),
        prices=[r.price for r in rows],
        tokens=[row_tokens(category=r.category, brand=r.brand, attributes=r.attributes) for r in rows], dim=DIM)


class Catalogue:
    """The live rows the store must hold: the brute-force oracle."""

    def __init__(self, rows: dict[int, Row] | None = None):
        self.rows: dict[int, Row] = dict(rows or {})

    def copy(self) -> "Catalogue":
        return Catalogue(self.rows)

    def commit(self, store: VectorStore, upserts: list[Row] = (), deletes=()) -> None:
        store.commit(to_vector_rows(list(upserts)) if upserts else None, deletes=[int(i) for i in deletes])
        self.apply(upserts, deletes)

    def apply(self, upserts, deletes) -> None:
        for row in upserts:
            self.rows[row.id] = row
        for image_id in deletes:
            self.rows.pop(int(image_id), None)

    def passing(self, passes: Callable[[Row], bool] | None = None) -> list[Row]:
        return [row for row in self.rows.values() if passes is None or passes(row)]

    def queries(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Queries near catalogue vectors (a photo of a product that is in the catalogue)."""
        rows = list(self.rows.values())
        picks = rng.choice(len(rows), count, replace=False)
        # (cosine about 0.96 to the catalogue vector; tuning measures recall with the vectors themselves)
        return unit(np.stack([rows[i].vector for i in picks]) + 0.05 * rng.standard_normal((count, DIM)))


def open_store(data_dir: Path, *, read_only: bool = False, **identity) -> VectorStore:
    args = {"backbone": BACKBONE, "weights_sha256": SHA, "dim": DIM, **identity}
    return VectorStore(data_dir, memory_budget=BUDGET, read_only=read_only, **args)


def check_search(store: VectorStore, catalogue: Catalogue, queries: np.ndarray, *, k: int = 10,
                 filters: SearchFilters | None = None, passes: Callable[[Row], bool] | None = None,
                 min_recall: float = 1.0, **search_args) -> float:
    """Search each query and compare with brute force over the rows that pass; returns recall@k.

    Whatever the recall, every hit must be a live row that passes, once, with its exact
    cosine as score, best first; ``min_recall=1.0`` asks for the exact top ``k`` (equal
    scores may come in either order).
    """
    rows = catalogue.passing(passes)
    ids = np.array([r.id for r in rows], dtype=np.int64)
    vectors = np.stack([r.vector for r in rows]) if rows else np.zeros((0, DIM), np.float32)
    found = wanted = 0
    for query in queries:
        hits = store.search(query, k, filters, **search_args)
        scores = vectors @ query
        best = np.argsort(-scores, kind="stable")[:k]
        got = hits.ids.tolist()
        assert len(set(got)) == len(got), "an id came back twice"
        assert len(got) == min(k, len(rows)) or min_recall < 1.0
        for image_id, product_id, score in zip(got, hits.product_ids.tolist(), hits.scores.tolist()):
            row = catalogue.rows.get(image_id)
            assert row is not None, f"id {image_id} is deleted but was returned"
            assert passes is None or passes(row), f"id {image_id} does not pass the filter"
            assert product_id == row.product_id
            assert score == pytest.approx(float(row.vector @ query), abs=1e-5)
        assert np.all(np.diff(hits.scores) <= 1e-6), "hits are not best first"
        if min_recall >= 1.0:
            np.testing.assert_allclose(hits.scores, scores[best], atol=1e-5)
        found += len(set(got) & set(ids[best].tolist()))
        wanted += len(best)
    recall = found / wanted if wanted else 1.0
    assert recall >= min_recall
    return recall


def live_state(store: VectorStore) -> dict[int, np.ndarray]:
    """id -> vector of every live row, from one snapshot."""
    snap = store.snapshot()
    state: dict[int, np.ndarray] = {}
    for segment in snap.segments:
        alive = snap.alive[segment.uid]
        for image_id, vector in zip(np.asarray(segment.rows.ids)[alive].tolist(),
                                    np.asarray(segment.rows.vectors)[alive]):
            assert image_id not in state, f"id {image_id} is alive twice"
            state[image_id] = vector
    assert snap.alive_count == len(state)
    return state


def assert_state(store: VectorStore, rows: dict[int, Row]) -> None:
    state = live_state(store)
    assert sorted(state) == sorted(rows)
    for image_id, vector in state.items():
        np.testing.assert_array_equal(vector, rows[image_id].vector)


def assert_encodings(store: VectorStore) -> None:
    """Every segment of at least MIN_ANN_SEGMENT_ROWS rows has ANN lists of the current
    codec (in ``seg-<uid>.<codec>.ivf``), smaller ones have none, and the manifest says so."""
    manifest = store.manifest
    segments = store.snapshot().segments
    for segment in segments:
        wanted = manifest.codec if len(segment) >= store_module.MIN_ANN_SEGMENT_ROWS else None
        assert segment.codec_id == wanted, f"segment {segment.uid} ({len(segment)} rows) has {segment.codec_id}"
        assert (segment.ann is not None) == (wanted is not None)
        refined = wanted is not None and bool(manifest.codec_plan(wanted).refine)
        assert (segment.refine is not None) == refined
        if wanted is not None:
            assert segment.ann.ntotal == len(segment)  # every row, dead ones too: masked at search time
        if refined:  # the codes of every row, as the codec encodes them
            assert np.array_equal(segment.refine.codes, store._codec(manifest, wanted).refine_codes(
                np.asarray(segment.rows.vectors)))
        assert segment.file_names() == [segment_name(segment.uid) + SEGMENT_SUFFIX] + (
            [ann_file_name(segment.uid, wanted)] if wanted else []) + (
            [segment_module.refine_file_name(segment.uid, wanted)] if refined else [])
    assert manifest.ann == {str(s.uid): s.codec_id for s in segments if s.codec_id}


def assert_no_stale_files(data_dir: Path, store: VectorStore) -> None:
    """vectors/ holds exactly the committed files: replaced segments, replaced encodings
    and dropped codecs are gone (no grace period needed: a single writer installed them)."""
    assert leftover_names(data_dir, store) == set()
    segments_dir = data_dir / store_module.SEGMENTS_DIR
    for segment in store.snapshot().segments:
        for name in segment.file_names():
            assert (segments_dir / name).is_file(), name


def segment_files(data_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime in ns) of every .vseg file."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in (data_dir / store_module.SEGMENTS_DIR).glob(f"*{SEGMENT_SUFFIX}")}


# --- ANN searches of saved segments (a crash there would take the test process with it) ------------

PROBE = """
import sys
import numpy as np
from visualsearch.vectors import IndexPlan, VectorRows, VectorStore
from visualsearch.vectors import store as store_module

store_module.FILTER_EXACT_BYTES = 0  # force the ANN path
rng = np.random.default_rng(0)
vectors = rng.standard_normal((1000, 32)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
args = dict(backbone="probe", weights_sha256="0" * 64, dim=32, memory_budget=1 << 30)
store = VectorStore(sys.argv[1], **args)
store.commit(VectorRows.build(ids=range(1000), product_ids=range(1000), vectors=vectors, prices=[None] * 1000,
                              tokens=[[]] * 1000, dim=32))
store.rebuild(plan=IndexPlan(kind="ivf", dim=32, planned_for=1000, nlist=8, encoding="SQ8", code_bytes=32),
              tune=False)
for opened in (store, VectorStore(sys.argv[1], **args)):
    for row in (5, 500, 999):
        assert opened.search(vectors[row], 1, nprobe=8).ids.tolist() == [row]
print("ok")
"""


def child_env() -> dict[str, str]:
    # The children import this checkout's visualsearch (and this module, for the workload).
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="session")
def ann_search_works(tmp_path_factory) -> tuple[bool, str]:
    """Whether ANN searches of saved segments work, found in a child process: when a FAISS
    index read from disk is not kept alive (``faiss.downcast_index(faiss.read_index(...))``
    keeps only a non-owning proxy) the search reads freed memory and the process dies."""
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path_factory.mktemp("probe"))], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=120)
    ok = result.returncode == 0 and result.stdout.strip().endswith("ok")
    return ok, f"probe exited with {result.returncode}: {result.stderr[-2000:]}"


def test_ann_search_of_saved_segments_works(ann_search_works):
    ok, detail = ann_search_works
    assert ok, detail


def require_ann(kind: str, ann_search_works: tuple[bool, str]) -> None:
    if kind != "flat" and not ann_search_works[0]:
        pytest.skip("ANN searches crash this process: see test_ann_search_of_saved_segments_works")


# --- stores of every index type --------------------------------------------------------------------

def lower_thresholds(patch: pytest.MonkeyPatch) -> None:
    patch.setattr(store_module, "FILTER_EXACT_BYTES", EXACT_FILTER_ROWS * DIM * 4)
    patch.setattr(store_module, "MIN_ANN_SEGMENT_ROWS", ANN_SEGMENT_ROWS)


@pytest.fixture
def ann_thresholds(monkeypatch):
    lower_thresholds(monkeypatch)


@dataclass
class Built:
    kind: str
    data_dir: Path
    catalogue: Catalogue
    store: VectorStore


def initial_rows() -> list[Row]:
    """ROWS rows with sparse ids (as in a catalogue with a history), committed at once:
    a rebuild no longer merges segments, and one segment of ROWS rows is what puts a
    broad filter's rows (more than EXACT_FILTER_ROWS of them) on the bitmap ANN path."""
    rng = np.random.default_rng(1)
    return make_rows(rng, rng.choice(20_000, ROWS, replace=False))


@pytest.fixture(scope="module", params=list(PLANS))
def built(request, tmp_path_factory, ann_search_works) -> Built:
    """initial_rows() committed, then rebuilt (and tuned) as the kind's plan; shared, not to be written."""
    kind = request.param
    require_ann(kind, ann_search_works)
    data_dir = tmp_path_factory.mktemp(f"built-{kind}")
    catalogue = Catalogue()
    with pytest.MonkeyPatch.context() as patch:
        lower_thresholds(patch)
        store = open_store(data_dir)
        catalogue.commit(store, initial_rows())
        plan = store.rebuild(plan=PLANS[kind])
        assert_encodings(store)
        assert_no_stale_files(data_dir, store)
    assert plan.description == DESCRIPTIONS[kind]
    return Built(kind, data_dir, catalogue, store)


@pytest.fixture
def fresh(built, tmp_path, ann_thresholds) -> Built:
    """A writable copy of ``built``."""
    data_dir = tmp_path / "data"
    shutil.copytree(built.data_dir, data_dir)
    return Built(built.kind, data_dir, built.catalogue.copy(), open_store(data_dir))


@pytest.fixture
def ann_calls(monkeypatch) -> list[bool]:
    """Records each ANN segment search: True when it was given a bitmap of allowed rows."""
    calls: list[bool] = []
    real = store_module.search_segment

    def spy(index, reduced, coarse, k, allowed_bitmap):
        calls.append(allowed_bitmap is not None)
        return real(index, reduced, coarse, k, allowed_bitmap)

    monkeypatch.setattr(store_module, "search_segment", spy)
    return calls


# --- recall of every index type -------------------------------------------------------------------

def test_every_index_type_matches_brute_force(built, ann_thresholds, ann_calls):
    store, catalogue = built.store, built.catalogue
    queries = catalogue.queries(np.random.default_rng(2), 60)
    stats = store.stats()
    assert (stats.vectors, stats.rows, stats.segments) == (ROWS, ROWS, 1)  # (one commit: one segment)
    assert stats.index_type == DESCRIPTIONS[built.kind]
    assert_encodings(store)
    if built.kind == "flat":
        assert stats.ann_segments == 0
        check_search(store, catalogue, queries)  # the exact top 10
        assert ann_calls == []
        return
    tuning = store.manifest.tuning
    assert tuning.recall_at_10 is not None and tuning.recall_at_10 >= store_module.TUNING_GOAL
    assert tuning.queries == store_module.TUNING_QUERIES and tuning.measured_at is not None
    assert 1 <= tuning.nprobe <= NLIST
    assert open_store(built.data_dir, read_only=True).manifest.tuning == tuning  # durable
    assert stats.ann_segments == 1 and stats.tuning["nprobe"] == tuning.nprobe
    tuned = check_search(store, catalogue, queries, min_recall=0.95)
    assert ann_calls and not any(ann_calls)  # the ANN lists, nothing to mask
    # Probing every list leaves only the 8-bit codes between the search and the exact answer.
    assert check_search(store, catalogue, queries, min_recall=0.95, nprobe=NLIST) >= tuned


def test_several_queries_rank_each_image_by_its_best_score(tmp_path):
    store = open_store(tmp_path / "data")
    catalogue = Catalogue()
    catalogue.commit(store, make_rows(np.random.default_rng(3), range(500)))
    queries = catalogue.queries(np.random.default_rng(3), 3)
    hits = store.search(queries, 10)
    ids = np.array(list(catalogue.rows))
    best = (np.stack([catalogue.rows[i].vector for i in ids]) @ queries.T).max(axis=1)
    order = np.argsort(-best)[:10]
    assert hits.ids.tolist() == ids[order].tolist()
    np.testing.assert_allclose(hits.scores, best[order], atol=1e-5)


def test_k_beyond_the_count_and_an_empty_store(tmp_path):
    store = open_store(tmp_path / "data")
    assert store.manifest is None and store.count == 0
    assert len(store.search(np.ones(DIM, np.float32) / np.sqrt(DIM), 10)) == 0
    catalogue = Catalogue()
    catalogue.commit(store, make_rows(np.random.default_rng(4), range(7)))
    hits = store.search(catalogue.rows[3].vector, 100)
    assert sorted(hits.ids.tolist()) == list(range(7)) and hits.ids[0] == 3
    assert hits.scores[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidRequestError):
        store.search(np.ones((2, DIM + 1), np.float32), 5)


# --- writes: add, replace, delete, compact, merge ----------------------------------------------------

def test_replace_delete_and_compact_on_every_index_type(fresh):
    store, catalogue = fresh.store, fresh.catalogue
    rng = np.random.default_rng(5)
    old = {i: catalogue.rows[i] for i in rng.choice(list(catalogue.rows), 150, replace=False).tolist()}
    replaced, deleted = list(old)[:100], list(old)[100:]
    new_ids = list(range(30_000, 30_100))
    # Fewer rows than ANN_SEGMENT_ROWS: the new segment is scanned exactly until merged.
    catalogue.commit(store, make_rows(rng, replaced + new_ids), deletes=deleted)
    stats = store.stats()
    assert (stats.vectors, stats.rows, stats.segments) == (ROWS + 100 - 50, ROWS + 200, 2)
    assert stats.ann_segments == (0 if fresh.kind == "flat" else 1)
    queries = catalogue.queries(rng, 40)
    min_recall = 1.0 if fresh.kind == "flat" else 0.95
    check_search(store, catalogue, queries, min_recall=min_recall)
    found, vectors = store.get_vectors(replaced + deleted + new_ids)
    assert found.tolist() == replaced + new_ids
    np.testing.assert_array_equal(vectors, np.stack([catalogue.rows[i].vector for i in found.tolist()]))
    for image_id in replaced[:10]:  # the new vector finds the image; the old one no longer has it at 1.0
        assert store.search(catalogue.rows[image_id].vector, 1).ids.tolist() == [image_id]
        hits = store.search(old[image_id].vector, 5)
        assert image_id not in hits.ids.tolist() or hits.scores[hits.ids.tolist().index(image_id)] < 0.9999
    for image_id in deleted[:10]:
        assert image_id not in store.search(old[image_id].vector, 5).ids.tolist()

    # a deleted id comes back, a replaced one goes
    catalogue.commit(store, make_rows(rng, deleted[:5]), deletes=replaced[:5])
    assert store.count == len(catalogue.rows)
    # (the planner wants an exact scan for 3,000 x 32: the forced IVF plans ask for a rebuild)
    assert store.maintenance() == (None if fresh.kind == "flat" else "rebuild")

    before = store.snapshot().segments
    assert store.compact(force_merge=False) is True
    stats = store.stats()
    # Each segment with dead rows was rewritten on its own: no dead rows, but no single segment either.
    assert (stats.vectors, stats.rows) == (len(catalogue.rows), len(catalogue.rows))
    assert 1 < stats.segments <= len(before)
    assert store.manifest.index_type == DESCRIPTIONS[fresh.kind]
    assert_encodings(store)  # the rewritten big segment re-encoded with the store's codec
    assert stats.ann_segments == (0 if fresh.kind == "flat" else 1)
    assert_no_stale_files(fresh.data_dir, store)
    gone = {name for segment in before for name in segment.file_names()} - \
        {name for segment in store.snapshot().segments for name in segment.file_names()}
    assert gone and not [name for name in gone if (fresh.data_dir / store_module.SEGMENTS_DIR / name).exists()]
    check_search(store, catalogue, queries, min_recall=min_recall)
    assert store.compact(force_merge=False) is False
    reopened = open_store(fresh.data_dir)
    assert_state(reopened, catalogue.rows)
    assert_encodings(reopened)


def test_many_small_commits_merge_and_stay_equal_to_brute_force(fresh):
    store, catalogue = fresh.store, fresh.catalogue
    rng = np.random.default_rng(6)
    next_id = 40_000
    most = 0
    for step in range(24):
        live = list(catalogue.rows)
        touched = rng.choice(live, 20, replace=False).tolist()
        new = list(range(next_id, next_id + 15))
        next_id += 15
        catalogue.commit(store, make_rows(rng, touched[:15] + new), deletes=touched[15:])
        most = max(most, store.stats().segments)
        if step in (7, 23):
            assert_state(store, catalogue.rows)
            check_search(store, catalogue, catalogue.queries(rng, 20),
                         min_recall=1.0 if fresh.kind == "flat" else 0.9)
    assert most <= 1 + MERGE_FACTOR  # the rebuilt segment + one level of small ones
    stats = store.stats()
    assert stats.vectors == len(catalogue.rows)
    if fresh.kind != "flat":
        # 16 commits of 30 rows merged past ANN_SEGMENT_ROWS: encoded with the codec
        assert stats.ann_segments >= 2
    assert_encodings(store)
    assert_no_stale_files(fresh.data_dir, store)
    assert_state(open_store(fresh.data_dir), catalogue.rows)


def test_re_rank_codes_leave_only_the_best_candidates_to_read_exactly(tmp_path, ann_thresholds, ann_search_works,
                                                                       monkeypatch):
    """A plan with re-rank codes (past 8 GiB of vectors) ranks a search's candidates on
    them, over every segment together, and reads only the best refined_depth(k) exact
    vectors: the neighbours are still those of brute force."""
    require_ann("ivf_rabitq_refine", ann_search_works)
    store, catalogue = open_store(tmp_path), Catalogue()
    rng = np.random.default_rng(12)
    catalogue.commit(store, make_rows(rng, range(0, 2000)))
    store.rebuild(plan=PLANS["ivf_rabitq_refine"], tune=False)
    catalogue.commit(store, make_rows(rng, range(2000, 2600)), deletes=[3, 4, 5])  # a second segment with codes
    assert [s.refine is not None for s in store.snapshot().segments] == [True, True]
    reads: list[int] = []
    read_vectors = Segment.read_vectors
    monkeypatch.setattr(Segment, "read_vectors",
                        lambda self, rows, **kw: reads.append(len(rows)) or read_vectors(self, rows, **kw))
    queries = catalogue.queries(rng, 30)
    for k in (10, 30):
        reads.clear()
        store.search(queries[0], k, rerank=300, nprobe=NLIST)
        assert sum(reads) == refine_module.refined_depth(k) < 300
    check_search(store, catalogue, queries, rerank=300, nprobe=NLIST, min_recall=0.98)
    check_search(store, catalogue, queries, k=30, rerank=300, nprobe=NLIST, min_recall=0.98)


def test_warming_the_page_cache_asks_for_every_segments_lists_and_re_rank_codes(tmp_path, ann_thresholds,
                                                                                ann_search_works, monkeypatch):
    """A server's start reads each segment's inverted lists and re-rank codes into the
    page cache (all of them, nothing else, in chunks); it reads nothing when they would
    fill most of the machine's memory, or once told to stop."""
    require_ann("ivf_rabitq_refine", ann_search_works)
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc here to name the files read")
    store, catalogue = open_store(tmp_path), Catalogue()
    rng = np.random.default_rng(13)
    catalogue.commit(store, make_rows(rng, range(0, 1000)))
    store.rebuild(plan=PLANS["ivf_rabitq_refine"], tune=False)
    catalogue.commit(store, make_rows(rng, range(1000, 1400)))
    catalogue.commit(store, make_rows(rng, range(1400, 1410)))  # too small for an encoding
    coded = [s for s in store.snapshot().segments if s.refine is not None]
    assert len(coded) == 2
    asked: dict[str, list[tuple[int, int]]] = {}  # file name -> (offset, length) read
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        asked.setdefault(name, []).append((offset, sum(memoryview(b).nbytes for b in buffers)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    chunk = 64 * 1024
    monkeypatch.setattr(row_reads, "WARM_CHUNK_BYTES", chunk)  # several chunks per file
    segments_dir = tmp_path / store_module.SEGMENTS_DIR
    wanted = {}  # file name -> (first byte, end)
    for segment in coded:
        wanted[segment.ann_file] = (0, (segments_dir / segment.ann_file).stat().st_size)
        codes = segment.refine.codes
        wanted[segment.refine_file] = (codes.offset, codes.offset + codes.nbytes)
    total = sum(end - start for start, end in wanted.values())
    assert store.warm_page_cache() == total
    assert set(asked) == set(wanted)
    for name, (start, end) in wanted.items():
        ranges = sorted(asked[name])
        assert len(ranges) == math.ceil((end - start) / chunk)
        assert ranges[0][0] == start and sum(length for _, length in ranges) == end - start
    asked.clear()
    stop = threading.Event()
    stop.set()
    assert store.warm_page_cache(stop=stop) == total and asked == {}
    monkeypatch.setattr(store_module, "physical_memory", lambda: total)  # it would take all of it
    assert store.warm_page_cache() == 0 and asked == {}


@pytest.mark.parametrize("built", ["ivf_pca"], indirect=True)
def test_re_ranking_issues_every_segments_reads_before_waiting_for_any(fresh, monkeypatch):
    """Once the stored vectors outgrow the page cache, the re-ranked rows come from disk:
    their reads go out together (posix_fadvise WILLNEED, for every segment) before the
    first blocking pread, and what is read is the stored vectors."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here (macOS): rows are read one after another")
    store, catalogue = fresh.store, fresh.catalogue
    catalogue.commit(store, make_rows(np.random.default_rng(40), range(30_000, 30_000 + 1000)))
    store = open_store(fresh.data_dir)
    segments = store.snapshot().segments
    assert sum(1 for s in segments if s.ann is not None) == 2
    rows = np.array([0, 1, 2, 7, 500, 501, 999])
    assert row_reads.consecutive_runs(rows) == [(0, 3), (3, 4), (4, 6), (6, 7)]
    assert np.array_equal(segments[-1].read_vectors(rows), np.asarray(segments[-1].rows.vectors)[rows])

    events: list[tuple[str, int, int, int]] = []  # (what, fd, offset, length)
    real_fadvise, real_preadv = os.posix_fadvise, os.preadv

    def fadvise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        events.append(("advise", fd, offset, length))
        return real_fadvise(fd, offset, length, advice)

    def preadv(fd, buffers, offset):
        events.append(("read", fd, offset, sum(memoryview(b).nbytes for b in buffers)))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    monkeypatch.setattr(os, "preadv", preadv)
    query = catalogue.queries(np.random.default_rng(41), 1)
    store.search(query, 10, rerank=200)
    advised = [event[1:] for event in events if event[0] == "advise"]
    read = [event[1:] for event in events if event[0] == "read"]
    assert len(advised) >= 100 and sorted(advised) == sorted(read)  # the very ranges it then reads
    assert all(event[0] == "advise" for event in events[:len(advised)])  # all issued before the first wait
    assert len({fd for fd, _, _ in advised}) == 2  # both segments'
    monkeypatch.undo()
    check_search(store, catalogue, catalogue.queries(np.random.default_rng(42), 20), min_recall=0.9)


def test_a_big_commit_after_a_rebuild_is_encoded_with_the_codec(fresh, ann_calls):
    store, catalogue = fresh.store, fresh.catalogue
    rng = np.random.default_rng(7)
    catalogue.commit(store, make_rows(rng, range(50_000, 50_000 + ANN_SEGMENT_ROWS)))
    assert store.stats().ann_segments == (0 if fresh.kind == "flat" else 2)
    assert_encodings(store)
    check_search(store, catalogue, catalogue.queries(rng, 30), min_recall=1.0 if fresh.kind == "flat" else 0.95)
    assert bool(ann_calls) == (fresh.kind != "flat")


def test_rebuild_to_the_planned_flat_index_drops_the_codec(fresh):
    store, catalogue = fresh.store, fresh.catalogue
    catalogue.commit(store, make_rows(np.random.default_rng(8), [60_000, 60_001]), deletes=[*catalogue.rows][:3])
    before = store.stats()
    plan = store.rebuild()
    assert plan.kind == "flat"
    stats = store.stats()
    # The segments stay as they were (dead rows too: a rebuild only changes encodings).
    assert (stats.segments, stats.rows, stats.vectors) == (before.segments, ROWS + 2, ROWS - 1)
    assert (stats.ann_segments, stats.index_type) == (0, "Flat (exact)")
    assert store.manifest.codecs == {} and store.manifest.codec is None and store.manifest.ann == {}
    segments_dir = fresh.data_dir / store_module.SEGMENTS_DIR
    assert not list(segments_dir.glob("codec-*")) and not list(segments_dir.glob(f"*{ANN_SUFFIX}"))
    assert_encodings(store)
    assert_no_stale_files(fresh.data_dir, store)
    assert store.maintenance() is None
    check_search(store, catalogue, catalogue.queries(np.random.default_rng(9), 20))


def test_maintenance_compacts_when_a_fifth_is_dead(tmp_path):
    store = open_store(tmp_path / "data")
    catalogue = Catalogue()
    rng = np.random.default_rng(25)
    catalogue.commit(store, make_rows(rng, range(1000)))
    assert store.maintenance() is None
    catalogue.commit(store, deletes=range(0, 200))
    assert store.maintenance() is None        # 200 of 1000 rows dead: not more than a fifth
    catalogue.commit(store, make_rows(rng, [500]))
    assert store.maintenance() == "compact"   # the replaced row makes 201
    assert store.maintain() == "compact"
    stats = store.stats()
    assert (stats.rows, stats.vectors) == (800, 800)  # no dead rows (the segments may stay several)
    assert store.maintenance() is None and store.maintain() is None
    assert_no_stale_files(tmp_path / "data", store)
    assert_state(open_store(tmp_path / "data"), catalogue.rows)


def test_a_plan_short_of_the_target_recall_is_escalated(tmp_path, ann_thresholds, ann_search_works):
    require_ann("ivf", ann_search_works)
    data_dir = tmp_path / "data"
    store, catalogue = open_store(data_dir), Catalogue()
    catalogue.commit(store, initial_rows())
    hopeless = IndexPlan(kind="ivf", dim=DIM, planned_for=ROWS, nlist=NLIST, reduce_dim=2, encoding="SQ8",
                         code_bytes=2)
    plan = store.rebuild(plan=hopeless)
    assert plan.description == DESCRIPTIONS["ivf"]  # no escalation size between 2 and 32: every dimension
    assert store.manifest.tuning.recall_at_10 >= store_module.TARGET_RECALL
    assert list(store.manifest.codecs) == [store.manifest.codec]
    assert len(list((data_dir / store_module.SEGMENTS_DIR).glob("codec-*"))) == 1  # PCA2's codec is gone
    assert_encodings(store)
    assert_no_stale_files(data_dir, store)  # and so are the segment's PCA2 lists
    check_search(store, catalogue, catalogue.queries(np.random.default_rng(26), 20), min_recall=0.95)


# --- rebuilds re-encode in place, compactions rewrite one segment at a time ---------------------------

def three_segments(store: VectorStore, catalogue: Catalogue, rng: np.random.Generator) -> None:
    """Two segments big enough for ANN lists, then a small one that replaces and deletes rows of the first two."""
    catalogue.commit(store, make_rows(rng, range(1000)))
    catalogue.commit(store, make_rows(rng, range(1000, 1600)))
    catalogue.commit(store, make_rows(rng, [*range(1600, 1700), *range(0, 50)]), deletes=range(1000, 1030))
    stats = store.stats()
    assert (stats.segments, stats.rows, stats.vectors) == (3, 1750, 1670)


@pytest.mark.parametrize("built", ["ivf", "ivf_pca"], indirect=True)
def test_tuning_takes_the_cheapest_settings_that_reach_the_target(fresh, monkeypatch):
    """Per re-rank depth, more lists until the target or a plateau (the depth limits the
    recall); depths whose re-ranking alone costs more than the best found are skipped."""
    ceiling = {100: 0.90, 200: 0.94, 300: 0.97, 500: 0.99, 700: 0.99, 1000: 0.99}
    tried: list[tuple[int, int]] = []

    def recall(self, sample, sample_ids, truth, nprobe, rerank):
        tried.append((nprobe, rerank))
        return ceiling[rerank] * min(1.0, nprobe / 4)

    monkeypatch.setattr(VectorStore, "_recall", recall)
    tuning = fresh.store.tune()
    assert (tuning.nprobe, tuning.rerank, tuning.recall_at_10) == (4, 300, 0.97)
    assert tried == [(n, 100) for n in (1, 2, 3, 4, 6, 8)] + [(n, 200) for n in (1, 2, 3, 4, 6, 8)] + \
        [(n, 300) for n in (1, 2, 3, 4)]  # 500 re-ranked rows alone cost more than nprobe 4 + 300
    assert fresh.store.manifest.tuning == tuning and tuning.vectors == ROWS


@pytest.mark.parametrize("built", ["ivf_pca"], indirect=True)  # escalation replaces PCA-reduced codes
def test_a_re_tune_short_of_the_target_escalates_to_finer_codes(fresh, monkeypatch, ivf_wanted):
    store, catalogue = fresh.store, fresh.catalogue
    catalogue.commit(store, make_rows(np.random.default_rng(43), range(30_000, 30_000 + ROWS // 2 + 100)))
    monkeypatch.setattr(VectorStore, "_recall", lambda self, *args: 0.5)  # the grown catalogue defeats PCA16
    assert store.maintenance() == "tune"
    assert store.maintain() == "rebuild"
    assert store.manifest.index_plan.reduce_dim is None  # full-dimension codes
    monkeypatch.undo()
    lower_thresholds(monkeypatch)
    check_search(store, catalogue, catalogue.queries(np.random.default_rng(44), 20), min_recall=0.9)


def test_search_parameters_are_measured_again_once_the_catalogue_has_grown(tmp_path, ann_thresholds, ivf_wanted,
                                                                             ann_search_works):
    """More vectors near each query lower the recall tuned parameters give: past
    RETUNE_FACTOR times the size they were measured at, maintenance tunes again."""
    require_ann("ivf", ann_search_works)
    store, catalogue = open_store(tmp_path / "data"), Catalogue()
    rng = np.random.default_rng(31)
    catalogue.commit(store, make_rows(rng, range(1000)))
    store.rebuild(plan=PLANS["ivf"])
    tuned = store.manifest.tuning
    assert (tuned.codec, tuned.vectors) == (store.manifest.codec, 1000)
    assert store.maintenance() is None
    catalogue.commit(store, make_rows(rng, range(1000, 1500)))   # 1.5x: still as measured
    assert store.maintenance() is None
    catalogue.commit(store, make_rows(rng, range(1500, 1600)))
    assert store.maintain() == "tune"
    assert store.manifest.tuning.vectors == 1600 and store.manifest.tuning.measured_at > tuned.measured_at
    assert store.maintenance() is None
    check_search(store, catalogue, catalogue.queries(rng, 20), min_recall=0.9)


def test_rebuild_re_encodes_each_segment_in_place(tmp_path, ann_thresholds, ann_search_works):
    """A rebuild gives every big segment the new codec's lists and small ones none, under
    the same uids: the vectors (.vseg) are never rewritten, dead rows stay (that is a
    compaction's job), the previous encoding's lists and codec are deleted, and a reader
    follows."""
    require_ann("ivf", ann_search_works)
    data_dir = tmp_path / "data"
    store, catalogue = open_store(data_dir), Catalogue()
    rng = np.random.default_rng(28)
    three_segments(store, catalogue, rng)
    uids = [segment.uid for segment in store.snapshot().segments]
    reader = open_store(data_dir, read_only=True)
    files = segment_files(data_dir)
    assert len(files) == 3
    queries = catalogue.queries(rng, 20)
    codecs = []
    for kind in ("ivf", "ivf_pca", "flat"):  # (PLANS["flat"] is None: the planner's choice for 1,670 x 32)
        plan = store.rebuild(plan=PLANS[kind], tune=False)
        assert plan.description == DESCRIPTIONS[kind]
        assert segment_files(data_dir) == files  # same files, same inodes, never written since
        assert [segment.uid for segment in store.snapshot().segments] == uids
        stats = store.stats()
        assert (stats.segments, stats.rows, stats.vectors) == (3, 1750, 1670)  # dead rows are not dropped
        assert_encodings(store)
        assert stats.ann_segments == (0 if kind == "flat" else 2)  # the 150-row segment is scanned exactly
        manifest = store.manifest
        assert manifest.codec not in codecs  # a new codec each time (or none)
        codecs.append(manifest.codec)
        assert set(manifest.codecs) == {manifest.codec} - {None}
        assert_no_stale_files(data_dir, store)  # the previous codec and every list it encoded are gone
        min_recall = 1.0 if kind == "flat" else 0.9
        check_search(store, catalogue, queries, min_recall=min_recall, nprobe=NLIST)
        reader.refresh()
        assert reader.manifest == manifest
        assert_encodings(reader)
        assert_state(reader, catalogue.rows)
        check_search(reader, catalogue, queries, min_recall=min_recall, nprobe=NLIST)
    assert_state(open_store(data_dir), catalogue.rows)


def test_compact_rewrites_one_segment_at_a_time(tmp_path, monkeypatch, ann_thresholds, ann_search_works):
    """Each segment with dead rows is rewritten on its own, so that at no moment does the
    disk hold more than one segment besides the committed ones (never a second copy of the
    catalogue), and the old files go as each rewrite is installed."""
    require_ann("ivf", ann_search_works)
    data_dir = tmp_path / "data"
    segments_dir = data_dir / store_module.SEGMENTS_DIR
    store, catalogue = open_store(data_dir), Catalogue()
    rng = np.random.default_rng(29)
    for part in range(4):  # four segments of one level, too few to merge
        catalogue.commit(store, make_rows(rng, range(part * 1000, part * 1000 + 600)))
    store.rebuild(plan=PLANS["ivf"], tune=False)
    # 100 deleted and 20 replaced rows in each of the four
    catalogue.commit(store, make_rows(rng, [p * 1000 + 100 + i for p in range(4) for i in range(20)]),
                     deletes=[p * 1000 + i for p in range(4) for i in range(100)])
    before = store.snapshot().segments
    assert [len(segment) for segment in before] == [600] * 4 + [80]
    largest = max((segments_dir / segment.file_names()[0]).stat().st_size for segment in before)

    def uncommitted() -> set[str]:
        committed = {segment_name(uid) + SEGMENT_SUFFIX for uid in read_store_manifest(data_dir).segments}
        return {path.name for path in segments_dir.glob(f"*{SEGMENT_SUFFIX}")} - committed

    real_write_merged = Segment.write_merged
    writes = []

    def write_merged(directory, uid, inputs, **args):
        assert uncommitted() == set(), "a rewrite started while another one's segment was still on disk"
        merged = real_write_merged(directory, uid, inputs, **args)
        assert uncommitted() == {segment_name(uid) + SEGMENT_SUFFIX}
        assert (segments_dir / (segment_name(uid) + SEGMENT_SUFFIX)).stat().st_size <= largest
        writes.append([segment.uid for segment, _ in inputs])
        return merged

    monkeypatch.setattr(Segment, "write_merged", staticmethod(write_merged))
    assert store.compact(force_merge=False) is True
    assert writes == [[segment.uid] for segment in before[:4]]  # one at a time, oldest first; not the clean one
    assert uncommitted() == set()
    stats = store.stats()
    assert (stats.rows, stats.vectors, stats.segments) == (len(catalogue.rows), len(catalogue.rows), 5)
    assert_encodings(store)  # 480 rows each: still encoded with the codec
    assert stats.ann_segments == 4
    assert_no_stale_files(data_dir, store)
    check_search(store, catalogue, catalogue.queries(rng, 20), min_recall=0.9, nprobe=NLIST)
    assert store.compact(force_merge=False) is False and len(writes) == 4
    assert_state(open_store(data_dir), catalogue.rows)


def test_a_merge_encoded_with_a_codec_dropped_meanwhile_leaves_none_of_its_files(tmp_path, ann_thresholds,
                                                                                  ann_search_works):
    """A merge built outside the commit lock with codec A, installed after a rebuild
    replaced A: the merged rows are kept, its lists and re-rank codes of A are deleted."""
    require_ann("ivf_rabitq_refine", ann_search_works)
    data_dir = tmp_path / "data"
    store, catalogue = open_store(data_dir), Catalogue()
    rng = np.random.default_rng(33)
    for start in (0, 600):
        catalogue.commit(store, make_rows(rng, range(start, start + 600)))
    store.rebuild(plan=PLANS["ivf_rabitq_refine"], tune=False)
    inputs = list(store.snapshot().segments)
    with store.writing():
        uid = store.manifest.next_uid
        store._install(inputs, store.manifest, next_uid=uid + 1)
    merged = store._write_merged(uid, inputs, dict(store.snapshot().alive), drop_deletes=True)
    assert merged.refine is not None and (data_dir / store_module.SEGMENTS_DIR / merged.refine_file).is_file()
    store.rebuild(plan=PLANS["ivf"], tune=False)  # codec A is dropped
    with store.writing():
        assert store._replace(inputs, merged)
    assert [segment.codec_id for segment in store.snapshot().segments] == [None]
    assert_no_stale_files(data_dir, store)
    assert_state(open_store(data_dir), catalogue.rows)


def interrupt_a_rebuild(store: VectorStore, plan: IndexPlan) -> None:
    """A rebuild that dies once it has made its codec current, before re-encoding a segment."""
    def die(self, codec):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VectorStore, "_reencode", die)
        with pytest.raises(KeyboardInterrupt):
            store.rebuild(plan=plan, tune=False)


@pytest.fixture
def ivf_wanted(monkeypatch):
    """The planner wants an IVF index even for a few thousand rows (so that PLANS["ivf"] needs no re-plan)."""
    monkeypatch.setattr(planner_module, "EXACT_SCAN_BYTES", 0)


def test_maintenance_re_encodes_segments_whose_lists_the_codec_does_not_call_for(tmp_path, monkeypatch,
                                                                                 ann_thresholds, ivf_wanted,
                                                                                 ann_search_works):
    require_ann("ivf", ann_search_works)
    data_dir = tmp_path / "data"
    segments_dir = data_dir / store_module.SEGMENTS_DIR
    store, catalogue = open_store(data_dir), Catalogue()
    rng = np.random.default_rng(30)
    three_segments(store, catalogue, rng)
    store.rebuild(plan=PLANS["ivf"], tune=False)
    assert store.maintenance() == "tune"  # a codec is in force that nobody measured yet
    old = store.manifest.codec
    files = segment_files(data_dir)
    queries = catalogue.queries(rng, 20)

    interrupt_a_rebuild(store, PLANS["ivf"])
    store = open_store(data_dir)
    assert store.manifest.codec not in (None, old)
    assert [segment.codec_id for segment in store.snapshot().segments] == [old, old, None]
    check_search(store, catalogue, queries, min_recall=0.9, nprobe=NLIST)  # searchable meanwhile
    assert store.maintenance() == "reencode"
    assert store.maintain() == "reencode"
    assert store.maintenance() == "tune"  # the interrupted rebuild never measured its codec
    assert store.maintain() == "tune"
    assert store.maintenance() is None and store.manifest.tuning.codec == store.manifest.codec
    assert_encodings(store)
    assert not list(segments_dir.glob(f"seg-*.{old}{ANN_SUFFIX}"))
    assert segment_files(data_dir) == files
    check_search(store, catalogue, queries, min_recall=0.9, nprobe=NLIST)

    # A bigger threshold: the 1,000- and 600-row segments no longer call for lists.
    monkeypatch.setattr(store_module, "MIN_ANN_SEGMENT_ROWS", 2000)
    assert store.maintenance() == "reencode"
    assert store.maintain() == "reencode"
    assert store.maintenance() is None
    assert_encodings(store)
    assert store.stats().ann_segments == 0 and not list(segments_dir.glob(f"seg-*{ANN_SUFFIX}"))
    assert segment_files(data_dir) == files
    check_search(store, catalogue, queries)
    assert_state(open_store(data_dir), catalogue.rows)


def test_maintain_finishing_an_interrupted_rebuild_drops_the_previous_codec(tmp_path, ann_thresholds, ivf_wanted,
                                                                            ann_search_works):
    require_ann("ivf", ann_search_works)
    data_dir = tmp_path / "data"
    store = open_store(data_dir)
    three_segments(store, Catalogue(), np.random.default_rng(31))
    store.rebuild(plan=PLANS["ivf"], tune=False)
    old = store.manifest.codec
    interrupt_a_rebuild(store, PLANS["ivf"])
    store = open_store(data_dir)
    assert store.maintain() == "reencode"
    assert_encodings(store)
    assert old not in store.manifest.codecs
    assert not list((data_dir / store_module.SEGMENTS_DIR).glob(f"codec-{old}.*"))


@pytest.mark.parametrize("moment", ["while-encoding", "after-re-encoding"])
def test_a_commit_by_another_writer_during_a_rebuild_is_kept(tmp_path, monkeypatch, ann_thresholds, moment):
    data_dir = tmp_path / "data"
    rebuilder, other = open_store(data_dir), open_store(data_dir)
    catalogue = Catalogue()
    rng = np.random.default_rng(32)
    three_segments(rebuilder, catalogue, rng)
    rebuilder.rebuild(plan=PLANS["ivf"], tune=False)  # (so that the next rebuild leaves a codec unused)
    committed = []

    def other_commits():
        if not committed:
            committed.append(True)
            catalogue.commit(other, make_rows(rng, [9000]), deletes=[5])

    if moment == "while-encoding":
        real_encoded = Segment.encoded

        def encoded(self, directory, codec):
            other_commits()
            return real_encoded(self, directory, codec)

        monkeypatch.setattr(Segment, "encoded", encoded)
    else:
        real_reencode = VectorStore._reencode

        def reencode(self, codec):
            real_reencode(self, codec)
            other_commits()

        monkeypatch.setattr(VectorStore, "_reencode", reencode)
    rebuilder.rebuild(plan=PLANS["ivf_pca"], tune=False)
    assert committed
    store = open_store(data_dir)
    assert_state(store, catalogue.rows)
    assert_encodings(store)
    assert_no_stale_files(data_dir, store)


def test_overlapping_rebuilds_leave_a_consistent_store(tmp_path, monkeypatch, ann_thresholds):
    data_dir = tmp_path / "data"
    first, second = open_store(data_dir), open_store(data_dir)
    catalogue = Catalogue()
    three_segments(first, catalogue, np.random.default_rng(33))
    real_encoded = Segment.encoded
    raced = []

    def encoded(self, directory, codec):
        out = real_encoded(self, directory, codec)
        if not raced:  # the first rebuild has encoded a segment; another rebuilds meanwhile
            raced.append(True)
            second.rebuild(plan=PLANS["ivf"], tune=False)
        return out

    monkeypatch.setattr(Segment, "encoded", encoded)
    first.rebuild(plan=PLANS["ivf_pca"], tune=False)
    assert raced
    store = open_store(data_dir)
    assert set(store.manifest.codecs) == {store.manifest.codec}
    assert_encodings(store)
    assert_no_stale_files(data_dir, store)
    assert_state(store, catalogue.rows)


def test_deletes_survive_merges_that_do_not_reach_the_oldest_segment(tmp_path):
    """A delete aimed at an old segment must outlive the merge of the newer ones."""
    store = open_store(tmp_path / "data")
    catalogue = Catalogue()
    rng = np.random.default_rng(10)
    catalogue.commit(store, make_rows(rng, range(2000)))           # level 1: never merged with small ones
    for step in range(3 * MERGE_FACTOR):
        catalogue.commit(store, make_rows(rng, [10_000 + step]), deletes=[step])
    assert store.stats().segments <= 1 + MERGE_FACTOR
    assert_state(store, catalogue.rows)
    assert_state(open_store(tmp_path / "data"), catalogue.rows)
    catalogue.commit(store, make_rows(rng, [0]))                      # a deleted id comes back
    assert_state(open_store(tmp_path / "data"), catalogue.rows)


def test_merges_too_big_for_the_commit_lock_run_outside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LOCKED_MERGE_ROWS", 100)
    unlocked = []
    real = VectorStore._merge_unlocked
    monkeypatch.setattr(VectorStore, "_merge_unlocked", lambda self, limit: unlocked.append(limit) or real(self, limit))
    store = open_store(tmp_path / "data")
    catalogue = Catalogue()
    rng = np.random.default_rng(24)
    for step in range(3 * MERGE_FACTOR):
        deletes = [step * 40 - 7] if step else []
        catalogue.commit(store, make_rows(rng, range(step * 40, step * 40 + 40)), deletes=deletes)
        assert store.stats().segments <= MERGE_FACTOR
    assert unlocked  # 8 x 40 rows are more than the commit lock allows
    assert_state(store, catalogue.rows)
    # Writes with a small merge limit (API calls) leave the big merges to a later merge().
    unlocked.clear()
    for step in range(MERGE_FACTOR + 2):
        ids = range(5_000 + step * 40, 5_040 + step * 40)
        store.commit(to_vector_rows(rows := make_rows(rng, ids)), merge_limit=50)
        catalogue.apply(rows, [])
    assert store.stats().segments > MERGE_FACTOR and not unlocked
    store.merge()
    assert store.stats().segments <= MERGE_FACTOR and unlocked == [None]
    assert_state(open_store(tmp_path / "data"), catalogue.rows)
    check_search(store, catalogue, catalogue.queries(rng, 10))


def test_stats_are_a_copy(tmp_path):
    store = open_store(tmp_path / "data")
    Catalogue().commit(store, make_rows(np.random.default_rng(27), range(5)))
    store.stats().tuning["nprobe"] = 99
    assert store.manifest.tuning.nprobe == 1


def test_a_second_writer_waits_for_the_commit_lock(tmp_path):
    first, second = open_store(tmp_path / "data"), open_store(tmp_path / "data")
    with first.writing():
        with pytest.raises(WriterBusyError):
            second.commit(to_vector_rows(make_rows(np.random.default_rng(11), [1])), lock_timeout=0.05)
    second.commit(to_vector_rows(make_rows(np.random.default_rng(11), [1])))
    assert first.count == 1


# --- filters ------------------------------------------------------------------------------------------

def folded(text: str) -> str:
    return text.casefold()


FILTER_CASES: dict[str, tuple[dict, Callable[[Row], bool]]] = {
    # Unicode casefolding: É/é, and ß == SS
    "category-lower": ({"category": "électronique"}, lambda r: folded(r.category) == "électronique"),
    "category-upper": ({"category": "ÉLECTRONIQUE"}, lambda r: folded(r.category) == "électronique"),
    "category-sharp-s": ({"category": "Straße"}, lambda r: folded(r.category) == "strasse"),
    "category-double-s": ({"category": "STRASSE"}, lambda r: folded(r.category) == "strasse"),
    "category-either": ({"category": "straße|SHOES"}, lambda r: folded(r.category) in ("strasse", "shoes")),
    "colour": ({"attributes": {"colour": "red"}}, lambda r: folded(r.attributes["colour"]) == "red"),
    "field-name-case": ({"attributes": {"COLOUR": "Blue"}}, lambda r: folded(r.attributes["colour"]) == "blue"),
    "in-stock-bool": ({"attributes": {"in_stock": True}}, lambda r: r.attributes["in_stock"] is True),
    "in-stock-text": ({"attributes": {"in_stock": "TRUE"}}, lambda r: r.attributes["in_stock"] is True),
    "out-of-stock": ({"attributes": {"in_stock": False}}, lambda r: r.attributes["in_stock"] is False),
    "list-attribute": ({"attributes": {"sizes": "m"}}, lambda r: "M" in r.attributes["sizes"]),
    "price-range": ({"min_price": 50, "max_price": 70}, lambda r: r.price is not None and 50 <= r.price <= 70),
    "min-price": ({"min_price": 150}, lambda r: r.price is not None and r.price >= 150),
    "mixed": ({"brand": "acme|GLOBEX", "attributes": {"in_stock": "true", "colour": "RED|blue"}, "max_price": 150},
              lambda r: r.brand in ("Acme", "Globex") and r.attributes["in_stock"]
              and folded(r.attributes["colour"]) in ("red", "blue") and r.price is not None and r.price <= 150),
    "selective": ({"category": "bags", "brand": "initech", "attributes": {"colour": "Green"}},
                  lambda r: (r.category, r.brand, folded(r.attributes["colour"])) == ("Bags", "Initech", "green")),
    "no-match": ({"category": "Électronique", "brand": "Nobody"}, lambda r: False),
}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_filters_match_brute_force_over_the_rows_that_pass(built, case, ann_thresholds, ann_calls):
    store, catalogue = built.store, built.catalogue
    build_args, passes = FILTER_CASES[case]
    filters = SearchFilters.build(**build_args)
    passing = len(catalogue.passing(passes))
    queries = catalogue.queries(np.random.default_rng(12), 50)
    exact_path = built.kind == "flat" or passing <= EXACT_FILTER_ROWS
    check_search(store, catalogue, queries, filters=filters, passes=passes, min_recall=1.0 if exact_path else 0.9)
    if built.kind == "flat" or passing == 0:
        assert ann_calls == []
    elif passing <= EXACT_FILTER_ROWS:
        assert ann_calls == [], "a selective filter should scan its few rows exactly"
    else:
        assert ann_calls and all(ann_calls), "a broad filter should search the lists with a bitmap"


@pytest.mark.parametrize("built", ["ivf", "ivf_pca"], indirect=True)
@pytest.mark.parametrize("case", ["category-lower", "in-stock-bool", "colour", "price-range"])
def test_a_filtered_ann_search_probes_more_lists_as_the_filter_drops_rows(built, case, ann_thresholds,
                                                                                     monkeypatch):
    """A filter keeping a share s of a segment's rows leaves about s of each list: the
    search probes ceil(nprobe / sqrt(s)) lists (at most all of them; see filtered_probes)."""
    probes: list[int] = []
    real = store_module.search_segment

    def spy(index, reduced, coarse, k, allowed_bitmap):
        probes.append(coarse[1].shape[1])
        return real(index, reduced, coarse, k, allowed_bitmap)

    monkeypatch.setattr(store_module, "search_segment", spy)
    build_args, passes = FILTER_CASES[case]
    passing = len(built.catalogue.passing(passes))
    assert passing > EXACT_FILTER_ROWS  # (the ANN path)
    share = passing / ROWS  # one segment of ROWS rows, none dead
    query = built.catalogue.queries(np.random.default_rng(34), 1)[0]
    for nprobe in (1, 2, 3):
        probes.clear()
        built.store.search(query, 10, SearchFilters.build(**build_args), nprobe=nprobe)
        assert probes == [min(NLIST, math.ceil(nprobe / math.sqrt(share)))]
        probes.clear()
        built.store.search(query, 10, nprobe=nprobe)
        assert probes == [nprobe]
    # (the case tells 1 / sqrt(s) from the former 1 / s)
    assert any(min(NLIST, math.ceil(n / share)) != min(NLIST, math.ceil(n / math.sqrt(share))) for n in (1, 2, 3))


def test_the_filter_cases_cover_broad_selective_and_empty_filters():
    catalogue = Catalogue()
    catalogue.apply(initial_rows(), [])
    counts = {case: len(catalogue.passing(passes)) for case, (_, passes) in FILTER_CASES.items()}
    assert counts["no-match"] == 0
    assert 0 < counts["selective"] <= EXACT_FILTER_ROWS < counts["price-range"]
    assert counts["category-lower"] == counts["category-upper"] > ROWS // 3
    assert counts["category-sharp-s"] == counts["category-double-s"] > ROWS // 4


def test_filters_apply_to_replaced_rows_and_newer_segments(fresh, ann_calls):
    """A replaced row is filtered by its new fields; bitmaps combine the filter with the alive rows."""
    store, catalogue = fresh.store, fresh.catalogue
    rng = np.random.default_rng(13)
    moved = [r.id for r in catalogue.passing(lambda r: r.category == "Shoes")][:60]
    replacements = [Row(id=r.id, product_id=r.product_id, vector=r.vector, price=r.price, category="Bags",
                        brand=r.brand, attributes=r.attributes) for r in (catalogue.rows[i] for i in moved[:50])]
    catalogue.commit(store, replacements + make_rows(rng, range(70_000, 70_040)), deletes=moved[50:])
    queries = catalogue.queries(rng, 20)
    min_recall = 1.0 if fresh.kind == "flat" else 0.9
    for category in ("shoes", "BAGS"):
        check_search(store, catalogue, queries, filters=SearchFilters.build(category=category),
                     passes=lambda r, c=category: folded(r.category) == folded(c), min_recall=min_recall)
    assert bool(ann_calls) == (fresh.kind != "flat")


def test_a_repeated_filter_reuses_its_rows_and_follows_later_commits(fresh, monkeypatch):
    """The rows a filter keeps are worked out once per segment and alive mask (the
    filter cache): the same filter again costs no pass over the segment's columns and,
    on the exact path, no reads of its rows; a commit that deletes or replaces cached
    rows, or adds rows, is seen by the next search."""
    store, catalogue = fresh.store, fresh.catalogue
    masks, reads = [], []
    real_mask, real_read = Segment.filter_mask, Segment.read_vectors

    def spy_mask(segment, filters):
        masks.append(segment.uid)
        return real_mask(segment, filters)

    def spy_read(segment, rows, **kwargs):
        reads.append(segment.uid)
        return real_read(segment, rows, **kwargs)

    monkeypatch.setattr(Segment, "filter_mask", spy_mask)
    monkeypatch.setattr(Segment, "read_vectors", spy_read)
    rng = np.random.default_rng(14)
    queries = catalogue.queries(rng, 10)
    cases = {case: FILTER_CASES[case] for case in ("selective", "category-lower", "price-range")}
    min_recall = 1.0 if fresh.kind == "flat" else 0.9
    for build_args, passes in cases.values():
        check_search(store, catalogue, queries[:1], filters=SearchFilters.build(**build_args), passes=passes,
                     min_recall=min_recall)
    masks.clear()
    reads.clear()
    selective = SearchFilters.build(**cases["selective"][0])
    check_search(store, catalogue, queries, filters=selective, passes=cases["selective"][1])
    assert masks == [] and reads == [], "a repeated selective filter should reuse its rows and their vectors"
    for build_args, passes in cases.values():
        check_search(store, catalogue, queries, filters=SearchFilters.build(**build_args), passes=passes,
                     min_recall=min_recall)
    assert masks == []

    selected = [r.id for r in catalogue.passing(cases["selective"][1])]
    electronics = [r.id for r in catalogue.passing(cases["category-lower"][1])]
    moved = [Row(id=r.id, product_id=r.product_id, vector=r.vector, price=r.price, category="Bags", brand=r.brand,
                 attributes=r.attributes) for r in (catalogue.rows[i] for i in electronics[:40])]
    added = [Row(id=80_000 + n, product_id=90_000 + n, vector=catalogue.rows[selected[0]].vector, price=60.0,
                 category="Électronique", brand="Initech", attributes={"colour": "green", "in_stock": True,
                                                                       "sizes": ["M"]}) for n in range(3)]
    catalogue.commit(store, moved + added, deletes=selected[:5] + electronics[40:60])
    for build_args, passes in cases.values():
        check_search(store, catalogue, queries, filters=SearchFilters.build(**build_args), passes=passes,
                     min_recall=min_recall)
    found = store.search(added[0].vector, 3, SearchFilters.build(category="électronique"))
    assert sorted(found.ids.tolist()) == [row.id for row in added], "rows added after the cache was filled"


def test_the_filter_cache_holds_at_most_its_bytes_and_forgets_merged_segments():
    cache = FilterCache(max_bytes=3000)
    alive = np.ones(8000, dtype=bool)
    filters = [SearchFilters.build(category=name) for name in ("a", "b", "c", "d")]
    for uid, one in enumerate(filters):  # 1,000 bytes of bitmap each
        cache.put(uid, one, FilteredRows(alive, 10, bitmap=np.zeros(1000, dtype=np.uint8)))
    assert cache.nbytes == 3000
    assert cache.get(0, alive, filters[0]) is None  # the least recently used went first
    assert cache.get(1, alive, filters[1]) is not None
    cache.put(4, filters[0], FilteredRows(alive, 10, bitmap=np.zeros(1000, dtype=np.uint8)))
    assert cache.get(2, alive, filters[2]) is None and cache.get(1, alive, filters[1]) is not None
    assert cache.get(1, alive.copy(), filters[1]) is None, "another alive mask: rows were deleted since"
    cache.put(5, filters[1], FilteredRows(alive, 10, vectors=np.zeros((100, 8), dtype=np.float32)))
    assert cache.get(5, alive, filters[1]) is None and cache.nbytes <= 3000  # alone larger than the bound
    cache.retain({4})
    assert cache.nbytes == 1000 and cache.get(4, alive, filters[0]) is not None


def test_price_bounds_are_inclusive_and_rows_without_a_price_never_pass(tmp_path):
    store = open_store(tmp_path / "data")
    rng = np.random.default_rng(14)
    base = make_rows(rng, range(4))
    rows = [Row(id=r.id, product_id=r.id, vector=r.vector, price=price, category="x", brand="y",
                attributes={"size": size})
            for r, price, size in zip(base, [19.99, 20.0, None, 0.1], [42, "42", 42.0, "43"])]
    Catalogue().commit(store, rows)
    query = rows[0].vector

    def ids(**args) -> list[int]:
        return sorted(store.search(query, 10, SearchFilters.build(**args)).ids.tolist())

    assert ids(min_price=19.99, max_price=19.99) == [0]
    assert ids(max_price=20) == [0, 1, 3]
    assert ids(min_price=0) == [0, 1, 3]
    assert ids(min_price=0.1, max_price=0.1) == [3]
    assert ids() == [0, 1, 2, 3]
    assert ids(attributes={"size": 42}) == [0, 1, 2]  # 42, "42" and 42.0 are one value
    with pytest.raises(InvalidRequestError):
        SearchFilters.build(min_price=10, max_price=5)


def test_canonically_equivalent_values_are_one_value(tmp_path):
    store = open_store(tmp_path / "data")
    row = make_rows(np.random.default_rng(22), [1])[0]
    Catalogue().commit(store, [Row(id=1, product_id=1, vector=row.vector, price=None, category="E\u0301lectronique",
                                   brand="x")])
    assert store.search(row.vector, 5, SearchFilters.build(category="Électronique")).ids.tolist() == [1]


def test_price_bounds_hold_for_large_prices(tmp_path):
    store = open_store(tmp_path / "data")
    rows = make_rows(np.random.default_rng(23), [1, 2])
    Catalogue().commit(store, [Row(id=r.id, product_id=r.id, vector=r.vector, price=price, category="x", brand="y")
                               for r, price in zip(rows, [20_000_000, 20_000_001])])
    assert store.search(rows[0].vector, 5, SearchFilters.build(max_price=20_000_000)).ids.tolist() == [1]
    assert store.search(rows[0].vector, 5, SearchFilters.build(min_price=20_000_001)).ids.tolist() == [2]


# --- readers -------------------------------------------------------------------------------------------

def test_a_read_only_store_follows_the_writers_commits(tmp_path):
    data_dir = tmp_path / "data"
    writer = open_store(data_dir)
    reader = open_store(data_dir, read_only=True)
    assert reader.count == 0 and reader.manifest is None
    rng = np.random.default_rng(15)
    catalogue = Catalogue()
    catalogue.commit(writer, make_rows(rng, range(500)))
    reader.refresh()
    assert reader.manifest is not None and reader.count == 500
    assert_state(reader, catalogue.rows)
    for step in range(12):  # commits and merges
        catalogue.commit(writer, make_rows(rng, range(500 + step * 10, 510 + step * 10)), deletes=[step])
        reader.refresh()
        assert_state(reader, catalogue.rows)
    assert writer.compact() is True
    reader.refresh()
    stats = reader.stats()
    assert stats.rows == stats.vectors == len(catalogue.rows)  # the compaction's result, dead rows gone
    assert stats == writer.stats()
    assert_state(reader, catalogue.rows)
    check_search(reader, catalogue, catalogue.queries(rng, 10))
    with pytest.raises(InvalidRequestError):
        reader.commit(to_vector_rows(make_rows(rng, [9999])))
    with pytest.raises(InvalidRequestError):
        reader.compact()


@pytest.mark.parametrize("race", ["compaction", "re-encoding"])
@pytest.mark.parametrize("loading", ["new-segment", "new-encoding"])
def test_a_reader_retries_when_the_writer_removes_ann_lists_it_is_loading(tmp_path, monkeypatch, ann_thresholds,
                                                                          loading, race):
    """Between the reader's reading the manifest and a segment's ANN lists, the writer
    removes those lists (a compaction replaces the segment, a rebuild re-encodes it): the
    reader must read the manifest again, not call the index damaged. ``loading`` is what
    the reader loads: a segment new to it (Segment.load), or new lists of a segment it
    has loaded (Segment.with_encoding)."""
    data_dir = tmp_path / "data"
    writer = open_store(data_dir)
    catalogue = Catalogue()
    rng = np.random.default_rng(16)
    catalogue.commit(writer, make_rows(rng, range(600)))
    writer.rebuild(plan=PLANS["ivf"], tune=False)          # segment 1 with ANN lists
    catalogue.commit(writer, make_rows(rng, range(600, 610)))
    reader = open_store(data_dir, read_only=True)
    if loading == "new-segment":  # encoded as it is committed, not yet loaded by the reader
        catalogue.commit(writer, make_rows(rng, range(1000, 1000 + ANN_SEGMENT_ROWS)))
        target, replaced_id = writer.snapshot().segments[-1], 1000
    else:  # segment 1 with new lists; the reader has it with the old ones
        writer.rebuild(plan=PLANS["ivf_pca"], tune=False)
        target, replaced_id = writer.snapshot().segments[0], 0
    loading_file = ann_file_name(target.uid, writer.manifest.codec)
    assert target.file_names()[1] == loading_file
    real_read_ann = segment_module.read_ann
    raced = []

    def read_ann_racing_the_writer(path):
        if not raced:  # the writer acts between the reader's reading the manifest and these lists
            raced.append(Path(path).name)
            if race == "compaction":  # a dead row in the target: the compaction replaces it
                catalogue.commit(writer, make_rows(rng, [replaced_id]))
                assert writer.compact()
            else:  # a re-plan: the target keeps its uid and gets new lists
                writer.rebuild(plan=PLANS["ivf"], tune=False)
            assert not (data_dir / store_module.SEGMENTS_DIR / loading_file).exists()
        return real_read_ann(path)

    monkeypatch.setattr(segment_module, "read_ann", read_ann_racing_the_writer)
    reader.refresh()
    assert raced == [loading_file]
    assert reader.manifest == read_store_manifest(data_dir)
    assert_state(reader, catalogue.rows)
    assert_encodings(reader)
    check_search(reader, catalogue, catalogue.queries(rng, 10), min_recall=0.9, nprobe=NLIST)


WORKLOAD_POOL = 600        # ids 0..599 are added, replaced and deleted at random
MARKER = 100_000           # batch b adds id MARKER + b and never touches it again
CHILD_IVF_PLAN = IndexPlan(kind="ivf", dim=DIM, planned_for=600, nlist=8, encoding="SQ8", code_bytes=DIM)
# Re-plans alternate with this one: kills also land while re-rank codes are written.
CHILD_REFINE_PLAN = IndexPlan(kind="ivf", dim=DIM, planned_for=600, nlist=8, reduce_dim=16, encoding="RaBitQ",
                              code_bytes=12, refine="SQ8")


def workload_batch(batch: int) -> tuple[list[Row], list[int]]:
    """The upserts and deletes of commit number ``batch`` (the same in every process)."""
    rng = np.random.default_rng(10_000 + batch)
    touched = rng.choice(WORKLOAD_POOL, 25, replace=False).tolist()
    return make_rows(rng, [*touched[:20], MARKER + batch], product_id=batch), touched[20:]


class Replay:
    """The live rows after each number of commits of the workload (computed as needed)."""

    def __init__(self) -> None:
        self.catalogue = Catalogue()
        self.states: list[dict[int, Row]] = [{}]

    def __getitem__(self, batches: int) -> dict[int, Row]:
        while len(self.states) <= batches:
            self.catalogue.apply(*workload_batch(len(self.states) - 1))
            self.states.append(dict(self.catalogue.rows))
        return self.states[batches]


def committed_batches(store: VectorStore) -> int:
    found, _ = store.get_vectors(MARKER + np.arange(10_000))
    assert found.tolist() == list(range(MARKER, MARKER + len(found))), "commits are missing in the middle"
    return len(found)


def child_main() -> None:
    """A writer process: ``python -c 'from tests.test_vector_store import child_main; child_main()' MODE DIR LOG``.

    MODE ``commit`` commits batches forever, ``maintenance`` also compacts and rebuilds,
    ``writer-<n>`` commits ``n`` batches (compacting every 10) and exits. Each batch
    number is appended to LOG once its commit has returned.
    """
    mode, data_dir, log_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    # Segments here hold at most a few hundred rows: with the default threshold no rebuild
    # would write ANN lists, and a kill could never land in the middle of a re-encoding.
    store_module.MIN_ANN_SEGMENT_ROWS = ANN_SEGMENT_ROWS
    store = open_store(data_dir)
    batch = committed_batches(store)
    stop = int(mode.split("-")[1]) if mode.startswith("writer-") else None
    print("ready", flush=True)
    with open(log_path, "a") as log:
        while batch != stop:
            upserts, deletes = workload_batch(batch)
            store.commit(to_vector_rows(upserts), deletes=deletes)
            log.write(f"{batch}\n")
            log.flush()
            os.fsync(log.fileno())
            batch += 1
            if mode == "maintenance":  # (k-means takes most of the time: train rarely)
                if batch % 3 == 0:
                    store.compact()
                if batch % 10 == 0:
                    store.rebuild(plan=CHILD_REFINE_PLAN if batch % 20 else CHILD_IVF_PLAN, tune=batch % 20 == 0)
                elif batch % 4 == 0:
                    store.rebuild()
            elif stop is not None and batch % 10 == 0:
                store.compact()


def start_child(mode: str, data_dir: Path, log: Path) -> subprocess.Popen:
    """Start a writer process and wait until it has opened the store. Its stderr goes to
    ``log`` + ".err" (a pipe nobody reads could fill up and stall it)."""
    with open(log.with_suffix(".err"), "a") as errors:
        child = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_vector_store import child_main; child_main()", mode,
             str(data_dir), str(log)], cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=errors, text=True)
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        child.communicate()
        pytest.fail(f"the writer process did not start: {line}{log.with_suffix('.err').read_text()}")
    return child


def test_a_reader_never_sees_a_half_written_state(tmp_path):
    data_dir, batches = tmp_path / "data", 40
    states = Replay()
    states[batches]  # replayed before the writer starts, so that the reader keeps up with it
    reader = open_store(data_dir, read_only=True)
    child = start_child(f"writer-{batches}", data_dir, tmp_path / "log")
    seen = set()
    rng = np.random.default_rng(17)
    deadline = time.monotonic() + 120
    try:
        while child.poll() is None:
            assert time.monotonic() < deadline, "the writer process is stuck"
            reader.refresh()
            state = live_state(reader)
            seen_batches = sum(1 for i in state if i >= MARKER)
            want = states[seen_batches]
            assert sorted(state) == sorted(want), f"a half state after {seen_batches} commits"
            for image_id, vector in state.items():
                np.testing.assert_array_equal(vector, want[image_id].vector)
            markers = [i for i in state if i >= MARKER]
            if markers:  # (a search may see newer commits, but markers never change)
                image_id = int(rng.choice(markers))
                assert reader.search(state[image_id], 1).ids.tolist() == [image_id]
            seen.add(seen_batches)
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == 0, (tmp_path / "log.err").read_text()
    reader.refresh()
    assert_state(reader, states[batches])
    assert len(seen) >= 3, f"the reader saw too few states to mean anything: {sorted(seen)}"


# --- crashes ---------------------------------------------------------------------------------------------

def leftover_names(data_dir: Path, store: VectorStore) -> set[str]:
    """Files in vectors/ that the committed state does not use."""
    segments_dir = data_dir / store_module.SEGMENTS_DIR
    if not segments_dir.is_dir():
        return set()
    keep = {store_module.LOCK_FILE}
    for segment in store.snapshot().segments:
        keep.update(segment.file_names())
    for codec_id in store.manifest.codecs if store.manifest else {}:
        keep.update({f"codec-{codec_id}.ivf", f"codec-{codec_id}.pca", f"codec-{codec_id}.sq8"})
    drafts = {path.name for path in data_dir.glob(".manifest.json.*.tmp")}
    return ({path.name for path in segments_dir.iterdir()} - keep) | drafts


def verify_after_crash(data_dir: Path, log: Path, states: Replay) -> int:
    store = open_store(data_dir)
    batches = committed_batches(store)
    # (a batch committed by a killed writer but not yet logged is not logged by the next one)
    logged = max(map(int, log.read_text().split()), default=-1) + 1 if log.exists() else 0
    # Every commit that returned is there; the one in flight is there entirely or not at all.
    assert logged <= batches <= logged + 1
    assert_state(store, states[batches])
    rows = states[batches]
    for image_id in random.Random(batches).sample(sorted(rows), min(40, len(rows))):
        hits = store.search(rows[image_id].vector, 1)
        assert hits.ids.tolist() == [image_id] and hits.scores[0] == pytest.approx(1.0, abs=1e-5)
    # The writer is dead: its temporary files go; complete files it did not install
    # are kept for the grace period (another writer might be about to install them).
    before = leftover_names(data_dir, store)
    removed = set(store.collect_leftovers())
    after = leftover_names(data_dir, store)
    assert removed == before - after
    assert not [name for name in after if name.endswith(".tmp")], after
    assert all(name.endswith((SEGMENT_SUFFIX, ANN_SUFFIX, ".pca", ".sq8")) for name in after), after
    return batches


@pytest.mark.parametrize(("mode", "kills"), [("commit", 6), ("maintenance", 8)])
def test_a_writer_killed_at_random_moments_loses_nothing_committed(tmp_path, monkeypatch, mode, kills):
    data_dir, log = tmp_path / "data", tmp_path / "log"
    states = Replay()
    timer = random.Random(f"{mode}-kills")
    batches = 0
    for _ in range(kills):
        child = start_child(mode, data_dir, log)
        time.sleep(timer.uniform(0.05, 0.5))
        child.send_signal(signal.SIGKILL)
        child.communicate()  # reaped: its pid is dead for collect_leftovers
        batches = verify_after_crash(data_dir, log, states)
    assert batches > kills, "the writer hardly committed anything"
    # Past the grace period every unreferenced file goes, and the store is unchanged.
    monkeypatch.setattr(store_module, "LEFTOVER_GRACE_SECONDS", 0.0)
    store = open_store(data_dir)
    store.collect_leftovers()
    assert leftover_names(data_dir, store) == set()
    assert_state(open_store(data_dir), states[batches])


def test_collect_leftovers_keeps_young_files_of_live_writers(tmp_path):
    data_dir = tmp_path / "data"
    store = open_store(data_dir)
    Catalogue().commit(store, make_rows(np.random.default_rng(18), range(100)))
    segments_dir = data_dir / store_module.SEGMENTS_DIR
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = {
        "live_tmp": f".{segment_name(90)}{SEGMENT_SUFFIX}.{os.getpid()}.tmp",
        "dead_tmp": f".{segment_name(91)}{SEGMENT_SUFFIX}.{dead.pid}.tmp",
        "dead_codec_tmp": f".codec-00000092.ivf.{dead.pid}.tmp",
        "unreferenced": f"{segment_name(93)}{SEGMENT_SUFFIX}",
        "unreferenced_ann": ann_file_name(93, "00000007"),
        "old_unreferenced_ann": ann_file_name(1, "00000008"),  # a replaced encoding of a live segment
        "old_unreferenced_codes": segment_module.refine_file_name(1, "00000008"),  # and its re-rank codes
        "dead_codes_tmp": f".{segment_module.refine_file_name(97, '00000007')}.{dead.pid}.tmp",
        "old_refine_codec": "codec-00000096.sq8",
        "old_live_tmp": f".{segment_name(94)}{SEGMENT_SUFFIX}.{os.getpid()}.tmp",
        "old_unreferenced": f"{segment_name(95)}{SEGMENT_SUFFIX}",
        "old_codec": "codec-00000096.pca",
        "old_foreign": "notes.txt",
    }
    for name in files.values():
        (segments_dir / name).write_bytes(b"leftover")
    old = time.time() - store_module.LEFTOVER_GRACE_SECONDS - 60
    for key, name in files.items():
        if key.startswith("old_"):
            os.utime(segments_dir / name, (old, old))
    for segment in store.snapshot().segments:  # old files in use are never removed
        for name in segment.file_names():
            os.utime(segments_dir / name, (old, old))
    removed = set(store.collect_leftovers())
    assert removed == {files[k] for k in ("dead_tmp", "dead_codec_tmp", "old_live_tmp", "old_unreferenced",
                                          "old_unreferenced_ann", "old_codec", "old_unreferenced_codes",
                                          "dead_codes_tmp", "old_refine_codec")}
    for key in ("live_tmp", "unreferenced", "unreferenced_ann", "old_foreign"):
        assert (segments_dir / files[key]).exists()
    assert store.count == 100
    assert open_store(data_dir).count == 100


def test_collect_leftovers_removes_a_dead_writers_manifest_draft(tmp_path):
    data_dir = tmp_path / "data"
    store = open_store(data_dir)
    Catalogue().commit(store, make_rows(np.random.default_rng(19), range(10)))
    draft = data_dir / f".{MANIFEST_NAME}.k3j2h1.tmp"  # the name tempfile.mkstemp gives it
    draft.write_text("{")
    old = time.time() - store_module.LEFTOVER_GRACE_SECONDS - 60
    os.utime(draft, (old, old))
    store.collect_leftovers()
    assert not draft.exists()


# --- versions, damage, identity ----------------------------------------------------------------------

@pytest.fixture
def small_store(tmp_path) -> tuple[Path, Catalogue]:
    data_dir = tmp_path / "data"
    store = open_store(data_dir)
    catalogue = Catalogue()
    catalogue.commit(store, make_rows(np.random.default_rng(20), range(600)))
    catalogue.commit(store, make_rows(np.random.default_rng(21), range(600, 620)))
    return data_dir, catalogue


def test_a_manifest_of_the_old_format_asks_for_a_re_index(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / MANIFEST_NAME).write_text('{"format": 1, "backbone": "resnet50", "vectors": 45}')
    with pytest.raises(IndexCorruptError, match="format 1") as caught:
        open_store(data_dir)
    assert "index the catalogue again" in str(caught.value)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 2, "backbone": "x", "unknown_key": 1}'])
def test_an_unreadable_manifest_is_a_corrupt_index(tmp_path, content):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / MANIFEST_NAME).write_text(content)
    with pytest.raises(IndexCorruptError):
        open_store(data_dir)


def newest_segment(data_dir: Path, suffix: str) -> Path:
    return sorted((data_dir / store_module.SEGMENTS_DIR).glob(f"seg-*{suffix}"))[-1]


@pytest.mark.parametrize("damage", ["magic", "header", "truncated", "empty"])
def test_a_damaged_segment_file_is_a_corrupt_index(small_store, damage):
    data_dir, _ = small_store
    path = newest_segment(data_dir, SEGMENT_SUFFIX)
    data = bytearray(path.read_bytes())
    if damage == "magic":
        data[:8] = b"NOTASEGM"
    elif damage == "header":
        data[16:40] = b"\xff" * 24
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="damaged|truncated|not a vector segment"):
        open_store(data_dir)


def test_a_missing_segment_file_is_a_corrupt_index(small_store):
    data_dir, _ = small_store
    newest_segment(data_dir, SEGMENT_SUFFIX).unlink()
    with pytest.raises(IndexCorruptError):
        open_store(data_dir)


@pytest.mark.parametrize("target", ["segment", "codec", "new-encoding", "re-rank codes", "re-rank codes lost",
                                    "re-rank codec"])
def test_a_damaged_ann_file_is_a_corrupt_index(small_store, ann_thresholds, target):
    """``segment``: the lists of the 600-row segment (seg-<uid>.<codec>.ivf) read by a store
    opening; ``codec``: the codec they need; ``new-encoding``: the new lists of a segment a
    reader already has, read as it follows a rebuild; ``re-rank codes``: its 8-bit codes
    (seg-<uid>.<codec>.sq8), damaged or gone, and their codec's ranges (codec-<id>.sq8)."""
    data_dir, _ = small_store
    reader = open_store(data_dir, read_only=True)
    store = open_store(data_dir)
    refined = target.startswith("re-rank")
    store.rebuild(plan=PLANS["ivf_rabitq_refine" if refined else "ivf"], tune=False)
    encoded = [segment for segment in store.snapshot().segments if segment.codec_id]
    assert [len(segment) for segment in encoded] == [600]  # (the 20-row segment has no lists)
    segments_dir = data_dir / store_module.SEGMENTS_DIR
    codec = store.manifest.codec
    path = {"codec": segments_dir / f"codec-{codec}.ivf", "re-rank codec": segments_dir / f"codec-{codec}.sq8",
            "re-rank codes": segments_dir / segment_module.refine_file_name(encoded[0].uid, codec),
            "re-rank codes lost": segments_dir / segment_module.refine_file_name(encoded[0].uid, codec),
            }.get(target, segments_dir / ann_file_name(encoded[0].uid, codec))
    assert path.is_file()
    if target == "re-rank codes lost":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IndexCorruptError, match="damaged"):
        if target == "new-encoding":
            reader.refresh()
        else:
            open_store(data_dir)


@pytest.mark.parametrize("identity", [{"backbone": "resnet50"}, {"weights_sha256": "cd" * 32}, {"dim": 64}])
def test_another_backbone_is_a_mismatch(small_store, identity):
    data_dir, catalogue = small_store
    with pytest.raises(BackboneMismatchError):
        open_store(data_dir, **identity)
    with pytest.raises(BackboneMismatchError):
        open_store(data_dir, read_only=True, **identity)
    assert_state(open_store(data_dir), catalogue.rows)  # nothing was changed


def test_compact_packs_segments_for_faster_searches(tmp_path, ann_thresholds, ann_search_works):
    """`visualsearch compact` packs adjacent segments up to the size cap (forceMerge):
    fewer segments to search, the same results."""
    require_ann("ivf", ann_search_works)
    data_dir = tmp_path / "data"
    store, catalogue = open_store(data_dir), Catalogue()
    rng = np.random.default_rng(31)
    for part in range(5):
        catalogue.commit(store, make_rows(rng, range(part * 1000, part * 1000 + 500)))
    store.rebuild(plan=PLANS["ivf"], tune=False)
    assert len(store.snapshot().segments) == 5
    queries = catalogue.queries(rng, 20)
    assert store.compact() is True
    assert len(store.snapshot().segments) == 1
    assert_encodings(store)
    assert_state(store, catalogue.rows)
    check_search(store, catalogue, queries, min_recall=0.9, nprobe=NLIST)
    assert store.compact() is False  # nothing left to do


def _lists(index) -> dict[int, set[tuple[int, bytes]]]:
    """Inverted list number -> the (row, code) pairs it holds."""
    import faiss

    out = {}
    for list_no in range(index.nlist):
        size = index.invlists.list_size(list_no)
        if size:
            ids = faiss.rev_swig_ptr(index.invlists.get_ids(list_no), size)
            codes = faiss.rev_swig_ptr(index.invlists.get_codes(list_no), size * index.code_size)
            out[list_no] = {(int(i), codes[n * index.code_size:(n + 1) * index.code_size].tobytes())
                            for n, i in enumerate(ids)}
    return out


@pytest.mark.parametrize("kind", ["ivf", "ivf_pca", "ivf_rabitq", "ivf_rabitq_refine"])
def test_a_merge_copies_codes_exactly_as_encoding_again_would(kind, tmp_path, ann_thresholds, ann_search_works,
                                                              monkeypatch):
    """Merged segments reuse their inputs' codes (renumbered, dead rows dropped) instead
    of reducing and assigning every vector again: the lists must be the same."""
    require_ann(kind, ann_search_works)
    from visualsearch.vectors.codec import Codec

    copies = []
    merge_lists = Codec.merge_lists
    monkeypatch.setattr(Codec, "merge_lists", lambda self, parts: copies.append(len(parts)) or merge_lists(self, parts))
    rng = np.random.default_rng(11)
    store, catalogue = open_store(tmp_path), Catalogue()
    catalogue.commit(store, make_rows(rng, range(0, 1200)))
    store.rebuild(plan=PLANS[kind])
    catalogue.commit(store, make_rows(rng, range(1200, 1800)))  # a second segment with codes
    catalogue.commit(store, make_rows(rng, range(1800, 1900)))  # too small for codes: encoded in the merge
    catalogue.commit(store, make_rows(rng, [5, 1300]), deletes=[7, 8, 1250, 1850])  # updates and deletes
    store.compact(force_merge=True)
    assert copies and max(copies) >= 2  # codes of two segments (and the small one's new codes) copied
    segments = [segment for segment in store.snapshot().segments if segment.ann is not None]
    assert segments and sum(len(segment) for segment in segments) == len(catalogue.rows)
    codec = store._current_codec()
    for segment in segments:
        assert _lists(segment.ann) == _lists(codec.encode(np.asarray(segment.rows.vectors)))
    assert_encodings(store)  # re-rank codes too, copied or encoded
    check_search(store, catalogue, catalogue.queries(np.random.default_rng(3), 20), min_recall=0.9)
