"""Filtered-search rules compared in one process (the A/B behind docs/performance.md).

Separate benchmark processes on a shared 2-core machine vary by +-50 % from run to run;
here one process answers the same queries under each rule for how many lists a filtered
search probes, in turn, twice, so the comparison is not the machine's noise.

    python -m benchmarks.filter_rules --data-dir DIR    # a DIR built by benchmarks.scale
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.scale import FILTERS


def linear(nprobe: int, share: float, nlist: int) -> int:
    """The former rule: as many allowed candidates as an unfiltered search."""
    return max(1, min(nlist, math.ceil(nprobe / share)))


def main() -> None:
    from visualsearch.search import find_products
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings
    from visualsearch.vectors import SearchFilters, configure_threads
    from visualsearch.vectors import store as store_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    configure_threads(serving=True)
    queries = np.load(args.data_dir / "bench" / "queries.npy")
    warm, timed = queries[:100], queries[100:100 + args.queries]
    vs = VisualSearch(Settings(data_dir=args.data_dir), read_only=True)
    for query in warm:
        find_products(vs, query[None], top_k=10, filters=SearchFilters())
    rules = {"nprobe / share": linear, "nprobe / sqrt(share)": store_module.filtered_probes}
    p50: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for rule_name, rule in rules.items():
            store_module.filtered_probes = rule
            for filter_name, spec in FILTERS.items():
                filters = SearchFilters.build(**spec)
                took = []
                for query in timed:
                    started = time.perf_counter()
                    find_products(vs, query[None], top_k=10, filters=filters)
                    took.append(time.perf_counter() - started)
                p50.setdefault((filter_name, rule_name), []).append(float(np.median(took)) * 1000)
    print(f"{'p50 ms':<16}" + "".join(f"{name:>26}" for name in rules))
    for filter_name in FILTERS:
        cells = [", ".join(f"{v:.2f}" for v in p50[(filter_name, rule_name)]) for rule_name in rules]
        print(f"{filter_name:<16}" + "".join(f"{cell:>26}" for cell in cells))


if __name__ == "__main__":
    main()
