"""The visualsearch command: index, search, stats, remove, and clean errors with exit status 1."""

from __future__ import annotations

import fcntl
import json
import random
import threading
import time

import pytest

from .conftest import TINY


def test_index_search_stats_remove(run, small_catalogue):
    result = run("index", str(small_catalogue), "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert "12 products, 24 images: 24 embedded" in result.output
    again = run("index", str(small_catalogue), "--json")
    assert json.loads(again.stdout)["unchanged"] == 24

    query = str(small_catalogue.parent / "img" / "p7-0.png")
    found = run("search", query, "--top-k", "3", "--json")
    assert found.exit_code == 0
    results = json.loads(found.stdout)["results"]
    assert [hit["sku"] for hit in results][0] == "P7" and len(results) == 3
    shoes = json.loads(run("search", query, "-k", "10", "--category", "shoes", "--max-price", "80",
                           "--json").stdout)["results"]
    assert {hit["category"] for hit in shoes} == {"shoes"} and max(hit["price"] for hit in shoes) <= 80
    assert len(shoes) == 3  # P0, P3, P6
    text = run("search", query, "-k", "2")
    assert text.stdout.count("\n") == 2 and text.stdout.lstrip().startswith("1. 1.000  P7")

    stats = json.loads(run("stats", "--json").stdout)
    assert stats["products"] == 12 and stats["backbone"] == TINY and stats["index"]["vectors"] == 24

    removed = run("remove", "P7", "NOPE")
    assert "removed 1 product" in removed.stdout and "NOPE" in removed.stderr
    after = json.loads(run("search", query, "--json").stdout)["results"]
    assert "P7" not in {hit["sku"] for hit in after}


def test_bad_image_gives_a_message_and_status_1(run, small_catalogue, tmp_path):
    run("index", str(small_catalogue))
    text = tmp_path / "photo.jpg"
    text.write_text("definitely not a jpeg")
    result = run("search", str(text))
    assert result.exit_code == 1
    assert "not a supported image" in result.output and "Traceback" not in result.output


def test_failed_images_are_listed_and_strict_exits_1(run, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    manifest = folder / "m.csv"
    manifest.write_text("sku,image\nA,broken.png\n")
    relaxed = run("index", str(manifest))
    assert relaxed.exit_code == 0 and "broken.png" in relaxed.stderr and "failures.jsonl" in relaxed.stderr
    strict = run("index", str(manifest), "--strict")
    assert strict.exit_code == 1


def test_commands_on_a_missing_data_dir_create_nothing(run, small_catalogue, tmp_path):
    query = str(small_catalogue.parent / "img" / "p1-0.png")
    typo = tmp_path / "typo"
    for args in (("search", query), ("stats",), ("remove", "P1"), ("compact",), ("rebuild-index",)):
        result = run(*args, "--data-dir", str(typo))
        assert result.exit_code == 1 and "visualsearch index" in result.output
    assert not typo.exists()


def test_bad_settings_from_the_environment_are_clean_errors(run, small_catalogue, monkeypatch):
    monkeypatch.setenv("VISUALSEARCH_BATCH_SIZE", "0")
    result = run("index", str(small_catalogue))
    assert result.exit_code == 2 and "VISUALSEARCH_BATCH_SIZE" in result.output


def test_bad_manifest_and_bad_options(run, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("sku,picture\nA,a.png\n")
    result = run("index", str(manifest))
    assert result.exit_code == 1 and "missing required column" in result.output
    assert run("search", str(manifest), "--top-k", "0").exit_code == 2
    assert run("search", str(manifest), "--crop", "1,2").exit_code == 2


def test_wrong_backbone_for_an_existing_index(run, small_catalogue):
    run("index", str(small_catalogue))
    query = str(small_catalogue.parent / "img" / "p1-0.png")
    result = run("search", query, "--backbone", "mobilenet_v2")
    assert result.exit_code == 1 and "indexed with backbone 'test_tiny'" in result.output


def test_backbones_lists_the_registry(run):
    output = run("backbones").stdout
    assert "efficientnet_lite0" in output and "resnet50" in output and TINY not in output


def test_search_with_attribute_filters(run, small_catalogue):
    run("index", str(small_catalogue))
    query = str(small_catalogue.parent / "img" / "p7-0.png")

    def skus(*args: str) -> set[str]:
        result = run("search", query, "-k", "100", "--json", *args)
        assert result.exit_code == 0, result.output
        return {hit["sku"] for hit in json.loads(result.stdout)["results"]}

    red = {f"P{number}" for number in range(12) if random.Random(number).choice(["red", "blue"]) == "red"}
    assert 0 < len(red) < 12
    assert skus("--filter", "colour=red") == red
    assert skus("--filter", "COLOUR=Red|blue") == {f"P{number}" for number in range(12)}
    assert skus("--filter", "colour=red", "--category", "hats|bags") == {
        sku for sku in red if int(sku[1:]) % 3 != 0}
    assert skus("--filter", "colour=green") == set()
    assert run("search", query, "--filter", "colour").exit_code == 2
    assert run("search", query, "--filter", "=red").exit_code == 2


def test_compact_and_rebuild_index_print_json(run, small_catalogue):
    run("index", str(small_catalogue))
    assert "removed 2 product" in run("remove", "P1", "P2").stdout
    compacted = run("compact", "--json")
    assert compacted.exit_code == 0, compacted.output
    outcome = json.loads(compacted.stdout)
    assert outcome["vectors"] == 20 and isinstance(outcome["rebuilt"], bool) and outcome["index_type"]
    forced = json.loads(run("compact", "--force", "--json").stdout)
    assert forced["rebuilt"] is True and forced["vectors"] == 20
    rebuilt = run("rebuild-index", "--json")
    assert rebuilt.exit_code == 0, rebuilt.output
    outcome = json.loads(rebuilt.stdout)
    assert outcome["rebuilt"] is True and outcome["vectors"] == 20 and outcome["index_type"]
    assert json.loads(run("stats", "--json").stdout)["index"]["vectors"] == 20
    # Searches still find what is left, and nothing of what was removed.
    query = str(small_catalogue.parent / "img" / "p3-1.png")
    results = json.loads(run("search", query, "-k", "100", "--json").stdout)["results"]
    assert results[0]["sku"] == "P3" and len(results) == 10
    assert {"P1", "P2"}.isdisjoint(hit["sku"] for hit in results)
    text = run("compact")
    assert text.exit_code == 0 and "vectors: 20" in text.stdout


@pytest.fixture
def index_lock(run, small_catalogue, tmp_path):
    """DATA_DIR/.index.lock, held the way another ``visualsearch index`` run holds it."""
    run("index", str(small_catalogue))
    with open(tmp_path / "data" / ".index.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield handle


def test_index_while_another_run_holds_the_lock(run, small_catalogue, index_lock):
    assert run("index", str(small_catalogue), "--wait", "-1").exit_code == 2
    busy = run("index", str(small_catalogue), "--wait", "0")
    assert busy.exit_code == 1
    message = busy.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "another 'visualsearch index' run" in message and "--wait" in message
    started = time.monotonic()
    assert run("index", str(small_catalogue), "--wait", "0.5").exit_code == 1
    assert time.monotonic() - started >= 0.5
    # Searches go on meanwhile.
    query = str(small_catalogue.parent / "img" / "p4-0.png")
    assert json.loads(run("search", query, "--json").stdout)["results"][0]["sku"] == "P4"
    # With a long enough wait, the run starts once the other one lets go.
    threading.Timer(0.5, fcntl.flock, (index_lock, fcntl.LOCK_UN)).start()
    waited = run("index", str(small_catalogue), "--wait", "30", "--json")
    assert waited.exit_code == 0, waited.output
    assert json.loads(waited.stdout)["unchanged"] == 24
