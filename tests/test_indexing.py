"""Batch indexing: idempotent, resumable, failures recorded, bad manifests change nothing."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
from visualsearch.engine import Engine

from visualsearch.catalogue import ImageStatus, store
from visualsearch.errors import BackboneMismatchError, ManifestError, WriterBusyError
from visualsearch.indexing import index_manifest

from .conftest import Crash, CrashAfterFirstBatch, make_image, write_catalogue


def test_index_then_rerun_skips_everything(tiny_settings, small_catalogue):
    engine = Engine(tiny_settings)
    first = index_manifest(engine, small_catalogue)
    assert (first.products, first.images, first.embedded, first.failures) == (12, 24, 24, [])
    second = index_manifest(engine, small_catalogue)
    assert (second.embedded, second.reused, second.unchanged) == (0, 0, 24)
    stats = engine.stats()
    assert stats["products"] == 12 and stats["indexed_images"] == 24
    assert stats["index"]["vectors"] == 24 and stats["index"]["up_to_date"]
    with engine.sessions() as session:
        product = store.get_product(session, "P3")
        assert product.attributes["colour"] in ("red", "blue")
        assert product.price == 40.0 and product.category == "shoes"
        assert all(len(image.sha256) == 64 and image.width == 48 for image in product.images)


def test_bad_images_are_recorded_and_never_stop_the_run(tiny_settings, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "good.png", seed=1)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.png").write_text("plain text")
    rows = [{"sku": "A", "image": "good.png"}, {"sku": "B", "image": "broken.jpg"},
            {"sku": "C", "image": "notes.png"}, {"sku": "D", "image": "missing.png"}]
    engine = Engine(tiny_settings)
    report = index_manifest(engine, write_catalogue(folder, rows))
    assert report.embedded == 1
    assert {failure.sku for failure in report.failures} == {"B", "C", "D"}
    logged = [json.loads(line) for line in engine.failures_path.read_text().splitlines()]
    assert {entry["sku"] for entry in logged} == {"B", "C", "D"}
    assert {entry["code"] for entry in logged} >= {"file_not_found", "unsupported_image"}
    assert engine.stats()["failed_images"] == 3
    # Fixing the file and re-running indexes it: failures are retried.
    make_image(folder / "missing.png", seed=2)
    rerun = index_manifest(engine, write_catalogue(folder, rows))
    assert rerun.embedded == 1 and rerun.unchanged == 1 and len(rerun.failures) == 2


def test_a_bad_manifest_changes_nothing(tiny_settings, small_catalogue, tmp_path):
    engine = Engine(tiny_settings)
    index_manifest(engine, small_catalogue)
    before = engine.stats()
    bad = write_catalogue(tmp_path / "bad", [{"sku": "X", "picture": "x.png"}])
    with pytest.raises(ManifestError, match="image"):
        index_manifest(engine, bad)
    half_bad = write_catalogue(tmp_path / "bad2", [{"sku": "NEW", "image": "a.png"}, {"sku": "", "image": "b.png"}])
    with pytest.raises(ManifestError, match="line 3"):
        index_manifest(engine, half_bad)
    assert engine.stats() == before


def test_changed_file_is_re_embedded_and_duplicate_content_reused(tiny_settings, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "a.png", seed=1)
    make_image(folder / "b.png", seed=2)
    manifest = write_catalogue(folder, [{"sku": "A", "image": "a.png"}, {"sku": "B", "image": "b.png"}])
    engine = Engine(tiny_settings)
    index_manifest(engine, manifest)
    with engine.sessions() as session:
        old = store.get_product(session, "A").images[0].embedding
    make_image(folder / "a.png", seed=99)
    os.utime(folder / "a.png", ns=(1, 1))  # a different mtime, whatever the clock does
    report = index_manifest(engine, manifest)
    assert report.embedded == 1 and report.unchanged == 1
    with engine.sessions() as session:
        assert store.get_product(session, "A").images[0].embedding != old
    assert engine.index().count == 2
    # Same bytes under another product: the stored vector is reused, not recomputed.
    (folder / "copy.png").write_bytes((folder / "b.png").read_bytes())
    more = write_catalogue(folder, [{"sku": "C", "image": "copy.png"}], name="more.csv")
    report = index_manifest(engine, more)
    assert report.reused == 1 and report.embedded == 0


def test_a_crash_mid_run_loses_nothing_and_the_next_run_resumes(tiny_settings, small_catalogue):
    engine = Engine(tiny_settings)
    with pytest.raises(Crash):
        index_manifest(engine, small_catalogue, progress=CrashAfterFirstBatch(tiny_settings.batch_size))
    # The committed batch is in the catalogue; no index was saved yet.
    assert engine.stats()["indexed_images"] == 8
    # A reader opening the data directory now rebuilds the index from the catalogue.
    reader = Engine(tiny_settings, read_only=True)
    assert reader.index().count == 8
    report = index_manifest(Engine(tiny_settings), small_catalogue)
    assert report.unchanged == 8 and report.embedded == 16
    assert Engine(tiny_settings, read_only=True).index().count == 24


def test_another_backbone_on_an_existing_catalogue_is_refused(tiny_settings, small_catalogue, tmp_path):
    index_manifest(Engine(tiny_settings), small_catalogue)
    import torch

    from .conftest import _TinyNet

    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(_TinyNet().state_dict(), other)
    engine = Engine(tiny_settings.with_overrides(weights=str(other)))
    with pytest.raises(BackboneMismatchError, match="other weights"):
        index_manifest(engine, small_catalogue)
    with pytest.raises(BackboneMismatchError, match="test_tiny"):
        Engine(replace(tiny_settings, backbone="mobilenet_v2", weights=None)).embedder


def test_one_writer_at_a_time(tiny_settings, small_catalogue):
    engine = Engine(tiny_settings)
    with engine.writer():
        with pytest.raises(WriterBusyError):
            index_manifest(Engine(tiny_settings), small_catalogue)


def test_remove_products(tiny_settings, small_catalogue):
    engine = Engine(tiny_settings)
    index_manifest(engine, small_catalogue)
    removed, unknown = engine.remove(["P1", "P2", "NOPE"])
    assert removed == ["P1", "P2"] or set(removed) == {"P1", "P2"}
    assert unknown == ["NOPE"]
    reader = Engine(tiny_settings, read_only=True)
    assert reader.index().count == 20 and reader.stats()["products"] == 10
    with reader.sessions() as session:
        ids = store.filtered_image_ids(session)
    assert len(ids) == 20
    scores, found = reader.index().search(np.eye(1, 32, dtype=np.float32), 24)
    assert set(found[0].tolist()) == set(ids.tolist())


def test_sqlite_runs_in_wal_mode(tiny_settings):
    engine = Engine(tiny_settings)
    with engine.sessions() as session:
        assert session.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_images_status_values(tiny_settings, small_catalogue):
    engine = Engine(tiny_settings)
    index_manifest(engine, small_catalogue)
    with engine.sessions() as session:
        product = store.get_product(session, "P0")
        assert {image.status for image in product.images} == {ImageStatus.INDEXED}
