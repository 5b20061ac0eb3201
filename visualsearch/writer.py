"""Writes that touch both the catalogue and the vector store, in the order that keeps them consistent.

The vector store holds the vectors (durably: the index is rebuilt from them); the
catalogue says which images are indexed. Every write holds the store's commit
lock from reading the products' fields to marking the images, so concurrent
writers (a batch ``index`` run and API calls) never interleave halfway:

- new vectors go to the store first, then their images are marked ``indexed``:
  a crash in between leaves vectors of images still ``pending``, which searches
  ignore and the next run re-embeds;
- deletions leave the catalogue first, then the store: a crash (or a full disk, or a
  Milvus server down) in between leaves vectors of images that no longer exist,
  which searches ignore and ``compact`` drops (:meth:`CatalogueWriter.drop_orphan_vectors`).

Either way no search ever shows an image the catalogue does not hold as indexed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from sqlalchemy.orm import Session

from .catalogue import store as catalogue
from .errors import StorageError
from .vectors import VectorRows, VectorStore, row_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedImage:
    """An image whose vector is ready to be committed."""

    image_id: int
    product_id: int
    vector: np.ndarray
    sha256: str
    file_size: int | None
    file_mtime_ns: int | None
    width: int | None
    height: int | None


@dataclass
class PendingWrites:
    """What an indexing run has produced since its last commit, by image id (the same
    image may come twice: rows of one SKU far apart in a manifest; the last wins)."""

    embedded: dict[int, EmbeddedImage] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    refresh_products: set[int] = field(default_factory=set)  # filter fields changed

    def __len__(self) -> int:
        return len(self.embedded) + len(self.failed) + len(self.refresh_products)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.embedded or image_id in self.failed

    def add(self, image: EmbeddedImage) -> None:
        self.failed.pop(image.image_id, None)
        self.embedded[image.image_id] = image

    def fail(self, image_id: int, message: str) -> None:
        self.embedded.pop(image_id, None)
        self.failed[image_id] = message

    def take(self) -> "PendingWrites":
        taken = PendingWrites(self.embedded, self.failed, self.refresh_products)
        self.embedded, self.failed, self.refresh_products = {}, {}, set()
        return taken


class CatalogueWriter:
    """Commits to the catalogue and the vector store together.

    Args:
        session: a factory of catalogue sessions that commit on success.
        store: the writable vector store.
        merge_limit: the largest segment merge a commit may run (None: any).
        lock_timeout: seconds to wait for another writer.
    """

    def __init__(self, session: Callable[[], contextlib.AbstractContextManager[Session]], store: VectorStore, *,
                 merge_limit: int | None = None, lock_timeout: float = 30.0):
        self._session = session
        self.store = store
        self.merge_limit = merge_limit
        self.lock_timeout = lock_timeout

    def commit(self, pending: PendingWrites) -> None:
        """Store the vectors, then mark their images indexed (and the failures failed).

        Raises:
            WriterBusyError: another writer kept the lock.
            OSError, SQLAlchemyError: the disk or the database refused (see the module doc
                for what is then left behind, and why it is harmless).
        """
        if not len(pending):
            return
        with self.store.writing(self.lock_timeout):
            with self._session() as session:
                existing = catalogue.existing_image_ids(session, [*pending.embedded, *pending.failed])
                # A product removed (API DELETE) while its images were being read stays removed.
                embedded = [e for e in pending.embedded.values() if e.image_id in existing]
                failed = [(image_id, message) for image_id, message in pending.failed.items() if image_id in existing]
                refresh = _refresh_pairs(session, pending.refresh_products, {e.image_id for e in embedded})
                fields = catalogue.product_fields(
                    session, [e.product_id for e in embedded] + [product for _, product in refresh])
            refreshed_ids, refreshed_vectors = self.store.get_vectors([image for image, _ in refresh])
            product_of = dict(refresh)
            ids = [e.image_id for e in embedded] + refreshed_ids.tolist()
            products = [e.product_id for e in embedded] + [product_of[i] for i in refreshed_ids.tolist()]
            vectors = np.concatenate([np.stack([e.vector for e in embedded]) if embedded else
                                      np.zeros((0, self.store.dim), np.float32), refreshed_vectors])
            rows = VectorRows.build(
                ids=ids, product_ids=products, vectors=vectors,
                prices=[fields[p].price if p in fields else None for p in products],
                tokens=[_tokens(fields.get(p)) for p in products], dim=self.store.dim,
            )
            # A failed image that used to be indexed must leave the store too.
            self.store.commit(rows, list(pending.failed), merge_limit=self.merge_limit,
                              lock_timeout=self.lock_timeout)
            with self._session() as session:
                catalogue.mark_indexed(session, [_image_columns(e) for e in embedded])
                catalogue.mark_failed(session, failed)
                # The refreshed products' rows all carry the fields read above (a product
                # stamped stale since keeps its newer stamp: its writer refreshes it).
                catalogue.mark_vectors_current(session, {product: fields[product].stale_stamp
                                                         for product in pending.refresh_products
                                                         if product in fields})
        self.store.merge(self.merge_limit)

    def refresh_stale_products(self) -> int:
        """Rewrite the stored fields of products whose last field change never reached the
        store (a crash or a busy lock after the catalogue update). Returns how many."""
        with self._session() as session:
            stale = catalogue.stale_products(session)
        if stale:
            self.commit(PendingWrites(refresh_products=set(stale)))
        return len(stale)

    def delete_products(self, skus: Sequence[str]) -> tuple[list[str], list[str]]:
        """Delete products and their vectors. Returns (deleted SKUs, paths of their images)."""
        with self.store.writing(self.lock_timeout):
            with self._session() as session:
                deleted, vector_ids, paths = catalogue.delete_products(session, skus)
            if vector_ids and not self._delete_vectors(vector_ids, f"{len(deleted)} products"):
                return deleted, paths
        self.store.merge(self.merge_limit)
        return deleted, paths

    def delete_image(self, sku: str, image_id: int) -> str:
        """Delete one image of a product and its vector. Returns the image's path.

        Raises:
            ProductNotFoundError, ImageNotFoundError: unknown SKU, or not an image of it.
        """
        with self.store.writing(self.lock_timeout):
            with self._session() as session:
                path = catalogue.delete_image(session, sku, image_id)
            if not self._delete_vectors([image_id], f"image {image_id}"):
                return path
        self.store.merge(self.merge_limit)
        return path

    def delete_images(self, image_ids: Sequence[int] | Sequence[tuple[int, int, str]]) -> list[str]:
        """Delete images (whatever their product) and their vectors, in one commit: by id,
        or by (image id, product id, path) triples, deleting only rows that still match all
        three (see :func:`~visualsearch.catalogue.store.delete_images`).
        Returns the paths of the images actually deleted."""
        with self.store.writing(self.lock_timeout):
            with self._session() as session:
                deleted = catalogue.delete_images(session, image_ids)
            if deleted and not self._delete_vectors([image_id for image_id, _ in deleted],
                                                     f"{len(deleted)} images"):
                return [path for _, path in deleted]
        self.store.merge(self.merge_limit)
        return [path for _, path in deleted]

    def _delete_vectors(self, vector_ids: Sequence[int], what: str) -> bool:
        """Delete the vectors of rows the catalogue has just deleted (the caller holds the
        lock). Returns False, after a warning, when the store refused: the catalogue step
        is committed and decides what a search shows, so the delete has happened and its
        caller must finish (remove the kept uploads, answer success); the vectors stay
        until ``compact`` drops them as orphans (:meth:`drop_orphan_vectors`). Both stores
        count: the FAISS store fails with OSError (a full disk), Milvus with StorageError
        (the server is down)."""
        try:
            self.store.commit(deletes=vector_ids, merge_limit=self.merge_limit, lock_timeout=self.lock_timeout)
        except (OSError, StorageError) as exc:
            logger.warning("deleted %s; their %d vectors stay until 'visualsearch compact' (%s)",
                           what, len(vector_ids), exc)
            return False
        return True

    def drop_orphan_vectors(self) -> int:
        """Delete the vectors of images the catalogue no longer holds (left by a crash, or
        a full disk, between a delete's catalogue and store steps). Returns how many."""
        with self.store.writing(self.lock_timeout):
            with self._session() as session:
                batches = list(catalogue.image_ids(session))
            known = np.concatenate(batches) if batches else np.zeros(0, np.int64)
            orphans = np.setdiff1d(self.store.alive_ids(), known, assume_unique=True)
            if len(orphans):
                self.store.commit(deletes=orphans.tolist(), lock_timeout=self.lock_timeout)
        return len(orphans)


def _refresh_pairs(session: Session, product_ids: set[int], skip: set[int]) -> list[tuple[int, int]]:
    if not product_ids:
        return []
    return [(image, product) for image, product in catalogue.indexed_images_of_products(session, product_ids)
            if image not in skip]


def _tokens(fields: catalogue.ProductFields | None) -> list[int]:
    if fields is None:
        return []
    return row_tokens(category=fields.category, brand=fields.brand, attributes=fields.attributes)


def _image_columns(image: EmbeddedImage) -> dict:
    return {"id": image.image_id, "sha256": image.sha256, "file_size": image.file_size,
            "file_mtime_ns": image.file_mtime_ns, "width": image.width, "height": image.height}
