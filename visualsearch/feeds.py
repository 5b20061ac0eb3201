"""Shop feeds as catalogue manifests: Google Merchant Center (TSV, XML) and Shopify's product CSV.

Each reader streams the export and yields ``(line, row)`` pairs shaped like a manifest
row (``sku``, ``image``, ``title``, ``category``, ``brand``, ``price``, ``url``, other
keys as attributes), so :mod:`visualsearch.catalogue_manifest` validates, merges and
chunks them exactly as it does its own CSV and JSON Lines rows.

One row per *product*, not per variant: a search answers one result per product, and
the variants of a shirt (sizes, colours) would otherwise fill the results with the
same photo. Consecutive rows of one product (a Merchant ``item_group_id``, a Shopify
``Handle``) become one row, named by the product's first line; only one product is
held at a time, so memory stays flat in the feed's length.

XML is parsed with expat directly (streaming, with line numbers) and any DOCTYPE is
refused: feeds never need one, and refusing it rules out entity-expansion attacks
without a dependency.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from xml.parsers import expat

from .errors import ManifestError

FORMATS = ("csv", "tsv", "jsonl", "merchant-tsv", "merchant-xml", "shopify-csv")
FEED_FORMATS = ("merchant-tsv", "merchant-xml", "shopify-csv")
DESCRIPTIONS = {
    "csv": "a CSV manifest (sku,image,...)",
    "tsv": "a tab-separated manifest (sku, image, ...)",
    "jsonl": "a JSON Lines manifest",
    "merchant-tsv": "a Google Merchant Center TSV feed (id, image_link, ...)",
    "merchant-xml": "a Google Merchant Center XML feed (RSS 2.0 or Atom)",
    "shopify-csv": "a Shopify product CSV export (Handle, Title, ...)",
}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SNIFFED_SUFFIXES = (".csv", ".tsv", ".txt", ".xml", ".rss", ".atom")
SNIFF_BYTES = 64 * 1024
XML_BLOCK_BYTES = 64 * 1024

GOOGLE_NS = "http://base.google.com/ns/1.0"
ATOM_NS = "http://www.w3.org/2005/Atom"
# The RSS/Atom elements of an item that Merchant Center reads when no g: element says it.
CORE_XML_FIELDS = ("title", "link", "description")

# Merchant fields with a place of their own in a record; the rest become attributes.
# `description` is dropped: search does not use it and it is most of a feed's bytes.
MERCHANT_MAPPED = ("id", "item_group_id", "title", "link", "image_link", "additional_image_link", "price",
                   "brand", "description")
# Merchant fields a shop sends to Google but would not publish (product attributes are
# public in the API and in every search hit): costs, margin labels, ads plumbing.
MERCHANT_PRIVATE = ("cost_of_goods_sold", "sell_on_google_quantity", "ads_redirect", "ads_labels",
                    "ads_grouping", "promotion_id", "excluded_destination", "included_destination",
                    "shopping_ads_excluded_country", "pause")
MERCHANT_PRIVATE_PREFIXES = ("custom_label_",)
# Shopify products that are not on the shop: left out of the catalogue (and so pruned).
SHOPIFY_HIDDEN_STATUSES = ("draft", "archived")
# Shopify columns kept as attributes, by name. An allow-list, because the export also
# holds what a shop does not publish (Cost per item, inventory) and product attributes
# are public in the API.
SHOPIFY_ATTRIBUTES = {
    "Product Category": "product_category",
    "Published": "published",
    "Status": "status",
    "Gift Card": "gift_card",
    "Google Shopping / Google Product Category": "google_product_category",
    "Google Shopping / Gender": "gender",
    "Google Shopping / Age Group": "age_group",
    "Google Shopping / MPN": "mpn",
    "Google Shopping / Condition": "condition",
}
SHOPIFY_VARIANT_ATTRIBUTES = {"Variant SKU": "variant_sku", "Variant Barcode": "barcode"}
SHOPIFY_OPTIONS = 3
# What Shopify writes for a product without variants: not an option worth keeping.
SHOPIFY_NO_OPTION = ("Title", "Default Title")

_PRICE = re.compile(r"^(?:([A-Za-z]{3})\s*)?(\d+(?:\.\d+)?)\s*([A-Za-z]{3})?$")

Row = dict[str, Any]
Fields = dict[str, list[Any]]  # a Merchant item: field name -> its values, in order


# --- which format -------------------------------------------------------------------------


def resolve_format(path: Path, format: str | None = None) -> str:
    """The format to read ``path`` as: ``format`` if given and plausible, else detected.

    Detection looks at the first line (the header) or the root element only: ``.jsonl``,
    ``.ndjson`` and ``.json`` are JSON Lines; ``.csv``, ``.tsv``, ``.txt``, ``.xml``,
    ``.rss`` and ``.atom`` are told apart by their start.

    Args:
        path: an existing file.
        format: one of :data:`FORMATS`, or None to detect it.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        ManifestError: an unknown ``format`` or file suffix, or an explicit ``format``
            that the file's start contradicts (the message shows the start and the
            format to use).
    """
    if format is not None and format not in FORMATS:
        raise ManifestError(f"unknown manifest format {format!r}; use one of {', '.join(FORMATS)}")
    suffix = path.suffix.lower()
    if format is None:
        if suffix in JSONL_SUFFIXES:
            return "jsonl"
        if suffix not in SNIFFED_SUFFIXES:
            raise ManifestError(
                f"{path}: unknown manifest format {suffix!r}; use .csv, .tsv or .jsonl, "
                f"or name the format ({', '.join(FORMATS)})"
            )
    start = _start(path)
    detected = _detect(start)
    if format is None:
        if detected is None and suffix in (".xml", ".rss", ".atom"):
            return "merchant-xml"  # let the XML parser say what is wrong
        return detected or ("tsv" if suffix == ".tsv" else "csv")
    if detected is not None and detected != format:
        shown = " ".join(start.split())[:120]
        raise ManifestError(
            f"{path}: asked to read it as {format!r} ({DESCRIPTIONS[format]}), but it starts with "
            f"{shown!r}, which looks like {DESCRIPTIONS[detected]}: use the format {detected!r}, "
            "or leave the format out to detect it"
        )
    return format


def _start(path: Path) -> str:
    """The file's first line (at most :data:`SNIFF_BYTES`), or its first bytes if it is XML."""
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"<"):
        # Not decoded: an XML feed may declare another encoding; only its start is shown.
        return head[:200].decode("ascii", errors="replace")
    # Replaced, not refused: a cut character at SNIFF_BYTES is no reason to fail, and
    # the reader reports a file that is not UTF-8 with its line.
    return head.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")


def _detect(start: str) -> str | None:
    """The format the start of a file shows, or None when it is not recognised."""
    if start.startswith("<"):
        return "merchant-xml"
    if start.startswith("{"):
        return "jsonl"
    delimiter = "\t" if "\t" in start else ","
    names = next(csv.reader([start], delimiter=delimiter), [])
    plain = {name.strip() for name in names}
    if {"sku", "image"} <= plain:
        return "tsv" if delimiter == "\t" else "csv"
    if delimiter == "," and "Handle" in plain:
        return "shopify-csv"
    if delimiter == "\t" and {"id", "image_link"} <= {_merchant_name(name) for name in names}:
        return "merchant-tsv"
    return None


def read_feed(path: Path, format: str) -> Iterator[tuple[int, Row]]:
    """Stream a shop feed as ``(line, manifest row)`` pairs, one per product.

    Args:
        path: the feed.
        format: one of :data:`FEED_FORMATS`.

    Raises:
        ManifestError: a missing required column, a line with more fields than the
            header, XML that is not well-formed, has a DOCTYPE or is not a feed.
        UnicodeDecodeError, csv.Error: a text feed that is not UTF-8 CSV/TSV.
    """
    if format == "shopify-csv":
        products = _runs(_shopify_rows(path), key=lambda row: _cell(row, "Handle"))
        return ((run[0][0], product) for run in products if _on_the_shop(product := _shopify_product(run)))
    items = _merchant_tsv_items(path) if format == "merchant-tsv" else _merchant_xml_items(path)
    groups = _runs(items, key=lambda fields: _first(fields, "item_group_id"))
    return ((run[0][0], _merchant_product(run)) for run in groups)


def _runs(pairs: Iterable[tuple[int, Any]], key: Callable[[Any], str | None]) -> Iterator[list[tuple[int, Any]]]:
    """Consecutive pairs whose item has the same non-empty key, as lists (no key: alone)."""
    run: list[tuple[int, Any]] = []
    run_key = None
    for line, item in pairs:
        item_key = key(item)
        if run and (item_key is None or item_key != run_key):
            yield run
            run = []
        run.append((line, item))
        run_key = item_key
    if run:
        yield run


# --- Google Merchant Center ---------------------------------------------------------------


def _merchant_name(name: str) -> str:
    """A Merchant attribute name as the mapping knows it: "g:image link" -> "image_link"."""
    name = name.strip().lower()
    return name.removeprefix("g:").replace(" ", "_")


def _merchant_tsv_items(path: Path) -> Iterator[tuple[int, Fields]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = [_merchant_name(name) for name in next(reader, [])]
        _require_columns(path, header, ("id", "image_link"), "merchant-tsv")
        for values in reader:
            if len(values) > len(header):
                raise ManifestError(f"{path}: line {reader.line_num} has more fields than the header")
            fields: Fields = {}
            for name, value in zip(header, values):
                value = value.strip()
                if name and value:
                    # The TSV form of a repeated attribute: comma-separated image URLs.
                    fields[name] = _split(value, ",") if name == "additional_image_link" else [value]
            if fields:
                yield reader.line_num, fields


def _merchant_product(run: list[tuple[int, Fields]]) -> Row:
    """One manifest row for the items of one product (its variants, when grouped).

    The product takes its sku from ``item_group_id`` (else ``id``), title, link,
    brand, price and category from its first item that has them, the images of all
    items, and every other field as an attribute: one value as is, several distinct
    values (colours, sizes of the variants) as a list.
    """
    items = [fields for _, fields in run]
    group = _first(items[0], "item_group_id")
    price, currency = _split_price(_first_of(items, "price"))
    product_type = _first_of(items, "product_type")
    google_category = _first_of(items, "google_product_category")
    if product_type is None and google_category is not None and not google_category.isdigit():
        product_type = google_category
    attributes: Row = {}
    for name in dict.fromkeys(name for fields in items for name in fields):
        if name not in MERCHANT_MAPPED and not _is_private_merchant_field(name):
            attributes[name] = _collected(value for fields in items for value in fields.get(name, ()))
    if currency is not None:
        attributes["currency"] = currency
    if group is not None:
        attributes["variant_id"] = _collected(value for fields in items for value in fields.get("id", ()))
    images = [value for fields in items for name in ("image_link", "additional_image_link")
              for value in fields.get(name, ()) if isinstance(value, str)]
    return {
        **attributes,
        "sku": group or _first(items[0], "id"),
        "image": list(dict.fromkeys(images)),
        "title": _first_of(items, "title"),
        "category": _last_segment(product_type),
        "brand": _first_of(items, "brand"),
        "price": price,
        "url": _first_of(items, "link"),
    }


def _is_private_merchant_field(name: str) -> bool:
    return name in MERCHANT_PRIVATE or name.startswith(MERCHANT_PRIVATE_PREFIXES)


def _split_price(text: str | None) -> tuple[str | None, str | None]:
    """("12.00", "USD") for "12.00 USD" (or "USD 12.00"); the text unchanged if it is not one.

    A text that is not a price is passed on as it is, so that the manifest's row check
    reports it with its line.
    """
    if text is None:
        return None, None
    match = _PRICE.match(text.strip())
    if match is None or (match[1] and match[3]):
        return text, None
    code = match[1] or match[3]
    return match[2], code.upper() if code else None


def _first(fields: Fields, name: str) -> str | None:
    for value in fields.get(name, ()):
        if isinstance(value, str) and value:
            return value
    return None


def _first_of(items: list[Fields], name: str) -> str | None:
    for fields in items:
        value = _first(fields, name)
        if value is not None:
            return value
    return None


def _collected(values: Iterable[Any]) -> Any:
    """Distinct values in order: one as is, several as a list (each a filter value)."""
    distinct: list[Any] = []
    for value in values:
        if value not in distinct:
            distinct.append(value)
    return distinct[0] if len(distinct) == 1 else distinct


def _last_segment(path: str | None) -> str | None:
    """The most specific level of a "Apparel > Shoes > Sneakers" path."""
    if path is None:
        return None
    return path.rsplit(">", 1)[-1].strip() or None


def _split(text: str, separator: str) -> list[str]:
    return [part.strip() for part in text.split(separator) if part.strip()]


class _MerchantXml:
    """Expat callbacks collecting the direct children of each ``<item>``/``<entry>``.

    A field with child elements (``g:shipping``) becomes a dict of their texts; a
    repeated field (``g:additional_image_link``) a list of values in order.
    """

    def __init__(self, path: Path):
        self.path = path
        self.parser = parser = expat.ParserCreate(namespace_separator=" ")
        parser.buffer_text = True
        parser.StartDoctypeDeclHandler = self._refuse_doctype
        parser.EntityDeclHandler = self._refuse_doctype
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._characters
        self.done: list[tuple[int, Fields]] = []
        self.depth = 0
        self.item_depth = 0  # the depth of the open item; 0: none open
        self.line = 0
        self.google: Fields = {}
        self.core: Fields = {}
        self.field: str | None = None  # the open field's name; None: one not kept
        self.text: list[str] = []
        self.children: dict[str, str] = {}
        self.child_text: list[str] = []

    def _refuse_doctype(self, *_args: Any) -> None:
        raise ManifestError(
            f"{self.path}: line {self.parser.CurrentLineNumber}: a DOCTYPE or entity declaration is not "
            "allowed in a feed (Merchant Center feeds have none; they can hide entity-expansion bombs)"
        )

    def _start(self, name: str, attributes: dict[str, str]) -> None:
        self.depth += 1
        namespace, _, local = name.rpartition(" ")
        if self.depth == 1 and local not in ("rss", "feed"):
            raise ManifestError(
                f"{self.path}: the root element <{local}> is not a Merchant Center feed (<rss> or Atom <feed>)"
            )
        if not self.item_depth:
            if local in ("item", "entry") and namespace in ("", ATOM_NS):
                self.item_depth, self.line = self.depth, self.parser.CurrentLineNumber
                self.google, self.core = {}, {}
            return
        level = self.depth - self.item_depth
        if level == 1:
            kept = namespace == GOOGLE_NS or (namespace in ("", ATOM_NS) and local in CORE_XML_FIELDS)
            self.field = local if kept else None
            self.text, self.children = [], {}
            if local == "link" and attributes.get("href"):
                self.text.append(attributes["href"])  # Atom: <link href="..."/>
        elif level == 2:
            self.child_text = []

    def _characters(self, data: str) -> None:
        level = self.depth - self.item_depth
        if self.item_depth and level == 1:
            self.text.append(data)
        elif self.item_depth and level == 2:
            self.child_text.append(data)

    def _end(self, name: str) -> None:
        level = self.depth - self.item_depth
        self.depth -= 1
        if not self.item_depth or level > 2:
            return
        if level == 2:
            self.children.setdefault(name.rpartition(" ")[2], _one_line(self.child_text))
        elif level == 1 and self.field is not None:
            value: Any = {k: v for k, v in self.children.items() if v} or _one_line(self.text)
            if value:
                fields = self.google if name.startswith(GOOGLE_NS + " ") else self.core
                fields.setdefault(self.field, []).append(value)
        elif level == 0:
            self.done.append((self.line, {**self.core, **self.google}))  # g: fields win
            self.item_depth = 0


def _one_line(parts: list[str]) -> str:
    """An element's text with its whitespace runs (an indented, wrapped value) as one space."""
    return " ".join("".join(parts).split())


def _merchant_xml_items(path: Path) -> Iterator[tuple[int, Fields]]:
    reader = _MerchantXml(path)
    with open(path, "rb") as handle:
        while True:
            block = handle.read(XML_BLOCK_BYTES)
            try:
                reader.parser.Parse(block, not block)
            except expat.ExpatError as exc:
                raise ManifestError(
                    f"{path}: line {exc.lineno}: not well-formed XML ({expat.ErrorString(exc.code)})"
                ) from None
            yield from reader.done
            reader.done.clear()
            if not block:
                return


# --- Shopify ------------------------------------------------------------------------------


def _shopify_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        _require_columns(path, header, ("Handle",), "shopify-csv")
        for values in reader:
            if len(values) > len(header):
                raise ManifestError(f"{path}: line {reader.line_num} has more fields than the header")
            if "".join(values).strip():
                yield reader.line_num, dict(zip(header, values))


def _cell(row: dict[str, str], column: str) -> str | None:
    value = row.get(column)
    return (value.strip() or None) if value is not None else None


def _shopify_product(run: list[tuple[int, dict[str, str]]]) -> Row:
    """One manifest row for the rows of one Handle (the product, its variants, its images).

    The first row carries the product's fields; variant rows add option values, SKUs
    and barcodes (collected as attributes); every row may add an image. The price is
    the first variant's, images follow ``Image Position`` then the variants' images.
    """
    rows = [row for _, row in run]

    def first(column: str) -> str | None:
        return next((value for row in rows if (value := _cell(row, column)) is not None), None)

    attributes: Row = {name: first(column) for column, name in SHOPIFY_ATTRIBUTES.items()}
    if (tags := first("Tags")) is not None:
        attributes["tags"] = _split(tags, ",")
    collected: dict[str, list[str]] = {}
    option_names: dict[int, str] = {}  # written on the product's first row only
    images: list[tuple[float, int, str]] = []
    for order, row in enumerate(rows):
        for number in range(1, SHOPIFY_OPTIONS + 1):
            if number not in option_names and (written := _cell(row, f"Option{number} Name")) is not None:
                option_names[number] = written
            name, value = option_names.get(number), _cell(row, f"Option{number} Value")
            if name and value and (name, value) != SHOPIFY_NO_OPTION:
                collected.setdefault(name.lower(), []).append(value)
        for column, name in SHOPIFY_VARIANT_ATTRIBUTES.items():
            if (value := _cell(row, column)) is not None:
                collected.setdefault(name, []).append(value)
        if (source := _cell(row, "Image Src")) is not None:
            images.append((_position(_cell(row, "Image Position")), order, source))
    attributes.update((name, _collected(values)) for name, values in collected.items())
    attributes["compare_at_price"] = first("Variant Compare At Price")
    ordered = [source for _, _, source in sorted(images)]
    ordered += [value for row in rows if (value := _cell(row, "Variant Image")) is not None]
    return {
        **{name: value for name, value in attributes.items() if value is not None},
        "sku": _cell(rows[0], "Handle"),
        "image": list(dict.fromkeys(ordered)),
        "title": first("Title"),
        "category": first("Type") or _last_segment(attributes["product_category"]),
        "brand": first("Vendor"),
        "price": first("Variant Price"),
        "url": None,
    }


def _on_the_shop(product: Row) -> bool:
    """Whether a Shopify product is published: not a draft or archived, not unpublished."""
    status = str(product.get("status") or "").strip().lower()
    published = str(product.get("published") or "").strip().lower()
    return status not in SHOPIFY_HIDDEN_STATUSES and published != "false"


def _position(text: str | None) -> float:
    """An image's ``Image Position``; images without a (numeric) one come last, in row order."""
    try:
        position = float(text) if text is not None else math.inf
    except ValueError:
        return math.inf
    return position if math.isfinite(position) else math.inf


def _require_columns(path: Path, header: list[str], required: tuple[str, ...], format: str) -> None:
    """Raises: ManifestError naming the required columns of ``format`` missing from ``header``."""
    missing = [name for name in required if name not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {', '.join(missing)} of {DESCRIPTIONS[format]}; "
            f"found {', '.join(name for name in header if name) or 'none'}"
        )
