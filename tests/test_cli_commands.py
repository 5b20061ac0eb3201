"""The operators' commands: index --prune/--dry-run, validate, show, similar, remove --from-file/--image,
--wait on every writing command and --json on every reading one."""

from __future__ import annotations

import fcntl
import gc
import json
import threading
import time
from pathlib import Path

import pytest

from visualsearch.service import VisualSearch

from .conftest import TINY, make_image, write_catalogue
from .test_sync import _rows


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def indexed(run, small_catalogue):
    assert run("index", str(small_catalogue)).exit_code == 0
    return small_catalogue


@pytest.fixture
def without_p1(small_catalogue) -> Path:
    """The catalogue without P1, without P2's second image, and with a new product."""
    folder = small_catalogue.parent
    make_image(folder / "img" / "new.png", seed=999)
    rows = [row for row in _rows(small_catalogue) if row["sku"] != "P1" and row["image"] != "img/p2-1.png"]
    return write_catalogue(folder, rows + [{"sku": "NEW", "image": "img/new.png"}], name="next.csv")


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a data directory: bytes and mtime (SQLite's -shm/-wal scratch files aside)."""
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.name.endswith(("-shm", "-wal"))}


def _skus(run, photo: Path, *args: str) -> list[str]:
    result = run("search", str(photo), "-k", "100", "--json", *args)
    assert result.exit_code == 0, result.output
    return [hit["sku"] for hit in json.loads(result.stdout)["results"]]


# --- index --prune, --dry-run and validate ----------------------------------------------


def test_index_prune_removes_what_the_manifest_no_longer_names(run, indexed, without_p1, data_dir):
    photos = indexed.parent / "img"
    p2_images = json.loads(run("show", "P2", "--json").stdout)["images"]
    refused = run("index", str(without_p1), "--prune")
    assert refused.exit_code == 1 and "3 of the catalogue's 24 images" in refused.output
    assert "--force" in refused.output and "NEW" not in _skus(run, photos / "new.png")

    result = run("index", str(without_p1), "--prune", "--max-prune", "15", "--json")
    assert result.exit_code == 0, result.output
    assert "pruning 1 product and 1 image not in the manifest" in result.stderr
    report = json.loads(result.stdout)
    assert report["pruned"] == {"products": 1, "product_images": 2, "images": 1} and report["embedded"] == 1
    assert "P1" not in _skus(run, photos / "p1-0.png")
    assert run("show", "P1").exit_code == 1
    assert json.loads(run("show", "P2", "--json").stdout)["images"] == p2_images[:1]
    stats = json.loads(run("stats", "--json").stdout)
    assert stats["products"] == 12 and stats["images"] == 22 and stats["index"]["vectors"] == 22

    text = run("index", str(without_p1), "--prune")
    assert text.exit_code == 0 and "pruned 0 products (0 images) and 0 more images" in text.stdout


def test_dry_run_shows_the_plan_and_writes_nothing(run, indexed, without_p1, data_dir):
    # The indexing run's connections close when it is collected, and the last one out
    # checkpoints SQLite's WAL into catalogue.db: let that happen before the snapshot.
    gc.collect()
    before = _snapshot(data_dir)
    result = run("index", str(without_p1), "--prune", "--dry-run", "--json")
    assert result.exit_code == 1  # the default 10% limit would refuse this prune
    plan = json.loads(result.stdout)
    assert plan["products"] == {"total": 12, "add": 1, "update": 0, "unchanged": 11}
    assert plan["images"] == {"total": 22, "add": 1, "update": 0, "unchanged": 21}
    assert plan["prune"]["products"] == 1 and plan["prune"]["images"] == 1 and plan["prune"]["refused"]
    text = run("index", str(without_p1), "--prune", "--dry-run", "--force")
    assert text.exit_code == 0
    assert "prune:     1 product (2 images) and 1 more image not in the manifest (e.g. P1)" in text.stdout
    assert "nothing was written" in text.stderr
    assert _snapshot(data_dir) == before


def test_validate_writes_nothing_and_creates_no_data_dir(run, small_catalogue, data_dir):
    result = run("validate", str(small_catalogue), "--prune", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["products"]["add"] == 12 and plan["images"]["add"] == 24 and plan["prune"]["products"] == 0
    assert not data_dir.exists()


def test_validate_against_an_index_reports_changes_and_unreadable_files(run, indexed, data_dir, tmp_path):
    folder = indexed.parent
    rows = _rows(indexed)
    rows[0]["title"] = rows[1]["title"] = "Renamed"
    (folder / "img" / "p5-1.png").write_bytes((folder / "img" / "p5-1.png").read_bytes() + b"\0")
    rows.append({"sku": "P6", "image": "img/gone.png"})
    manifest = write_catalogue(folder, rows, name="changed.csv")
    catalogue = data_dir / "catalogue.db"
    before = _snapshot(data_dir)
    stamp = catalogue.stat().st_mtime_ns

    result = run("validate", str(manifest), "--json")
    assert result.exit_code == 1  # an image cannot be read
    plan = json.loads(result.stdout)
    assert plan["products"] == {"total": 12, "add": 0, "update": 1, "unchanged": 11}
    assert plan["images"] == {"total": 25, "add": 1, "update": 1, "unchanged": 23}
    assert plan["problems"]["count"] == 1 and plan["problems"]["examples"][0]["code"] == "file_not_found"
    assert plan["prune"] is None and plan["examples"]["update"] == ["P0"]
    text = run("validate", str(manifest))
    assert "1 image cannot be read" in text.stderr and "gone.png" in text.stderr
    assert "update:    1 product (fields), 1 image" in text.stdout
    assert catalogue.stat().st_mtime_ns == stamp and _snapshot(data_dir) == before

    bad = tmp_path / "bad.csv"
    bad.write_text("sku,picture\nA,a.png\n")
    assert run("validate", str(bad)).exit_code == 1


# --- show, similar, backbones --------------------------------------------------------------


def test_show_prints_a_product_and_its_images(run, indexed):
    product = json.loads(run("show", "P4", "--json").stdout)
    assert product["sku"] == "P4" and product["category"] == "bags" and product["price"] == 50
    assert product["attributes"]["colour"] in ("red", "blue")
    assert [image["status"] for image in product["images"]] == ["indexed", "indexed"]
    assert all(image["width"] == 48 and image["error"] is None for image in product["images"])
    text = run("show", "P4").stdout
    assert "title: Product 4" in text and "2 (2 indexed)" in text
    missing = run("show", "NOPE")
    assert missing.exit_code == 1 and "no product with sku 'NOPE'" in missing.output


def test_show_lists_failed_images_with_their_error(run, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    make_image(folder / "ok.png", seed=1)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    run("index", str(write_catalogue(folder, [{"sku": "A", "image": "ok.png|bad.png"}])))
    images = json.loads(run("show", "A", "--json").stdout)["images"]
    assert [image["status"] for image in images] == ["indexed", "failed"] and images[1]["error"]
    assert "failed" in run("show", "A").stdout


def test_similar_lists_other_products(run, indexed):
    result = run("similar", "P7", "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["results"]
    assert len(hits) == 5 and "P7" not in {hit["sku"] for hit in hits}
    assert all(set(hit) >= {"sku", "score", "title", "price"} for hit in hits)
    shoes = json.loads(run("similar", "P7", "-k", "100", "--category", "shoes", "--json").stdout)["results"]
    assert {hit["sku"] for hit in shoes} == {"P0", "P3", "P6", "P9"}
    text = run("similar", "P7", "-k", "2")
    assert text.stdout.count("\n") == 2 and text.stdout.lstrip().startswith("1. ")
    assert run("similar", "NOPE").exit_code == 1


def test_backbones_as_json(run):
    backbones = json.loads(run("backbones", "--json").stdout)
    names = [backbone["name"] for backbone in backbones]
    assert "resnet50" in names and TINY not in names
    assert all(backbone["embedding_dim"] > 0 and backbone["input_size"] for backbone in backbones)


# --- remove ------------------------------------------------------------------------------------


def test_remove_from_a_file_and_from_stdin(run, indexed, tmp_path):
    listing = tmp_path / "gone.txt"
    listing.write_text("# discontinued\nP1\n\n  P2  \nNOPE\n")
    result = run("remove", "P3", "--from-file", str(listing), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"removed": 3, "unknown": 1, "unknown_skus": ["NOPE"]}
    piped = run("remove", "--from-file", "-", input="P4\n#P5\nP6\n")
    assert piped.exit_code == 0 and "removed 2 product(s)" in piped.stdout
    stats = json.loads(run("stats", "--json").stdout)
    assert stats["products"] == 7 and stats["index"]["vectors"] == 14
    assert {"P1", "P2", "P3", "P4", "P6"}.isdisjoint(_skus(run, indexed.parent / "img" / "p4-0.png"))
    assert run("remove").exit_code == 2  # nothing to remove


def test_remove_one_image(run, indexed):
    first, second = json.loads(run("show", "P5", "--json").stdout)["images"]
    result = run("remove", "P5", "--image", str(second["id"]), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == [first]
    assert json.loads(run("show", "P5", "--json").stdout)["images"] == [first]
    assert json.loads(run("stats", "--json").stdout)["index"]["vectors"] == 23
    hits = json.loads(run("search", str(indexed.parent / "img" / "p5-1.png"), "-k", "100", "--json").stdout)
    assert second["id"] not in {hit["image_id"] for hit in hits["results"]}
    assert run("remove", "P5", "--image", str(first["id"])).stdout.startswith("removed image")

    assert run("remove", "P5", "P6", "--image", "1").exit_code == 2
    assert run("remove", "--image", "1").exit_code == 2
    not_its_own = run("remove", "P6", "--image", str(second["id"]))
    assert not_its_own.exit_code == 1 and "has no image" in not_its_own.output


# --- --wait ------------------------------------------------------------------------------------


def _hold(path: Path, seconds: float):
    """Hold ``path`` locked the way another process would, and let go after ``seconds``."""
    handle = open(path, "a")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release() -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


@pytest.mark.parametrize("command", [("compact",), ("rebuild-index",), ("index", "MANIFEST", "--prune")])
def test_batch_commands_wait_for_the_run_lock(run, indexed, data_dir, command):
    args = [str(indexed) if arg == "MANIFEST" else arg for arg in command]
    held_at = time.monotonic()
    timer = _hold(data_dir / ".index.lock", 1.0)
    try:
        busy = run(*args, "--wait", "0")
        assert busy.exit_code == 1 and "--wait" in busy.output
        waited = run(*args, "--wait", "20")
        assert waited.exit_code == 0, waited.output
        assert time.monotonic() - held_at >= 1.0  # it went on only once the lock was let go
    finally:
        timer.join()


def test_remove_waits_for_the_commit_lock(run, indexed, tiny_settings):
    lock = VisualSearch(tiny_settings).store().segments_dir / ".commit.lock"
    held_at = time.monotonic()
    timer = _hold(lock, 1.0)
    try:
        busy = run("remove", "P1", "--wait", "0")
        assert busy.exit_code == 1 and "try again" in busy.output
        waited = run("remove", "P1", "--wait", "20")
        assert waited.exit_code == 0 and "removed 1 product" in waited.stdout
        assert time.monotonic() - held_at >= 1.0
    finally:
        timer.join()


def test_search_takes_a_file_or_an_image_url(run, indexed, monkeypatch):
    """`visualsearch search URL` fetches the photo under the manifest's URL rules."""
    import http.server

    photo = (indexed.parent / "img" / "p3-0.png").read_bytes()

    class Photo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(photo)))
            self.end_headers()
            self.wfile.write(photo)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Photo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/p3.png"
    try:
        refused = run("search", url)  # loopback: refused unless a private deployment allows it
        assert refused.exit_code == 1 and "remote_refused" in refused.output
        monkeypatch.setenv("VISUALSEARCH_ALLOW_PRIVATE_URLS", "127.0.0.1")
        by_url = json.loads(run("search", url, "-k", "1", "--json").stdout)["results"]
        by_file = json.loads(run("search", str(indexed.parent / "img" / "p3-0.png"), "-k", "1", "--json").stdout)
        assert by_url[0]["sku"] == "P3" and by_url == by_file["results"]
    finally:
        server.shutdown()
        server.server_close()
    missing = run("search", "no-such-photo.jpg")
    assert missing.exit_code == 2 and "neither a file nor an http(s) URL" in missing.output
