"""Read a catalogue manifest (CSV, TSV, JSON Lines or a shop feed) in two streaming passes.

The whole file is validated before anything is written: a missing column or a row
without a SKU is a :class:`ManifestError` naming the lines, and the catalogue is left
untouched. Bad *images* are not checked here; the indexer records them one by one.

Catalogues have millions of rows, so nothing here holds the whole file:

1. :func:`validate_manifest` reads every row and runs every per-row check, keeping
   only counters and the first few problems.
2. :func:`iter_manifest_records` then reads the file again and yields products in
   chunks of consecutive rows.

:func:`read_manifest` is the old all-in-memory convenience for small manifests.
Shop feeds (Google Merchant Center, Shopify) are read by :mod:`visualsearch.feeds`
into the same rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple
from urllib.parse import urlsplit

from . import feeds
from .catalogue.limits import FIELD_LENGTHS, MAX_IMAGE_PATH_BYTES, check_image_path, check_product_fields
from .errors import ManifestError, VisualSearchError

REQUIRED_COLUMNS = ("sku", "image")
KNOWN_COLUMNS = ("sku", "image", "title", "category", "brand", "price", "url")
IMAGE_SEPARATOR = "|"
MAX_REPORTED_PROBLEMS = 10
DEFAULT_CHUNK_ROWS = 2000
IMAGE_URL_SCHEMES = ("http", "https")
# "scheme:" of two letters or more ("C:" is a Windows drive): a URL, not a path.
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
# A row whose cells are all texts this short, without NUL, fits the catalogue's columns.
_SURELY_FITS = min(FIELD_LENGTHS.values())


def is_image_url(value: str) -> bool:
    """Whether a manifest's image cell is an http(s) URL with a host (to be fetched).

    Args:
        value: the image cell's text, e.g. ``"https://cdn.example.com/a.jpg"``.

    Returns:
        True for ``http://`` and ``https://`` URLs naming a host; False for paths and
        for every other scheme (``ftp:``, ``file:``, ``data:``...).
    """
    if ":" not in value:
        return False  # a path: the usual case, decided without parsing
    try:
        parts = urlsplit(value.strip())
        return parts.scheme.lower() in IMAGE_URL_SCHEMES and bool(parts.hostname)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return False


@dataclass
class ProductRecord:
    """One product as the manifest describes it (rows with the same SKU merged)."""

    sku: str
    title: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    url: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    images: list[Path | str] = field(default_factory=list)  # str: an http(s) URL, as written
    line: int = 0  # first line of the manifest that names this SKU
    # How a write treats what the record does not say (a manifest row keeps the defaults:
    # it sets the fields it names, adds its attributes, and clears nothing). ``clear``:
    # fields among title/category/brand/price/url to set to NULL (their value here is
    # None). ``replace_attributes``: ``attributes`` replaces the stored dict ({}: none
    # left) instead of being merged into it, where a None value deletes that attribute.
    clear: frozenset[str] = frozenset()
    replace_attributes: bool = False

    def check(self) -> None:
        """Refuse what the catalogue cannot store (see :mod:`visualsearch.catalogue.limits`).

        Raises:
            ValueError: naming the field and the limit (a text longer than its column, a
                NUL character, an image path or URL that is too long).
        """
        check_product_fields(sku=self.sku, title=self.title, category=self.category, brand=self.brand,
                             url=self.url, attributes=self.attributes, images=[str(image) for image in self.images])


@dataclass(frozen=True)
class ManifestSummary:
    """What :func:`validate_manifest` learnt about a valid manifest.

    Attributes:
        path: the manifest's path, as given.
        rows: data rows read (blank lines are not rows).
        images: image paths named by the rows, duplicates included.
    """

    path: Path
    rows: int
    images: int


class _CheckedRow(NamedTuple):
    """The validated parts of one row that merging needs."""

    sku: str
    images: list[str]  # non-empty, stripped, paths or http(s) URLs; not yet resolved
    price: float | None


# --- pass 1: validation ------------------------------------------------------------------


def validate_manifest(path: str | Path, *, format: str | None = None) -> ManifestSummary:
    """Check every row of the manifest at ``path`` without keeping the rows.

    Memory does not grow with the number of rows: only counters and the first
    :data:`MAX_REPORTED_PROBLEMS` messages are kept (no set of SKUs).

    Args:
        path: a ``.csv``/``.txt``, ``.tsv`` or ``.jsonl``/``.ndjson``/``.json`` file, or
            a shop feed (see :func:`visualsearch.feeds.resolve_format`).
        format: one of :data:`visualsearch.feeds.FORMATS`; None detects it.

    Returns:
        The row and image counts of the valid manifest (a shop feed's rows are its
        products: consecutive rows of one product count once).

    Raises:
        ManifestError: unreadable file, unknown format (or one the file contradicts),
            missing required column, a structurally broken line (bad JSON, too many CSV
            fields, bad XML), no rows, or rows with an empty ``sku``/``image``, an image
            that is neither a path nor an http(s) URL, a bad ``price``, or a value the
            catalogue cannot store (:mod:`visualsearch.catalogue.limits`).
    """
    path = _existing_file(path)
    base = path.parent.resolve()
    rows = images = 0
    problems = RowProblems()
    for line, row in _read_rows(path, format):
        rows += 1
        try:
            images += len(_check_row(row, base).images)
        except ValueError as exc:
            problems.add(f"line {line}: {exc}")
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    problems.raise_if_any(path)
    return ManifestSummary(path=path, rows=rows, images=images)


class RowProblems:
    """The first :data:`MAX_REPORTED_PROBLEMS` bad rows of an input file and how many there
    were: a file is checked whole, then refused with one message, before anything runs.

    Args:
        error: the VisualSearchError subclass to raise.
        outcome: what the refusal means, for the message ("nothing was indexed").
    """

    def __init__(self, error: type[VisualSearchError] = ManifestError,
                 outcome: str = "nothing was indexed") -> None:
        self.error, self.outcome = error, outcome
        self.shown: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.shown) < MAX_REPORTED_PROBLEMS:
            self.shown.append(message)

    def raise_if_any(self, what: str | Path) -> None:
        """Raises: ``error`` listing the problems, if there were any."""
        if not self.count:
            return
        more = self.count - len(self.shown)
        raise self.error(
            f"{what}: {self.count} bad row(s), {self.outcome}:\n  " + "\n  ".join(self.shown)
            + (f"\n  ... and {more} more" if more else "")
        )


# --- pass 2: records in chunks -----------------------------------------------------------


def iter_manifest_records(path: str | Path, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                          format: str | None = None) -> Iterator[list[ProductRecord]]:
    """Yield the manifest's products in chunks of about ``chunk_rows`` consecutive rows.

    Call :func:`validate_manifest` first: this pass assumes a valid file, and on a bad
    row it raises only after the chunks before it were yielded.

    Within a chunk, rows with the same SKU are merged (later rows fill in or override
    fields, images are listed once in order, attributes are merged). A chunk never
    ends inside a run of consecutive rows of one SKU, so the usual layout (a product's
    rows adjacent) gives whole products; such a run can make a chunk longer than
    ``chunk_rows``. Rows of one SKU that are far apart in the file arrive in separate
    chunks, as separate records with the same SKU: apply them additively, in order
    (a later record's non-empty fields override, its images and attributes add up),
    as :func:`read_manifest` does.

    Args:
        path: the manifest (see :func:`validate_manifest`).
        chunk_rows: rows per chunk before the chunk may end; at least 1.
        format: as for :func:`validate_manifest`.

    Yields:
        Non-empty lists of records, in order of first appearance within each chunk;
        image paths are absolute (relative ones resolved against the manifest's
        folder), image URLs are kept as ``str``, and each is listed once per record.

    Raises:
        ValueError: ``chunk_rows`` is less than 1.
        ManifestError: everything :func:`validate_manifest` raises for, except that
            only the first bad row is named.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    path = _existing_file(path)
    # Resolve once: resolving per image would cost a filesystem call each time.
    base = path.parent.resolve()
    chunk: dict[str, ProductRecord] = {}
    rows_in_chunk = 0
    last_sku: str | None = None
    for line, row in _read_rows(path, format):
        checked = _check_row_or_raise(path, line, row, base)
        # Only end a chunk between two different SKUs, so adjacent rows stay together.
        if rows_in_chunk >= chunk_rows and checked.sku != last_sku:
            yield list(chunk.values())
            chunk, rows_in_chunk = {}, 0
        _apply_row(chunk, row, checked, line, base)
        rows_in_chunk += 1
        last_sku = checked.sku
    if last_sku is None:
        raise ManifestError(f"manifest {path} has no rows")
    yield list(chunk.values())


def _check_row_or_raise(path: Path, line: int, row: dict[str, Any], base: Path) -> _CheckedRow:
    """Raises: ManifestError naming the line, for a row validation would have refused."""
    try:
        return _check_row(row, base)
    except ValueError as exc:
        raise ManifestError(
            f"{path}: line {line}: {exc}; nothing after it was read (validate the manifest first)"
        ) from None


# --- the whole manifest in memory --------------------------------------------------------


def read_manifest(path: str | Path, *, format: str | None = None) -> list[ProductRecord]:
    """Validate the manifest at ``path`` and return all its products, merged by SKU.

    This holds the whole manifest in memory: use it for small manifests (tests, API
    uploads). Large catalogues should call :func:`validate_manifest` and then
    :func:`iter_manifest_records`.

    Args:
        path: the manifest (see :func:`validate_manifest`).
        format: as for :func:`validate_manifest`.

    Returns:
        Products in order of first appearance, one per SKU; each image path is
        absolute (relative paths are resolved against the manifest's folder), each
        image URL a ``str``, and each listed once.

    Raises:
        ManifestError: as :func:`validate_manifest`; nothing is returned for a bad file.
    """
    validate_manifest(path, format=format)
    products: dict[str, ProductRecord] = {}
    # The module constant is read here, at call time, so tests can shrink the chunks.
    for chunk in iter_manifest_records(path, chunk_rows=DEFAULT_CHUNK_ROWS, format=format):
        for record in chunk:
            earlier = products.get(record.sku)
            if earlier is None:
                products[record.sku] = record
            else:
                _merge_record(earlier, record)
    return list(products.values())


def _merge_record(into: ProductRecord, later: ProductRecord) -> None:
    """Apply ``later`` (a later chunk's record of the same SKU) as its rows would have been."""
    # A merged record only holds non-empty values, so "non-None overrides" is exactly
    # what replaying its rows one by one would do.
    for name in ("title", "category", "brand", "url", "price"):
        value = getattr(later, name)
        if value is not None:
            setattr(into, name, value)
    into.attributes.update(later.attributes)
    for image in later.images:
        if image not in into.images:
            into.images.append(image)


# --- reading rows ------------------------------------------------------------------------


def _existing_file(path: str | Path) -> Path:
    """Raises: ManifestError if ``path`` is not a file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    return path


def _read_rows(path: Path, format: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream ``(line number, row)`` pairs, one row in memory at a time; blank lines skipped.

    Raises:
        ManifestError: unknown format, not UTF-8, broken CSV/JSON/XML, or a missing column.
    """
    try:
        kind = feeds.resolve_format(path, format)
        if kind == "jsonl":
            yield from _read_jsonl(path)
        elif kind in ("csv", "tsv"):
            yield from _read_csv(path, delimiter="\t" if kind == "tsv" else ",")
        else:
            yield from feeds.read_feed(path, kind)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise ManifestError(f"{path} is not a valid CSV file: {exc}") from None


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV/TSV file keyed by its (stripped) header.

    Short rows simply lack the missing keys (read as empty).

    Raises:
        ManifestError: a missing required column or a row longer than the header.
    """
    with open(path, newline="", encoding="utf-8-sig") as handle:
        # csv.reader and a plain loop, not DictReader or dict(zip(...)): the same rows
        # at a fraction of the per-row cost and allocations, which matters at 10
        # million rows (twice: one per pass).
        reader = csv.reader(handle, delimiter=delimiter)
        header = [name.strip() for name in next(reader, [])]
        _check_columns(path, header)
        for values in reader:
            if len(values) > len(header):
                raise ManifestError(f"{path}: line {reader.line_num} has more fields than the header")
            if not "".join(values).strip():
                continue  # blank line
            row = {}
            for index in range(len(values)):
                row[header[index]] = values[index]
            yield reader.line_num, row


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a JSON Lines file; the first row's keys stand for the header.

    Raises:
        ManifestError: a line that is not a JSON object, or a missing required key.
    """
    checked = False
    for number, row in read_json_lines(path):
        if not checked:
            _check_columns(path, list(row))
            checked = True
        yield number, row


def read_json_lines(path: Path, error: type[VisualSearchError] = ManifestError
                    ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON Lines file.

    Raises:
        ``error``: a line that is not valid JSON, or not a JSON object.
    """
    with open(path, encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                raise error(f"{path}: line {number} is not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise error(f"{path}: line {number} is not a JSON object")
            yield number, row


def _check_columns(path: Path, header: list[str]) -> None:
    """Raises: ManifestError naming the required columns missing from ``header``."""
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}. "
            "A manifest needs 'sku' and 'image' (optional: title, category, brand, price, url); "
            "shop feeds (Google Merchant Center TSV/XML, Shopify product CSV) are detected by their header."
        )


def _text(value: Any) -> str | None:
    """A cell as stripped text; ``None`` for a missing or blank cell."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# --- checking and merging one row --------------------------------------------------------


def _check_row(row: dict[str, Any], base: Path) -> _CheckedRow:
    """Run every per-row check; cheap enough to run on every row of a huge file.

    Args:
        base: the manifest's resolved folder (relative image paths are stored resolved).

    Raises:
        ValueError: with a message naming the problem and, where known, the SKU.
    """
    sku = _text(row.get("sku"))
    if not sku:
        raise ValueError("empty sku")
    images = _image_texts(sku, row.get("image"))
    try:
        price = parse_price(row.get("price"))
    except ValueError as exc:
        raise ValueError(f"{exc} (product {sku!r})") from None
    for text in images:
        _check_image_text(text)
        _check_stored_image(text, base, sku)
    if not _surely_fits(row):  # (the full check costs 3x the quick look, on every row)
        check_product_fields(sku=sku, title=_text(row.get("title")), category=_text(row.get("category")),
                             brand=_text(row.get("brand")), url=_text(row.get("url")),
                             attributes={name: value for name, value in row.items() if name not in KNOWN_COLUMNS})
    return _CheckedRow(sku=sku, images=images, price=price)


def _image_texts(sku: str, images: Any) -> list[str]:
    """The non-empty image paths of a cell: one path, ``a|b`` or (JSON) a list.

    Raises:
        ValueError: the cell is of the wrong type or names no image.
    """
    if isinstance(images, dict) or (isinstance(images, list) and not all(isinstance(p, str) for p in images)):
        raise ValueError(f"image of {sku!r} must be a path, a '|'-separated string or a list of paths")
    if isinstance(images, str) and IMAGE_SEPARATOR not in images:
        text = images.strip()
        paths = [text] if text else []  # one image per cell: the usual case, kept cheap
    else:
        parts = images if isinstance(images, list) else str(images or "").split(IMAGE_SEPARATOR)
        paths = [text for text in map(_text, parts) if text]
    if not paths:
        raise ValueError(f"product {sku!r} has an empty image")
    return paths


def _check_image_text(text: str) -> None:
    """Raises: ValueError for a URL that is not http(s) with a host (ftp:, file:, data:...)."""
    if ":" in text and _URL_SCHEME.match(text) and not is_image_url(text):
        raise ValueError(f"image {text!r} is a URL but not an http(s) one with a host; use a file path or http(s)")


def _surely_fits(row: dict[str, Any]) -> bool:
    for name, value in row.items():
        if value.__class__ is not str or len(value) > _SURELY_FITS or "\x00" in value or "\x00" in name:
            return False
    return True


def _check_stored_image(text: str, base: Path, sku: str) -> None:
    """Raises: ValueError for an image whose stored (resolved) path or URL is too long or holds a NUL."""
    if "\x00" not in text and (len(text) + len(str(base)) + 1) * 4 <= MAX_IMAGE_PATH_BYTES and text[:1] != "~":
        return  # short enough even if every character took 4 bytes: the usual case, without resolving
    check_image_path(text if "\x00" in text else str(_resolve_image(text, base)), sku=sku)


def _apply_row(products: dict[str, ProductRecord], row: dict[str, Any], checked: _CheckedRow,
               line: int, base: Path) -> None:
    """Merge a checked row into ``products`` (keyed by SKU), creating its record if new."""
    record = products.get(checked.sku)
    if record is None:
        record = products[checked.sku] = ProductRecord(sku=checked.sku, line=line)
    # Later rows fill in or override fields; empty cells never erase what an earlier row said.
    for name in ("title", "category", "brand", "url"):
        value = _text(row.get(name))
        if value is not None:
            setattr(record, name, value)
    if checked.price is not None:
        record.price = checked.price
    for name, value in row.items():
        if name in KNOWN_COLUMNS or not name:
            continue
        if isinstance(value, str):
            value = _text(value)
        if value not in (None, [], {}):
            record.attributes[name] = value
    for text in checked.images:
        resolved = _resolve_image(text, base)
        if resolved not in record.images:
            record.images.append(resolved)


def parse_price(value: Any) -> float | None:
    """A price as a finite, non-negative float; ``None`` for an empty value.

    Raises:
        ValueError: with a message naming the bad value.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"price {value!r} is not a number") from None
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"price {value!r} is not a finite, non-negative number")
    return price


def _resolve_image(text: str, base: Path) -> Path | str:
    """An absolute, normalised path for an image path; an http(s) URL unchanged.

    Args:
        text: the path as the manifest gives it; relative to ``base`` unless absolute.
        base: the manifest's resolved folder.
    """
    if is_image_url(text):
        return text  # never a Path: it would collapse the "//" after the scheme
    if text.startswith("~"):
        text = os.path.expanduser(text)
    if ".." not in text:
        # The common case, on the fast path: pathlib already drops "." parts and
        # repeated separators, and joining onto a Path parses only ``text``.
        return base / text
    # normpath: "a.jpg" and "sub/../a.jpg" are the same image, listed once.
    return Path(os.path.normpath(os.path.join(base, text)))
