"""Re-embedding with another backbone beside the current vectors, then one switch, with no downtime."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from click.testing import CliRunner
from torch import nn
from werkzeug.serving import make_server

from indexer.cli import main
from visualsearch.backbones import (
    BackboneNetwork,
    BackboneSpec,
    Preprocessing,
    WeightsSource,
    load_weights_strictly,
    register_backbone,
)
from visualsearch.catalogue import store as catalogue
from visualsearch.catalogue_manifest import ProductRecord
from visualsearch.errors import BackboneMismatchError
from visualsearch.generations import Generation, GenerationChangedError, GenerationRef, GenerationTracker
from visualsearch.reembed import (
    DROP_GRACE,
    SWITCHED_AT_KEY,
    DropRefusedError,
    ReembedRefusedError,
    reembed,
)
from visualsearch.service import VisualSearch
from visualsearch.vectors import SearchFilters, VectorRows
from visualsearch.vectors.manifest import read_store_manifest
from web import create_app

from .conftest import TINY, Crash, make_image

TINY24 = "test_tiny24"


class _Tiny24Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(12, 24, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(24, 1000)


def _build_tiny24(weights: Path) -> BackboneNetwork:
    model = _Tiny24Net()
    load_weights_strictly(model, weights, TINY24)
    return BackboneNetwork(model.trunk, lambda f: model.fc(f.mean(dim=(2, 3))))


register_backbone(BackboneSpec(
    name=TINY24, embedding_dim=24, build=_build_tiny24,
    weights=WeightsSource(filename="test_tiny24.pth"),
    preprocessing=Preprocessing(input_size=32, resize_size=32, interpolation="bilinear"),
    description="a second two-layer CNN, to re-embed with", hidden=True,
))

# The catalogue's queries and triggers run on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.catalogue_databases("sqlite", "postgresql")
# Tests that run on both vector stores (the others on FAISS only).
BOTH_STORES = pytest.mark.parametrize("vector_store", ["faiss", "milvus-lite"], indirect=True)


@pytest.fixture(scope="module")
def tiny24_weights(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights24") / "test_tiny24.pth"
    torch.save(_Tiny24Net().state_dict(), path)
    return path


@pytest.fixture
def vector_store(request, tmp_path) -> str | None:
    """The VISUALSEARCH_VECTOR_STORE of the test: None (FAISS in the data directory)
    unless parametrized with "milvus-lite" (a Milvus Lite file)."""
    if getattr(request, "param", "faiss") == "faiss":
        return None
    pytest.importorskip("milvus_lite")
    return str(tmp_path / "vectors.db")


@pytest.fixture
def settings(tiny_settings, small_catalogue, vector_store):
    """A catalogue indexed with the tiny backbone; the settings of a server that follows
    the catalogue's backbone (no pinned --backbone; its --weights are the old backbone's)."""
    tiny_settings = dataclasses.replace(tiny_settings, vector_store=vector_store)
    VisualSearch(tiny_settings).index(small_catalogue)
    return dataclasses.replace(tiny_settings, backbone=None)


def _query(small_catalogue: Path, number: int) -> Path:
    return small_catalogue.parent / "img" / f"p{number}-0.png"


def test_searches_come_from_the_new_vectors_and_the_old_stay_until_dropped(settings, small_catalogue,
                                                                           tiny24_weights):
    reader = VisualSearch(settings)  # a server opened before: it has the old pair loaded
    assert reader.search(_query(small_catalogue, 3), top_k=1).hits[0].sku == "P3"

    vs = VisualSearch(settings)
    report = vs.reembed(backbone=TINY24, weights=str(tiny24_weights))
    assert report.switched and report.previous_backbone == TINY and report.backbone == TINY24
    assert report.embedded == 24 and report.failures == [] and report.generation.startswith("generations/1-")
    stats = vs.stats()
    assert stats["backbone"] == TINY24 and stats["dim"] == 24
    assert stats["index"]["vectors"] == 24 and stats["index"]["up_to_date"]
    top = vs.search(_query(small_catalogue, 5), top_k=3).hits
    assert top[0].sku == "P5" and top[0].score == pytest.approx(1.0, abs=1e-4)
    assert vs.store().dim == 24 and vs.embedder.dim == 24

    # Another process finds the new backbone's weights where the catalogue recorded them.
    fresh = VisualSearch(settings)
    assert fresh.health()["backbone"] == TINY24
    assert fresh.search(_query(small_catalogue, 7), top_k=1).hits[0].sku == "P7"
    # The server that was running follows the switch.
    assert reader.health()["backbone"] == TINY
    assert reader.follow_generation(0, wait=True)
    assert reader.health()["backbone"] == TINY24 and reader.store().dim == 24
    assert reader.search(_query(small_catalogue, 3), top_k=1).hits[0].sku == "P3"

    # A process pinning the old backbone is refused (the existing mismatch rule).
    with pytest.raises(BackboneMismatchError):
        VisualSearch(dataclasses.replace(settings, backbone=TINY)).search(_query(small_catalogue, 3))

    # The old vectors stay, readable, until --drop-old: refused right after the switch
    # (servers may still be loading the new vectors), allowed once the grace period passed.
    old = read_store_manifest(settings.data_dir)
    assert old is not None and old.backbone == TINY and old.vectors == 24
    with pytest.raises(DropRefusedError, match="servers answer with test_tiny24"):
        vs.drop_old_generations()
    assert read_store_manifest(settings.data_dir) is not None
    _age_the_switch(settings)
    assert vs.drop_old_generations() == ["."]
    assert read_store_manifest(settings.data_dir) is None and not (settings.data_dir / "vectors").exists()
    assert (settings.data_dir / report.generation / "manifest.json").is_file()
    assert VisualSearch(settings).search(_query(small_catalogue, 9), top_k=1).hits[0].sku == "P9"
    assert vs.drop_old_generations() == []

    again = vs.reembed(backbone=TINY24, weights=str(tiny24_weights))
    assert not again.switched and again.embedded == 0

    # And back to the first backbone: a third generation. The run that switches never drops
    # the second (servers answer from it until they loaded the third), even when asked to.
    back = vs.reembed(backbone=TINY, weights=str(settings.weights), drop_old=True)
    assert back.switched and back.generation.startswith("generations/2-") and back.dropped == []
    assert back.notes and "old vectors kept" in back.notes[0] and "reembed --drop-old" in back.notes[0]
    assert (settings.data_dir / report.generation / "manifest.json").is_file()
    assert VisualSearch(settings).search(_query(small_catalogue, 4), top_k=1).hits[0].sku == "P4"
    # A run that does not switch may drop, within the grace period only when forced.
    with pytest.raises(DropRefusedError):
        vs.reembed(backbone=TINY, weights=str(settings.weights), drop_old=True)
    forced = vs.reembed(backbone=TINY, weights=str(settings.weights), drop_old=True, force=True)
    assert not forced.switched and forced.dropped == [report.generation]
    assert VisualSearch(settings).search(_query(small_catalogue, 4), top_k=1).hits[0].sku == "P4"


@pytest.mark.parametrize("vector_store", ["milvus-lite"], indirect=True)
def test_on_milvus_each_generation_is_a_collection_and_drop_old_drops_it(settings, small_catalogue,
                                                                          tiny24_weights, monkeypatch):
    from pymilvus import MilvusClient

    from visualsearch.vectors.milvus_store import DEFAULT_COLLECTION, MilvusVectorStore, collection_name

    closed = []
    close = MilvusVectorStore.close
    monkeypatch.setattr(MilvusVectorStore, "close", lambda store: (closed.append(store.collection), close(store)))
    vs = VisualSearch(settings)
    report = vs.reembed(backbone=TINY24, weights=str(tiny24_weights))
    assert report.switched and report.embedded == 24 and report.generation == "generations/1-test_tiny24"
    new = collection_name(DEFAULT_COLLECTION, report.generation)
    assert closed == [new]  # the run's own store of the new generation, once it ended
    for searcher in (vs, VisualSearch(settings)):  # the process that switched, and a fresh one
        store = searcher.store()
        assert isinstance(store, MilvusVectorStore) and store.collection == new
        assert store.dim == 24 and store.count == 24
        assert [searcher.search(_query(small_catalogue, n), top_k=1).hits[0].sku for n in range(12)] == \
            [f"P{n}" for n in range(12)]
    client = MilvusClient(uri=settings.vector_store)
    try:
        # The old collection stays (servers may still answer from it) until dropped.
        assert sorted(client.list_collections()) == [DEFAULT_COLLECTION, new]
        with pytest.raises(DropRefusedError):
            vs.drop_old_generations()
        _age_the_switch(settings)
        assert vs.drop_old_generations() == ["."]
        assert client.list_collections() == [new]
        assert VisualSearch(settings).search(_query(small_catalogue, 9), top_k=1).hits[0].sku == "P9"

        # Back to the first backbone: a third collection; a forced drop removes the second.
        back = vs.reembed(backbone=TINY, weights=str(settings.weights))
        third = collection_name(DEFAULT_COLLECTION, "generations/2-test_tiny")
        assert back.switched and back.generation == "generations/2-test_tiny"
        assert sorted(client.list_collections()) == sorted([new, third])
        assert vs.drop_old_generations(force=True) == [report.generation]
        assert client.list_collections() == [third]
        assert VisualSearch(settings).search(_query(small_catalogue, 4), top_k=1).hits[0].sku == "P4"
    finally:
        client.close()


def _age_the_switch(settings, by: timedelta = DROP_GRACE + timedelta(seconds=1)) -> None:
    """Pretend the last switch happened ``by`` ago."""
    vs = VisualSearch(settings)
    with vs.session() as session:
        switched = datetime.fromisoformat(catalogue.get_meta(session, SWITCHED_AT_KEY))
        catalogue.set_meta(session, SWITCHED_AT_KEY, (switched - by).isoformat())


def test_a_drop_waits_out_the_grace_period_after_the_switch(settings, small_catalogue, tiny24_weights):
    vs = VisualSearch(settings)
    vs.reembed(backbone=TINY24, weights=str(tiny24_weights))
    _age_the_switch(settings, by=DROP_GRACE - timedelta(minutes=1))
    with pytest.raises(DropRefusedError, match="--force") as refused:
        vs.drop_old_generations()
    assert refused.value.code == "drop_refused"
    # A server that has not followed yet still answers from the old vectors meanwhile.
    assert read_store_manifest(settings.data_dir).vectors == 24
    _age_the_switch(settings, by=timedelta(minutes=2))
    assert vs.drop_old_generations() == ["."]
    # Nothing to drop: never refused.
    assert vs.drop_old_generations() == []


def _hide(files: list[Path], folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    for path in files:
        path.rename(folder / path.name)


class _RestoreAfterBulk:
    """Puts one removed file back once the bulk phase went through every image (before
    the catch-up rounds, which retry failed images once)."""

    def __init__(self, hidden: Path, original: Path, total: int):
        self.hidden, self.original, self.total, self.done = hidden, original, total, 0

    def set_total(self, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        self.done += count
        if self.done >= self.total and self.hidden.exists():
            self.hidden.rename(self.original)


def test_a_reembed_with_many_failures_refuses_to_switch(settings, small_catalogue, tiny24_weights, tmp_path):
    photos = small_catalogue.parent / "img"
    gone = [photos / f"p{number}-{view}.png" for number in (0, 1, 2) for view in (0, 1)]
    _hide(gone, tmp_path / "hidden")
    restore = _RestoreAfterBulk(tmp_path / "hidden" / "p0-0.png", photos / "p0-0.png", 24)

    with pytest.raises(ReembedRefusedError, match="5 of the catalogue's 24 images") as refused:
        reembed(VisualSearch(settings), backbone=TINY24, weights=str(tiny24_weights), batch_images=8,
                progress=restore)
    report = refused.value.report
    # p0-0.png failed in the bulk phase and was retried (and embedded) in a catch-up round.
    assert not report.switched and report.embedded == 19 and report.caught_up >= 1
    assert sorted(Path(failure.image).name for failure in report.failures) == sorted(p.name for p in gone[1:])
    assert "--force" in report.refused and "p1-0.png" in str(refused.value)
    # Nothing switched: the old vectors answer, every image still indexed.
    after = VisualSearch(settings)
    assert after.stats()["backbone"] == TINY and after.stats()["index"]["vectors"] == 24
    assert after.search(tmp_path / "hidden" / "p1-0.png", top_k=1).hits[0].sku == "P1"
    assert all(image.status == "indexed" for image in after.product("P1").images)

    # Forced, the run resumes and switches; the images it could not read are failed.
    forced = reembed(VisualSearch(settings), backbone=TINY24, weights=str(tiny24_weights), batch_images=8,
                     force=True)
    assert forced.switched and forced.resumed and forced.skipped == 19 and len(forced.failures) == 5
    assert forced.refused is None
    after = VisualSearch(settings)
    assert after.stats()["backbone"] == TINY24 and after.stats()["index"]["vectors"] == 19
    assert {image.status for image in after.product("P1").images} == {"failed"}


def test_a_few_failures_do_not_stop_the_switch(settings, small_catalogue, tiny24_weights, tmp_path):
    photos = small_catalogue.parent / "img"
    _hide([photos / "p4-0.png", photos / "p4-1.png"], tmp_path / "hidden")
    report = reembed(VisualSearch(settings), backbone=TINY24, weights=str(tiny24_weights))
    assert report.switched and report.refused is None
    assert sorted(Path(failure.image).name for failure in report.failures) == ["p4-0.png", "p4-1.png"]
    assert VisualSearch(settings).stats()["index"]["vectors"] == 22


class _CrashOnSecondBatch:
    def __init__(self):
        self.done = 0

    def set_total(self, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        self.done += count
        if self.done > 8:
            raise Crash()


@BOTH_STORES
def test_a_killed_reembed_resumes_where_it_stopped(settings, small_catalogue, tiny24_weights, tmp_path):
    vs = VisualSearch(settings)
    with pytest.raises(Crash):
        reembed(vs, backbone=TINY24, weights=str(tiny24_weights), batch_images=8, progress=_CrashOnSecondBatch())
    # Nothing switched: searches still answer from the old vectors.
    assert VisualSearch(settings).stats()["backbone"] == TINY
    assert VisualSearch(settings).search(_query(small_catalogue, 2), top_k=1).hits[0].sku == "P2"

    resumed = reembed(VisualSearch(settings), backbone=TINY24, weights=str(tiny24_weights), batch_images=8)
    assert resumed.resumed and resumed.switched
    assert resumed.skipped == 8 and resumed.embedded == 16
    assert resumed.generation == "generations/1-test_tiny24"
    stats = VisualSearch(settings).stats()
    assert stats["backbone"] == TINY24 and stats["index"]["vectors"] == 24

    # A run for another identity abandons an unfinished one (its folder or collection goes).
    with pytest.raises(Crash):
        reembed(VisualSearch(settings), backbone=TINY, weights=str(settings.weights), batch_images=8,
                progress=_CrashOnSecondBatch())
    assert "generations/2-test_tiny" in VisualSearch(settings).generation_storage.locations()
    torch.manual_seed(2)
    other_weights = tmp_path / "other24.pth"
    torch.save(_Tiny24Net().state_dict(), other_weights)
    done = reembed(VisualSearch(settings), backbone=TINY24, weights=str(other_weights), batch_images=8)
    assert done.switched and not done.resumed and done.skipped == 0 and done.embedded == 24
    assert VisualSearch(settings).generation_storage.locations() == ["", "generations/1-test_tiny24",
                                                                      "generations/2-test_tiny24"]
    assert done.generation == "generations/2-test_tiny24"
    assert VisualSearch(settings).search(_query(small_catalogue, 2), top_k=1).hits[0].sku == "P2"


class _WritesMidRun:
    """Stands for API writes landing in the current generation while the reembed runs."""

    def __init__(self, server: VisualSearch, folder: Path):
        self.server = server
        self.folder = folder
        self.calls = 0
        self.done = 0

    def set_total(self, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        self.calls += 1
        if count == 0 and self.done == 8:  # the second batch starts: P0..P3 are in the new generation
            image = make_image(self.folder / "new.png", seed=999)
            self.server.put_product(ProductRecord(sku="NEW", title="New", category="shoes", images=[str(image)]))
            self.server.put_product(ProductRecord(sku="P6", category="scarves"))
            self.server.remove(["P0"])
        self.done += count


@BOTH_STORES
def test_writes_during_the_reembed_are_in_the_new_generation(settings, small_catalogue, tiny24_weights, tmp_path):
    server = VisualSearch(settings)
    server.search(_query(small_catalogue, 1))  # loaded: the old pair
    writes = _WritesMidRun(server, tmp_path)
    report = reembed(VisualSearch(settings), backbone=TINY24, weights=str(tiny24_weights), batch_images=8,
                     progress=writes)
    assert report.switched and writes.done == 25  # the 24 images, and NEW's (walked by the bulk phase)
    assert report.caught_up >= 1 and report.deleted == 2 and report.refreshed >= 1

    after = VisualSearch(settings)
    ids = set(after.store().alive_ids().tolist())
    new = after.product("NEW")
    assert {image.id for image in new.images} <= ids
    assert after.search(tmp_path / "new.png", top_k=1).hits[0].sku == "NEW"
    assert after.search(_query(small_catalogue, 6), top_k=1).hits[0].sku == "P6"
    scarves = after.search(_query(small_catalogue, 6), filters=SearchFilters.build(category="scarves")).hits
    assert [hit.sku for hit in scarves] == ["P6"]
    assert "P0" not in {hit.sku for hit in after.search(_query(small_catalogue, 0), top_k=20).hits}
    stats = after.stats()
    assert stats["index"]["vectors"] == stats["indexed_images"] == 23 and stats["index"]["up_to_date"]

    # The server (old pair loaded) writes into the new generation after the switch.
    later = make_image(tmp_path / "later.png", seed=1234)
    server.put_product(ProductRecord(sku="LATER", category="bags", images=[str(later)]))
    assert server.store().dim == 24
    assert after.search(later, top_k=1).hits[0].sku == "LATER"
    server.remove(["P1"])
    assert not {image.id for image in after.product("P2").images} - set(after.store().alive_ids().tolist())
    assert after.stats()["index"]["vectors"] == 22


@BOTH_STORES
def test_a_write_to_a_replaced_generation_is_refused_and_retried(settings, small_catalogue, tiny24_weights,
                                                                  tmp_path):
    stale = VisualSearch(settings)
    old_store = stale.store()
    pinned = stale.pinned()  # a request that began before the switch
    reembed(VisualSearch(settings), backbone=TINY24, weights=str(tiny24_weights))
    with pytest.raises(GenerationChangedError):
        old_store.commit(VectorRows.build(ids=[999], product_ids=[1], vectors=np.ones((1, 32)), prices=[None],
                                          tokens=[[]], dim=32))
    # Its write goes to the new generation anyway (a retry on the current one).
    image = make_image(tmp_path / "pinned.png", seed=77)
    view, _report, created = pinned.put_product(ProductRecord(sku="PINNED", images=[str(image)]))
    assert created and view.images[0].status == "indexed"
    assert VisualSearch(settings).search(image, top_k=1).hits[0].sku == "PINNED"


def test_a_live_server_answers_every_search_through_the_switch(settings, small_catalogue, tiny24_weights):
    app = create_app(settings=settings)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    photo = _query(small_catalogue, 8).read_bytes()
    outcomes: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client():
        with requests.Session() as http:
            while not stop.is_set():
                answer = http.post(url + "/api/v1/search", files={"image": ("q.png", photo, "image/png")},
                                   data={"top_k": "3"}, timeout=30)
                body = answer.json()
                outcomes.append((answer.status_code, body["results"][0]["sku"] if answer.ok else str(body)))

    class Slow:  # keeps the run going long enough for many searches meanwhile
        def set_total(self, total: int) -> None:
            pass

        def advance(self, count: int) -> None:
            time.sleep(0.1)

    try:
        assert requests.get(url + "/api/v1/health", timeout=30).json()["backbone"] == TINY
        searcher = threading.Thread(target=client)
        searcher.start()
        while not outcomes:
            time.sleep(0.01)
        report = reembed(VisualSearch(settings), backbone=TINY24, weights=str(tiny24_weights), batch_images=8,
                         progress=Slow())
        during = len(outcomes)
        deadline = time.monotonic() + 30
        while requests.get(url + "/api/v1/health", timeout=30).json()["backbone"] != TINY24:
            assert time.monotonic() < deadline, "the server never followed the switch"
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        searcher.join()
    finally:
        stop.set()
        server.shutdown()
        thread.join()
    assert report.switched and during >= 5
    assert [outcome for outcome in outcomes if outcome != (200, "P8")] == []
    assert len(outcomes) > during


@BOTH_STORES
def test_cli_reembed_json_and_drop_old(settings, tiny24_weights, monkeypatch):
    for name in ("BACKBONE", "WEIGHTS", "VECTOR_STORE"):
        monkeypatch.delenv(f"VISUALSEARCH_{name}", raising=False)
    if settings.db_url:
        monkeypatch.setenv("VISUALSEARCH_DB_URL", settings.db_url)
    if settings.vector_store:
        monkeypatch.setenv("VISUALSEARCH_VECTOR_STORE", settings.vector_store)
    runner = CliRunner()
    data = ["--data-dir", str(settings.data_dir)]
    result = runner.invoke(main, ["reembed", "--backbone", TINY24, "--weights", str(tiny24_weights),
                                  "--workers", "0", "--json", *data], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["switched"] and report["backbone"] == TINY24 and report["dim"] == 24 and report["embedded"] == 24
    stats = json.loads(runner.invoke(main, ["stats", "--json", *data]).stdout)
    assert stats["backbone"] == TINY24 and stats["index"]["vectors"] == 24
    too_soon = runner.invoke(main, ["reembed", "--drop-old", "--json", *data])
    assert too_soon.exit_code == 1 and "drop_refused" in too_soon.output and "--force" in too_soon.output
    dropped = runner.invoke(main, ["reembed", "--drop-old", "--force", "--json", *data])
    assert dropped.exit_code == 0 and json.loads(dropped.stdout) == {"dropped": ["."]}
    missing = runner.invoke(main, ["reembed", *data])
    assert missing.exit_code == 2 and "--backbone" in missing.output
    unknown = runner.invoke(main, ["reembed", "--backbone", "nope", *data])
    assert unknown.exit_code == 1 and "unknown backbone" in unknown.output


def test_a_load_that_crashes_is_recorded_and_retried_only_after_its_back_off(caplog):
    """A RuntimeError (corrupt weights, CUDA out of memory) while following a switch is a
    failure like a missing backbone: logged with its traceback, not retried at once."""
    calls = []

    def load(ref: GenerationRef):
        calls.append(ref)
        raise RuntimeError("CUDA out of memory")

    def make(ref: GenerationRef, *, embedder=None) -> Generation:
        return Generation(ref, load_embedder=load, open_store=lambda _ref: None, embedder=embedder)

    old = GenerationRef("", catalogue.StoredIdentity(TINY, "a" * 64, 32))
    new = GenerationRef("generations/1-x", catalogue.StoredIdentity(TINY24, "b" * 64, 24))
    refs = [old]
    tracker = GenerationTracker(lambda: refs[0], make, embedder=object())  # the old CNN is loaded
    assert tracker.current().ref == old
    refs[0] = new
    with caplog.at_level("ERROR", logger="visualsearch.generations"):
        tracker.follow(0, wait=False)  # in the background
        deadline = time.monotonic() + 10
        while new not in tracker._failed or tracker._loading.locked():
            assert time.monotonic() < deadline, "the failed load was never recorded"
            time.sleep(0.01)
    assert calls == [new] and tracker.current().ref == old  # still answering from the old pair
    record = next(r for r in caplog.records if "cannot load" in r.getMessage())
    assert record.exc_info and record.exc_info[0] is RuntimeError
    for _ in range(3):  # requests within the back-off start no other load
        tracker.follow(0, wait=False)
    time.sleep(0.1)
    assert calls == [new]
    tracker._failed[new] = 0.0  # the back-off is over
    with pytest.raises(RuntimeError):
        tracker.follow(0, wait=True)
    assert calls == [new, new] and tracker._failed[new] > time.monotonic()
