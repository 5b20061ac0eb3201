"""The quality-benchmark builders (benchmarks/quality) on tiny inputs: format, consistency, determinism."""

from __future__ import annotations

import csv
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.quality import build as cli
from benchmarks.quality import crossstyle, fashion, multiview, shopper
from benchmarks.quality.common import (
    CATALOGUE_COLUMNS,
    QUERY_COLUMNS,
    BenchmarkSourceError,
    BuildResult,
    CatalogueRow,
    QueryRow,
    write_benchmark,
)
from benchmarks.quality.shopper_photos import cutout

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "data" / "demo" / "catalogue.csv"
HAS_RSVG = shutil.which("rsvg-convert") is not None


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def check_benchmark(folder: Path) -> tuple[list[dict], list[dict]]:
    """Catalogue and query rows of a built benchmark, after checking everything eval relies on."""
    columns, catalogue = read_csv(folder / "catalogue.csv")
    assert tuple(columns) == CATALOGUE_COLUMNS
    columns, queries = read_csv(folder / "queries.csv")
    assert tuple(columns) == QUERY_COLUMNS
    assert (folder / "CREDITS.md").read_text().strip()
    assert catalogue and queries
    for row in catalogue + queries:
        path = Path(row["image"])
        assert not path.is_absolute() and ".." not in path.parts, row
        assert (folder / path).is_file(), row
    skus = {row["sku"] for row in catalogue}
    images = {row["image"] for row in catalogue}
    for query in queries:
        expected = [sku for sku in query["expected_sku"].split("|") if sku]
        assert expected or query["expected_category"], query
        assert set(expected) <= skus, query
        if query["exclude_image"]:
            assert query["exclude_image"] in images, query
    return catalogue, queries


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# --- fakes -------------------------------------------------------------------------

def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    count, rows, cols = images.shape
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, count, rows, cols) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, count) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path) -> Path:
    """A Fashion-MNIST folder: 3 training and 2 test images per class, blobs on black."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "fashion-mnist"
    for split, per_class in (("train", 3), ("t10k", 2)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for image in images:
            top, left = rng.integers(2, 10, size=2)
            image[top:top + 14, left:left + 12] = rng.integers(60, 255, size=(14, 12))
        write_idx(folder, split, images, labels)
    return folder


@pytest.fixture
def small_demo(tmp_path) -> Path:
    """A manifest of four real demo images: a two-view product and two single-view ones."""
    keep = {"saleor-seaman-beer", "saleor-red-wine", "saleor-banana-juice"}
    with open(DEMO_MANIFEST, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["sku"] in keep]
    folder = tmp_path / "demo"
    (folder / "images").mkdir(parents=True)
    for row in rows:
        shutil.copyfile(DEMO_MANIFEST.parent / row["image"], folder / row["image"])
    with open(folder / "catalogue.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert len(rows) == 4
    return folder / "catalogue.csv"


THEME_INDEX = """[Icon Theme]
Name={name}
Directories={directories}

"""
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="48" height="48">'
       '<rect x="{x}" y="6" width="30" height="36" rx="4" fill="{colour}"/></svg>')


def write_theme(root: Path, name: str, layout: str, icons: dict[tuple[str, str], str], svg: bool) -> None:
    """A theme with index.theme; ``icons`` maps (context folder, name) -> colour."""
    contexts = {"apps": "Applications", "devices": "Devices", "actions": "Actions"}
    sections, directories = [], []
    for size in (16, 48):
        for folder, context in contexts.items():
            directory = layout.format(size=size, context=folder)
            directories.append(directory)
            sections.append(f"[{directory}]\nSize={size}\nContext={context}\nType=Fixed\n")
            (root / name / directory).mkdir(parents=True, exist_ok=True)
    (root / name / "index.theme").write_text(
        THEME_INDEX.format(name=name, directories=",".join(directories)) + "\n".join(sections))
    for (folder, icon), colour in icons.items():
        for size in (16, 48):
            target = root / name / layout.format(size=size, context=folder)
            if svg and size == 48:
                (target / f"{icon}.svg").write_text(SVG.format(x=9 if name == "alpha" else 4, colour=colour))
            else:
                Image.new("RGBA", (size, size), colour).save(target / f"{icon}.png")


@pytest.fixture(params=["png", pytest.param("svg", marks=pytest.mark.skipif(not HAS_RSVG,
                                                                             reason="rsvg-convert missing"))])
def fake_icons(request, tmp_path) -> Path:
    """Two themes ("alpha": size/context folders, "beta": context/size) sharing some names."""
    svg = request.param == "svg"
    root = tmp_path / "icons"
    write_theme(root, "alpha", "{size}x{size}/{context}", {
        ("apps", "editor"): "#d04020", ("apps", "browser"): "#2040d0", ("devices", "camera"): "#20a040",
        ("apps", "only-alpha"): "#808080", ("actions", "go-next"): "#000000",
        ("apps", "editor-symbolic"): "#000000"}, svg)
    # An alias: "text-editor" draws exactly what "editor" draws, in both themes.
    for size in (16, 48):
        folder = root / "alpha" / f"{size}x{size}" / "apps"
        original = next(folder.glob("editor.*"))
        (folder / f"text-editor{original.suffix}").symlink_to(original.name)
    write_theme(root, "beta", "{context}/{size}", {
        ("apps", "editor"): "#e05030", ("apps", "text-editor"): "#e05030", ("apps", "browser"): "#3050e0",
        ("devices", "camera"): "#30b050", ("actions", "go-next"): "#101010"}, svg)
    return root


# --- multiview ---------------------------------------------------------------------

def test_multiview_queries_every_view_of_the_multi_view_products(tmp_path):
    result = multiview.build(tmp_path / "out")
    catalogue, queries = check_benchmark(tmp_path / "out" / "multiview")
    assert (len(catalogue), result.products, len(queries)) == (45, 31, 23)
    assert all(query["exclude_image"] == query["image"] for query in queries)
    by_image = {row["image"]: row["sku"] for row in catalogue}
    assert all(by_image[query["image"]] == query["expected_sku"] for query in queries)
    source = DEMO_MANIFEST.parent / catalogue[0]["image"]
    assert (tmp_path / "out" / "multiview" / catalogue[0]["image"]).read_bytes() == source.read_bytes()


def test_a_rebuild_replaces_the_images_but_keeps_the_eval_data_dir(tmp_path):
    folder = tmp_path / "out" / "multiview"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "stale.jpg").write_bytes(b"old")
    (folder / "data").mkdir()
    (folder / "data" / "catalogue.db").write_bytes(b"index")
    multiview.build(tmp_path / "out")
    assert not (folder / "images" / "stale.jpg").exists()
    assert (folder / "data" / "catalogue.db").read_bytes() == b"index"


# --- shopper -----------------------------------------------------------------------

def test_shopper_photos_of_each_image_among_distractors(tmp_path, small_demo, fake_fashion):
    result = shopper.build(tmp_path / "out", manifest=small_demo, fashion_source=fake_fashion, limit=10, per_image=2)
    catalogue, queries = check_benchmark(result.folder)
    distractors = [row for row in catalogue if row["sku"].startswith("distractor-")]
    assert len(distractors) == 10 and len(catalogue) == 14
    assert {row["category"] for row in distractors} == set(fashion.CLASSES)  # class-balanced
    assert len(queries) == 4 * 2
    assert all(not query["exclude_image"] for query in queries)
    assert {query["expected_sku"] for query in queries} == {"saleor-seaman-beer", "saleor-red-wine",
                                                            "saleor-banana-juice"}
    with Image.open(result.folder / queries[0]["image"]) as photo:
        assert photo.format == "JPEG" and max(photo.size) == 640
    with Image.open(result.folder / distractors[0]["image"]) as picture:
        assert picture.size == (224, 224) and picture.mode == "RGB"
        assert len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 50  # painted and shaded, not grey


def test_shopper_is_deterministic_and_the_seed_matters(tmp_path, small_demo, fake_fashion):
    def run(out, seed):
        shopper.build(out, manifest=small_demo, fashion_source=fake_fashion, limit=10, per_image=1, seed=seed)
        return tree_bytes(out / "shopper")

    first = run(tmp_path / "a", 3)
    assert first == run(tmp_path / "b", 3)
    other = run(tmp_path / "c", 4)
    assert first.keys() != other.keys() or first != other


def test_cutout_keeps_white_inside_the_product():
    image = Image.new("RGB", (60, 60), (255, 255, 255))
    image.paste((20, 20, 20), (10, 10, 50, 50))
    image.paste((255, 255, 255), (25, 25, 35, 35))  # a white label inside a dark product
    product = cutout(image)
    assert all(40 <= side <= 48 for side in product.size)  # the 40 px square, its edges feathered
    alpha = np.asarray(product.getchannel("A"))
    centre = alpha[alpha.shape[0] // 2, alpha.shape[1] // 2]
    assert centre == 255


# --- fashion -----------------------------------------------------------------------

def test_fashion_catalogue_is_the_training_set_and_queries_the_test_set(tmp_path, fake_fashion):
    result = fashion.build(tmp_path / "out", source=fake_fashion)
    catalogue, queries = check_benchmark(result.folder)
    assert len(catalogue) == 30 and len(queries) == 20
    assert catalogue[0]["sku"] == "train-0" and catalogue[0]["category"] == "T-shirt/top"
    assert all(query["expected_sku"] == "" and query["expected_category"] in fashion.CLASSES for query in queries)
    with Image.open(result.folder / catalogue[0]["image"]) as picture:
        assert picture.size == (28, 28)
        original, _ = fashion.read_split(fake_fashion, "train")
        assert np.array_equal(np.asarray(picture), original[0])


def test_fashion_limit_is_class_balanced_and_seeded(tmp_path, fake_fashion):
    result = fashion.build(tmp_path / "a", source=fake_fashion, limit=20, seed=1)
    catalogue, queries = check_benchmark(result.folder)
    assert len(catalogue) == 20 and len(queries) == 10  # 2 and 1 per class (20 // 6 = 3 -> 1 per class)
    assert sorted(row["category"] for row in catalogue) == sorted(list(fashion.CLASSES) * 2)
    fashion.build(tmp_path / "b", source=fake_fashion, limit=20, seed=1)
    assert tree_bytes(tmp_path / "a" / "fashion") == tree_bytes(tmp_path / "b" / "fashion")


def test_fashion_reports_a_missing_or_broken_dataset(tmp_path, fake_fashion):
    with pytest.raises(BenchmarkSourceError, match="dataset-fashion-mnist"):
        fashion.build(tmp_path / "out", source=tmp_path / "nowhere")
    (fake_fashion / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 2049, 3) + b"\0\0\0"))
    with pytest.raises(BenchmarkSourceError, match="label"):
        fashion.build(tmp_path / "out", source=fake_fashion)


# --- crossstyle --------------------------------------------------------------------

def test_crossstyle_pairs_the_shared_object_icons_of_two_themes(tmp_path, fake_icons):
    result = crossstyle.build(tmp_path / "out", icons_dir=fake_icons, catalogue_theme="alpha", query_theme="beta")
    catalogue, queries = check_benchmark(result.folder)
    # Not "only-alpha" (one theme), "go-next" (an action), "editor-symbolic"; the alias is one product.
    assert [(row["sku"], row["category"], row["title"]) for row in catalogue] == [
        ("browser", "apps", "browser"), ("camera", "devices", "camera"), ("editor", "apps", "editor, text-editor")]
    # beta draws editor and text-editor identically too: one query for both names.
    assert [(query["expected_sku"], query["expected_category"]) for query in queries] == [
        ("browser", "apps"), ("camera", "devices"), ("editor", "apps")]
    with Image.open(result.folder / catalogue[0]["image"]) as picture:
        assert picture.size == (256, 256) and picture.mode == "RGB"
    first = tree_bytes(result.folder)
    crossstyle.build(tmp_path / "again", icons_dir=fake_icons, catalogue_theme="alpha", query_theme="beta")
    assert tree_bytes(tmp_path / "again" / "crossstyle") == first


def test_crossstyle_limit_samples_names(tmp_path, fake_icons):
    result = crossstyle.build(tmp_path / "out", icons_dir=fake_icons, catalogue_theme="alpha", query_theme="beta",
                              limit=2, seed=5)
    catalogue, queries = check_benchmark(result.folder)
    names = [name for row in catalogue for name in row["title"].split(", ")]
    assert len(names) == 2 and 1 <= len(queries) <= 2  # two names; one product if they are the alias pair


def test_crossstyle_reports_a_missing_theme(tmp_path):
    with pytest.raises(BenchmarkSourceError, match="index.theme"):
        crossstyle.build(tmp_path / "out", icons_dir=tmp_path, catalogue_theme="nope", query_theme="nope")


# --- the format and the command line -----------------------------------------------

def test_writing_refuses_queries_the_catalogue_cannot_answer(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    catalogue = [CatalogueRow(sku="a", image="a.png")]
    with pytest.raises(ValueError, match="expects"):
        write_benchmark(BuildResult("t", tmp_path, catalogue, [QueryRow(image="a.png", expected_skus=("b",))]), "c")
    with pytest.raises(ValueError, match="excludes"):
        write_benchmark(BuildResult("t", tmp_path, catalogue, [QueryRow(image="a.png", exclude_image="b.png")]), "c")
    with pytest.raises(ValueError, match="not written"):
        write_benchmark(BuildResult("t", tmp_path, catalogue, [QueryRow(image="q.png", expected_skus=("a",))]), "c")


def test_command_line_builds_and_reports_missing_sources(tmp_path, capsys):
    assert cli.main(["multiview", "--out", str(tmp_path)]) == 0
    assert "multiview: 45 catalogue images of 31 products, 23 queries" in capsys.readouterr().out
    assert cli.main(["fashion", "--out", str(tmp_path), "--fashion-dir", str(tmp_path / "nowhere")]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err
