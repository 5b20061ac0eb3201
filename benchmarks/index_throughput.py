"""Throughput of the whole indexing pipeline (read + decode + CNN + catalogue + index).

    python -m benchmarks.index_throughput [--images 1000] [--workers 0,2] [--batch-size 16]
                                          [--engine ray]

Builds a catalogue of distinct 512 px JPEGs (random crops of the demo photos, so every
file has its own content hash and real decoding cost), indexes it into a fresh data
directory once per worker count, and prints images/s with the time of each stage.
``--engine ray`` runs the same job on a local Ray (started inside the timing: its
start-up is part of what a run costs) instead of the worker counts.
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from .demo_retrieval import DEMO_MANIFEST, demo_rows


def build_catalogue(folder: Path, count: int) -> Path:
    sources = [Image.open(DEMO_MANIFEST.parent / row["image"]).convert("RGB") for row in demo_rows()]
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    manifest = folder / "catalogue.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "image", "category"])
        for number in range(count):
            source = sources[number % len(sources)]
            size = rng.randint(300, 512)
            left, top = rng.randint(0, 512 - size), rng.randint(0, 512 - size)
            image = source.crop((left, top, left + size, top + size)).resize((512, 512))
            image.save(folder / "images" / f"{number}.jpg", quality=90)
            writer.writerow([f"SKU{number}", f"images/{number}.jpg", f"c{number % 10}"])
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts to compare")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine", choices=("local", "ray"), default="local")
    args = parser.parse_args()

    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    with tempfile.TemporaryDirectory() as folder:
        manifest = build_catalogue(Path(folder) / "catalogue", args.images)
        worker_counts = [int(value) for value in args.workers.split(",")] if args.engine == "local" else [0]
        for workers in worker_counts:
            settings = Settings.from_env({}, data_dir=Path(folder) / f"data-{workers}", workers=workers,
                                         batch_size=args.batch_size, device=args.device)
            vs = VisualSearch(settings)
            vs.embedder  # load the model outside the timing
            started = time.perf_counter()
            report = vs.index(manifest, engine=args.engine)
            seconds = time.perf_counter() - started
            stages = ", ".join(f"{name} {value:.1f}s" for name, value in report.stage_seconds.items())
            index = vs.stats()["index"]
            print(f"engine {args.engine}, workers {workers}, batch {settings.batch_size}: "
                  f"{report.embedded} images in {seconds:.1f}s "
                  f"= {report.embedded / seconds:.1f} images/s (main-process time: {stages}); "
                  f"index {index['type']}, {index['segments']} segment(s)")
            rerun = time.perf_counter()
            again = vs.index(manifest, engine=args.engine)
            print(f"  re-run (all unchanged): {again.unchanged} skipped in {time.perf_counter() - rerun:.2f}s")


if __name__ == "__main__":
    main()
