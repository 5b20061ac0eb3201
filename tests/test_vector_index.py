"""VectorIndex: exact cosine search, replace/remove by id, filtered search, atomic save/load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from visualsearch.vector_index import MANIFEST_NAME, IndexManifest, VectorIndex, read_manifest

from visualsearch import vector_index as vector_index_module
from visualsearch.errors import BackboneMismatchError, IndexCorruptError, InvalidRequestError

DIM = 16
SHA = "ab" * 32
OTHER_SHA = "cd" * 32


def unit_vectors(count: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def expected_neighbours(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int):
    """Brute-force cosine ranking: (scores, ids) of the k best, best first."""
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], ids[order]


def build(count: int = 50, seed: int = 0, first_id: int = 1000):
    ids = np.arange(first_id, first_id + count, dtype=np.int64)
    vectors = unit_vectors(count, seed)
    index = VectorIndex.create(DIM)
    index.add(ids, vectors)
    return index, ids, vectors


def save(index: VectorIndex, directory, *, revision: int = 1, backbone: str = "resnet50"):
    return index.save(directory, backbone=backbone, weights_sha256=SHA, catalogue_revision=revision)


def index_files(directory) -> list[str]:
    return sorted(path.name for path in directory.glob("index-*.faiss"))


# --- add / search ------------------------------------------------------------------------


def test_search_returns_nearest_ids_best_first_with_cosine_scores():
    index, ids, vectors = build(50)
    assert index.count == 50
    queries = unit_vectors(3, seed=99)
    scores, found = index.search(queries, 5)
    assert scores.shape == found.shape == (3, 5)
    for row, query in enumerate(queries):
        want_scores, want_ids = expected_neighbours(ids, vectors, query, 5)
        np.testing.assert_array_equal(found[row], want_ids)
        np.testing.assert_allclose(scores[row], want_scores, atol=1e-5)
        assert np.all(np.diff(scores[row]) <= 1e-6)  # best first


def test_a_stored_vector_is_its_own_best_match_with_score_one():
    index, ids, vectors = build(30)
    scores, found = index.search(vectors[[4, 17]], 1)
    np.testing.assert_array_equal(found[:, 0], ids[[4, 17]])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_k_larger_than_count_is_clipped_to_the_index_size():
    index, ids, vectors = build(7)
    scores, found = index.search(unit_vectors(1, seed=5), 100)
    assert found.shape == scores.shape == (1, 7)
    assert sorted(found[0].tolist()) == sorted(ids.tolist())
    assert -1 not in found


def test_search_of_an_empty_index_returns_no_hits():
    index = VectorIndex.create(DIM)
    scores, found = index.search(unit_vectors(2), 5)
    assert found.shape == scores.shape == (2, 0)


def test_add_with_an_existing_id_replaces_its_vector():
    index, ids, vectors = build(20)
    replacement = unit_vectors(1, seed=123)
    index.add(np.array([ids[3]]), replacement)
    assert index.count == 20
    scores, found = index.search(replacement, 1)
    assert found[0, 0] == ids[3]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # The old vector is gone: querying it no longer finds ids[3] with a perfect score.
    scores, found = index.search(vectors[3:4], 20)
    position = found[0].tolist().index(ids[3])
    assert scores[0, position] == pytest.approx(float(vectors[3] @ replacement[0]), abs=1e-5)
    assert scores[0, position] < 0.99


def test_remove_returns_how_many_were_present_and_they_are_gone():
    index, ids, vectors = build(20)
    removed = index.remove(np.array([ids[0], ids[5], 999_999], dtype=np.int64))
    assert removed == 2
    assert index.count == 18
    _, found = index.search(vectors, 20)
    assert ids[0] not in found and ids[5] not in found
    assert index.remove(np.array([ids[0]])) == 0
    assert index.remove(np.array([], dtype=np.int64)) == 0
    assert index.count == 18


def test_allowed_ids_restricts_results_and_still_returns_k_hits():
    index, ids, vectors = build(1000)
    rng = np.random.default_rng(7)
    allowed = rng.choice(ids, size=20, replace=False)
    query = unit_vectors(1, seed=77)
    scores, found = index.search(query, 10, allowed_ids=allowed)
    assert found.shape == (1, 10)
    assert set(found[0].tolist()) <= set(allowed.tolist())
    assert len(set(found[0].tolist())) == 10
    # And they are the best 10 among the allowed ones, in order.
    mask = np.isin(ids, allowed)
    want_scores, want_ids = expected_neighbours(ids[mask], vectors[mask], query[0], 10)
    np.testing.assert_array_equal(found[0], want_ids)
    np.testing.assert_allclose(scores[0], want_scores, atol=1e-5)


def test_allowed_ids_with_k_above_the_allowed_count_is_clipped():
    index, ids, _ = build(100)
    allowed = ids[[2, 40, 90]]
    _, found = index.search(unit_vectors(1, seed=3), 10, allowed_ids=allowed)
    assert found.shape == (1, 3)
    assert sorted(found[0].tolist()) == sorted(allowed.tolist())


def test_empty_allowed_ids_gives_no_hits():
    index, _, _ = build(10)
    scores, found = index.search(unit_vectors(1), 5, allowed_ids=np.array([], dtype=np.int64))
    assert found.shape == scores.shape == (1, 0)


@pytest.mark.parametrize("shape", [(3, DIM - 1), (3, DIM + 1), (DIM,), (3, 2, DIM)])
def test_add_with_the_wrong_vector_shape_is_an_invalid_request(shape):
    index = VectorIndex.create(DIM)
    with pytest.raises(InvalidRequestError):
        index.add(np.arange(3), np.zeros(shape, np.float32))
    assert index.count == 0


def test_add_with_fewer_ids_than_vectors_is_an_invalid_request():
    index = VectorIndex.create(DIM)
    with pytest.raises(InvalidRequestError):
        index.add(np.arange(2), unit_vectors(3))
    assert index.count == 0


# --- save / load -------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])
def test_save_then_load_round_trips_search_results(tmp_path, mmap):
    index, ids, vectors = build(40)
    queries = unit_vectors(4, seed=11)
    want_scores, want_ids = index.search(queries, 6)
    save(index, tmp_path)
    loaded, manifest = VectorIndex.load(tmp_path, mmap=mmap)
    assert loaded.count == 40 and loaded.dim == DIM
    assert loaded.read_only is mmap
    scores, found = loaded.search(queries, 6)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    # Filtered search works on the loaded index too.
    _, filtered = loaded.search(queries[:1], 3, allowed_ids=ids[:5])
    assert set(filtered[0].tolist()) <= set(ids[:5].tolist()) and filtered.shape == (1, 3)


def test_manifest_records_what_produced_the_vectors(tmp_path):
    index, _, _ = build(12)
    returned = index.save(tmp_path, backbone="resnet50", weights_sha256=SHA, catalogue_revision=7)
    on_disk = read_manifest(tmp_path)
    assert on_disk == returned
    assert on_disk.backbone == "resnet50"
    assert on_disk.weights_sha256 == SHA
    assert on_disk.dim == DIM
    assert on_disk.count == 12
    assert on_disk.index_type == "IDMap2,Flat"
    assert on_disk.metric == "inner_product"
    assert on_disk.catalogue_revision == 7
    assert (tmp_path / on_disk.index_file).is_file()
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert raw["backbone"] == "resnet50" and raw["count"] == 12 and raw["catalogue_revision"] == 7
    _, loaded_manifest = VectorIndex.load(tmp_path)
    assert loaded_manifest == returned


def test_second_save_replaces_the_index_file_and_deletes_the_old_one(tmp_path):
    index, ids, _ = build(10)
    first = save(index, tmp_path, revision=1)
    assert index_files(tmp_path) == [first.index_file]
    extra = unit_vectors(5, seed=50)
    index.add(np.arange(1, 6), extra)
    second = save(index, tmp_path, revision=2)
    assert second.index_file != first.index_file
    assert index_files(tmp_path) == [second.index_file]
    assert not (tmp_path / first.index_file).exists()
    loaded, manifest = VectorIndex.load(tmp_path)
    assert manifest.count == loaded.count == 15 and manifest.catalogue_revision == 2
    _, found = loaded.search(extra[2:3], 1)
    assert found[0, 0] == 3


def test_a_memory_mapped_index_survives_the_file_being_replaced(tmp_path):
    index, _, vectors = build(10)
    save(index, tmp_path, revision=1)
    mapped, _ = VectorIndex.load(tmp_path, mmap=True)
    want = mapped.search(vectors[:2], 3)
    index.remove(np.arange(1000, 1005))
    save(index, tmp_path, revision=2)  # unlinks the file `mapped` is mapped from
    assert len(index_files(tmp_path)) == 1
    scores, found = mapped.search(vectors[:2], 3)
    np.testing.assert_array_equal(found, want[1])
    np.testing.assert_allclose(scores, want[0])


_MMAP_WRITE_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from visualsearch.errors import InvalidRequestError
from visualsearch.vector_index import VectorIndex

mapped, _ = VectorIndex.load(Path(sys.argv[1]), mmap=True)
outcome = {"read_only": mapped.read_only}
for name, call in [("add", lambda: mapped.add(np.array([1]), np.ones((1, mapped.dim), np.float32))),
                   ("remove", lambda: mapped.remove(np.array([1000, 1001])))]:
    try:
        call()
        outcome[name] = "accepted"
    except InvalidRequestError as exc:
        outcome[name] = str(exc)
outcome["count"] = mapped.count
print(json.dumps(outcome))
"""


def test_a_memory_mapped_index_refuses_writes(tmp_path):
    index, _, _ = build(10)
    save(index, tmp_path)
    # In a child process: FAISS aborts the whole process when a memory-mapped index
    # is written to, so a regression must not take the test run down with it.
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", _MMAP_WRITE_SCRIPT, str(tmp_path)],
                           capture_output=True, text=True, timeout=60, env=env)
    assert child.returncode == 0, f"child died ({child.returncode}): {child.stderr[-2000:]}"
    outcome = json.loads(child.stdout.strip().splitlines()[-1])
    assert outcome["read_only"] is True
    assert "read-only" in outcome["add"]
    assert "read-only" in outcome["remove"]
    assert outcome["count"] == 10


def test_a_crash_while_saving_leaves_the_previous_index_intact(tmp_path, monkeypatch):
    index, ids, vectors = build(10)
    first = save(index, tmp_path, revision=1)
    manifest_bytes = (tmp_path / MANIFEST_NAME).read_bytes()
    want_scores, want_ids = index.search(vectors[:3], 4)

    index.add(np.arange(1, 21), unit_vectors(20, seed=8))

    def crashing_write_index(faiss_index, path):
        with open(path, "wb") as handle:
            handle.write(b"\x00partial faiss index")
        raise OSError("disk full")

    monkeypatch.setattr(vector_index_module.faiss, "write_index", crashing_write_index)
    with pytest.raises(OSError, match="disk full"):
        save(index, tmp_path, revision=2)
    monkeypatch.undo()

    assert (tmp_path / MANIFEST_NAME).read_bytes() == manifest_bytes
    assert index_files(tmp_path) == [first.index_file]
    loaded, manifest = VectorIndex.load(tmp_path)
    assert manifest == first
    assert loaded.count == 10
    scores, found = loaded.search(vectors[:3], 4)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)

    # A later save (after the "crash") succeeds and replaces the old index.
    third = save(index, tmp_path, revision=3)
    assert index_files(tmp_path) == [third.index_file]
    assert VectorIndex.load(tmp_path)[0].count == 30


# --- manifest compatibility and corruption ------------------------------------------------


def make_manifest(**overrides) -> IndexManifest:
    fields = dict(backbone="resnet50", weights_sha256=SHA, dim=DIM, index_type="IDMap2,Flat",
                  metric="inner_product", count=3, index_file="index-1.faiss",
                  catalogue_revision=1, updated_at=0.0)
    fields.update(overrides)
    return IndexManifest(**fields)


def test_check_compatible_accepts_the_same_backbone_weights_and_dim():
    make_manifest().check_compatible(backbone="resnet50", weights_sha256=SHA, dim=DIM)


def test_check_compatible_rejects_another_backbone_and_names_the_stored_one():
    manifest = make_manifest(backbone="resnet50")
    with pytest.raises(BackboneMismatchError) as caught:
        manifest.check_compatible(backbone="efficientnet_b0", weights_sha256=SHA, dim=DIM)
    assert "resnet50" in str(caught.value)


def test_check_compatible_rejects_other_weights():
    manifest = make_manifest()
    with pytest.raises(BackboneMismatchError) as caught:
        manifest.check_compatible(backbone="resnet50", weights_sha256=OTHER_SHA, dim=DIM)
    assert "resnet50" in str(caught.value)


def test_check_compatible_rejects_another_dim():
    manifest = make_manifest(dim=DIM)
    with pytest.raises(BackboneMismatchError) as caught:
        manifest.check_compatible(backbone="resnet50", weights_sha256=SHA, dim=DIM * 2)
    assert "resnet50" in str(caught.value) and str(DIM) in str(caught.value)


def test_read_manifest_is_none_when_nothing_was_saved(tmp_path):
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize("text", ["{not json", "", '["a list"]', '{"backbone": "resnet50"}'])
def test_read_manifest_rejects_garbage(tmp_path, text):
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(IndexCorruptError):
        read_manifest(tmp_path)


def test_load_without_a_manifest_is_index_corrupt(tmp_path):
    with pytest.raises(IndexCorruptError, match="no index"):
        VectorIndex.load(tmp_path)


def test_load_when_the_index_file_is_missing_is_index_corrupt(tmp_path):
    index, _, _ = build(5)
    manifest = save(index, tmp_path)
    (tmp_path / manifest.index_file).unlink()
    with pytest.raises(IndexCorruptError, match=manifest.index_file):
        VectorIndex.load(tmp_path)


def test_load_of_a_garbage_index_file_is_index_corrupt(tmp_path):
    index, _, _ = build(5)
    manifest = save(index, tmp_path)
    (tmp_path / manifest.index_file).write_bytes(b"this is not a faiss index at all")
    with pytest.raises(IndexCorruptError):
        VectorIndex.load(tmp_path)


def test_load_rejects_an_index_whose_dim_disagrees_with_the_manifest(tmp_path):
    index, _, _ = build(5)
    manifest = save(index, tmp_path)
    wrong = replace(manifest, dim=DIM + 1)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(asdict(wrong)))
    with pytest.raises(IndexCorruptError, match="dimension"):
        VectorIndex.load(tmp_path)


def test_duplicate_ids_in_one_add_and_bad_query_shapes_are_invalid_requests():
    index = VectorIndex.create(DIM)
    with pytest.raises(InvalidRequestError, match="twice"):
        index.add(np.array([5, 5]), unit_vectors(2))
    index.add(np.array([1, 2]), unit_vectors(2))
    for shape in [(1, DIM + 1), (2, 3, DIM)]:
        with pytest.raises(InvalidRequestError):
            index.search(np.zeros(shape, dtype=np.float32), 1)
    assert index.search(unit_vectors(1)[0], 1)[1].shape == (1, 1)  # one 1-D query is fine


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    index, _, _ = build()

    def broken_write(_index, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(vector_index_module.faiss, "write_index", broken_write)
    with pytest.raises(RuntimeError):
        save(index, tmp_path)
    assert list(tmp_path.iterdir()) == []
