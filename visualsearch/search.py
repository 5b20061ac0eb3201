"""Product search: an image (or a catalogue product) -> the most similar products, best first.

A product is scored by its best-matching image, so a product with many views never
fills the page. Filters are applied inside FAISS (an id selector), and the search goes
deeper until ``top_k`` distinct products are found or the candidates run out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .catalogue import store
from .catalogue_manifest import parse_price
from .engine import Engine
from .errors import InvalidRequestError
from .images import Crop, ImageSource, load_image

MAX_TOP_K = 100
# First look at this many neighbours per wanted product; doubled until enough distinct
# products are found (products have several images, and the query product is excluded
# by similar()).
OVERFETCH = 4


@dataclass(frozen=True)
class SearchFilters:
    category: str | None = None
    brand: str | None = None
    min_price: float | None = None
    max_price: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_price", "max_price"):
            try:
                object.__setattr__(self, name, parse_price(getattr(self, name)))
            except ValueError as exc:
                raise InvalidRequestError(f"{name}: {exc}") from None
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise InvalidRequestError(f"min_price {self.min_price} is above max_price {self.max_price}")

    @property
    def active(self) -> bool:
        return any(value is not None for value in (self.category, self.brand, self.min_price, self.max_price))


@dataclass(frozen=True)
class SearchHit:
    sku: str
    title: str | None
    category: str | None
    brand: str | None
    price: float | None
    url: str | None
    image_id: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "sku": self.sku, "title": self.title, "category": self.category, "brand": self.brand,
            "price": self.price, "url": self.url, "image_id": self.image_id,
            "score": round(self.score, 6),
        }


@dataclass
class SearchResult:
    hits: list[SearchHit]
    took_ms: dict[str, float] = field(default_factory=dict)


def validate_top_k(top_k: int) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {top_k!r}")
    return top_k


def search_image(engine: Engine, image: ImageSource, *, top_k: int = 10,
                 filters: SearchFilters | None = None, crop: Crop | None = None) -> SearchResult:
    """Find the products most similar to an uploaded photo.

    Args:
        engine: an open data directory.
        image: path, bytes or binary file of the query photo.
        top_k: products wanted, 1..100.
        filters: category / brand / price range restrictions.
        crop: region of the photo to search with, in its pixels.

    Returns:
        Up to ``top_k`` products, best first, and ``took_ms`` with decode, embed,
        search and total milliseconds.

    Raises:
        ImageError: the upload is not a readable image.
        InvalidRequestError: bad ``top_k``, crop or filters.
        BackboneMismatchError: the index was built with another backbone.
    """
    validate_top_k(top_k)
    started = time.perf_counter()
    embedder = engine.embedder
    picture = load_image(image, max_pixels=engine.settings.max_image_pixels,
                         target_size=embedder.decode_size, crop=crop)
    decoded = time.perf_counter()
    with engine.embed_lock:
        query = embedder.embed_images([picture])
    embedded = time.perf_counter()
    hits = _search_vectors(engine, query, top_k=top_k, filters=filters or SearchFilters())
    done = time.perf_counter()
    return SearchResult(hits, took_ms={
        "decode": _ms(decoded - started), "embed": _ms(embedded - decoded),
        "search": _ms(done - embedded), "total": _ms(done - started),
    })


def similar_products(engine: Engine, sku: str, *, top_k: int = 10,
                     filters: SearchFilters | None = None) -> SearchResult:
    """Products most similar to catalogue product ``sku`` (itself excluded), from stored vectors.

    Raises:
        ProductNotFoundError: unknown SKU.
        InvalidRequestError: bad ``top_k``, or the product has no indexed image yet.
    """
    validate_top_k(top_k)
    started = time.perf_counter()
    with engine.sessions() as session:
        product = store.get_product(session, sku)
        vectors = store.product_vectors(session, product)
    if len(vectors) == 0:
        raise InvalidRequestError(f"product {sku!r} has no indexed image yet")
    hits = _search_vectors(engine, vectors, top_k=top_k, filters=filters or SearchFilters(), exclude_sku=sku)
    done = time.perf_counter()
    return SearchResult(hits, took_ms={"decode": 0.0, "embed": 0.0, "search": _ms(done - started),
                                       "total": _ms(done - started)})


def _search_vectors(engine: Engine, queries: np.ndarray, *, top_k: int, filters: SearchFilters,
                    exclude_sku: str | None = None) -> list[SearchHit]:
    index = engine.index()
    allowed = None
    if filters.active:
        with engine.sessions() as session:
            allowed = store.filtered_image_ids(session, **vars(filters))
        if len(allowed) == 0:
            return []
    available = index.count if allowed is None else min(index.count, len(allowed))
    k = min(available, top_k * OVERFETCH)
    while True:
        scores, ids = index.search(queries, k, allowed_ids=allowed)
        hits = _best_per_product(engine, scores, ids, exclude_sku)
        if len(hits) >= top_k or k >= available:
            return hits[:top_k]
        k = min(available, k * 2)


def _best_per_product(engine: Engine, scores: np.ndarray, ids: np.ndarray,
                      exclude_sku: str | None) -> list[SearchHit]:
    # Several query vectors (similar() on a multi-view product): an image's score is its best.
    best_by_image: dict[int, float] = {}
    for image_id, score in zip(ids.ravel().tolist(), scores.ravel().tolist()):
        if image_id >= 0 and score > best_by_image.get(image_id, -np.inf):
            best_by_image[image_id] = score
    with engine.sessions() as session:
        images = store.images_with_products(session, list(best_by_image))
    best: dict[str, SearchHit] = {}
    for image_id, score in best_by_image.items():
        image = images.get(image_id)
        if image is None:  # removed since the index was saved
            continue
        product = image.product
        if product.sku == exclude_sku:
            continue
        if product.sku not in best or score > best[product.sku].score:
            best[product.sku] = SearchHit(
                sku=product.sku, title=product.title, category=product.category, brand=product.brand,
                price=product.price, url=product.url, image_id=image_id, score=float(score),
            )
    return sorted(best.values(), key=lambda hit: hit.score, reverse=True)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
