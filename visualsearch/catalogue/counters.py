"""Counters of products and images, kept current by database triggers.

``/api/v1/health`` and ``visualsearch stats`` read them instead of counting a
million rows (a GROUP BY over the images took 151 ms at 1M). SQLite maintains them
with the triggers below; on a database without them (another dialect, until its
migrations add equivalents) the counts are computed with plain queries.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .models import CatalogueCount, ImageStatus, Product, ProductImage

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


def install_sqlite_triggers(connection: Connection) -> None:
    """Create the counting triggers (idempotent); count from scratch when they are new."""
    existing = set(connection.scalars(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")))
    missing = [name for name in SQLITE_TRIGGERS if name not in existing]
    if not missing:
        return
    for name in missing:
        connection.execute(text(f"CREATE TRIGGER IF NOT EXISTS {name} {SQLITE_TRIGGERS[name]}"))
    recount(connection)


def recount(connection: Connection) -> None:
    """Recompute every counter from the rows (used when the triggers are installed)."""
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
    if session.get_bind().dialect.name == "sqlite":
        return {row.key: int(row.value) for row in session.scalars(select(CatalogueCount))}
    counts = {"products": session.scalar(select(func.count()).select_from(Product)) or 0}
    for status, count in session.execute(select(ProductImage.status, func.count()).group_by(ProductImage.status)):
        counts[f"images:{ImageStatus(status).value}"] = count
    for category, count in session.execute(
        select(func.coalesce(Product.category, ""), func.count()).join(ProductImage)
        .where(ProductImage.status == ImageStatus.INDEXED).group_by(func.coalesce(Product.category, ""))
    ):
        counts[f"category:{category}"] = count
    return counts
