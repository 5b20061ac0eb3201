"""Generations kept in data-directory folders (FAISS) or Milvus collections: opened, listed, named and dropped alike."""

from __future__ import annotations

import numpy as np
import pytest

from visualsearch.catalogue.store import StoredIdentity
from visualsearch.generation_storage import FolderGenerations, GenerationStorage, MilvusGenerations
from visualsearch.generations import GenerationChangedError, GenerationStore
from visualsearch.vectors import VectorRows, VectorStore
from visualsearch.vectors.milvus_store import (
    FORMAT,
    LOCATION_PROPERTY,
    PROPERTY,
    MilvusTarget,
    MilvusVectorStore,
    collection_location,
    parse_vector_store,
)

DIM = 8
IDENTITY = StoredIdentity("test_tiny", "ab" * 32, DIM)
BACKENDS = ["faiss", "milvus-lite"]


def _storage(backend: str, tmp_path, base: str = "shop") -> GenerationStorage:
    if backend == "faiss":
        return FolderGenerations(tmp_path / "data", memory_budget=2**30)
    pytest.importorskip("milvus_lite")
    target = parse_vector_store(str(tmp_path / "vectors.db"))
    return MilvusGenerations(MilvusTarget(uri=target.uri, collection=base), lock_dir=tmp_path)


def _fill(store) -> None:
    vectors = np.eye(2, DIM, dtype=np.float32)
    store.commit(VectorRows.build(ids=[1, 2], product_ids=[1, 2], vectors=vectors, prices=[None, 1.0],
                                  tokens=[[], []], dim=DIM))


@pytest.mark.parametrize("backend", BACKENDS)
def test_generations_are_listed_named_and_dropped_alike(backend, tmp_path):
    storage = _storage(backend, tmp_path)
    assert storage.locations() == [] and storage.new_location("test_tiny") == "generations/1-test_tiny"
    for location in ("", "generations/1-a", "generations/3-b"):
        _fill(storage.open(location, IDENTITY, is_current=None))
    assert storage.locations() == ["", "generations/1-a", "generations/3-b"]
    assert storage.new_location("clip/vit b") == "generations/4-clip_vit_b"

    current = {"location": "generations/1-a"}
    store = storage.open("generations/1-a", IDENTITY, is_current=lambda: current["location"] == "generations/1-a")
    assert isinstance(store, (GenerationStore, MilvusVectorStore)) and store.count == 2
    current["location"] = "generations/4-x"
    with pytest.raises(GenerationChangedError):
        _fill(store)

    storage.drop("")
    storage.drop("generations/1-a")
    storage.drop("generations/9-never")  # nothing there: nothing to do
    assert "" not in storage.locations() and "generations/1-a" not in storage.locations()
    assert storage.open("generations/1-a", IDENTITY, is_current=None, read_only=True).count == 0


def test_folders_hold_faiss_stores_and_nothing_outside_generations_is_dropped(tmp_path):
    storage = _storage("faiss", tmp_path)
    _fill(storage.open("", IDENTITY, is_current=None))
    _fill(storage.open("generations/2-b", IDENTITY, is_current=None))
    assert isinstance(storage.open("", IDENTITY, is_current=None), VectorStore)
    assert storage.locations() == ["", "generations/2-b"]
    assert (tmp_path / "data" / "generations" / "2-b" / "manifest.json").is_file()
    for outside in ("catalogue", "generations", "generations/..", "generations/.", "../elsewhere",
                    "generations/2-b/vectors"):
        with pytest.raises(ValueError, match="not a generation"):
            storage.drop(outside)
    storage.drop("")
    assert not (tmp_path / "data" / "manifest.json").exists() and not (tmp_path / "data" / "vectors").exists()
    assert storage.locations() == ["generations/2-b"]


def test_collections_of_another_base_name_are_not_listed(tmp_path):
    pytest.importorskip("milvus_lite")
    shop, other = _storage("milvus-lite", tmp_path, "shop"), _storage("milvus-lite", tmp_path, "shop__other")
    _fill(shop.open("generations/1-a", IDENTITY, is_current=None))
    _fill(other.open("", IDENTITY, is_current=None))
    assert shop.locations() == ["generations/1-a"] and other.locations() == [""]


OURS = {PROPERTY + "format": FORMAT}


@pytest.mark.parametrize(("name", "properties", "location"), [
    ("shop", OURS, ""),
    ("shop__generations_1_a_4f1c8d0e", {**OURS, LOCATION_PROPERTY: "generations/1-a"}, None),  # not its hash
    ("shop", {}, None),                                                                       # not made by us
    ("shop__generations_1_a", OURS, None),                                    # no location recorded
    ("other__x", {**OURS, LOCATION_PROPERTY: "x"}, None),
])
def test_a_collection_names_its_generation_only_when_it_is_ours(name, properties, location):
    assert collection_location(MilvusTarget(uri="x.db", collection="shop"), name, properties) == location


def test_a_collection_names_the_generation_it_was_made_for():
    from visualsearch.vectors.milvus_store import collection_name

    name = collection_name("shop", "generations/1-a")
    assert collection_location(MilvusTarget(uri="x.db", collection="shop"), name,
                               {**OURS, LOCATION_PROPERTY: "generations/1-a"}) == "generations/1-a"
