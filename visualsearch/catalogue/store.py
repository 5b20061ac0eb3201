"""Queries and writes on the catalogue, so that no other module writes SQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, selectinload

from ..catalogue_manifest import ProductRecord
from ..errors import BackboneMismatchError, ProductNotFoundError
from .models import CatalogueMeta, ImageStatus, Product, ProductImage

REVISION_KEY = "vectors_revision"


# --- embedding identity and revision ------------------------------------------


def get_meta(session: Session, key: str) -> str | None:
    row = session.get(CatalogueMeta, key)
    return row.value if row else None


def set_meta(session: Session, key: str, value: str) -> None:
    row = session.get(CatalogueMeta, key)
    if row is None:
        session.add(CatalogueMeta(key=key, value=value))
    else:
        row.value = value


def vectors_revision(session: Session) -> int:
    """A counter bumped by every change to the stored vectors; the index records the one it reflects."""
    return int(get_meta(session, REVISION_KEY) or 0)


def bump_revision(session: Session) -> int:
    revision = vectors_revision(session) + 1
    set_meta(session, REVISION_KEY, str(revision))
    return revision


@dataclass(frozen=True)
class StoredIdentity:
    backbone: str
    weights_sha256: str
    dim: int


def stored_identity(session: Session) -> StoredIdentity | None:
    """Backbone, weights hash and dimension of the vectors stored in this catalogue, if any."""
    backbone = get_meta(session, "backbone")
    if backbone is None:
        return None
    return StoredIdentity(backbone, get_meta(session, "weights_sha256") or "", int(get_meta(session, "dim") or 0))


def check_backbone_name(stored: StoredIdentity, backbone: str) -> None:
    """Raises BackboneMismatchError unless the catalogue's vectors came from ``backbone``."""
    if stored.backbone != backbone:
        raise BackboneMismatchError(
            f"this catalogue was indexed with backbone {stored.backbone!r}, not {backbone!r}: "
            f"use --backbone {stored.backbone}, or a new --data-dir for {backbone}"
        )


def claim_identity(session: Session, *, backbone: str, weights_sha256: str, dim: int) -> None:
    """Record which network produces this catalogue's vectors, or check it is the same one.

    Raises:
        BackboneMismatchError: the catalogue already holds vectors of another network.
    """
    current = stored_identity(session)
    if current is None:
        set_meta(session, "backbone", backbone)
        set_meta(session, "weights_sha256", weights_sha256)
        set_meta(session, "dim", str(dim))
        return
    check_backbone_name(current, backbone)
    if current.weights_sha256 != weights_sha256 or current.dim != dim:
        raise BackboneMismatchError(
            f"this catalogue was indexed with other weights for {backbone!r} "
            f"(sha256 {current.weights_sha256[:12]}...): use the same weights file or a new --data-dir"
        )


# --- products ---------------------------------------------------------------


def upsert_products(session: Session, records: Sequence[ProductRecord]) -> dict[str, Product]:
    """Insert new products and update the fields the manifest gives for existing ones.

    Images named by a record and not yet known are added as ``pending``; images the
    catalogue has but the record does not name are kept (a manifest adds, it never deletes).
    """
    skus = [record.sku for record in records]
    existing: dict[str, Product] = {}
    for chunk in _chunks(skus, 500):
        for product in session.scalars(
            select(Product).where(Product.sku.in_(chunk)).options(selectinload(Product.images))
        ):
            existing[product.sku] = product
    for record in records:
        product = existing.get(record.sku)
        if product is None:
            product = existing[record.sku] = Product(sku=record.sku, attributes={}, images=[])
            session.add(product)
        for name in ("title", "category", "brand", "price", "url"):
            value = getattr(record, name)
            if value is not None:
                setattr(product, name, value)
        if record.attributes:
            product.attributes = {**(product.attributes or {}), **record.attributes}
        known = {image.path for image in product.images}
        for path in record.images:
            if str(path) not in known:
                product.images.append(ProductImage(path=str(path), position=len(product.images)))
                known.add(str(path))
    session.flush()
    return existing


def get_product(session: Session, sku: str) -> Product:
    """The product with ``sku`` and its images.

    Raises:
        ProductNotFoundError: unknown SKU.
    """
    product = session.scalar(select(Product).where(Product.sku == sku).options(selectinload(Product.images)))
    if product is None:
        raise ProductNotFoundError(f"no product with sku {sku!r}")
    return product


def delete_products(session: Session, skus: Iterable[str]) -> tuple[list[str], list[int]]:
    """Delete products by SKU. Returns (deleted SKUs, vector ids that must leave the index)."""
    deleted: list[str] = []
    vector_ids: list[int] = []
    for chunk in _chunks(list(skus), 500):
        rows = session.execute(
            select(Product.id, Product.sku).where(Product.sku.in_(chunk))
        ).all()
        if not rows:
            continue
        product_ids = [row.id for row in rows]
        deleted += [row.sku for row in rows]
        vector_ids += session.scalars(
            select(ProductImage.id).where(
                ProductImage.product_id.in_(product_ids), ProductImage.status == ImageStatus.INDEXED
            )
        ).all()
        session.execute(delete(ProductImage).where(ProductImage.product_id.in_(product_ids)))
        session.execute(delete(Product).where(Product.id.in_(product_ids)))
    if vector_ids:
        bump_revision(session)
    return deleted, vector_ids


# --- images and vectors -------------------------------------------------------


def images_to_check(session: Session, product_ids: Sequence[int]) -> list[ProductImage]:
    """Every image of these products (the indexer decides which need work)."""
    images: list[ProductImage] = []
    for chunk in _chunks(list(product_ids), 500):
        images += session.scalars(select(ProductImage).where(ProductImage.product_id.in_(chunk))).all()
    return images


def embeddings_by_sha256(session: Session, digests: Sequence[str]) -> dict[str, bytes]:
    """Stored embeddings of already-indexed images with these content hashes."""
    found: dict[str, bytes] = {}
    for chunk in _chunks(list(set(digests)), 500):
        for digest, embedding in session.execute(
            select(ProductImage.sha256, ProductImage.embedding).where(
                ProductImage.sha256.in_(chunk), ProductImage.status == ImageStatus.INDEXED
            )
        ):
            found.setdefault(digest, embedding)
    return found


def mark_indexed(image: ProductImage, *, sha256: str, size: int, mtime_ns: int,
                 width: int, height: int, embedding: np.ndarray) -> None:
    image.sha256 = sha256
    image.file_size = size
    image.file_mtime_ns = mtime_ns
    image.width = width
    image.height = height
    image.embedding = np.asarray(embedding, dtype="<f4").tobytes()
    image.status = ImageStatus.INDEXED
    image.error = None
    image.indexed_at = datetime.now(timezone.utc)


def mark_failed(image: ProductImage, error: str) -> None:
    image.status = ImageStatus.FAILED
    image.error = error
    image.embedding = None


def decode_embedding(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


def iter_embeddings(session: Session, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All stored vectors as (ids, vectors) chunks, for rebuilding the index."""
    last_id = 0
    while True:
        rows = session.execute(
            select(ProductImage.id, ProductImage.embedding)
            .where(ProductImage.status == ImageStatus.INDEXED, ProductImage.id > last_id)
            .order_by(ProductImage.id).limit(batch)
        ).all()
        if not rows:
            return
        ids = np.fromiter((row.id for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.stack([decode_embedding(row.embedding) for row in rows])
        yield ids, vectors
        last_id = int(ids[-1])


def product_vectors(session: Session, product: Product) -> np.ndarray:
    """(n, dim) stored vectors of a product's indexed images (possibly empty)."""
    blobs = [image.embedding for image in product.images
             if image.status == ImageStatus.INDEXED and image.embedding]
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([decode_embedding(blob) for blob in blobs])


# --- lookups for search -------------------------------------------------------


def filtered_image_ids(session: Session, *, category: str | None = None, brand: str | None = None,
                       min_price: float | None = None, max_price: float | None = None) -> np.ndarray:
    """Vector ids of indexed images whose product passes the filters."""
    query = select(ProductImage.id).join(Product).where(ProductImage.status == ImageStatus.INDEXED)
    if category is not None:
        query = query.where(func.lower(Product.category) == category.lower())
    if brand is not None:
        query = query.where(func.lower(Product.brand) == brand.lower())
    if min_price is not None:
        query = query.where(Product.price >= min_price)
    if max_price is not None:
        query = query.where(Product.price <= max_price)
    return np.fromiter(session.scalars(query), dtype=np.int64)


def images_with_products(session: Session, image_ids: Sequence[int]) -> dict[int, ProductImage]:
    """Images (with their product loaded) by id."""
    found: dict[int, ProductImage] = {}
    for chunk in _chunks(list(image_ids), 500):
        for image in session.scalars(
            select(ProductImage).where(ProductImage.id.in_(chunk)).options(selectinload(ProductImage.product))
        ):
            found[image.id] = image
    return found


def get_image(session: Session, image_id: int) -> ProductImage | None:
    return session.get(ProductImage, image_id)


@dataclass(frozen=True)
class CatalogueStats:
    products: int
    images: int
    indexed: int
    failed: int
    pending: int
    categories: dict[str, int]


def catalogue_stats(session: Session) -> CatalogueStats:
    by_status = dict(session.execute(
        select(ProductImage.status, func.count()).group_by(ProductImage.status)
    ).all())
    categories = dict(session.execute(
        select(func.coalesce(Product.category, ""), func.count()).group_by(Product.category)
    ).all())
    return CatalogueStats(
        products=session.scalar(select(func.count()).select_from(Product)) or 0,
        images=sum(by_status.values()),
        indexed=by_status.get(ImageStatus.INDEXED, 0),
        failed=by_status.get(ImageStatus.FAILED, 0),
        pending=by_status.get(ImageStatus.PENDING, 0),
        categories=categories,
    )


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
