"""The vector store's commit point: ``manifest.json`` in the data directory.

It names the segments that make up the store (oldest first), the codecs they were
encoded with, the current index plan and its measured recall, and the network that
produced the vectors. A commit writes new segment files first and then replaces
this small file atomically (write aside, fsync, rename), so a reader or a crash
sees the previous state or the next one, never a mix.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..durable import write_file_atomic
from ..errors import BackboneMismatchError, IndexCorruptError
from .planner import IndexPlan

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2


@dataclass(frozen=True)
class Tuning:
    """Search parameters chosen at build time and the recall they measured."""

    nprobe: int = 1
    rerank: int = 100
    recall_at_10: float | None = None
    queries: int = 0
    measured_at: float | None = None
    codec: str | None = None  # the codec it was measured with
    vectors: int = 0          # live vectors when it was measured (0: before this was recorded)


@dataclass(frozen=True)
class StoreManifest:
    backbone: str
    weights_sha256: str
    dim: int
    segments: tuple[int, ...] = ()
    next_uid: int = 1
    codecs: dict[str, dict] = field(default_factory=dict)   # codec id -> its IndexPlan
    codec: str | None = None                                 # the codec new segments use
    ann: dict[str, str] = field(default_factory=dict)        # segment uid -> codec of its ANN lists
    plan: dict = field(default_factory=dict)                 # the current IndexPlan
    tuning: Tuning = field(default_factory=Tuning)
    vectors: int = 0                                         # live vectors at the commit
    updated_at: float = 0.0
    format: int = MANIFEST_FORMAT
    # How images became these vectors on top of the backbone (visualsearch.recipes); None
    # in manifests written before recipes existed (the backbone's default recipe). The
    # catalogue checks it; it is here so the index files say what they hold.
    recipe: str | None = None
    recipe_hash: str | None = None

    @property
    def index_plan(self) -> IndexPlan | None:
        return IndexPlan(**self.plan) if self.plan else None

    @property
    def index_type(self) -> str:
        plan = self.index_plan
        return plan.description if plan else "Flat (exact)"

    def codec_plan(self, codec_id: str) -> IndexPlan:
        return IndexPlan(**self.codecs[codec_id])

    def evolve(self, **changes: Any) -> "StoreManifest":
        return replace(self, updated_at=time.time(), **changes)

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

    def to_json(self) -> str:
        data = asdict(self)
        data["segments"] = list(self.segments)
        return json.dumps(data, indent=2) + "\n"


def read_store_manifest(directory: Path) -> StoreManifest | None:
    """The manifest in ``directory``, or None when no vectors were committed there yet.

    Raises:
        IndexCorruptError: the file is unreadable, of an older format, or not a manifest.
    """
    path = directory / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise IndexCorruptError(f"{path} is not an index manifest")
    if raw.get("format") != MANIFEST_FORMAT:
        raise IndexCorruptError(
            f"{path} is of format {raw.get('format')!r}; this version reads format {MANIFEST_FORMAT}. "
            "Data directories of visualsearch 0.1 keep vectors in the catalogue database: "
            "index the catalogue again into a new --data-dir"
        )
    try:
        raw["segments"] = tuple(raw.get("segments", ()))
        # Fields a newer version added to the tuning are dropped, not refused, so that
        # an older process still serves a store a newer one has tuned.
        known = {f.name for f in fields(Tuning)}
        raw["tuning"] = Tuning(**{key: value for key, value in raw.get("tuning", {}).items() if key in known})
        return StoreManifest(**raw)
    except TypeError as exc:
        raise IndexCorruptError(f"{path} is not an index manifest of this version: {exc}") from None


def write_store_manifest(directory: Path, manifest: StoreManifest) -> None:
    """Replace the manifest atomically (readers see the old or the new one)."""
    write_file_atomic(directory / MANIFEST_NAME, manifest.to_json().encode())


def manifest_key(directory: Path) -> tuple[int, int, int] | None:
    """Changes whenever the manifest is replaced (cheap: one stat)."""
    try:
        stat = (directory / MANIFEST_NAME).stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)
