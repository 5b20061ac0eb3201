"""Re-embedding without downtime: the catalogue's vectors for another backbone (or another
recipe, see :mod:`.recipes`), built beside the current ones while they keep answering,
then one switch.

1. **Bulk**: every indexed image of the catalogue (walked by id in bounded batches) is
   read and embedded with the new CNN (the indexing stage :class:`~.indexing.CnnEmbedding`,
   so files, kept uploads and http(s) images alike) into a new vector generation
   (:mod:`.generations`) under the same image ids, product ids and filter fields.
   Resumable: the run is recorded in the catalogue, and a run started again after a
   crash skips the images already in the new generation.
2. **Catch-up**: API writes went on to the current generation meanwhile. Images indexed
   since the run began are embedded again, images missing from the new generation are
   embedded, vectors of deleted images leave it, and the rows of products whose fields
   changed are rewritten. Rounds repeat while they find much to do.
3. **Switch**: a last catch-up round and the switch run while holding the current
   store's commit lock, so no API write lands in between; the switch is one catalogue
   transaction (identity + generation). Writes waiting on the lock then retry on the new
   generation; readers load the new pair and swap (see :class:`~.generations.GenerationTracker`).

Images the new CNN cannot read are retried once in the catch-up rounds; when more than
:data:`MAX_FAILED_FRACTION` of the catalogue (and at least :data:`MIN_FAILED_TO_REFUSE`
images) still fail, the switch is refused (:class:`ReembedRefusedError`) unless forced:
they would vanish from search. The run stays recorded, so running it again resumes.

The previous vectors stay (their folder, or their Milvus collection: see
:mod:`.generation_storage`) until :func:`drop_old_generations`, never dropped by
the run that switches: servers follow a switch in the background (loading a CNN and a
store may take minutes) and answer from the old vectors meanwhile. A drop within
:data:`DROP_GRACE` of the switch is refused unless forced.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .backbones_builtin import DEFAULT_BACKBONE
from .catalogue import store as catalogue
from .embedder import Embedder, EmbedderIdentity
from .errors import ConfigurationError, VisualSearchError
from .generations import GENERATION_KEY, WEIGHTS_PATH_KEY, GenerationRef, read_generation
from .indexing import CnnEmbedding, ImageFailure, ImageResult, ImageTask, IndexingReport, Progress
from .projection_cache import ensure_projection
from .recipes import choose_recipe, recipe_matches
from .vectors import VectorRows, VectorStore, row_tokens
from .vectors.milvus_store import MilvusVectorStore

if TYPE_CHECKING:
    from .service import VisualSearch

logger = logging.getLogger(__name__)

TARGET_KEY = "reembed_target"   # catalogue meta: the unfinished run (to resume it)
SWITCHED_AT_KEY = "vector_generation_switched_at"  # catalogue meta: when the last switch happened (UTC)
# Servers follow a switch in a background thread (a CNN and a store of millions of
# vectors to load), answering from the old vectors meanwhile: those stay this long.
DROP_GRACE = timedelta(minutes=10)
# A switch is refused when more than this share of the catalogue's images (and at least
# MIN_FAILED_TO_REFUSE images) could not be embedded: they would vanish from search.
MAX_FAILED_FRACTION = 0.01
MIN_FAILED_TO_REFUSE = 5
MAX_LISTED_FAILURES = 10
# Images per commit to the new generation: a crash loses at most one batch.
BATCH_IMAGES = 4096
# Writes are caught up by their timestamps, from this much before each round began:
# a write stamps its rows a moment before it commits them (under the commit lock), and
# writers on other machines (a PostgreSQL catalogue) have their own clocks.
CATCH_UP_SLACK = timedelta(seconds=5)
# Catch-up rounds outside the lock repeat until one does at most this much work; the
# last round (under the lock, API writes waiting) then has about that much left.
SMALL_ROUND = 256
MAX_ROUNDS = 5
SWITCH_LOCK_TIMEOUT = 300.0
DROP_LATER = ("old vectors kept; run `visualsearch reembed --drop-old` once the servers answer with "
              "the new backbone")


class ReembedRefusedError(VisualSearchError):
    """Too many images could not be embedded with the new backbone: nothing was switched
    (``report`` lists them; a run started again resumes, --force switches anyway)."""

    code = "reembed_refused"

    def __init__(self, message: str, report: "ReembedReport"):
        super().__init__(message)
        self.report = report


class DropRefusedError(VisualSearchError):
    """Old vectors asked to be dropped so soon after a switch that servers may still answer from them."""

    code = "drop_refused"


@dataclass
class ReembedReport:
    """What one ``reembed`` did."""

    backbone: str
    weights_sha256: str
    dim: int
    previous_backbone: str | None
    recipe: str | None = None
    previous_recipe: str | None = None
    generation: str = ""
    switched: bool = False
    resumed: bool = False
    images: int = 0
    embedded: int = 0
    reused: int = 0
    skipped: int = 0
    caught_up: int = 0
    deleted: int = 0
    refreshed: int = 0
    failures: list[ImageFailure] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refused: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "embed": 0.0, "write": 0.0})

    @property
    def images_per_second(self) -> float:
        return (self.embedded + self.reused) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["images_per_second"] = round(self.images_per_second, 2)
        return data


class _NoProgress:
    def set_total(self, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


def reembed(vs: "VisualSearch", *, backbone: str | None = None, recipe: str | None = None,
            weights: str | None = None, wait: float = 0.0, drop_old: bool = False, force: bool = False,
            progress: Progress | None = None, batch_images: int = BATCH_IMAGES) -> ReembedReport:
    """Embed the catalogue with ``backbone`` or ``recipe`` beside the current vectors, then
    switch to them (another recipe on the same backbone is a new generation too).

    Args:
        vs: the data directory (its current vectors keep answering meanwhile).
        backbone, weights: the new network (``weights``: a file instead of the backbone's
            packaged or cached weights; recorded so that servers find it too).
        recipe: the new recipe (default: the backbone's own); a recipe names its
            backbone, so ``backbone`` may be left out.
        wait: seconds to wait for another batch run to release the data directory.
        drop_old: delete the vectors of every other generation, only when this run does
            not switch (servers follow a switch in the background and answer from the
            old vectors meanwhile: a note in the report says to drop them later).
        force: switch even when more images failed than :data:`MAX_FAILED_FRACTION`
            allows; drop old vectors even within :data:`DROP_GRACE` of the last switch.
        progress: receives the number of indexed images and each batch's completion.
        batch_images: images per commit to the new generation.

    Returns:
        The run's report. Images that cannot be read (also when retried once) are in
        ``failures``; after the switch they are ``failed`` in the catalogue (an ``index``
        run tries them again).

    Raises:
        ReembedRefusedError: too many images failed (nothing switched; ``report`` lists them).
        DropRefusedError: ``drop_old`` without a switch, within the grace period of the last one.
        ConfigurationError: nothing indexed yet, neither backbone nor recipe, an unknown
            backbone or recipe, or a recipe for another backbone than ``backbone``.
        WeightsUnavailableError: the new backbone's weights cannot be found.
        WriterBusyError: another batch run (or an API write, for too long) held the data directory.
    """
    started = time.perf_counter()
    progress = progress or _NoProgress()
    if not backbone and not recipe:
        raise ConfigurationError("name the backbone or the recipe to re-embed with")
    # A recipe the data directory defines (`visualsearch tune`'s): its newest definition.
    chosen = choose_recipe(recipe=recipe, backbone=backbone, default_backbone=DEFAULT_BACKBONE,
                           local=vs.data_recipes())
    with vs.index_lock(wait):
        current = vs.generation()
        if current.ref.identity is None:
            raise ConfigurationError("nothing is indexed here yet: index a catalogue with "
                                     f"'visualsearch index MANIFEST --recipe {chosen.name}' instead")
        with vs.sessions() as session:
            ensure_projection(session, chosen, vs.data_dir)
        embedder = Embedder(chosen.backbone, recipe=chosen, projection_dir=vs.data_dir, weights_path=weights,
                            device=vs.settings.device, threads=vs.settings.threads,
                            allow_download=vs.settings.allow_download)
        identity = embedder.identity
        report = ReembedReport(identity.backbone, identity.weights_sha256, identity.dim,
                               previous_backbone=current.ref.identity.backbone, recipe=identity.recipe,
                               previous_recipe=current.ref.identity.recipe_name, generation=current.ref.location)
        if _same_identity(current.ref, identity):
            logger.info("the vectors here already come from %s (recipe %s): nothing to re-embed",
                        identity.backbone, identity.recipe)
        else:
            run = _Run(vs, embedder, report, batch_images, weights, force=force)
            try:
                run.begin(current.ref)
                run.bulk(progress)
                run.catch_up_and_switch(current.store())
            finally:
                run.close()
        if drop_old and report.switched:
            report.notes.append(DROP_LATER)
            logger.info(DROP_LATER)
        elif drop_old:
            report.dropped = drop_old_generations(vs, locked=True, force=force)
    report.seconds = time.perf_counter() - started
    return report


def drop_old_generations(vs: "VisualSearch", *, wait: float = 0.0, locked: bool = False,
                         force: bool = False) -> list[str]:
    """Delete the vectors of every generation but the current one (and an unfinished
    re-embedding's, which a new run resumes). Servers still answering from an old
    generation (one pinning another --backbone, or one still loading the new vectors)
    lose it: drop only once they followed.

    Args:
        force: drop even within :data:`DROP_GRACE` of the last switch.

    Returns:
        The generations removed ("." for the data directory's own first vectors).

    Raises:
        DropRefusedError: there is something to drop, the last switch was less than
            :data:`DROP_GRACE` ago, and not ``force``.
    """
    if not locked:
        with vs.index_lock(wait):
            return drop_old_generations(vs, locked=True, force=force)
    with vs.sessions() as session:
        ref = read_generation(session)
        target = _read_target(session)
        switched_at = catalogue.get_meta(session, SWITCHED_AT_KEY)
    if ref.identity is None:
        return []
    keep = {ref.location, target["location"] if target else ref.location}
    storage = vs.generation_storage
    old = [location for location in storage.locations() if location not in keep]
    if not old:
        return []
    if not force:
        _check_drop_grace(ref, switched_at)
    removed = []
    for location in old:
        storage.drop(location)
        removed.append(location or ".")
    logger.info("dropped the vectors of generations %s", removed)
    return removed


def _check_drop_grace(ref: GenerationRef, switched_at: str | None) -> None:
    """Raises: DropRefusedError within :data:`DROP_GRACE` of the last switch."""
    if not switched_at:
        return  # switched before the time was recorded: long ago
    when = datetime.fromisoformat(switched_at)
    age = max(datetime.now(timezone.utc) - when, timedelta(0))
    if age >= DROP_GRACE:
        return
    backbone = ref.identity.backbone if ref.identity else "the new backbone"
    raise DropRefusedError(
        f"the switch to {backbone} was only {age.total_seconds():.0f}s ago: servers may still be loading the "
        f"new vectors and answering from the old ones, which dropping them now would empty; drop them once the "
        f"servers answer with {backbone} (after {(when + DROP_GRACE).isoformat(timespec='seconds')}), or pass "
        "--force if they already do")


# --- one run ----------------------------------------------------------------------------


class _Run:
    """The state of one re-embedding (between its phases)."""

    def __init__(self, vs: "VisualSearch", embedder: Embedder, report: ReembedReport, batch_images: int,
                 weights: str | None, *, force: bool = False):
        self.vs = vs
        self.embedder = embedder
        self.identity = embedder.identity
        self.stored_identity = catalogue.StoredIdentity(
            self.identity.backbone, self.identity.weights_sha256, self.identity.dim, recipe=self.identity.recipe,
            recipe_version=self.identity.recipe_version, recipe_hash=self.identity.recipe_hash)
        self.report = report
        self.batch_images = batch_images
        self.weights = str(Path(weights).resolve()) if weights else None
        self.failed: dict[int, ImageFailure] = {}
        self.retried: set[int] = set()  # failed ids already embedded again once (by a catch-up round)
        self.force = force
        self.location = ""
        self.started_at = datetime.now(timezone.utc)
        self.store: VectorStore | None = None
        self.embedding: CnnEmbedding | None = None
        self._stages = IndexingReport()

    def begin(self, current: GenerationRef) -> None:
        """Resume the unfinished run for this identity, or record a new one (an unfinished
        run for another identity is abandoned and its vectors dropped)."""
        storage = self.vs.generation_storage
        with self.vs.session() as session:
            target = _read_target(session)
            if target is not None and _target_matches(target, self.identity) and \
                    target["location"] != current.location:
                self.location = target["location"]
                self.started_at = datetime.fromisoformat(target["started_at"])
                self.report.resumed = True
            else:
                if target is not None and target["location"] not in ("", current.location):
                    storage.drop(target["location"])
                self.location = storage.new_location(self.identity.recipe or self.identity.backbone)
                storage.drop(self.location)  # a leftover of the same name
                catalogue.set_meta(session, TARGET_KEY, json.dumps({
                    "location": self.location, "backbone": self.identity.backbone,
                    "weights_sha256": self.identity.weights_sha256, "dim": self.identity.dim,
                    "recipe": self.identity.recipe, "recipe_version": self.identity.recipe_version,
                    "recipe_hash": self.identity.recipe_hash, "started_at": self.started_at.isoformat(),
                    "weights_path": self.weights}))
        self.report.generation = self.location
        # Not guarded: the catalogue names it only once the run switches to it.
        self.store = self.vs.open_generation_store(self.location, self.stored_identity, guarded=False)
        self.store.collect_leftovers()
        self.embedding = CnnEmbedding(_NewGeneration(self.vs, self.embedder, self.store))
        logger.info("%s re-embedding with %s into %s", "resuming" if self.report.resumed else "starting",
                    self.identity.backbone, self.location)

    def close(self) -> None:
        """Release what the run holds across its batches: the embedding's fetch pool, and its
        own handle on the new generation's store (a Milvus connection; once switched to, the
        generation is answered from a store the process opens for itself)."""
        if self.embedding is not None:
            self.embedding.close()
        if isinstance(self.store, MilvusVectorStore):
            self.store.close()

    # --- phase 1 ----------------------------------------------------------------------

    def bulk(self, progress: Progress) -> None:
        """Embed every indexed image not yet in the new generation, by id, a batch at a time."""
        with self.vs.sessions() as session:
            self.report.images = catalogue.catalogue_counts(session).indexed
        progress.set_total(self.report.images)
        done = self.store.alive_ids()  # a resumed run's work (ascending)
        last = 0
        while True:
            with self.vs.sessions() as session:
                images = catalogue.indexed_images_after(session, last, self.batch_images)
            if not images:
                break
            last = images[-1].id
            already = _contains(done, np.fromiter((image.id for image in images), np.int64, len(images)))
            skipped = int(already.sum())
            self.report.skipped += skipped
            progress.advance(skipped)
            fresh = [image for image, skip in zip(images, already) if not skip]
            self._embed_and_write(fresh, progress)
            if self.store.maintenance() == "rebuild":
                # Re-planned as the new generation grows (as an index run does), so that it
                # is searchable at speed the moment it is switched to.
                self.store.rebuild()

    # --- phases 2 and 3 ---------------------------------------------------------------

    def catch_up_and_switch(self, old_store: VectorStore) -> None:
        since = self.started_at - CATCH_UP_SLACK
        full = True  # the first round compares with the catalogue itself
        for _round in range(MAX_ROUNDS):
            round_started = datetime.now(timezone.utc)
            work = self._catch_up(since, truth=self._catalogue_ids() if full else old_store.alive_ids())
            since, full = round_started - CATCH_UP_SLACK, False
            if work <= SMALL_ROUND:
                break
        self.store.maintain()
        # API writes wait on this lock from here to the switch: nothing lands in between.
        with old_store.writing(SWITCH_LOCK_TIMEOUT):
            self._catch_up(since, truth=old_store.alive_ids())
            failures = self._live_failures()
            self.report.failures = list(failures.values())
            self._check_failures(failures)
            self._switch(failures)
        self.store.merge()
        self.vs.adopt_generation(GenerationRef(self.location, self.stored_identity, self.weights), self.embedder)
        self.report.switched = True
        self.report.stage_seconds = dict(self._stages.stage_seconds)
        self.report.reused = self._stages.reused
        logger.info("switched to the %s vectors in %s", self.identity.backbone, self.location)

    def _catch_up(self, since: datetime, *, truth: np.ndarray) -> int:
        """Level the new generation with ``truth`` (the ids that must have vectors) and with
        the writes since ``since``. Returns how many images and products it touched."""
        alive = self.store.alive_ids()
        gone = np.setdiff1d(alive, truth, assume_unique=True)
        # A failed image is embedded again once (a URL that timed out, a file being
        # replaced); one that fails again stays failed.
        given_up = [image_id for image_id in self.failed if image_id in self.retried]
        missing = np.setdiff1d(np.setdiff1d(truth, alive, assume_unique=True),
                               np.asarray(given_up, np.int64))
        self.retried.update(self.failed)
        if len(gone):
            self.store.commit(deletes=gone.tolist())
            self.report.deleted += len(gone)
        changed: dict[int, catalogue.IndexedImage] = {}
        with self.vs.sessions() as session:
            for image in catalogue.indexed_images_by_id(session, missing.tolist()):
                changed[image.id] = image
            last = 0
            while batch := catalogue.indexed_images_after(session, last, self.batch_images, indexed_since=since):
                changed.update((image.id, image) for image in batch)
                last = batch[-1].id
            products = set(catalogue.products_changed_since(session, since))
        products |= {image.product_id for image in changed.values()}
        self.report.caught_up += self._embed_and_write(list(changed.values()), _NoProgress())
        refreshed = self._refresh(products, skip=set(changed))
        return len(gone) + len(changed) + refreshed

    def _catalogue_ids(self) -> np.ndarray:
        batches = []
        with self.vs.sessions() as session:
            for ids in catalogue.indexed_image_ids(session):
                batches.append(np.asarray(ids, np.int64))
        return np.concatenate(batches) if batches else np.zeros(0, np.int64)

    def _refresh(self, products: set[int], *, skip: set[int]) -> int:
        """Rewrite the new generation's rows of these products with their current fields."""
        if not products:
            return 0
        with self.vs.sessions() as session:
            pairs = [(image, product) for image, product in catalogue.indexed_images_of_products(session, products)
                     if image not in skip]
            fields = catalogue.product_fields(session, products)
        ids, vectors = self.store.get_vectors([image for image, _ in pairs])
        product_of = dict(pairs)
        rows = [(int(image), product_of[int(image)], vector) for image, vector in zip(ids, vectors)]
        self._commit_rows(rows, fields)
        self.report.refreshed += len(products)
        return len(products)

    def _live_failures(self) -> dict[int, ImageFailure]:
        """The failures of images the catalogue still holds."""
        with self.vs.sessions() as session:
            existing = catalogue.existing_image_ids(session, list(self.failed))
        return {image_id: failure for image_id, failure in self.failed.items() if image_id in existing}

    def _check_failures(self, failures: dict[int, ImageFailure]) -> None:
        """Raises: ReembedRefusedError when too many images have no new vector (unless forced)."""
        count, total = len(failures), max(self.report.images, 1)
        if self.force or count < MIN_FAILED_TO_REFUSE or count <= MAX_FAILED_FRACTION * total:
            return
        listed = "; ".join(f"{failure.sku}: {failure.image}: {failure.message}"
                           for failure in list(failures.values())[:MAX_LISTED_FAILURES])
        more = f" (and {count - MAX_LISTED_FAILURES} more)" if count > MAX_LISTED_FAILURES else ""
        self.report.refused = (
            f"{count} of the catalogue's {self.report.images} images could not be embedded with "
            f"{self.identity.backbone} ({count / total:.1%}, more than the {MAX_FAILED_FRACTION:.0%} limit), even "
            f"when retried: nothing was switched, searches still answer from {self.report.previous_backbone}. "
            f"Fix the images (or remove their products) and run reembed again (it resumes), or pass --force "
            f"to switch anyway (they are then marked failed and leave search results). Failed: {listed}{more}")
        logger.warning("%s", self.report.refused)
        raise ReembedRefusedError(self.report.refused, self.report)

    def _switch(self, failures: dict[int, ImageFailure]) -> None:
        """One catalogue transaction: the new identity, its generation, the time of the
        switch, and the images it has no vector for marked failed."""
        with self.vs.session() as session:
            catalogue.record_identity(session, backbone=self.identity.backbone,
                                      weights_sha256=self.identity.weights_sha256, dim=self.identity.dim,
                                      recipe=self.identity.recipe, recipe_version=self.identity.recipe_version,
                                      recipe_hash=self.identity.recipe_hash)
            catalogue.set_meta(session, GENERATION_KEY, self.location)
            if self.weights:
                catalogue.set_meta(session, WEIGHTS_PATH_KEY, self.weights)
            else:
                catalogue.delete_meta(session, WEIGHTS_PATH_KEY)
            catalogue.delete_meta(session, TARGET_KEY)
            catalogue.set_meta(session, SWITCHED_AT_KEY, datetime.now(timezone.utc).isoformat())
            catalogue.mark_failed(session, [(image_id, f"re-embedding with {self.identity.backbone}: "
                                             f"{failure.message}") for image_id, failure in failures.items()])

    # --- embedding and writing ----------------------------------------------------------

    def _embed_and_write(self, images: Sequence[catalogue.IndexedImage], progress: Progress) -> int:
        """Embed ``images`` with the new CNN and commit their rows. Returns how many got a vector."""
        if not images:
            return 0
        tasks = [ImageTask(image_id=image.id, product_id=image.product_id, sku=image.sku, path=image.path)
                 for image in images]
        results: list[ImageResult] = []
        for batch in self.embedding.run(tasks, self._stages):
            results += batch
            progress.advance(len(batch))
        good = [result for result in results if result.vector is not None]
        for result in results:
            if result.vector is None:
                task = result.task
                self.failed[task.image_id] = ImageFailure(task.sku, task.path, result.error_code or "error",
                                                          result.error_message or "not embedded")
            else:
                self.failed.pop(result.task.image_id, None)
        self._stages.reused += sum(result.reused for result in good)
        self.report.embedded += sum(not result.reused for result in good)
        with self.vs.sessions() as session:
            fields = catalogue.product_fields(session, {result.task.product_id for result in good})
        self._commit_rows([(r.task.image_id, r.task.product_id, r.vector) for r in good], fields)
        return len(good)

    def _commit_rows(self, rows: Iterable[tuple[int, int, np.ndarray]],
                     fields: dict[int, catalogue.ProductFields]) -> None:
        # A product deleted meanwhile has no fields: its images leave with the next round.
        rows = [row for row in rows if row[1] in fields]
        if not rows:
            return
        started = time.perf_counter()
        kept = [fields[product] for _, product, _ in rows]
        self.store.commit(VectorRows.build(
            ids=[image for image, _, _ in rows], product_ids=[product for _, product, _ in rows],
            vectors=np.stack([vector for _, _, vector in rows]), prices=[f.price for f in kept],
            tokens=[row_tokens(category=f.category, brand=f.brand, attributes=f.attributes) for f in kept],
            dim=self.store.dim))
        self._stages.stage_seconds["write"] += time.perf_counter() - started


class _NewGeneration:
    """What :class:`CnnEmbedding` needs of a data directory, with the new CNN, reusing the
    new generation's vectors of identical content."""

    def __init__(self, vs: "VisualSearch", embedder: Embedder, store: VectorStore):
        self._vs = vs
        self.embedder = embedder
        self.store = store
        self.settings = vs.settings
        self.data_dir = vs.data_dir

    def vectors_by_sha256(self, digests: Sequence[str]) -> dict[str, np.ndarray]:
        if not digests:
            return {}
        with self._vs.sessions() as session:
            image_of = catalogue.indexed_images_by_sha256(session, digests)
        ids, vectors = self.store.get_vectors(list(image_of.values()))
        vector_of = dict(zip(ids.tolist(), vectors))
        return {digest: vector_of[image] for digest, image in image_of.items() if image in vector_of}


# --- helpers ---------------------------------------------------------------------------


def _same_identity(ref: GenerationRef, identity: EmbedderIdentity) -> bool:
    stored = ref.identity
    return stored is not None and (stored.backbone, stored.weights_sha256, stored.dim) == \
        (identity.backbone, identity.weights_sha256, identity.dim) and \
        recipe_matches(stored.recipe_name, stored.recipe_version, stored.recipe_hash,
                       name=identity.recipe or identity.backbone, version=identity.recipe_version,
                       fingerprint=identity.recipe_hash)


def _contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are in ``sorted_ids`` (a binary search each: the sorted side may
    hold every id of a 10M-image catalogue)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    positions = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[positions] == ids


def _read_target(session) -> dict | None:
    raw = catalogue.get_meta(session, TARGET_KEY)
    return json.loads(raw) if raw else None


def _target_matches(target: dict, identity: EmbedderIdentity) -> bool:
    """Whether the unfinished run ``target`` was embedding with ``identity`` (a run recorded
    before recipes used its backbone's default recipe)."""
    return (target["backbone"], target["weights_sha256"], int(target["dim"])) == \
        (identity.backbone, identity.weights_sha256, identity.dim) and \
        recipe_matches(target.get("recipe") or target["backbone"], target.get("recipe_version"),
                       target.get("recipe_hash"), name=identity.recipe or identity.backbone,
                       version=identity.recipe_version, fingerprint=identity.recipe_hash)

