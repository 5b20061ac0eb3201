"""How precise must codes be to re-rank few candidates? (docs/performance.md, "The refine step").

Scores every vector of a synthetic catalogue (the scale benchmark's vectors near real
embeddings) with a code, without an inverted file, so that only the code's precision
counts, and prints the recall@10 against exact search of re-ranking the code's best
DEPTH candidates exactly:

- the ANN codes the planner can choose (PCA + SQ8 at 256 or 512 dimensions), and the
  same byte budget spent on more dimensions with fewer bits (PCA512 + SQ4);
- the refine step: the best 1,500 by PCA256 + SQ8, scored with full-dimension SQ4
  codes, then re-ranked exactly either as a fixed number of them or as the engine
  does, every candidate within the codes' error margin of the 10th (``within_margin``).

    python -m benchmarks.refine_codes [--vectors 1000000] [--queries 200]

Needs about 2 x vectors x 5 KB of RAM (1M vectors: 10 GB).
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from benchmarks.scale import SyntheticVectors, real_embeddings
from visualsearch.vectors.codec import REFINE_MARGIN_SIGMAS, REFINE_RANGE_MARGIN, REFINE_TYPES
from visualsearch.vectors.store import within_margin

DEPTHS = (100, 200, 300, 500, 1000, 1500)
CANDIDATES = 1500
TRAIN = 100_000


def synthetic(count: int, queries: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """``count`` catalogue vectors (two images per product) and new photos of some products."""
    generator = SyntheticVectors(real_embeddings())
    rng = np.random.default_rng(seed)
    parts = [generator.images(np.repeat(generator.centres(np.arange(start, min(start + 10_000, count // 2))), 2,
                                        axis=0), rng) for start in range(0, count // 2, 10_000)]
    products = rng.choice(count // 2, queries, replace=False)
    return np.concatenate(parts), generator.images(generator.centres(products), rng)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10].tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))


def ranked_by_code(vectors: np.ndarray, queries: np.ndarray, train: np.ndarray, dims: int, quantizer) -> np.ndarray:
    """Each query's CANDIDATES best rows by the code's scores (exhaustive)."""
    pca = faiss.PCAMatrix(vectors.shape[1], dims)
    pca.train(train)
    index = faiss.IndexScalarQuantizer(dims, quantizer, faiss.METRIC_INNER_PRODUCT)
    index.train(pca.apply(train))
    for start in range(0, len(vectors), 100_000):
        index.add(pca.apply(vectors[start:start + 100_000]))
    return index.search(pca.apply(queries), CANDIDATES)[1]


def exact_rerank(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    return np.stack([rows[np.argsort(-(vectors[rows] @ query))] for query, rows in zip(queries, candidates)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    faiss.omp_set_num_threads(2)
    started = time.perf_counter()
    vectors, queries = synthetic(args.vectors, args.queries)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    train = vectors[np.sort(np.random.default_rng(1).choice(len(vectors), min(TRAIN, len(vectors)), replace=False))]
    print(f"{len(vectors):,} synthetic vectors, {len(queries)} queries ({time.perf_counter() - started:.0f} s)")
    print(f"{'code (bytes)':<22}" + "".join(f"{'re-rank ' + format(d, ','):>15}" for d in DEPTHS))
    ranked = {}
    for name, dims, quantizer, size in (("PCA256,SQ8", 256, faiss.ScalarQuantizer.QT_8bit, 256),
                                        ("PCA512,SQ8", 512, faiss.ScalarQuantizer.QT_8bit, 512),
                                        ("PCA512,SQ4", 512, faiss.ScalarQuantizer.QT_4bit, 256)):
        ranked[name] = ranked_by_code(vectors, queries, train, dims, quantizer)
        exact = [exact_rerank(vectors, queries, ranked[name][:, :depth]) for depth in DEPTHS]
        print(f"{name + f' ({size})':<22}" + "".join(f"{recall(found, truth):>15.3f}" for found in exact))

    # The refine step on PCA256,SQ8's candidates: full-dimension SQ4 scores, then exact.
    refiner = faiss.IndexScalarQuantizer(vectors.shape[1], REFINE_TYPES["SQ4"][0], faiss.METRIC_INNER_PRODUCT)
    refiner.sq.rangestat_arg = REFINE_RANGE_MARGIN
    refiner.train(train)
    bins = REFINE_TYPES["SQ4"][1]
    variance = (faiss.vector_to_array(refiner.sq.trained)[vectors.shape[1]:] / bins) ** 2 / 12
    print(f"\nrefine step: PCA256,SQ8's best {CANDIDATES:,}, then SQ4 scores of every dimension, then exact")
    for depth in (500, CANDIDATES):
        fixed: dict[int, list[np.ndarray]] = {keep: [] for keep in (20, 50)}
        margin_found, kept = [], []
        for query, rows in zip(queries, ranked["PCA256,SQ8"][:, :depth]):
            approx = refiner.sa_decode(refiner.sa_encode(vectors[rows])) @ query
            exact = vectors[rows] @ query
            for keep, found in fixed.items():
                best = np.argsort(-approx)[:keep]
                found.append(rows[best[np.argsort(-exact[best])]])
            margin = REFINE_MARGIN_SIGMAS * np.sqrt(np.dot(query * query, variance))
            chosen = np.flatnonzero(within_margin(approx, 10, margin))
            kept.append(len(chosen))
            margin_found.append(rows[chosen[np.argsort(-exact[chosen])]])
        every = recall(exact_rerank(vectors, queries, ranked["PCA256,SQ8"][:, :depth]), truth)
        print(f"  of {depth:>5,} candidates: all exact {every:.3f}"
              + "".join(f", best {keep} by SQ4 exact {recall(found, truth):.3f}" for keep, found in fixed.items())
              + f", within the margin exact {recall(margin_found, truth):.3f} "
              f"({np.mean(kept):.0f} rows on average, {np.percentile(kept, 95):.0f} p95)")


if __name__ == "__main__":
    main()
