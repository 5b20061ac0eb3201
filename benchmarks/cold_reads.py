"""Searches whose stored vectors come from disk, with and without prefetching (docs/performance.md,
"Vectors that outgrow the page cache").

At 10M images the float32 vectors (51 GB) outgrow the page cache of a 24 GB machine,
so most rows a search re-ranks (or scans exactly, for a small filter) are read from
disk. This reproduces that on a smaller DIR: before every timed search it evicts the
store's vector files from the page cache (``posix_fadvise(DONTNEED)``: no root
needed; the ANN codes stay cached, as they do at 10M), then compares the reads issued
together (``RowReader.prefetch``, the engine's way) with one blocking read after another.
It is a worst case: at 10M about half of the rows are still cached.

    python -m benchmarks.cold_reads --data-dir DIR    # a DIR built by benchmarks.scale
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.scale import FILTERS


def evict(segments_dir: Path) -> None:
    """Drop the cached pages of every stored-vector file (not of the ANN lists)."""
    for path in segments_dir.glob("*.vseg"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    from visualsearch.search import find_products
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings
    from visualsearch.vectors import SearchFilters, configure_threads
    from visualsearch.vectors.row_reads import RowReader, consecutive_runs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=60)
    args = parser.parse_args()
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("this benchmark needs posix_fadvise (Linux)")
    configure_threads(serving=True)
    queries = np.load(args.data_dir / "bench" / "queries.npy")
    warm, timed = queries[:100], queries[100:100 + args.queries]
    vs = VisualSearch(Settings(data_dir=args.data_dir), read_only=True)
    segments_dir = vs.store().segments_dir
    for query in warm:
        find_products(vs, query[None], top_k=10, filters=SearchFilters())
    prefetch = RowReader.prefetch  # vectors' and re-rank codes' reads alike
    modes = {"warm cache": (prefetch, False), "cold, reads issued together": (prefetch, True),
             "cold, one read at a time": (lambda self, rows: consecutive_runs(rows), True)}
    print(f"{'p50 / p95 ms':<16}" + "".join(f"{name:>30}" for name in modes))
    for filter_name, spec in FILTERS.items():
        filters = SearchFilters.build(**spec)
        cells = []
        for prefetcher, cold in modes.values():
            RowReader.prefetch = prefetcher
            try:
                if not cold:  # the same searches once before, so that their rows are cached
                    for query in timed:
                        find_products(vs, query[None], top_k=10, filters=filters)
                took = []
                for query in timed:
                    if cold:
                        evict(segments_dir)
                    started = time.perf_counter()
                    find_products(vs, query[None], top_k=10, filters=filters)
                    took.append(time.perf_counter() - started)
            finally:
                RowReader.prefetch = prefetch
            cells.append(f"{np.median(took) * 1000:.1f} / {np.percentile(took, 95) * 1000:.1f}")
        print(f"{filter_name:<16}" + "".join(f"{cell:>30}" for cell in cells))


if __name__ == "__main__":
    main()
