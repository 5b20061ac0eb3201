"""Batch indexing: manifest -> catalogue rows -> reader workers -> CNN -> catalogue + vector index.

Idempotent and resumable: an image whose file is unchanged since it was embedded is
skipped without being read; an image whose content hash is already embedded elsewhere
reuses that vector. Every batch is committed to the catalogue before its vectors enter
the index, so a process killed mid-run loses at most one batch of work, and the next
run (or reader) rebuilds the index from the catalogue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from sqlalchemy import select
from torch.utils.data import DataLoader, Dataset

from .catalogue import ImageStatus, ProductImage, store
from .catalogue_manifest import ProductRecord, read_manifest
from .engine import Engine
from .errors import ImageError
from .images import load_image

logger = logging.getLogger(__name__)

# A long run saves the index this often, so that readers see progress and a crash
# costs at most this much rebuild work.
CHECKPOINT_SECONDS = 300.0


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
class _Task:
    image_id: int
    sku: str
    path: str


class _ReadImages(Dataset):
    """Reads, hashes, decodes and preprocesses one image (runs in the worker processes)."""

    def __init__(self, tasks: Sequence[_Task], transform: Callable, max_pixels: int, decode_size: int):
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
            stat = os.stat(task.path)
            with open(task.path, "rb") as handle:
                data = handle.read()
            image = load_image(data, max_pixels=self.max_pixels, target_size=self.decode_size)
            width, height = image.info["source_size"]  # the file's, not the reduced decode's
            item.update(sha256=hashlib.sha256(data).hexdigest(), size=stat.st_size,
                        mtime_ns=stat.st_mtime_ns, width=width, height=height,
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


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items  # tensors are stacked by the main process, after dropping failures


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decode workers must not fight the CNN for cores


def index_manifest(engine: Engine, manifest_path: str | Path, *,
                   progress: Progress | None = None) -> IndexingReport:
    """Add or update the products of a manifest and embed their new or changed images.

    Args:
        engine: the data directory to index into (takes its writer lock).
        manifest_path: a CSV or JSON Lines catalogue manifest.
        progress: receives the number of images and each batch's completion.

    Returns:
        The run's report. Bad images never stop the run; they are in
        ``report.failures``, in the catalogue (status ``failed``) and appended to
        ``failures.jsonl`` in the data directory.

    Raises:
        ManifestError: the manifest is invalid (nothing is written).
        BackboneMismatchError: the catalogue holds vectors of another backbone.
        WriterBusyError: another process is writing to this data directory.
    """
    return index_records(engine, read_manifest(manifest_path), progress=progress)


def index_records(engine: Engine, records: Sequence[ProductRecord], *,
                  progress: Progress | None = None) -> IndexingReport:
    """Add or update ``records`` (already validated products) and embed their images.

    The work and the guarantees of :func:`index_manifest`, for callers that build
    records themselves (the API's product upload).
    """
    started = time.perf_counter()
    progress = progress or _NoProgress()
    report = IndexingReport(products=len(records))
    with engine.writer():
        embedder = engine.embedder
        index = engine.index()
        with engine.session() as session:
            store.claim_identity(session, backbone=embedder.identity.backbone,
                                 weights_sha256=embedder.identity.weights_sha256, dim=embedder.dim)
            products = store.upsert_products(session, records)
            sku_of = {product.id: sku for sku, product in products.items()}
            images = store.images_to_check(session, list(sku_of))
        report.images = len(images)
        progress.set_total(len(images))
        tasks = _tasks_needing_work(images, sku_of, report)
        progress.advance(report.unchanged)
        failures_file = _FailureLog(engine.failures_path)
        last_checkpoint = time.monotonic()
        dirty = False
        loader = _loader(engine, tasks)
        fetch_started = time.perf_counter()
        for batch in loader:
            report.stage_seconds["read"] += time.perf_counter() - fetch_started
            _process_batch(engine, index, [(tasks[item["position"]], item) for item in batch],
                           report, failures_file)
            dirty = True
            progress.advance(len(batch))
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                _save(engine, index)
                last_checkpoint, dirty = time.monotonic(), False
            fetch_started = time.perf_counter()
        if dirty or engine.manifest() is None:
            _save(engine, index)
    report.seconds = time.perf_counter() - started
    return report


def _tasks_needing_work(images: list[ProductImage], sku_of: dict[int, str],
                        report: IndexingReport) -> list[_Task]:
    tasks = []
    for image in images:
        if image.status == ImageStatus.INDEXED and _unchanged_on_disk(image):
            report.unchanged += 1
            continue
        tasks.append(_Task(image_id=image.id, sku=sku_of[image.product_id], path=image.path))
    return tasks


def _unchanged_on_disk(image: ProductImage) -> bool:
    try:
        stat = os.stat(image.path)
    except OSError:
        return False
    return stat.st_size == image.file_size and stat.st_mtime_ns == image.file_mtime_ns


def _loader(engine: Engine, tasks: list[_Task]) -> DataLoader:
    embedder = engine.embedder
    dataset = _ReadImages(tasks, embedder.transform, engine.settings.max_image_pixels, embedder.decode_size)
    workers = engine.settings.workers if len(tasks) > engine.settings.batch_size else 0
    return DataLoader(
        dataset, batch_size=engine.settings.batch_size, num_workers=workers,
        collate_fn=_collate, worker_init_fn=_worker_init if workers else None,
        pin_memory=embedder.device.type == "cuda",
    )


def _process_batch(engine: Engine, index, batch: list[tuple[_Task, dict[str, Any]]],
                   report: IndexingReport, failures_file: "_FailureLog") -> None:
    good = [(task, item) for task, item in batch if item["tensor"] is not None]
    with engine.session() as session:
        reusable = store.embeddings_by_sha256(session, [item["sha256"] for _, item in good])
        to_embed = [(task, item) for task, item in good if item["sha256"] not in reusable]
        embed_started = time.perf_counter()
        vectors = {}
        if to_embed:
            with engine.embed_lock:
                computed = engine.embedder.embed_batch(torch.stack([item["tensor"] for _, item in to_embed]))
            vectors = {task.image_id: vector for (task, _), vector in zip(to_embed, computed)}
        report.stage_seconds["embed"] += time.perf_counter() - embed_started

        write_started = time.perf_counter()
        rows = {image.id: image for image in session.scalars(
            select(ProductImage).where(ProductImage.id.in_([task.image_id for task, _ in batch])))}
        removed_ids = []
        for task, item in batch:
            image = rows.get(task.image_id)
            if image is None:  # product removed meanwhile
                continue
            if item["tensor"] is None:
                if image.status == ImageStatus.INDEXED:
                    removed_ids.append(image.id)
                store.mark_failed(image, item["message"])
                failure = ImageFailure(task.sku, task.path, item["code"], item["message"])
                report.failures.append(failure)
                failures_file.write(failure)
                continue
            vector = vectors.get(task.image_id)
            if vector is None:
                vector = store.decode_embedding(reusable[item["sha256"]])
                report.reused += 1
            else:
                report.embedded += 1
            vectors[task.image_id] = vector
            store.mark_indexed(image, sha256=item["sha256"], size=item["size"], mtime_ns=item["mtime_ns"],
                               width=item["width"], height=item["height"], embedding=vector)
        store.bump_revision(session)
    # The catalogue is committed first: if we die now, the next run rebuilds the index from it.
    if removed_ids:
        index.remove(np.asarray(removed_ids, dtype=np.int64))
    kept = [image_id for image_id in vectors if image_id in rows]
    if kept:
        index.add(np.asarray(kept, dtype=np.int64), np.stack([vectors[i] for i in kept]))
    report.stage_seconds["write"] += time.perf_counter() - write_started


def _save(engine: Engine, index) -> None:
    engine.save_index(index, engine.catalogue_revision())


class _FailureLog:
    """Appends one JSON line per failed image, flushed at once so a crash loses none."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, failure: ImageFailure) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **asdict(failure)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
