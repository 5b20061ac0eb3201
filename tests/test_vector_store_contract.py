"""The vector-store contract, run against the FAISS store and Milvus (Lite, and a server for replicas).

The store is small (exact search in both), so the same queries must give the same
top-10 ids in the same order, with the same cosine scores, filters included.
"""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest

from visualsearch.errors import BackboneMismatchError, ConfigurationError, InvalidRequestError
from visualsearch.generations import GenerationChangedError, MilvusGenerationStore
from visualsearch.vectors import SearchFilters, VectorRows, VectorStore, row_tokens
from visualsearch.vectors.milvus_store import (
    MAX_TOKENS,
    MilvusTarget,
    MilvusVectorStore,
    collection_name,
    filter_expression,
    parse_vector_store,
)

from .conftest import REPO
from .milvus_server import milvus_server  # noqa: F401 (a fixture)

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

DIM = 16
ROWS = 240
SHA = "ab" * 32
BACKENDS = ["faiss", "milvus-lite"]
CATEGORIES = ("Shoes", "SHOES", "Bags", "Électronique", "ÉLECTRONIQUE")
BRANDS = ("Acme", "Globex", "Initech")
COLOURS = ("red", "Red", "blue", "green")
FILTERS = {
    "category": dict(category="shoes"),
    "category, folded": dict(category="électronique"),
    "brand": dict(brand="ACME"),
    "attribute": dict(attributes={"colour": "RED"}),
    "list attribute": dict(attributes={"size": "M"}),
    "several values": dict(category="Bags|Shoes"),
    "min price": dict(min_price=120.0),
    "max price": dict(max_price=80.0),
    "price range": dict(min_price=50.0, max_price=150.0),
    "combination": dict(category="shoes", brand="Globex|Initech", attributes={"colour": "blue"}, max_price=200.0),
    "no match": dict(category="hats"),
    "unknown attribute": dict(attributes={"material": "wool"}),
}


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def fields(i: int) -> dict:
    """Filter fields of row ``i``: every 7th row has no price, every 5th has sizes."""
    return {"price": None if i % 7 == 0 else float(10 + (i * 37) % 240), "category": CATEGORIES[i % 5],
            "brand": BRANDS[i % 3], "attributes": {"colour": COLOURS[i % 4],
                                                   **({"size": ["S", "M"] if i % 2 else ["L"]} if i % 5 == 0 else {})}}


def make_rows(ids, seed: int = 1) -> tuple[VectorRows, np.ndarray]:
    ids = list(ids)
    vectors = unit(np.random.default_rng(seed).standard_normal((len(ids), DIM)))
    rows = VectorRows.build(
        ids=ids, product_ids=[i // 3 for i in ids], vectors=vectors, prices=[fields(i)["price"] for i in ids],
        tokens=[row_tokens(**{k: v for k, v in fields(i).items() if k != "price"}) for i in ids], dim=DIM)
    return rows, vectors


def open_store(backend: str, where: Path, *, backbone: str = "test_tiny", sha: str = SHA, dim: int = DIM,
               location: str = ""):
    if backend == "faiss":
        return VectorStore(where / "faiss" / location, backbone=backbone, weights_sha256=sha, dim=dim,
                           memory_budget=1024**3)
    target = where if isinstance(where, MilvusTarget) else parse_vector_store(str(where / "vectors.db"))
    return MilvusVectorStore(target, backbone=backbone, weights_sha256=sha, dim=dim, location=location)


def brute_force(vectors: dict[int, np.ndarray], queries: np.ndarray, k: int, keep=lambda i: True) -> list[int]:
    ids = [i for i in sorted(vectors) if keep(i)]
    if not ids:
        return []
    scores = (queries @ np.stack([vectors[i] for i in ids]).T).max(axis=0)
    return [ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def passes(i: int, filters: SearchFilters) -> bool:
    """The oracle of a filter: the row's tokens and price, checked in Python."""
    row = fields(i)
    tokens = set(row_tokens(**{k: v for k, v in row.items() if k != "price"}))
    if not all(tokens.intersection(group) for group in filters.token_groups()):
        return False
    price = row["price"]
    if filters.min_price is not None and (price is None or price < filters.min_price):
        return False
    return not (filters.max_price is not None and (price is None or price > filters.max_price))


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=[*BACKENDS, "milvus-server"])
def filled(request, tmp_path_factory):
    """(backend, a store of ROWS rows, their vectors by id) shared by the read-only tests
    (on a Milvus server too: its expressions are evaluated by the server's own code)."""
    where = tmp_path_factory.mktemp(request.param)
    if request.param == "milvus-server":
        target = parse_vector_store(f"{request.getfixturevalue('milvus_server')}/contract_filled")
        store = MilvusVectorStore(target, backbone="test_tiny", weights_sha256=SHA, dim=DIM, lock_dir=where)
    else:
        store = open_store(request.param, where)
    rows, vectors = make_rows(range(ROWS))
    store.commit(rows)
    return request.param, store, dict(zip(range(ROWS), vectors))


# --- pure functions ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, uri, collection, token, index", [
    ("milvus://milvus.internal:19530/shop", "http://milvus.internal:19530", "shop", "", "FLAT"),
    ("milvus://10.0.0.5/shop", "http://10.0.0.5:19530", "shop", "", "FLAT"),
    ("milvus://db:1234", "http://db:1234", "visualsearch", "", "FLAT"),
    ("milvus://root:p%40ss@db:19530/shop_2", "http://db:19530", "shop_2", "root:p@ss", "FLAT"),
    ("milvus+https://cloud.example:443/shop", "https://cloud.example:443", "shop", "", "FLAT"),
    ("milvus://[::1]:19530/shop?index=hnsw&M=16", "http://[::1]:19530", "shop", "", "HNSW"),
    ("/srv/vs/vectors.db", "/srv/vs/vectors.db", "visualsearch", "", "FLAT"),
])
def test_vector_store_settings_parse_into_milvus_targets(value, uri, collection, token, index):
    target = parse_vector_store(value)
    assert (target.uri, target.collection, target.token, target.index_type) == (uri, collection, token, index)
    assert target.lite == value.endswith(".db")
    assert "p@ss" not in repr(target) and "p@ss" not in target.display


def test_a_relative_milvus_lite_path_is_taken_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_vector_store("data/v.db").uri == str(tmp_path / "data" / "v.db")


@pytest.mark.parametrize("value, message", [
    ("", "empty"),
    ("faiss", "neither"),
    ("vectors.sqlite", "neither"),
    ("http://db:19530/shop", "unknown scheme"),
    ("milvus://db:99999/shop", "bad port"),
    ("milvus:///shop", "no host"),
    ("milvus://db:19530/my-shop", "not a Milvus collection name"),
    ("milvus://db:19530/1shop", "not a Milvus collection name"),
    ("milvus://db:19530/shop?index=DISKANN", "not one of"),
    ("milvus://db:19530/shop?index=HNSW&M=big", "integers"),
])
def test_bad_vector_store_settings_are_configuration_errors(value, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_vector_store(value)


def test_each_generation_has_its_own_valid_collection():
    assert collection_name("shop", "") == "shop"
    names = {collection_name("shop", location) for location in
             ("generations/2-resnet50", "generations/2_resnet50", "generations/3-clip-vit-b/32")}
    assert len(names) == 3
    assert all(name.startswith("shop__generations_") and name.replace("_", "").isalnum() for name in names)


def test_filters_become_milvus_expressions():
    assert filter_expression(None) == filter_expression(SearchFilters()) == ""
    expression = filter_expression(SearchFilters.build(category="A|b", brand="X", min_price=5, max_price=1e20))
    brand, category = SearchFilters.build(category="A|b", brand="X").token_groups()
    assert expression == (f"array_contains_any(tokens, [{brand[0]}]) and "
                          f"array_contains_any(tokens, [{category[0]}, {category[1]}]) and "
                          "price >= 5.0 and price <= 1e+20")


def test_without_pymilvus_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'visualsearch\[milvus\]'"):
        open_store("milvus-lite", tmp_path)


# --- the contract, on both backends -----------------------------------------------------------

def test_an_empty_store_finds_nothing(backend, tmp_path):
    store = open_store(backend, tmp_path)
    assert store.manifest is None and store.count == 0 and store.alive_ids().tolist() == []
    assert len(store.search(unit(np.ones((1, DIM))), 10)) == 0
    assert store.get_vectors([1, 2])[0].tolist() == []
    assert store.warm_page_cache() == 0  # (a server start asks every store; nothing to read in)


def test_exact_search_is_brute_force(filled):
    _, store, vectors = filled
    queries = unit(np.random.default_rng(5).standard_normal((6, DIM)))
    for query in queries:
        hits = store.search(query[None, :], 10)
        assert hits.ids.tolist() == brute_force(vectors, query[None, :], 10)
        assert np.allclose(hits.scores, [vectors[i] @ query for i in hits.ids.tolist()], atol=1e-5)
        assert hits.product_ids.tolist() == [i // 3 for i in hits.ids.tolist()]
    several = store.search(queries[:3], 25)  # an image counts with its best score over the queries
    assert several.ids.tolist() == brute_force(vectors, queries[:3], 25)
    assert len(set(several.ids.tolist())) == len(several)


@pytest.mark.parametrize("name", FILTERS)
def test_filters_are_brute_force(filled, name):
    _, store, vectors = filled
    filters = SearchFilters.build(**FILTERS[name])
    query = unit(np.random.default_rng(11).standard_normal((1, DIM)))
    hits = store.search(query, 10, filters)
    expected = brute_force(vectors, query, 10, lambda i: passes(i, filters))
    assert hits.ids.tolist() == expected
    assert (len(expected) == 0) == (name in ("no match", "unknown attribute"))


def test_count_ids_and_vectors(filled):
    _, store, vectors = filled
    assert store.count == ROWS and store.alive_ids().tolist() == list(range(ROWS))
    found, got = store.get_vectors([5, 10_000, 3, 5])
    assert found.tolist() == [5, 3, 5]
    assert np.allclose(got, [vectors[5], vectors[3], vectors[5]], atol=1e-7)
    assert store.stats().vectors == ROWS and store.manifest.backbone == "test_tiny"


def test_writes_update_and_remove(backend, tmp_path):
    store = open_store(backend, tmp_path)
    rows, vectors = make_rows(range(30))
    store.commit(rows)
    store.commit(deletes=[1, 2, 999])
    assert store.count == 28 and 1 not in store.alive_ids().tolist()
    # Moving row 4 (a red one) onto row 7's vector and fields: found there, not by its old ones.
    moved = VectorRows.build(ids=[4], product_ids=[77], vectors=vectors[7:8], prices=[fields(7)["price"]],
                             tokens=[row_tokens(category=CATEGORIES[7 % 5], brand="Moved", attributes={})], dim=DIM)
    with store.writing():  # writes nest inside the caller's lock
        store.commit(moved, deletes=[4, 5])  # an id both upserted and deleted keeps its new row
    assert store.count == 27 and 5 not in store.alive_ids().tolist()
    hits = store.search(vectors[7:8], 2)
    assert sorted(hits.ids.tolist()) == [4, 7] and np.allclose(hits.scores, 1.0, atol=1e-5)
    assert 77 in hits.product_ids.tolist()
    assert store.search(vectors[4:5], 30, SearchFilters.build(brand="moved")).ids.tolist() == [4]
    assert 4 not in store.search(vectors[4:5], 30, SearchFilters.build(brand=BRANDS[4 % 3])).ids.tolist()
    assert np.allclose(store.get_vectors([4])[1], vectors[7:8])
    store.merge()
    store.maintain()
    store.compact()
    store.rebuild()
    assert store.count == 27 and store.stats().vectors == 27


def test_another_backbone_is_refused(backend, tmp_path):
    store = open_store(backend, tmp_path)
    store.commit(make_rows(range(3))[0])
    with pytest.raises(BackboneMismatchError, match="backbone 'test_tiny', not 'other'"):
        open_store(backend, tmp_path, backbone="other")
    with pytest.raises(BackboneMismatchError, match="other weights"):
        open_store(backend, tmp_path, sha="cd" * 32)
    with pytest.raises(BackboneMismatchError, match="other weights"):
        open_store(backend, tmp_path, dim=DIM * 2)


def test_a_second_store_object_sees_the_first_ones_writes(backend, tmp_path):
    first, second = open_store(backend, tmp_path), open_store(backend, tmp_path)
    assert second.manifest is None
    rows, vectors = make_rows(range(10))
    first.commit(rows)
    assert second.count == 10 and second.search(vectors[3:4], 1).ids.tolist() == [3]
    second.commit(deletes=[3])
    assert 3 not in first.search(vectors[3:4], 5).ids.tolist()


def test_read_only_stores_refuse_writes(backend, tmp_path):
    open_store(backend, tmp_path).commit(make_rows(range(3))[0])
    store = open_store(backend, tmp_path)
    store.read_only = True
    with pytest.raises(InvalidRequestError, match="read-only"):
        store.commit(deletes=[1])


# --- Milvus only ------------------------------------------------------------------------------

def test_faiss_and_milvus_lite_give_the_same_top_10(tmp_path):
    stores = [open_store(backend, tmp_path) for backend in BACKENDS]
    rows, _ = make_rows(range(ROWS))
    for store in stores:
        store.commit(rows)
        store.commit(deletes=list(range(0, ROWS, 11)))
    queries = unit(np.random.default_rng(3).standard_normal((5, DIM)))
    for filters in [SearchFilters(), *(SearchFilters.build(**case) for case in FILTERS.values())]:
        for query in queries:
            faiss_hits, milvus_hits = (store.search(query[None, :], 10, filters) for store in stores)
            assert faiss_hits.ids.tolist() == milvus_hits.ids.tolist()
            assert faiss_hits.product_ids.tolist() == milvus_hits.product_ids.tolist()
            assert np.allclose(faiss_hits.scores, milvus_hits.scores, atol=1e-5)


def test_a_row_with_more_tokens_than_milvus_holds_is_refused(tmp_path):
    store = open_store("milvus-lite", tmp_path)
    rows = VectorRows.build(ids=[1, 2], product_ids=[1, 2], vectors=unit(np.ones((2, DIM))), prices=[1.0, 2.0],
                            tokens=[[1], list(range(MAX_TOKENS + 1))], dim=DIM)
    with pytest.raises(InvalidRequestError, match=r"images \[2\] have more than 4096"):
        store.commit(rows)
    assert store.count == 0


def test_a_retired_generation_refuses_writes(tmp_path):
    current = {"location": "generations/2-x"}
    store = MilvusGenerationStore(parse_vector_store(str(tmp_path / "v.db")), location="generations/2-x",
                                  is_current=lambda: current["location"] == "generations/2-x",
                                  backbone="test_tiny", weights_sha256=SHA, dim=DIM)
    store.commit(make_rows(range(3))[0])
    assert store.collection.startswith("visualsearch__generations_2_x_")
    current["location"] = "generations/3-y"
    with pytest.raises(GenerationChangedError):
        store.commit(deletes=[1])
    assert store.count == 3


def test_the_index_reported_is_the_collections_and_rebuild_switches_it(tmp_path):
    flat = parse_vector_store(str(tmp_path / "vectors.db"))
    store = MilvusVectorStore(flat, backbone="test_tiny", weights_sha256=SHA, dim=DIM)
    rows, vectors = make_rows(range(60))
    store.commit(rows)
    store.close()
    # Reopened with another ?index=: the collection still has its FLAT index until a rebuild.
    hnsw = dataclasses.replace(flat, index_type="HNSW", index_params=(("M", 8), ("efConstruction", 64), ("ef", 80)))
    store = MilvusVectorStore(hnsw, backbone="test_tiny", weights_sha256=SHA, dim=DIM)
    stats = store.stats()
    assert (stats.index_type, stats.plan["index_type"], stats.plan["configured_index_type"]) == (
        "Milvus FLAT (exact)", "FLAT", "HNSW")
    assert store.search(vectors[7:8], 3).ids.tolist() == brute_force(dict(enumerate(vectors)), vectors[7:8], 3)
    plan = store.rebuild()
    assert plan.kind == "hnsw"
    assert (store.stats().index_type, store.stats().plan["index_type"]) == ("Milvus HNSW", "HNSW")
    for row in (7, 33):
        assert store.search(vectors[row:row + 1], 1).ids.tolist() == [row]
    assert store.count == 60
    store.rebuild()  # the configured index already: nothing to do
    assert store.stats().plan["index_type"] == "HNSW"
    # Another process's store object configured with FLAT now sees HNSW.
    other = MilvusVectorStore(flat, backbone="test_tiny", weights_sha256=SHA, dim=DIM)
    assert other.stats().index_type == "Milvus HNSW"


def test_a_retired_generations_milvus_store_is_closed_once_no_request_uses_it(tmp_path):
    from visualsearch.catalogue.store import StoredIdentity
    from visualsearch.generations import Generation, GenerationRef, GenerationTracker

    target = parse_vector_store(str(tmp_path / "vectors.db"))
    identity = StoredIdentity("test_tiny", SHA, DIM)
    current = {"ref": GenerationRef("", identity)}

    def make(ref, *, embedder=None):
        return Generation(ref, load_embedder=None, embedder=embedder, open_store=lambda ref: MilvusVectorStore(
            target, location=ref.location, backbone="test_tiny", weights_sha256=SHA, dim=DIM))

    tracker = GenerationTracker(lambda: current["ref"], make)
    rows, vectors = make_rows(range(5))
    tracker.current().store().commit(rows)
    request = tracker.pinned()  # a request in flight, pinned to the first generation
    old = weakref.ref(request.current().store())
    closer = old()._closer
    current["ref"] = GenerationRef("generations/2-x", identity)
    assert tracker.follow(0)
    # (Plain statements: pytest keeps the values inside an assert's expression alive.)
    found = request.current().store().search(vectors[2:3], 1).ids.tolist()
    assert found == [2] and closer.alive  # the request still answers from the old generation
    del request  # the request ends: nothing refers to the old generation any more
    gc.collect()  # (pymilvus may leave a frame of the store's first commit in a reference cycle)
    assert not closer.alive
    assert not tracker.current().store().closed and tracker.current().store().count == 0


LITE_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from visualsearch.errors import ConfigurationError
    from visualsearch.vectors.milvus_store import MilvusVectorStore, parse_vector_store
    try:
        store = MilvusVectorStore(parse_vector_store({path!r}), backbone="test_tiny", weights_sha256={sha!r}, dim={dim})
        print("opened", store.count)
    except ConfigurationError as exc:
        print("refused", exc)
""")


def _child(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_milvus_lite_serves_one_process_and_says_so(tmp_path):
    store = open_store("milvus-lite", tmp_path)
    store.commit(make_rows(range(3))[0])
    out = _child(LITE_CHILD.format(repo=str(REPO), path=str(tmp_path / "vectors.db"), sha=SHA, dim=DIM))
    assert out.startswith("refused") and "milvus-lite server" in out


def test_replicas_share_a_milvus_server(milvus_server, tmp_path):  # noqa: F811 (the fixture)
    target = parse_vector_store(f"{milvus_server}/replicas")
    first = MilvusVectorStore(target, backbone="test_tiny", weights_sha256=SHA, dim=DIM, lock_dir=tmp_path)
    rows, vectors = make_rows(range(20))
    first.commit(rows)
    # Another process: a replica on its own connection sees the write, and writes itself.
    out = _child(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import numpy as np
        from visualsearch.vectors.milvus_store import MilvusTarget, MilvusVectorStore
        store = MilvusVectorStore(MilvusTarget(uri={target.uri!r}, collection={target.collection!r}),
                                  backbone="test_tiny", weights_sha256={SHA!r}, dim={DIM}, lock_dir={str(tmp_path)!r})
        print(store.count, store.search(np.array({vectors[5].tolist()}, np.float32), 1).ids.tolist())
        store.commit(deletes=[5])
    """))
    assert out == "20 [5]"
    assert first.count == 19 and 5 not in first.search(vectors[5:6], 5).ids.tolist()
    first.drop()
    assert first.manifest is None


# --- the service on Milvus Lite -----------------------------------------------------------------

def test_the_service_answers_the_same_on_milvus_lite(tiny_settings, small_catalogue, tmp_path):
    from visualsearch.service import VisualSearch

    from .conftest import make_image

    settings = {"faiss": tiny_settings,
                "milvus-lite": dataclasses.replace(tiny_settings, data_dir=tmp_path / "data-milvus",
                                                   vector_store=str(tmp_path / "vectors.db"))}
    services = {name: VisualSearch(value) for name, value in settings.items()}
    probe = make_image(tmp_path / "probe.png", seed=30)  # P3's first image
    filters = SearchFilters.build(category="shoes|hats", max_price=100)

    def answers(vs: VisualSearch, similar: str = "P3") -> list:
        return [[(hit.sku, round(hit.score, 4)) for hit in result.hits] for result in (
            vs.search(probe, top_k=5), vs.search(probe, top_k=5, filters=filters),
            vs.search(probe, top_k=3, offset=2), vs.similar(similar, top_k=4),
            vs.similar(similar, top_k=4, filters=SearchFilters.build(brand="globex", attributes={"colour": "red"})))]

    for vs in services.values():
        vs.index(small_catalogue)
    assert answers(services["faiss"]) == answers(services["milvus-lite"])
    assert answers(services["faiss"])[0][0][0] == "P3"
    for vs in services.values():
        vs.remove(["P3", "P4"])
    after = answers(services["faiss"], similar="P0")
    assert after == answers(services["milvus-lite"], similar="P0")
    assert not {"P3", "P4"} & {sku for hits in after for sku, _ in hits}
    milvus = services["milvus-lite"]
    assert isinstance(milvus.store(), MilvusVectorStore)
    stats, health = milvus.stats(), milvus.health()
    assert stats["index"]["type"] == "Milvus FLAT (exact)" and stats["index"]["vectors"] == 20
    assert stats["index"]["up_to_date"] and health["index"]["vectors"] == 20
    assert milvus.compact()["vectors"] == 20 and milvus.rebuild_index()["rebuilt"]
    # (reembed on Milvus: tests/test_reembed.py)
