"""Recall@10 and latency of chosen (nprobe, re-rank) settings on a benchmarks.scale DIR.

    python -m benchmarks.search_settings --data-dir DIR 12/300 16/200 32/100

Tuning (``VectorStore.tune``) picks one setting from a sample of the catalogue's own
vectors; this shows the ones around it on the benchmark's queries (DIR/bench/queries.npy,
unfiltered), to see what limits recall (the lists probed or the re-rank depth) and what
each costs. Recall is against brute force over every live stored vector
(``benchmarks.scale.exact_top10``: minutes at 10M, since it reads every vector).

Latency caveat: every setting answers the same queries, so the later ones find more
of their re-ranked rows in the page cache. Run a setting alone in a fresh process,
after evicting the vector files, for cold-read figures; the recalls do not depend on
the order.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .scale import exact_top10, recall

WARM_UP = 60  # searches of other photos per setting before the timed ones


def parse_setting(text: str) -> tuple[int, int]:
    try:
        nprobe, rerank = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NPROBE/RERANK, e.g. 12/300") from None
    if nprobe < 1 or rerank < 10:
        raise argparse.ArgumentTypeError(f"{text!r}: nprobe >= 1 and re-rank >= 10")
    return nprobe, rerank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="a DIR built by benchmarks.scale")
    parser.add_argument("--queries", type=int, default=200, help="how many of DIR/bench/queries.npy (default 200)")
    parser.add_argument("settings", nargs="+", type=parse_setting, metavar="NPROBE/RERANK")
    args = parser.parse_args()
    bench = args.data_dir / "bench"
    if not (bench / "queries.npy").is_file():
        parser.error(f"{bench / 'queries.npy'} is missing: build DIR with `python -m benchmarks.scale` first")

    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings
    from visualsearch.vectors import configure_threads

    queries = np.load(bench / "queries.npy")[:args.queries]
    warm = np.load(bench / "warm-up.npy")
    print(f"exact top 10 of {len(queries)} queries (reads every stored vector)...", flush=True)
    truth = exact_top10(args.data_dir, queries, labels=("none",))["none"]
    configure_threads(serving=True)  # as a server worker searches
    store = VisualSearch(Settings(data_dir=args.data_dir), read_only=True).store()
    tuned = store.stats().tuning
    print(f"tuned: nprobe {tuned.get('nprobe')}, re-rank {tuned.get('rerank')}, "
          f"sample recall@10 {tuned.get('recall_at_10')}")
    print(f"{'nprobe':>6} {'re-rank':>7} {'p50 ms':>7} {'p95 ms':>7} {'recall@10':>9}")
    for nprobe, rerank in args.settings:
        for query in warm[:WARM_UP]:
            store.search(query[None, :], 10, nprobe=nprobe, rerank=rerank)
        timings, found = [], []
        for query in queries:
            begin = time.perf_counter()
            hits = store.search(query[None, :], 10, nprobe=nprobe, rerank=rerank)
            timings.append(time.perf_counter() - begin)
            found.append(hits.ids.tolist())
        print(f"{nprobe:>6} {rerank:>7} {1000 * np.percentile(timings, 50):>7.1f} "
              f"{1000 * np.percentile(timings, 95):>7.1f} {recall(found, truth):>9.3f}", flush=True)


if __name__ == "__main__":
    main()
