"""shopper: hard shopper photos of the demo products, searched among 1,000+ product-like distractors."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.demo_retrieval import DEMO_MANIFEST

from . import fashion
from .common import BuildResult, CatalogueRow, QueryRow, prepare_folder, save_bytes, save_image, write_benchmark
from .multiview import catalogue_rows
from .shopper_photos import colourised, cutout, hard_shopper_photo, on_white, scikit_image_photos

NAME = "shopper"
DEFAULT_DISTRACTORS = 1000
DEFAULT_PER_IMAGE = 3
DISTRACTOR_SIZE = 224

CREDITS = """
# shopper: credits

Products: the Saleor demo shop (`data/demo/`, from the `saleor` 2.10.1 package on PyPI).
Artwork (c) Mirumee Software, CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/);
product data BSD 3-Clause. Catalogue copies are byte-for-byte `data/demo/images/`.

Queries: synthetic shopper photos made from those images by
`benchmarks/quality/shopper_photos.py` (modified: cut out, cropped, warped, rotated,
pasted into clutter, colour cast, blur, noise, JPEG), so also CC BY 4.0, credit
Mirumee Software. Backgrounds: six photos bundled with scikit-image
(`skimage/data/`, as its docstrings state: astronaut (NASA, public domain), chelsea
(Stefan van der Walt, CC0), coffee (Rachel Michetti, CC0), rocket (SpaceX, public
domain), hubble_deep_field (NASA, public domain), ihc (CMMI, no known copyright
restrictions)) and random noise.

Distractors (`distractor-<n>`): Fashion-MNIST training image n (Xiao, Rasul and Vollgraf,
Zalando Research, 2017; MIT License, Copyright (c) 2017 Zalando SE; Debian's
`dataset-fashion-mnist`), modified: upscaled to 224 px, painted in random colours and
composited on white.
"""


def build(out: str | Path, *, manifest: str | Path = DEMO_MANIFEST,
          fashion_source: str | Path = fashion.FASHION_MNIST_DIR, seed: int = 0,
          limit: int | None = None, per_image: int = DEFAULT_PER_IMAGE,
          photos: list[Image.Image] | None = None) -> BuildResult:
    """Write ``out/shopper``: the demo plus distractors as the catalogue, hard shopper photos as queries.

    Args:
        out: the folder that receives ``shopper/``.
        manifest: the demo-style manifest whose images become products and queries.
        fashion_source: the Fashion-MNIST folder the distractors come from.
        seed: fixes the distractors chosen and every pixel of every query.
        limit: the number of distractors (default 1,000), class-balanced.
        per_image: shopper photos made of each catalogue image.
        photos: background photos; default the ones bundled with scikit-image.

    Returns:
        What was written.

    Raises:
        BenchmarkSourceError: the Fashion-MNIST files are missing or malformed.
    """
    manifest = Path(manifest)
    images, labels = fashion.read_split(fashion_source, "train")
    chosen = fashion.balanced_subset(labels, DEFAULT_DISTRACTORS if limit is None else limit,
                                     np.random.default_rng(seed))
    photos = scikit_image_photos() if photos is None else photos
    folder = prepare_folder(out, NAME)
    catalogue = catalogue_rows(manifest)
    for row in catalogue:
        (folder / row.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.parent / row.image, folder / row.image)

    distractor_rng = random.Random(f"{seed}:distractors")
    for n in chosen.tolist():
        category = fashion.class_name(int(labels[n]))
        picture = on_white(colourised(images[n], distractor_rng, DISTRACTOR_SIZE))
        image = save_image(picture, folder, f"images/distractors/distractor-{n:05d}.jpg", quality=90)
        catalogue.append(CatalogueRow(sku=f"distractor-{n}", image=image,
                                            title=f"Distractor {category}", category=category))

    products = [row for row in catalogue if not row.sku.startswith("distractor-")]
    with_cutouts = [(row, cutout(Image.open(manifest.parent / row.image))) for row in products]
    queries = []
    for row, product in with_cutouts:
        clutter = [other for other_row, other in with_cutouts if other_row.sku != row.sku]
        stem = Path(row.image).stem
        for k in range(per_image):
            rng = random.Random(f"{seed}:{row.image}:{k}")
            photo = hard_shopper_photo(product, rng, photos=photos, clutter=clutter)
            image = save_bytes(photo, folder, f"queries/{stem}-shopper-{k}.jpg")
            queries.append(QueryRow(image=image, expected_skus=(row.sku,), expected_category=row.category))
    return write_benchmark(BuildResult(NAME, folder, catalogue, queries), CREDITS)
