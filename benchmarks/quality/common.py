"""The on-disk format every quality benchmark writes: catalogue.csv, queries.csv, CREDITS.md and images."""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

CATALOGUE_FILE = "catalogue.csv"
QUERIES_FILE = "queries.csv"
CREDITS_FILE = "CREDITS.md"
CATALOGUE_COLUMNS = ("sku", "image", "title", "category")
QUERY_COLUMNS = ("image", "expected_sku", "expected_category", "exclude_image")
SKU_SEPARATOR = "|"
# What a builder writes and so may remove before writing again; ``data/`` (the eval's
# data directory) is left alone: deterministic builds give it the same images again.
GENERATED = (CATALOGUE_FILE, QUERIES_FILE, CREDITS_FILE, "images", "queries")


class BenchmarkSourceError(Exception):
    """A builder's input (a dataset file, an icon theme, a tool) is missing or unreadable."""


@dataclass(frozen=True)
class CatalogueRow:
    """One catalogue image; rows sharing a SKU are the views of one product."""

    sku: str
    image: str  # relative to the benchmark folder, with "/" separators
    title: str = ""
    category: str = ""


@dataclass(frozen=True)
class QueryRow:
    """One query image and what counts as a correct answer for it."""

    image: str  # relative to the benchmark folder
    expected_skus: tuple[str, ...] = ()  # any of them is relevant; empty: judged by category only
    expected_category: str = ""
    exclude_image: str = ""  # a catalogue image that is the query itself, not a match


@dataclass
class BuildResult:
    """What a builder wrote into ``folder``."""

    name: str
    folder: Path
    catalogue: list[CatalogueRow] = field(default_factory=list)
    queries: list[QueryRow] = field(default_factory=list)

    @property
    def products(self) -> int:
        return len({row.sku for row in self.catalogue})


def prepare_folder(out: str | Path, name: str) -> Path:
    """``out/name``, created, with whatever an earlier build of it wrote removed."""
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    for entry in GENERATED:
        path = folder / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return folder


def write_benchmark(result: BuildResult, credits: str) -> BuildResult:
    """Write ``catalogue.csv``, ``queries.csv`` and ``CREDITS.md`` of a built benchmark.

    Raises:
        ValueError: a query expects a SKU, or excludes an image, that the catalogue lacks;
            or a row names an image file that was not written.
    """
    _check(result)
    folder = result.folder
    with open(folder / CATALOGUE_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CATALOGUE_COLUMNS)
        writer.writerows((row.sku, row.image, row.title, row.category) for row in result.catalogue)
    with open(folder / QUERIES_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(QUERY_COLUMNS)
        writer.writerows((row.image, SKU_SEPARATOR.join(row.expected_skus), row.expected_category, row.exclude_image)
                         for row in result.queries)
    (folder / CREDITS_FILE).write_text(credits.strip() + "\n", encoding="utf-8")
    return result


def _check(result: BuildResult) -> None:
    skus = {row.sku for row in result.catalogue}
    images = {row.image for row in result.catalogue}
    for row in result.catalogue + result.queries:
        if not (result.folder / row.image).is_file():
            raise ValueError(f"{result.name}: {row.image} was not written")
    for query in result.queries:
        missing = [sku for sku in query.expected_skus if sku not in skus]
        if missing:
            raise ValueError(f"{result.name}: query {query.image} expects {missing}, not in the catalogue")
        if query.exclude_image and query.exclude_image not in images:
            raise ValueError(f"{result.name}: query {query.image} excludes {query.exclude_image}, not in the catalogue")


def save_image(image: Image.Image, folder: Path, relative: str, *, quality: int | None = None) -> str:
    """Save ``image`` at ``folder/relative`` (PNG, or JPEG when ``quality`` is given); returns ``relative``.

    Pillow writes the same bytes for the same pixels, which keeps builds reproducible.
    """
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if quality is None:
        image.save(path, format="PNG")
    else:
        image.convert("RGB").save(path, format="JPEG", quality=quality)
    return relative


def save_bytes(data: bytes, folder: Path, relative: str) -> str:
    """Write encoded image bytes at ``folder/relative``; returns ``relative``."""
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return relative


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a label ("T-shirt/top" -> "t-shirt-top")."""
    cleaned = "".join(char if char.isalnum() else "-" for char in text.lower())
    return "-".join(part for part in cleaned.split("-") if part)
