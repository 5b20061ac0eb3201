"""Revision 0001: the schema catalogues had before migrations, frozen here.

These tables are a copy of the models at that revision, not the models themselves,
and its triggers a copy of the counting triggers (:mod:`.baseline_triggers`), not
those of :mod:`visualsearch.catalogue.counters`: later revisions change the models
and add migrations, and this one must keep creating what it always created.
:func:`bring_to_baseline` upgrades an SQLite catalogue made before Alembic (its
tables exist, it has no ``alembic_version``) in place, the way ``open_catalogue``
used to, so that it can then be stamped 0001.
"""

from __future__ import annotations

import logging

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Connection

from ...errors import ConfigurationError
from .baseline_triggers import drop_functions, install_triggers

logger = logging.getLogger(__name__)

UPLOAD_PATH_WHERE = "path LIKE '%/uploads/%'"

metadata = MetaData()

Table(
    "products", metadata,
    Column("id", Integer, primary_key=True),
    Column("sku", String(255), nullable=False, unique=True),
    Column("title", Text),
    Column("category", String(255), index=True),
    Column("brand", String(255), index=True),
    Column("price", Float, index=True),
    Column("url", Text),
    Column("attributes", JSON, nullable=False),
    Column("vectors_stale", BigInteger, nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Table(
    "product_images", metadata,
    Column("id", Integer, primary_key=True),
    Column("product_id", Integer, ForeignKey("products.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("position", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("sha256", String(64), index=True),
    Column("file_size", BigInteger),
    Column("file_mtime_ns", BigInteger),
    Column("source_etag", Text),
    Column("source_checked_at", BigInteger),
    Column("width", Integer),
    Column("height", Integer),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("indexed_at", DateTime(timezone=True)),
    UniqueConstraint("product_id", "path", name="uq_product_image_path"),
    Index("ix_product_images_upload_path", "path", sqlite_where=text(UPLOAD_PATH_WHERE),
          postgresql_where=text(UPLOAD_PATH_WHERE)),
)
Table(
    "catalogue_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
Table(
    "catalogue_counts", metadata,
    Column("key", String(300), primary_key=True),
    Column("value", BigInteger, nullable=False),
)
Table(
    "catalogue_count_deltas", metadata,
    Column("key", String(300), primary_key=True),
    Column("txid", BigInteger, primary_key=True, autoincrement=False),
    Column("value", BigInteger, nullable=False),
)


def create_baseline(connection: Connection) -> None:
    """Create the 0001 schema on an empty database."""
    metadata.create_all(connection)
    install_triggers(connection)


def drop_baseline(connection: Connection) -> None:
    """Drop everything :func:`create_baseline` made (triggers go with their tables)."""
    metadata.drop_all(connection)
    drop_functions(connection)


def bring_to_baseline(connection: Connection) -> None:
    """Give a catalogue made before migrations what 0001 has and it may lack: tables,
    nullable columns added since it was created (e.g. ``product_images.source_etag``),
    indexes and triggers.

    Raises:
        ConfigurationError: a missing column that cannot be added in place.
    """
    metadata.create_all(connection)
    inspector = inspect(connection)
    preparer = connection.dialect.identifier_preparer
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.server_default is not None:
                raise ConfigurationError(f"catalogue table {table.name} lacks column {column.name}, which "
                                         "cannot be added in place: rebuild the catalogue")
            kind = column.type.compile(dialect=connection.dialect)
            connection.execute(text(f"ALTER TABLE {preparer.quote(table.name)} "
                                    f"ADD COLUMN {preparer.quote(column.name)} {kind}"))
            logger.info("catalogue: added column %s.%s", table.name, column.name)
        for index in table.indexes:
            index.create(connection, checkfirst=True)
    install_triggers(connection)
