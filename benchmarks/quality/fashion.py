"""fashion: category precision at scale on Fashion-MNIST (60,000 catalogue images, 10,000 queries)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from .common import (
    BenchmarkSourceError,
    BuildResult,
    CatalogueRow,
    QueryRow,
    prepare_folder,
    save_image,
    slug,
    write_benchmark,
)

NAME = "fashion"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: apt-get install dataset-fashion-mnist
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
QUERY_SHARE = 6  # --limit N keeps N training and N / 6 test images, the full set's ratio

CREDITS = """
# fashion: credits

Fashion-MNIST (Xiao, Rasul and Vollgraf, Zalando Research, 2017;
https://github.com/zalandoresearch/fashion-mnist), MIT License,
Copyright (c) 2017 Zalando SE. Read from Debian's `dataset-fashion-mnist` package
(`/usr/share/datasets/fashion-mnist/`).

Catalogue: the training images, unchanged (28x28 greyscale PNG), sku `train-<n>` with
n the image's position in `train-images-idx3-ubyte.gz`, category = its class name.
Queries: the test images (`test-<n>`), judged by category only.
"""


def read_idx(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, rows, cols) uint8 and labels (N,) uint8 of a gzipped IDX pair (the MNIST format).

    Raises:
        BenchmarkSourceError: a file is missing, or is not an IDX images/labels file, or
            the two disagree on the number of items.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise BenchmarkSourceError(f"{path} is missing (Debian: apt-get install -y dataset-fashion-mnist)")
    with gzip.open(images_path, "rb") as handle:
        data = handle.read()
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != _IMAGES_MAGIC or len(data) != 16 + count * rows * cols:
        raise BenchmarkSourceError(f"{images_path} is not an IDX image file")
    images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    with gzip.open(labels_path, "rb") as handle:
        data = handle.read()
    magic, label_count = struct.unpack(">II", data[:8])
    if magic != _LABELS_MAGIC or label_count != count or len(data) != 8 + count:
        raise BenchmarkSourceError(f"{labels_path} is not an IDX label file for {images_path.name}")
    return images, np.frombuffer(data, dtype=np.uint8, offset=8)


def read_split(source: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``train`` or ``t10k`` split of a Fashion-MNIST folder."""
    source = Path(source)
    return read_idx(source / f"{split}-images-idx3-ubyte.gz", source / f"{split}-labels-idx1-ubyte.gz")


def balanced_subset(labels: np.ndarray, count: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``count`` items, the same number from every class present (all when None)."""
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    per_class = max(1, count // len(classes))
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:per_class] for label in classes]
    return np.sort(np.concatenate(chosen))


def class_name(label: int) -> str:
    return CLASSES[label] if label < len(CLASSES) else f"class-{label}"


def build(out: str | Path, *, source: str | Path = FASHION_MNIST_DIR, seed: int = 0,
          limit: int | None = None) -> BuildResult:
    """Write Fashion-MNIST as ``out/fashion``: training images as the catalogue, test images as queries.

    Args:
        out: the folder that receives ``fashion/``.
        source: the folder holding the four ``*-ubyte.gz`` files.
        seed: picks the subset when ``limit`` is given.
        limit: keep this many training images and ``limit // 6`` test images, class-balanced
            (e.g. 6000 -> 6,000 / 1,000); None keeps all 60,000 / 10,000.

    Returns:
        What was written.

    Raises:
        BenchmarkSourceError: the dataset files are missing or malformed.
    """
    train_images, train_labels = read_split(source, "train")
    test_images, test_labels = read_split(source, "t10k")
    rng = np.random.default_rng(seed)
    train_keep = balanced_subset(train_labels, limit, rng)
    test_keep = balanced_subset(test_labels, None if limit is None else max(1, limit // QUERY_SHARE), rng)
    folder = prepare_folder(out, NAME)
    catalogue = []
    for n in train_keep.tolist():
        category = class_name(int(train_labels[n]))
        image = save_image(Image.fromarray(train_images[n]), folder,
                           f"images/{slug(category)}/train-{n:05d}.png")
        catalogue.append(CatalogueRow(sku=f"train-{n}", image=image, title=f"{category} #{n}", category=category))
    queries = []
    for n in test_keep.tolist():
        category = class_name(int(test_labels[n]))
        image = save_image(Image.fromarray(test_images[n]), folder,
                           f"queries/{slug(category)}/test-{n:05d}.png")
        queries.append(QueryRow(image=image, expected_category=category))
    return write_benchmark(BuildResult(NAME, folder, catalogue, queries), CREDITS)
