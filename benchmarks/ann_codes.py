"""Which ANN codes need the fewest re-ranked candidates: recall@10 after exact re-ranking.

Builds each code the store can plan (through the store's own :class:`Codec`: same
training, list assignment and scan) over one set of vectors and reports, for each
``nprobe`` and re-rank depth, recall@10 against exact search and the scan's time per
query. Every candidate a search keeps is one float32 row read at re-ranking, and at
10M images most of those come from disk, so the depth a code needs for recall 0.95 is
what decides the search time there.

    python -m benchmarks.ann_codes --size 1M                 # the scale benchmark's synthetic vectors
    python -m benchmarks.ann_codes --data-dir DIR            # the real vectors of an indexed data directory

The synthetic vectors are labelled so (``benchmarks.scale.SyntheticVectors``); the
queries are other synthetic photos of catalogue products (``--size``) or catalogue
vectors themselves with their own row left out (``--data-dir``). Needs the vectors in
RAM: 5 GB at 1M.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from visualsearch.vectors.codec import Codec, search_segment
from visualsearch.vectors.planner import CODE_DIM, IndexPlan, plan_index, rabitq_code_bytes

SIZES = {"100k": 100_000, "300k": 300_000, "1M": 1_000_000}
NPROBES = (4, 8, 16, 32)
DEPTHS = (50, 100, 200, 300, 500, 1000)


def synthetic(count: int, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, queries, ids to leave out per query: none) from the scale benchmark's generator."""
    from benchmarks.scale import IMAGES_PER_PRODUCT, SyntheticVectors, real_embeddings

    generator = SyntheticVectors(real_embeddings())
    rng = np.random.default_rng(7)
    vectors = np.empty((count, generator.components.shape[1]), np.float32)
    written, product = 0, 0
    while written < count:
        keys = np.arange(product, product + 50_000)
        repeats = np.array([IMAGES_PER_PRODUCT[k % len(IMAGES_PER_PRODUCT)] for k in keys])
        part = generator.images(np.repeat(generator.centres(keys), repeats, axis=0), rng)[:count - written]
        vectors[written:written + len(part)] = part
        written, product = written + len(part), product + len(keys)
    picked = np.random.default_rng(9).choice(product, queries, replace=False)
    asked = generator.images(generator.centres(picked), np.random.default_rng(11))
    return vectors, asked, np.full(queries, -1)


def from_data_dir(data_dir: Path, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(live vectors of DIR's store, a sample of them as queries, their own rows)."""
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    store = VisualSearch(Settings(data_dir=data_dir, workers=0)).store()
    snap = store.snapshot()
    vectors = np.concatenate([np.asarray(s.rows.vectors)[snap.alive[s.uid]] for s in snap.segments])
    own = np.sort(np.random.default_rng(9).choice(len(vectors), queries, replace=False))
    return vectors, vectors[own], own


def exact_top10(vectors: np.ndarray, queries: np.ndarray, own: np.ndarray) -> np.ndarray:
    best = np.full((len(queries), 10), -1, np.int64)
    best_scores = np.full((len(queries), 10), -np.inf, np.float32)
    for start in range(0, len(vectors), 100_000):
        scores = queries @ vectors[start:start + 100_000].T
        rows = np.arange(start, start + scores.shape[1])
        scores[rows[None, :] == own[:, None]] = -np.inf
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best, np.broadcast_to(rows, (len(queries), len(rows)))], axis=1)
        top = np.argpartition(-scores, 9, axis=1)[:, :10]
        best, best_scores = np.take_along_axis(ids, top, 1), np.take_along_axis(scores, top, 1)
    return best


def plans(count: int, dim: int) -> dict[str, IndexPlan]:
    nlist = plan_index(count, dim, 1 << 50).nlist  # the planner's list count for this size
    return {
        f"PCA{CODE_DIM},IVF{nlist},SQ8": IndexPlan(kind="ivf", dim=dim, planned_for=count, nlist=nlist,
                                                   reduce_dim=CODE_DIM, encoding="SQ8", code_bytes=CODE_DIM),
        f"IVF{nlist},RaBitQ": IndexPlan(kind="ivf", dim=dim, planned_for=count, nlist=nlist, reduce_dim=CODE_DIM,
                                        encoding="RaBitQ", code_bytes=rabitq_code_bytes(dim, 1)),
    }


def measure(name: str, plan: IndexPlan, vectors: np.ndarray, queries: np.ndarray, own: np.ndarray,
            truth: np.ndarray) -> list[dict]:
    import faiss

    started = time.perf_counter()
    sample = vectors[np.sort(np.random.default_rng(0).choice(len(vectors), min(len(vectors), 160_000), False))]
    codec = Codec.train("bench", plan, sample)
    trained = time.perf_counter() - started
    started = time.perf_counter()
    index = codec.encode(vectors)
    encoded = time.perf_counter() - started
    print(f"{name}: {plan.code_bytes} bytes per vector, trained in {trained:.0f} s, "
          f"encoded {len(vectors) / encoded:,.0f} vectors/s", flush=True)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as the store searches
    reduced = codec.reduce(queries)
    scanned = codec.scanned(queries, reduced)
    rows = []
    for nprobe in NPROBES:
        coarse = codec.coarse(reduced, nprobe)
        for depth in DEPTHS:
            hits, times = 0, []
            for q in range(len(queries)):
                begun = time.perf_counter()
                _, found = search_segment(index, scanned[q:q + 1], (coarse[0][q:q + 1], coarse[1][q:q + 1]),
                                          depth + 1, None)
                times.append(time.perf_counter() - begun)
                candidates = found[0][(found[0] >= 0) & (found[0] != own[q])]
                exact = vectors[candidates] @ queries[q]
                hits += len(set(candidates[np.argsort(-exact)[:10]].tolist()) & set(truth[q].tolist()))
            row = {"code": name, "nprobe": nprobe, "rerank": depth, "recall_at_10": round(hits / truth.size, 3),
                   "scan_ms_p50": round(float(np.median(times)) * 1000, 2)}
            rows.append(row)
            print(f"  nprobe {nprobe:3d}  re-rank {depth:5d}  recall@10 {row['recall_at_10']:.3f}  "
                  f"scan p50 {row['scan_ms_p50']:.2f} ms", flush=True)
    faiss.omp_set_num_threads(threads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--size", choices=list(SIZES), help="synthetic vectors of the scale benchmark")
    source.add_argument("--data-dir", type=Path, help="the vectors of an indexed data directory")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    if args.size:
        vectors, queries, own = synthetic(SIZES[args.size], args.queries)
        print(f"{len(vectors):,} synthetic vectors (benchmarks.scale.SyntheticVectors), {len(queries)} queries")
    else:
        vectors, queries, own = from_data_dir(args.data_dir, args.queries)
        print(f"{len(vectors):,} vectors of {args.data_dir}, {len(queries)} of them as queries")
    truth = exact_top10(vectors, queries, own)
    for name, plan in plans(len(vectors), vectors.shape[1]).items():
        measure(name, plan, vectors, queries, own, truth)


if __name__ == "__main__":
    main()
