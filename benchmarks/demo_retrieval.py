"""Retrieval quality and speed on the bundled demo catalogue, through the library's front door.

    python -m benchmarks.demo_retrieval [--backbone NAME] [--seeds 5]

Indexes ``data/demo`` into a temporary data directory, then measures:
- shopper photos: every catalogue image turned into a phone-style snapshot (random
  crop 60-85 %, rotation +-15 degrees, colour jitter, JPEG quality 40); is its own
  product ranked first / in the top 3?
- other views: for each image of a multi-view product, with that image left out, is
  the product (through its other views) among the top 5 products? Is each other view
  among the 5 most similar images?
- indexing throughput and search latency.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "data" / "demo" / "catalogue.csv"


def shopper_photo(path: str | Path, rng: random.Random) -> bytes:
    """A shopper's snapshot of a catalogue image: cropped, tilted, off-colour, JPEG 40."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    fraction = rng.uniform(0.60, 0.85)
    crop_w, crop_h = int(width * fraction), int(height * fraction)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    image = image.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.75, 1.25))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=40)
    return buffer.getvalue()


def demo_rows(manifest: Path = DEMO_MANIFEST) -> list[dict]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


def shopper_ranks(vs, rows: list[dict], seed: int, manifest: Path = DEMO_MANIFEST) -> tuple[list[int], list[float]]:
    """Rank (0 = first) of each image's own product for its shopper photo, and latencies in ms.

    ``vs`` is an open :class:`visualsearch.service.VisualSearch`.
    """
    rng = random.Random(seed)
    ranks, latencies = [], []
    for row in rows:
        photo = shopper_photo(manifest.parent / row["image"], rng)
        result = vs.search(photo, top_k=10)
        skus = [hit.sku for hit in result.hits]
        ranks.append(skus.index(row["sku"]) if row["sku"] in skus else len(skus))
        latencies.append(result.took_ms["total"])
    return ranks, latencies


def stored_vectors(vs, skus: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(image ids, their stored vectors, sku of each image id) of these products' indexed images."""
    sku_of = {image.id: sku for sku in skus for image in vs.product(sku).indexed_images}
    ids, vectors = vs.store().get_vectors(list(sku_of))
    return ids, vectors, sku_of


def other_view_ranks(vs, rows: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """For every image of a multi-view product, with the image itself left out:
    the rank of its product among products, and the rank of each other view among images."""
    skus = list(dict.fromkeys(row["sku"] for row in (rows if rows is not None else demo_rows())))
    ids, vectors, sku_of = stored_vectors(vs, skus)
    views = defaultdict(list)
    for image_id in ids.tolist():
        views[sku_of[image_id]].append(image_id)
    similarities = vectors @ vectors.T
    product_ranks, image_ranks = [], []
    for row, image_id in enumerate(ids.tolist()):
        sku = sku_of[image_id]
        if len(views[sku]) < 2:
            continue
        order = [int(ids[j]) for j in np.argsort(-similarities[row]) if int(ids[j]) != image_id]
        products = list(dict.fromkeys(sku_of[other] for other in order))
        product_ranks.append(products.index(sku))
        image_ranks += [order.index(other) for other in views[sku] if other != image_id]
    return product_ranks, image_ranks


def _preprocessing_variant(backbone: str | None, resize: int | None, input_size: int | None) -> str:
    """Register a hidden copy of ``backbone`` with other resize/crop sizes; returns its name."""
    from dataclasses import replace

    from visualsearch.backbones import get_backbone, register_backbone
    from visualsearch.backbones_builtin import DEFAULT_BACKBONE

    spec = get_backbone(backbone or DEFAULT_BACKBONE)
    pre = spec.preprocessing
    pre = replace(pre, resize_size=resize or pre.resize_size, input_size=input_size or pre.input_size)
    name = f"{spec.name}@{pre.resize_size}-{pre.input_size}"
    register_backbone(replace(spec, name=name, preprocessing=pre, hidden=True))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=None, help="registered backbone (default: the default one)")
    parser.add_argument("--seeds", type=int, default=5, help="shopper-photo rounds (45 photos each)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the CNN")
    parser.add_argument("--resize", type=int, default=None,
                        help="try another preprocessing: resize the short side to this many pixels")
    parser.add_argument("--input-size", type=int, default=None, help="... and centre-crop this square")
    args = parser.parse_args()
    if args.resize or args.input_size:
        args.backbone = _preprocessing_variant(args.backbone, args.resize, args.input_size)

    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=Path(folder), backbone=args.backbone, threads=args.threads, workers=0)
        started = time.perf_counter()
        report = VisualSearch(settings).index(DEMO_MANIFEST)
        index_seconds = time.perf_counter() - started
        vs = VisualSearch(settings, read_only=True)
        rows = demo_rows()
        firsts, top3s, latencies = [], [], []
        for seed in range(2026, 2026 + args.seeds):
            ranks, times = shopper_ranks(vs, rows, seed)
            firsts.append(sum(rank == 0 for rank in ranks))
            top3s.append(sum(rank < 3 for rank in ranks))
            latencies += times
        product_ranks, image_ranks = other_view_ranks(vs, rows)
        backbone = vs.embedder.identity.backbone
        index = vs.stats()["index"]

    n = len(rows)
    print(f"backbone: {backbone}, {report.images} images of {report.products} products, "
          f"index {index['type']} ({index['vectors']} vectors in {index['segments']} segment(s))")
    print(f"indexing: {report.embedded} images in {index_seconds:.1f}s "
          f"({report.embedded / index_seconds:.1f} images/s, including model load)")
    print(f"shopper photos, own product first: {sum(firsts)}/{n * args.seeds} "
          f"(per round of {n}: {firsts})")
    print(f"shopper photos, own product in top 3: {sum(top3s)}/{n * args.seeds}")
    print(f"search latency: median {statistics.median(latencies):.1f} ms, "
          f"p95 {np.percentile(latencies, 95):.1f} ms (decode + embed + search, one thread of requests)")
    print(f"other views, product in top 5 (query image left out): "
          f"{sum(rank < 5 for rank in product_ranks)}/{len(product_ranks)}")
    print(f"other views, each other view in the 5 most similar images: "
          f"{sum(rank < 5 for rank in image_ranks)}/{len(image_ranks)}")


if __name__ == "__main__":
    main()
