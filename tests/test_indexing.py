"""Batch indexing: idempotent, resumable, failures recorded, bad manifests change nothing."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from visualsearch import indexing
from visualsearch.catalogue import ImageStatus, store
from visualsearch.errors import BackboneMismatchError, ManifestError, WriterBusyError
from visualsearch.service import VisualSearch

from .conftest import Crash, CrashAfterFirstBatch, make_image, write_catalogue

# The catalogue's queries and triggers run on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.catalogue_databases("sqlite", "postgresql")


def _vectors_of(vs: VisualSearch, sku: str) -> np.ndarray:
    ids = [image.id for image in vs.product(sku).indexed_images]
    return vs.store().get_vectors(ids)[1]


def test_index_then_rerun_skips_everything(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    first = vs.index(small_catalogue)
    assert (first.products, first.images, first.embedded, first.failures) == (12, 24, 24, [])
    second = vs.index(small_catalogue)
    assert (second.embedded, second.reused, second.unchanged) == (0, 0, 24)
    stats = vs.stats()
    assert stats["products"] == 12 and stats["indexed_images"] == 24
    assert stats["categories"] == {"bags": 8, "hats": 8, "shoes": 8}
    assert stats["index"]["vectors"] == 24 and stats["index"]["up_to_date"]
    product = vs.product("P3")
    assert product.attributes["colour"] in ("red", "blue")
    assert product.price == 40.0 and product.category == "shoes"
    assert all(image.width == 48 and image.status == "indexed" for image in product.images)
    with vs.sessions() as session:
        assert all(len(image.sha256) == 64 for image in store.get_product(session, "P3").images)


def test_bad_images_are_recorded_and_never_stop_the_run(tiny_settings, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "good.png", seed=1)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.png").write_text("plain text")
    rows = [{"sku": "A", "image": "good.png"}, {"sku": "B", "image": "broken.jpg"},
            {"sku": "C", "image": "notes.png"}, {"sku": "D", "image": "missing.png"}]
    vs = VisualSearch(tiny_settings)
    report = vs.index(write_catalogue(folder, rows))
    assert report.embedded == 1
    assert {failure.sku for failure in report.failures} == {"B", "C", "D"}
    logged = [json.loads(line) for line in vs.failures_path.read_text().splitlines()]
    assert {entry["sku"] for entry in logged} == {"B", "C", "D"}
    assert {entry["code"] for entry in logged} >= {"file_not_found", "unsupported_image"}
    assert vs.stats()["failed_images"] == 3
    # Fixing the file and re-running indexes it: failures are retried.
    make_image(folder / "missing.png", seed=2)
    rerun = vs.index(write_catalogue(folder, rows))
    assert rerun.embedded == 1 and rerun.unchanged == 1 and len(rerun.failures) == 2
    assert vs.store().count == 2


def test_an_indexed_image_that_breaks_leaves_the_index(tiny_settings, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "a.png", seed=1)
    manifest = write_catalogue(folder, [{"sku": "A", "image": "a.png"}])
    vs = VisualSearch(tiny_settings)
    vs.index(manifest)
    assert vs.store().count == 1
    (folder / "a.png").write_text("now broken")
    report = vs.index(manifest)
    assert len(report.failures) == 1
    assert vs.store().count == 0 and vs.stats()["failed_images"] == 1


def test_a_bad_manifest_changes_nothing(tiny_settings, small_catalogue, tmp_path):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    before = vs.stats()
    bad = write_catalogue(tmp_path / "bad", [{"sku": "X", "picture": "x.png"}])
    with pytest.raises(ManifestError, match="image"):
        vs.index(bad)
    half_bad = write_catalogue(tmp_path / "bad2", [{"sku": "NEW", "image": "a.png"}, {"sku": "", "image": "b.png"}])
    with pytest.raises(ManifestError, match="line 3"):
        vs.index(half_bad)
    assert vs.stats() == before


def test_changed_file_is_re_embedded_and_duplicate_content_reused(tiny_settings, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "a.png", seed=1)
    make_image(folder / "b.png", seed=2)
    manifest = write_catalogue(folder, [{"sku": "A", "image": "a.png"}, {"sku": "B", "image": "b.png"}])
    vs = VisualSearch(tiny_settings)
    vs.index(manifest)
    old = _vectors_of(vs, "A")
    make_image(folder / "a.png", seed=99)
    os.utime(folder / "a.png", ns=(1, 1))  # a different mtime, whatever the clock does
    report = vs.index(manifest)
    assert report.embedded == 1 and report.unchanged == 1
    assert not np.allclose(_vectors_of(vs, "A"), old)
    assert vs.store().count == 2
    # Same bytes under another product: the stored vector is reused, not recomputed.
    (folder / "copy.png").write_bytes((folder / "b.png").read_bytes())
    more = write_catalogue(folder, [{"sku": "C", "image": "copy.png"}], name="more.csv")
    report = vs.index(more)
    assert report.reused == 1 and report.embedded == 0
    assert np.allclose(_vectors_of(vs, "C"), _vectors_of(vs, "B"))


def test_changed_fields_move_the_product_between_filters(tiny_settings, tmp_path):
    """A manifest that only changes a category rewrites the product's filter fields."""
    from visualsearch.vectors import SearchFilters

    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "a.png", seed=1)
    vs = VisualSearch(tiny_settings)
    vs.index(write_catalogue(folder, [{"sku": "A", "image": "a.png", "category": "Shoes", "colour": "red"}]))
    query = folder / "a.png"
    assert [h.sku for h in vs.search(query, filters=SearchFilters.build(category="shoes")).hits] == ["A"]
    report = vs.index(write_catalogue(folder, [{"sku": "A", "image": "a.png", "category": "Bags",
                                                "colour": "blue"}], name="v2.csv"))
    assert report.embedded == 0 and report.unchanged == 1
    assert vs.search(query, filters=SearchFilters.build(category="shoes")).hits == []
    assert [h.sku for h in vs.search(query, filters=SearchFilters.build(
        category="BAGS", attributes={"colour": "Blue"})).hits] == ["A"]
    assert vs.stats()["categories"] == {"Bags": 1}


def test_a_crash_mid_run_loses_nothing_and_the_next_run_resumes(tiny_settings, small_catalogue, monkeypatch):
    from visualsearch import indexing

    monkeypatch.setattr(indexing, "FLUSH_ROWS", tiny_settings.batch_size)
    vs = VisualSearch(tiny_settings)
    with pytest.raises(Crash):
        indexing.index_manifest(vs, small_catalogue, progress=CrashAfterFirstBatch(tiny_settings.batch_size),
                                embedding=None)
    # Whatever was committed is consistent: indexed images are exactly the live vectors.
    reader = VisualSearch(tiny_settings, read_only=True)
    indexed = reader.stats()["indexed_images"]
    assert indexed in (0, 8) and (reader.store() is None or reader.store().count == indexed)
    report = VisualSearch(tiny_settings).index(small_catalogue)
    assert report.unchanged == indexed and report.embedded == 24 - indexed
    assert VisualSearch(tiny_settings, read_only=True).store().count == 24


def test_another_backbone_on_an_existing_catalogue_is_refused(tiny_settings, small_catalogue, tmp_path):
    VisualSearch(tiny_settings).index(small_catalogue)
    import torch

    from .conftest import _TinyNet

    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(_TinyNet().state_dict(), other)
    with pytest.raises(BackboneMismatchError, match="other weights"):
        VisualSearch(tiny_settings.with_overrides(weights=str(other))).index(small_catalogue)
    with pytest.raises(BackboneMismatchError, match="test_tiny"):
        VisualSearch(replace(tiny_settings, backbone="mobilenet_v2", weights=None)).embedder


def test_one_index_run_at_a_time(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    with vs.index_lock():
        with pytest.raises(WriterBusyError, match="--wait"):
            VisualSearch(tiny_settings).index(small_catalogue)
        with pytest.raises(WriterBusyError):
            VisualSearch(tiny_settings).index(small_catalogue, wait=0.3)


def test_remove_products(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    result = vs.remove(["P1", "P2", "NOPE"])
    assert set(result.removed) == {"P1", "P2"} and result.unknown == ["NOPE"]
    reader = VisualSearch(tiny_settings, read_only=True)
    assert reader.store().count == 20 and reader.stats()["products"] == 10
    hits = reader.store().search(np.eye(1, 32, dtype=np.float32), 24)
    with reader.sessions() as session:
        live = {image_id for batch in store.indexed_image_ids(session) for image_id in batch}
    assert set(hits.ids.tolist()) == live and len(live) == 20


@pytest.mark.catalogue_databases("sqlite")
def test_sqlite_runs_in_wal_mode(tiny_settings):
    vs = VisualSearch(tiny_settings)
    with vs.sessions() as session:
        assert session.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_counters_follow_every_write(tiny_settings, small_catalogue):
    """The trigger-maintained counters equal a recount after indexing, failures and removals."""
    from visualsearch.catalogue.counters import read_counts, recount

    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    vs.remove(["P0", "P5"])
    with vs.session() as session:
        kept = {k: v for k, v in read_counts(session).items() if v}
        recount(session.connection())
        assert {k: v for k, v in read_counts(session).items() if v} == kept
    assert kept["products"] == 10 and kept["images:indexed"] == 20


def test_images_status_values(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    assert {image.status for image in vs.product("P0").images} == {ImageStatus.INDEXED.value}


def test_a_sku_named_again_far_down_the_manifest(tiny_settings, tmp_path, monkeypatch):
    """Rows of one SKU in two manifest chunks: its image is embedded once, the run ends."""
    from visualsearch import indexing

    monkeypatch.setattr(indexing, "MANIFEST_CHUNK_ROWS", 2)
    folder = tmp_path / "cat"
    folder.mkdir()
    rows = []
    for number in range(6):
        make_image(folder / f"{number}.png", seed=number)
        rows.append({"sku": f"S{number}", "image": f"{number}.png", "category": "first"})
    rows.append({"sku": "S0", "image": "0.png", "category": "later"})  # same SKU, another chunk
    vs = VisualSearch(tiny_settings)
    report = vs.index(write_catalogue(folder, rows))
    assert report.failures == [] and report.embedded == 6
    assert vs.product("S0").category == "later" and vs.store().count == 6
    from visualsearch.vectors import SearchFilters

    hits = vs.search(folder / "0.png", filters=SearchFilters.build(category="later")).hits
    assert [hit.sku for hit in hits] == ["S0"]


def test_a_field_change_whose_store_update_died_is_applied_later(tiny_settings, tmp_path, monkeypatch):
    """The catalogue took the new category, then the process died before the store did:
    the product is flagged, and the next write of it (or compact) rewrites its fields."""
    from visualsearch.vectors import SearchFilters
    from visualsearch.writer import CatalogueWriter

    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "a.png", seed=1)
    vs = VisualSearch(tiny_settings)
    vs.index(write_catalogue(folder, [{"sku": "A", "image": "a.png", "category": "Shoes"}]))
    moved = write_catalogue(folder, [{"sku": "A", "image": "a.png", "category": "Bags"}], name="moved.csv")
    real_commit = CatalogueWriter.commit

    def dies(self, pending):
        if pending.refresh_products:
            raise Crash()
        return real_commit(self, pending)

    monkeypatch.setattr(CatalogueWriter, "commit", dies)
    with pytest.raises(Crash):
        vs.index(moved)
    monkeypatch.setattr(CatalogueWriter, "commit", real_commit)
    query = folder / "a.png"
    assert vs.product("A").category == "Bags"
    assert vs.search(query, filters=SearchFilters.build(category="bags")).hits == []  # not yet
    report = vs.index(moved)  # nothing changed in the manifest's eyes, but A is flagged
    assert report.unchanged == 1
    assert [h.sku for h in vs.search(query, filters=SearchFilters.build(category="bags")).hits] == ["A"]
    assert vs.search(query, filters=SearchFilters.build(category="shoes")).hits == []

    # The same through compact, for a product no later write touches.
    monkeypatch.setattr(CatalogueWriter, "commit", dies)
    with pytest.raises(Crash):
        vs.index(write_catalogue(folder, [{"sku": "A", "image": "a.png", "category": "Hats"}], name="hats.csv"))
    monkeypatch.setattr(CatalogueWriter, "commit", real_commit)
    vs.compact()
    assert [h.sku for h in vs.search(query, filters=SearchFilters.build(category="hats")).hits] == ["A"]


HASH = "ab" * 32


@pytest.mark.parametrize("path, sha256, unchanged", [
    (f"s3://shop/uploads/{HASH}.jpg", HASH, True),  # an upload: its name is its content hash
    (f"file:///srv/shared/uploads/{HASH}.png", HASH, True),
    (f"s3://shop/uploads/{HASH}.jpg", "cd" * 32, False),  # the name is another content's hash
    (f"s3://shop/uploads/{HASH}.jpg", None, False),
    ("s3://shop/catalogue/front.jpg", HASH, False),  # not named by a hash: fetched and compared
])
def test_an_image_at_an_fsspec_url_is_unchanged_when_its_name_is_its_hash(path, sha256, unchanged):
    """(No stat of a URL: an upload kept in an object store is never fetched again to know.)"""
    row = store.ImageRow(id=1, product_id=1, path=path, status=ImageStatus.INDEXED, file_size=10,
                         file_mtime_ns=1, sha256=sha256)
    assert indexing._unchanged_on_disk(row) is unchanged
