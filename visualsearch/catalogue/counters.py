"""Counters of products and images, kept current by database triggers.

``/api/v1/health`` and ``visualsearch stats`` read them instead of counting a
million rows (a GROUP BY over the images took 151 ms at 1M). SQLite maintains them
with the triggers below in ``catalogue_counts``. PostgreSQL's writers run
concurrently, so its triggers (:data:`POSTGRESQL_TRIGGERS`) never update a shared
row: each writing transaction adds to rows of its own in ``catalogue_count_deltas``
(key, transaction id), a reader sums those with the base values, and
:func:`fold_deltas` now and then moves committed deltas into the base. On any other
database the counts are computed with plain queries.

The triggers are part of the schema, installed by the migrations (:mod:`.migrations`),
each of which keeps a frozen copy of the SQL it runs. The definitions here are the
current ones, the reference for the reading code below: a change to them needs a new
revision that installs (a copy of) the new definitions, and
``tests/test_catalogue_database.py`` fails until the newest copy equals them.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .models import CatalogueCount, ImageStatus, Product, ProductImage

logger = logging.getLogger(__name__)

_BUMP = ("INSERT INTO catalogue_counts(key, value) SELECT {key}, {amount} WHERE {condition} "
         "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;")
_CATEGORY_OF = "'category:' || coalesce((SELECT category FROM products WHERE id = {row}.product_id), '')"

SQLITE_TRIGGERS = {
    "vs_count_products_insert": f"""
        AFTER INSERT ON products BEGIN
          {_BUMP.format(key="'products'", amount=1, condition="1")}
        END""",
    "vs_count_products_delete": f"""
        AFTER DELETE ON products BEGIN
          {_BUMP.format(key="'products'", amount=-1, condition="1")}
        END""",
    "vs_count_images_insert": f"""
        AFTER INSERT ON product_images BEGIN
          {_BUMP.format(key="'images:' || NEW.status", amount=1, condition="1")}
          {_BUMP.format(key=_CATEGORY_OF.format(row="NEW"), amount=1, condition="NEW.status = 'indexed'")}
        END""",
    "vs_count_images_delete": f"""
        AFTER DELETE ON product_images BEGIN
          {_BUMP.format(key="'images:' || OLD.status", amount=-1, condition="1")}
          {_BUMP.format(key=_CATEGORY_OF.format(row="OLD"), amount=-1, condition="OLD.status = 'indexed'")}
        END""",
    "vs_count_images_status": f"""
        AFTER UPDATE OF status ON product_images WHEN OLD.status IS NOT NEW.status BEGIN
          {_BUMP.format(key="'images:' || OLD.status", amount=-1, condition="1")}
          {_BUMP.format(key="'images:' || NEW.status", amount=1, condition="1")}
          {_BUMP.format(key=_CATEGORY_OF.format(row="OLD"), amount=-1, condition="OLD.status = 'indexed'")}
          {_BUMP.format(key=_CATEGORY_OF.format(row="NEW"), amount=1, condition="NEW.status = 'indexed'")}
        END""",
    "vs_count_products_category": """
        AFTER UPDATE OF category ON products WHEN OLD.category IS NOT NEW.category BEGIN
          INSERT INTO catalogue_counts(key, value)
            SELECT 'category:' || coalesce(OLD.category, ''), -count(*) FROM product_images
            WHERE product_id = NEW.id AND status = 'indexed'
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
          INSERT INTO catalogue_counts(key, value)
            SELECT 'category:' || coalesce(NEW.category, ''), count(*) FROM product_images
            WHERE product_id = NEW.id AND status = 'indexed'
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
        END""",
}


# PostgreSQL: one delta row per (key, writing transaction), so writers never share a row.
_PG_CATEGORY_OF = ("'category:' || coalesce((SELECT category FROM products WHERE id = {row}.product_id "
                   "FOR SHARE), '')")  # FOR SHARE: a concurrent category change waits, or is seen
POSTGRESQL_FUNCTIONS = {
    "vs_count_bump(text, bigint)": """
        RETURNS void LANGUAGE sql AS $$
          INSERT INTO catalogue_count_deltas(key, txid, value) SELECT $1, txid_current(), $2 WHERE $2 <> 0
          ON CONFLICT (key, txid) DO UPDATE SET value = catalogue_count_deltas.value + excluded.value
        $$""",
    "vs_count_products()": """
        RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
          moved bigint;
        BEGIN
          IF TG_OP = 'INSERT' THEN
            PERFORM vs_count_bump('products', 1);
          ELSIF TG_OP = 'DELETE' THEN
            PERFORM vs_count_bump('products', -1);
          ELSE
            SELECT count(*) INTO moved FROM product_images WHERE product_id = NEW.id AND status = 'indexed';
            PERFORM vs_count_bump('category:' || coalesce(OLD.category, ''), -moved);
            PERFORM vs_count_bump('category:' || coalesce(NEW.category, ''), moved);
          END IF;
          RETURN NULL;
        END $$""",
    "vs_count_images()": f"""
        RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF TG_OP IN ('DELETE', 'UPDATE') THEN
            PERFORM vs_count_bump('images:' || OLD.status, -1);
            IF OLD.status = 'indexed' THEN
              PERFORM vs_count_bump({_PG_CATEGORY_OF.format(row="OLD")}, -1);
            END IF;
          END IF;
          IF TG_OP IN ('INSERT', 'UPDATE') THEN
            PERFORM vs_count_bump('images:' || NEW.status, 1);
            IF NEW.status = 'indexed' THEN
              PERFORM vs_count_bump({_PG_CATEGORY_OF.format(row="NEW")}, 1);
            END IF;
          END IF;
          RETURN NULL;
        END $$""",
}
POSTGRESQL_TRIGGERS = {
    "vs_count_products_rows": "AFTER INSERT OR DELETE ON products FOR EACH ROW EXECUTE FUNCTION vs_count_products()",
    "vs_count_products_category": ("AFTER UPDATE OF category ON products FOR EACH ROW "
                                   "WHEN (OLD.category IS DISTINCT FROM NEW.category) "
                                   "EXECUTE FUNCTION vs_count_products()"),
    "vs_count_images_rows": ("AFTER INSERT OR DELETE ON product_images FOR EACH ROW "
                             "EXECUTE FUNCTION vs_count_images()"),
    "vs_count_images_status": ("AFTER UPDATE OF status ON product_images FOR EACH ROW "
                               "WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION vs_count_images()"),
}
# Deltas a reader sums before it folds them into the base (a transaction adds ~5).
FOLD_THRESHOLD = 2000
_FOLD_LOCK_KEY = 0x7673_636F_756E_7473  # "vscounts": one folder at a time


def fold_deltas(connection: Connection) -> int:
    """Move PostgreSQL's committed counter deltas into the base values, in one transaction
    of ``connection`` (the caller commits). Deltas of transactions still running are not
    visible and stay; a second folder at the same time skips. Returns the rows folded."""
    if not connection.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _FOLD_LOCK_KEY}):
        return 0
    return connection.execute(text(
        "WITH moved AS (DELETE FROM catalogue_count_deltas RETURNING key, value) "
        "INSERT INTO catalogue_counts(key, value) SELECT key, sum(value) FROM moved GROUP BY key ORDER BY key "
        "ON CONFLICT (key) DO UPDATE SET value = catalogue_counts.value + excluded.value")).rowcount


def recount(connection: Connection) -> None:
    """Recompute every counter from the rows (what the migrations do when they install the triggers)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("DELETE FROM catalogue_count_deltas"))
    connection.execute(text("DELETE FROM catalogue_counts"))
    connection.execute(text("INSERT INTO catalogue_counts(key, value) SELECT 'products', count(*) FROM products"))
    connection.execute(text(
        "INSERT INTO catalogue_counts(key, value) SELECT 'images:' || status, count(*) "
        "FROM product_images GROUP BY status"))
    connection.execute(text(
        "INSERT INTO catalogue_counts(key, value) SELECT 'category:' || coalesce(p.category, ''), count(*) "
        "FROM product_images i JOIN products p ON p.id = i.product_id WHERE i.status = 'indexed' "
        "GROUP BY coalesce(p.category, '')"))


def read_counts(session: Session) -> dict[str, int]:
    """Every counter; computed with queries where no triggers keep them."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return {row.key: int(row.value) for row in session.scalars(select(CatalogueCount))}
    if dialect == "postgresql":
        return _read_postgresql_counts(session)
    counts = {"products": session.scalar(select(func.count()).select_from(Product)) or 0}
    for status, count in session.execute(select(ProductImage.status, func.count()).group_by(ProductImage.status)):
        counts[f"images:{ImageStatus(status).value}"] = count
    for category, count in session.execute(
        select(func.coalesce(Product.category, ""), func.count()).join(ProductImage)
        .where(ProductImage.status == ImageStatus.INDEXED).group_by(func.coalesce(Product.category, ""))
    ):
        counts[f"category:{category}"] = count
    return counts


def _read_postgresql_counts(session: Session) -> dict[str, int]:
    # One statement, one snapshot: a fold committing in between cannot count twice.
    counts, deltas = {}, 0
    for key, value, rows in session.execute(text(
            "SELECT key, sum(value), sum(delta) FROM (SELECT key, value, 0 AS delta FROM catalogue_counts "
            "UNION ALL SELECT key, value, 1 FROM catalogue_count_deltas) AS c GROUP BY key")):
        counts[key] = int(value)
        deltas += int(rows)
    if deltas > FOLD_THRESHOLD:
        # In a transaction of its own: the caller's session may be a reader's.
        try:
            with session.get_bind().connect() as connection:
                folded = fold_deltas(connection)
                connection.commit()
            logger.debug("catalogue counters: folded %d deltas", folded)
        except DBAPIError as exc:  # e.g. a role that may only read: the deltas just wait
            logger.info("catalogue counters: cannot fold deltas (%s)", exc.orig)
    return counts
