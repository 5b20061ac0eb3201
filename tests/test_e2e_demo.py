"""End to end with the real pretrained backbone on the real demo catalogue."""

from __future__ import annotations

import csv
import io
import random
from collections import defaultdict

import pytest
from PIL import Image, ImageEnhance

from visualsearch.engine import Engine
from visualsearch.search import search_image, similar_products

from .conftest import DEMO_MANIFEST

pytestmark = pytest.mark.slow


def demo_rows() -> list[dict]:
    with open(DEMO_MANIFEST, newline="") as handle:
        return list(csv.DictReader(handle))


def shopper_photo(path, rng: random.Random) -> bytes:
    """What a shopper's snapshot of the product looks like: cropped, tilted, off-colour, JPEG 40."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    fraction = rng.uniform(0.60, 0.85)
    crop_w, crop_h = int(width * fraction), int(height * fraction)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    image = image.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, expand=False, fillcolor=(255, 255, 255))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.75, 1.25))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=40)
    return buffer.getvalue()


def test_every_shopper_photo_finds_its_own_product_first(demo_settings):
    engine = Engine(demo_settings, read_only=True)
    rng = random.Random(2026)
    misses = []
    for row in demo_rows():
        photo = shopper_photo(DEMO_MANIFEST.parent / row["image"], rng)
        hits = search_image(engine, photo, top_k=5).hits
        if hits[0].sku != row["sku"]:
            misses.append((row["image"], [hit.sku for hit in hits[:3]]))
    assert misses == []


def test_multi_view_products_find_their_other_views_in_the_top_5(demo_settings):
    engine = Engine(demo_settings, read_only=True)
    views = defaultdict(list)
    for row in demo_rows():
        views[row["sku"]].append(DEMO_MANIFEST.parent / row["image"])
    multi = {sku: paths for sku, paths in views.items() if len(paths) > 1}
    assert len(multi) == 9
    for sku, paths in multi.items():
        for path in paths:
            # Search with one view; the product's other views must score within the top 5 images.
            result = search_image(engine, path, top_k=5)
            assert sku in [hit.sku for hit in result.hits]
            others = [p for p in paths if p != path]
            for other in others:
                own_rank = _image_rank(engine, path, other)
                assert own_rank < 5, f"{other.name} ranked {own_rank} for {path.name}"


def _image_rank(engine: Engine, query_path, target_path) -> int:
    """Rank of ``target_path`` among all catalogue images for the query (0 = best)."""
    from visualsearch.catalogue import store

    embedder = engine.embedder
    from visualsearch.images import load_image

    query = embedder.embed_images([load_image(query_path)])
    scores, ids = engine.index().search(query, engine.index().count)
    with engine.sessions() as session:
        images = store.images_with_products(session, ids[0].tolist())
    ordered = [images[i].path for i in ids[0].tolist() if images[i].path != str(query_path)]
    return ordered.index(str(target_path))


def test_similar_products_of_a_sneaker_are_sneakers(demo_settings):
    engine = Engine(demo_settings, read_only=True)
    hits = similar_products(engine, "saleor-white-plimsolls", top_k=1).hits
    assert hits[0].sku == "saleor-yellow-plimsolls"
