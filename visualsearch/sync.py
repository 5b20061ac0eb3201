"""Compare a manifest with the catalogue at any size: dry-run plans, pruning, bulk removal.

Neither side is held in memory. The manifest's SKUs and (SKU, image) pairs are
streamed into a temporary SQLite file (:class:`ManifestKeys`), with what an index run
would do to each; the catalogue is then anti-joined against that file one keyset
page of :data:`CATALOGUE_PAGE` rows at a time, and what is to be pruned is written
to the same file and read back in batches. Python holds a page, never the catalogue:
at 10M images the file takes roughly 100-200 bytes per image in the system's
temporary folder (``TMPDIR``).

Pruning makes the manifest the whole truth, so a mistaken export (a truncated file, a
feed that lost a category) could wipe a shop. Hence :class:`PrunePolicy`: a prune
that would remove more than :data:`DEFAULT_MAX_PRUNE` of the catalogue's products or
images is refused unless forced, and a manifest that changed while it was being
indexed is not used for pruning. A manifest with a bad row, or without rows, never
gets that far: :func:`~visualsearch.catalogue_manifest.validate_manifest` refuses it
whole before anything is read or written.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import stat as stat_module
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from .catalogue import ImageStatus, NoCatalogueError, Product, ProductImage, open_catalogue, sqlite_path
from .catalogue import store as catalogue
from .catalogue_manifest import ProductRecord, is_image_url, iter_manifest_records, validate_manifest
from .errors import VisualSearchError

if TYPE_CHECKING:
    from .indexing import IndexingReport
    from .settings import Settings

logger = logging.getLogger(__name__)

# Catalogue rows read per anti-join query, and products or images deleted per commit.
CATALOGUE_PAGE = 5000
PRUNE_BATCH = 5000
# A nightly feed rarely drops more than a few per cent of a shop; a truncated export
# drops far more. Above this share a prune needs --force (or a higher --max-prune).
DEFAULT_MAX_PRUNE = 0.10
MANIFEST_CHUNK_ROWS = 2000
MAX_EXAMPLES = 10
REMOVE_BATCH = 1000
MAX_LISTED_UNKNOWN = 100

# What an index run would do to a product or an image; ordered so that max() merges
# two sightings of one SKU (rows far apart in a manifest) into the bigger change.
UNCHANGED, UPDATE, ADD = 0, 1, 2

_SCHEMA = """
CREATE TABLE products (sku TEXT PRIMARY KEY, action INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE images (sku TEXT NOT NULL, path TEXT NOT NULL, action INTEGER NOT NULL, code TEXT, message TEXT,
                     PRIMARY KEY (sku, path)) WITHOUT ROWID;
CREATE TABLE prune_products (id INTEGER PRIMARY KEY, sku TEXT NOT NULL);
CREATE TABLE prune_images (id INTEGER PRIMARY KEY, product_id INTEGER NOT NULL, path TEXT NOT NULL);
CREATE TEMP TABLE page_products (id INTEGER PRIMARY KEY, sku TEXT NOT NULL);
CREATE TEMP TABLE page_images (id INTEGER PRIMARY KEY, product_id INTEGER NOT NULL, sku TEXT NOT NULL,
                               path TEXT NOT NULL);
"""


class PruneRefusedError(VisualSearchError):
    """A prune would remove too much of the catalogue, or its manifest cannot be trusted."""

    code = "prune_refused"


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneCounts:
    """What a prune would remove, and the catalogue it would remove it from.

    Attributes:
        products: catalogue products the manifest does not name.
        product_images: the images of those products (they go with them).
        images: images of listed products that the manifest no longer names.
        examples: the first few SKUs of ``products``.
    """

    products: int = 0
    product_images: int = 0
    images: int = 0
    catalogue_products: int = 0
    catalogue_images: int = 0
    examples: tuple[str, ...] = ()

    @property
    def all_images(self) -> int:
        return self.product_images + self.images

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "examples": list(self.examples)}


@dataclass(frozen=True)
class PrunePolicy:
    """How much one prune may remove.

    Attributes:
        max_fraction: the largest share of the catalogue's products, and of its images,
            that a prune may remove (0.10: a tenth).
        force: no limit at all.
    """

    max_fraction: float = DEFAULT_MAX_PRUNE
    force: bool = False

    def refusal(self, counts: PruneCounts) -> str | None:
        """Why this policy refuses the prune ``counts`` describe; None when it allows it."""
        if self.force:
            return None
        for name, removed, total in (("products", counts.products, counts.catalogue_products),
                                     ("images", counts.all_images, counts.catalogue_images)):
            if total and removed / total > self.max_fraction:
                return (f"pruning would remove {removed:,} of the catalogue's {total:,} {name} "
                        f"({removed / total:.0%}, more than the {self.max_fraction:.0%} limit); if the manifest "
                        "is complete, raise the limit (--max-prune PERCENT) or pass --force")
        return None

    def check(self, counts: PruneCounts) -> None:
        """Raises: PruneRefusedError when :meth:`refusal` gives a reason."""
        reason = self.refusal(counts)
        if reason:
            raise PruneRefusedError(reason)


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed."""

    products: int = 0
    product_images: int = 0
    images: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class FileProblem:
    """An image of the manifest that an index run could not read."""

    sku: str
    image: str
    code: str
    message: str


@dataclass(frozen=True)
class Changes:
    """How many products or images an index run would add, update and leave alone."""

    total: int = 0
    add: int = 0
    update: int = 0
    unchanged: int = 0


@dataclass(frozen=True)
class SyncPlan:
    """What indexing a manifest would do to the catalogue (nothing was written).

    Attributes:
        rows: the manifest's data rows.
        products: distinct SKUs; ``update`` counts products whose fields would change.
        images: distinct (SKU, image) pairs; ``update`` counts images to embed again
            (a changed file by size and mtime, or one not indexed yet).
        problems: how many of the manifest's images cannot be read (missing or
            unreadable files, malformed URLs); ``problem_examples`` lists the first few.
        prune: what ``--prune`` would remove (None: not asked).
        prune_refused: why the prune policy would refuse that prune (None: allowed).
        examples: the first few SKUs to add and to update.
    """

    manifest: str
    rows: int
    products: Changes
    images: Changes
    problems: int = 0
    problem_examples: tuple[FileProblem, ...] = ()
    prune: PruneCounts | None = None
    prune_refused: str | None = None
    examples: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest, "rows": self.rows,
            "products": asdict(self.products), "images": asdict(self.images),
            "problems": {"count": self.problems, "examples": [asdict(p) for p in self.problem_examples]},
            "prune": None if self.prune is None else {**self.prune.to_dict(), "refused": self.prune_refused},
            "examples": self.examples,
        }


@dataclass
class SyncReport:
    """An index run followed by a prune."""

    index: "IndexingReport"
    pruned: PruneResult

    def to_dict(self) -> dict[str, Any]:
        return {**self.index.to_dict(), "pruned": self.pruned.to_dict()}


# --- the manifest's keys in a temporary file ---------------------------------------------


class ManifestKeys:
    """A manifest's SKUs and (SKU, image) pairs in a temporary SQLite file.

    Use as a context manager (the file is deleted on exit), :meth:`load` a manifest,
    then ask for a :meth:`plan` or the :meth:`find_prunable` rows.

    Args:
        temp_dir: where the temporary file goes (default: the system's, ``TMPDIR``).
    """

    def __init__(self, temp_dir: str | Path | None = None):
        self._folder = tempfile.TemporaryDirectory(prefix="visualsearch-sync-", dir=temp_dir)
        self.db = sqlite3.connect(Path(self._folder.name) / "manifest.sqlite")
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-32768"):
            self.db.execute(f"PRAGMA {pragma}")  # a scratch file: nothing to recover after a crash
        self.db.executescript(_SCHEMA)
        self.manifest: Path | None = None
        self.rows = 0
        self._manifest_stamp: tuple[int, int] | None = None

    def __enter__(self) -> "ManifestKeys":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()
        self._folder.cleanup()

    def load(self, manifest: str | Path, *, sessions: sessionmaker[Session] | None = None,
             classify: bool = False, check_files: bool = False, manifest_format: str | None = None) -> None:
        """Validate the manifest, then stream its keys into the file (one chunk in memory).

        Args:
            sessions: the catalogue to compare with (None: an empty one).
            classify: work out what an index run would do to each product and image
                (reads the catalogue and stats files; not needed for pruning alone).
            check_files: also check that each local image file exists and is readable,
                and that each URL is well formed (without fetching it).
            manifest_format: a manifest or shop feed format (None: detected).

        Raises:
            ManifestError: the manifest is invalid or empty (checked whole first).
        """
        path = Path(manifest)
        self._manifest_stamp = _stamp(path)
        self.rows = validate_manifest(path, format=manifest_format).rows
        self.manifest = path
        for records in iter_manifest_records(path, chunk_rows=MANIFEST_CHUNK_ROWS, format=manifest_format):
            products, images = _classify(records, sessions if classify else None, classify=classify,
                                         check_files=check_files)
            with self.db:
                self.db.executemany(
                    "INSERT INTO products(sku, action) VALUES (?, ?) "
                    "ON CONFLICT(sku) DO UPDATE SET action = max(action, excluded.action)", products)
                self.db.executemany(
                    "INSERT INTO images(sku, path, action, code, message) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING", images)

    def check_manifest_unchanged(self) -> None:
        """Raises: PruneRefusedError if the manifest file changed since :meth:`load` (an
        export still being written must not decide what to delete)."""
        if self.manifest is None or _stamp(self.manifest) != self._manifest_stamp:
            raise PruneRefusedError(f"the manifest {self.manifest} changed during the run; nothing was pruned "
                                    "(run again once it is complete)")

    def plan(self, sessions: sessionmaker[Session] | None, *, prune: bool = False,
             policy: PrunePolicy | None = None) -> SyncPlan:
        """What an index run of the loaded manifest would do (after ``load(classify=True)``)."""
        products = self._changes("products")
        images = self._changes("images")
        problems = self.db.execute("SELECT count(*) FROM images WHERE code IS NOT NULL").fetchone()[0]
        examples = tuple(FileProblem(*row) for row in self.db.execute(
            "SELECT sku, path, code, message FROM images WHERE code IS NOT NULL LIMIT ?", (MAX_EXAMPLES,)))
        counts = refused = None
        if prune:
            counts = self.find_prunable(sessions) if sessions is not None else PruneCounts()
            refused = (policy or PrunePolicy()).refusal(counts)
        return SyncPlan(
            manifest=str(self.manifest), rows=self.rows, products=products, images=images, problems=problems,
            problem_examples=examples, prune=counts, prune_refused=refused,
            examples={name: self._examples(action) for name, action in (("add", ADD), ("update", UPDATE))},
        )

    def _changes(self, table: str) -> Changes:
        by_action = dict(self.db.execute(f"SELECT action, count(*) FROM {table} GROUP BY action"))
        return Changes(total=sum(by_action.values()), add=by_action.get(ADD, 0), update=by_action.get(UPDATE, 0),
                       unchanged=by_action.get(UNCHANGED, 0))

    def _examples(self, action: int) -> list[str]:
        return [sku for (sku,) in self.db.execute(
            "SELECT sku FROM products WHERE action = ? LIMIT ?", (action, MAX_EXAMPLES))]

    def find_prunable(self, sessions: sessionmaker[Session]) -> PruneCounts:
        """Anti-join the catalogue against the manifest's keys, one page at a time; keep
        what is to be pruned in the file for :meth:`prunable_skus` and :meth:`prunable_images`."""
        with self.db:
            self.db.execute("DELETE FROM prune_products")
            self.db.execute("DELETE FROM prune_images")
        catalogue_products = catalogue_images = product_images = 0
        for page in _pages(sessions, catalogue.product_keys):
            catalogue_products += len(page)
            with self.db:
                self.db.execute("DELETE FROM page_products")
                self.db.executemany("INSERT INTO page_products(id, sku) VALUES (?, ?)", page)
                self.db.execute("INSERT INTO prune_products(id, sku) SELECT id, sku FROM page_products p "
                                "WHERE NOT EXISTS (SELECT 1 FROM products m WHERE m.sku = p.sku)")
        for page in _pages(sessions, _image_keys):
            catalogue_images += len(page)
            with self.db:
                self.db.execute("DELETE FROM page_images")
                self.db.executemany("INSERT INTO page_images(id, product_id, sku, path) VALUES (?, ?, ?, ?)", page)
                product_images += self.db.execute(
                    "SELECT count(*) FROM page_images p "
                    "WHERE NOT EXISTS (SELECT 1 FROM products m WHERE m.sku = p.sku)").fetchone()[0]
                self.db.execute(
                    "INSERT INTO prune_images(id, product_id, path) SELECT id, product_id, path FROM page_images p "
                    "WHERE EXISTS (SELECT 1 FROM products m WHERE m.sku = p.sku) "
                    "AND NOT EXISTS (SELECT 1 FROM images i WHERE i.sku = p.sku AND i.path = p.path)")
        products = self.db.execute("SELECT count(*) FROM prune_products").fetchone()[0]
        images = self.db.execute("SELECT count(*) FROM prune_images").fetchone()[0]
        examples = tuple(sku for (sku,) in self.db.execute(
            "SELECT sku FROM prune_products ORDER BY id LIMIT ?", (MAX_EXAMPLES,)))
        return PruneCounts(products=products, product_images=product_images, images=images,
                           catalogue_products=catalogue_products, catalogue_images=catalogue_images,
                           examples=examples)

    def prunable_skus(self, batch: int = PRUNE_BATCH) -> Iterator[list[str]]:
        """The SKUs :meth:`find_prunable` found, in batches."""
        for rows in self._batches("SELECT id, sku FROM prune_products WHERE id > ? ORDER BY id LIMIT ?", batch):
            yield [sku for _, sku in rows]

    def prunable_images(self, batch: int = PRUNE_BATCH) -> Iterator[list[tuple[int, int, str]]]:
        """The images :meth:`find_prunable` found (of products that stay), in batches of
        (image id, product id, path): a delete removes only rows still matching all three,
        since an id may name another image by then (SQLite reuses the highest id)."""
        for rows in self._batches("SELECT id, product_id, path FROM prune_images WHERE id > ? ORDER BY id LIMIT ?",
                                  batch):
            yield [(image_id, product_id, path) for image_id, product_id, path in rows]

    def _batches(self, query: str, batch: int) -> Iterator[list[tuple[int, Any]]]:
        last = 0
        while rows := self.db.execute(query, (last, batch)).fetchall():
            yield rows
            last = rows[-1][0]


def _stamp(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def _image_keys(session: Session, *, after: int = 0, limit: int = CATALOGUE_PAGE) -> list[tuple[int, int, str, str]]:
    """(image id, product id, its product's sku, path) of the images with ids above
    ``after``, ascending: one keyset page."""
    return [(row.id, row.product_id, row.sku, row.path) for row in session.execute(
        select(ProductImage.id, ProductImage.product_id, Product.sku, ProductImage.path)
        .join(Product, Product.id == ProductImage.product_id)
        .where(ProductImage.id > after).order_by(ProductImage.id).limit(limit))]


def _pages(sessions: sessionmaker[Session], read_page) -> Iterator[list[tuple]]:
    """Keyset pages of catalogue rows (a short read per page: no long-held snapshot)."""
    after = 0
    while True:
        with sessions() as session:
            page = read_page(session, after=after, limit=CATALOGUE_PAGE)
        if not page:
            return
        yield page
        after = page[-1][0]


# --- what an index run would do to one chunk ---------------------------------------------


def _classify(records: Sequence[ProductRecord], sessions: sessionmaker[Session] | None, *, classify: bool,
              check_files: bool) -> tuple[list[tuple[str, int]], list[tuple[str, str, int, str | None, str | None]]]:
    """(sku, action) of each product and (sku, path, action, problem code, message) of
    each image of one manifest chunk."""
    stored: dict[str, dict[str, Any]] = {}
    known: dict[tuple[int, str], catalogue.ImageRow] = {}
    if sessions is not None:
        with sessions() as session:
            stored = catalogue.product_rows_by_sku(session, [record.sku for record in records])
            for row in catalogue.images_of_products(session, [product["id"] for product in stored.values()]):
                known[(row.product_id, row.path)] = row
    products, images = [], []
    for record in records:
        current = stored.get(record.sku)
        if current is None:
            action = ADD
        else:
            action = UPDATE if catalogue.record_changes_fields(current, record) else UNCHANGED
        products.append((record.sku, action))
        for image in record.images:
            path = str(image)
            row = known.get((current["id"], path)) if current is not None else None
            problem = _image_problem(path) if check_files else None
            action = _image_action(path, row) if classify else ADD
            images.append((record.sku, path, action, *(problem or (None, None))))
    return products, images


def _image_action(path: str, row: catalogue.ImageRow | None) -> int:
    """ADD a new image; UPDATE one to embed again (changed on disk, not indexed yet);
    UNCHANGED an indexed one whose file has the size and mtime it was embedded with."""
    if row is None:
        return ADD
    if row.status != ImageStatus.INDEXED:
        return UPDATE
    if is_image_url(path):
        return UNCHANGED  # what a URL now serves is only known by fetching it
    try:
        status = os.stat(path)
    except OSError:
        return UPDATE
    same = status.st_size == row.file_size and status.st_mtime_ns == row.file_mtime_ns
    return UNCHANGED if same else UPDATE


def _image_problem(path: str) -> tuple[str, str] | None:
    """(code, message) when an index run could not read the image at ``path``."""
    if is_image_url(path):
        return None  # syntax only: validating never fetches
    if path.startswith(("http://", "https://")):
        return "bad_url", f"not a valid http(s) URL: {path}"
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "file_not_found", f"no such file: {path}"
    except OSError as exc:
        return "unreadable_file", f"cannot read {path}: {exc.strerror or exc}"
    if not stat_module.S_ISREG(status.st_mode):
        return "not_a_file", f"not a regular file: {path}"
    if not os.access(path, os.R_OK):
        return "unreadable_file", f"cannot read {path}: permission denied"
    return None


# --- entry points -------------------------------------------------------------------------


def plan_manifest(manifest: str | Path, *, sessions: sessionmaker[Session] | None = None, prune: bool = False,
                  policy: PrunePolicy | None = None, check_files: bool = True,
                  manifest_format: str | None = None, temp_dir: str | Path | None = None) -> SyncPlan:
    """What indexing ``manifest`` would add, update, leave alone and (``prune``) remove.

    Writes nothing to the catalogue or the data directory (only a temporary file,
    deleted before returning).

    Args:
        sessions: the catalogue to compare with (None: an empty one).
        prune: also count what ``index --prune`` would remove.
        policy: the prune limits to report a refusal against (default: :class:`PrunePolicy`).
        check_files: check that local image files exist and are readable, and that
            URLs are well formed (never fetched).
        manifest_format: a manifest or shop feed format (None: detected from the file).
        temp_dir: where the temporary file goes.

    Raises:
        ManifestError: the manifest is invalid or empty.
    """
    with ManifestKeys(temp_dir) as keys:
        keys.load(manifest, sessions=sessions, classify=True, check_files=check_files,
                  manifest_format=manifest_format)
        return keys.plan(sessions, prune=prune, policy=policy)


def plan_for_settings(settings: "Settings", manifest: str | Path, **options: Any) -> SyncPlan:
    """:func:`plan_manifest` against the catalogue ``settings`` name, opened read-only;
    against an empty catalogue when there is none yet (and then nothing is created).

    Raises:
        ManifestError, StorageError, ConfigurationError: see :func:`plan_manifest` and
            :func:`~visualsearch.catalogue.open_catalogue`.
    """
    database = sqlite_path(settings.catalogue_url)
    if database is not None and not database.is_file():
        return plan_manifest(manifest, **options)
    try:
        sessions = open_catalogue(settings.catalogue_url, read_only=True)
    except NoCatalogueError:  # a server database nothing was indexed into yet
        return plan_manifest(manifest, **options)
    try:
        return plan_manifest(manifest, sessions=sessions, **options)
    finally:
        sessions.kw["bind"].dispose()


# --- removal by a list of SKUs ----------------------------------------------------------


@dataclass
class RemoveSummary:
    """What a bulk removal did: counts, and the first few SKUs that were not found."""

    removed: int = 0
    unknown: int = 0
    unknown_skus: list[str] = field(default_factory=list)

    def add(self, asked: Sequence[str], deleted: Sequence[str]) -> None:
        gone = set(deleted)
        self.removed += len(gone)
        for sku in asked:
            if sku not in gone:
                self.unknown += 1
                if len(self.unknown_skus) < MAX_LISTED_UNKNOWN:
                    self.unknown_skus.append(sku)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_sku_lines(lines: Iterable[str]) -> Iterator[str]:
    """SKUs from a text stream, one per line; blank lines and ``#`` comments are skipped."""
    for line in lines:
        sku = line.strip()
        if sku and not sku.startswith("#"):
            yield sku


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of up to ``size`` consecutive items (a stream of any length, one batch in memory)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
