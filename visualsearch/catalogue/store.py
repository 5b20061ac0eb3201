"""Queries and writes on the catalogue, so that no other module writes SQL.

Everything here works in bounded batches: callers hand in at most a manifest chunk
of products or a flush of images, and no query ever loads every row.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence

from sqlalchemy import Text, bindparam, delete, insert, literal_column, select, type_coerce, update
from sqlalchemy.orm import Session, selectinload

from ..catalogue_manifest import ProductRecord
from ..errors import BackboneMismatchError, ImageNotFoundError, ProductNotFoundError
from ..recipes import DataRecipe, check_recipe
from .counters import read_counts
from .models import UPLOAD_PATH_PATTERN, CatalogueMeta, ImageStatus, Product, ProductImage, StoredProjection

# SQLite accepts 32,766 bound parameters per statement; stay far below.
IN_CHUNK = 500
FIELD_NAMES = ("title", "category", "brand", "price", "url")
FILTER_FIELDS = ("category", "brand", "price", "attributes")
MAX_ID = 2**63 - 1  # the largest integer key SQLite and PostgreSQL's BIGINT hold


# --- embedding identity ---------------------------------------------------------


def get_meta(session: Session, key: str) -> str | None:
    row = session.get(CatalogueMeta, key)
    return row.value if row else None


def get_metas(session: Session, keys: Sequence[str]) -> dict[str, str]:
    """The values of those of ``keys`` that are set, in one query (every write reads the
    identity and the vector generation, eight keys, several times)."""
    rows = session.execute(select(CatalogueMeta.key, CatalogueMeta.value).where(CatalogueMeta.key.in_(keys)))
    return {key: value for key, value in rows}


def set_meta(session: Session, key: str, value: str) -> None:
    """Set ``key`` to ``value`` in one upsert: two writers setting it at once (replicas
    claiming the identity of a new catalogue) both succeed, the later one's value winning."""
    dialect_insert = _dialect_insert(session)
    if dialect_insert is None:
        row = session.get(CatalogueMeta, key)
        if row is None:
            session.add(CatalogueMeta(key=key, value=value))
        else:
            row.value = value
        return
    statement = dialect_insert(CatalogueMeta).values(key=key, value=value)
    session.execute(statement.on_conflict_do_update(index_elements=[CatalogueMeta.key],
                                                    set_={"value": statement.excluded.value}))
    cached = session.identity_map.get(session.identity_key(CatalogueMeta, key))
    if cached is not None:
        session.expire(cached)  # (a get_meta in this session reads the new value)


RECIPE_KEYS = ("recipe", "recipe_version", "recipe_hash")


@dataclass(frozen=True)
class StoredIdentity:
    backbone: str
    weights_sha256: str
    dim: int
    # None: recorded before recipes existed, i.e. the backbone's default recipe.
    recipe: str | None = None
    recipe_version: int | None = None
    recipe_hash: str | None = None

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.backbone


IDENTITY_KEYS = ("backbone", "weights_sha256", "dim", *RECIPE_KEYS)


def stored_identity(session: Session) -> StoredIdentity | None:
    """Backbone, weights hash, dimension and recipe of the vectors of this catalogue, if any."""
    return identity_from_meta(get_metas(session, IDENTITY_KEYS))


def identity_from_meta(meta: dict[str, str]) -> StoredIdentity | None:
    """The :class:`StoredIdentity` in ``meta`` (catalogue meta values by key, at least
    :data:`IDENTITY_KEYS`); None if no vectors were recorded."""
    backbone = meta.get("backbone")
    if backbone is None:
        return None
    version = meta.get("recipe_version")
    return StoredIdentity(backbone, meta.get("weights_sha256") or "", int(meta.get("dim") or 0),
                          recipe=meta.get("recipe"), recipe_version=int(version) if version else None,
                          recipe_hash=meta.get("recipe_hash"))


def check_backbone_name(stored: StoredIdentity, backbone: str) -> None:
    """Raises BackboneMismatchError unless the catalogue's vectors came from ``backbone``."""
    if stored.backbone != backbone:
        raise BackboneMismatchError(
            f"this catalogue was indexed with backbone {stored.backbone!r}, not {backbone!r}: "
            f"use --backbone {stored.backbone}, or a new --data-dir for {backbone}"
        )


def claim_identity(session: Session, *, backbone: str, weights_sha256: str, dim: int, recipe: str | None = None,
                   recipe_version: int | None = None, recipe_hash: str | None = None) -> None:
    """Record which network and recipe produce this catalogue's vectors, or check they are the same.

    Raises:
        BackboneMismatchError: the catalogue already holds vectors of another network
            (RecipeMismatchError: of another recipe).
    """
    identity = dict(backbone=backbone, weights_sha256=weights_sha256, dim=dim, recipe=recipe,
                    recipe_version=recipe_version, recipe_hash=recipe_hash)
    current = stored_identity(session)
    if current is None:
        record_identity(session, **identity)
        return
    check_identity(current, **identity)


def record_identity(session: Session, *, backbone: str, weights_sha256: str, dim: int, recipe: str | None = None,
                    recipe_version: int | None = None, recipe_hash: str | None = None) -> None:
    """Write the identity of the catalogue's vectors (a recipe of None clears the recipe keys)."""
    set_meta(session, "backbone", backbone)
    set_meta(session, "weights_sha256", weights_sha256)
    set_meta(session, "dim", str(dim))
    for key, value in zip(RECIPE_KEYS, (recipe, recipe_version, recipe_hash)):
        if value is None:
            delete_meta(session, key)
        else:
            set_meta(session, key, str(value))


def check_identity(stored: StoredIdentity, *, backbone: str, weights_sha256: str, dim: int, recipe: str | None = None,
                   recipe_version: int | None = None, recipe_hash: str | None = None) -> None:
    """Raises BackboneMismatchError unless ``stored`` names that network and weights
    (RecipeMismatchError unless that recipe too, when one is given)."""
    check_backbone_name(stored, backbone)
    if recipe is not None:
        check_recipe(stored.recipe_name, stored.recipe_version, stored.recipe_hash, name=recipe,
                     version=recipe_version, fingerprint=recipe_hash)
    if stored.weights_sha256 != weights_sha256 or stored.dim != dim:
        raise BackboneMismatchError(
            f"this catalogue was indexed with other weights for {backbone!r} "
            f"(sha256 {stored.weights_sha256[:12]}...): use the same weights file or a new --data-dir"
        )


def delete_meta(session: Session, key: str) -> None:
    session.execute(delete(CatalogueMeta).where(CatalogueMeta.key == key))


DATA_RECIPES_KEY = "data_recipes"  # JSON list of DataRecipe records, oldest first


def data_recipes(session: Session) -> list[DataRecipe]:
    """The recipes this data directory defines (``visualsearch tune``'s), oldest first.

    Raises:
        ConfigurationError: a malformed record.
    """
    raw = get_meta(session, DATA_RECIPES_KEY)
    return [DataRecipe.from_dict(item) for item in json.loads(raw)] if raw else []


def record_data_recipe(session: Session, record: DataRecipe, *, keep_fingerprint: str | None = None) -> None:
    """Record ``record`` as the newest definition of its name; of the older ones only the
    one whose fingerprint is ``keep_fingerprint`` (the vectors answering now) is kept,
    so that it resolves until a re-embedding switches to the new one."""
    kept = [item for item in data_recipes(session)
            if item.recipe.name != record.recipe.name
            or (item.fingerprint() == keep_fingerprint and item.fingerprint() != record.fingerprint())]
    set_meta(session, DATA_RECIPES_KEY, json.dumps([item.to_dict() for item in [*kept, record]]))
    # The projections of the definitions dropped here are needed by no vectors any more.
    referenced = {item.projection_sha256 for item in [*kept, record] if item.projection_sha256}
    session.execute(delete(StoredProjection).where(StoredProjection.sha256.not_in(referenced)))


def store_projection(session: Session, data: bytes) -> str:
    """Keep a projection file's bytes in the catalogue (once per content), so that any
    process sharing the catalogue can load the recipe. Returns their SHA-256."""
    sha256 = hashlib.sha256(data).hexdigest()
    if session.scalar(select(StoredProjection.sha256).where(StoredProjection.sha256 == sha256)) is None:
        session.add(StoredProjection(sha256=sha256, data=data))
    return sha256


def projection_bytes(session: Session, sha256: str) -> bytes | None:
    """The bytes :func:`store_projection` kept under ``sha256`` (None: none)."""
    return session.scalar(select(StoredProjection.data).where(StoredProjection.sha256 == sha256))


# --- products -------------------------------------------------------------------


@dataclass(frozen=True)
class UpsertResult:
    """Products by SKU, and the ids of those whose filter fields changed (their stored
    vectors must be rewritten with the new fields)."""

    product_ids: dict[str, int]
    fields_changed: set[int]
    # The products' images (ascending ids), when the upsert added none: read anyway to
    # find the new ones, so that an unchanged re-run reads each image row once, not twice.
    images: list[ImageRow] | None = None


def upsert_products(session: Session, records: Sequence[ProductRecord]) -> UpsertResult:
    """Insert new products, update the fields the records give (and clear those in their
    ``clear``; attributes merge, or replace with ``replace_attributes``), add their new
    images as pending.

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
                            "attributes": apply_attributes({}, record.attributes)})
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
    images = _add_new_images(session, records, product_ids)
    return UpsertResult(product_ids, changed, images)


def _merge_duplicates(records: Sequence[ProductRecord]) -> dict[str, ProductRecord]:
    """One record per SKU (a chunk may name a SKU twice): later fields (and clears) win,
    attributes merge (or a later replacement wins), images add up. The records are not
    changed: a SKU named twice is merged into a copy (the usual SKU, named once, is not copied)."""
    merged: dict[str, ProductRecord] = {}
    copies: set[str] = set()
    for record in records:
        first = merged.get(record.sku)
        if first is None:
            merged[record.sku] = record
            continue
        if record.sku not in copies:
            first = merged[record.sku] = ProductRecord(
                sku=first.sku, **{name: getattr(first, name) for name in FIELD_NAMES},
                attributes=dict(first.attributes), images=list(first.images), clear=first.clear,
                replace_attributes=first.replace_attributes)
            copies.add(record.sku)
        for name in FIELD_NAMES:
            if getattr(record, name) is not None or name in record.clear:
                setattr(first, name, getattr(record, name))
        first.clear = (first.clear - {name for name in FIELD_NAMES if getattr(record, name) is not None}) | record.clear
        if record.replace_attributes:
            first.attributes, first.replace_attributes = dict(record.attributes), True
        elif first.replace_attributes:
            first.attributes = apply_attributes(first.attributes, record.attributes)
        else:
            first.attributes.update(record.attributes)  # None values still delete, at the update
        first.images += [path for path in record.images if path not in first.images]
    return merged


def apply_attributes(stored: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``stored`` updated with ``changes``, where a None value deletes that attribute."""
    merged = {**stored, **changes}
    return {name: value for name, value in merged.items() if value is not None}


def _field_changes(current: dict[str, Any], record: ProductRecord) -> tuple[dict[str, Any], bool]:
    """(the columns to update, whether a field the vector store filters on changed)."""
    changes: dict[str, Any] = {}
    for name in FIELD_NAMES:
        value = getattr(record, name)
        if (value is not None or name in record.clear) and current[name] != value:
            changes[name] = value
    stored = current["attributes"] or {}
    if record.replace_attributes or record.attributes:
        wanted = apply_attributes({} if record.replace_attributes else stored, record.attributes)
        if wanted != stored:
            changes["attributes"] = wanted
    if changes:
        changes["updated_at"] = datetime.now(timezone.utc)
    return changes, any(name in FILTER_FIELDS for name in changes)


def _add_new_images(session: Session, records: dict[str, ProductRecord],
                    product_ids: dict[str, int]) -> list[ImageRow] | None:
    """Add the records' images the catalogue lacks (pending); return the products' image
    rows when there were none to add (None: read them again for the new ids)."""
    known: dict[int, set[str]] = {}
    rows: list[ImageRow] = []
    for chunk in _chunks(list(product_ids.values()), IN_CHUNK):
        for row in session.execute(_IMAGE_ROWS.where(ProductImage.product_id.in_(chunk))):
            image = _image_row(row)
            rows.append(image)
            known.setdefault(image.product_id, set()).add(image.path)
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
    if new_images:
        return None
    rows.sort(key=lambda row: row.id)
    return rows


def _insert_ignoring_duplicates(session: Session, model: type, rows: list[dict[str, Any]]) -> None:
    """Bulk INSERT that skips rows whose unique key exists (concurrent writers)."""
    dialect_insert = _dialect_insert(session)
    if dialect_insert is None:
        session.execute(insert(model), rows)
        return
    table = model.__table__
    defaults = {column.name: column.default.arg for column in table.columns
                if column.default is not None and column.default.is_scalar}
    callables = {column.name: column.default.arg for column in table.columns
                 if column.default is not None and column.default.is_callable}
    complete = [{**defaults, **{name: make(None) for name, make in callables.items()}, **row} for row in rows]
    session.execute(dialect_insert(table).on_conflict_do_nothing(), complete)


def _dialect_insert(session: Session) -> Callable[..., Any] | None:
    """The dialect's INSERT with ON CONFLICT (SQLite, PostgreSQL), else None."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        return None
    return dialect_insert


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


def delete_image(session: Session, sku: str, image_id: int) -> str:
    """Delete one image of product ``sku``; returns its path. Its vector must then leave
    the store (under the image id, whatever its status: see :func:`delete_products`).

    Raises:
        ProductNotFoundError: unknown SKU.
        ImageNotFoundError: the product has no image ``image_id``.
    """
    product_id = session.scalar(select(Product.id).where(Product.sku == sku))
    if product_id is None:
        raise ProductNotFoundError(f"no product with sku {sku!r}")
    if not 0 < image_id <= MAX_ID:  # an id the database could not even hold is just unknown
        raise ImageNotFoundError(f"product {sku!r} has no image {image_id}")
    path = session.scalar(select(ProductImage.path).where(ProductImage.id == image_id,
                                                          ProductImage.product_id == product_id))
    if path is None:
        raise ImageNotFoundError(f"product {sku!r} has no image {image_id}")
    session.execute(delete(ProductImage).where(ProductImage.id == image_id))
    return path


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
    source_etag: str | None = None  # images at URLs: the ETag to revalidate with
    sha256: str | None = None
    source_checked_at: int | None = None  # images at URLs: last fetched or answered 304 (epoch s)


_IMAGE_ROWS = select(ProductImage.id, ProductImage.product_id, ProductImage.path, ProductImage.status,
                     ProductImage.file_size, ProductImage.file_mtime_ns, ProductImage.source_etag,
                     ProductImage.sha256, ProductImage.source_checked_at)


def _image_row(row: Any) -> ImageRow:
    """An :data:`_IMAGE_ROWS` row as an ImageRow (unpacked as a tuple: a named lookup per
    column costs as much as the rest, at a million rows per re-run)."""
    image_id, product_id, path, status, file_size, file_mtime_ns, source_etag, sha256, source_checked_at = row
    if status.__class__ is not ImageStatus:  # the column's Enum type gives members already
        status = ImageStatus(status)
    return ImageRow(image_id, product_id, path, status, file_size, file_mtime_ns, source_etag, sha256,
                    source_checked_at)


def images_of_products(session: Session, product_ids: Sequence[int]) -> list[ImageRow]:
    rows: list[ImageRow] = []
    for chunk in _chunks(list(product_ids), IN_CHUNK):
        for row in session.execute(_IMAGE_ROWS.where(ProductImage.product_id.in_(chunk)).order_by(ProductImage.id)):
            rows.append(_image_row(row))
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


def indexed_sha256_after(session: Session, after: int, limit: int) -> list[tuple[int, str]]:
    """Up to ``limit`` (image id, content hash) of indexed images with ids above ``after``,
    ascending (a keyset page: callers walk a catalogue of any size in bounded batches)."""
    return [(image_id, digest) for image_id, digest in session.execute(
        select(ProductImage.id, ProductImage.sha256)
        .where(ProductImage.id > after, ProductImage.status == ImageStatus.INDEXED, ProductImage.sha256.is_not(None))
        .order_by(ProductImage.id).limit(limit))]


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


def set_source_validators(session: Session,
                          validators: dict[int, tuple[str | None, int | None, int]]) -> None:
    """Record the ETag, Last-Modified (ns) and check time (epoch seconds) of images
    fetched from URLs (image id -> the three), in one executemany.

    Only images still indexed are touched: a validator must describe the embedded copy.
    """
    if validators:
        table = ProductImage.__table__
        session.execute(
            update(table).where(table.c.id == bindparam("image"), table.c.status == ImageStatus.INDEXED)
            .values(source_etag=bindparam("etag"), file_mtime_ns=bindparam("modified"),
                    source_checked_at=bindparam("checked")),
            [{"image": image, "etag": etag, "modified": modified, "checked": checked}
             for image, (etag, modified, checked) in validators.items()])


def mark_failed(session: Session, failures: Sequence[tuple[int, str]]) -> None:
    """Bulk-update images to failed with their error message."""
    if failures:
        session.execute(update(ProductImage), [
            {"id": image_id, "status": ImageStatus.FAILED, "error": message} for image_id, message in failures
        ])


# Built once: constructing and coercing the statement per search cost ~1.5 ms, most of
# the catalogue's share of a query. The attributes come as their stored JSON text, decoded
# (decode_attributes) only for the hits a page shows: decoding every candidate's cost
# ~3 us a row (+1 ms for 400 candidates), as much as the rest of the lookup.
_HIT_ROWS = (
    select(ProductImage.id, ProductImage.product_id, ProductImage.status, Product.sku, Product.title,
           Product.category, Product.brand, Product.price, Product.url,
           type_coerce(Product.attributes, Text).label("attributes"))
    .join(Product, Product.id == ProductImage.product_id)
    .where(ProductImage.id.in_(bindparam("ids", expanding=True)))
)


def decode_attributes(value: Any) -> dict[str, Any]:
    """A hit row's ``attributes``: JSON text (SQLite), or already decoded where the driver
    decodes JSON columns itself (psycopg)."""
    if isinstance(value, (str, bytes)):
        value = json.loads(value)
    return dict(value or {})


def hit_rows(session: Session, image_ids: Sequence[int]) -> dict[int, Any]:
    """Image id -> (id, product_id, status, sku, title, category, brand, price, url, attributes
    as JSON text: see :func:`decode_attributes`) of search hits."""
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


# --- comparing with a manifest, pruning (visualsearch.sync) -----------------------


def product_rows_by_sku(session: Session, skus: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The stored fields (id, sku, title, category, brand, price, url, attributes) of the
    products with these SKUs that exist."""
    rows: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(list(skus), IN_CHUNK):
        for row in session.execute(
            select(Product.id, Product.sku, *[getattr(Product, name) for name in FIELD_NAMES], Product.attributes)
            .where(Product.sku.in_(chunk))
        ):
            rows[row.sku] = dict(row._mapping)
    return rows


def record_changes_fields(current: dict[str, Any], record: ProductRecord) -> bool:
    """Whether upserting ``record`` would change the stored product ``current`` (a row of
    :func:`product_rows_by_sku`)."""
    return bool(_field_changes(current, record)[0])


def product_keys(session: Session, *, after: int = 0, limit: int = 5000) -> list[tuple[int, str]]:
    """(id, sku) of the products with ids above ``after``, ascending: one keyset page."""
    return [(row.id, row.sku) for row in session.execute(
        select(Product.id, Product.sku).where(Product.id > after).order_by(Product.id).limit(limit))]


def image_keys(session: Session, *, after: int = 0, limit: int = 5000) -> list[tuple[int, str, str]]:
    """(image id, its product's sku, path) of the images with ids above ``after``,
    ascending: one keyset page."""
    return [(row.id, row.sku, row.path) for row in session.execute(
        select(ProductImage.id, Product.sku, ProductImage.path).join(Product, Product.id == ProductImage.product_id)
        .where(ProductImage.id > after).order_by(ProductImage.id).limit(limit))]


def delete_images(session: Session, image_ids: Sequence[int] | Sequence[tuple[int, int, str]]
                  ) -> list[tuple[int, str]]:
    """Delete images, whatever their product. Their vectors must then leave the store
    (see :func:`delete_products`).

    Args:
        image_ids: image ids; or (image id, product id, path) triples, and then only the
            rows whose three values all still match are deleted (an id read earlier may
            since name another image: SQLite reuses the highest id of a deleted row).

    Returns:
        (id, path) of the images actually deleted.
    """
    from sqlalchemy import tuple_

    deleted: list[tuple[int, str]] = []
    items = list(image_ids)
    if items and not isinstance(items[0], int):
        key = tuple_(ProductImage.id, ProductImage.product_id, ProductImage.path)
        returning = session.get_bind().dialect.delete_returning
        for chunk in _chunks([(int(i), int(p), str(path)) for i, p, path in items], IN_CHUNK):
            if returning:
                deleted += [(row.id, row.path) for row in session.execute(
                    delete(ProductImage).where(key.in_(chunk)).returning(ProductImage.id, ProductImage.path))]
                continue
            rows = [(row.id, row.path) for row in session.execute(
                select(ProductImage.id, ProductImage.path).where(key.in_(chunk)))]
            if rows:
                session.execute(delete(ProductImage).where(key.in_(chunk)))
                deleted += rows
        return deleted
    for chunk in _chunks(items, IN_CHUNK):
        rows = [(row.id, row.path) for row in session.execute(
            select(ProductImage.id, ProductImage.path).where(ProductImage.id.in_(chunk)))]
        if rows:
            session.execute(delete(ProductImage).where(ProductImage.id.in_([image_id for image_id, _ in rows])))
            deleted += rows
    return deleted


@dataclass(frozen=True)
class IndexedImage:
    """An indexed image as re-embedding needs it (no ORM)."""

    id: int
    product_id: int
    sku: str
    path: str


_INDEXED_IMAGES = (
    select(ProductImage.id, ProductImage.product_id, Product.sku, ProductImage.path)
    .join(Product, Product.id == ProductImage.product_id)
    .where(ProductImage.status == ImageStatus.INDEXED)
)


def indexed_images_after(session: Session, after: int, limit: int, *,
                         indexed_since: datetime | None = None) -> list[IndexedImage]:
    """Up to ``limit`` indexed images with ids above ``after``, ascending (a keyset page:
    callers walk a catalogue of any size in bounded batches); only those indexed at or
    after ``indexed_since`` when given (a scan: indexed_at has no index)."""
    query = _INDEXED_IMAGES.where(ProductImage.id > after)
    if indexed_since is not None:
        query = query.where(ProductImage.indexed_at >= indexed_since)
    return [IndexedImage(*row) for row in session.execute(query.order_by(ProductImage.id).limit(limit))]


def indexed_images_by_id(session: Session, image_ids: Sequence[int]) -> list[IndexedImage]:
    """The images among ``image_ids`` that are indexed."""
    found: list[IndexedImage] = []
    for chunk in _chunks(list(image_ids), IN_CHUNK):
        found += [IndexedImage(*row) for row in session.execute(_INDEXED_IMAGES.where(ProductImage.id.in_(chunk)))]
    return found


def products_changed_since(session: Session, since: datetime) -> list[int]:
    """Products whose fields changed at or after ``since``, or whose stored vectors may
    still carry older fields (a scan of the products: updated_at has no index)."""
    return list(session.scalars(
        select(Product.id).where((Product.updated_at >= since) | (Product.vectors_stale != 0))))


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


def image_ids_by_path(session: Session, paths: Iterable[str]) -> dict[str, list[int]]:
    """The ids of the images stored under each of ``paths`` (several products may name one
    file); a path no image names is left out. For evaluation runs: ``path`` has no index
    of its own, so each chunk is a scan (fine at benchmark sizes, not per request)."""
    found: dict[str, list[int]] = {}
    for chunk in _chunks(list(dict.fromkeys(paths)), IN_CHUNK):
        for image_id, path in session.execute(select(ProductImage.id, ProductImage.path)
                                              .where(ProductImage.path.in_(chunk)).order_by(ProductImage.id)):
            found.setdefault(path, []).append(image_id)
    return found


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
