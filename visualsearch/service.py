"""The library's front door: one deployment's data directory and what can be done with it.

``VisualSearch(settings)`` opens the catalogue database, and on first use the CNN
and the vector store. The CLI and the web views are thin over its methods, which
take plain arguments and return dataclasses (:mod:`.results`) or dicts; none of them
hands out ORM rows or asks callers for SQL.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import threading
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from .backbones_builtin import DEFAULT_BACKBONE
from .catalogue import ImageStatus, open_catalogue, sqlite_path
from .catalogue import store as catalogue
from .catalogue.locks import INDEX_LOCK, VECTOR_COMMIT_LOCK, catalogue_lock
from .catalogue_manifest import ProductRecord, is_image_url
from .embedder import Embedder, EmbedderIdentity
from .errors import ConfigurationError, InvalidRequestError, StorageError
from .generation_storage import GenerationStorage, generation_storage
from .generations import (
    Generation,
    GenerationChangedError,
    GenerationRef,
    GenerationTracker,
    matching_weights,
    read_generation,
)
from .images import Crop, ImageSource
from .indexing import ImageEmbedding, IndexingReport, Progress, check_engine, index_manifest, index_records
from .projection_cache import ensure_projection
from .recipes import Recipe, check_recipe, choose_recipe, pick_data_recipes
from .reembed import ReembedReport, drop_old_generations, reembed
from .results import Facets, ImageView, ProductView, RemoveResult, SearchResult
from .search import search_image, similar_products
from .settings import Settings
from .storage_errors import check_writable, storage_errors, translates_storage_errors
from .sync import (
    REMOVE_BATCH,
    ManifestKeys,
    PruneCounts,
    PrunePolicy,
    PruneResult,
    RemoveSummary,
    SyncPlan,
    SyncReport,
    batched,
    plan_manifest,
)
from .uploads import UploadFolder, is_fsspec_url, read_file_url
from .vectors import IndexPlan, SearchFilters, VectorStore, configure_threads
from .vectors.store import DEFAULT_LOCK_TIMEOUT
from .writer import CatalogueWriter

logger = logging.getLogger(__name__)
# Set at interpreter exit: background page-cache warming stops (see warm_page_cache_in_background).
_SHUTTING_DOWN = threading.Event()
atexit.register(_SHUTTING_DOWN.set)
T = TypeVar("T")

FAILURES_FILE = "failures.jsonl"
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
        # Where photos sent with API PUTs are kept (shared by replicas when configured).
        self.uploads = UploadFolder(settings.uploads, self.data_dir)
        self.sessions: sessionmaker[Session] = self._open_catalogue()
        # The generations' vectors: folders of the data directory, or Milvus collections.
        self.generation_storage: GenerationStorage = generation_storage(settings, self.data_dir)
        self._lock = threading.RLock()
        # The CNN and vector store answering now: those of the catalogue's current vector
        # generation, followed when a re-embedding switches it (see visualsearch.generations).
        self._tracker: GenerationTracker = GenerationTracker(self._read_generation, self._make_generation,
                                                             embedder=embedder)
        self._root = self
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
        root = self._root  # a pinned view shares its parent's catalogue
        with self._lock:
            if root.write_blocked is not None:
                check_writable(self.data_dir)  # these raise StorageError again while the disk refuses
                root.sessions = open_catalogue(self.settings.catalogue_url)
                root.write_blocked = None
                logger.warning("catalogue writable again")
            self.sessions, self.write_blocked = root.sessions, None
        # Writes go to the current vector generation (a re-embedding may have switched it).
        self._tracker.follow(0)

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
            BackboneMismatchError: the catalogue holds vectors of another backbone or weights
                (RecipeMismatchError: of another recipe than a pinned one).
            WeightsUnavailableError, ConfigurationError: the backbone cannot be loaded.
        """
        return self._tracker.current().embedder()

    def _load_embedder(self, ref: GenerationRef) -> Embedder:
        stored = ref.identity
        # Unless pinned, the catalogue's recipe: queries embed as its vectors were made.
        recipe = choose_recipe(recipe=self.settings.recipe, backbone=self.settings.backbone,
                               stored_backbone=stored.backbone if stored else None,
                               stored_recipe=stored.recipe if stored else None, default_backbone=DEFAULT_BACKBONE,
                               local=self.data_recipes(stored.recipe_hash if stored else None))
        if stored is not None:
            # Refuse before loading a network whose vectors could never be compared.
            if self.settings.recipe:
                check_recipe(stored.recipe_name, None, None, name=recipe.name)
            catalogue.check_backbone_name(stored, recipe.backbone)
        name = recipe.backbone
        weights = self.settings.weights
        if stored is not None:
            # After a re-embedding, the weights file it was given (recorded in the catalogue).
            weights = matching_weights(stored, [self.settings.weights, ref.weights_path]) or weights
        # A tuned projection another host learned is fetched here; one this host holds and
        # the catalogue lacks (tuned before it kept them) is shared from here.
        share = not self.read_only and self.write_blocked is None
        with self.session() if share else self.sessions() as session:
            ensure_projection(session, recipe, self.data_dir, share=share)
        embedder = Embedder(name, recipe=recipe, projection_dir=self.data_dir, weights_path=weights,
                            device=self.settings.device,
                            threads=self.settings.threads, allow_download=self.settings.allow_download)
        if stored is not None:
            catalogue.check_identity(stored, **_identity_kwargs(embedder.identity))
        return embedder

    def _open_store(self, ref: GenerationRef) -> VectorStore:
        return self.open_generation_store(ref.location, ref.identity, read_only=self.read_only)

    def open_generation_store(self, location: str, identity: catalogue.StoredIdentity, *, read_only: bool = False,
                              guarded: bool = True) -> VectorStore:
        """The vector store of generation ``location`` (a folder, or a Milvus collection; see
        :mod:`visualsearch.generation_storage`), created empty if missing.

        Args:
            identity: the network its vectors come from.
            read_only: refuse writes.
            guarded: refuse writes once the catalogue names another generation
                (GenerationChangedError); False for one not switched to yet (a re-embedding's).

        Raises:
            BackboneMismatchError: the generation holds vectors of another network.
            ConfigurationError, StorageError: Milvus is not installed or unreachable.
        """
        is_current = (lambda: self._read_generation().location == location) if guarded else None
        return self.generation_storage.open(location, identity, is_current=is_current, read_only=read_only,
                                            commit_lock=self._cluster_commit_lock(location))

    def _cluster_commit_lock(self, location: str) -> Callable[[float], contextlib.AbstractContextManager[None]] | None:
        """With a server catalogue (PostgreSQL), the lock that orders writers of a shared
        vector store across hosts: an advisory lock in that database. None: the store's own
        local lock (an SQLite catalogue lives on one machine)."""
        if self.sessions.kw["bind"].dialect.name == "sqlite":
            return None

        def lock(timeout: float) -> contextlib.AbstractContextManager[None]:
            return catalogue_lock(self.sessions, f"{VECTOR_COMMIT_LOCK}:{location}", data_dir=self.data_dir,
                                  timeout=timeout, busy_message="another process is writing vectors to this "
                                  "catalogue's vector store; try again, or pass --wait SECONDS")
        return lock

    def _make_generation(self, ref: GenerationRef, *, embedder: Embedder | None = None,
                         store: VectorStore | None = None) -> Generation:
        return Generation(ref, load_embedder=self._load_embedder, open_store=self._open_store,
                          embedder=embedder, store=store)

    @translates_storage_errors
    def _read_generation(self) -> GenerationRef:
        with self.sessions() as session:
            return read_generation(session)

    def follow_generation(self, max_age: float = 1.0, *, wait: bool = False) -> bool:
        """Answer from the catalogue's current vector generation if a re-embedding switched
        it (the catalogue is read at most once per ``max_age`` seconds; with ``wait``
        False the new CNN and store load in the background while the old pair answers).

        Returns:
            Whether the generation in use changed.
        """
        return self._tracker.follow(max_age, wait=wait)

    def pinned(self) -> "VisualSearch":
        """A view of this data directory fixed to the vector generation in use now, for one
        request: its searches never mix one generation's CNN with another's vectors (its
        writes still move to the current generation)."""
        view = copy.copy(self)
        view._tracker = self._tracker.pinned()
        return view

    def generation(self) -> Generation:
        """The vector generation answering now (its identity, CNN and store)."""
        return self._tracker.current()

    def adopt_generation(self, ref: GenerationRef, embedder: Embedder) -> None:
        """Answer from the generation ``ref`` with ``embedder`` from now on (the process that
        switched to it has the CNN loaded already)."""
        self._tracker.adopt(self._make_generation(ref, embedder=embedder))

    def _on_current_generation(self, write: Callable[[], T]) -> T:
        """Run a write; once more if a re-embedding switched generations under it."""
        try:
            return write()
        except GenerationChangedError:
            self._tracker.follow(0)
            return write()

    @translates_storage_errors
    def data_recipes(self, current_fingerprint: str | None = None) -> dict[str, Recipe]:
        """The recipes this data directory defines (``visualsearch tune``'s), by name: of a
        name's definitions, the one whose fingerprint is ``current_fingerprint`` (the
        vectors answering), else the newest (see :func:`~visualsearch.recipes.pick_data_recipes`)."""
        with self.sessions() as session:
            return pick_data_recipes(catalogue.data_recipes(session), current_fingerprint)

    @translates_storage_errors
    def stored_identity(self) -> catalogue.StoredIdentity | None:
        with self.sessions() as session:
            return catalogue.stored_identity(session)

    @translates_storage_errors
    def claim_identity(self, identity: EmbedderIdentity) -> None:
        """Record (or check) the network whose vectors this catalogue holds.

        Raises:
            GenerationChangedError: a re-embedding switched generations since this write began.
            BackboneMismatchError: the catalogue holds vectors of another network.
        """
        location = self._tracker.current().ref.location
        with self.session() as session:
            if read_generation(session).location != location:
                raise GenerationChangedError("a re-embedding switched the vectors during this write; try again")
            catalogue.claim_identity(session, **_identity_kwargs(identity))

    def store(self) -> VectorStore | None:
        """The vector store of the generation in use, or None while nothing was ever indexed here."""
        return self._tracker.current().store()

    def warm_page_cache_in_background(self) -> threading.Thread:
        """Start reading the vector store's ANN lists and re-rank codes into the page cache (see
        :meth:`VectorStore.warm_page_cache`) on a daemon thread, as a server starts; it
        stops within one chunk when the process exits. Failures are only logged: the
        warming only saves disk reads later, and searches report a damaged index themselves."""

        def warm() -> None:
            try:
                store = self.store()
                asked = store.warm_page_cache(stop=_SHUTTING_DOWN) if store is not None else 0
            except Exception as exc:  # noqa: BLE001 (a background hint must never take the server down)
                logger.warning("did not warm the page cache: %s", exc)
                return
            if asked:
                logger.info("read %.1f GB of ANN lists and re-rank codes into the page cache", asked / 1e9)

        thread = threading.Thread(target=warm, name="visualsearch-warm-page-cache", daemon=True)
        thread.start()
        return thread

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
        # Catalogue-wide: a file lock beside an SQLite catalogue, an advisory lock in a
        # PostgreSQL one (whose runs may start on other hosts).
        with catalogue_lock(self.sessions, INDEX_LOCK, data_dir=self.data_dir, timeout=wait,
                            busy_message=f"another 'visualsearch index' run is writing to {self.data_dir}; "
                                         "wait for it to finish, or pass --wait SECONDS"):
            # A re-embedding (which holds this lock to switch) may have switched meanwhile.
            self._tracker.follow(0)
            yield

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
              embedding: ImageEmbedding | None = None, manifest_format: str | None = None,
              recheck_urls: bool = False, engine: str = "local", ray_address: str | None = None) -> IndexingReport:
        """Index a manifest or shop feed (see :func:`visualsearch.indexing.index_manifest`).

        Args:
            engine: ``local`` (this process) or ``ray`` (a Ray cluster: see
                :func:`visualsearch.ray_indexing.index_manifest_ray`, which ``ray_address`` is for).

        Raises:
            ConfigurationError: an engine choice that cannot work (see
                :func:`~visualsearch.indexing.check_engine`), or Ray is not installed.
        """
        check_engine(engine, ray_address=ray_address, embedding=embedding)
        self._require_writable()
        self.collect_leftovers()  # what a crashed run left, before this one adds to it
        if engine == "ray":
            from .ray_indexing import index_manifest_ray  # Ray is an optional extra

            report = index_manifest_ray(self, manifest, address=ray_address, progress=progress, wait=wait,
                                        manifest_format=manifest_format, recheck_urls=recheck_urls)
        else:
            report = index_manifest(self, manifest, progress=progress, wait=wait, embedding=embedding,
                                    manifest_format=manifest_format, recheck_urls=recheck_urls)
        self.collect_leftovers()
        return report

    @translates_storage_errors
    def put_product(self, record: ProductRecord, *, uploads: Sequence[tuple[bytes, str]] = ()
                    ) -> tuple[ProductView, IndexingReport, bool]:
        """Create or update one product and embed its new images now (beside any batch run).

        Args:
            uploads: (bytes, image format) of image files sent with the request, already
                checked to decode: kept in the uploads folder (DATA_DIR/uploads or
                VISUALSEARCH_UPLOADS) and added to the record's images.

        Returns:
            (the product as stored, the indexing report, whether it was created).

        Raises:
            InvalidRequestError: a value the catalogue cannot store (too long, a NUL
                character: :meth:`ProductRecord.check`); nothing is written.
        """
        try:
            record.check()
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        self._require_writable()
        with self.sessions() as session:
            created = not catalogue.product_exists(session, record.sku)
        kept: list[str] = []
        try:
            for data, image_format in uploads:
                kept.append(self.uploads.keep(data, image_format))
            record.images = [*record.images, *kept]
            report = self._on_current_generation(lambda: index_records(
                self, [[record]], exclusive=False, merge_limit=API_MERGE_LIMIT, flush_rows=1 << 30))
        except BaseException:
            self._remove_owned_files(kept)  # the write failed: keep no file nothing names
            raise
        return self.product(record.sku), report, created

    @translates_storage_errors
    def remove(self, skus: Sequence[str]) -> RemoveResult:
        """Delete products, their vectors and the files of theirs this data directory owns."""
        self._require_writable()
        if self.store() is None:
            return RemoveResult([], list(skus))
        deleted, paths = self._on_current_generation(lambda: CatalogueWriter(
            self.session, self.writable_store(), merge_limit=API_MERGE_LIMIT).delete_products(list(skus)))
        self._remove_owned_files(paths)
        removed = set(deleted)
        return RemoveResult(deleted, [sku for sku in skus if sku not in removed])

    @translates_storage_errors
    def remove_image(self, sku: str, image_id: int, *, wait: float = DEFAULT_LOCK_TIMEOUT) -> ProductView:
        """Delete one image of a product: its catalogue row, its vector, and its upload file
        once no image names that file any more. The product itself stays (even with no image).

        Returns:
            The product as now stored.

        Raises:
            ProductNotFoundError: unknown SKU.
            ImageNotFoundError: ``image_id`` is not an image of that product.
        """
        self._require_writable()
        if self.store() is None:  # nothing was ever embedded here: no vector to delete
            with self.session() as session:
                path = catalogue.delete_image(session, sku, image_id)
        else:
            path = self._on_current_generation(lambda: CatalogueWriter(
                self.session, self.writable_store(), merge_limit=API_MERGE_LIMIT,
                lock_timeout=wait).delete_image(sku, image_id))
        self._remove_owned_files([path])
        return self.product(sku)

    @translates_storage_errors
    def remove_many(self, skus: Iterable[str], *, wait: float = DEFAULT_LOCK_TIMEOUT,
                    batch_size: int = REMOVE_BATCH) -> RemoveSummary:
        """Delete products by SKU from a stream of any length (a file of millions of SKUs),
        one commit per batch, with their vectors and the files of theirs this data directory owns.

        Args:
            wait: seconds to wait for another writer's commit lock.

        Raises:
            WriterBusyError: another writer kept the commit lock for ``wait`` seconds (the
                batches before stay removed).
        """
        self._require_writable()
        summary = RemoveSummary()
        for batch in batched(skus, batch_size):
            deleted, paths = [], []
            if self.store() is not None:
                deleted, paths = self._on_current_generation(lambda: CatalogueWriter(
                    self.session, self.writable_store(), lock_timeout=wait).delete_products(batch))
            self._remove_owned_files(paths)
            summary.add(batch, deleted)
        return summary

    # --- keeping the catalogue in sync with a manifest (see visualsearch.sync) ---------

    @translates_storage_errors
    def plan(self, manifest: str | Path, *, prune: bool = False, policy: PrunePolicy | None = None,
             check_files: bool = True, manifest_format: str | None = None) -> SyncPlan:
        """What indexing ``manifest`` would do; writes nothing (see :func:`visualsearch.sync.plan_manifest`)."""
        return plan_manifest(manifest, sessions=self.sessions, prune=prune, policy=policy, check_files=check_files,
                             manifest_format=manifest_format)

    @translates_storage_errors
    def sync(self, manifest: str | Path, *, policy: PrunePolicy | None = None, progress: Progress | None = None,
             wait: float = 0.0, embedding: ImageEmbedding | None = None, manifest_format: str | None = None,
             on_prune: Callable[[PruneCounts], None] | None = None, recheck_urls: bool = False,
             engine: str = "local", ray_address: str | None = None) -> SyncReport:
        """Index ``manifest``, then prune what it does not name: the products it does not
        list and the images of listed products it no longer names.

        The prune is checked against ``policy`` before the index run (so a refused prune
        writes nothing at all) and again, on the catalogue the run left, before deleting.

        Args:
            policy: how much the prune may remove (default :class:`~visualsearch.sync.PrunePolicy`).
            on_prune: called with the counts just before anything is deleted.
            progress, wait, embedding, manifest_format, recheck_urls, engine, ray_address: as for
                :meth:`index`.

        Raises:
            PruneRefusedError: the policy refuses the prune, or the manifest file changed
                during the run (what the index run wrote stays).
            Everything :meth:`index` raises.
        """
        self._require_writable()
        policy = policy or PrunePolicy()
        with ManifestKeys() as keys:
            keys.load(manifest, manifest_format=manifest_format)
            policy.check(keys.find_prunable(self.sessions))
            report = self.index(manifest, progress=progress, wait=wait, embedding=embedding,
                                manifest_format=manifest_format, recheck_urls=recheck_urls, engine=engine,
                                ray_address=ray_address)
            keys.check_manifest_unchanged()
            pruned = self.prune(keys, policy=policy, wait=wait, on_prune=on_prune)
        return SyncReport(report, pruned)

    @translates_storage_errors
    def prune(self, keys: ManifestKeys, *, policy: PrunePolicy | None = None, wait: float = 0.0,
              on_prune: Callable[[PruneCounts], None] | None = None) -> PruneResult:
        """Delete what the manifest loaded into ``keys`` does not name (holding the run lock).

        Raises:
            PruneRefusedError: ``policy`` refuses it (nothing is deleted).
            WriterBusyError: another batch run kept the run lock for ``wait`` seconds.
        """
        self._require_writable()
        with self.index_lock(wait):
            counts = keys.find_prunable(self.sessions)
            (policy or PrunePolicy()).check(counts)
            if on_prune is not None:
                on_prune(counts)
            if not counts.products and not counts.images:
                return PruneResult()

            def writer() -> CatalogueWriter:
                return CatalogueWriter(self.session, self.writable_store())

            products = product_images = images = 0
            for skus in keys.prunable_skus():
                deleted, paths = self._on_current_generation(lambda: writer().delete_products(skus))
                self._remove_owned_files(paths)
                products, product_images = products + len(deleted), product_images + len(paths)
            for keyed in keys.prunable_images():  # (id, product id, path): deleted only if all still match
                paths = self._on_current_generation(lambda: writer().delete_images(keyed))
                self._remove_owned_files(paths)
                images += len(paths)
            self.writable_store().maintain()
        logger.info("pruned %d products (%d images) and %d images", products, product_images, images)
        return PruneResult(products=products, product_images=product_images, images=images)

    def _remove_owned_files(self, paths: Sequence[str]) -> None:
        """Uploads kept by the API live in the uploads folder: delete those no image names
        any more (a file is named by its content hash, so two products may share one)."""
        for path in paths:
            if not self.uploads.owns(path):
                continue
            with self.sessions() as session:
                if catalogue.path_is_referenced(session, path):
                    continue
            self.uploads.remove(path)

    @translates_storage_errors
    def search(self, image: ImageSource, *, top_k: int = 10, offset: int = 0, filters: SearchFilters | None = None,
               crop: Crop | None = None, exclude_image_ids: Collection[int] = ()) -> SearchResult:
        """See :func:`visualsearch.search.search_image`."""
        return search_image(self, image, top_k=top_k, offset=offset, filters=filters, crop=crop,
                            exclude_image_ids=exclude_image_ids)

    @translates_storage_errors
    def image_ids_by_path(self, paths: Iterable[str]) -> dict[str, list[int]]:
        """The ids of the catalogue images stored under each of ``paths`` (as the manifest
        reader stores them: absolute, normalised paths, or URLs as written); a path no image
        names is left out. Several products may name one file."""
        with self.sessions() as session:
            return catalogue.image_ids_by_path(session, paths)

    @translates_storage_errors
    def similar(self, sku: str, *, top_k: int = 10, offset: int = 0,
                filters: SearchFilters | None = None) -> SearchResult:
        """See :func:`visualsearch.search.similar_products`."""
        return similar_products(self, sku, top_k=top_k, offset=offset, filters=filters)

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
    def image_file(self, image_id: int) -> Path | bytes | None:
        """The file of an indexed image (only indexed images are ever served): its path, or
        its bytes for an upload kept in an object store (VISUALSEARCH_UPLOADS=s3://...)."""
        with self.sessions() as session:
            row = catalogue.get_image(session, image_id)
            if row is None or ImageStatus(row.status) != ImageStatus.INDEXED:
                return None
            name = row.path
        if is_fsspec_url(name):
            if not self.uploads.owns(name):
                return None  # only our own uploads are read through fsspec
            try:
                return read_file_url(name)[0]
            except FileNotFoundError:
                return None
        path = Path(name)
        return path if path.is_file() else None

    @translates_storage_errors
    def image_url(self, image_id: int) -> str | None:
        """The http(s) URL of an indexed image that was fetched from one (else None)."""
        with self.sessions() as session:
            row = catalogue.get_image(session, image_id)
            if row is None or ImageStatus(row.status) != ImageStatus.INDEXED:
                return None
            path = row.path
        return path if is_image_url(path) and path == path.strip() else None

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
        generation = self._tracker.current()  # the identity of the vectors answering
        identity, store = generation.ref.identity, generation.store()
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
            "recipe": identity.recipe_name if identity else None,
            "recipe_version": identity.recipe_version if identity else None,
            "index": index,
        }

    @translates_storage_errors
    def health(self) -> dict:
        """Cheap figures for load balancers (counters and the manifest; nothing is counted)."""
        with self.sessions() as session:
            counts = catalogue.catalogue_counts(session)
        generation = self._tracker.current()  # the identity of the vectors answering
        identity, store = generation.ref.identity, generation.store()
        manifest = store.manifest if store is not None else None
        return {
            "products": counts.products,
            "indexed_images": counts.indexed,
            # False while the disk refuses writes (read-only, full): searches still work.
            "writable": not self.read_only and self.write_blocked is None,
            "backbone": identity.backbone if identity else None,
            "recipe": identity.recipe_name if identity else None,
            "index": None if manifest is None else {"type": manifest.index_type, "vectors": store.count,
                                                    "recall_at_10": manifest.tuning.recall_at_10},
        }

    @translates_storage_errors
    def compact(self, *, force: bool = False, wait: float = 0.0) -> dict:
        """Merge segments, drop dead rows, re-plan the index when the catalogue outgrew it.

        Args:
            wait: seconds to wait for a batch run (index, prune, compact, rebuild) to finish.

        Raises:
            WriterBusyError: another batch run kept the data directory's run lock.
        """
        self._require_writable()
        with self.index_lock(wait):
            return self._compact(force=force)

    def _compact(self, *, force: bool) -> dict:
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
    def rebuild_index(self, *, plan: IndexPlan | None = None, wait: float = 0.0) -> dict:
        """Re-plan and rebuild the ANN index from the stored vectors (no model work).

        Args:
            wait: seconds to wait for a batch run (index, prune, compact, rebuild) to finish.

        Raises:
            WriterBusyError: another batch run kept the data directory's run lock.
        """
        self._require_writable()
        with self.index_lock(wait):
            return self._rebuild_index(plan)

    def _rebuild_index(self, plan: IndexPlan | None) -> dict:
        store = self.store()
        if store is None:
            return {"rebuilt": False}
        store.rebuild(plan=plan)
        return {"rebuilt": True, **self._index_summary(store)}

    @translates_storage_errors
    def reembed(self, *, backbone: str | None = None, recipe: str | None = None, weights: str | None = None,
                wait: float = 0.0, drop_old: bool = False, force: bool = False,
                progress: Progress | None = None) -> ReembedReport:
        """Build the vectors of another backbone or recipe beside the current ones, then switch to them
        (see :func:`visualsearch.reembed.reembed`); searches and API writes go on meanwhile.
        A run that switches never drops the old vectors (servers still load the new ones)."""
        self._require_writable()
        return reembed(self, backbone=backbone, recipe=recipe, weights=weights, wait=wait, drop_old=drop_old,
                       force=force, progress=progress)

    @translates_storage_errors
    def drop_old_generations(self, *, wait: float = 0.0, force: bool = False) -> list[str]:
        """Delete the vectors of the generations a re-embedding replaced; refused within
        :data:`~visualsearch.reembed.DROP_GRACE` of the switch unless ``force`` (see
        :func:`visualsearch.reembed.drop_old_generations`)."""
        self._require_writable()
        return drop_old_generations(self, wait=wait, force=force)

    @translates_storage_errors
    def collect_leftovers(self) -> list[str]:
        """Delete what crashed writers left: the store's (see VectorStore.collect_leftovers)
        and half-written uploads. Returns the names removed."""
        if self.read_only:
            return []
        removed = self.uploads.collect_leftovers()
        store = self.store()
        return removed + (store.collect_leftovers() if store is not None else [])

    @staticmethod
    def _index_summary(store: VectorStore) -> dict:
        numbers = store.stats()
        return {"index_type": numbers.index_type, "vectors": numbers.vectors, "segments": numbers.segments,
                "tuning": numbers.tuning}


def _identity_kwargs(identity: EmbedderIdentity) -> dict:
    return {"backbone": identity.backbone, "weights_sha256": identity.weights_sha256, "dim": identity.dim,
            "recipe": identity.recipe, "recipe_version": identity.recipe_version,
            "recipe_hash": identity.recipe_hash}


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
