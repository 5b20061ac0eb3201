"""What one product may hold: its columns' lengths, no NUL characters, image paths of a bounded size.

PostgreSQL refuses what SQLite silently stores: a 300-character sku in a VARCHAR(255)
column, a NUL character in any text, an index entry above ~2,700 bytes. Input is
checked against these limits where it is validated (each manifest row, each API
write), so that both databases refuse the same input with the same message before
anything is written.
"""

from __future__ import annotations

from typing import Any, Iterable

from .models import Product

# Lengths (in characters) of the product's length-limited text columns, read from the models.
FIELD_LENGTHS: dict[str, int] = {
    column.name: column.type.length for column in Product.__table__.columns
    if getattr(column.type, "length", None) is not None
}
# An image path or URL, in UTF-8 bytes: PostgreSQL's unique (product_id, path) btree
# index holds entries up to ~2,700 bytes; 2,048 is longer than any sane URL or path.
MAX_IMAGE_PATH_BYTES = 2048
_NUL = "\x00"
_SHOWN = 40  # characters of a refused value quoted in a message


def check_product_fields(*, sku: str, title: str | None = None, category: str | None = None,
                         brand: str | None = None, url: str | None = None,
                         attributes: dict[str, Any] | None = None, images: Iterable[str] = ()) -> None:
    """Refuse values the catalogue cannot store on every database it runs on.

    Args:
        sku, title, category, brand, url: the product's text fields (None: not given).
        attributes: attribute names and JSON values (nested lists and objects are checked too).
        images: image paths or URLs as they will be stored (absolute paths).

    Raises:
        ValueError: naming the field, the product and the limit: a text longer than its
            column (:data:`FIELD_LENGTHS`), a NUL character anywhere, or an image path
            longer than :data:`MAX_IMAGE_PATH_BYTES`.
    """
    fields = {"sku": sku, "title": title, "category": category, "brand": brand, "url": url}
    for name, value in fields.items():
        if value is None:
            continue
        if _NUL in value:
            raise ValueError(_nul_message(name, sku))
        limit = FIELD_LENGTHS.get(name)
        if limit is not None and len(value) > limit:
            of_product = "" if name == "sku" else f" of product {_shown(sku)}"
            raise ValueError(f"{name} {_shown(value)}{of_product} is {len(value):,} characters long; "
                             f"the catalogue holds at most {limit:,}")
    for name, value in (attributes or {}).items():
        if _NUL in name:
            raise ValueError(_nul_message("an attribute name", sku))
        if _holds_nul(value):
            raise ValueError(_nul_message(f"attribute {_shown(name)}", sku))
    for image in images:
        check_image_path(image, sku=sku)


def check_image_path(image: str, *, sku: str) -> None:
    """Raises: ValueError for an image path or URL with a NUL or above :data:`MAX_IMAGE_PATH_BYTES`."""
    if _NUL in image:
        raise ValueError(_nul_message("an image path", sku))
    size = len(image.encode("utf-8", "surrogateescape"))
    if size > MAX_IMAGE_PATH_BYTES:
        raise ValueError(f"image {_shown(image)} of product {_shown(sku)} is {size:,} bytes long; "
                         f"image paths and URLs may have at most {MAX_IMAGE_PATH_BYTES:,}")


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return _NUL in value
    if isinstance(value, dict):
        return any(_NUL in str(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "...")


def _nul_message(what: str, sku: str) -> str:
    if what == "sku":
        return f"sku {_shown(sku)} contains a NUL character (\\x00), which the catalogue cannot store"
    return f"{what} of product {_shown(sku)} contains a NUL character (\\x00), which the catalogue cannot store"
