"""Retrieval quality of a data directory: labelled query photos in; Recall@K, mAP@10,
category precision@10 and query latency out.

The queries file
----------------
CSV (header row) or JSON Lines (``.jsonl``, ``.ndjson`` or ``.json``), one row per query:

- ``image`` (required): the query photo, a path relative to the queries file's folder
  (or absolute).
- ``expected_sku``: the relevant product(s), several separated by ``|`` (in JSON Lines
  also a list); may be empty when only the category is scored.
- ``expected_category`` (optional): the category the results should have.
- ``exclude_image`` (optional): a catalogue image (a path relative to the queries
  file's folder like ``image``, or absolute) that must not count as a match: for a
  query that is itself a catalogue image, e.g. one view of a multi-view product
  querying for its siblings. Its product is then ranked by its best image *other*
  than this one, so it can still be found through its other views.

The file needs the ``image`` column and ``expected_sku`` or ``expected_category``;
every row needs an existing image file and an expected SKU or category. Other
columns are ignored. :func:`read_queries` checks the whole file before anything runs.

The metrics
-----------
Each query runs through :meth:`VisualSearch.search` (decode, embed, search) for its
ranked list ``r_1 .. r_n`` of products, best first (``n <= top_k``; ties keep the
order search returned). Let ``S`` be the query's expected SKUs.

- **Recall@K** (K = 1, 5, 10, and ``top_k`` when larger): the share of queries with
  an expected SKU that have at least one SKU of ``S`` among ``r_1 .. r_K``.
- **mAP@10**: the mean over queries with an expected SKU of
  ``AP@10 = (1 / min(|S|, 10)) * sum of precision@r over the ranks r <= 10 holding a
  relevant product``, where ``precision@r`` is the number of relevant products among
  ``r_1 .. r_r`` divided by ``r``. A SKU is relevant at its first rank only (a repeat
  counts as a miss), so AP@10 stays within [0, 1].
- **category precision@10**: the mean over queries with an expected category of
  ``(results among r_1 .. r_10 of that category) / 10``, divided by 10 even when fewer
  results came back; categories compare as the category filter does (Unicode
  caseless: NFKC, casefolded, outer spaces dropped).
- **latency p50 / p95**: the wall time of each whole search call in milliseconds
  (numpy's linear-interpolation percentiles), after one untimed warm-up search.

Queries without an expected SKU count only for category precision. A metric with no
query to average over is ``None`` (``null`` in JSON).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterator, Sequence

import numpy as np

from .catalogue_manifest import RowProblems, read_json_lines
from .errors import ConfigurationError, ImageError, InvalidRequestError, VisualSearchError
from .indexing import Progress
from .search import MAX_TOP_K
from .vectors.filters import fold

if TYPE_CHECKING:
    from .service import VisualSearch

logger = logging.getLogger(__name__)

DEPTH = 10  # mAP@10 and category precision@10 look this deep
RECALL_AT = (1, 5, 10)
SKU_SEPARATOR = "|"
EXPECTED_COLUMNS = ("expected_sku", "expected_category")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")


class QueriesFileError(VisualSearchError):
    """A queries file cannot be used (missing column, bad rows, missing image files)."""

    code = "bad_queries"


@dataclass(frozen=True)
class Query:
    """One labelled query photo (paths absolute and normalised)."""

    line: int
    image: Path
    expected_skus: tuple[str, ...] = ()
    expected_category: str | None = None
    exclude_image: Path | None = None


# --- metrics (pure) ----------------------------------------------------------------------


def hit_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> bool:
    """Whether a SKU of ``relevant`` is among the first ``k`` of ``ranked``."""
    return any(sku in relevant for sku in ranked[:k])


def average_precision_at_k(ranked: Sequence[str], relevant: Collection[str], k: int = DEPTH) -> float:
    """AP@k of one ranking (see the module docstring); a repeated SKU is relevant once.

    Raises:
        ValueError: ``relevant`` is empty.
    """
    wanted = set(relevant)
    if not wanted:
        raise ValueError("average precision needs at least one relevant SKU")
    seen: set[str] = set()
    total = 0.0
    for rank, sku in enumerate(ranked[:k], start=1):
        if sku in wanted and sku not in seen:
            seen.add(sku)
            total += len(seen) / rank
    return total / min(len(wanted), k)


def category_precision_at_k(categories: Sequence[str | None], expected: str, k: int = DEPTH) -> float:
    """The share of ``k`` result slots whose category is ``expected`` (Unicode caseless);
    missing results and results without a category count as misses."""
    key = fold(expected)
    return sum(1 for category in categories[:k] if category is not None and fold(category) == key) / k


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation), None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# --- the queries file --------------------------------------------------------------------


def read_queries(path: str | Path, *, limit: int | None = None) -> list[Query]:
    """Read and check every row of the queries file at ``path`` (see the module docstring).

    Args:
        path: a CSV file, or JSON Lines (``.jsonl``, ``.ndjson``, ``.json``).
        limit: keep only the first ``limit`` queries (the whole file is still checked).

    Returns:
        The queries in file order, image paths absolute and normalised.

    Raises:
        QueriesFileError: unreadable file, a missing column, broken CSV or JSON, no rows,
            or rows (named by line) with no image, a missing image file, neither an
            expected SKU nor an expected category, or a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise QueriesFileError(f"queries file {path} does not exist")
    base = path.parent.resolve()
    queries: list[Query] = []
    problems = RowProblems(QueriesFileError, "nothing was run")
    try:
        rows = _read_jsonl(path) if path.suffix.lower() in JSON_LINES_SUFFIXES else _read_csv(path)
        for line, row in rows:
            try:
                queries.append(_query(row, line, base))
            except ValueError as exc:
                problems.add(f"line {line}: {exc}")
    except UnicodeDecodeError as exc:
        raise QueriesFileError(f"{path} is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise QueriesFileError(f"{path} is not a valid CSV file: {exc}") from None
    except OSError as exc:
        raise QueriesFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    problems.raise_if_any(str(path))
    if not queries:
        raise QueriesFileError(f"queries file {path} has no rows")
    return queries[:limit] if limit is not None else queries


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [] if "image" in header else ["image"]
        if not any(name in header for name in EXPECTED_COLUMNS):
            missing.append(" or ".join(EXPECTED_COLUMNS))
        if missing:
            raise QueriesFileError(f"{path}: missing column(s) {', '.join(missing)}; found "
                                   f"{', '.join(header) or 'none'} (a queries file needs image and expected_sku "
                                   "or expected_category; optional: exclude_image)")
        for values in reader:
            if not "".join(values).strip():
                continue  # blank line
            if len(values) > len(header):
                raise QueriesFileError(f"{path}: line {reader.line_num} has more fields than the header")
            yield reader.line_num, dict(zip(header, values))


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return read_json_lines(path, QueriesFileError)


def _query(row: dict[str, Any], line: int, base: Path) -> Query:
    """Raises: ValueError naming what is wrong with the row."""
    image_text = _text(row, "image")
    if image_text is None:
        raise ValueError("no image")
    image = _resolve(image_text, base)
    skus = _skus(row.get("expected_sku"))
    category = _text(row, "expected_category")
    if not skus and category is None:
        raise ValueError("neither expected_sku nor expected_category")
    if not image.is_file():
        raise ValueError(f"image file {image} does not exist")
    exclude = _text(row, "exclude_image")
    return Query(line=line, image=image, expected_skus=skus, expected_category=category,
                 exclude_image=_resolve(exclude, base) if exclude is not None else None)


def _text(row: dict[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, not {json.dumps(value)}")
    return value.strip() or None


def _skus(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        parts = value
    elif isinstance(value, str):
        parts = value.split(SKU_SEPARATOR)
    else:
        raise ValueError("expected_sku must be text ('A|B' for several) or a list of text")
    return tuple(dict.fromkeys(part.strip() for part in parts if part.strip()))


def _resolve(text: str, base: Path) -> Path:
    """An absolute, normalised path, as the manifest reader stores catalogue images."""
    return Path(os.path.normpath(base / os.path.expanduser(text)))


# --- running the queries -----------------------------------------------------------------


@dataclass(frozen=True)
class QueryOutcome:
    """What one query's search returned."""

    query: Query
    skus: tuple[str, ...]
    categories: tuple[str | None, ...]
    latency_ms: float


@dataclass(frozen=True)
class EvalReport:
    """The metrics of one run (see the module docstring); ``outcomes`` holds each query's results."""

    data_dir: str
    backbone: str | None
    top_k: int
    queries: int
    sku_queries: int
    category_queries: int
    recall: dict[int, float | None]
    map_at_10: float | None
    category_precision_at_10: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    outcomes: tuple[QueryOutcome, ...] = field(default=(), repr=False)

    def metrics(self) -> dict[str, float | None]:
        """The metrics by name, in display order."""
        return {**{f"recall_at_{k}": value for k, value in self.recall.items()},
                "map_at_10": self.map_at_10, "category_precision_at_10": self.category_precision_at_10,
                "latency_p50_ms": self.latency_p50_ms, "latency_p95_ms": self.latency_p95_ms}

    def to_dict(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "backbone": self.backbone, "top_k": self.top_k, "queries": self.queries,
                "sku_queries": self.sku_queries, "category_queries": self.category_queries, **self.metrics()}


def summarise(outcomes: Sequence[QueryOutcome], *, top_k: int, data_dir: str = "",
              backbone: str | None = None) -> EvalReport:
    """The metrics of a run's outcomes (pure: no search runs here)."""
    with_skus = [outcome for outcome in outcomes if outcome.query.expected_skus]
    with_category = [outcome for outcome in outcomes if outcome.query.expected_category is not None]
    depths = RECALL_AT + ((top_k,) if top_k > max(RECALL_AT) else ())
    recall = {k: _mean([float(hit_at_k(o.skus, o.query.expected_skus, k)) for o in with_skus]) for k in depths}
    latencies = [outcome.latency_ms for outcome in outcomes]
    return EvalReport(
        data_dir=data_dir, backbone=backbone, top_k=top_k, queries=len(outcomes), sku_queries=len(with_skus),
        category_queries=len(with_category), recall=recall,
        map_at_10=_mean([average_precision_at_k(o.skus, o.query.expected_skus) for o in with_skus]),
        category_precision_at_10=_mean([category_precision_at_k(o.categories, o.query.expected_category)
                                        for o in with_category]),
        latency_p50_ms=percentile(latencies, 50), latency_p95_ms=percentile(latencies, 95),
        outcomes=tuple(outcomes),
    )


def evaluate(vs: "VisualSearch", queries: Sequence[Query], *, top_k: int = DEPTH,
             progress: Progress | None = None) -> EvalReport:
    """Run every query through ``vs.search`` and measure the results.

    Args:
        vs: an open, indexed data directory (searched with the backbone it was indexed with).
        queries: from :func:`read_queries`.
        top_k: products asked of each search, 10..100 (the metrics look 10 deep).
        progress: told the number of queries, then advanced once per query.

    Returns:
        The metrics, with each query's outcome.

    Raises:
        InvalidRequestError: ``top_k`` out of range.
        QueriesFileError: no queries, an ``exclude_image`` the catalogue does not hold, or
            a query image that cannot be decoded (named by line).
        ConfigurationError: nothing is indexed in the data directory.
        BackboneMismatchError, StorageError: as :meth:`VisualSearch.search`.
    """
    if not isinstance(top_k, int) or not DEPTH <= top_k <= MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be from {DEPTH} to {MAX_TOP_K} (the metrics look {DEPTH} deep), "
                                  f"got {top_k!r}")
    if not queries:
        raise QueriesFileError("no queries to run")
    identity = vs.stored_identity()
    if identity is None or vs.store() is None:
        raise ConfigurationError(f"nothing is indexed in {vs.data_dir} yet: index a catalogue first "
                                 "(or pass --manifest)")
    excluded = _excluded_image_ids(vs, queries)
    # The first search pays for loading the CNN and the index, and for allocations no later
    # search repeats: it is not timed.
    _search(vs, queries[0], top_k, excluded[0])
    if progress is not None:
        progress.set_total(len(queries))
    outcomes = []
    for query, exclude in zip(queries, excluded):
        started = time.perf_counter()
        hits = _search(vs, query, top_k, exclude)
        elapsed_ms = (time.perf_counter() - started) * 1000
        outcomes.append(QueryOutcome(query=query, skus=tuple(hit.sku for hit in hits),
                                     categories=tuple(hit.category for hit in hits), latency_ms=elapsed_ms))
        if progress is not None:
            progress.advance(1)
    logger.info("evaluated %d queries against %s", len(outcomes), vs.data_dir)
    return summarise(outcomes, top_k=top_k, data_dir=str(vs.data_dir.resolve()), backbone=identity.backbone)


def _search(vs: "VisualSearch", query: Query, top_k: int, exclude: frozenset[int]):
    try:
        return vs.search(query.image, top_k=top_k, exclude_image_ids=exclude).hits
    except ImageError as exc:
        raise QueriesFileError(f"line {query.line}: image {query.image}: {exc}") from None


def _excluded_image_ids(vs: "VisualSearch", queries: Sequence[Query]) -> list[frozenset[int]]:
    """Each query's excluded catalogue image ids (the stored path, or failing that the path
    with its symbolic links resolved, as a manifest in another folder may name it).

    Raises:
        QueriesFileError: naming the lines whose exclude_image the catalogue does not hold.
    """
    candidates = {query.line: _path_candidates(query.exclude_image) for query in queries if query.exclude_image}
    found = vs.image_ids_by_path(path for paths in candidates.values() for path in paths)
    excluded: list[frozenset[int]] = []
    problems = RowProblems(QueriesFileError, "nothing was run")
    for query in queries:
        ids = frozenset(image_id for path in candidates.get(query.line, ()) for image_id in found.get(path, ()))
        if query.exclude_image is not None and not ids:
            problems.add(f"line {query.line}: exclude_image {query.exclude_image} is not an image of the catalogue")
        excluded.append(ids)
    problems.raise_if_any(f"queries against {vs.data_dir}")
    return excluded


def _path_candidates(path: Path) -> tuple[str, ...]:
    return tuple(dict.fromkeys((str(path), str(path.resolve()))))


def compare_reports(a: EvalReport, b: EvalReport) -> dict[str, Any]:
    """Two runs of the same queries side by side: ``{"a", "b", "difference"}``, where each
    difference is b - a (None where either side has no value)."""
    first, second = a.metrics(), b.metrics()
    difference = {name: None if first[name] is None or second.get(name) is None else second[name] - first[name]
                  for name in first}
    return {"a": a.to_dict(), "b": b.to_dict(), "difference": difference}
