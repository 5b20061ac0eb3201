"""Product search: an image (or a catalogue product) -> the most similar products, best first.

A product is scored by its best-matching image, so a product with many views never
fills the page. Filters are evaluated inside the vector store (on the fields stored
beside each vector); the catalogue only supplies the display fields of the winners
and confirms they are still indexed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .catalogue import ImageStatus
from .catalogue import store as catalogue
from .errors import InvalidRequestError
from .images import Crop, ImageSource, load_image
from .results import SearchHit, SearchResult
from .vectors import SearchFilters

if TYPE_CHECKING:
    from .service import VisualSearch

MAX_TOP_K = 100
# First ask the store for this many images per wanted product (products have several
# images); more when too few distinct, still-indexed products come back.
OVERFETCH = 4
DEEPEN_FACTOR = 4


def validate_top_k(top_k: int) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {top_k!r}")
    return top_k


def search_image(vs: "VisualSearch", image: ImageSource, *, top_k: int = 10,
                 filters: SearchFilters | None = None, crop: Crop | None = None) -> SearchResult:
    """Find the products most similar to a photo.

    Args:
        vs: an open data directory.
        image: path, bytes or binary file of the query photo.
        top_k: products wanted, 1..100.
        filters: category / brand / attribute / price restrictions.
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
    embedder = vs.embedder
    picture = load_image(image, max_pixels=vs.settings.max_image_pixels, target_size=embedder.decode_size,
                         crop=crop)
    decoded = time.perf_counter()
    query = embedder.embed_images([picture])
    embedded = time.perf_counter()
    hits = find_products(vs, query, top_k=top_k, filters=filters or SearchFilters())
    done = time.perf_counter()
    return SearchResult(hits, took_ms={
        "decode": _ms(decoded - started), "embed": _ms(embedded - decoded),
        "search": _ms(done - embedded), "total": _ms(done - started),
    })


def similar_products(vs: "VisualSearch", sku: str, *, top_k: int = 10,
                     filters: SearchFilters | None = None) -> SearchResult:
    """Products most similar to catalogue product ``sku`` (itself excluded), from its stored vectors.

    Raises:
        ProductNotFoundError: unknown SKU.
        InvalidRequestError: bad ``top_k``, or the product has no indexed image yet.
    """
    validate_top_k(top_k)
    started = time.perf_counter()
    with vs.sessions() as session:
        product = catalogue.get_product(session, sku)
        image_ids = [image.id for image in product.images if image.status == ImageStatus.INDEXED]
        product_id = product.id
    store = vs.store()
    vectors = store.get_vectors(image_ids)[1] if store is not None and image_ids else np.zeros((0, 0))
    if len(vectors) == 0:
        raise InvalidRequestError(f"product {sku!r} has no indexed image yet")
    hits = find_products(vs, vectors, top_k=top_k, filters=filters or SearchFilters(), exclude_product=product_id)
    done = time.perf_counter()
    return SearchResult(hits, took_ms={"decode": 0.0, "embed": 0.0, "search": _ms(done - started),
                                       "total": _ms(done - started)})


def find_products(vs: "VisualSearch", queries: np.ndarray, *, top_k: int, filters: SearchFilters,
                  exclude_product: int | None = None) -> list[SearchHit]:
    """The ``top_k`` best products for the query vectors (an image's best score counts)."""
    store = vs.store()
    if store is None:
        return []
    want = top_k * OVERFETCH + (OVERFETCH if exclude_product is not None else 0)
    while True:
        hits = store.search(queries, want, filters)
        candidates = _best_image_per_product(hits, exclude_product)
        found = _with_catalogue_fields(vs, candidates)
        if len(found) >= top_k or len(hits) < want:
            return found[:top_k]
        want *= DEEPEN_FACTOR


def _best_image_per_product(hits, exclude_product: int | None) -> list[tuple[int, int, float]]:
    """(image id, product id, score), best first, one per product (hits are best first)."""
    _, first = np.unique(hits.product_ids, return_index=True)
    chosen = []
    for position in np.sort(first).tolist():
        product_id = int(hits.product_ids[position])
        if product_id != exclude_product:
            chosen.append((int(hits.ids[position]), product_id, float(hits.scores[position])))
    return chosen


def _with_catalogue_fields(vs: "VisualSearch", candidates: list[tuple[int, int, float]]) -> list[SearchHit]:
    """Candidates still indexed in the catalogue (a crash can leave vectors of images the
    catalogue no longer holds as indexed), with their product's display fields."""
    if not candidates:
        return []
    with vs.sessions() as session:
        rows = catalogue.hit_rows(session, [image_id for image_id, _, _ in candidates])
    hits = []
    for image_id, product_id, score in candidates:
        row = rows.get(image_id)
        if row is None or row.product_id != product_id or ImageStatus(row.status) != ImageStatus.INDEXED:
            continue
        hits.append(SearchHit(sku=row.sku, title=row.title, category=row.category, brand=row.brand,
                              price=row.price, url=row.url, image_id=image_id, score=score))
    return hits


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
