"""Queries and writes on the catalogue, so that no other module writes SQL.

Everything here works in bounded batches: callers hand in at most a manifest chunk
of products or a flush of images, and no query ever loads every row.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence

from sqlalchemy import bindparam, delete, insert, literal_column, select, update
from sqlalchemy.orm import Session, selectinload

from ..catalogue_manifest import ProductRecord
from ..errors import BackboneMismatchError, ProductNotFoundError
from .counters import read_counts
from .models import UPLOAD_PATH_PATTERN, CatalogueMeta, ImageStatus, Product, ProductImage

# SQLite accepts 32,766 bound parameters per statement; stay far below.
IN_CHUNK = 500
FIELD_NAMES = ("title", "category", "brand", "price", "url")
FILTER_FIELDS = ("category", "brand", "price", "attributes")


# --- embedding identity ---------------------------------------------------------


def get_meta(session: Session, key: str) -> str | None:
    row = session.get(CatalogueMeta, key)
    return row.value if row else None


def set_meta(session: Session, key: str, value: str) -> None:
    row = session.get(CatalogueMeta, key)
    if row is None:
        session.add(CatalogueMeta(key=key, value=value))
    else:
        row.value = value


@dataclass(frozen=True)
class StoredIdentity:
    backbone: str
    weights_sha256: str
    dim: int


def stored_identity(session: Session) -> StoredIdentity | None:
    """Backbone, weights hash and dimension of the vectors of this catalogue, if any."""
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


# --- products -------------------------------------------------------------------


@dataclass(frozen=True)
class UpsertResult:
    """Products by SKU, and the ids of those whose filter fields changed (their stored
    vectors must be rewritten with the new fields)."""

    product_ids: dict[str, int]
    fields_changed: set[int]


def upsert_products(session: Session, records: Sequence[ProductRecord]) -> UpsertResult:
    """Insert new products, update the fields the records give, add their new images as pending.

    Images the catalogue has but a record does not name are kept (a manifest adds, it
    never deletes). A product whose fields are all unchanged is not written. Bulk
    statements (no ORM objects): this runs for every row of a 10M-image manifest.
    """
    records = _merge_duplicates(records)
    existing: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(list(records), IN_CHUNK):
        for row in session.execute(
            select(Product.id, Product.sku, *[getattr(Product, name) for name in FIELD_NAMES], Product.attributes,
                   Product.vectors_stale)
            .where(Product.sku.in_(chunk))
        ):
            existing[row.sku] = dict(row._mapping)
    inserts, updates, changed = [], [], set()
    for sku, record in records.items():
        current = existing.get(sku)
        if current is None:
            inserts.append({"sku": sku, **{name: getattr(record, name) for name in FIELD_NAMES},
                            "attributes": dict(record.attributes)})
            continue
        update_row, filter_changed = _field_changes(current, record)
        if filter_changed:
            update_row["vectors_stale"] = _stale_stamp()
        if update_row:
            updates.append({"id": current["id"], **update_row})
        if filter_changed or current["vectors_stale"]:
            changed.add(current["id"])
    if updates:
        session.execute(update(Product), updates)
    product_ids = {sku: row["id"] for sku, row in existing.items()}
    for chunk in _chunks(inserts, IN_CHUNK):
        # Another writer (an API PUT beside a batch run) may create the same SKU first.
        _insert_ignoring_duplicates(session, Product, chunk)
        for product_id, sku in session.execute(
            select(Product.id, Product.sku).where(Product.sku.in_([row["sku"] for row in chunk]))
        ):
            product_ids[sku] = product_id
    _add_new_images(session, records, product_ids)
    return UpsertResult(product_ids, changed)


def _merge_duplicates(records: Sequence[ProductRecord]) -> dict[str, ProductRecord]:
    """One record per SKU (a chunk may name a SKU twice): later fields win, images add up."""
    merged: dict[str, ProductRecord] = {}
    for record in records:
        first = merged.get(record.sku)
        if first is None:
            merged[record.sku] = ProductRecord(sku=record.sku, **{name: getattr(record, name) for name in FIELD_NAMES},
                                               attributes=dict(record.attributes), images=list(record.images))
            continue
        for name in FIELD_NAMES:
            if getattr(record, name) is not None:
                setattr(first, name, getattr(record, name))
        first.attributes.update(record.attributes)
        first.images += [path for path in record.images if path not in first.images]
    return merged


def _field_changes(current: dict[str, Any], record: ProductRecord) -> tuple[dict[str, Any], bool]:
    """(the columns to update, whether a field the vector store filters on changed)."""
    changes: dict[str, Any] = {}
    for name in FIELD_NAMES:
        value = getattr(record, name)
        if value is not None and current[name] != value:
            changes[name] = value
    if record.attributes:
        merged = {**(current["attributes"] or {}), **record.attributes}
        if merged != (current["attributes"] or {}):
            changes["attributes"] = merged
    if changes:
        changes["updated_at"] = datetime.now(timezone.utc)
    return changes, any(name in FILTER_FIELDS for name in changes)


def _add_new_images(session: Session, records: dict[str, ProductRecord], product_ids: dict[str, int]) -> None:
    known: dict[int, set[str]] = {}
    for chunk in _chunks(list(product_ids.values()), IN_CHUNK):
        for product_id, path in session.execute(
            select(ProductImage.product_id, ProductImage.path).where(ProductImage.product_id.in_(chunk))
        ):
            known.setdefault(product_id, set()).add(path)
    new_images = []
    for sku, record in records.items():
        product_id = product_ids[sku]
        paths = known.setdefault(product_id, set())
        for path in map(str, record.images):
            if path not in paths:
                new_images.append({"product_id": product_id, "path": path, "position": len(paths),
                                   "status": ImageStatus.PENDING})
                paths.add(path)
    for chunk in _chunks(new_images, IN_CHUNK * 4):
        _insert_ignoring_duplicates(session, ProductImage, chunk)


def _insert_ignoring_duplicates(session: Session, model: type, rows: list[dict[str, Any]]) -> None:
    """Bulk INSERT that skips rows whose unique key exists (concurrent writers)."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        session.execute(insert(model), rows)
        return
    table = model.__table__
    defaults = {column.name: column.default.arg for column in table.columns
                if column.default is not None and column.default.is_scalar}
    callables = {column.name: column.default.arg for column in table.columns
                 if column.default is not None and column.default.is_callable}
    complete = [{**defaults, **{name: make(None) for name, make in callables.items()}, **row} for row in rows]
    session.execute(dialect_insert(table).on_conflict_do_nothing(), complete)


def get_product(session: Session, sku: str) -> Product:
    """The product with ``sku`` and its images.

    Raises:
        ProductNotFoundError: unknown SKU.
    """
    product = session.scalar(select(Product).where(Product.sku == sku).options(selectinload(Product.images)))
    if product is None:
        raise ProductNotFoundError(f"no product with sku {sku!r}")
    return product


def product_exists(session: Session, sku: str) -> bool:
    return session.scalar(select(Product.id).where(Product.sku == sku)) is not None


@dataclass(frozen=True)
class ProductFields:
    """What the vector store keeps beside each vector of a product (and the product's
    stale stamp when they were read)."""

    category: str | None
    brand: str | None
    price: float | None
    attributes: dict[str, Any]
    stale_stamp: int = 0


def product_fields(session: Session, product_ids: Iterable[int]) -> dict[int, ProductFields]:
    fields: dict[int, ProductFields] = {}
    for chunk in _chunks(list(set(product_ids)), IN_CHUNK):
        for row in session.execute(
            select(Product.id, Product.category, Product.brand, Product.price, Product.attributes,
                   Product.vectors_stale)
            .where(Product.id.in_(chunk))
        ):
            fields[row.id] = ProductFields(row.category, row.brand, row.price, dict(row.attributes or {}),
                                           row.vectors_stale)
    return fields


def delete_products(session: Session, skus: Iterable[str]) -> tuple[list[str], list[int], list[str]]:
    """Delete products by SKU.

    Returns:
        (deleted SKUs, ids of all their images, which must leave the vector store, paths
        of all their images).
    """
    deleted: list[str] = []
    vector_ids: list[int] = []
    paths: list[str] = []
    for chunk in _chunks(list(skus), IN_CHUNK):
        rows = session.execute(select(Product.id, Product.sku).where(Product.sku.in_(chunk))).all()
        if not rows:
            continue
        product_ids = [row.id for row in rows]
        deleted += [row.sku for row in rows]
        for image_id, path in session.execute(
            select(ProductImage.id, ProductImage.path).where(ProductImage.product_id.in_(product_ids))
        ):
            paths.append(path)
            # Every image, not only the indexed ones: a crash between a store commit and
            # marking its images indexed leaves vectors of "pending" images.
            vector_ids.append(image_id)
        # Images first: the counting triggers look up the product's category.
        session.execute(delete(ProductImage).where(ProductImage.product_id.in_(product_ids)))
        session.execute(delete(Product).where(Product.id.in_(product_ids)))
    return deleted, vector_ids, paths


def path_is_referenced(session: Session, path: str) -> bool:
    """Whether an image names ``path``: an index lookup for uploads (the partial index
    ix_product_images_upload_path), a full scan for other paths."""
    query = select(ProductImage.id).where(ProductImage.path == path)
    if fnmatch.fnmatchcase(path, UPLOAD_PATH_PATTERN.replace("%", "*")):
        # The pattern inline, not a bound parameter: only then can SQLite's planner see
        # that the query implies the partial index's WHERE and use it.
        query = query.where(ProductImage.path.like(literal_column(f"'{UPLOAD_PATH_PATTERN}'")))
    return session.scalar(query.limit(1)) is not None


# --- images ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRow:
    """The columns the indexer needs to decide whether an image needs work (no ORM)."""

    id: int
    product_id: int
    path: str
    status: ImageStatus
    file_size: int | None
    file_mtime_ns: int | None


def images_of_products(session: Session, product_ids: Sequence[int]) -> list[ImageRow]:
    rows: list[ImageRow] = []
    for chunk in _chunks(list(product_ids), IN_CHUNK):
        for row in session.execute(
            select(ProductImage.id, ProductImage.product_id, ProductImage.path, ProductImage.status,
                   ProductImage.file_size, ProductImage.file_mtime_ns)
            .where(ProductImage.product_id.in_(chunk)).order_by(ProductImage.id)
        ):
            rows.append(ImageRow(row.id, row.product_id, row.path, ImageStatus(row.status), row.file_size,
                                 row.file_mtime_ns))
    return rows


def indexed_images_by_sha256(session: Session, digests: Sequence[str]) -> dict[str, int]:
    """An indexed image id for each content hash already embedded (for reusing its vector)."""
    found: dict[str, int] = {}
    for chunk in _chunks(list(set(digests)), IN_CHUNK):
        for digest, image_id in session.execute(
            select(ProductImage.sha256, ProductImage.id).where(
                ProductImage.sha256.in_(chunk), ProductImage.status == ImageStatus.INDEXED
            )
        ):
            found.setdefault(digest, image_id)
    return found


def existing_image_ids(session: Session, image_ids: Sequence[int]) -> dict[int, int]:
    """Image id -> product id, for the ids that still exist."""
    found: dict[int, int] = {}
    for chunk in _chunks(list(image_ids), IN_CHUNK):
        for image_id, product_id in session.execute(
            select(ProductImage.id, ProductImage.product_id).where(ProductImage.id.in_(chunk))
        ):
            found[image_id] = product_id
    return found


def indexed_images_of_products(session: Session, product_ids: Iterable[int]) -> list[tuple[int, int]]:
    """(image id, product id) of the indexed images of these products."""
    pairs: list[tuple[int, int]] = []
    for chunk in _chunks(list(set(product_ids)), IN_CHUNK):
        pairs += [(row.id, row.product_id) for row in session.execute(
            select(ProductImage.id, ProductImage.product_id)
            .where(ProductImage.product_id.in_(chunk), ProductImage.status == ImageStatus.INDEXED)
        )]
    return pairs


def mark_indexed(session: Session, images: Sequence[dict[str, Any]]) -> None:
    """Bulk-update images to indexed. Each dict: id, sha256, file_size, file_mtime_ns, width, height."""
    if not images:
        return
    now = datetime.now(timezone.utc)
    session.execute(update(ProductImage), [
        {**image, "status": ImageStatus.INDEXED, "error": None, "indexed_at": now} for image in images
    ])


def mark_failed(session: Session, failures: Sequence[tuple[int, str]]) -> None:
    """Bulk-update images to failed with their error message."""
    if failures:
        session.execute(update(ProductImage), [
            {"id": image_id, "status": ImageStatus.FAILED, "error": message} for image_id, message in failures
        ])


# Built once: constructing and coercing the statement per search cost ~1.5 ms, most of
# the catalogue's share of a query.
_HIT_ROWS = (
    select(ProductImage.id, ProductImage.product_id, ProductImage.status, Product.sku, Product.title,
           Product.category, Product.brand, Product.price, Product.url)
    .join(Product, Product.id == ProductImage.product_id)
    .where(ProductImage.id.in_(bindparam("ids", expanding=True)))
)


def hit_rows(session: Session, image_ids: Sequence[int]) -> dict[int, Any]:
    """Image id -> (id, product_id, status, sku, title, category, brand, price, url) of search hits."""
    found: dict[int, Any] = {}
    for chunk in _chunks(list(image_ids), IN_CHUNK):
        for row in session.execute(_HIT_ROWS, {"ids": chunk}):
            found[row.id] = row
    return found


def _stale_stamp() -> int:
    return time.time_ns() & 0x3FFF_FFFF_FFFF_FFFF | 1  # never 0


def mark_vectors_current(session: Session, stamps: dict[int, int]) -> None:
    """The stored vectors of these products carry the fields read when their stamp was
    ``stamps[id]``; clear the flag unless a newer change stamped it since."""
    stale = [{"product": product, "seen": stamp} for product, stamp in stamps.items() if stamp]
    if stale:
        session.execute(
            update(Product.__table__).where(Product.__table__.c.id == bindparam("product"),
                                            Product.__table__.c.vectors_stale == bindparam("seen"))
            .values(vectors_stale=0), stale)


def stale_products(session: Session, limit: int = 10_000) -> list[int]:
    """Products whose stored vectors may carry old filter fields (see Product.vectors_stale)."""
    return list(session.scalars(select(Product.id).where(Product.vectors_stale != 0).limit(limit)))


def get_image(session: Session, image_id: int) -> ProductImage | None:
    return session.get(ProductImage, image_id)


def indexed_image_ids(session: Session, batch: int = 50_000) -> Iterator[list[int]]:
    """Every indexed image id, in ascending batches (for consistency checks)."""
    return image_ids(session, batch, status=ImageStatus.INDEXED)


def image_ids(session: Session, batch: int = 50_000, *, status: ImageStatus | None = None) -> Iterator[list[int]]:
    """Every image id (of one ``status``, or all), in ascending batches."""
    last = 0
    while True:
        query = select(ProductImage.id).where(ProductImage.id > last)
        if status is not None:
            query = query.where(ProductImage.status == status)
        ids = session.scalars(query.order_by(ProductImage.id).limit(batch)).all()
        if not ids:
            return
        yield list(ids)
        last = ids[-1]


# --- counts ----------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueCounts:
    products: int
    images: int
    indexed: int
    failed: int
    pending: int
    categories: dict[str, int]


def catalogue_counts(session: Session) -> CatalogueCounts:
    counts = read_counts(session)
    by_status = {status: counts.get(f"images:{status.value}", 0) for status in ImageStatus}
    categories = {key.removeprefix("category:"): value for key, value in sorted(counts.items())
                  if key.startswith("category:") and value > 0}
    return CatalogueCounts(
        products=counts.get("products", 0), images=sum(by_status.values()),
        indexed=by_status[ImageStatus.INDEXED], failed=by_status[ImageStatus.FAILED],
        pending=by_status[ImageStatus.PENDING], categories=categories,
    )


def brands(session: Session, limit: int = 500) -> list[str]:
    """Distinct brands for the search form (at most ``limit``)."""
    return list(session.scalars(
        select(Product.brand).distinct().where(Product.brand.is_not(None)).order_by(Product.brand).limit(limit)
    ))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
