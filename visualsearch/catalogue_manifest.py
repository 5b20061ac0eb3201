"""Read a catalogue manifest (CSV or JSON Lines) into one record per product.

The whole file is validated before anything is written: a missing column or a row
without a SKU is a :class:`ManifestError` naming the lines, and the catalogue is left
untouched. Bad *images* are not checked here; the indexer records them one by one.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import ManifestError

REQUIRED_COLUMNS = ("sku", "image")
KNOWN_COLUMNS = ("sku", "image", "title", "category", "brand", "price", "url")
IMAGE_SEPARATOR = "|"
MAX_REPORTED_PROBLEMS = 10


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
    images: list[Path] = field(default_factory=list)
    line: int = 0  # first line of the manifest that names this SKU


def read_manifest(path: str | Path) -> list[ProductRecord]:
    """Parse and validate the manifest at ``path``.

    Returns:
        Products in order of first appearance; each image path is absolute (relative
        paths are resolved against the manifest's folder) and listed once.

    Raises:
        ManifestError: unreadable file, unknown format, missing required column, or
            rows with an empty ``sku``/``image`` or a non-numeric ``price``.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    rows = list(_read_rows(path))
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    base = path.parent.resolve()
    products: dict[str, ProductRecord] = {}
    problems: list[str] = []
    for line, row in rows:
        try:
            _merge_row(products, row, line, base)
        except ValueError as exc:
            problems.append(f"line {line}: {exc}")
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise ManifestError(
            f"{path}: {len(problems)} bad row(s), nothing was indexed:\n  " + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    return list(products.values())


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            yield from _read_jsonl(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            yield from _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
        else:
            raise ManifestError(f"{path}: unknown manifest format {suffix!r}; use .csv or .jsonl")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise ManifestError(f"{path} is not a valid CSV file: {exc}") from None


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = [name.strip() for name in (reader.fieldnames or [])]
        _check_columns(path, header)
        reader.fieldnames = header
        for row in reader:
            if None in row:
                raise ManifestError(f"{path}: line {reader.line_num} has more fields than the header")
            if not any((value or "").strip() for value in row.values()):
                continue  # blank line
            yield reader.line_num, row


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    checked = False
    with open(path, encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                raise ManifestError(f"{path}: line {number} is not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}: line {number} is not a JSON object")
            if not checked:
                _check_columns(path, list(row))
                checked = True
            yield number, row


def _check_columns(path: Path, header: list[str]) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}. "
            "A manifest needs 'sku' and 'image' (optional: title, category, brand, price, url)."
        )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _merge_row(products: dict[str, ProductRecord], row: dict[str, Any], line: int, base: Path) -> None:
    sku = _text(row.get("sku"))
    if not sku:
        raise ValueError("empty sku")
    images = row.get("image")
    if isinstance(images, dict) or (isinstance(images, list) and not all(isinstance(p, str) for p in images)):
        raise ValueError(f"image of {sku!r} must be a path, a '|'-separated string or a list of paths")
    if isinstance(images, list):
        paths = [_text(p) for p in images]
    else:
        paths = [_text(p) for p in str(images or "").split(IMAGE_SEPARATOR)]
    paths = [p for p in paths if p]
    if not paths:
        raise ValueError(f"product {sku!r} has an empty image")
    try:
        price_value = parse_price(row.get("price"))
    except ValueError as exc:
        raise ValueError(f"{exc} (product {sku!r})") from None

    record = products.get(sku)
    if record is None:
        record = products[sku] = ProductRecord(sku=sku, line=line)
    # Later rows fill in or override fields; empty cells never erase what an earlier row said.
    for name in ("title", "category", "brand", "url"):
        value = _text(row.get(name))
        if value is not None:
            setattr(record, name, value)
    if price_value is not None:
        record.price = price_value
    for name, value in row.items():
        if name in KNOWN_COLUMNS or not name:
            continue
        if isinstance(value, str):
            value = _text(value)
        if value not in (None, [], {}):
            record.attributes[name] = value
    for text in paths:
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


def _resolve_image(text: str, base: Path) -> Path:
    if text.startswith(("http://", "https://")):
        raise ValueError(
            f"image {text!r} is a URL; only local files are supported (download the images first)"
        )
    path = Path(text).expanduser()
    # normpath: "a.jpg" and "sub/../a.jpg" are the same image, listed once.
    return Path(os.path.normpath(path if path.is_absolute() else base / path))
