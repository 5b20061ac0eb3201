"""FAISS inner-product index over unit vectors, keyed by the catalogue's 64-bit image ids.

Saving is atomic: the index goes to a new file, then ``manifest.json`` is replaced
(write aside + ``os.replace``) to point at it; a reader sees the old or the new
index, never half of one. The manifest records what produced the vectors, so an
index is never queried with another backbone.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import BackboneMismatchError, IndexCorruptError, InvalidRequestError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Exact search. At catalogue sizes where it gets slow (tens of millions on one CPU),
# an IVF/HNSW factory string goes here; the rest of the code is agnostic of it.
DEFAULT_INDEX_TYPE = "IDMap2,Flat"


@dataclass(frozen=True)
class IndexManifest:
    """What ``manifest.json`` says about the index files beside it."""

    backbone: str
    weights_sha256: str
    dim: int
    index_type: str
    metric: str
    count: int
    index_file: str
    catalogue_revision: int
    updated_at: float
    format: int = MANIFEST_FORMAT

    def check_compatible(self, *, backbone: str, weights_sha256: str, dim: int) -> None:
        """Raise :class:`BackboneMismatchError` unless the vectors came from that network."""
        if backbone != self.backbone:
            raise BackboneMismatchError(
                f"this index was built with backbone {self.backbone!r}, not {backbone!r}: "
                f"query it with --backbone {self.backbone}, or index into a new --data-dir"
            )
        if weights_sha256 != self.weights_sha256 or dim != self.dim:
            raise BackboneMismatchError(
                f"this index was built with other weights for {backbone!r} "
                f"(sha256 {self.weights_sha256[:12]}..., dim {self.dim}), not "
                f"{weights_sha256[:12]}... (dim {dim}): use the same weights file, "
                "or re-index into a new --data-dir"
            )


def read_manifest(directory: Path) -> IndexManifest | None:
    """The manifest in ``directory``, or ``None`` when no index was saved there yet.

    Raises:
        IndexCorruptError: the file exists but is not a manifest we understand.
    """
    path = directory / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"cannot read {path}: {exc}") from None
    try:
        return IndexManifest(**raw)
    except TypeError as exc:
        raise IndexCorruptError(f"{path} is not an index manifest of this version: {exc}") from None


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class VectorIndex:
    """An IDMap2 FAISS index of unit vectors searched by inner product (= cosine).

    Use :meth:`create` for a new index and :meth:`load` for a saved one. An index
    loaded with ``mmap=True`` is read-only (FAISS aborts the process if a memory-mapped
    index is written to, so we refuse first).
    """

    def __init__(self, index: faiss.Index, *, dim: int, read_only: bool = False):
        self._index = index
        self.dim = dim
        self.read_only = read_only

    @classmethod
    def create(cls, dim: int, index_type: str = DEFAULT_INDEX_TYPE) -> "VectorIndex":
        return cls(faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT), dim=dim)

    @property
    def count(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (N, dim) under ``ids`` (N,); an id already present is replaced."""
        self._check_writable()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != len(vectors):
            raise InvalidRequestError(
                f"expected {len(ids)} vectors of dimension {self.dim}, got shape {vectors.shape}"
            )
        if len(np.unique(ids)) != len(ids):
            raise InvalidRequestError("the same id appears twice in one add()")
        if len(ids):
            self._index.remove_ids(ids)  # replace, never duplicate, an id
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``; returns how many were present."""
        self._check_writable()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return int(self._index.remove_ids(ids)) if len(ids) else 0

    def search(self, queries: np.ndarray, k: int,
               allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest ids of each query, best first.

        Args:
            queries: (Q, dim) unit vectors.
            k: neighbours per query (clipped to the index size).
            allowed_ids: restrict the search to these ids (filtering happens inside
                FAISS, so a selective filter still yields ``k`` hits when they exist).

        Returns:
            ``(scores, ids)``, both (Q, k'); missing hits have id -1.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidRequestError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        limit = self.count if allowed_ids is None else min(self.count, len(allowed_ids))
        k = min(k, limit)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self._index.search(queries, k, params=params)
        return scores, ids

    def save(self, directory: Path, *, backbone: str, weights_sha256: str,
             catalogue_revision: int, index_type: str = DEFAULT_INDEX_TYPE) -> IndexManifest:
        """Write the index and its manifest atomically into ``directory``; returns the manifest."""
        directory.mkdir(parents=True, exist_ok=True)
        try:
            previous = read_manifest(directory)
        except IndexCorruptError:
            previous = None  # replaced below; its index file (if any) is left behind
        index_file = f"index-{time.time_ns()}.faiss"
        tmp = directory / f".{index_file}.tmp"
        try:
            faiss.write_index(self._index, str(tmp))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, directory / index_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        manifest = IndexManifest(
            backbone=backbone, weights_sha256=weights_sha256, dim=self.dim,
            index_type=index_type, metric="inner_product", count=self.count,
            index_file=index_file, catalogue_revision=catalogue_revision, updated_at=time.time(),
        )
        _atomic_write_text(directory / MANIFEST_NAME, json.dumps(asdict(manifest), indent=2) + "\n")
        if previous and previous.index_file != index_file:
            # Readers that memory-mapped the old file keep their mapping after unlink.
            (directory / previous.index_file).unlink(missing_ok=True)
        return manifest

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = False) -> tuple["VectorIndex", IndexManifest]:
        """Load the index ``manifest.json`` points at.

        Args:
            mmap: memory-map the vectors (shared between server workers; read-only).

        Raises:
            IndexCorruptError: no manifest, or the index file is missing or unreadable.
        """
        manifest = read_manifest(directory)
        if manifest is None:
            raise IndexCorruptError(f"no index in {directory}: run 'visualsearch index' first")
        path = directory / manifest.index_file
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise IndexCorruptError(f"cannot read vector index {path}: {exc}") from None
        if index.d != manifest.dim:
            raise IndexCorruptError(f"{path} has dimension {index.d}, its manifest says {manifest.dim}")
        return cls(index, dim=manifest.dim, read_only=mmap), manifest

    def _check_writable(self) -> None:
        if self.read_only:
            raise InvalidRequestError("this vector index is memory-mapped read-only; load it without mmap to write")
