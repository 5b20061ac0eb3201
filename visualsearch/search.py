"""Product search: an image (or a catalogue product) -> the most similar products, best first.

A product is scored by its best-matching image, so a product with many views never
fills the page. Filters are evaluated inside the vector store (on the fields stored
beside each vector); the catalogue only supplies the display fields of the winners
and confirms they are still indexed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Collection

import numpy as np

from .catalogue import ImageStatus
from .catalogue import store as catalogue
from .errors import InvalidRequestError
from .images import Crop, ImageSource, load_image
from .results import SearchHit, SearchResult
from .vectors import SearchFilters, StoreHits

if TYPE_CHECKING:
    from .service import VisualSearch

MAX_TOP_K = 100
# Pages reach at most this deep into the ranking (a deeper page asks the store for more
# candidates than any search should scan).
MAX_OFFSET = 1000
# Images asked of the store by the first search of a query: the store's default
# re-ranking depth, which its ANN search scans anyway (see VectorStore.search). More,
# DEEPEN_FACTOR times as many each time, while too few distinct products came back.
FIRST_POOL = 100
DEEPEN_FACTOR = 4


def validate_top_k(top_k: int) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {top_k!r}")
    return top_k


def validate_offset(offset: int) -> int:
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_OFFSET:
        raise InvalidRequestError(f"offset must be a whole number from 0 to {MAX_OFFSET}, got {offset!r}")
    return offset


def search_image(vs: "VisualSearch", image: ImageSource, *, top_k: int = 10, offset: int = 0,
                 filters: SearchFilters | None = None, crop: Crop | None = None,
                 exclude_image_ids: Collection[int] = ()) -> SearchResult:
    """Find the products most similar to a photo.

    Args:
        vs: an open data directory.
        image: path, bytes or binary file of the query photo.
        top_k: products wanted, 1..100.
        offset: products of the ranking to skip first, 0..1000 (the page ``offset`` /
            ``top_k`` + 1 of ``top_k`` products; pages of one query never repeat a product).
        filters: category / brand / attribute / price restrictions.
        crop: region of the photo to search with, in its pixels.
        exclude_image_ids: catalogue images that never count as a match (e.g. the query
            photo itself, when it is a catalogue image): their products are ranked by
            their best image other than these.

    Returns:
        Up to ``top_k`` products, best first, and ``took_ms`` with decode, embed,
        search and total milliseconds.

    Raises:
        ImageError: the upload is not a readable image.
        InvalidRequestError: bad ``top_k``, ``offset``, crop or filters.
        BackboneMismatchError: the index was built with another backbone.
    """
    validate_top_k(top_k)
    validate_offset(offset)
    started = time.perf_counter()
    embedder = vs.embedder
    picture = load_image(image, max_pixels=vs.settings.max_image_pixels, target_size=embedder.query_decode_size,
                         crop=crop)
    decoded = time.perf_counter()
    query = embedder.embed_queries([picture])
    embedded = time.perf_counter()
    hits = find_products(vs, query, top_k=top_k, offset=offset, filters=filters or SearchFilters(),
                         exclude_image_ids=exclude_image_ids)
    done = time.perf_counter()
    return SearchResult(hits, took_ms={
        "decode": _ms(decoded - started), "embed": _ms(embedded - decoded),
        "search": _ms(done - embedded), "total": _ms(done - started),
    })


def similar_products(vs: "VisualSearch", sku: str, *, top_k: int = 10, offset: int = 0,
                     filters: SearchFilters | None = None) -> SearchResult:
    """Products most similar to catalogue product ``sku`` (itself excluded), from its stored vectors.

    ``offset`` pages through the ranking as in :func:`search_image`.

    Raises:
        ProductNotFoundError: unknown SKU.
        InvalidRequestError: bad ``top_k`` or ``offset``, or the product has no indexed image yet.
    """
    validate_top_k(top_k)
    validate_offset(offset)
    started = time.perf_counter()
    with vs.sessions() as session:
        product = catalogue.get_product(session, sku)
        image_ids = [image.id for image in product.images if image.status == ImageStatus.INDEXED]
        product_id = product.id
    store = vs.store()
    vectors = store.get_vectors(image_ids)[1] if store is not None and image_ids else np.zeros((0, 0))
    if len(vectors) == 0:
        raise InvalidRequestError(f"product {sku!r} has no indexed image yet")
    hits = find_products(vs, vectors, top_k=top_k, offset=offset, filters=filters or SearchFilters(),
                         exclude_product=product_id)
    done = time.perf_counter()
    return SearchResult(hits, took_ms={"decode": 0.0, "embed": 0.0, "search": _ms(done - started),
                                       "total": _ms(done - started)})


def find_products(vs: "VisualSearch", queries: np.ndarray, *, top_k: int, filters: SearchFilters,
                  offset: int = 0, exclude_product: int | None = None,
                  exclude_image_ids: Collection[int] = ()) -> list[SearchHit]:
    """Products ``offset`` to ``offset + top_k`` of the ranking for the query vectors (a
    product counts with its best image's score, among its images not in ``exclude_image_ids``).

    The ranking never depends on the page asked for, so pages never repeat or skip a
    product: the store is searched FIRST_POOL, then DEEPEN_FACTOR times more images
    deep, always the same sequence, and each search only appends the products it is
    the first to find. (An exact search ranks them best first throughout; with an ANN
    index a deeper search can find a product that scores above some found before, and
    it still comes after them.)
    """
    store = vs.store()
    if store is None:
        return []
    wanted = offset + top_k
    found: list[SearchHit] = []
    ranked: set[int] = set()  # products placed (or refused by the catalogue) by shallower searches
    pool = FIRST_POOL
    excluded = np.fromiter(exclude_image_ids, dtype=np.int64) if exclude_image_ids else None
    while True:
        hits = store.search(queries, pool, filters)
        # Excluded images leave before the best image per product is picked, so that
        # their product is still found (and scored) through its other images.
        kept = hits if excluded is None else _without_images(hits, excluded)
        fresh = [candidate for candidate in _best_image_per_product(kept, exclude_product)
                 if candidate[1] not in ranked]
        ranked.update(product_id for _, product_id, _ in fresh)
        found += _with_catalogue_fields(vs, fresh, wanted - len(found))
        if len(found) >= wanted or len(hits) < pool:
            return found[offset:wanted]
        pool *= DEEPEN_FACTOR


def _without_images(hits: StoreHits, image_ids: np.ndarray) -> StoreHits:
    keep = ~np.isin(hits.ids, image_ids)
    return StoreHits(ids=hits.ids[keep], product_ids=hits.product_ids[keep], scores=hits.scores[keep])


def _best_image_per_product(hits, exclude_product: int | None) -> list[tuple[int, int, float]]:
    """(image id, product id, score), best first, one per product (hits are best first)."""
    _, first = np.unique(hits.product_ids, return_index=True)
    chosen = []
    for position in np.sort(first).tolist():
        product_id = int(hits.product_ids[position])
        if product_id != exclude_product:
            chosen.append((int(hits.ids[position]), product_id, float(hits.scores[position])))
    return chosen


def _with_catalogue_fields(vs: "VisualSearch", candidates: list[tuple[int, int, float]],
                           limit: int) -> list[SearchHit]:
    """The first ``limit`` candidates still indexed in the catalogue (a crash can leave
    vectors of images the catalogue no longer holds as indexed), with their product's
    fields. Only as many candidates as still needed are looked up at a time."""
    hits: list[SearchHit] = []
    start = 0
    with vs.sessions() as session:
        while len(hits) < limit and start < len(candidates):
            chunk = candidates[start:start + limit - len(hits)]
            start += len(chunk)
            rows = catalogue.hit_rows(session, [image_id for image_id, _, _ in chunk])
            for image_id, product_id, score in chunk:
                row = rows.get(image_id)
                if row is None or row.product_id != product_id or ImageStatus(row.status) != ImageStatus.INDEXED:
                    continue
                hits.append(SearchHit(sku=row.sku, title=row.title, category=row.category, brand=row.brand,
                                      price=row.price, url=row.url, image_id=image_id, score=score,
                                      attributes=catalogue.decode_attributes(row.attributes)))
    return hits


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
