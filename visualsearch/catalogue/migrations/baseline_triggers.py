"""Revision 0001's counting triggers (SQLite) and PL/pgSQL functions and triggers (PostgreSQL), frozen.

A literal copy of what :mod:`visualsearch.catalogue.counters` defined when the
baseline was written, so that a later edit there can never change what revision 0001
does: a new trigger definition needs a new revision that installs it.
``tests/test_catalogue_database.py`` checks that these equal the current definitions
in ``counters.py`` (up to whitespace) for as long as no later revision replaces them.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

SQLITE_TRIGGERS = {
    "vs_count_products_insert": """
        AFTER INSERT ON products BEGIN
          INSERT INTO catalogue_counts(key, value) SELECT 'products', 1 WHERE 1
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
        END""",
    "vs_count_products_delete": """
        AFTER DELETE ON products BEGIN
          INSERT INTO catalogue_counts(key, value) SELECT 'products', -1 WHERE 1
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
        END""",
    "vs_count_images_insert": """
        AFTER INSERT ON product_images BEGIN
          INSERT INTO catalogue_counts(key, value) SELECT 'images:' || NEW.status, 1 WHERE 1
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
          INSERT INTO catalogue_counts(key, value)
            SELECT 'category:' || coalesce((SELECT category FROM products WHERE id = NEW.product_id), ''), 1
            WHERE NEW.status = 'indexed' ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
        END""",
    "vs_count_images_delete": """
        AFTER DELETE ON product_images BEGIN
          INSERT INTO catalogue_counts(key, value) SELECT 'images:' || OLD.status, -1 WHERE 1
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
          INSERT INTO catalogue_counts(key, value)
            SELECT 'category:' || coalesce((SELECT category FROM products WHERE id = OLD.product_id), ''), -1
            WHERE OLD.status = 'indexed' ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
        END""",
    "vs_count_images_status": """
        AFTER UPDATE OF status ON product_images WHEN OLD.status IS NOT NEW.status BEGIN
          INSERT INTO catalogue_counts(key, value) SELECT 'images:' || OLD.status, -1 WHERE 1
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
          INSERT INTO catalogue_counts(key, value) SELECT 'images:' || NEW.status, 1 WHERE 1
            ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
          INSERT INTO catalogue_counts(key, value)
            SELECT 'category:' || coalesce((SELECT category FROM products WHERE id = OLD.product_id), ''), -1
            WHERE OLD.status = 'indexed' ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
          INSERT INTO catalogue_counts(key, value)
            SELECT 'category:' || coalesce((SELECT category FROM products WHERE id = NEW.product_id), ''), 1
            WHERE NEW.status = 'indexed' ON CONFLICT(key) DO UPDATE SET value = value + excluded.value;
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
    "vs_count_images()": """
        RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF TG_OP IN ('DELETE', 'UPDATE') THEN
            PERFORM vs_count_bump('images:' || OLD.status, -1);
            IF OLD.status = 'indexed' THEN
              PERFORM vs_count_bump('category:' || coalesce((SELECT category FROM products
                                                             WHERE id = OLD.product_id FOR SHARE), ''), -1);
            END IF;
          END IF;
          IF TG_OP IN ('INSERT', 'UPDATE') THEN
            PERFORM vs_count_bump('images:' || NEW.status, 1);
            IF NEW.status = 'indexed' THEN
              PERFORM vs_count_bump('category:' || coalesce((SELECT category FROM products
                                                             WHERE id = NEW.product_id FOR SHARE), ''), 1);
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
POSTGRESQL_TRIGGER_TABLES = {"vs_count_products_rows": "products", "vs_count_products_category": "products",
                             "vs_count_images_rows": "product_images", "vs_count_images_status": "product_images"}

_RECOUNT = (
    "DELETE FROM catalogue_counts",
    "INSERT INTO catalogue_counts(key, value) SELECT 'products', count(*) FROM products",
    "INSERT INTO catalogue_counts(key, value) SELECT 'images:' || status, count(*) FROM product_images "
    "GROUP BY status",
    "INSERT INTO catalogue_counts(key, value) SELECT 'category:' || coalesce(p.category, ''), count(*) "
    "FROM product_images i JOIN products p ON p.id = i.product_id WHERE i.status = 'indexed' "
    "GROUP BY coalesce(p.category, '')",
)


def install_triggers(connection: Connection) -> None:
    """Install the connection's dialect's counting triggers (none for other databases)
    and count from scratch: on SQLite only the missing ones (idempotent, as the
    pre-migration open path did), on PostgreSQL all of them, replaced."""
    if connection.dialect.name == "sqlite":
        existing = set(connection.scalars(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")))
        missing = [name for name in SQLITE_TRIGGERS if name not in existing]
        if not missing:
            return
        for name in missing:
            connection.execute(text(f"CREATE TRIGGER IF NOT EXISTS {name} {SQLITE_TRIGGERS[name]}"))
    elif connection.dialect.name == "postgresql":
        for signature, body in POSTGRESQL_FUNCTIONS.items():
            connection.execute(text(f"CREATE OR REPLACE FUNCTION {signature} {body}"))
        for name, definition in POSTGRESQL_TRIGGERS.items():
            connection.execute(text(f"DROP TRIGGER IF EXISTS {name} ON {POSTGRESQL_TRIGGER_TABLES[name]}"))
            connection.execute(text(f"CREATE TRIGGER {name} {definition}"))
        connection.execute(text("DELETE FROM catalogue_count_deltas"))
    else:
        return
    for statement in _RECOUNT:
        connection.execute(text(statement))


def drop_functions(connection: Connection) -> None:
    """Drop PostgreSQL's counting functions (the triggers went with their tables)."""
    if connection.dialect.name == "postgresql":
        for signature in reversed(POSTGRESQL_FUNCTIONS):
            connection.execute(text(f"DROP FUNCTION IF EXISTS {signature}"))
