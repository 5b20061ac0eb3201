"""The front door under concurrency: API writes during a batch run, readers in other
processes, and processes killed at any moment."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from visualsearch.catalogue import store
from visualsearch.catalogue_manifest import ProductRecord
from visualsearch.service import VisualSearch

from .conftest import REPO, make_image, write_catalogue

# Writers in several processes at once: on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.catalogue_databases("sqlite", "postgresql")

# Runs an index in another process with the tiny test backbone. FLUSH_ROWS is small
# so that a run commits many times, and each batch sleeps to leave room for others.
RUNNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import tests.conftest  # registers the tiny backbone
    from visualsearch import indexing
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    indexing.FLUSH_ROWS = {flush_rows}

    class Slow:
        def set_total(self, total): pass
        def advance(self, count): time.sleep({sleep})

    settings = Settings(data_dir=Path({data_dir!r}), db_url={db_url!r}, backbone="test_tiny", weights={weights!r},
                        workers=0, batch_size=4)
    report = VisualSearch(settings).index({manifest!r}, progress=Slow())
    print("done", report.embedded, flush=True)
""")


def _catalogue(folder: Path, count: int, prefix: str = "R", seed: int = 7000) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for number in range(count):
        make_image(folder / "img" / f"{prefix}{number}.png", seed=seed + number)
        rows.append({"sku": f"{prefix}{number}", "image": f"img/{prefix}{number}.png",
                     "category": "even" if number % 2 == 0 else "odd"})
    return write_catalogue(folder, rows)


def _start_runner(tmp_path: Path, settings, manifest: Path, *, flush_rows=4, sleep=0.02) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(repo=str(REPO), flush_rows=flush_rows, sleep=sleep, data_dir=str(settings.data_dir),
                                    db_url=settings.db_url, weights=str(settings.weights), manifest=str(manifest)))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_consistent(settings) -> int:
    """Every image the catalogue calls indexed has a live vector, and searches only
    ever return indexed images. Returns the number of indexed images."""
    vs = VisualSearch(settings, read_only=True)
    with vs.sessions() as session:
        indexed = [image_id for batch in store.indexed_image_ids(session) for image_id in batch]
    vector_store = vs.store()
    if vector_store is None:
        assert indexed == []
        return 0
    found, _ = vector_store.get_vectors(indexed)
    assert sorted(found.tolist()) == sorted(indexed)
    hits = vs.search(make_image(settings.data_dir.parent / "probe.png", seed=1), top_k=100).hits
    assert {hit.image_id for hit in hits} <= set(indexed)
    return len(indexed)


def test_api_writes_go_on_during_a_batch_run(tiny_settings, tmp_path):
    """A PUT and a DELETE while `index` runs in another process both succeed, and the
    final catalogue and index hold both changes and the whole run."""
    manifest = _catalogue(tmp_path / "cat", 40)
    VisualSearch(tiny_settings).index(write_catalogue(tmp_path / "cat", [
        {"sku": "R0", "image": "img/R0.png"}], name="first.csv"))  # R0 exists before the run
    runner = _start_runner(tmp_path, tiny_settings, manifest)
    try:
        api = VisualSearch(tiny_settings, create=False)
        deadline = time.monotonic() + 60
        while api.stats()["indexed_images"] < 5 and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(0.05)
        assert runner.poll() is None, f"the run ended before the API writes could overlap it: {runner.stderr.read()}"
        extra = make_image(tmp_path / "extra.png", seed=424242)
        product, report, created = api.put_product(ProductRecord(sku="API-1", category="odd", images=[extra]))
        assert created and report.embedded == 1 and product.indexed_images
        assert api.remove(["R0"]).removed == ["R0"]
        assert runner.poll() is None
    finally:
        out, err = runner.communicate(timeout=120)
    assert runner.returncode == 0, err
    final = VisualSearch(tiny_settings, read_only=True)
    assert final.product("API-1").indexed_images
    assert [hit.sku for hit in final.search(extra, top_k=1).hits] == ["API-1"]
    with pytest.raises(Exception, match="R0"):
        final.product("R0")
    skus = {f"R{n}" for n in range(1, 40)} | {"API-1"}
    assert final.stats()["products"] == len(skus)
    assert _assert_consistent(tiny_settings) == len(skus) == final.store().count


def test_kill_9_during_a_run_leaves_a_consistent_state(tiny_settings, tmp_path):
    VisualSearch(tiny_settings)  # the catalogue exists before the first kill
    rng = random.Random(5)
    manifests, progress = [], []
    for run in range(4):
        # Each run gets work of its own, so that every kill lands in a running indexer.
        manifest = _catalogue(tmp_path / f"cat{run}", 30, prefix=f"K{run}-", seed=9000 + 100 * run)
        manifests.append(manifest)
        before = progress[-1][1] if progress else 0
        runner = _start_runner(tmp_path, tiny_settings, manifest, flush_rows=3, sleep=0.03)
        _wait_for_indexed(tiny_settings, before + 1, runner)  # started for real: interpreter and torch load
        time.sleep(rng.uniform(0.0, 0.2))
        killed_mid_run = runner.poll() is None
        runner.send_signal(signal.SIGKILL)
        runner.communicate()
        progress.append((killed_mid_run, _assert_consistent(tiny_settings)))
    # The kills hit running processes, between commits and inside them.
    assert sum(killed for killed, _ in progress) >= 3, progress
    added = [indexed - previous for (_, indexed), previous in zip(progress, [0] + [i for _, i in progress])]
    assert any(0 < count < 30 for count in added), progress  # at least one run was cut short
    vs = VisualSearch(tiny_settings)
    for manifest in manifests:
        assert vs.index(manifest).failures == []
    assert _assert_consistent(tiny_settings) == 120


def test_a_reader_in_another_process_sees_each_commit(tiny_settings, small_catalogue, tmp_path):
    writer = VisualSearch(tiny_settings)
    writer.index(small_catalogue)
    reader = VisualSearch(tiny_settings, read_only=True)
    query = small_catalogue.parent / "img" / "p4-0.png"
    assert reader.search(query, top_k=1).hits[0].sku == "P4"
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import tests.conftest; "
            "from visualsearch.service import VisualSearch; from visualsearch.settings import Settings; "
            f"from pathlib import Path; VisualSearch(Settings(data_dir=Path({str(tiny_settings.data_dir)!r}), "
            f"db_url={tiny_settings.db_url!r}, backbone='test_tiny', "
            f"weights={str(tiny_settings.weights)!r})).remove(['P4'])")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert "P4" not in {hit.sku for hit in reader.search(query, top_k=12).hits}
    assert reader.store().count == 22


def test_leftovers_of_dead_writers_are_collected(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    segments = tiny_settings.data_dir / "vectors"
    dead_pid = _dead_pid()
    stale = segments / f".seg-00000999.vseg.{dead_pid}.tmp"
    stale.write_bytes(b"half a segment")
    orphan = segments / "seg-00000998.vseg"
    orphan.write_bytes(b"never installed")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    fresh = segments / "seg-00000997.vseg"  # maybe a merge in flight elsewhere: kept
    fresh.write_bytes(b"in flight")
    removed = vs.collect_leftovers()
    assert set(removed) == {stale.name, orphan.name}
    assert fresh.exists() and not stale.exists() and not orphan.exists()
    assert VisualSearch(tiny_settings, read_only=True).store().count == 24


def test_deleting_a_product_deletes_its_uploads_but_not_shared_ones(tiny_settings, tmp_path):
    vs = VisualSearch(tiny_settings)
    uploads = tiny_settings.data_dir / "uploads"
    uploads.mkdir(parents=True)
    own = make_image(uploads / "own.png", seed=1)
    shared = make_image(uploads / "shared.png", seed=2)
    elsewhere = make_image(tmp_path / "catalogue-file.png", seed=3)
    vs.put_product(ProductRecord(sku="A", images=[own, shared, elsewhere]))
    vs.put_product(ProductRecord(sku="B", images=[shared]))
    vs.remove(["A"])
    assert not own.exists() and shared.exists() and elsewhere.exists()
    assert np.isclose(vs.search(shared, top_k=1).hits[0].score, 1.0, atol=1e-4)


def _wait_for_indexed(settings, count: int, runner: subprocess.Popen, timeout: float = 60) -> None:
    vs = VisualSearch(settings, read_only=True)
    deadline = time.monotonic() + timeout
    while vs.stats()["indexed_images"] < count and runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
