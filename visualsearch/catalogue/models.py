"""SQLAlchemy 2.0 models of the catalogue: the source of truth the vector index is built from."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ImageStatus(str, enum.Enum):
    PENDING = "pending"  # known, not embedded yet (or its file changed)
    INDEXED = "indexed"  # its vector is committed to the vector store under the image id
    FAILED = "failed"    # could not be read or decoded; ``error`` says why


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sku: Mapped[str] = mapped_column(String(255), unique=True)
    title: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(255), index=True)
    brand: Mapped[str | None] = mapped_column(String(255), index=True)
    price: Mapped[float | None] = mapped_column(Float, index=True)
    url: Mapped[str | None] = mapped_column(Text)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Non-zero (a fresh stamp) after any change to a field the vector store filters on;
    # reset to 0 once the product's stored vectors carry those fields, and only if no
    # newer change stamped it meanwhile. A change whose store update never happened (a
    # crash, a busy lock) is picked up by the next write of the product or ``compact``.
    vectors_stale: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    images: Mapped[list["ProductImage"]] = relationship(
        back_populates="product", cascade="all, delete-orphan", order_by="ProductImage.position"
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sku": self.sku, "title": self.title, "category": self.category, "brand": self.brand,
            "price": self.price, "url": self.url, "attributes": dict(self.attributes or {}),
        }


UPLOAD_PATH_PATTERN = "%/uploads/%"


class ProductImage(Base):
    """One image of a product. Its primary key is also its id in the vector index."""

    __tablename__ = "product_images"
    # No index on status alone: with one, SQLite (which plans without statistics) chose
    # it over the sha256 index for "this content hash, indexed" and scanned every
    # indexed row (1.46 s per batch at 1M images instead of 1 ms).
    # Deleting a product asks whether another image still names each of its uploads
    # (DATA_DIR/uploads/<sha256>.<ext>): a partial index over those paths answers at
    # any catalogue size without indexing every manifest path.
    __table_args__ = (
        UniqueConstraint("product_id", "path", name="uq_product_image_path"),
        Index("ix_product_images_upload_path", "path", sqlite_where=text(f"path LIKE '{UPLOAD_PATH_PATTERN}'"),
              postgresql_where=text(f"path LIKE '{UPLOAD_PATH_PATTERN}'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    # Size and mtime let a re-run skip unchanged files without reading them again.
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    file_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    # An image at an http(s) URL: the ETag of the copy embedded (file_mtime_ns holds its
    # Last-Modified), sent back so that an unchanged image answers 304. Deferred: a
    # catalogue opened read-only before its schema gained the column still loads rows.
    source_etag: Mapped[str | None] = mapped_column(Text, deferred=True)
    # When such an image was last fetched or answered 304 (epoch seconds): within
    # VISUALSEARCH_REMOTE_RECHECK of it, an index run counts it unchanged without asking.
    source_checked_at: Mapped[int | None] = mapped_column(BigInteger, deferred=True)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[ImageStatus] = mapped_column(
        Enum(ImageStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=ImageStatus.PENDING,
    )
    error: Mapped[str | None] = mapped_column(Text)
    indexed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    product: Mapped[Product] = relationship(back_populates="images")

    @property
    def vector_id(self) -> int:
        return self.id


class CatalogueMeta(Base):
    """Key/value facts about the stored embeddings (backbone, weights hash, dimension, revision)."""

    __tablename__ = "catalogue_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class CatalogueCount(Base):
    """Counters kept by triggers, so that health and stats never count rows
    (see :mod:`.counters`; on PostgreSQL these are the folded base values).

    Keys: ``products``, ``images:<status>``, ``category:<name>`` (indexed images per
    category; the empty name counts products without a category).
    """

    __tablename__ = "catalogue_counts"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class CatalogueCountDelta(Base):
    """PostgreSQL's counter changes, one row per key and writing transaction (see
    :mod:`.counters`): concurrent writers never update a shared row, so they neither
    wait on nor deadlock over the hot ``products`` and ``images:*`` counters. Stays
    empty on SQLite, whose writers are serialised anyway."""

    __tablename__ = "catalogue_count_deltas"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    txid: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class StoredProjection(Base):
    """A tuned recipe's projection file (``visualsearch tune``), by its SHA-256. The
    catalogue is what replicas share: a data directory's copy is only a cache, fetched
    from here where it is missing (see :mod:`visualsearch.projection_cache`)."""

    __tablename__ = "projections"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
