"""The vector store in Milvus: one collection per vector generation, shared by every replica.

``VISUALSEARCH_VECTOR_STORE=milvus://HOST:PORT/COLLECTION`` (a Milvus server: replicas on
several hosts share it) or a Milvus Lite file path ending in ``.db`` (one process on one
machine: Milvus Lite locks its file). :class:`MilvusVectorStore` has the methods of
:class:`~.store.VectorStore` that the library uses, with the same results: a row is an
image (int64 primary key) with its product id, its unit vector, its price (nullable) and
its filter tokens (:mod:`.filters`) in an ``ARRAY<INT64>``; the metric is the inner
product, so scores are cosines; filters become Milvus boolean expressions on the scalar
fields (:func:`filter_expression`); every read uses Strong consistency, so a write is
seen by the next search of any replica.

What the FAISS store does itself Milvus does on its own here: it merges its segments
(:meth:`merge` and :meth:`maintain` do nothing), garbage-collects its files
(:meth:`collect_leftovers` finds none) and builds the index it was given (FLAT, exact,
by default; ``?index=HNSW`` / ``IVF_FLAT`` / ``IVF_SQ8`` on the URI for an ANN index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np

from ..errors import ConfigurationError, IndexCorruptError, InvalidRequestError, StorageError, WriterBusyError
from ..file_locks import file_lock
from .filters import SearchFilters
from .manifest import StoreManifest, Tuning
from .planner import IndexPlan
from .segment import VectorRows
from .store import DEFAULT_LOCK_TIMEOUT, StoreHits, StoreStats, _best

logger = logging.getLogger(__name__)

DEFAULT_PORT = 19530
DEFAULT_COLLECTION = "visualsearch"
# Milvus' own limits: an ARRAY field holds at most 4096 elements, a search returns at most
# 16384 hits per query, and a name is letters, digits and underscores (255 at most).
MAX_TOKENS = 4096
MAX_TOP_K = 16_384
MAX_NAME = 255
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")
LITE_CONNECT_SECONDS = 60.0
# Options of ?index=... that tune each search, not the index build (nlist, M, efConstruction).
SEARCH_PARAMS = ("nprobe", "ef")
# Rows per upsert call: well under gRPC's 64 MiB message limit at any vector size.
UPSERT_BYTES = 16 * 1024**2
IDS_PER_CALL = 10_000
PROPERTY = "visualsearch."
FORMAT = "1"
LOCATION_PROPERTY = PROPERTY + "location"  # the generation a collection holds (see collection_location)
INSTALL_HINT = "pip install 'visualsearch[milvus]'"


@dataclass(frozen=True)
class MilvusTarget:
    """Where the collections live (from :func:`parse_vector_store`).

    ``uri`` is what ``pymilvus.MilvusClient`` takes: ``http(s)://host:port`` or a Milvus
    Lite file path; ``collection`` the base name of the collections (one per generation).
    """

    uri: str
    collection: str = DEFAULT_COLLECTION
    token: str = field(default="", repr=False)
    index_type: str = "FLAT"
    index_params: tuple[tuple[str, int], ...] = ()

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://"))

    @property
    def display(self) -> str:
        """The URI without credentials (for messages and stats)."""
        return self.uri if self.lite else f"{self.uri}/{self.collection}"


def parse_vector_store(value: str) -> MilvusTarget:
    """The Milvus target of ``VISUALSEARCH_VECTOR_STORE``.

    Accepts ``milvus://[USER:PASSWORD@]HOST[:PORT][/COLLECTION][?index=HNSW&M=16...]``
    (``milvus+https://`` for TLS) or a Milvus Lite path ending in ``.db`` (relative paths
    are taken from the current directory, like ``--data-dir``).

    Raises:
        ConfigurationError: anything else, a bad collection name or index.
    """
    text = (value or "").strip()
    if not text:
        raise ConfigurationError("VISUALSEARCH_VECTOR_STORE is empty")
    if "://" not in text:
        if not text.endswith(".db"):
            raise ConfigurationError(
                f"VISUALSEARCH_VECTOR_STORE={text!r} is neither milvus://HOST:PORT/COLLECTION nor a Milvus Lite "
                "file path ending in .db")
        return MilvusTarget(uri=str(Path(text).expanduser().resolve()))
    parts = urlsplit(text)
    schemes = {"milvus": "http", "milvus+http": "http", "milvus+https": "https"}
    if parts.scheme not in schemes:
        raise ConfigurationError(f"VISUALSEARCH_VECTOR_STORE: unknown scheme {parts.scheme!r} in {text!r}; "
                                 "use milvus://HOST:PORT/COLLECTION or a Milvus Lite .db path")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigurationError(f"VISUALSEARCH_VECTOR_STORE: bad port in {text!r}") from None
    if not parts.hostname:
        raise ConfigurationError(f"VISUALSEARCH_VECTOR_STORE: no host in {text!r}")
    collection = parts.path.strip("/") or DEFAULT_COLLECTION
    check_name(collection)
    token = ""
    if parts.username:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    options = dict(parse_qsl(parts.query))
    index_type = options.pop("index", "FLAT").upper()
    if index_type not in INDEX_TYPES:
        raise ConfigurationError(f"VISUALSEARCH_VECTOR_STORE: index {index_type!r} is not one of {INDEX_TYPES}")
    try:
        params = tuple(sorted((key, int(number)) for key, number in options.items()))
    except ValueError:
        raise ConfigurationError(f"VISUALSEARCH_VECTOR_STORE: index parameters must be integers in {text!r}") \
            from None
    return MilvusTarget(uri=f"{schemes[parts.scheme]}://{host}:{port}", collection=collection, token=token,
                        index_type=index_type, index_params=params)


def check_name(name: str) -> str:
    """Raise ConfigurationError unless ``name`` is a valid Milvus collection name."""
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise ConfigurationError(f"{name!r} is not a Milvus collection name (a letter or _, then letters, "
                                 f"digits or _; at most {MAX_NAME})")
    return name


def collection_name(base: str, location: str) -> str:
    """The collection of one vector generation: ``base`` for the first (``""``), else
    ``base`` + the location's letters and digits + a hash of it (no two locations collide)."""
    if not location:
        return base
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", location).strip("_")[:80]
    digest = hashlib.blake2b(location.encode(), digest_size=4).hexdigest()
    return check_name(f"{base}__{cleaned}_{digest}")


def collection_location(target: MilvusTarget, name: str, properties: dict) -> str | None:
    """The generation (``location``) whose vectors collection ``name`` holds, from its
    properties; None for a collection not made by visualsearch for ``target``'s base name
    (or made before collections recorded their location)."""
    if properties.get(PROPERTY + "format") != FORMAT:
        return None
    if name == target.collection:
        return ""
    location = properties.get(LOCATION_PROPERTY) or ""
    return location if location and collection_name(target.collection, location) == name else None


def connect(target: MilvusTarget, collection: str | None = None):
    """A ``pymilvus.MilvusClient`` for ``target`` (``collection``: named in errors).

    Raises:
        ConfigurationError: pymilvus is not installed, or a Milvus Lite file another process holds.
        StorageError: Milvus is unreachable.
    """
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ConfigurationError(f"VISUALSEARCH_VECTOR_STORE names Milvus but pymilvus is not installed: "
                                 f"{INSTALL_HINT}") from None
    with milvus_errors(target, "connect to", collection or target.collection), _CONNECTIONS:
        _close_retired_clients()
        try:
            # A Lite file starts its server in-process: on a busy machine that has taken
            # more than pymilvus' 10 s default (seen in CI); nothing remote can hang here.
            return MilvusClient(uri=target.uri, token=target.token, timeout=LITE_CONNECT_SECONDS if target.lite
                                else None)
        except Exception as exc:
            if target.lite and "Open local milvus failed" in str(exc):
                raise ConfigurationError(
                    f"cannot open the Milvus Lite file {target.uri}: is another process using it? Milvus "
                    "Lite serves one process; for several, run a Milvus server (or `milvus-lite server`) and "
                    "use milvus://HOST:PORT/COLLECTION") from None
            raise


@contextlib.contextmanager
def milvus_errors(target: MilvusTarget, doing: str, collection: str) -> Iterator[None]:
    """Milvus' errors (a server down, a refused request) as the library's StorageError."""
    try:
        from pymilvus.exceptions import MilvusException
    except ImportError:  # (only in connect, which reports it)
        MilvusException = ()  # noqa: N806
    try:
        yield
    except MilvusException as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise StorageError(f"Milvus ({target.display}) failed to {doing} collection {collection}: {message}") \
            from exc


def filter_expression(filters: SearchFilters | None) -> str:
    """The Milvus boolean expression of ``filters`` ("" for none): a product passes when
    it has one token of every field's values, and a price in the range (a product with
    no price fails any price bound, as in the FAISS store where NaN compares false)."""
    if filters is None:
        return ""
    parts = [f"array_contains_any(tokens, [{', '.join(str(int(t)) for t in group)}])"
             for group in filters.token_groups()]
    if filters.min_price is not None:
        parts.append(f"price >= {float(filters.min_price)!r}")
    if filters.max_price is not None:
        parts.append(f"price <= {float(filters.max_price)!r}")
    return " and ".join(parts)


def local_commit_lock(path: Path) -> Callable[[float], contextlib.AbstractContextManager[None]]:
    """A commit lock for the processes of one machine: ``flock`` on ``path`` (see
    :func:`~visualsearch.file_locks.file_lock`)."""

    @contextlib.contextmanager
    def hold(timeout: float) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path, timeout, f"another process has held {path} for {timeout:.0f}s; try again later"):
            yield

    return hold


@dataclass(frozen=True)
class MilvusManifest(StoreManifest):
    """The identity recorded in a collection's properties, shaped as the FAISS manifest."""

    collection: str = ""
    milvus_index: str = "FLAT"

    @property
    def index_type(self) -> str:
        return f"Milvus {self.milvus_index}" + (" (exact)" if self.milvus_index == "FLAT" else "")


class MilvusVectorStore:
    """The vectors of one generation, in one Milvus collection (created by the first commit).

    Args:
        target: where (:func:`parse_vector_store`).
        location: the generation (``ref.location``; ``""`` for the first), naming the collection.
        backbone, weights_sha256, dim, recipe, recipe_hash: the network the vectors come from,
            recorded in the collection's properties; another is a :class:`BackboneMismatchError`.
        read_only: refuse writes.
        commit_lock: ``commit_lock(timeout)`` is a context manager held by :meth:`writing`
            that excludes the other writers of this collection (raising WriterBusyError
            after ``timeout`` s). Default: :func:`local_commit_lock` on a file next to the
            Milvus Lite file, or in ``lock_dir`` for a server (which then excludes the
            writers of this machine only).
        lock_dir: the folder of the default lock for a server (the data directory).

    Raises:
        ConfigurationError: pymilvus is not installed, or no lock for a server.
        BackboneMismatchError, StorageError: from :meth:`refresh`.
    """

    def __init__(self, target: MilvusTarget, *, backbone: str, weights_sha256: str, dim: int, location: str = "",
                 recipe: str | None = None, recipe_hash: str | None = None, read_only: bool = False,
                 commit_lock: Callable[[float], contextlib.AbstractContextManager[None]] | None = None,
                 lock_dir: Path | None = None):
        self.target = target
        self.location = location
        self.collection = collection_name(target.collection, location)
        self.identity = {"backbone": backbone, "weights_sha256": weights_sha256, "dim": dim}
        self.recipe = {"recipe": recipe, "recipe_hash": recipe_hash}
        self.dim = dim
        self.read_only = read_only
        self.data_dir = Path(target.uri) if target.lite else Path(lock_dir or ".")  # for messages
        if commit_lock is None:
            if target.lite:
                lite = Path(target.uri)
                commit_lock = local_commit_lock(lite.parent / f".{lite.name}.{self.collection}.lock")
            elif lock_dir is not None:
                commit_lock = local_commit_lock(Path(lock_dir) / f".milvus-{self.collection}.lock")
            else:
                raise ConfigurationError("a Milvus server store needs a commit_lock or a lock_dir")
        self._commit_lock = commit_lock
        self._write_mutex = threading.Lock()
        self._held = None  # what the commit lock yielded while held
        self._writer: int | None = None
        self._manifest: MilvusManifest | None = None
        self._client = self._connect()
        # The connection is released by close(), or once nothing can use this store any more
        # (it was garbage-collected: e.g. the store of a generation a re-embedding retired,
        # after the last request pinned to that generation ended).
        self._closer = weakref.finalize(self, _close_client, self._client)
        self._closer.atexit = False  # (the process's end closes its sockets anyway)
        self.refresh()

    def _connect(self):
        return connect(self.target, self.collection)

    def _errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return milvus_errors(self.target, doing, self.collection)

    def close(self) -> None:
        """Release the connection to Milvus (pymilvus shares one between the clients of a
        URI and closes it with the last); the store cannot be used afterwards."""
        self._closer()  # queues the client (see _CONNECTIONS) ...
        with _CONNECTIONS:
            _close_retired_clients()  # ... and closes it now

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    # --- identity --------------------------------------------------------------------

    @property
    def manifest(self) -> MilvusManifest | None:
        """The collection's recorded identity, or None while nothing was committed."""
        if self._manifest is None:
            self.refresh()
        return self._manifest

    def refresh(self) -> None:
        """Find the collection (another replica may have created it) and check its identity;
        searches always read Milvus' latest state, so there is nothing else to adopt."""
        if self._manifest is not None:
            return
        with self._errors("open"):
            if not self._client.has_collection(self.collection):
                return
            description = self._client.describe_collection(self.collection)
            manifest = self._read_manifest(description, self._index_type())
            manifest.check_compatible(**self.identity)
            if self._client.get_load_state(self.collection).get("state") is not _loaded():
                self._client.load_collection(self.collection)
        self._manifest = manifest

    def _index_type(self) -> str | None:
        """The type of the index the collection has on its vectors (None: none)."""
        index = self._client.describe_index(self.collection, "vector") or {}
        return index.get("index_type") or None

    def _read_manifest(self, description: dict, index_type: str | None) -> MilvusManifest:
        properties = description.get("properties") or {}
        if properties.get(PROPERTY + "format") != FORMAT:
            raise IndexCorruptError(f"Milvus collection {self.collection} at {self.target.display} was not made by "
                                    "this version of visualsearch: drop it or configure another collection name")
        vector = next((f for f in description.get("fields", []) if f.get("name") == "vector"), {})
        dim = int((vector.get("params") or {}).get("dim", 0))
        return MilvusManifest(
            backbone=properties.get(PROPERTY + "backbone", ""),
            weights_sha256=properties.get(PROPERTY + "weights_sha256", ""), dim=dim,
            recipe=properties.get(PROPERTY + "recipe") or None,
            recipe_hash=properties.get(PROPERTY + "recipe_hash") or None,
            plan={}, tuning=Tuning(), collection=self.collection, milvus_index=index_type or "none")

    def _index_params(self):
        """The configured index on the vectors (``?index=`` and its parameters)."""
        index = self._client.prepare_index_params()
        build = {key: value for key, value in self.target.index_params if key not in SEARCH_PARAMS}
        index.add_index(field_name="vector", index_type=self.target.index_type, metric_type="IP", params=build)
        return index

    def _create(self) -> None:
        """Create the collection with its schema, index and identity (caller holds the lock)."""
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("product_id", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("tokens", DataType.ARRAY, element_type=DataType.INT64, max_capacity=MAX_TOKENS)
        schema.add_field("price", DataType.DOUBLE, nullable=True)
        properties = {PROPERTY + "format": FORMAT, **{PROPERTY + k: str(v) for k, v in self.identity.items()},
                      **{PROPERTY + k: v for k, v in self.recipe.items() if v}}
        if self.location:
            properties[LOCATION_PROPERTY] = self.location
        with self._errors("create"):
            try:
                self._client.create_collection(self.collection, schema=schema, index_params=self._index_params(),
                                               consistency_level="Strong", properties=properties)
            except Exception:
                if not self._client.has_collection(self.collection):
                    raise  # (else another host's replica created it first: use it)
        self.refresh()

    # --- reading ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Live vectors."""
        if self.manifest is None:
            return 0
        with self._errors("count"):
            rows = self._client.query(self.collection, filter="", output_fields=["count(*)"],
                                      consistency_level="Strong")
        return int(rows[0]["count(*)"]) if rows else 0

    def alive_ids(self) -> np.ndarray:
        """Every id with a live vector, ascending."""
        if self.manifest is None:
            return np.zeros(0, np.int64)
        found = []
        with self._errors("list the ids of"):
            iterator = self._client.query_iterator(self.collection, batch_size=IDS_PER_CALL, filter="",
                                                   output_fields=["id"], consistency_level="Strong")
            try:
                while batch := iterator.next():
                    found.append(np.fromiter((row["id"] for row in batch), np.int64, len(batch)))
            finally:
                iterator.close()
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def get_vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids found, their vectors) for the live rows of ``ids`` (in the order asked)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.manifest is None or not len(ids):
            return ids[:0], np.zeros((0, self.dim), np.float32)
        vectors: dict[int, list[float]] = {}
        unique = np.unique(ids).tolist()
        with self._errors("read vectors of"):
            for start in range(0, len(unique), IDS_PER_CALL):
                for row in self._client.get(self.collection, ids=unique[start:start + IDS_PER_CALL],
                                            output_fields=["vector"], consistency_level="Strong"):
                    vectors[int(row["id"])] = row["vector"]
        found = np.fromiter((i in vectors for i in ids.tolist()), bool, len(ids))
        out = np.array([vectors[i] for i in ids[found].tolist()], dtype=np.float32).reshape(-1, self.dim)
        return ids[found], out

    def search(self, queries: np.ndarray, k: int, filters: SearchFilters | None = None, *,
               nprobe: int | None = None, rerank: int | None = None) -> StoreHits:
        """The ``k`` best images for ``queries`` (several queries: an image's best score
        counts), best first, with cosine scores; at most :data:`MAX_TOP_K` (Milvus' limit).

        Args:
            nprobe: lists searched by an IVF index (default: its own); ``rerank``: unused.

        Raises:
            InvalidRequestError: queries of the wrong shape.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidRequestError(f"queries must have shape (n, {self.dim}), got {queries.shape}")
        empty = StoreHits(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        limit = min(int(k), MAX_TOP_K)
        if limit <= 0 or not len(queries) or self.manifest is None:
            return empty
        with self._errors("search"):
            results = self._client.search(
                self.collection, data=queries.tolist(), limit=limit, filter=filter_expression(filters),
                output_fields=["product_id"], search_params=self._search_params(limit, nprobe),
                consistency_level="Strong")
        ids, products, scores = [], [], []
        for hits in results:
            for hit in hits:
                ids.append(hit["id"])
                products.append(hit["entity"]["product_id"])
                scores.append(hit["distance"])
        if not ids:
            return empty
        return _best(np.asarray(ids, np.int64), np.asarray(products, np.int64), np.asarray(scores, np.float32),
                     limit)

    def _search_params(self, limit: int, nprobe: int | None) -> dict:
        params: dict[str, int] = {}
        index_type = self.manifest.milvus_index if self.manifest is not None else self.target.index_type
        if index_type.startswith("IVF"):
            params["nprobe"] = nprobe or dict(self.target.index_params).get("nprobe", 16)
        elif index_type == "HNSW":
            params["ef"] = max(limit, dict(self.target.index_params).get("ef", 64))
        return {"metric_type": "IP", "params": params}

    # --- writing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the commit lock (between processes and threads), identity checked.

        Raises:
            WriterBusyError: another writer held it for ``timeout`` seconds.
        """
        if self.read_only:
            raise InvalidRequestError("this vector store was opened read-only")
        if self._writer == threading.get_ident():
            yield  # nested: the caller already holds the lock
            return
        started = time.monotonic()
        if not self._write_mutex.acquire(timeout=max(timeout, 0.001)):
            raise WriterBusyError(f"the Milvus collection {self.collection} is busy; try again")
        try:
            with self._commit_lock(max(timeout - (time.monotonic() - started), 0.0)) as held:
                self._writer = threading.get_ident()
                # An advisory lock (catalogue.locks.HeldLock) can be lost with its connection:
                # each commit checks it is still held before it writes.
                self._held = held
                try:
                    self.refresh()
                    yield
                finally:
                    self._writer = None
                    self._held = None
        finally:
            self._write_mutex.release()

    def commit(self, upserts: VectorRows | None = None, deletes: Sequence[int] = (), *,
               merge_limit: int | None = None, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        """Upsert ``upserts`` (replacing rows of the same ids) and delete ``deletes`` (ids also
        upserted stay, with their new row). Unlike the FAISS store's one-file commit point,
        the deletes and each batch of upserts are separate Milvus calls: a crash in between
        leaves the earlier ones done (the catalogue, marked afterwards, repairs it).

        Raises:
            InvalidRequestError: a row with more than :data:`MAX_TOKENS` filter tokens.
            WriterBusyError: the commit lock stayed busy.
            StorageError: Milvus refused or is unreachable.
        """
        upserts = upserts if upserts is not None else VectorRows.empty(self.dim)
        lengths = np.diff(upserts.token_offsets)
        if len(lengths) and int(lengths.max()) > MAX_TOKENS:
            too_many = upserts.ids[lengths > MAX_TOKENS].tolist()
            raise InvalidRequestError(
                f"images {too_many[:10]} have more than {MAX_TOKENS} category/brand/attribute values, the most a "
                "Milvus array field holds: give their products fewer attribute values")
        deletes = np.setdiff1d(np.asarray(deletes, np.int64), upserts.ids)
        if not len(upserts) and not len(deletes):
            return
        with self.writing(lock_timeout):
            if self._held is not None and hasattr(self._held, "check"):
                self._held.check()
            if self._manifest is None:
                self._create()
            with self._errors("write to"):
                for start in range(0, len(deletes), IDS_PER_CALL):
                    self._client.delete(self.collection, ids=deletes[start:start + IDS_PER_CALL].tolist())
                batch = max(1, UPSERT_BYTES // (self.dim * 4 + 64 + 8 * int(lengths.mean() if len(lengths) else 0)))
                for start in range(0, len(upserts), batch):
                    self._client.upsert(self.collection, _records(upserts, start, start + batch))
                if self.target.lite:
                    # Milvus Lite scans unflushed rows in Python: a search over 5,000 of them took
                    # 500 ms, 25 ms once flushed. (A server flushes by itself; flushing there on
                    # every write would only make tiny segments.)
                    self._client.flush(self.collection)

    def merge(self, limit: int | None = None) -> None:
        """Nothing to do: Milvus merges its segments itself (auto-compaction)."""

    def maintenance(self) -> str | None:
        """None: Milvus maintains its own segments and index."""
        return None

    def maintain(self) -> str | None:
        """Nothing to do (see :meth:`maintenance`)."""
        return None

    def compact(self, *, force_merge: bool = True) -> bool:
        """Flush the collection and have Milvus compact it (drop deleted rows, merge small
        segments), waiting up to a minute. Returns whether a compaction ran."""
        if self.read_only or self.manifest is None:
            return False
        with self._errors("compact"):
            self._client.flush(self.collection)
            job = self._client.compact(self.collection)
            deadline = time.monotonic() + 60
            while job and time.monotonic() < deadline:
                if str(self._client.get_compaction_state(job)).lower() == "completed":
                    break
                time.sleep(0.2)
        return bool(job)

    def rebuild(self, *, plan: IndexPlan | None = None, tune: bool = True, seed: int = 1234) -> IndexPlan:
        """Milvus builds its index itself: this gives the collection the configured one
        (``?index=``) when it has another (e.g. it was created before ``?index=`` changed)
        or none, and reports it. No model work.

        Raises:
            ConfigurationError: a ``plan`` asking for another index (set the index with
                ``?index=`` on ``VISUALSEARCH_VECTOR_STORE``).
        """
        flat = self.target.index_type == "FLAT"
        if plan is not None and (plan.kind == "flat") != flat:
            raise ConfigurationError(f"the Milvus collection {self.collection} uses index {self.target.index_type}; "
                                     "choose another with ?index= on VISUALSEARCH_VECTOR_STORE")
        count = self.count
        if self.manifest is not None and not self.read_only:
            with self.writing(), self._errors("index"):
                current = self._index_type()
                if current != self.target.index_type:
                    logger.info("Milvus collection %s: replacing its %s index with %s", self.collection,
                                current or "missing", self.target.index_type)
                    # Milvus changes the index of a released collection only.
                    self._client.release_collection(self.collection)
                    if current is not None:
                        self._client.drop_index(self.collection, "vector")
                    self._client.create_index(self.collection, self._index_params())
                    self._client.load_collection(self.collection)
                self._note_index(self.target.index_type)
        return IndexPlan(kind="flat" if flat else self.target.index_type.lower(), dim=self.dim, planned_for=count,
                         nlist=dict(self.target.index_params).get("nlist", 0))

    def collect_leftovers(self) -> list[str]:
        """[]: Milvus removes its own unused files."""
        return []

    def warm_page_cache(self, *, stop=None) -> int:
        """0: the vectors live in Milvus, which loads its collections itself."""
        return 0

    def stats(self) -> StoreStats:
        """The live vector count and Milvus' index; ``rows`` is Milvus' row count (which may
        still include deleted rows until it compacts); segments and disk are Milvus' own
        business (0 here)."""
        vectors = self.count
        rows = vectors
        index: dict = {}
        if self.manifest is not None:
            with self._errors("describe"):
                rows = int(self._client.get_collection_stats(self.collection).get("row_count", vectors))
                index = self._client.describe_index(self.collection, "vector") or {}
            self._note_index(index.get("index_type") or "none")  # (another replica may have rebuilt it)
        # The index the collection has (until the first commit creates it: the configured one).
        manifest = self.manifest or MilvusManifest("", "", self.dim, milvus_index=self.target.index_type)
        plan = {"backend": "milvus", "uri": self.target.display, "collection": self.collection,
                "index_type": manifest.milvus_index, "configured_index_type": self.target.index_type,
                "metric_type": index.get("metric_type", "IP")}
        return StoreStats(vectors=vectors, rows=max(rows, vectors), segments=0, ann_segments=0,
                          index_type=manifest.index_type, plan=plan, tuning={}, disk_bytes=0)

    def _note_index(self, index_type: str) -> None:
        if self._manifest is not None and self._manifest.milvus_index != index_type:
            self._manifest = dataclasses.replace(self._manifest, milvus_index=index_type)

    def drop(self) -> None:
        """Delete the collection and its vectors (e.g. a generation no longer used)."""
        with self.writing(), self._errors("drop"):
            self._client.drop_collection(self.collection)
            self._manifest = None


# Connections are made and closed under this lock. A store's finalizer runs wherever the
# garbage collector does, possibly inside another store's MilvusClient() for the same
# Milvus Lite file: closing the last client there stopped the in-process server that
# the new client was connecting to ("Fail connecting to server on 127.0.0.1:PORT").
# So a finalizer only queues its client; it is closed at the next connect or close.
_CONNECTIONS = threading.Lock()
_RETIRED_CLIENTS: list = []


def _close_client(client) -> None:
    _RETIRED_CLIENTS.append(client)  # (list.append: safe anywhere, even inside the collector)


def release_client(client) -> None:
    """Close a client that :func:`connect` made (under the connections lock)."""
    _close_client(client)
    with _CONNECTIONS:
        _close_retired_clients()


def _close_retired_clients() -> None:
    """Close the queued clients (the caller holds ``_CONNECTIONS``)."""
    while _RETIRED_CLIENTS:
        client = _RETIRED_CLIENTS.pop()
        with contextlib.suppress(Exception):
            client.close()


def _loaded():
    from pymilvus.client.types import LoadState

    return LoadState.Loaded


def _records(rows: VectorRows, start: int, end: int) -> list[dict]:
    """Rows ``start``..``end`` as Milvus entities (a NaN price is a null one)."""
    part = rows.take(np.arange(start, min(end, len(rows))))
    offsets = part.token_offsets
    tokens = part.tokens.tolist()
    prices = part.prices.tolist()
    return [{"id": image_id, "product_id": product_id, "vector": vector,
             "tokens": tokens[offsets[i]:offsets[i + 1]], "price": None if prices[i] != prices[i] else prices[i]}
            for i, (image_id, product_id, vector) in enumerate(zip(part.ids.tolist(), part.product_ids.tolist(),
                                                                   part.vectors.tolist()))]
