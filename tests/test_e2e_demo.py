"""End to end with the real pretrained backbone on the real demo catalogue.

The numbers asserted here are the ones `python -m benchmarks.demo_retrieval` reports
(docs/retrieval-quality.md); a wrong normalisation, a random network or a broken
pooling drops far below them.
"""

from __future__ import annotations

import pytest

from benchmarks.demo_retrieval import demo_rows, other_view_ranks, shopper_ranks
from visualsearch.service import VisualSearch
from visualsearch.vectors import SearchFilters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vs(demo_settings) -> VisualSearch:
    return VisualSearch(demo_settings, read_only=True)


def test_every_shopper_photo_finds_its_own_product_first(vs):
    rows = demo_rows()
    ranks, _ = shopper_ranks(vs, rows, seed=2026)
    misses = [(row["image"], rank) for row, rank in zip(rows, ranks) if rank != 0]
    assert misses == []
    # Other random snapshots: near-identical colour variants (two black polo shirts,
    # juice bottles) sometimes swap places, but the product is always in the top 3.
    ranks, _ = shopper_ranks(vs, rows, seed=2027)
    assert sum(rank == 0 for rank in ranks) >= 42
    assert max(ranks) < 3


def test_multi_view_products_find_their_other_views(vs):
    product_ranks, image_ranks = other_view_ranks(vs)
    assert len(product_ranks) == 23 and len(image_ranks) == 42  # 9 products with 2-4 views
    # With the query image itself left out, its product is still among the top 5 for
    # most views; close-ups (t-shirt collar, hoodie fabric) are what ImageNet features miss.
    assert sum(rank < 5 for rank in product_ranks) >= 15
    assert sum(rank < 5 for rank in image_ranks) >= 22
    assert sum(rank < 10 for rank in product_ranks) >= 20


def test_similar_products_of_a_sneaker_are_sneakers(vs):
    hits = vs.similar("saleor-white-plimsolls", top_k=3).hits
    assert hits[0].sku == "saleor-yellow-plimsolls"
    assert vs.similar("saleor-orange-juice", top_k=3).hits[0].category == "Juices"
    # Filters restrict "more like this" too, case-insensitively and with alternatives.
    juices = vs.similar("saleor-white-plimsolls", top_k=5, filters=SearchFilters.build(category="JUICES")).hits
    assert len(juices) == 5 and {hit.category for hit in juices} == {"Juices"}
    either = vs.similar("saleor-orange-juice", top_k=100, filters=SearchFilters.build(category="paints|FOOTWEAR"))
    assert {hit.category for hit in either.hits} == {"Paints", "Footwear"}


def test_stored_sizes_are_the_files_not_the_reduced_decode(vs):
    images = vs.product("saleor-white-plimsolls").images
    assert [(image.width, image.height) for image in images] == [(512, 512)] * 4
    assert all(image.status == "indexed" for image in images)


def test_stats_and_health_describe_the_real_index(vs):
    stats = vs.stats()
    assert stats["products"] == 31 and stats["indexed_images"] == 45 and stats["failed_images"] == 0
    assert stats["backbone"] == vs.embedder.identity.backbone and stats["dim"] == vs.embedder.identity.dim
    assert stats["index"]["vectors"] == 45 and stats["index"]["up_to_date"] is True
    health = vs.health()
    assert health["products"] == 31 and health["index"]["vectors"] == 45
