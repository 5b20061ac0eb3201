"""Batch indexing on a Ray cluster (``visualsearch index --engine ray``): the local run's
catalogue side, with reading, decoding and embedding spread over Ray Data.

What runs where:

- the driver (this process) validates and streams the manifest exactly as the local
  engine does (:class:`~visualsearch.indexing.IndexingRun`): it upserts the products of
  each chunk, skips the images unchanged since they were embedded, and puts the
  others' work items (image id, product, path or URL) into Ray's object store in
  blocks of :data:`WORK_BLOCK_ROWS` (``ray.put`` of an Arrow table per block, then
  ``ray.data.from_arrow_refs``). Its memory stays flat in the manifest's size: it keeps
  one object reference per block and a bitmap of the image ids it scheduled; the
  work items themselves (~100 bytes each) live in the object store, which spills to
  disk beyond its memory;
- Ray tasks (one CPU each, ``settings.batch_size`` images per call) read, hash, decode
  and preprocess the images with the local engine's readers (files, and URLs with the
  same limits and SSRF rules); an image whose content hash is already indexed is
  marked so and not sent on to be embedded;
- an actor pool embeds: each actor loads the CNN once, with the deployment's
  backbone, recipe and weights (checked against the driver's identity), on one GPU
  per actor when ``settings.device`` asks for CUDA (or is ``auto`` and the cluster has
  GPUs), else on CPU threads (:func:`plan_actors`);
- the driver consumes the results with ``iter_batches``, takes the stored vectors of
  already indexed content, and commits through the same
  :class:`~visualsearch.writer.CatalogueWriter` in batches, with the same failure
  records (``failures.jsonl``), report and progress. An actor's refusal (other
  weights) comes back as rows, raised here as the library's error; any other failure
  of the pipeline reaches the driver as one of Ray's errors, raised as the library's
  own (:func:`_library_error`).

Every worker must be able to read what the manifest names, and the weights: on one
machine that is given; on a real cluster use shared paths (the same mount everywhere)
or image URLs, and weights at a shared path. A recipe's projection travels to the
actors with their configuration.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .backbones import BackboneSpec, get_backbone, register_backbone
from .catalogue import store as catalogue
from .catalogue_manifest import ProductRecord, iter_manifest_records, validate_manifest
from .embedder import Embedder, EmbedderIdentity
from .errors import ConfigurationError, VisualSearchError
from .indexing import (
    MANIFEST_CHUNK_ROWS,
    CnnEmbedding,
    ImageResult,
    ImageTask,
    IndexingReport,
    IndexingRun,
    Progress,
    _FetchImage,
    _NoProgress,
    _ReadImages,
)
from .recipes import Projection, Recipe, projection_path
from .remote_images import FetchPolicy, RemoteFetcher

if TYPE_CHECKING:
    from .service import VisualSearch

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'visualsearch[ray]'"
# Pending images per object-store block of work items (one block: ~0.5 MB).
WORK_BLOCK_ROWS = 4096
# Content hashes of indexed images are compared by their first 64 bits in the workers
# (8 bytes per indexed image, shared read-only); the driver checks the full hash.
KNOWN_PAGE_ROWS = 50_000
# A decode task's memory: its worker process (PyTorch, Pillow and Ray loaded: up to
# 760 MB measured with efficientnet_lite0), and per tensor value the float32 tensor
# and the decoded picture.
DECODE_WORKER_BYTES = 896 * 1024**2
DECODE_BYTES_PER_PIXEL = 8
# CPU embedding: at most this many threads per actor (PyTorch scales poorly past it).
MAX_THREADS_PER_ACTOR = 4
# On CPU, decoding is ~10 % of an image's work (see Settings.workers); a quarter of the
# cluster's CPUs (at least one) decode, which leaves room for slow files and image
# URLs, and the rest embed.
DECODE_SHARE = 4
# The status of the rows of an embedding actor that refused to embed (see _EmbedBatches).
REFUSED = "refused"


def import_ray() -> Any:
    """The ``ray`` module, with Ray Data.

    Raises:
        ConfigurationError: Ray is not installed.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigurationError(f"--engine ray needs Ray: {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_connection(address: str | None = None) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address``, or start a local one sized to this
    machine; shut down only a Ray started here (one this process already had is used
    as it is, whatever ``address`` says).

    Raises:
        ConfigurationError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigurationError(f"cannot start or reach Ray at {address or 'this machine'}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class ActorPlan:
    """How the embedding actor pool is laid out on the cluster."""

    actors: int
    cpus: float       # per actor
    gpus: float       # per actor
    threads: int      # PyTorch CPU threads per actor

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"


def plan_actors(device: str, *, cluster_cpus: float, cluster_gpus: float) -> ActorPlan:
    """The embedding actors for ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) on a
    cluster with these resources: one actor per GPU when CUDA is asked for (``auto``:
    when the cluster has GPUs), else the CPUs left to embedding (:data:`DECODE_SHARE`) in
    actors of up to :data:`MAX_THREADS_PER_ACTOR` threads.

    Raises:
        ConfigurationError: CUDA was asked for and the cluster has no GPU, or an unknown device.
    """
    wants_gpu = device.startswith("cuda")
    if not wants_gpu and device not in ("cpu", "auto"):
        raise ConfigurationError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    gpus = int(cluster_gpus)
    if wants_gpu and gpus < 1:
        raise ConfigurationError(f"device {device!r} was requested but the Ray cluster has no GPU; "
                                 "use --device cpu or auto")
    if gpus >= 1 and device != "cpu":
        return ActorPlan(actors=gpus, cpus=1, gpus=1, threads=1)
    cpus = max(1, int(cluster_cpus))
    embedding_cpus = max(1, cpus - max(1, cpus // DECODE_SHARE))
    actors = -(-embedding_cpus // MAX_THREADS_PER_ACTOR)
    threads = embedding_cpus // actors
    return ActorPlan(actors=actors, cpus=threads, gpus=0, threads=threads)


@dataclass(frozen=True)
class EmbedderConfig:
    """What an actor needs to load the driver's CNN (the spec travels too, so that a
    backbone registered only in the driver's process is known in the workers, and so do
    the bytes of the recipe's projection file: an actor on another node has neither the
    driver's data directory nor a catalogue connection, and the file is small, D x d
    float32)."""

    spec: BackboneSpec
    recipe: Recipe
    projection: bytes | None
    weights_path: Path
    identity: EmbedderIdentity
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def of(cls, embedder: Embedder, *, projection_dir: Path, plan: ActorPlan) -> "EmbedderConfig":
        """The driver's ``embedder`` for actors planned by ``plan`` (its projection file
        read from ``projection_dir``, the data directory).

        Raises:
            ConfigurationError: the projection file cannot be read.
        """
        path = projection_path(embedder.recipe, projection_dir)
        try:
            projection = path.read_bytes() if path is not None else None
        except OSError as exc:
            raise ConfigurationError(f"cannot read projection file {path}: {exc}") from None
        return cls(spec=embedder.spec, recipe=embedder.recipe, projection=projection,
                   weights_path=Path(embedder.weights_path).resolve(), identity=embedder.identity,
                   device=plan.device, threads=plan.threads)

    def load(self) -> Embedder:
        """Load the CNN here (in an actor).

        Raises:
            ConfigurationError: the weights or projection found here are not the driver's.
        """
        try:
            get_backbone(self.spec.name)
        except ConfigurationError:
            register_backbone(self.spec)
        projection = None
        if self.projection is not None:
            projection = Projection.from_bytes(self.projection, source=f"recipe {self.recipe.name}'s projection")
        embedder = Embedder(self.spec.name, recipe=self.recipe, projection=projection,
                            weights_path=self.weights_path, device=self.device, threads=self.threads,
                            allow_download=False)
        if embedder.identity != self.identity:
            raise ConfigurationError(f"a Ray worker loaded other weights or another recipe than the driver "
                                     f"({embedder.identity} instead of {self.identity}); the weights file "
                                     f"{self.weights_path} must be the same on every node")
        return embedder


def index_manifest_ray(vs: "VisualSearch", manifest_path: str | Path, *, address: str | None = None,
                       progress: Progress | None = None, wait: float = 0.0, manifest_format: str | None = None,
                       recheck_urls: bool = False) -> IndexingReport:
    """:func:`~visualsearch.indexing.index_manifest` with reading and embedding on Ray.

    Args:
        address: the Ray cluster's address (``ray://host:10001``, ``host:6379`` or
            ``auto``); None starts a local Ray sized to this machine (or uses the one
            this process is already connected to).
        Others: as for :func:`~visualsearch.indexing.index_manifest`.

    Returns:
        The run's report (stage seconds are summed over the workers' processes).

    Raises:
        ConfigurationError: Ray is not installed, the cluster cannot run the CNN as asked
            (a worker found other weights), or the Ray pipeline failed.
        Everything :func:`~visualsearch.indexing.index_manifest` raises, also when a
        worker raised it.
    """
    summary = validate_manifest(manifest_path, format=manifest_format)
    chunks = iter_manifest_records(manifest_path, chunk_rows=MANIFEST_CHUNK_ROWS, format=manifest_format)
    ray = import_ray()  # before anything is written
    started = time.perf_counter()
    progress = progress or _NoProgress()
    progress.set_total(summary.images)
    report = IndexingReport()
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_connection(address))
        stack.enter_context(vs.index_lock(wait))
        embedder = vs.embedder  # the identity to claim; the transform the workers apply
        vs.claim_identity(embedder.identity)
        run = IndexingRun(vs, report, progress=progress, recheck_urls=recheck_urls)
        blocks = _schedule(run, chunks, ray)
        if blocks:
            local = stack.enter_context(CnnEmbedding(vs))  # only for reused content that vanished meanwhile
            _consume(_pipeline(vs, embedder, blocks, ray), ray, vs=vs, run=run, report=report, local=local)
        run.finish()
    report.seconds = time.perf_counter() - started
    return report


def _consume(dataset: Any, ray: Any, *, vs: "VisualSearch", run: IndexingRun, report: IndexingReport,
             local: CnnEmbedding) -> None:
    """Collect the pipeline's results into ``run``.

    Raises:
        VisualSearchError: the one a worker raised (e.g. ConfigurationError: other weights).
        ConfigurationError: the pipeline failed otherwise (see :func:`_library_error`).
        Everything :meth:`IndexingRun.collect` raises.
    """
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for batch in batches:
            for results in _results(vs, batch, report, local):
                run.collect(results)
        return
    except ray.exceptions.RayError as exc:
        error = _library_error(exc)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("the Ray pipeline failed:\n%s", "".join(traceback.format_exception(exc)))
    finally:
        batches.close()  # shuts the pipeline down now, also when the driver stops it (a refusal)
    # Raised out here, unchained, then collected: the Ray error's traceback holds the failed
    # pipeline's executor in a reference cycle, and with it the actors, whose CPUs and GPUs a
    # Ray this process stays connected to would not lend to the next run until then.
    gc.collect()
    raise error


def _library_error(exc: BaseException) -> VisualSearchError:
    """The library's error for one of Ray's: the :class:`VisualSearchError` a worker raised,
    found through the causes Ray keeps (``RayTaskError.cause``, ``__cause__``), else a
    :class:`ConfigurationError` with the failure's one-line summary."""
    import ray.exceptions

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        # Ray raises a task's error as a class deriving from both RayTaskError and the
        # error's own class: its message is the worker's traceback, its .cause the error.
        if isinstance(cause, VisualSearchError) and not isinstance(cause, ray.exceptions.RayError):
            return _without_retry_note(cause)
        inner = getattr(cause, "cause", None)
        cause = inner if isinstance(inner, BaseException) else cause.__cause__
    return ConfigurationError(f"the Ray pipeline failed: {_summary(exc)}")


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# What Ray Data appends to the message of a task's error ("Failed to apply UDF transform
# after 1/1 attempts ...", then how to configure retries).
_RETRY_NOTE = re.compile(r"\nFailed to [^\n]* after \d+/\d+ attempts.*\Z", re.DOTALL)
_DIRECT_CAUSE = "The above exception was the direct cause of the following exception:"


def _without_retry_note(error: VisualSearchError) -> VisualSearchError:
    if error.args and isinstance(error.args[0], str):
        error.args = (_RETRY_NOTE.sub("", error.args[0]), *error.args[1:])
    return error


def _summary(exc: BaseException) -> str:
    """One line for a Ray error: where the message carries a worker's traceback (a task's
    error, an actor that failed to start), the line naming the worker's own error (the last
    before Ray Data's wrapping UserCodeException, if any), else the first line."""
    import ray.exceptions

    text = _RETRY_NOTE.sub("", _ANSI_ESCAPE.sub("", str(exc)))
    if isinstance(exc, ray.exceptions.RayTaskError) or getattr(exc, "actor_init_failed", False):
        text = text.split(_DIRECT_CAUSE)[0]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _schedule(run: IndexingRun, chunks: Iterable[Sequence[ProductRecord]], ray: Any) -> list[Any]:
    """Upsert every chunk's products; put the images that need work into the object store."""
    scheduled = _IdBitmap()
    blocks: list[Any] = []
    waiting: list[ImageTask] = []
    for records in chunks:
        tasks = run.prepare(records, skip=scheduled)
        run.chunk_done()  # commits the field changes of products as they add up
        for task in tasks:
            scheduled.add(task.image_id)
        waiting += tasks
        if len(waiting) >= WORK_BLOCK_ROWS:
            blocks.append(ray.put(_work_table(waiting)))
            waiting = []
    if waiting:
        blocks.append(ray.put(_work_table(waiting)))
    return blocks


class _IdBitmap:
    """A set of image ids as one bit per id up to the largest (catalogue ids are dense:
    10 million ids take 1.25 MB, where a Python set takes ~500 MB)."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, image_id: int) -> None:
        byte = image_id >> 3
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        self._bits[byte] |= 1 << (image_id & 7)

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, int):
            return False
        byte = image_id >> 3
        return byte < len(self._bits) and bool(self._bits[byte] >> (image_id & 7) & 1)


def _work_table(tasks: Sequence[ImageTask]) -> Any:
    """Work items as an Arrow table (no nulls: "" and -1 stand for None, so every column
    keeps one plain type through Ray's conversions)."""
    import pyarrow as pa

    return pa.table({
        "image_id": pa.array([task.image_id for task in tasks], pa.int64()),
        "product_id": pa.array([task.product_id for task in tasks], pa.int64()),
        "sku": pa.array([task.sku for task in tasks], pa.string()),
        "path": pa.array([task.path for task in tasks], pa.string()),
        "etag": pa.array([task.etag or "" for task in tasks], pa.string()),
        "last_modified_ns": pa.array([_int_or(task.last_modified_ns) for task in tasks], pa.int64()),
        "known_sha256": pa.array([task.sha256 or "" for task in tasks], pa.string()),
    })


def _tasks_of(batch: dict[str, np.ndarray]) -> list[ImageTask]:
    return [ImageTask(int(image_id), int(product_id), str(sku), str(path), etag=str(etag) or None,
                      last_modified_ns=_none_if_negative(modified), sha256=str(known) or None)
            for image_id, product_id, sku, path, etag, modified, known in zip(
                batch["image_id"], batch["product_id"], batch["sku"], batch["path"], batch["etag"],
                batch["last_modified_ns"], batch["known_sha256"])]


def _int_or(value: int | None, default: int = -1) -> int:
    return default if value is None else int(value)


def _none_if_negative(value: Any) -> int | None:
    return None if value is None or int(value) < 0 else int(value)


def _pipeline(vs: "VisualSearch", embedder: Embedder, blocks: list[Any], ray: Any) -> Any:
    """The dataset of results: work items -> decode tasks -> embedding actors."""
    resources = ray.cluster_resources()
    plan = plan_actors(vs.settings.device, cluster_cpus=resources.get("CPU", 1), cluster_gpus=resources.get("GPU", 0))
    logger.info("ray indexing: %d blocks of work, %s", len(blocks), plan)
    _quiet_ray_data(ray)
    known = _Shared(ray.put(_known_digests(vs)))
    batch_size = vs.settings.batch_size
    dataset = ray.data.from_arrow_refs(blocks)
    side = embedder.recipe.tensor_size
    dataset = dataset.map_batches(
        # The memory a decode task holds also differs from the actors' request, which keeps
        # Ray Data from fusing decoding into the embedding actors (it fuses maps of equal
        # resources): decoding then scales on its own, and a GPU actor never waits for JPEGs.
        _decode, batch_size=batch_size, batch_format="numpy", num_cpus=1,
        memory=DECODE_WORKER_BYTES + batch_size * DECODE_BYTES_PER_PIXEL * 3 * side * side,
        fn_kwargs={"transform": embedder.transform, "max_pixels": vs.settings.max_image_pixels,
                   "decode_size": embedder.decode_size, "fetch_policy": FetchPolicy.from_settings(vs.settings),
                   "known": known})
    return dataset.map_batches(
        _EmbedBatches, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus, num_gpus=plan.gpus,
        fn_constructor_kwargs={"config": EmbedderConfig.of(embedder, projection_dir=vs.data_dir, plan=plan)})


def _quiet_ray_data(ray: Any) -> None:
    """The CLI draws its own progress bar; Ray Data's would interleave with it."""
    with warnings.catch_warnings():
        # Ray's own DataContext() sets one of its deprecated fields (nothing to act on here).
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Its INFO/WARNING lines ("execution finished", "progress bars disabled") would print
    # between the CLI's progress bar and summary; failures still come back as exceptions.
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _known_digests(vs: "VisualSearch") -> np.ndarray:
    """The first 64 bits of every indexed content hash, sorted (for ``np.searchsorted``)."""
    pages, after = [], 0
    while True:
        with vs.sessions() as session:
            page = catalogue.indexed_sha256_after(session, after, KNOWN_PAGE_ROWS)
        if not page:
            break
        pages.append(np.array([int(digest[:16], 16) for _, digest in page], dtype=np.uint64))
        after = page[-1][0]
    return np.unique(np.concatenate(pages)) if pages else np.zeros(0, np.uint64)


@dataclass(frozen=True)
class _Shared:
    """An object reference carried inside task arguments (Ray resolves only top-level ones),
    read once per worker process (zero-copy from the node's object store)."""

    ref: Any

    def get(self) -> Any:
        import ray

        key = self.ref.hex()
        if key not in _SHARED_CACHE:
            _SHARED_CACHE.clear()
            _SHARED_CACHE[key] = ray.get(self.ref)
        return _SHARED_CACHE[key]


_SHARED_CACHE: dict[str, Any] = {}


# --- in the Ray workers ------------------------------------------------------------


def _decode(batch: dict[str, np.ndarray], *, transform: Callable, max_pixels: int, decode_size: int,
            fetch_policy: FetchPolicy, known: _Shared) -> dict[str, np.ndarray]:
    """A Ray task: read, hash, decode and preprocess a batch of work items (the local
    engine's readers), marking content already indexed instead of passing it on."""
    torch.set_num_threads(1)  # one task, one core
    started = time.perf_counter()
    tasks = _tasks_of(batch)
    items: list[dict[str, Any]] = [{}] * len(tasks)
    files = [position for position, task in enumerate(tasks) if not task.remote]
    reader = _ReadImages([tasks[position] for position in files], transform, max_pixels, decode_size)
    for number, position in enumerate(files):
        items[position] = reader[number]
    urls = [position for position, task in enumerate(tasks) if task.remote]
    if urls:
        with RemoteFetcher(fetch_policy) as fetcher:
            fetch = _FetchImage(fetcher, transform, max_pixels, decode_size)
            for position, item in zip(urls, fetcher.map(fetch, enumerate(tasks[position] for position in urls))):
                items[position] = item
    digests = known.get()
    status = []
    for item in items:
        if item.get("unchanged"):
            status.append("unchanged")
        elif item["tensor"] is None:
            status.append("failed")
        elif _is_known(item["sha256"], digests):
            status.append("known")
        else:
            status.append("decoded")
    seconds = (time.perf_counter() - started) / max(1, len(items))
    return {
        **{key: batch[key] for key in ("image_id", "product_id", "sku", "path", "etag", "last_modified_ns",
                                       "known_sha256")},
        "status": np.array(status, dtype=object),
        "sha256": np.array([item.get("sha256") or "" for item in items], dtype=object),
        "size": np.array([_int_or(item.get("size")) for item in items], dtype=np.int64),
        "mtime_ns": np.array([_int_or(item.get("mtime_ns")) for item in items], dtype=np.int64),
        "width": np.array([_int_or(item.get("width")) for item in items], dtype=np.int64),
        "height": np.array([_int_or(item.get("height")) for item in items], dtype=np.int64),
        "source_etag": np.array([item.get("etag") or "" for item in items], dtype=object),
        "code": np.array([item.get("code") or "" for item in items], dtype=object),
        "message": np.array([item.get("message") or "" for item in items], dtype=object),
        # Raw float32 bytes: empty for the images not to embed, which then cost nothing.
        "tensor": np.array([item["tensor"].numpy().tobytes() if state == "decoded" else b""
                            for item, state in zip(items, status)], dtype=object),
        "read_seconds": np.full(len(items), seconds),
    }


def _is_known(digest: str, known: np.ndarray) -> bool:
    if not len(known):
        return False
    prefix = np.uint64(int(digest[:16], 16))
    at = int(np.searchsorted(known, prefix))
    return at < len(known) and known[at] == prefix


class _EmbedBatches:
    """A Ray actor: loads the CNN once, then embeds the decoded images of each batch."""

    def __init__(self, config: EmbedderConfig):
        # A refusal (other weights here) is answered as rows, which the driver raises as the
        # library's error: raised here, Ray would hand the driver only its text, wrapped in
        # one of its own errors (and print a traceback).
        self.dim = config.identity.dim
        self.refusal: VisualSearchError | None = None
        try:
            self.embedder = config.load()
        except VisualSearchError as exc:
            self.refusal = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.refusal is not None:
            return self._refused(batch, self.refusal)
        started = time.perf_counter()
        status = np.asarray(batch["status"], dtype=object)
        todo = np.flatnonzero(status == "decoded")
        vectors = np.zeros((len(status), self.embedder.dim), dtype=np.float32)
        if len(todo):
            side = self.embedder.recipe.tensor_size
            tensors = np.stack([np.frombuffer(batch["tensor"][position], dtype=np.float32).reshape(3, side, side)
                                for position in todo])
            vectors[todo] = self.embedder.embed_batch(torch.from_numpy(tensors))
            status = status.copy()
            status[todo] = "embedded"
        seconds = (time.perf_counter() - started) / max(1, len(status))
        return {**{key: value for key, value in batch.items() if key != "tensor"}, "status": status,
                "vector": vectors, "embed_seconds": np.full(len(status), seconds)}

    def _refused(self, batch: dict[str, np.ndarray], refusal: VisualSearchError) -> dict[str, np.ndarray]:
        rows = len(batch["status"])
        return {**{key: value for key, value in batch.items() if key != "tensor"},
                "status": np.full(rows, REFUSED, dtype=object), "code": np.full(rows, refusal.code, dtype=object),
                "message": np.full(rows, str(refusal), dtype=object),
                "vector": np.zeros((rows, self.dim), dtype=np.float32), "embed_seconds": np.zeros(rows)}


def _refusal(code: str, message: str) -> VisualSearchError:
    """The library's error that an actor refused with, from its stable ``code``."""
    classes, todo = {}, [VisualSearchError]
    while todo:
        cls = todo.pop()
        classes.setdefault(cls.code, cls)
        todo += cls.__subclasses__()
    return classes.get(code, ConfigurationError)(message)


# --- back in the driver ----------------------------------------------------------


def _results(vs: "VisualSearch", batch: dict[str, np.ndarray], report: IndexingReport,
             local: CnnEmbedding) -> Iterator[list[ImageResult]]:
    """One batch of the pipeline's rows as the local engine's results; content already
    indexed takes its stored vector (re-embedded here in the rare case it vanished).

    Raises:
        VisualSearchError: an embedding actor refused to embed (e.g. ConfigurationError:
            it found other weights than the driver's).
    """
    refused = np.flatnonzero(batch["status"] == REFUSED)
    if len(refused):
        raise _refusal(str(batch["code"][refused[0]]), str(batch["message"][refused[0]]))
    report.stage_seconds["read"] += float(np.sum(batch["read_seconds"]))
    report.stage_seconds["embed"] += float(np.sum(batch["embed_seconds"]))
    tasks = _tasks_of(batch)
    vectors = np.array(batch["vector"], dtype=np.float32)
    status = batch["status"]
    known = [str(batch["sha256"][row]) for row in range(len(tasks)) if status[row] == "known"]
    reusable = vs.vectors_by_sha256(known) if known else {}
    results, vanished = [], []
    for row, task in enumerate(tasks):
        state, digest = status[row], str(batch["sha256"][row])
        file = {"sha256": digest, "file_size": _none_if_negative(batch["size"][row]),
                "file_mtime_ns": _none_if_negative(batch["mtime_ns"][row]),
                "width": _none_if_negative(batch["width"][row]), "height": _none_if_negative(batch["height"][row]),
                "source_etag": str(batch["source_etag"][row]) or None}
        if state == "unchanged":
            results.append(ImageResult(task, unchanged=True, source_etag=file["source_etag"],
                                       file_mtime_ns=file["file_mtime_ns"]))
        elif state == "failed":
            results.append(ImageResult(task, error_code=str(batch["code"][row]) or "error",
                                       error_message=str(batch["message"][row])))
        elif state == "embedded":
            results.append(ImageResult(task, vector=vectors[row], **file))
        elif digest in reusable:
            results.append(ImageResult(task, vector=reusable[digest], reused=True, **file))
        else:
            vanished.append(task)
    yield results
    if vanished:
        logger.info("%d images' content left the index during the run: embedding them here", len(vanished))
        yield from local.run(vanished, report)

