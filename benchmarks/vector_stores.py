"""The embedded FAISS store beside Milvus on the same vectors: write time and search latency.

    python -m benchmarks.vector_stores [--rows 5000] [--dim 1280] [--queries 100]
                                       [--milvus milvus://127.0.0.1:19530/bench]

Milvus Lite (a file under a temporary folder) is always measured; ``--milvus`` adds a
Milvus server. Both stores get the same random unit vectors with the same filter fields
(a category keeping 2 % of the rows, a price on every row), committed in batches of
1,000 as the indexer does; then ``--queries`` single-image searches of top 10 each,
unfiltered, by category, and by price range. Printed: one row per store.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from visualsearch.vectors import SearchFilters, VectorRows, VectorStore, row_tokens

BATCH = 1000
SHA = "0" * 64


def _rows(start: int, stop: int, dim: int, rng: np.random.Generator) -> VectorRows:
    ids = list(range(start, stop))
    vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return VectorRows.build(ids=ids, product_ids=ids, vectors=vectors, prices=[float(1 + i % 100) for i in ids],
                            tokens=[row_tokens(category="rare" if i % 50 == 0 else "common", brand=None,
                                               attributes=None) for i in ids], dim=dim)


def _measure(store, rows: int, dim: int, queries: int) -> dict[str, float]:
    rng = np.random.default_rng(7)
    started = time.perf_counter()
    for start in range(0, rows, BATCH):
        with store.writing():
            store.commit(_rows(start, min(rows, start + BATCH), dim, rng))
    write_s = time.perf_counter() - started
    probes = rng.standard_normal((queries, dim)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    result = {"write_s": write_s}
    for name, filters in (("none", None), ("category 2%", SearchFilters.build(category="rare")),
                          ("price 20-30", SearchFilters.build(min_price=20.0, max_price=30.0))):
        store.search(probes[:1], 10, filters)  # warm-up
        times = []
        for query in probes:
            begun = time.perf_counter()
            store.search(query[None, :], 10, filters)
            times.append((time.perf_counter() - begun) * 1000)
        result[name] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--milvus", help="also measure a Milvus server: milvus://HOST:PORT/COLLECTION")
    args = parser.parse_args()
    from visualsearch.vectors.milvus_store import MilvusVectorStore, parse_vector_store

    with tempfile.TemporaryDirectory() as folder:
        stores = {"FAISS (embedded)": VectorStore(Path(folder) / "faiss", backbone="bench", weights_sha256=SHA,
                                                  dim=args.dim, memory_budget=4 * 1024**3),
                  "Milvus Lite": MilvusVectorStore(parse_vector_store(str(Path(folder) / "lite.db")),
                                                   backbone="bench", weights_sha256=SHA, dim=args.dim)}
        if args.milvus:
            stores["Milvus server"] = MilvusVectorStore(parse_vector_store(args.milvus), backbone="bench",
                                                        weights_sha256=SHA, dim=args.dim, lock_dir=Path(folder))
        print(f"{args.rows:,} vectors of {args.dim} dimensions, {args.queries} searches of top 10 (p50 ms)")
        print(f"| store | write {args.rows:,} | no filter | category 2% | price 20-30 |")
        print("|---|---|---|---|---|")
        for name, store in stores.items():
            numbers = _measure(store, args.rows, args.dim, args.queries)
            print(f"| {name} | {numbers['write_s']:.2f} s | {numbers['none']:.1f} | {numbers['category 2%']:.1f} "
                  f"| {numbers['price 20-30']:.1f} |")
            if name.startswith("Milvus"):
                store.drop()


if __name__ == "__main__":
    main()
