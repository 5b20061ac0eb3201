"""The visualsearch command: index, search, stats, remove, and clean errors with exit status 1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from indexer.cli import main

from .conftest import TINY


@pytest.fixture
def run(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("VISUALSEARCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VISUALSEARCH_BACKBONE", TINY)
    monkeypatch.setenv("VISUALSEARCH_WEIGHTS", str(tiny_weights))
    monkeypatch.setenv("VISUALSEARCH_WORKERS", "0")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


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
    for args in (("search", query), ("stats",), ("remove", "P1")):
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
