"""The library's front door: one deployment's data directory and what can be done with it.

``VisualSearch(settings)`` opens the catalogue database, and on first use the CNN
and the vector store. The CLI and the web views are thin over its methods, which
take plain arguments and return dataclasses (:mod:`.results`) or dicts; none of them
hands out ORM rows or asks callers for SQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from .backbones_builtin import DEFAULT_BACKBONE
from .catalogue import ImageStatus, open_catalogue, sqlite_path
from .catalogue import store as catalogue
from .catalogue_manifest import ProductRecord
from .durable import writer_gone
from .embedder import Embedder, EmbedderIdentity
from .errors import ConfigurationError, StorageError, WriterBusyError
from .images import Crop, ImageSource
from .indexing import ImageEmbedding, IndexingReport, Progress, index_manifest, index_records
from .results import Facets, ImageView, ProductView, RemoveResult, SearchResult
from .search import search_image, similar_products
from .settings import Settings
from .storage_errors import check_writable, storage_errors, translates_storage_errors
from .uploads import UPLOADS_DIR, is_upload, keep_upload
from .vectors import IndexPlan, SearchFilters, VectorStore, configure_threads
from .writer import CatalogueWriter

logger = logging.getLogger(__name__)

FAILURES_FILE = "failures.jsonl"
INDEX_LOCK_FILE = ".index.lock"
# An API write runs segment merges up to this size inline; bigger ones are left to
# the indexer and ``compact`` so that a PUT or DELETE stays fast.
API_MERGE_LIMIT = 65_536


class VisualSearch:
    """Open one deployment's data directory.

    Args:
        settings: the deployment's configuration.
        read_only: serve searches and pages only (no writes at all); the catalogue is
            opened read-only, so this works on a read-only file system.
        create: create the data directory and catalogue if missing (False: that is an error).
        embedder: an already loaded embedder to share.

    A writable instance whose catalogue cannot be opened for writing (a read-only
    mount, a full disk) falls back to reading it: searches are served, and each write
    tries to reopen it and otherwise raises the StorageError that says why.

    Every public method raises :class:`~visualsearch.errors.StorageError` (read-only,
    full, busy) when the disk refuses, never a bare OSError or database error.

    Raises:
        ConfigurationError: the catalogue database cannot be opened, or (read-only or
            ``create=False``) the data directory holds no catalogue yet.
        StorageError: the data directory cannot be created or read.
    """

    def __init__(self, settings: Settings, *, read_only: bool = False, create: bool = True,
                 embedder: Embedder | None = None):
        self.settings = settings
        self.read_only = read_only
        self.data_dir: Path = Path(settings.data_dir)
        if read_only or not create:
            _check_catalogue_exists(settings)
        try:
            with storage_errors(self.data_dir):
                self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot use data directory {self.data_dir}: {exc.strerror or exc}") from None
        # Why writes are refused while the catalogue is open read-only as a fallback.
        self.write_blocked: StorageError | None = None
        self.sessions: sessionmaker[Session] = self._open_catalogue()
        self._embedder = embedder
        self._store: VectorStore | None = None
        self._lock = threading.RLock()
        configure_threads()

    # --- resources -------------------------------------------------------------------

    def _open_catalogue(self) -> sessionmaker[Session]:
        url = self.settings.catalogue_url
        if self.read_only:
            return open_catalogue(url, read_only=True)
        try:
            check_writable(self.data_dir)
            return open_catalogue(url)
        except StorageError as exc:
            database = sqlite_path(url)
            if database is None or not database.is_file():
                raise
            logger.info("catalogue opened read-only, searches only: %s", exc)
            self.write_blocked = exc
            return open_catalogue(url, read_only=True)

    def _require_writable(self) -> None:
        """Before a write: reopen a catalogue that was opened read-only as a fallback
        (the disk may have been fixed since), or raise why it still cannot be written."""
        if self.read_only:
            raise ConfigurationError("this VisualSearch was opened read-only")
        with self._lock:
            if self.write_blocked is None:
                return
            check_writable(self.data_dir)  # these raise StorageError again while the disk refuses
            self.sessions = open_catalogue(self.settings.catalogue_url)
            self.write_blocked = None
            logger.warning("catalogue writable again")

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A catalogue session that commits on success and rolls back on error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @property
    def embedder(self) -> Embedder:
        """The loaded backbone (loaded on first use, checked against the stored vectors).

        Raises:
            BackboneMismatchError: the catalogue holds vectors of another backbone or weights.
            WeightsUnavailableError, ConfigurationError: the backbone cannot be loaded.
        """
        with self._lock:
            if self._embedder is None:
                stored = self.stored_identity()
                if stored is not None and self.settings.backbone:
                    # Refuse before loading a network whose vectors could never be compared.
                    catalogue.check_backbone_name(stored, self.settings.backbone)
                name = self.settings.backbone or (stored.backbone if stored else DEFAULT_BACKBONE)
                embedder = Embedder(name, weights_path=self.settings.weights, device=self.settings.device,
                                    threads=self.settings.threads, allow_download=self.settings.allow_download)
                if stored is not None:
                    with self.session() as session:
                        catalogue.claim_identity(session, **_identity_kwargs(embedder.identity))
                self._embedder = embedder
            return self._embedder

    @translates_storage_errors
    def stored_identity(self) -> catalogue.StoredIdentity | None:
        with self.sessions() as session:
            return catalogue.stored_identity(session)

    @translates_storage_errors
    def claim_identity(self, identity: EmbedderIdentity) -> None:
        """Record (or check) the network whose vectors this catalogue holds."""
        with self.session() as session:
            catalogue.claim_identity(session, **_identity_kwargs(identity))

    def store(self) -> VectorStore | None:
        """The vector store, or None while nothing was ever indexed here."""
        with self._lock:
            if self._store is None:
                stored = self.stored_identity()
                if stored is None:
                    return None
                self._store = VectorStore(self.data_dir, backbone=stored.backbone,
                                          weights_sha256=stored.weights_sha256, dim=stored.dim,
                                          memory_budget=self.settings.index_memory, read_only=self.read_only)
            return self._store

    def writable_store(self) -> VectorStore:
        """The store, for writers (after :meth:`claim_identity`)."""
        store = self.store()
        if store is None:
            raise ConfigurationError("no embedding identity recorded yet: nothing to write vectors for")
        return store

    @contextlib.contextmanager
    def index_lock(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the data directory's index-run lock (one batch run at a time; API writes
        do not take it and go on meanwhile).

        Raises:
            WriterBusyError: another run held it for ``wait`` seconds.
        """
        deadline = time.monotonic() + wait
        with open(self.data_dir / INDEX_LOCK_FILE, "a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise WriterBusyError(
                            f"another 'visualsearch index' run is writing to {self.data_dir}; wait for it to "
                            "finish, or pass --wait SECONDS") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def failures_path(self) -> Path:
        return self.data_dir / FAILURES_FILE

    @translates_storage_errors
    def vectors_by_sha256(self, digests: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors of already indexed images with these content hashes."""
        store = self.store()
        if store is None or not digests:
            return {}
        with self.sessions() as session:
            image_of = catalogue.indexed_images_by_sha256(session, digests)
        ids, vectors = store.get_vectors(list(image_of.values()))
        vector_of = dict(zip(ids.tolist(), vectors))
        return {digest: vector_of[image] for digest, image in image_of.items() if image in vector_of}

    # --- use cases ---------------------------------------------------------------------

    @translates_storage_errors
    def index(self, manifest: str | Path, *, progress: Progress | None = None, wait: float = 0.0,
              embedding: ImageEmbedding | None = None) -> IndexingReport:
        """Index a manifest (see :func:`visualsearch.indexing.index_manifest`)."""
        self._require_writable()
        self.collect_leftovers()  # what a crashed run left, before this one adds to it
        report = index_manifest(self, manifest, progress=progress, wait=wait, embedding=embedding)
        self.collect_leftovers()
        return report

    @translates_storage_errors
    def put_product(self, record: ProductRecord, *, uploads: Sequence[tuple[bytes, str]] = ()
                    ) -> tuple[ProductView, IndexingReport, bool]:
        """Create or update one product and embed its new images now (beside any batch run).

        Args:
            uploads: (bytes, image format) of image files sent with the request, already
                checked to decode: kept under DATA_DIR/uploads and added to the record's images.

        Returns:
            (the product as stored, the indexing report, whether it was created).
        """
        self._require_writable()
        with self.sessions() as session:
            created = not catalogue.product_exists(session, record.sku)
        kept: list[str] = []
        try:
            for data, image_format in uploads:
                kept.append(str(keep_upload(self.data_dir, data, image_format)))
            record.images = [*record.images, *kept]
            report = index_records(self, [[record]], exclusive=False, merge_limit=API_MERGE_LIMIT,
                                   flush_rows=1 << 30)
        except BaseException:
            self._remove_owned_files(kept)  # the write failed: keep no file nothing names
            raise
        return self.product(record.sku), report, created

    @translates_storage_errors
    def remove(self, skus: Sequence[str]) -> RemoveResult:
        """Delete products, their vectors and the files of theirs this data directory owns."""
        self._require_writable()
        store = self.store()
        if store is None:
            return RemoveResult([], list(skus))
        writer = CatalogueWriter(self.session, store, merge_limit=API_MERGE_LIMIT)
        deleted, paths = writer.delete_products(list(skus))
        self._remove_owned_files(paths)
        removed = set(deleted)
        return RemoveResult(deleted, [sku for sku in skus if sku not in removed])

    def _remove_owned_files(self, paths: Sequence[str]) -> None:
        """Uploads kept by the API live in DATA_DIR/uploads: delete those no image names
        any more (a file is named by its content hash, so two products may share one)."""
        for path in paths:
            if not is_upload(self.data_dir, path):
                continue
            with self.sessions() as session:
                if catalogue.path_is_referenced(session, path):
                    continue
            Path(path).unlink(missing_ok=True)

    @translates_storage_errors
    def search(self, image: ImageSource, *, top_k: int = 10, filters: SearchFilters | None = None,
               crop: Crop | None = None) -> SearchResult:
        return search_image(self, image, top_k=top_k, filters=filters, crop=crop)

    @translates_storage_errors
    def similar(self, sku: str, *, top_k: int = 10, filters: SearchFilters | None = None) -> SearchResult:
        return similar_products(self, sku, top_k=top_k, filters=filters)

    @translates_storage_errors
    def product(self, sku: str) -> ProductView:
        """Raises ProductNotFoundError for an unknown SKU."""
        with self.sessions() as session:
            item = catalogue.get_product(session, sku)
            return ProductView(
                sku=item.sku, title=item.title, category=item.category, brand=item.brand, price=item.price,
                url=item.url, attributes=dict(item.attributes or {}),
                images=tuple(ImageView(id=image.id, status=ImageStatus(image.status).value, width=image.width,
                                       height=image.height, error=image.error) for image in item.images),
            )

    @translates_storage_errors
    def image_file(self, image_id: int) -> Path | None:
        """The file of an indexed image (only indexed images are ever served)."""
        with self.sessions() as session:
            row = catalogue.get_image(session, image_id)
            if row is None or ImageStatus(row.status) != ImageStatus.INDEXED:
                return None
            path = Path(row.path)
        return path if path.is_file() else None

    @translates_storage_errors
    def facets(self) -> Facets:
        with self.sessions() as session:
            counts = catalogue.catalogue_counts(session)
            brands = catalogue.brands(session)
        return Facets(categories=[name for name in counts.categories if name], brands=brands)

    @translates_storage_errors
    def stats(self) -> dict:
        with self.sessions() as session:
            counts = catalogue.catalogue_counts(session)
            identity = catalogue.stored_identity(session)
        store = self.store()
        index = None
        if store is not None and store.manifest is not None:
            numbers = store.stats()
            index = {"type": numbers.index_type, "vectors": numbers.vectors, "segments": numbers.segments,
                     "rows": numbers.rows, "disk_bytes": numbers.disk_bytes, "tuning": numbers.tuning,
                     "up_to_date": numbers.vectors == counts.indexed}
        return {
            "data_dir": str(self.data_dir.resolve()),
            "products": counts.products,
            "images": counts.images,
            "indexed_images": counts.indexed,
            "failed_images": counts.failed,
            "pending_images": counts.pending,
            "categories": counts.categories,
            "backbone": identity.backbone if identity else None,
            "weights_sha256": identity.weights_sha256 if identity else None,
            "dim": identity.dim if identity else None,
            "index": index,
        }

    @translates_storage_errors
    def health(self) -> dict:
        """Cheap figures for load balancers (counters and the manifest; nothing is counted)."""
        with self.sessions() as session:
            counts = catalogue.catalogue_counts(session)
            identity = catalogue.stored_identity(session)
        store = self.store()
        manifest = store.manifest if store is not None else None
        return {
            "products": counts.products,
            "indexed_images": counts.indexed,
            # False while the disk refuses writes (read-only, full): searches still work.
            "writable": not self.read_only and self.write_blocked is None,
            "backbone": identity.backbone if identity else None,
            "index": None if manifest is None else {"type": manifest.index_type, "vectors": store.count,
                                                    "recall_at_10": manifest.tuning.recall_at_10},
        }

    @translates_storage_errors
    def compact(self, *, force: bool = False) -> dict:
        """Merge segments, drop dead rows, re-plan the index when the catalogue outgrew it."""
        self._require_writable()
        store = self.store()
        if store is None:
            return {"rebuilt": False, "removed_files": [], "orphan_vectors_dropped": 0}
        codec_before = store.manifest.codec if store.manifest else None
        writer = CatalogueWriter(self.session, store)
        orphans = writer.drop_orphan_vectors()
        writer.refresh_stale_products()
        if force:
            store.rebuild()
        elif store.maintain() != "rebuild":
            store.compact()
        rebuilt = force or store.manifest.codec != codec_before
        return {"rebuilt": rebuilt, "removed_files": store.collect_leftovers(), "orphan_vectors_dropped": orphans,
                **self._index_summary(store)}

    @translates_storage_errors
    def rebuild_index(self, *, plan: IndexPlan | None = None) -> dict:
        """Re-plan and rebuild the ANN index from the stored vectors (no model work)."""
        self._require_writable()
        store = self.store()
        if store is None:
            return {"rebuilt": False}
        store.rebuild(plan=plan)
        return {"rebuilt": True, **self._index_summary(store)}

    @translates_storage_errors
    def collect_leftovers(self) -> list[str]:
        """Delete what crashed writers left: the store's (see VectorStore.collect_leftovers)
        and half-written uploads. Returns the names removed."""
        if self.read_only:
            return []
        removed = [path.name for path in (self.data_dir / UPLOADS_DIR).glob(".*.tmp") if writer_gone(path.name)]
        for name in removed:
            (self.data_dir / UPLOADS_DIR / name).unlink(missing_ok=True)
        store = self.store()
        return removed + (store.collect_leftovers() if store is not None else [])

    @staticmethod
    def _index_summary(store: VectorStore) -> dict:
        numbers = store.stats()
        return {"index_type": numbers.index_type, "vectors": numbers.vectors, "segments": numbers.segments,
                "tuning": numbers.tuning}


def _identity_kwargs(identity: EmbedderIdentity) -> dict:
    return {"backbone": identity.backbone, "weights_sha256": identity.weights_sha256, "dim": identity.dim}


def _check_catalogue_exists(settings: Settings) -> None:
    """Opening for reading must not create an empty catalogue where a typo points."""
    database = sqlite_path(settings.catalogue_url)
    if database is None:
        return  # a server database: connecting creates nothing
    if not database.is_file():
        raise ConfigurationError(
            f"no catalogue at {database}: index one first with 'visualsearch index MANIFEST "
            f"--data-dir {settings.data_dir}', or point --data-dir / VISUALSEARCH_DATA_DIR (or --db) "
            "at an indexed one"
        )
