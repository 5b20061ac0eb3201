"""The disk refuses: a read-only data directory, a full disk, a locked catalogue.

Each gives one typed error (one CLI line with exit status 1, a JSON 503/507 from the
API), changes nothing, leaves no temporary file behind, and searches keep working.
The disks are real: a small tmpfs filled to the last block, and a read-only bind
mount of a data directory (both need mount permission, as root in CI has).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visualsearch import indexing
from visualsearch.catalogue import database
from visualsearch.errors import StorageBusyError, StorageError, StorageFullError
from visualsearch.service import VisualSearch
from visualsearch.settings import Settings
from visualsearch.uploads import UPLOADS_DIR
from web import create_app

from .conftest import REPO, TINY, make_image, write_catalogue

KEY = "secret"


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: big enough for a tiny catalogue, quick to fill."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=6M", "tmpfs", str(disk)):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def read_only_view(tmp_path):
    """read_only_view(folder) -> the same folder seen through a read-only bind mount."""
    views = []

    def make(folder: Path) -> Path:
        view = tmp_path / f"read-only-{len(views)}"
        view.mkdir()
        if not (_mount("--bind", str(folder), str(view)) and _mount("-o", "remount,ro,bind", str(view))):
            pytest.skip("bind mounts need root (CI runs as root)")
        views.append(view)
        return view

    yield make
    for view in views:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no block left; returns it (delete it to free the disk)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def cli(*args: str, weights: Path) -> subprocess.CompletedProcess:
    """``visualsearch ARGS`` in a fresh process (nothing cached from the indexing process)."""
    env = dict(os.environ, VISUALSEARCH_BACKBONE=TINY, VISUALSEARCH_WEIGHTS=str(weights), VISUALSEARCH_WORKERS="0")
    code = "import tests.conftest; from indexer.cli import main; main(prog_name='visualsearch')"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


def new_products(folder: Path, count: int = 6) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = [{"sku": f"N{n}", "image": str(make_image(folder / "img" / f"n{n}.png", seed=500 + n)),
             "title": f"New {n}", "category": "shoes"} for n in range(count)]
    return write_catalogue(folder, rows)


def assert_one_error_line(result: subprocess.CompletedProcess, code: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and f"[{code}]" in lines[0], result.stderr


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_read_only_data_dir_serves_searches_and_refuses_writes(small_disk, read_only_view, small_catalogue,
                                                               tiny_weights, tmp_path):
    data = small_disk / "data"
    assert cli("index", str(small_catalogue), "--data-dir", str(data), weights=tiny_weights).returncode == 0
    view = read_only_view(data)
    query = small_catalogue.parent / "img" / "p7-0.png"

    found = cli("search", str(query), "--data-dir", str(view), "--top-k", "3", "--json", weights=tiny_weights)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["results"][0]["sku"] == "P7"
    assert found.stderr == ""  # a read-only mount is no reason to warn

    other = new_products(tmp_path / "new")
    for args in (["remove", "P1"], ["index", str(other)], ["compact"], ["rebuild-index"]):
        assert_one_error_line(cli(*args, "--data-dir", str(view), weights=tiny_weights), "storage_read_only")

    stats = json.loads(cli("stats", "--json", "--data-dir", str(view), weights=tiny_weights).stdout)
    assert stats["products"] == 12 and stats["index"]["vectors"] == 24

    # A reader opens the catalogue read-only: it could not write even by mistake.
    reader = VisualSearch(Settings(data_dir=data, backbone=TINY, weights=str(tiny_weights)), read_only=True)
    with reader.sessions() as session:
        assert session.connection().exec_driver_sql("PRAGMA query_only").scalar() == 1


def test_full_disk_refuses_index_run_keeps_serving_and_recovers(small_disk, small_catalogue, tiny_weights,
                                                                tmp_path):
    data = small_disk / "data"
    assert cli("index", str(small_catalogue), "--data-dir", str(data), weights=tiny_weights).returncode == 0
    filler = fill(small_disk)
    other = new_products(tmp_path / "new")

    assert_one_error_line(cli("index", str(other), "--data-dir", str(data), weights=tiny_weights), "storage_full")
    assert_one_error_line(cli("compact", "--force", "--data-dir", str(data), weights=tiny_weights), "storage_full")
    found = cli("search", str(small_catalogue.parent / "img" / "p3-1.png"), "--data-dir", str(data), "--json",
                weights=tiny_weights)
    assert found.returncode == 0 and json.loads(found.stdout)["results"][0]["sku"] == "P3"
    assert leftovers(data) == []

    filler.unlink()  # space again: the same run now goes through
    result = cli("index", str(other), "--data-dir", str(data), "--json", weights=tiny_weights)
    assert result.returncode == 0, result.stderr
    stats = json.loads(cli("stats", "--json", "--data-dir", str(data), weights=tiny_weights).stdout)
    assert stats["products"] == 18 and stats["index"]["vectors"] == 30 and stats["index"]["up_to_date"]


def png_bytes(seed: int, size: int = 160) -> bytes:
    """Noise: it does not compress, so the upload needs real disk blocks."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def put_image(client, sku: str, seed: int):
    return client.put(f"/api/v1/products/{sku}", headers={"Authorization": f"Bearer {KEY}"},
                      data={"title": sku, "image": (io.BytesIO(png_bytes(seed)), "photo.png")},
                      content_type="multipart/form-data")


def test_api_on_a_full_disk_answers_507_changes_nothing_and_recovers(small_disk, small_catalogue, tiny_weights):
    settings = Settings(data_dir=small_disk / "data", backbone=TINY, weights=str(tiny_weights), workers=0,
                        batch_size=8, api_key=KEY)
    VisualSearch(settings).index(small_catalogue)
    client = create_app({"TESTING": True}, settings=settings).test_client()
    assert client.get("/api/v1/health").get_json()["writable"] is True
    filler = fill(small_disk)

    response = put_image(client, "NEW-1", seed=1)
    assert response.status_code == 507, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "storage_full"
    assert client.get("/api/v1/products/NEW-1").status_code == 404  # nothing half-written
    query = (small_catalogue.parent / "img" / "p5-0.png").read_bytes()
    search = client.post("/api/v1/search", data={"image": (io.BytesIO(query), "q.png")},
                         content_type="multipart/form-data")
    assert search.status_code == 200 and search.get_json()["results"][0]["sku"] == "P5"
    assert leftovers(small_disk / "data") == []

    filler.unlink()
    assert put_image(client, "NEW-1", seed=1).status_code == 201  # the same server, no restart
    assert [image["status"] for image in client.get("/api/v1/products/NEW-1").get_json()["images"]] == ["indexed"]


def test_api_on_a_read_only_data_dir_serves_reads_and_answers_503(small_disk, read_only_view, small_catalogue,
                                                                  tiny_weights):
    data = small_disk / "data"
    settings = Settings(data_dir=data, backbone=TINY, weights=str(tiny_weights), workers=0, api_key=KEY)
    VisualSearch(settings).index(small_catalogue)
    view = read_only_view(data)
    client = create_app({"TESTING": True}, settings=Settings(data_dir=view, backbone=TINY, weights=str(tiny_weights),
                                                             workers=0, api_key=KEY)).test_client()
    assert client.get("/api/v1/health").get_json()["writable"] is False
    assert client.get("/api/v1/products/P2").get_json()["sku"] == "P2"
    assert client.get("/api/v1/products/P2/similar").status_code == 200

    for response in (put_image(client, "NEW-2", seed=2),
                     client.delete("/api/v1/products/P2", headers={"Authorization": f"Bearer {KEY}"})):
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "storage_read_only"
    assert client.get("/api/v1/products/P2").status_code == 200


def test_locked_catalogue_is_a_busy_error_with_retry_after(tiny_settings, small_catalogue, monkeypatch):
    monkeypatch.setattr(database, "BUSY_TIMEOUT_MS", 200)
    settings = dataclasses.replace(tiny_settings, api_key=KEY)
    VisualSearch(settings).index(small_catalogue)
    client = create_app({"TESTING": True}, settings=settings).test_client()
    holder = sqlite3.connect(Path(settings.data_dir) / "catalogue.db")
    holder.execute("BEGIN IMMEDIATE")  # another writer's transaction that does not end
    try:
        with pytest.raises(StorageBusyError):
            VisualSearch(settings).remove(["P1"])
        response = client.delete("/api/v1/products/P1", headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert response.get_json()["error"]["code"] == "storage_busy"
        assert client.get("/api/v1/products/P1").status_code == 200  # reads are not blocked
    finally:
        holder.rollback()
        holder.close()
    assert client.delete("/api/v1/products/P1", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_compact_drops_vectors_a_failed_delete_left_behind(tiny_settings, small_catalogue, monkeypatch):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    store = vs.store()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(store, "commit", disk_full)
        assert vs.remove(["P4"]).removed == ["P4"]  # the catalogue decides: the product is gone
    assert store.count == 24  # ... but its two vectors are still stored
    assert "P4" not in [hit.sku for hit in vs.similar("P5", top_k=20).hits]
    assert vs.compact()["orphan_vectors_dropped"] == 2
    assert store.count == 22 and vs.stats()["index"]["up_to_date"]


def test_disk_filling_up_during_a_run_keeps_committed_batches(small_disk, small_catalogue, tiny_weights,
                                                              monkeypatch):
    monkeypatch.setattr(indexing, "FLUSH_ROWS", 4)  # commit after every batch
    settings = Settings(data_dir=small_disk / "data", backbone=TINY, weights=str(tiny_weights), workers=0,
                        batch_size=8)
    filled: list[Path] = []

    class FillDiskAfterFirstBatch:
        def set_total(self, total: int) -> None:
            pass

        def advance(self, count: int) -> None:
            if not filled and getattr(self, "seen", 0):
                filled.append(fill(small_disk))
            self.seen = getattr(self, "seen", 0) + count

    with pytest.raises(StorageFullError):
        VisualSearch(settings).index(small_catalogue, progress=FillDiskAfterFirstBatch())
    assert filled and leftovers(small_disk / "data") == []

    vs = VisualSearch(settings)
    stats = vs.stats()
    assert stats["indexed_images"] == stats["index"]["vectors"] == 8  # the first batch, whole and searchable
    assert vs.similar("P0").hits

    filled[0].unlink()
    report = vs.index(small_catalogue)
    assert report.embedded == 16 and report.unchanged == 8
    assert vs.stats()["indexed_images"] == 24 and vs.stats()["index"]["up_to_date"]


def test_half_written_uploads_of_dead_processes_are_collected(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    uploads = Path(tiny_settings.data_dir) / "uploads"
    uploads.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = uploads / f".{'a' * 64}.png.x1y2.{dead.pid}.tmp"
    writing = uploads / f".{'b' * 64}.png.x3y4.{os.getpid()}.tmp"  # a live writer's: kept
    for path in (crashed, writing):
        path.write_bytes(b"partial")
    assert crashed.name in vs.collect_leftovers()
    assert not crashed.exists() and writing.exists()


def test_asking_whether_an_upload_is_still_named_uses_an_index(tiny_settings):
    """A DELETE asks this for each upload of the product: a scan would cost seconds at 10M images."""
    from sqlalchemy import event

    from visualsearch.catalogue import store as catalogue

    vs = VisualSearch(tiny_settings)
    engine = vs.sessions.kw["bind"]
    plans = []

    def explain(connection, cursor, statement, parameters, context, executemany):
        if "FROM product_images" in statement and "LIKE" in statement:
            plans.extend(row[3] for row in cursor.connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))

    event.listen(engine, "before_cursor_execute", explain)
    with vs.sessions() as session:
        assert not catalogue.path_is_referenced(session, str(Path(tiny_settings.data_dir) / "uploads" / "ab.png"))
    assert plans and all("ix_product_images_upload_path" in plan for plan in plans), plans


def test_a_vector_store_down_during_deletes_still_deletes(tiny_settings, small_catalogue, tmp_path, monkeypatch):
    """The vector store refuses after a DELETE's catalogue step (a Milvus server down raises
    StorageError, not OSError): as after a full disk, the catalogue decides. The API answers
    success, the kept uploads go, and compact drops the vectors left behind."""
    settings = dataclasses.replace(tiny_settings, api_key=KEY)
    VisualSearch(settings).index(small_catalogue)
    client = create_app({"TESTING": True}, settings=settings).test_client()
    auth = {"Authorization": f"Bearer {KEY}"}
    photos = [(io.BytesIO(make_image(tmp_path / f"new-{n}.png", seed=4200 + n).read_bytes()), f"new-{n}.png")
              for n in range(2)]
    created = client.put("/api/v1/products/NEW", headers=auth, data={"image": photos})
    assert created.status_code == 201, created.get_json()
    first, second = (image["id"] for image in created.get_json()["images"])
    uploads = settings.data_dir / UPLOADS_DIR
    assert len(list(uploads.iterdir())) == 2
    store_type = type(VisualSearch(settings).store())
    real_commit = store_type.commit

    def server_down(self, upserts=None, deletes=(), **kwargs):
        if upserts is None and len(deletes):
            raise StorageError("Milvus (127.0.0.1:19530) failed to write to collection products: connection refused")
        return real_commit(self, upserts, deletes, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(store_type, "commit", server_down)
        response = client.delete(f"/api/v1/products/NEW/images/{first}", headers=auth)
        assert response.status_code == 200, response.get_json()
        assert [image["id"] for image in response.get_json()["images"]] == [second]
        assert len(list(uploads.iterdir())) == 1
        response = client.delete("/api/v1/products/NEW", headers=auth)
        assert response.status_code == 200, response.get_json()
    assert client.get("/api/v1/products/NEW").status_code == 404  # a retry would find nothing to delete
    assert list(uploads.iterdir()) == []
    vs = VisualSearch(settings)
    assert vs.store().count == 26  # the two vectors stayed behind ...
    assert vs.compact()["orphan_vectors_dropped"] == 2  # ... until compact
    assert vs.store().count == 24
