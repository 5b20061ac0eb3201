"""Search: one entry per product, best first, selective filters still fill top_k, similar()."""

from __future__ import annotations

import pytest

from visualsearch.errors import ConfigurationError, InvalidRequestError, ProductNotFoundError, UnsupportedImageError
from visualsearch.images import Crop
from visualsearch.search import search_image, similar_products
from visualsearch.service import VisualSearch
from visualsearch.vectors import SearchFilters

from .conftest import make_image, write_catalogue


@pytest.fixture
def indexed(tiny_settings, small_catalogue) -> VisualSearch:
    VisualSearch(tiny_settings).index(small_catalogue)
    return VisualSearch(tiny_settings, read_only=True)


def test_own_image_comes_first_and_products_are_unique(indexed, small_catalogue):
    result = search_image(indexed, small_catalogue.parent / "img" / "p5-1.png", top_k=12)
    skus = [hit.sku for hit in result.hits]
    assert skus[0] == "P5" and result.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert len(skus) == len(set(skus)) == 12
    scores = [hit.score for hit in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert set(result.took_ms) == {"decode", "embed", "search", "total"}
    assert result.took_ms["total"] >= result.took_ms["embed"]


def test_filters(indexed, small_catalogue):
    query = small_catalogue.parent / "img" / "p0-0.png"
    hits = search_image(indexed, query, top_k=10, filters=SearchFilters.build(category="BAGS")).hits
    assert {hit.category for hit in hits} == {"bags"} and len(hits) == 4
    hits = search_image(indexed, query, top_k=10, filters=SearchFilters.build(brand="Globex", max_price=90)).hits
    assert {hit.sku for hit in hits} == {"P6", "P7", "P8"}
    hits = search_image(indexed, query, top_k=10, filters=SearchFilters.build(min_price=115)).hits
    assert [hit.sku for hit in hits] == ["P11"]
    assert search_image(indexed, query, filters=SearchFilters.build(category="none-such")).hits == []
    hits = search_image(indexed, query, top_k=12, filters=SearchFilters.build(category="bags|HATS")).hits
    assert {hit.category for hit in hits} == {"bags", "hats"} and len(hits) == 8
    reds = {f"P{n}" for n in range(12) if indexed.product(f"P{n}").attributes["colour"] == "red"}
    hits = search_image(indexed, query, top_k=12, filters=SearchFilters.build(attributes={"Colour": "RED"})).hits
    assert {hit.sku for hit in hits} == reds
    with pytest.raises(InvalidRequestError):
        SearchFilters.build(min_price=10, max_price=5)


def test_non_ascii_filters_match_case_insensitively(tiny_settings, tmp_path):
    """SQLite's lower() folded ASCII only: "Électronique" never matched "électronique"."""
    folder = tmp_path / "cat"
    folder.mkdir()
    rows = []
    for number, (category, brand) in enumerate([("Électronique", "Öko"), ("ÉLECTRONIQUE", "ÖKO"),
                                                 ("Straße", "Acme"), ("Maison", "Öko")]):
        make_image(folder / f"{number}.png", seed=number)
        rows.append({"sku": f"U{number}", "image": f"{number}.png", "category": category, "brand": brand})
    vs = VisualSearch(tiny_settings)
    vs.index(write_catalogue(folder, rows))
    query = folder / "0.png"

    def skus(**filters):
        return {hit.sku for hit in vs.search(query, filters=SearchFilters.build(**filters)).hits}

    assert skus(category="électronique") == {"U0", "U1"}
    assert skus(brand="öko") == {"U0", "U1", "U3"}
    assert skus(category="STRASSE") == {"U2"}  # full casefolding: ß == ss
    assert skus(category="électronique", brand="Öko") == {"U0", "U1"}


def test_selective_filter_still_returns_top_k(tiny_settings, tmp_path):
    """A category holding 2 % of the catalogue: the 10 results are all from it."""
    folder = tmp_path / "big"
    (folder / "img").mkdir(parents=True)
    rows = []
    for number in range(500):
        make_image(folder / "img" / f"{number}.png", seed=1000 + number, size=32)
        rows.append({"sku": f"S{number}", "image": f"img/{number}.png",
                     "category": "rare" if number % 50 == 0 else "common"})
    VisualSearch(tiny_settings).index(write_catalogue(folder, rows))
    vs = VisualSearch(tiny_settings, read_only=True)
    query = folder / "img" / "7.png"  # a "common" product: rare ones are far down its list
    hits = search_image(vs, query, top_k=10, filters=SearchFilters.build(category="rare")).hits
    assert len(hits) == 10 and {hit.category for hit in hits} == {"rare"}
    unfiltered = search_image(vs, query, top_k=10).hits
    assert sum(hit.category == "rare" for hit in unfiltered) < 10


def test_similar_excludes_the_product_and_uses_stored_vectors(indexed):
    result = similar_products(indexed, "P4", top_k=5)
    assert len(result.hits) == 5 and "P4" not in {hit.sku for hit in result.hits}
    with pytest.raises(ProductNotFoundError):
        similar_products(indexed, "NOPE")


def test_bad_requests(indexed, small_catalogue, tmp_path):
    query = small_catalogue.parent / "img" / "p0-0.png"
    for top_k in (0, 101, "3"):
        with pytest.raises(InvalidRequestError):
            search_image(indexed, query, top_k=top_k)
    text = tmp_path / "x.jpg"
    text.write_text("not an image")
    with pytest.raises(UnsupportedImageError):
        search_image(indexed, text)
    result = search_image(indexed, query, top_k=3, crop=Crop(0, 0, 24, 24))
    assert len(result.hits) == 3


def test_search_on_an_empty_or_missing_catalogue(tiny_settings, tmp_path):
    with pytest.raises(ConfigurationError, match="visualsearch index"):
        VisualSearch(tiny_settings, read_only=True)
    assert not tiny_settings.data_dir.exists()  # a reader creates nothing
    VisualSearch(tiny_settings)  # a writer creates the empty catalogue
    query = make_image(tmp_path / "q.png", seed=5)
    assert search_image(VisualSearch(tiny_settings, read_only=True), query).hits == []
