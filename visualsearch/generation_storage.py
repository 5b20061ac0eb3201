"""Where each vector generation is kept: a folder of the data directory (the FAISS store) or
a Milvus collection; opened, listed, named and dropped alike, so that re-embedding
(:mod:`.reembed`) works on either.

A generation is named by its ``location`` (recorded in the catalogue, see
:mod:`.generations`): ``""`` for a data directory's first vectors, ``generations/<n>-<name>``
for those a re-embedding made. FAISS keeps them in ``DATA_DIR/<location>``; Milvus in one
collection each, named from the configured collection and the location
(:func:`~.vectors.milvus_store.collection_name`), which records its location.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator

from .catalogue.store import StoredIdentity
from .generations import GENERATIONS_DIR, GenerationStore, MilvusGenerationStore, generation_root
from .settings import Settings
from .vectors import VectorStore
from .vectors.manifest import MANIFEST_NAME
from .vectors.milvus_store import (
    MilvusTarget,
    MilvusVectorStore,
    collection_location,
    collection_name,
    connect,
    milvus_errors,
    parse_vector_store,
    release_client,
)
from .vectors.store import SEGMENTS_DIR

CommitLock = Callable[[float], contextlib.AbstractContextManager[None]]


class GenerationStorage(ABC):
    """The generations' vectors of one deployment, wherever they are kept."""

    @abstractmethod
    def open(self, location: str, identity: StoredIdentity, *, is_current: Callable[[], bool] | None,
             read_only: bool = False, commit_lock: CommitLock | None = None) -> VectorStore:
        """The vector store of generation ``location`` (created empty if missing).

        Args:
            identity: the network its vectors come from (another one recorded there is a
                BackboneMismatchError).
            is_current: whether the catalogue still names this generation; the store then
                refuses writes once it does not (GenerationChangedError). None: a plain
                store, for a generation not switched to yet (a re-embedding's target).
            read_only: refuse writes.
            commit_lock: the lock that orders the writers of a shared store across hosts
                (Milvus; None: a lock of this machine).
        """

    @abstractmethod
    def locations(self) -> list[str]:
        """The generations that have vectors stored, sorted (``""`` first when the first has)."""

    @abstractmethod
    def drop(self, location: str) -> None:
        """Delete the vectors of generation ``location`` (nothing if it has none)."""

    def new_location(self, name: str) -> str:
        """A location no stored generation uses: ``generations/<n>-<name>``, ``n`` one more
        than the highest in use (so generations sort in the order they were made)."""
        numbers = [int(match.group(1)) for location in self.locations()
                   if (match := re.match(rf"{GENERATIONS_DIR}/(\d+)-", location))]
        cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        return f"{GENERATIONS_DIR}/{max(numbers, default=0) + 1}-{cleaned}"


class FolderGenerations(GenerationStorage):
    """FAISS stores in folders of the data directory (the first generation's in the data
    directory itself)."""

    def __init__(self, data_dir: Path, *, memory_budget: int):
        self.data_dir = Path(data_dir)
        self.memory_budget = memory_budget

    def open(self, location: str, identity: StoredIdentity, *, is_current: Callable[[], bool] | None,
             read_only: bool = False, commit_lock: CommitLock | None = None) -> VectorStore:
        # The FAISS store's own file lock orders its writers (it lives on one machine).
        common = dict(backbone=identity.backbone, weights_sha256=identity.weights_sha256, dim=identity.dim,
                      recipe=identity.recipe_name, recipe_hash=identity.recipe_hash,
                      memory_budget=self.memory_budget, read_only=read_only)
        root = generation_root(self.data_dir, location)
        if is_current is None:
            return VectorStore(root, **common)
        return GenerationStore(root, is_current=is_current, **common)

    def locations(self) -> list[str]:
        first = (self.data_dir / MANIFEST_NAME).exists() or (self.data_dir / SEGMENTS_DIR).exists()
        folder = self.data_dir / GENERATIONS_DIR
        others = sorted(f"{GENERATIONS_DIR}/{child.name}" for child in folder.iterdir() if child.is_dir()) \
            if folder.is_dir() else []
        return [""] * first + others

    def drop(self, location: str) -> None:
        """Raises: ValueError for a location outside the data directory's generations."""
        if not location:
            # The manifest first: a reader still on it then sees no vectors, never missing files.
            (self.data_dir / MANIFEST_NAME).unlink(missing_ok=True)
            shutil.rmtree(self.data_dir / SEGMENTS_DIR, ignore_errors=True)
            return
        match = re.fullmatch(rf"{GENERATIONS_DIR}/([^/]+)", location)
        if match is None or match.group(1) in (".", ".."):
            raise ValueError(f"not a generation of the data directory: {location!r}")
        shutil.rmtree(generation_root(self.data_dir, location), ignore_errors=True)


class MilvusGenerations(GenerationStorage):
    """One Milvus collection per generation (see :mod:`.vectors.milvus_store`).

    Args:
        target: the configured Milvus and base collection name.
        lock_dir: the folder of a server store's default commit lock (the data directory).
    """

    def __init__(self, target: MilvusTarget, *, lock_dir: Path):
        self.target = target
        self.lock_dir = Path(lock_dir)

    def open(self, location: str, identity: StoredIdentity, *, is_current: Callable[[], bool] | None,
             read_only: bool = False, commit_lock: CommitLock | None = None) -> VectorStore:
        common = dict(location=location, backbone=identity.backbone, weights_sha256=identity.weights_sha256,
                      dim=identity.dim, recipe=identity.recipe_name, recipe_hash=identity.recipe_hash,
                      lock_dir=self.lock_dir, read_only=read_only, commit_lock=commit_lock)
        if is_current is None:
            return MilvusVectorStore(self.target, **common)
        return MilvusGenerationStore(self.target, is_current=is_current, **common)

    @contextlib.contextmanager
    def _connected(self) -> Iterator[Any]:
        """A client for one listing or drop, closed after it: this storage lives as long as
        its VisualSearch, which nothing closes (pymilvus shares the connection of a URI
        between its clients, so an open store's makes this cheap)."""
        client = connect(self.target)
        try:
            yield client
        finally:
            release_client(client)

    def locations(self) -> list[str]:
        found = []
        with self._connected() as client, milvus_errors(self.target, "list", f"{self.target.collection}*"):
            for name in client.list_collections():
                if name == self.target.collection or name.startswith(f"{self.target.collection}__"):
                    properties = client.describe_collection(name).get("properties") or {}
                    location = collection_location(self.target, name, properties)
                    if location is not None:
                        found.append(location)
        return sorted(found)

    def drop(self, location: str) -> None:
        name = collection_name(self.target.collection, location)
        with self._connected() as client, milvus_errors(self.target, "drop", name):
            if client.has_collection(name):
                client.drop_collection(name)


def generation_storage(settings: Settings, data_dir: Path) -> GenerationStorage:
    """Where this deployment keeps its generations: Milvus when ``settings.vector_store``
    names it, else the data directory's folders (connects to nothing yet)."""
    if settings.vector_store:
        return MilvusGenerations(parse_vector_store(settings.vector_store), lock_dir=data_dir)
    return FolderGenerations(data_dir, memory_budget=settings.index_memory)
