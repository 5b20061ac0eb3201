"""Vector generations: which folder (or Milvus collection) holds the vectors of the
catalogue's current CNN (where each is kept: :mod:`.generation_storage`).

A data directory's first vectors live in the data directory itself (``manifest.json``
and ``vectors/``: generation ``""``, so older data directories need nothing new). A
re-embedding (:mod:`.reembed`) writes the vectors of another backbone beside them, in
``DATA_DIR/generations/<n>-<backbone>/``, and then switches: one catalogue transaction
records the new identity and the meta key :data:`GENERATION_KEY`. Old generations stay
on disk (readable) until ``visualsearch reembed --drop-old``.

Each process follows the switch with a :class:`GenerationTracker`: it loads the new
CNN and vector store while still answering from the old pair, then swaps them in one
assignment. A :class:`GenerationStore` refuses writes once its generation is no longer
current, so a write racing the switch is retried on the new one rather than lost. The
requests pinned to the old generation (:class:`PinnedTracker`) keep using it; once the
last ends, nothing refers to it, and a Milvus store's connection is closed as it is
collected (:class:`~.vectors.milvus_store.MilvusVectorStore`): never under a request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from sqlalchemy.orm import Session

from .backbones import weights_sha256
from .catalogue import store as catalogue
from .embedder import Embedder
from .errors import VisualSearchError, WriterBusyError
from .vectors import VectorStore
from .vectors.milvus_store import MilvusTarget, MilvusVectorStore
from .vectors.store import DEFAULT_LOCK_TIMEOUT

logger = logging.getLogger(__name__)

GENERATION_KEY = "vector_generation"      # location of the current vectors (a folder relative to the data dir)
WEIGHTS_PATH_KEY = "weights_path"         # the weights file a reembed was given (found again by readers)
GENERATIONS_DIR = "generations"
# A process whose loading of a new generation failed (a pinned --backbone, missing
# weights) keeps answering from the old one and tries again this much later.
RETRY_FAILED_LOAD_SECONDS = 30.0


class GenerationChangedError(WriterBusyError):
    """A write reached the vectors of a generation that a re-embedding has just replaced
    (the library retries it on the new generation; the API answers 409 if that fails too)."""

    code = "generation_changed"


@dataclass(frozen=True)
class GenerationRef:
    """Where the current vectors are and which network made them (None: nothing indexed yet)."""

    location: str
    identity: catalogue.StoredIdentity | None
    weights_path: str | None = None


def read_generation(session: Session) -> GenerationRef:
    meta = catalogue.get_metas(session, (GENERATION_KEY, WEIGHTS_PATH_KEY, *catalogue.IDENTITY_KEYS))
    return GenerationRef(location=meta.get(GENERATION_KEY) or "", identity=catalogue.identity_from_meta(meta),
                         weights_path=meta.get(WEIGHTS_PATH_KEY))


def matching_weights(identity: catalogue.StoredIdentity, candidates: Sequence[str | None]) -> str | None:
    """The first existing weights file among ``candidates`` whose hash is the identity's."""
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and weights_sha256(Path(candidate)) == identity.weights_sha256:
            return candidate
    return None


def generation_root(data_dir: Path, location: str) -> Path:
    """The folder holding a generation's ``manifest.json`` and ``vectors/``."""
    return data_dir / location if location else data_dir


class _RetiresWithItsGeneration:
    """Refuses writes once another generation is current (mixed into a store class).

    ``is_current`` tells whether the catalogue still names this generation; it is read
    under the store's commit lock, so a switch, which holds that lock, cannot happen in
    between.
    """

    def _follow_generation(self, is_current: Callable[[], bool]) -> None:
        self._is_current = is_current
        self.retired = False

    def _described(self) -> str:
        raise NotImplementedError

    @contextlib.contextmanager
    def writing(self, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
        outermost = self._writer != threading.get_ident()
        with super().writing(timeout):
            if outermost and (self.retired or not self._is_current()):
                self.retired = True
                raise GenerationChangedError(
                    f"the vectors in {self._described()} were replaced by a re-embedding; try again")
            yield


class GenerationStore(_RetiresWithItsGeneration, VectorStore):
    """A generation's FAISS store that refuses writes once another generation is current.

    Args:
        is_current: whether the catalogue still names this generation.
        Other arguments: those of :class:`VectorStore`.
    """

    def __init__(self, root: Path, *, is_current: Callable[[], bool], **kwargs):
        self._follow_generation(is_current)
        super().__init__(root, **kwargs)

    def _described(self) -> str:
        return str(self.data_dir)

    def merge(self, limit: int | None = None) -> None:
        if self.retired:
            return
        try:
            super().merge(limit)
        except GenerationChangedError:
            pass  # nothing reads a retired generation's merges


class MilvusGenerationStore(_RetiresWithItsGeneration, MilvusVectorStore):
    """A generation's Milvus collection that refuses writes once another generation is
    current (as :class:`GenerationStore`).

    Args:
        is_current: as for :class:`GenerationStore`.
        Other arguments: those of :class:`~.vectors.milvus_store.MilvusVectorStore`.
    """

    def __init__(self, target: MilvusTarget, *, is_current: Callable[[], bool], **kwargs):
        self._follow_generation(is_current)
        super().__init__(target, **kwargs)

    def _described(self) -> str:
        return f"Milvus collection {self.collection}"


class Generation:
    """One generation's CNN and vector store, each loaded on first use (thread-safe)."""

    def __init__(self, ref: GenerationRef, *, load_embedder: Callable[[GenerationRef], Embedder],
                 open_store: Callable[[GenerationRef], VectorStore], embedder: Embedder | None = None,
                 store: VectorStore | None = None):
        self.ref = ref
        self._load_embedder = load_embedder
        self._open_store = open_store
        self._embedder = embedder
        self._store = store
        self._lock = threading.RLock()

    @property
    def loaded_embedder(self) -> Embedder | None:
        return self._embedder

    @property
    def loaded_store(self) -> VectorStore | None:
        return self._store

    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._load_embedder(self.ref)
            return self._embedder

    def store(self) -> VectorStore | None:
        """None while nothing was ever indexed here."""
        if self.ref.identity is None:
            return None
        with self._lock:
            if self._store is None:
                self._store = self._open_store(self.ref)
            return self._store


class GenerationTracker:
    """The generation a process answers from, following the catalogue's switches.

    Args:
        read_ref: reads the catalogue's current :class:`GenerationRef`.
        make: builds a (not yet loaded) :class:`Generation` for a ref.
        embedder: an already loaded CNN for the first generation.
    """

    def __init__(self, read_ref: Callable[[], GenerationRef], make: Callable[..., Generation], *,
                 embedder: Embedder | None = None):
        self._read_ref = read_ref
        self._make = make
        self._first_embedder = embedder
        self._current: Generation | None = None
        self._checked = time.monotonic()
        self._lock = threading.Lock()      # assignments of _current (short holds)
        self._loading = threading.Lock()   # one switch at a time (loads a CNN: long holds)
        self._failed: dict[GenerationRef, float] = {}

    def current(self) -> Generation:
        """The generation in use. Until a first identity is claimed, the catalogue is read
        each time (an index run claims it), keeping an embedder already loaded."""
        generation = self._current
        if generation is not None and generation.ref.identity is not None:
            return generation
        ref = self._read_ref()
        with self._lock:
            if self._current is generation and (generation is None or ref.identity is not None):
                embedder = generation.loaded_embedder if generation is not None else self._first_embedder
                self._current = self._make(ref, embedder=embedder)
            return self._current

    def follow(self, max_age: float = 1.0, *, wait: bool = True) -> bool:
        """Adopt the catalogue's generation if it changed, reading the catalogue at most
        once per ``max_age`` seconds. What the current generation has loaded (CNN, store)
        is loaded for the new one first; requests meanwhile answer from the old one.

        Args:
            wait: load now (a write needs the new generation); False: in a background
                thread, so the request that noticed the change is not delayed by it.

        Returns:
            Whether the generation in use changed.

        Raises:
            VisualSearchError: (``wait`` only) the new generation cannot be loaded here,
                e.g. this process pins another --backbone or lacks the new weights (any
                other error of the load, e.g. corrupt weights, is raised as it is). A
                failed load is retried only after :data:`RETRY_FAILED_LOAD_SECONDS`.
        """
        now = time.monotonic()
        if now - self._checked < max_age:
            return False
        self._checked = now
        old = self.current()
        if old.ref.identity is None:
            return False
        ref = self._read_ref()
        if ref == old.ref:
            return False
        if not wait:
            if time.monotonic() < self._failed.get(ref, 0.0) or self._loading.locked():
                return False
            threading.Thread(target=self._switch, args=(ref,), name="visualsearch-generation",
                             daemon=True).start()
            return False
        return self._switch(ref, raise_errors=True)

    def _switch(self, ref: GenerationRef, *, raise_errors: bool = False) -> bool:
        with self._loading:
            old = self._current
            if old is not None and old.ref == ref:
                return False
            try:
                new = self._make(ref)
                if old is not None and old.loaded_embedder is not None:
                    new.embedder()
                if old is not None and old.loaded_store is not None:
                    new.store()
            except Exception as exc:
                # Any failure (missing weights, but also corrupt weights, CUDA out of
                # memory, an unreadable store) is recorded: the next try waits out the
                # back-off rather than starting another full load on the next request.
                self._failed[ref] = time.monotonic() + RETRY_FAILED_LOAD_SECONDS
                logger.log(logging.WARNING if isinstance(exc, VisualSearchError) else logging.ERROR,
                           "cannot load the %s vectors in %s; still answering from the previous ones "
                           "(next try in %.0fs): %s", ref.identity.backbone if ref.identity else "?",
                           ref.location or "the data directory", RETRY_FAILED_LOAD_SECONDS, exc,
                           exc_info=not isinstance(exc, VisualSearchError))
                if raise_errors:
                    raise
                return False
            with self._lock:
                self._current = new
            logger.info("now answering from the %s vectors in %s", ref.identity.backbone if ref.identity else "?",
                        ref.location or "the data directory")
            return True

    def adopt(self, generation: Generation) -> None:
        """Answer from ``generation`` (the process that switched has it loaded already)."""
        with self._loading, self._lock:
            self._current = generation
            self._checked = time.monotonic()

    def pinned(self) -> "PinnedTracker":
        return PinnedTracker(self)


class PinnedTracker:
    """A tracker fixed to one generation (one request never mixes two generations'
    CNN and vectors); :meth:`follow` moves the pin to its parent's latest."""

    def __init__(self, parent: GenerationTracker):
        self._parent = parent
        self._pinned = parent.current()

    def current(self) -> Generation:
        if self._pinned.ref.identity is None:
            self._pinned = self._parent.current()
        return self._pinned

    def follow(self, max_age: float = 1.0, *, wait: bool = True) -> bool:
        self._parent.follow(max_age, wait=wait)
        changed = self._parent.current() is not self._pinned
        self._pinned = self._parent.current()
        return changed

    def adopt(self, generation: Generation) -> None:
        self._parent.adopt(generation)
        self._pinned = generation

    def pinned(self) -> "PinnedTracker":
        return PinnedTracker(self._parent)
