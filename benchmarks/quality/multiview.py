"""multiview: find a product from another photo of it (the Saleor demo's 9 multi-view products)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from benchmarks.demo_retrieval import DEMO_MANIFEST, demo_rows

from .common import BuildResult, CatalogueRow, QueryRow, prepare_folder, write_benchmark

NAME = "multiview"

CREDITS = """
# multiview: credits

Product images and data: the Saleor demo shop (`data/demo/`, from the `saleor` 2.10.1
package on PyPI). Artwork (c) Mirumee Software, CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/); product data BSD 3-Clause.
See `data/demo/CREDITS.md` for the modifications made there; the images here are
byte-for-byte copies of `data/demo/images/`.

Queries: every view of every product that has two or more views. Each query *is* a
catalogue image (`exclude_image`), so a match must come through the product's other views.
"""


def catalogue_rows(manifest: Path) -> list[CatalogueRow]:
    """The manifest's rows as catalogue rows (sku, image, title, category)."""
    return [CatalogueRow(sku=row["sku"], image=row["image"], title=row.get("title") or "",
                         category=row.get("category") or "")
            for row in demo_rows(manifest)]


def build(out: str | Path, *, manifest: str | Path = DEMO_MANIFEST, seed: int = 0,
          limit: int | None = None) -> BuildResult:
    """Copy the demo catalogue into ``out/multiview`` and query it with its multi-view products' views.

    Args:
        out: the folder that receives ``multiview/``.
        manifest: a demo-style manifest (sku, image, title, category; images relative to it).
        seed, limit: accepted for a uniform interface; the benchmark is the whole demo,
            taken in manifest order, so neither changes it.

    Returns:
        What was written (45 catalogue images and 23 queries for the bundled demo).

    Raises:
        FileNotFoundError: the manifest or one of its images is missing.
    """
    manifest = Path(manifest)
    folder = prepare_folder(out, NAME)
    rows = catalogue_rows(manifest)
    for row in rows:
        target = folder / row.image
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.parent / row.image, target)
    views = Counter(row.sku for row in rows)
    queries = [QueryRow(image=row.image, expected_skus=(row.sku,), expected_category=row.category,
                        exclude_image=row.image)
               for row in rows if views[row.sku] > 1]
    return write_benchmark(BuildResult(NAME, folder, rows, queries), CREDITS)
