"""Search results: attributes in every hit, the documented key order, and pages (offset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from indexer.cli import main
from visualsearch import search as search_module
from visualsearch.errors import InvalidRequestError
from visualsearch.service import VisualSearch
from visualsearch.vectors.store import StoreHits
from web import create_app

from .conftest import TINY
from .test_api import catalogue_rows, upload

HIT_KEYS = ["sku", "title", "category", "brand", "price", "url", "image_url", "score", "attributes"]


@pytest.fixture
def vs(tiny_settings, small_catalogue):
    search = VisualSearch(tiny_settings)
    search.index(small_catalogue)
    return search


@pytest.fixture
def client(vs, tiny_settings):
    return create_app({"TESTING": True}, settings=tiny_settings).test_client()


def test_hits_carry_attributes_in_the_api_the_library_and_the_cli(client, vs, small_catalogue, tiny_settings,
                                                                  tiny_weights, monkeypatch):
    colours = {sku: row["colour"] for sku, row in catalogue_rows(small_catalogue).items()}
    query = small_catalogue.parent / "img" / "p4-0.png"
    hits = client.post("/api/v1/search", data=upload(query, top_k="12")).get_json()["results"]
    assert len(hits) == 12 and all(hit["attributes"] == {"colour": colours[hit["sku"]]} for hit in hits)
    similar = client.get("/api/v1/products/P4/similar?top_k=5").get_json()["results"]
    assert similar and all(hit["attributes"] == {"colour": colours[hit["sku"]]} for hit in similar)
    library = vs.search(query, top_k=3).hits
    assert [hit.attributes for hit in library] == [{"colour": colours[hit.sku]} for hit in library]

    for name, value in {"DATA_DIR": str(tiny_settings.data_dir), "BACKBONE": TINY, "WEIGHTS": str(tiny_weights),
                        "WORKERS": "0"}.items():
        monkeypatch.setenv(f"VISUALSEARCH_{name}", value)
    printed = CliRunner().invoke(main, ["search", str(query), "--top-k", "2", "--json"], catch_exceptions=False)
    assert printed.exit_code == 0, printed.output
    results = json.loads(printed.stdout)["results"]
    assert results[0]["sku"] == "P4" and results[0]["attributes"] == {"colour": colours["P4"]}


def test_raw_response_keeps_the_documented_key_order(client, small_catalogue):
    query = small_catalogue.parent / "img" / "p1-0.png"
    for response in (client.post("/api/v1/search", data=upload(query, top_k="3")),
                     client.get("/api/v1/products/P1/similar?top_k=3")):
        text = response.get_data(as_text=True)
        assert text.index('"results"') < text.index('"took_ms"')  # not sorted: "results" < "took_ms" anyway
        first_hit = text[text.index("{", text.index('"results"')):]
        positions = [first_hit.index(f'"{key}"') for key in HIT_KEYS]
        assert positions == sorted(positions), first_hit[:400]
        assert list(response.get_json()["results"][0]) == HIT_KEYS
    product = client.get("/api/v1/products/P1").get_data(as_text=True)
    positions = [product.index(f'"{key}"') for key in ("sku", "title", "category", "brand", "price", "url",
                                                         "attributes", "images")]
    assert positions == sorted(positions)


def _skus(response) -> list[str]:
    assert response.status_code == 200, response.get_json()
    return [hit["sku"] for hit in response.get_json()["results"]]


def test_offset_pages_follow_one_ranking_without_repeats(client, small_catalogue):
    query = small_catalogue.parent / "img" / "p6-1.png"
    everything = _skus(client.post("/api/v1/search", data=upload(query, top_k="100")))
    assert len(everything) == 12
    pages = [_skus(client.post("/api/v1/search", data=upload(query, top_k="5", offset=str(offset))))
             for offset in (0, 5, 10, 15)]
    assert pages[:3] == [everything[:5], everything[5:10], everything[10:]] and pages[3] == []
    # Filters and "more like this" page the same way; offset is no attribute filter.
    hats = _skus(client.post("/api/v1/search", data=upload(query, category="hats", top_k="2", offset="2")))
    assert hats == [sku for sku in everything if sku in {"P2", "P5", "P8", "P11"}][2:4]
    similar = _skus(client.get("/api/v1/products/P6/similar?top_k=100"))
    halves = [_skus(client.get(f"/api/v1/products/P6/similar?top_k=6&offset={offset}")) for offset in (0, 6)]
    assert len(similar) == 11 and halves[0] + halves[1] == similar and not set(halves[0]) & set(halves[1])


@pytest.mark.parametrize("offset", ["-1", "1001", "two", "1.5"])
def test_offset_out_of_bounds_is_a_400_naming_the_limit(client, small_catalogue, offset):
    query = small_catalogue.parent / "img" / "p0-0.png"
    for response in (client.post("/api/v1/search", data=upload(query, offset=offset)),
                     client.get(f"/api/v1/products/P0/similar?offset={offset}")):
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "bad_request"
        if offset in ("-1", "1001"):
            assert "0 to 1000" in response.get_json()["error"]["message"]
    assert client.post("/api/v1/search", data=upload(query, offset="1000")).get_json()["results"] == []


def test_library_offset(vs, small_catalogue):
    query = small_catalogue.parent / "img" / "p3-0.png"
    ranking = [hit.sku for hit in vs.search(query, top_k=100).hits]
    assert [hit.sku for hit in vs.search(query, top_k=4, offset=4).hits] == ranking[4:8]
    similar = [hit.sku for hit in vs.similar("P3", top_k=100).hits]
    assert [hit.sku for hit in vs.similar("P3", top_k=3, offset=9).hits] == similar[9:]
    for bad in (-1, 1001, True, 2.0):
        with pytest.raises(InvalidRequestError, match="offset"):
            vs.search(query, offset=bad)


def test_pages_never_repeat_when_a_deeper_search_reorders(vs, small_catalogue, monkeypatch):
    """An ANN index searched deeper can find a product that scores above ones a shallower
    search found: pages still never repeat or skip a product. The store here is searched
    2 images deep first (then 8, 32), and each deeper search "finds" its worst product
    scoring above all others, as an approximate index may."""
    monkeypatch.setattr(search_module, "FIRST_POOL", 2)
    store = vs.store()
    exact = store.search

    def reordering(queries, k, filters=None):
        hits = exact(queries, k, filters)
        if k <= 2 or len(hits) < 2:
            return hits
        order = np.r_[len(hits) - 1, np.arange(len(hits) - 1)]
        scores = hits.scores[order].copy()
        scores[0] = hits.scores[0] + 0.5
        return StoreHits(hits.ids[order], hits.product_ids[order], scores)

    monkeypatch.setattr(store, "search", reordering)
    query = small_catalogue.parent / "img" / "p5-0.png"
    for size in (1, 2, 3, 5):
        pages = [[hit.sku for hit in vs.search(query, top_k=size, offset=offset).hits]
                 for offset in range(0, 12, size)]
        flat = [sku for page in pages for sku in page]
        assert len(flat) == len(set(flat)) == 12, (size, pages)
        assert flat == [hit.sku for hit in vs.search(query, top_k=12).hits]
