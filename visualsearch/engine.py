"""The engine: one data directory's catalogue, embedder and vector index, kept consistent.

The catalogue database is the source of truth. The vector index on disk records the
catalogue revision it reflects; whenever they differ (a crash mid-run, another
process' update) the index is rebuilt from the stored vectors, so a reader never
serves results from a stale or half-written index.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from .backbones_builtin import DEFAULT_BACKBONE
from .catalogue import open_catalogue, store
from .embedder import Embedder
from .errors import ConfigurationError, IndexCorruptError, WriterBusyError
from .settings import Settings
from .vector_index import MANIFEST_NAME, IndexManifest, VectorIndex, read_manifest

logger = logging.getLogger(__name__)

FAILURES_FILE = "failures.jsonl"
WRITE_LOCK_FILE = ".write.lock"


class Engine:
    """Open one deployment's data directory.

    Args:
        settings: the deployment's configuration.
        read_only: serve searches only; the index is memory-mapped when it is current.
        create: create the data directory and catalogue if missing (False: that is an error).
        embedder: an already loaded embedder to share (e.g. the web app's writer engine).

    Raises:
        ConfigurationError: the catalogue database cannot be opened, or (read-only)
            the data directory holds no catalogue yet.
    """

    def __init__(self, settings: Settings, *, read_only: bool = False, create: bool = True,
                 embedder: Embedder | None = None):
        self.settings = settings
        self.read_only = read_only
        self.data_dir: Path = Path(settings.data_dir)
        if read_only or not create:
            _check_catalogue_exists(settings)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot use data directory {self.data_dir}: {exc.strerror or exc}") from None
        self.sessions: sessionmaker[Session] = open_catalogue(settings.catalogue_url)
        self._embedder: Embedder | None = embedder  # a loaded one can be shared between engines
        self._index: VectorIndex | None = None
        self._index_key: tuple | None = None
        self._index_revision = 0
        self._lock = threading.RLock()
        self.embed_lock = threading.Lock()

    # --- sessions ----------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the data directory's single-writer lock (indexing, removing).

        Raises:
            WriterBusyError: another process holds it.
        """
        with open(self.data_dir / WRITE_LOCK_FILE, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriterBusyError(
                    f"another visualsearch process is writing to {self.data_dir}; wait for it to finish"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- embedder ------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The loaded backbone (loaded on first use, checked against the stored vectors).

        Raises:
            BackboneMismatchError: the catalogue holds vectors of another backbone or weights.
            WeightsUnavailableError, ConfigurationError: the backbone cannot be loaded.
        """
        with self._lock:
            if self._embedder is None:
                with self.sessions() as session:
                    stored = store.stored_identity(session)
                if stored is not None and self.settings.backbone:
                    # Refuse before loading a network whose vectors could never be compared.
                    store.check_backbone_name(stored, self.settings.backbone)
                # The backbone asked for, else the catalogue's, else the default.
                name = self.settings.backbone or (stored.backbone if stored else DEFAULT_BACKBONE)
                embedder = Embedder(
                    name,
                    weights_path=self.settings.weights,
                    device=self.settings.device,
                    threads=self.settings.threads,
                    allow_download=self.settings.allow_download,
                )
                if stored is not None:
                    with self.sessions() as session:
                        store.claim_identity(session, **_identity_kwargs(embedder))
                self._embedder = embedder
            return self._embedder

    # --- vector index --------------------------------------------------------------

    def index(self) -> VectorIndex:
        """The vector index, current with the catalogue.

        Reloaded when another process saved a new one. A writer, or a reader while no
        writer runs, whose index lags behind the catalogue (a writer died before saving)
        rebuilds it from the stored vectors; a reader that sees a writer at work serves
        the last saved index until the writer saves the next one.
        """
        with self._lock:
            disk_key = self._manifest_key()  # read before loading: a save meanwhile means reload
            revision = self.catalogue_revision()
            if self._index is not None and disk_key == self._index_key and (
                revision == self._index_revision or (self.read_only and self._writer_active())
            ):
                return self._index
            self._index, self._index_revision = self._load_or_rebuild(revision)
            self._index_key = disk_key
            return self._index

    def catalogue_revision(self) -> int:
        """The catalogue's vectors revision (bumped by every change to stored vectors)."""
        with self.sessions() as session:
            return store.vectors_revision(session)

    def _manifest_key(self) -> tuple[int, int, int] | None:
        try:
            stat = (self.data_dir / MANIFEST_NAME).stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _load_or_rebuild(self, revision: int) -> tuple[VectorIndex, int]:
        """(index, catalogue revision it reflects)."""
        embedder = self.embedder
        manifest = self.manifest()
        if manifest is None and revision == 0:
            return VectorIndex.create(embedder.dim), 0
        if manifest is not None:
            manifest.check_compatible(**_identity_kwargs(embedder))
            lagging = manifest.catalogue_revision != revision
            if not lagging or (self.read_only and self._writer_active()):
                try:
                    index, loaded = VectorIndex.load(self.data_dir, mmap=self.read_only)
                    return index, loaded.catalogue_revision
                except IndexCorruptError as exc:
                    logger.warning("%s; rebuilding it from the catalogue", exc)
            else:
                logger.info("saved index is at revision %s, the catalogue at %s: rebuilding it "
                            "from the stored vectors", manifest.catalogue_revision, revision)
        return self._rebuild(save=not self.read_only)

    def _writer_active(self) -> bool:
        try:
            handle = open(self.data_dir / WRITE_LOCK_FILE, "r")
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def _rebuild(self, *, save: bool) -> tuple[VectorIndex, int]:
        """A fresh index from the vectors stored in the catalogue, and the revision it reflects."""
        index = VectorIndex.create(self.embedder.dim)
        with self.sessions() as session:
            revision = store.vectors_revision(session)
            for ids, vectors in store.iter_embeddings(session):
                index.add(ids, vectors)
        if save:
            self.save_index(index, revision)
        return index, revision

    def save_index(self, index: VectorIndex, revision: int) -> IndexManifest:
        embedder = self.embedder
        manifest = index.save(self.data_dir, backbone=embedder.identity.backbone,
                              weights_sha256=embedder.identity.weights_sha256,
                              catalogue_revision=revision)
        with self._lock:
            # Keep serving the object just saved instead of reading it back from disk.
            self._index, self._index_revision = index, revision
            self._index_key = self._manifest_key()
        return manifest

    def manifest(self) -> IndexManifest | None:
        """The saved index's manifest; ``None`` if there is none or it is unreadable
        (the catalogue holds every vector, so the index is then rebuilt)."""
        try:
            return read_manifest(self.data_dir)
        except IndexCorruptError as exc:
            logger.warning("%s; the index will be rebuilt from the catalogue", exc)
            return None

    @property
    def failures_path(self) -> Path:
        return self.data_dir / FAILURES_FILE

    # --- writes ----------------------------------------------------------------------

    def remove(self, skus: list[str]) -> tuple[list[str], list[str]]:
        """Delete products and their vectors. Returns (removed SKUs, unknown SKUs)."""
        with self.writer():
            index = self.index()
            with self.session() as session:
                deleted, vector_ids = store.delete_products(session, skus)
                revision = store.vectors_revision(session)
            if vector_ids:
                index.remove(np.asarray(vector_ids, dtype=np.int64))
                self.save_index(index, revision)
        removed = set(deleted)
        return deleted, [sku for sku in skus if sku not in removed]

    def stats(self) -> dict:
        with self.sessions() as session:
            stats = store.catalogue_stats(session)
            identity = store.stored_identity(session)
            revision = store.vectors_revision(session)
        manifest = self.manifest()
        return {
            "data_dir": str(self.data_dir.resolve()),
            "products": stats.products,
            "images": stats.images,
            "indexed_images": stats.indexed,
            "failed_images": stats.failed,
            "pending_images": stats.pending,
            "categories": stats.categories,
            "backbone": identity.backbone if identity else None,
            "weights_sha256": identity.weights_sha256 if identity else None,
            "dim": identity.dim if identity else None,
            "index": None if manifest is None else {
                "type": manifest.index_type, "vectors": manifest.count,
                "file": manifest.index_file, "up_to_date": manifest.catalogue_revision == revision,
            },
        }


def _identity_kwargs(embedder: Embedder) -> dict:
    return {
        "backbone": embedder.identity.backbone,
        "weights_sha256": embedder.identity.weights_sha256,
        "dim": embedder.identity.dim,
    }


def _check_catalogue_exists(settings: Settings) -> None:
    """Opening for reading must not create an empty catalogue where a typo points."""
    url = settings.catalogue_url
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return  # a server database: connecting creates nothing
    database = Path(url.removeprefix("sqlite:///"))
    if not database.is_file():
        raise ConfigurationError(
            f"no catalogue at {database}: index one first with 'visualsearch index MANIFEST "
            f"--data-dir {settings.data_dir}', or point --data-dir / VISUALSEARCH_DATA_DIR (or --db) "
            "at an indexed one"
        )
