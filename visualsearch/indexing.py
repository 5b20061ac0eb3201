"""Batch indexing: manifest chunks -> catalogue rows -> reader -> CNN -> vector store + catalogue.

Three swappable stages (clip-retrieval's reader -> embedder -> writer): the manifest
is streamed in chunks of products (memory flat in its size), each chunk's images
that need work go through an :class:`ImageEmbedding` (by default: read, hash,
decode and embed with the CNN, reusing the vector of identical content), and a
:class:`~visualsearch.writer.CatalogueWriter` commits the vectors every
:data:`FLUSH_ROWS` images or :data:`FLUSH_SECONDS`.

Idempotent and resumable: an image whose file is unchanged since it was embedded is
skipped without being read; a run killed mid-way loses at most one flush of work.
Images at http(s) URLs are fetched on a thread pool instead (:mod:`.remote_images`,
one pool per run). An indexed URL checked within ``settings.remote_recheck`` (up to
twice that, spread per check: :mod:`.url_recheck`) counts as unchanged without a
request; an older one is revalidated with the ETag / Last-Modified of the embedded
copy: a 304 counts as unchanged, and a download whose content hash is the embedded one
too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Container, Iterable, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .catalogue import ImageStatus
from .catalogue import store as catalogue
from .catalogue_manifest import ProductRecord, is_image_url, iter_manifest_records, validate_manifest
from .embedder import EmbedderIdentity
from .errors import ConfigurationError, ImageError
from .images import load_image
from .remote_images import FetchPolicy, RemoteFetcher
from .uploads import is_fsspec_url, read_file_url
from .url_recheck import url_check_due
from .writer import CatalogueWriter, EmbeddedImage, PendingWrites

if TYPE_CHECKING:
    from .service import VisualSearch

logger = logging.getLogger(__name__)

# Commit the vectors of this many images at once (one segment, one catalogue
# transaction), or after FLUSH_SECONDS, whichever comes first, so that searches see
# progress and a crash costs little work.
FLUSH_ROWS = 4096
FLUSH_SECONDS = 30.0
MANIFEST_CHUNK_ROWS = 2000


ENGINES = ("local", "ray")


def check_engine(engine: str, *, ray_address: str | None = None, embedding: "ImageEmbedding | None" = None) -> None:
    """Refuse an engine choice that cannot work (before anything is written).

    Raises:
        ConfigurationError: an unknown engine, a Ray address without the Ray engine, or
            an embedding stage (a local-engine hook) with the Ray engine.
    """
    if engine not in ENGINES:
        raise ConfigurationError(f"unknown indexing engine {engine!r}: use {' or '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise ConfigurationError("a Ray address only makes sense with the ray engine (--engine ray)")
    if embedding is not None and engine != "local":
        raise ConfigurationError("a custom embedding stage runs only in the local engine")


class Progress(Protocol):
    """What the indexer reports to (the CLI shows it as a progress bar)."""

    def set_total(self, total: int) -> None: ...
    def advance(self, count: int) -> None: ...


class _NoProgress:
    def set_total(self, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


@dataclass(frozen=True)
class ImageFailure:
    sku: str
    image: str
    code: str
    message: str


@dataclass
class IndexingReport:
    """What one run did; ``failures`` lists every image that could not be indexed."""

    products: int = 0
    images: int = 0
    embedded: int = 0
    reused: int = 0
    unchanged: int = 0
    failures: list[ImageFailure] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "embed": 0.0, "write": 0.0})

    @property
    def images_per_second(self) -> float:
        return (self.embedded + self.reused) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["images_per_second"] = round(self.images_per_second, 2)
        return data


@dataclass(frozen=True)
class ImageTask:
    image_id: int
    product_id: int
    sku: str
    path: str
    # An indexed image at a URL: what the embedded copy was, to revalidate it.
    etag: str | None = None
    last_modified_ns: int | None = None
    sha256: str | None = None

    @property
    def remote(self) -> bool:
        return is_image_url(self.path)


@dataclass(frozen=True)
class ImageResult:
    """One image after the embedding stage: a vector, or why there is none."""

    task: ImageTask
    vector: Any = None                 # (dim,) float32 unit vector
    reused: bool = False
    sha256: str | None = None
    file_size: int | None = None
    file_mtime_ns: int | None = None
    width: int | None = None
    height: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    unchanged: bool = False            # a URL whose image is the embedded one: nothing to write
    source_etag: str | None = None     # a URL's ETag (file_mtime_ns holds its Last-Modified)


class ImageEmbedding(Protocol):
    """The stage that turns image tasks into vectors (the CNN; a benchmark's synthetic source)."""

    identity: EmbedderIdentity

    def run(self, tasks: Sequence[ImageTask], report: IndexingReport) -> Iterator[list[ImageResult]]: ...


def index_manifest(vs: "VisualSearch", manifest_path: str | Path, *, progress: Progress | None = None,
                   embedding: ImageEmbedding | None = None, wait: float = 0.0,
                   manifest_format: str | None = None, recheck_urls: bool = False) -> IndexingReport:
    """Add or update the products of a manifest and embed their new or changed images.

    Args:
        vs: the data directory to index into.
        manifest_path: a CSV or JSON Lines catalogue manifest.
        progress: receives the number of images and each batch's completion.
        embedding: the embedding stage (default: the CNN of ``vs``, closed at the end
            of the run; one passed in is the caller's to close).
        wait: seconds to wait for another ``index`` run to finish.
        manifest_format: one of :data:`visualsearch.feeds.FORMATS` (a manifest or a
            shop feed); None detects it from the file's header.
        recheck_urls: ask again for every indexed image URL, however recently it was
            checked (``settings.remote_recheck`` otherwise decides).

    Returns:
        The run's report. Bad images never stop the run; they are in
        ``report.failures``, in the catalogue (status ``failed``) and appended to
        ``failures.jsonl`` in the data directory.

    Raises:
        ManifestError: the manifest is invalid (checked whole before anything is written).
        BackboneMismatchError: the catalogue holds vectors of another backbone.
        WriterBusyError: another index run holds the data directory.
    """
    summary = validate_manifest(manifest_path, format=manifest_format)
    chunks = iter_manifest_records(manifest_path, chunk_rows=MANIFEST_CHUNK_ROWS, format=manifest_format)
    return index_records(vs, chunks, total_images=summary.images, progress=progress, embedding=embedding,
                         wait=wait, recheck_urls=recheck_urls)


def index_records(vs: "VisualSearch", chunks: Iterable[Sequence[ProductRecord]], *, total_images: int | None = None,
                  progress: Progress | None = None, embedding: ImageEmbedding | None = None,
                  wait: float = 0.0, exclusive: bool = True, merge_limit: int | None = None,
                  flush_rows: int | None = None, recheck_urls: bool = False) -> IndexingReport:
    """Add or update products (already validated records, in chunks) and embed their images.

    Args:
        exclusive: hold the data directory's index-run lock (an API write does not:
            it may run beside a batch run).
        merge_limit: the largest segment merge to run inline (API writes keep it small).
        flush_rows: commit every this many images (default FLUSH_ROWS).

    Other arguments, the result and the errors are those of :func:`index_manifest`.
    """
    started = time.perf_counter()
    progress = progress or _NoProgress()
    report = IndexingReport()
    if total_images is not None:
        progress.set_total(total_images)
    with contextlib.ExitStack() as stack:
        if embedding is None:  # ours: its fetch pool serves every chunk, and is closed however the run ends
            embedding = stack.enter_context(CnnEmbedding(vs))
        if exclusive:
            stack.enter_context(vs.index_lock(wait))
        vs.claim_identity(embedding.identity)
        run = IndexingRun(vs, report, progress=progress, flush_rows=flush_rows, merge_limit=merge_limit,
                          replan=exclusive, recheck_urls=recheck_urls)
        for records in chunks:
            for results in embedding.run(run.prepare(records), report):
                run.collect(results)
            run.chunk_done()
        run.finish()
    report.seconds = time.perf_counter() - started
    return report


class IndexingRun:
    """The catalogue side of one run, whichever engine embeds: upserts the products of each
    manifest chunk and says which images need work, takes the results back, commits them
    every ``flush_rows`` images or :data:`FLUSH_SECONDS`, and records the failures.

    Args:
        vs: the data directory (its identity already claimed).
        report: the run's report, filled in as results come.
        flush_rows: commit every this many images (default FLUSH_ROWS).
        merge_limit: the largest segment merge to run inline.
        replan: re-plan the vector index when it is outgrown, mid-run and at the end
            (batch runs; an API write does not).
        recheck_urls: see :func:`index_manifest`.
    """

    def __init__(self, vs: "VisualSearch", report: IndexingReport, *, progress: Progress,
                 flush_rows: int | None = None, merge_limit: int | None = None, replan: bool = True,
                 recheck_urls: bool = False):
        self.vs = vs
        self.report = report
        self.progress = progress
        self.flush_rows = flush_rows or FLUSH_ROWS
        self.replan = replan
        self.url_max_age = 0.0 if recheck_urls else vs.settings.remote_recheck
        self.writer = CatalogueWriter(vs.session, vs.writable_store(), merge_limit=merge_limit)
        self.pending = PendingWrites()
        self.validators: dict[int, Validators] = {}
        self.failures_log = _FailureLog(vs.failures_path)
        self.last_flush = time.monotonic()

    def prepare(self, records: Sequence[ProductRecord], *, skip: Container[int] | None = None) -> list[ImageTask]:
        """Upsert a chunk's products; return its images that need work.

        Args:
            skip: image ids already on their way (default: those awaiting the next commit).
        """
        unchanged_before = self.report.unchanged
        tasks, fields_changed = _prepare_chunk(self.vs, records, self.report,
                                               self.pending if skip is None else skip,
                                               url_max_age=self.url_max_age)
        self.pending.refresh_products |= fields_changed
        self.progress.advance(self.report.unchanged - unchanged_before)
        return tasks

    def collect(self, results: list[ImageResult]) -> None:
        """Take one batch of results; commit when a flush is due."""
        _collect(results, self.pending, self.report, self.failures_log, self.validators)
        self.progress.advance(len(results))
        if len(self.pending) >= self.flush_rows or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush(replan=self.replan)

    def chunk_done(self) -> None:
        """After a manifest chunk: commit if a flush's worth is waiting (field changes included)."""
        if len(self.pending) >= self.flush_rows:
            self.flush(replan=self.replan)

    def flush(self, *, replan: bool) -> None:
        _flush(self.vs, self.writer, self.pending, self.validators, self.report, replan=replan)
        self.last_flush = time.monotonic()

    def finish(self) -> None:
        """Commit what is left; after a batch run, maintain the vector index."""
        self.flush(replan=False)
        if self.replan:
            # Re-planning happens as the catalogue grows by REPLAN_FACTOR, so its cost
            # (linear in the catalogue) adds up to a constant share of the indexing.
            done = self.writer.store.maintain()
            if done:
                logger.info("vector index maintenance after the run: %s", done)


def _prepare_chunk(vs: "VisualSearch", records: Sequence[ProductRecord], report: IndexingReport,
                   skip: Container[int], *, url_max_age: float) -> tuple[list[ImageTask], set[int]]:
    """Upsert the chunk's products (bounded transaction); return its images that need work."""
    with vs.session() as session:
        upsert = catalogue.upsert_products(session, records)
        images = upsert.images
        if images is None:  # images were added: their ids are new
            images = catalogue.images_of_products(session, list(upsert.product_ids.values()))
    report.products += len(records)
    report.images += len(images)
    sku_of = {product_id: sku for sku, product_id in upsert.product_ids.items()}
    now = time.time()
    tasks = []
    for image in images:
        if image.id in skip:
            continue  # a SKU named again further down the manifest: its images are on their way
        indexed = image.status == ImageStatus.INDEXED
        if is_image_url(image.path):
            if indexed and not url_check_due(image.id, image.source_checked_at, now=now, max_age=url_max_age):
                report.unchanged += 1
                continue
            tasks.append(ImageTask(image.id, image.product_id, sku_of[image.product_id], image.path,
                                   **(_revalidation(image) if indexed else {})))
            continue
        if indexed and _unchanged_on_disk(image):
            report.unchanged += 1
            continue
        tasks.append(ImageTask(image.id, image.product_id, sku_of[image.product_id], image.path))
    return tasks, upsert.fields_changed


def _revalidation(image: catalogue.ImageRow) -> dict[str, Any]:
    return {"etag": image.source_etag, "last_modified_ns": image.file_mtime_ns, "sha256": image.sha256}


def _unchanged_on_disk(image: catalogue.ImageRow) -> bool:
    """Whether an indexed image's file is still the one embedded: same size and mtime on
    disk; at an fsspec URL (uploads kept in an object store), a name that is the hash of
    the embedded bytes, as the upload folder names its files (a stat there would be a
    request per file, and every PUT or PATCH of a product would fetch its photos again)."""
    if is_fsspec_url(image.path):
        return _named_by_its_hash(image.path, image.sha256)
    try:
        stat = os.stat(image.path)
    except OSError:
        return False
    return stat.st_size == image.file_size and stat.st_mtime_ns == image.file_mtime_ns


def _named_by_its_hash(url: str, sha256: str | None) -> bool:
    """Whether the file name's stem at ``url`` is ``sha256`` (``<sha256>.<ext>``)."""
    stem = url.rstrip("/").rpartition("/")[2].partition(".")[0]
    return sha256 is not None and len(sha256) == 64 and stem.lower() == sha256.lower()


# An image URL's ETag, Last-Modified (ns) and when it was fetched or answered 304 (epoch s).
Validators = tuple[str | None, int | None, int]


def _collect(results: list[ImageResult], pending: PendingWrites, report: IndexingReport,
             failures_log: "_FailureLog", validators: dict[int, Validators]) -> None:
    checked_at = int(time.time())
    for result in results:
        task = result.task
        if task.remote and (result.vector is not None or result.unchanged):
            validators[task.image_id] = (result.source_etag, result.file_mtime_ns, checked_at)
        if result.unchanged:
            report.unchanged += 1
            continue
        if result.vector is None:
            pending.fail(task.image_id, result.error_message or "unknown error")
            failure = ImageFailure(task.sku, task.path, result.error_code or "error", result.error_message or "")
            report.failures.append(failure)
            failures_log.write(failure)
            continue
        if result.reused:
            report.reused += 1
        else:
            report.embedded += 1
        pending.add(EmbeddedImage(
            image_id=task.image_id, product_id=task.product_id, vector=result.vector, sha256=result.sha256 or "",
            file_size=result.file_size, file_mtime_ns=result.file_mtime_ns, width=result.width,
            height=result.height,
        ))


def _flush(vs: "VisualSearch", writer: CatalogueWriter, pending: PendingWrites,
           validators: dict[int, Validators], report: IndexingReport, *, replan: bool) -> None:
    started = time.perf_counter()
    writer.commit(pending.take())
    if validators:
        # After the commit (they describe embedded copies), one executemany per flush.
        # A crash in between only costs one unconditional download of these images on
        # the next run.
        with vs.session() as session:
            catalogue.set_source_validators(session, validators)
        validators.clear()
    if replan and writer.store.maintenance() == "rebuild":
        # The catalogue outgrew its index plan mid-run (a first import of millions of
        # images starts exact): re-plan now, so searches meanwhile stay fast. Plans
        # change at 4x growth steps, so this adds a constant share to the run.
        logger.info("re-planning the vector index at %s vectors", writer.store.count)
        writer.store.rebuild()
    report.stage_seconds["write"] += time.perf_counter() - started


# --- the default embedding stage: read files, reuse identical content, run the CNN ----


def read_image_file(path: str) -> tuple[bytes, int, int | None]:
    """The bytes, size and modification time (ns) of a catalogue file: a local path, or an
    fsspec URL (an upload kept in an object store, VISUALSEARCH_UPLOADS=s3://...)."""
    if is_fsspec_url(path):
        return read_file_url(path)
    stat = os.stat(path)
    with open(path, "rb") as handle:
        return handle.read(), stat.st_size, stat.st_mtime_ns


class _ReadImages(Dataset):
    """Reads, hashes, decodes and preprocesses one image (runs in the worker processes)."""

    def __init__(self, tasks: Sequence[ImageTask], transform: Callable, max_pixels: int, decode_size: int):
        self.tasks = tasks
        self.transform = transform
        self.max_pixels = max_pixels
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, position: int) -> dict[str, Any]:
        task = self.tasks[position]
        item: dict[str, Any] = {"position": position, "tensor": None}
        try:
            data, size, mtime_ns = read_image_file(task.path)
            image = load_image(data, max_pixels=self.max_pixels, target_size=self.decode_size)
            width, height = image.info["source_size"]  # the file's, not the reduced decode's
            item.update(sha256=hashlib.sha256(data).hexdigest(), size=size,
                        mtime_ns=mtime_ns, width=width, height=height,
                        tensor=self.transform(image))
        except ImageError as exc:
            item.update(code=exc.code, message=str(exc))
        except FileNotFoundError:
            item.update(code="file_not_found", message=f"no such file: {task.path}")
        except OSError as exc:
            item.update(code="unreadable_file", message=f"cannot read {task.path}: {exc.strerror or exc}")
        except Exception as exc:  # one hostile file must never stop a catalogue run
            item.update(code="undecodable_image", message=f"cannot process {task.path}: {exc!r}")
        return item


class _FetchImage:
    """Fetches, hashes, decodes and preprocesses one image at a URL (runs on the fetch threads).

    An indexed image is asked for conditionally: a 304, or a body whose hash is the
    embedded copy's, comes back ``unchanged`` (with the validators to keep).
    """

    def __init__(self, fetcher: RemoteFetcher, transform: Callable, max_pixels: int, decode_size: int):
        self.fetcher = fetcher
        self.transform = transform
        self.max_pixels = max_pixels
        self.decode_size = decode_size

    def __call__(self, numbered: tuple[int, ImageTask]) -> dict[str, Any]:
        position, task = numbered
        item: dict[str, Any] = {"position": position, "tensor": None}
        try:
            fetched = self.fetcher.fetch(task.path, etag=task.etag, last_modified_ns=task.last_modified_ns)
            if fetched.not_modified:  # a 304 need not repeat the validators
                item.update(unchanged=True, etag=fetched.etag or task.etag,
                            mtime_ns=fetched.last_modified_ns or task.last_modified_ns)
                return item
            digest = fetched.sha256
            if task.sha256 is not None and digest == task.sha256:
                item.update(unchanged=True, etag=fetched.etag, mtime_ns=fetched.last_modified_ns)
                return item
            image = load_image(fetched.data, max_pixels=self.max_pixels, target_size=self.decode_size)
            width, height = image.info["source_size"]
            item.update(sha256=digest, size=len(fetched.data), mtime_ns=fetched.last_modified_ns,
                        etag=fetched.etag, width=width, height=height, tensor=self.transform(image))
        except ImageError as exc:
            item.update(code=exc.code, message=str(exc))
        except Exception as exc:  # one hostile server must never stop a catalogue run
            item.update(code="undecodable_image", message=f"cannot process {task.path}: {exc!r}")
        return item


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items  # tensors are stacked by the main process, after dropping failures


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decode workers must not fight the CNN for cores


class CnnEmbedding:
    """Reads and decodes images (optionally in worker processes) and embeds them with the CNN.

    Use as a context manager: the fetch thread pool, started at the first image URL,
    serves every chunk of the run and is shut down on leaving.
    """

    def __init__(self, vs: "VisualSearch"):
        self.vs = vs
        self.embedder = vs.embedder
        self.identity = self.embedder.identity
        self._fetcher: RemoteFetcher | None = None

    def __enter__(self) -> "CnnEmbedding":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Shut the fetch pool down (waiting for fetches under way; queued ones are dropped)."""
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def _remote_fetcher(self) -> RemoteFetcher:
        if self._fetcher is None:
            self._fetcher = RemoteFetcher(FetchPolicy.from_settings(self.vs.settings))
        return self._fetcher

    def run(self, tasks: Sequence[ImageTask], report: IndexingReport) -> Iterator[list[ImageResult]]:
        local = [task for task in tasks if not task.remote]
        remote = [task for task in tasks if task.remote]
        if local:
            yield from self._run_files(local, report)
        if remote:
            yield from self._run_urls(remote, report)

    def _run_urls(self, tasks: Sequence[ImageTask], report: IndexingReport) -> Iterator[list[ImageResult]]:
        """Fetch (bounded per host), hash, decode and preprocess on a thread pool, in order;
        embed a batch at a time. Network waits overlap; decoding releases the GIL."""
        settings = self.vs.settings
        fetcher = self._remote_fetcher()
        reader = _FetchImage(fetcher, self.embedder.transform, settings.max_image_pixels, self.embedder.decode_size)
        batch: list[dict[str, Any]] = []
        fetch_started = time.perf_counter()
        for item in fetcher.map(reader, enumerate(tasks)):
            batch.append(item)
            if len(batch) < settings.batch_size:
                continue
            report.stage_seconds["read"] += time.perf_counter() - fetch_started
            yield self._embed_fetched(batch, tasks, report)
            batch = []
            fetch_started = time.perf_counter()
        if batch:
            report.stage_seconds["read"] += time.perf_counter() - fetch_started
            yield self._embed_fetched(batch, tasks, report)

    def _embed_fetched(self, batch: list[dict[str, Any]], tasks: Sequence[ImageTask],
                       report: IndexingReport) -> list[ImageResult]:
        unchanged = [ImageResult(tasks[item["position"]], unchanged=True, source_etag=item["etag"],
                                 file_mtime_ns=item["mtime_ns"]) for item in batch if item.get("unchanged")]
        changed = [item for item in batch if not item.get("unchanged")]
        return unchanged + (self._embed(changed, tasks, report) if changed else [])

    def _run_files(self, tasks: Sequence[ImageTask], report: IndexingReport) -> Iterator[list[ImageResult]]:
        settings = self.vs.settings
        dataset = _ReadImages(tasks, self.embedder.transform, settings.max_image_pixels, self.embedder.decode_size)
        workers = settings.workers if len(tasks) > settings.batch_size else 0
        loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers, collate_fn=_collate,
                            worker_init_fn=_worker_init if workers else None,
                            pin_memory=self.embedder.device.type == "cuda")
        fetch_started = time.perf_counter()
        for batch in loader:
            report.stage_seconds["read"] += time.perf_counter() - fetch_started
            yield self._embed(batch, tasks, report)
            fetch_started = time.perf_counter()

    def _embed(self, batch: list[dict[str, Any]], tasks: Sequence[ImageTask],
               report: IndexingReport) -> list[ImageResult]:
        good = [item for item in batch if item["tensor"] is not None]
        reusable = self.vs.vectors_by_sha256([item["sha256"] for item in good])
        to_embed = [item for item in good if item["sha256"] not in reusable]
        started = time.perf_counter()
        computed = {}
        if to_embed:
            vectors = self.embedder.embed_batch(torch.stack([item["tensor"] for item in to_embed]))
            computed = {item["position"]: vector for item, vector in zip(to_embed, vectors)}
        report.stage_seconds["embed"] += time.perf_counter() - started
        results = []
        for item in batch:
            task = tasks[item["position"]]
            if item["tensor"] is None:
                results.append(ImageResult(task, error_code=item["code"], error_message=item["message"]))
                continue
            vector = computed.get(item["position"])
            reused = vector is None
            if reused:
                vector = reusable[item["sha256"]]
            results.append(ImageResult(task, vector=vector, reused=reused, sha256=item["sha256"],
                                       file_size=item["size"], file_mtime_ns=item["mtime_ns"],
                                       width=item["width"], height=item["height"],
                                       source_etag=item.get("etag")))
        return results


class _FailureLog:
    """Appends one JSON line per failed image, flushed at once so a crash loses none."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, failure: ImageFailure) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **asdict(failure)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
