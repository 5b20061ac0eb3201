"""Catalogue scale on one machine: build, load, search, filter, write, at 100k to 10M images.

    python -m benchmarks.scale --size 100k|1M|10M --data-dir DIR [--queries 200]
    python -m benchmarks.scale --measure-only --data-dir DIR      # a DIR built before
    python -m benchmarks.scale --measure-only --search-only --data-dir DIR   # searches only
    python -m benchmarks.scale --size 10M --grow 500000 --data-dir DIR       # the write path at that size

Builds a catalogue through the library's own write path: a CSV manifest of real
catalogue rows (products of 1-3 images, categories that keep about 50 %, 2 % and
0.1 % of the images, prices spread over 1-100, a colour attribute) is indexed with
the real indexer, whose embedding stage is replaced by SYNTHETIC vectors drawn near
real embeddings (a Gaussian fitted to the default backbone's embeddings of the demo
photos, one centre per product, each image near its product's centre). Every image
row points at one of three real demo photos, so that ``visualsearch index`` can
re-run over the manifest and find the files unchanged.

DIR is left an ordinary data directory, with the real backbone's identity:
``visualsearch serve --data-dir DIR`` and ``visualsearch search`` open it. The
measurements (one table, also written to DIR/bench-scale.json): build time and
write-path images/s, RAM and load time of a fresh serving process, disk, search +
metadata p50/p95 with no filter, with filters keeping 50 %, 2 % and 0.1 % of the
images and with a price range (in a server's steady state: after 500 other
searches), recall@10 of the store against exact search over the
same (filtered) vectors, single PUT and DELETE latency (write path, synthetic
vector), the time to index 1,000 new images into the big catalogue, and the time
and peak memory of a ``visualsearch index`` re-run over the unchanged manifest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"
SIZES = {"10k": 10_000, "100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}
IMAGES_PER_PRODUCT = (1, 2, 2, 3)   # cycles: 2 images per product on average
COLOURS = ("black", "white", "red", "blue", "green", "grey", "beige", "brown")
# Category of product i by i % 1000: the shares of images follow.
FILTERS = {"none": {}, "category 50%": {"category": "Apparel"}, "category 2%": {"category": "Watches"},
           "category 0.1%": {"category": "Telescopes"}, "price 20-30": {"min_price": 20.0, "max_price": 30.0}}
SEED = 2026
# Searches (other photos) a serving process answers before the timed ones.
WARM_UP_QUERIES = 500


def category_of(i: int) -> str:
    # Images per product cycle with i % 4 (1, 2, 2, 3: 8 images per 4 products), so
    # 500 of 1000 products hold 50 % of the images, 20 of them 2 %, and product 521
    # (2 images) 0.1 %.
    slot = i % 1000
    if slot < 500:
        return "Apparel"
    if slot < 520:
        return "Watches"
    if slot == 521:
        return "Telescopes"
    return f"Home-{slot % 9}"


def price_of(i: int) -> float:
    return round(1 + (i * 7919 % 9901) / 100.0, 2)


# --- synthetic vectors near real embeddings --------------------------------------------


class SyntheticVectors:
    """Unit vectors near real embeddings (labelled synthetic wherever they are reported).

    A product's centre is one of the real embeddings (the demo photos, mirrored and
    cropped) moved by a Gaussian offset shaped like the real embeddings' spread (their
    principal components); its images, and the shopper photos used as queries, lie
    around that centre, plus isotropic noise so that the vectors are full rank.
    """

    def __init__(self, real: np.ndarray, seed: int = SEED, within: float = 0.6, spread: float = 0.3):
        self.anchors = real.astype(np.float32)
        centered = real - real.mean(axis=0)
        _, singular, components = np.linalg.svd(centered, full_matrices=False)
        self.components = components.astype(np.float32)
        self.scales = (singular / np.sqrt(len(real))).astype(np.float32)
        self.noise = float(np.sqrt(np.mean(self.scales ** 2)) * 0.35)
        self.within, self.spread, self.seed = within, spread, seed

    def centres(self, product_keys: Sequence[int]) -> np.ndarray:
        """One deterministic centre per product key."""
        keys = np.asarray(product_keys, dtype=np.int64)
        anchors = self.anchors[(keys * 2654435761) % len(self.anchors)]
        z = np.stack([np.random.default_rng((self.seed, int(key))).standard_normal(len(self.scales))
                      for key in keys]).astype(np.float32)
        return anchors + self.within * ((z * self.scales) @ self.components)

    def images(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Images of products: near each centre (another view, another photo)."""
        z = rng.standard_normal((len(centres), len(self.scales))).astype(np.float32)
        vectors = centres + self.spread * ((z * self.scales) @ self.components)
        vectors += rng.standard_normal(vectors.shape).astype(np.float32) * self.noise
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def real_embeddings() -> np.ndarray:
    """The default backbone's embeddings of the demo photos, their mirror images and crops."""
    from PIL import ImageOps

    from visualsearch.embedder import Embedder
    from visualsearch.images import load_image

    embedder = Embedder("efficientnet_lite0")
    pictures = []
    for path in sorted((DEMO / "images").glob("*.jpg")):
        image = load_image(path)
        width, height = image.size
        pictures += [image, ImageOps.mirror(image), image.crop((0, 0, width * 3 // 4, height * 3 // 4)),
                     image.crop((width // 4, height // 4, width, height))]
    return embedder.embed_images(pictures)


class SyntheticEmbedding:
    """The indexer's embedding stage, with synthetic vectors instead of the CNN."""

    def __init__(self, identity, vectors: SyntheticVectors, key_of_sku):
        self.identity = identity
        self.vectors = vectors
        self.key_of_sku = key_of_sku
        self.rng = np.random.default_rng(SEED + 1)
        self.stats: dict[str, tuple[int, int]] = {}

    def run(self, tasks, report) -> Iterator[list]:
        from visualsearch.indexing import ImageResult

        for start in range(0, len(tasks), 4096):
            batch = tasks[start:start + 4096]
            keys = [self.key_of_sku(task.sku) for task in batch]
            vectors = self.vectors.images(self.vectors.centres(keys), self.rng)
            results = []
            for task, vector in zip(batch, vectors):
                size, mtime = self._stat(task.path)
                # A real-looking content hash: random keys are what the sha256 index gets in life.
                digest = hashlib.sha256(f"synthetic-{task.image_id}".encode()).hexdigest()
                results.append(ImageResult(task, vector=vector, sha256=digest,
                                           file_size=size, file_mtime_ns=mtime, width=512, height=512))
            yield results

    def _stat(self, path: str) -> tuple[int, int]:
        if path not in self.stats:
            stat = os.stat(path)
            self.stats[path] = (stat.st_size, stat.st_mtime_ns)
        return self.stats[path]


# --- building ----------------------------------------------------------------------------


def write_manifest(folder: Path, images: int, first_product: int = 0, name: str = "catalogue.csv") -> Path:
    """Rows for ``images`` images (about images / 2 products), streamed to a CSV file."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for number, source in enumerate(sorted((DEMO / "images").glob("*.jpg"))[:3]):
        target = folder / f"view-{number}.jpg"
        if not target.exists():
            shutil.copyfile(source, target)
        photos.append(target.name)
    manifest = folder / name
    written = 0
    product = first_product
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "image", "title", "category", "brand", "price", "colour"])
        while written < images:
            count = min(IMAGES_PER_PRODUCT[product % len(IMAGES_PER_PRODUCT)], images - written)
            for view in range(count):
                writer.writerow([f"S{product}", photos[view], f"Synthetic product {product}", category_of(product),
                                 f"Brand {product % 97}", price_of(product), COLOURS[product % len(COLOURS)]])
            written += count
            product += 1
    return manifest


def sku_key(sku: str) -> int:
    return int(sku[1:])


def build(data_dir: Path, size: int, generator: SyntheticVectors) -> dict:
    from tqdm import tqdm

    from visualsearch.catalogue_manifest import iter_manifest_records, validate_manifest
    from visualsearch.indexing import index_records
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    manifest = write_manifest(data_dir / "bench", size)
    vs = VisualSearch(Settings(data_dir=data_dir, workers=0))
    embedding = SyntheticEmbedding(vs.embedder.identity, generator, sku_key)
    summary = validate_manifest(manifest)
    bar = tqdm(total=summary.images, unit="img", desc="build (synthetic vectors)")

    class Bar:
        def set_total(self, total):
            pass

        def advance(self, count):
            bar.update(count)

    started = time.perf_counter()
    report = index_records(vs, iter_manifest_records(manifest), embedding=embedding, progress=Bar())
    bar.close()
    seconds = time.perf_counter() - started
    store = vs.store()
    return {"images": report.embedded, "products": report.products, "build_seconds": round(seconds, 1),
            "write_seconds": round(report.stage_seconds["write"], 1),
            "write_path_images_per_s": round(report.embedded / seconds, 1),
            "index_type": store.manifest.index_type, "tuning": vars(store.manifest.tuning)}


def grow(data_dir: Path, count: int, size: int, generator: SyntheticVectors) -> dict:
    """Index ``count`` new images into a built DIR through the same write path (merges
    included): the write path's rate at the catalogue's size, not on the way to it."""
    from visualsearch.catalogue_manifest import iter_manifest_records
    from visualsearch.indexing import index_records
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    manifest = write_manifest(data_dir / "bench", count, first_product=2 * size, name=f"grow-{count}.csv")
    vs = VisualSearch(Settings(data_dir=data_dir, workers=0), create=False)
    embedding = SyntheticEmbedding(vs.embedder.identity, generator, sku_key)
    before = vs.store().count
    started = time.perf_counter()
    report = index_records(vs, iter_manifest_records(manifest), embedding=embedding)
    seconds = time.perf_counter() - started
    return {"catalogue_images": before, "images": report.embedded, "seconds": round(seconds, 1),
            "write_path_images_per_s": round(report.embedded / seconds, 1)}


# --- measuring ---------------------------------------------------------------------------


def rss_mb() -> tuple[float, float]:
    """(resident, of which anonymous) MiB of this process; file-backed pages are the
    page cache of memory-mapped index files, which the kernel can drop."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024)


def serve_probe(data_dir: Path, queries_file: Path) -> dict:
    """Run in a fresh process: open the data directory as a server worker would, then search."""
    from visualsearch.search import find_products
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings
    from visualsearch.vectors import SearchFilters, configure_threads

    configure_threads(serving=True)  # as the web app does
    queries = np.load(queries_file)
    started = time.perf_counter()
    vs = VisualSearch(Settings(data_dir=data_dir), read_only=True)
    store = vs.store()
    find_products(vs, queries[:1], top_k=10, filters=SearchFilters())
    load_seconds = time.perf_counter() - started
    rss_loaded = rss_mb()
    # What a server does in the background at its start (web/library.py): the ANN lists
    # and re-rank codes into the page cache. Timed apart; searches start once it is done.
    started = time.perf_counter()
    warmed_bytes = store.warm_page_cache()
    warm_seconds = time.perf_counter() - started
    # A server's steady state: it has answered other searches before (first touches of
    # the mapped inverted lists and the filter caches are paid by these, not timed).
    warm = np.load(queries_file.with_name("warm-up.npy"))
    for label, spec in FILTERS.items():
        for query in warm[:WARM_UP_QUERIES // len(FILTERS)]:
            find_products(vs, query[None, :], top_k=10, filters=SearchFilters.build(**spec))
    numbers = store.stats()
    out = {"load_seconds": round(load_seconds, 3), "rss_after_load_mb": rss_loaded, "search": {},
           "warm_page_cache": {"gb": round(warmed_bytes / 1e9, 2), "seconds": round(warm_seconds, 1)},
           "index": {"type": numbers.index_type, "segments": numbers.segments, "tuning": numbers.tuning}}
    for label, spec in FILTERS.items():
        filters = SearchFilters.build(**spec)
        timings, found = [], []
        for query in queries:
            begin = time.perf_counter()
            find_products(vs, query[None, :], top_k=10, filters=filters)
            timings.append(time.perf_counter() - begin)
            found.append(store.search(query[None, :], 10, filters).ids.tolist())
        out["search"][label] = {"p50_ms": round(1000 * float(np.percentile(timings, 50)), 2),
                                "p95_ms": round(1000 * float(np.percentile(timings, 95)), 2), "ids": found}
    out["rss_after_queries_mb"] = rss_mb()
    return out


def exact_top10(data_dir: Path, queries: np.ndarray,
                labels: Sequence[str] = tuple(FILTERS)) -> dict[str, list[list[int]]]:
    """Exact top-10 image ids per filter (those of ``labels``), by brute force over every
    live stored vector; which rows pass a filter comes from the catalogue database, not
    from the store."""
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    vs = VisualSearch(Settings(data_dir=data_dir), read_only=True)
    allowed = _allowed_ids(vs, labels)
    snap = vs.store().snapshot()
    best = {label: (np.full((len(queries), 10), -np.inf, np.float32), np.full((len(queries), 10), -1, np.int64))
            for label in labels}
    for segment in snap.segments:
        alive = snap.alive[segment.uid]
        for start in range(0, len(segment), 200_000):
            rows = np.flatnonzero(alive[start:start + 200_000]) + start
            if not len(rows):
                continue
            ids = np.asarray(segment.rows.ids)[rows]
            scores = queries @ np.asarray(segment.rows.vectors[rows]).T
            for label in labels:
                keep = np.ones(len(ids), bool) if allowed[label] is None else np.isin(ids, allowed[label])
                if not keep.any():
                    continue
                s = np.concatenate([best[label][0], scores[:, keep]], axis=1)
                i = np.concatenate([best[label][1], np.broadcast_to(ids[keep], (len(queries), int(keep.sum())))],
                                   axis=1)
                top = np.argpartition(-s, 9, axis=1)[:, :10]
                best[label] = (np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1))
    return {label: [[int(x) for x in row if x >= 0] for row in ids] for label, (_, ids) in best.items()}


def _allowed_ids(vs, labels: Sequence[str]) -> dict[str, np.ndarray | None]:
    from sqlalchemy import select

    from visualsearch.catalogue import ImageStatus, Product, ProductImage

    allowed: dict[str, np.ndarray | None] = {}
    with vs.sessions() as session:
        for label in labels:
            spec = FILTERS[label]
            if not spec:
                allowed[label] = None
                continue
            query = select(ProductImage.id).join(Product).where(ProductImage.status == ImageStatus.INDEXED)
            if "category" in spec:
                query = query.where(Product.category == spec["category"])
            if "min_price" in spec:
                query = query.where(Product.price >= spec["min_price"], Product.price <= spec["max_price"])
            allowed[label] = np.sort(np.fromiter(session.scalars(query), dtype=np.int64))
    return allowed


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth))
    return hits / max(1, sum(len(t) for t in truth))


def write_latencies(data_dir: Path, generator: SyntheticVectors, size: int, repeats: int = 20) -> dict:
    """Single PUT (one product, two images) and DELETE through the API's write path,
    with synthetic vectors instead of the CNN; then 1,000 new images as a batch run."""
    from visualsearch.catalogue_manifest import ProductRecord, iter_manifest_records
    from visualsearch.indexing import index_records
    from visualsearch.service import API_MERGE_LIMIT, VisualSearch
    from visualsearch.settings import Settings

    vs = VisualSearch(Settings(data_dir=data_dir), create=False)
    embedding = SyntheticEmbedding(vs.embedder.identity, generator, sku_key)
    photos = data_dir / "bench"
    put, delete = [], []
    for n in range(repeats):
        sku = f"S{size + n}"
        record = ProductRecord(sku=sku, title="new", category=category_of(n), price=price_of(n),
                               images=[photos / "view-0.jpg", photos / "view-1.jpg"])
        begin = time.perf_counter()
        index_records(vs, [[record]], exclusive=False, merge_limit=API_MERGE_LIMIT, embedding=embedding,
                      flush_rows=1 << 30)
        put.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        assert vs.remove([sku]).removed == [sku]
        delete.append(time.perf_counter() - begin)
    manifest = write_manifest(photos, 1000, first_product=size + repeats, name="new-1000.csv")
    begin = time.perf_counter()
    report = index_records(vs, iter_manifest_records(manifest), embedding=embedding)
    new_seconds = time.perf_counter() - begin
    return {"put_p50_ms": round(1000 * float(np.median(put)), 1), "put_max_ms": round(1000 * max(put), 1),
            "delete_p50_ms": round(1000 * float(np.median(delete)), 1),
            "delete_max_ms": round(1000 * max(delete), 1),
            "new_1000_images_seconds": round(new_seconds, 2), "new_1000_images_embedded": report.embedded}


def rerun_unchanged(data_dir: Path) -> dict:
    """``visualsearch index`` over the unchanged manifest, timed, with its peak memory."""
    manifest = data_dir / "bench" / "catalogue.csv"
    # VmHWM, not getrusage: ru_maxrss survives exec and would report the parent's peak.
    command = [sys.executable, "-c",
               "import sys; from indexer.cli import main; sys.argv = sys.argv[1:];\n"
               "try:\n    main()\nexcept SystemExit:\n    pass\n"
               "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
               "print('maxrss_kb', hwm, file=sys.stderr)",
               "visualsearch", "index", str(manifest), "--data-dir", str(data_dir), "--json"]
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    seconds = time.perf_counter() - begin
    report = json.loads(done.stdout)
    peak = int(done.stderr.rsplit("maxrss_kb", 1)[1].split()[0]) / 1024
    return {"rerun_seconds": round(seconds, 1), "rerun_unchanged": report["unchanged"],
            "rerun_embedded": report["embedded"], "rerun_peak_rss_mb": round(peak)}


def disk_mb(folder: Path) -> dict:
    sizes = {"catalogue_db": 0, "vectors": 0}
    for path in folder.rglob("*"):
        if path.is_file():
            key = "vectors" if "vectors" in path.parts else ("catalogue_db" if path.name.startswith("catalogue.db")
                                                              else None)
            if key:
                sizes[key] += path.stat().st_size
    return {key: round(value / 1024**2) for key, value in sizes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES, key=SIZES.get), default="100k")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--measure-only", action="store_true", help="measure a DIR built before")
    parser.add_argument("--search-only", action="store_true",
                        help="with --measure-only: load, RAM and searches only (no writes, no re-run)")
    parser.add_argument("--grow", type=int, metavar="N",
                        help="index N new images into a DIR built before and report the write path's rate")
    parser.add_argument("--query-seed", type=int, default=SEED + 2,
                        help="seed of the query photos; another than the default gives queries that no earlier "
                             "run searched, whose re-ranked rows are not in the page cache (with --measure-only)")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # internal: the serving process
    args = parser.parse_args()
    if args.grow:
        grown = grow(args.data_dir, args.grow, SIZES[args.size], SyntheticVectors(real_embeddings()))
        (args.data_dir / "bench-scale-grow.json").write_text(json.dumps(grown, indent=2) + "\n")
        print(f"{grown['images']:,} new images into {grown['catalogue_images']:,}: {grown['seconds']} s, "
              f"{grown['write_path_images_per_s']:,.0f} images/s through the write path (merges included)")
        return
    if args.probe:
        print(json.dumps(serve_probe(args.data_dir, args.probe)))
        return

    size = SIZES[args.size]
    generator = SyntheticVectors(real_embeddings())
    results: dict = {"size": args.size, "synthetic_vectors": True, "cpu_count": os.cpu_count()}
    if not args.measure_only:
        if (args.data_dir / "catalogue.db").exists():
            sys.exit(f"{args.data_dir} exists: remove it, or pass --measure-only")
        results["build"] = build(args.data_dir, size, generator)
    results["disk_mb"] = disk_mb(args.data_dir)

    rng = np.random.default_rng(args.query_seed)
    keys = rng.choice(size // 2, args.queries, replace=False)
    queries = generator.images(generator.centres(keys), rng)  # new photos of catalogue products
    queries_file = args.data_dir / "bench" / "queries.npy"
    np.save(queries_file, queries)
    warm_keys = rng.choice(size // 2, WARM_UP_QUERIES, replace=False)
    np.save(queries_file.with_name("warm-up.npy"), generator.images(generator.centres(warm_keys), rng))
    probe = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--data-dir", str(args.data_dir),
                            "--probe", str(queries_file)], capture_output=True, text=True, cwd=REPO, check=True)
    served = json.loads(probe.stdout)
    truth = exact_top10(args.data_dir, queries)
    results["serve"] = {"load_seconds": served["load_seconds"], "rss_after_load_mb": served["rss_after_load_mb"],
                        "warm_page_cache": served["warm_page_cache"],
                        "rss_after_queries_mb": served["rss_after_queries_mb"], "index": served["index"]}
    results["search"] = {label: {"p50_ms": entry["p50_ms"], "p95_ms": entry["p95_ms"],
                                 "recall_at_10": round(recall(entry["ids"], truth[label]), 4)}
                         for label, entry in served["search"].items()}
    if not args.search_only:
        results["writes"] = write_latencies(args.data_dir, generator, size)
        results["rerun"] = rerun_unchanged(args.data_dir)
    name = "bench-scale-search.json" if args.search_only else "bench-scale.json"
    (args.data_dir / name).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    lines = [f"visualsearch scale benchmark: {results['size']} images (synthetic vectors near real embeddings)"]
    build = results.get("build")
    if build:
        lines.append(f"  build            {build['build_seconds']:>9.1f} s   ({build['write_path_images_per_s']:.0f} "
                     f"images/s through the write path, index {build['index_type']}, "
                     f"nprobe {build['tuning']['nprobe']}, tuned recall@10 {build['tuning']['recall_at_10']})")
    serve = results["serve"]
    lines.append(f"  load             {serve['load_seconds']:>9.2f} s   (fresh process: catalogue, segments, "
                 f"first query)")
    warm = serve.get("warm_page_cache") or {}
    if warm.get("gb"):
        lines.append(f"  warm page cache  {warm['seconds']:>9.1f} s   ({warm['gb']} GB of ANN lists and re-rank codes "
                     "read in, as a server does at its start)")
    lines.append(f"  RAM serving      {serve['rss_after_queries_mb'][0]:>9.0f} MB  "
                 f"({serve['rss_after_queries_mb'][1]:.0f} MB anonymous; the rest is mapped index files)")
    disk = results["disk_mb"]
    lines.append(f"  disk             {disk['vectors'] + disk['catalogue_db']:>9.0f} MB  "
                 f"(vectors {disk['vectors']} MB, catalogue {disk['catalogue_db']} MB)")
    index = serve["index"]
    lines.append(f"  index            {index['type']}, {index['segments']} segments, nprobe "
                 f"{index['tuning'].get('nprobe')}, re-rank {index['tuning'].get('rerank')}")
    lines.append("  search + metadata, top 10      p50 ms   p95 ms   recall@10")
    for label, entry in results["search"].items():
        lines.append(f"    {label:<26} {entry['p50_ms']:>8.2f} {entry['p95_ms']:>8.2f}   {entry['recall_at_10']:.3f}")
    if "writes" not in results:
        print("\n".join(lines))
        return
    writes = results["writes"]
    lines.append(f"  PUT (2 images)   {writes['put_p50_ms']:>9.1f} ms  p50 (max {writes['put_max_ms']} ms; write path,"
                 " CNN excluded)")
    lines.append(f"  DELETE           {writes['delete_p50_ms']:>9.1f} ms  p50 (max {writes['delete_max_ms']} ms)")
    lines.append(f"  1,000 new images {writes['new_1000_images_seconds']:>9.2f} s")
    rerun = results["rerun"]
    lines.append(f"  re-run unchanged {rerun['rerun_seconds']:>9.1f} s   (visualsearch index, "
                 f"{rerun['rerun_unchanged']} unchanged, peak RSS {rerun['rerun_peak_rss_mb']} MB)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
