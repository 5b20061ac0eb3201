"""Catalogue-tuned embeddings: a projection learned from the catalogue's own images, recorded
as a data-directory recipe, switched to without downtime; the tune command."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from PIL import Image

from visualsearch import tuning
from visualsearch.backbones_builtin import DEFAULT_BACKBONE
from visualsearch.catalogue import store as catalogue
from visualsearch.catalogue.models import StoredProjection
from visualsearch.embedder import Embedder
from visualsearch.errors import ConfigurationError
from visualsearch.images import load_image
from visualsearch.indexing import ImageTask
from visualsearch.recipes import (
    DataRecipe,
    Projection,
    Recipe,
    RecipeMismatchError,
    choose_recipe,
    get_recipe,
    pick_data_recipes,
    register_recipe,
    resolve_recipe,
)
from visualsearch.service import VisualSearch
from visualsearch.tuning import ShopperViews, TuneOptions, TuneRefusedError, split_products, tune

from .conftest import TINY, cli_runner, make_image, write_catalogue

TUNED = TINY + "+tuned"
# Small and fast, yet enough steps for the tiny backbone's projection to learn something.
FAST = TuneOptions(dim=16, epochs=60, views=4, batch_size=32, learning_rate=3e-3, seed=0)


@pytest.fixture
def catalogue40(tmp_path) -> Path:
    """40 products of 2 images each (8 are held out at --holdout 0.2)."""
    folder = tmp_path / "catalogue40"
    (folder / "img").mkdir(parents=True)
    rows = []
    for number in range(40):
        for view in range(2):
            _product_shot(folder / "img" / f"p{number}-{view}.png", seed=number * 10 + view)
            rows.append({"sku": f"P{number}", "image": f"img/p{number}-{view}.png", "title": f"Product {number}"})
    return write_catalogue(folder, rows)


def _product_shot(path: Path, seed: int, size: int = 64) -> Path:
    """A catalogue-style shot: a product of random blocks of colour on white."""
    make_image(path, seed=seed, size=size * 5 // 8)
    with Image.open(path) as product:
        shot = Image.new("RGB", (size, size), (255, 255, 255))
        shot.paste(product.convert("RGB"), ((size - product.width) // 2, (size - product.height) // 2))
    shot.save(path)
    return path


def _image(catalogue_file: Path, number: int) -> Path:
    return catalogue_file.parent / "img" / f"p{number}-0.png"


def test_tuning_improves_held_out_recall_and_switches_the_data_directory(tiny_settings, catalogue40):
    VisualSearch(tiny_settings).index(catalogue40)
    server = VisualSearch(tiny_settings)  # opened before: must follow the switch
    assert server.search(_image(catalogue40, 3), top_k=1).hits[0].sku == "P3"
    report = tune(VisualSearch(tiny_settings), FAST)

    recall = report.recall_at_1
    assert (report.images, report.products, report.held_out_products, report.queries) == (80, 40, 8, 64)
    assert recall["tuned"] > recall["identity"] and recall["tuned"] > recall["pca"], recall
    assert report.improved
    assert report.loss["last_epoch"] < report.loss["first_epoch"]
    assert (report.recipe, report.base_recipe, report.in_dim, report.dim) == (TUNED, TINY, 32, 16)

    # The projection file (named by its hash) and the recipe recorded in the catalogue.
    path = tiny_settings.data_dir / report.projection
    assert path.parent.name == tuning.TUNED_DIR and report.projection_sha256[:12] in path.name
    saved = Projection.load(path)
    assert saved.sha256 == report.projection_sha256 and (saved.in_dim, saved.out_dim) == (32, 16)
    vs = VisualSearch(tiny_settings)
    recipe = vs.data_recipes()[TUNED]
    assert recipe.projection == report.projection and recipe.backbone == TINY and recipe.hidden
    stored = vs.stored_identity()
    assert (stored.recipe, stored.dim) == (TUNED, 16)
    assert stored.recipe_hash == recipe.fingerprint(report.projection_sha256)
    assert report.reembed["switched"] and report.reembed["recipe"] == TUNED and report.reembed["embedded"] == 80

    # The server opened before follows; a process opened now resolves the recipe from the catalogue.
    assert server.follow_generation(0, wait=True) and server.embedder.recipe.name == TUNED
    for searcher in (server, VisualSearch(tiny_settings), VisualSearch(dataclasses.replace(tiny_settings,
                                                                                           recipe=TUNED))):
        top = searcher.search(_image(catalogue40, 7), top_k=1).hits[0]
        assert top.sku == "P7" and top.score == pytest.approx(1.0, abs=1e-4)
        assert searcher.embedder.dim == 16
    # Pinning the old recipe is a mismatch; the name means nothing outside this data directory.
    with pytest.raises(RecipeMismatchError, match=re.escape(f"indexed with recipe '{TUNED}'")):
        VisualSearch(dataclasses.replace(tiny_settings, recipe=TINY)).search(_image(catalogue40, 7))
    with pytest.raises(ConfigurationError, match="unknown recipe"):
        get_recipe(TUNED)


def test_retuning_replaces_the_recipe_and_the_old_one_resolves_until_the_switch(tiny_settings, catalogue40,
                                                                                 monkeypatch):
    VisualSearch(tiny_settings).index(catalogue40)
    first = tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, epochs=5, force=True))
    first_hash = VisualSearch(tiny_settings).stored_identity().recipe_hash

    # A second tune recorded its recipe, then died before switching: the vectors answering
    # were made with the first definition, which still resolves (no downtime).
    def crash(*_args, **_kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(VisualSearch, "reembed", crash)
    with pytest.raises(RuntimeError):
        tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, epochs=5, seed=1, force=True))
    monkeypatch.undo()
    restarted = VisualSearch(tiny_settings)
    assert restarted.embedder.identity.recipe_hash == first_hash
    assert restarted.search(_image(catalogue40, 4), top_k=1).hits[0].sku == "P4"
    assert restarted.data_recipes(first_hash)[TUNED].projection == first.projection
    assert restarted.data_recipes()[TUNED].projection != first.projection  # the newest, for reembed

    second = tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, epochs=5, seed=2, force=True))
    assert second.base_recipe == TINY and second.recipe == TUNED  # never "+tuned+tuned"
    assert second.projection != first.projection and second.reembed["switched"]
    assert second.reembed["previous_recipe"] == TUNED
    assert "current" in second.recall_at_1  # the first tune's projection, measured on the same photos
    vs = VisualSearch(tiny_settings)
    assert vs.embedder.recipe.projection == second.projection
    assert vs.stored_identity().recipe_hash != first_hash
    with vs.sessions() as session:  # the first definition (still current when recorded) and the new one
        assert [record.recipe.projection for record in catalogue.data_recipes(session)] == [first.projection,
                                                                                           second.projection]
    assert restarted.follow_generation(0, wait=True) and restarted.embedder.recipe.projection == second.projection


def test_a_dry_run_records_nothing(tiny_settings, catalogue40):
    VisualSearch(tiny_settings).index(catalogue40)
    report = tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, epochs=3, dry_run=True, holdout=0.0))
    assert report.reembed is None and report.projection is None and report.held_out_products == 0
    assert report.recall_at_1 == {"identity": None, "pca": None, "tuned": None}
    vs = VisualSearch(tiny_settings)
    assert vs.data_recipes() == {} and vs.stored_identity().recipe == TINY
    assert not (tiny_settings.data_dir / tuning.TUNED_DIR).exists()


def test_a_projection_that_does_not_beat_the_current_vectors_is_not_switched(tiny_settings, catalogue40):
    VisualSearch(tiny_settings).index(catalogue40)
    with pytest.raises(TuneRefusedError, match="nothing was held out") as caught:
        tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, epochs=2, holdout=0.0))
    assert caught.value.code == "tune_refused" and caught.value.report.improved is None
    tune(VisualSearch(tiny_settings), FAST)  # a good one: switched
    with pytest.raises(TuneRefusedError, match="the vectors answering now") as caught:
        tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, epochs=1, dim=2))
    recall = caught.value.report.recall_at_1
    assert recall["tuned"] <= recall["current"] and caught.value.report.reembed is None
    vs = VisualSearch(tiny_settings)
    assert vs.embedder.dim == 16  # still the first tune's
    with vs.sessions() as session:
        assert len(catalogue.data_recipes(session)) == 1


def test_tune_refuses_what_it_cannot_learn(tiny_settings, small_catalogue):
    with pytest.raises(ConfigurationError, match="nothing is indexed"):
        tune(VisualSearch(tiny_settings), FAST)
    VisualSearch(tiny_settings).index(small_catalogue)
    with pytest.raises(ConfigurationError, match="--dim must be at most 32"):
        tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, dim=64))
    with pytest.raises(ConfigurationError, match=r"--dim must be 1..23 for 24 training vectors"):
        tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, dim=32, views=1, holdout=0.5))
    with pytest.raises(ConfigurationError, match="holdout"):
        TuneOptions(holdout=1.0)
    with pytest.raises(ConfigurationError, match="at least 3 products"):
        split_products(np.array([1, 1, 2]), 0.5, seed=0)


def test_the_holdout_is_of_products_not_images():
    products = np.repeat(np.arange(20), 3)
    held = split_products(products, 0.2, seed=0)
    assert len(np.unique(products[held])) == 4 and held.sum() == 12
    assert not set(products[held]) & set(products[~held])
    assert np.array_equal(held, split_products(products, 0.2, seed=0))


def test_shopper_views_are_repeatable_and_differ_from_the_original(tmp_path):
    with Image.open(make_image(tmp_path / "a.png", seed=3, size=96)) as opened:
        image = opened.convert("RGB")
    views = ShopperViews(64)

    def photos(seed: int) -> list[np.ndarray]:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        return [np.asarray(views(image, rng)) for _ in range(3)]

    first, again = photos(0), photos(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(photo.shape == (64, 64, 3) for photo in first)
    assert not np.array_equal(first[0], first[1])


def test_shopper_views_put_the_product_among_other_products():
    blue, red = (Image.new("RGB", (64, 64), (255, 255, 255)) for _ in range(2))
    blue.paste((20, 40, 230), (12, 12, 52, 52))
    red.paste((230, 20, 20), (20, 20, 44, 44))
    others = [tuning.cutout(red)]
    assert others[0].size == (24, 24) and others[0].mode == "RGBA"
    views = ShopperViews(96)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    photos = [np.asarray(views(blue, rng, others)).astype(int) for _ in range(12)]

    def share(photo: np.ndarray, channel: int) -> float:
        rest = [c for c in range(3) if c != channel]
        return float(np.mean((photo[..., channel] > 120) & (photo[..., rest] < 110).all(axis=-1)))

    assert all(photo.shape == (96, 96, 3) for photo in photos)
    assert all(share(photo, 2) > 0.03 for photo in photos)  # the product is always in the photo
    # Other products are often in the photo too (pasted, or a close-up of one as the
    # background); without them only the noise backgrounds have any red.
    alone = [np.asarray(views(blue, rng)).astype(int) for _ in range(12)]
    assert sum(share(photo, 0) > 0.002 for photo in photos) >= 3
    assert np.mean([share(photo, 0) for photo in photos]) > 3 * np.mean([share(photo, 0) for photo in alone])


QUERY_PHOTOS = f"{TINY}-tune-queries"
register_recipe(Recipe(name=QUERY_PHOTOS, backbone=TINY, query_input_size=48, query_centre_prior=0.35, hidden=True))


def _tasks(catalogue_file: Path, count: int) -> list[ImageTask]:
    return [ImageTask(image_id=number + 1, product_id=number + 1, sku=f"P{number}",
                      path=str(_image(catalogue_file, number))) for number in range(count)]


def test_tune_embeds_its_photos_as_queries(tiny_weights, catalogue40, monkeypatch):
    embedder = Embedder(TINY, recipe=QUERY_PHOTOS, weights_path=tiny_weights)
    tasks = _tasks(catalogue40, 5)
    # Photos that are the catalogue images themselves: the embedding path alone differs.
    monkeypatch.setattr(ShopperViews, "__call__", lambda self, image, rng, others=(), product=None: image)
    features = tuning.embed_features(embedder, tasks, views=2, seed=0, max_pixels=10**7)
    images = [load_image(task.path, target_size=2 * embedder.query_decode_size) for task in tasks]
    assert np.allclose(features.originals, embedder.embed_images(images), atol=1e-5)
    for view in range(2):
        assert np.allclose(features.views[:, view], embedder.embed_queries(images), atol=1e-5)
    assert not np.allclose(features.views[:, 0], features.originals, atol=1e-3)


def test_tune_photos_depend_on_the_seed_not_the_batch_size(tiny_weights, catalogue40):
    embedder = Embedder(TINY, weights_path=tiny_weights)
    tasks = _tasks(catalogue40, 12)

    def features(batch_images: int, seed: int = 0) -> np.ndarray:
        return tuning.embed_features(embedder, tasks, views=3, seed=seed, max_pixels=10**7,
                                     batch_images=batch_images).views

    one = features(1)
    assert np.allclose(one, features(7), atol=1e-5) and np.allclose(one, features(16), atol=1e-5)
    assert not np.allclose(one, features(7, seed=1), atol=1e-3)


def test_data_directory_recipes_resolve_after_registered_ones():
    tuned = resolve_recipe(Recipe(name=TUNED, backbone=TINY, projection="tuned/x.npz"))
    older = dataclasses.replace(tuned, projection="tuned/old.npz")
    records = [DataRecipe(older, base=TINY, projection_sha256="a" * 64),
               DataRecipe(tuned, base=TINY, projection_sha256="b" * 64)]
    old_hash = records[0].fingerprint()
    assert pick_data_recipes(records)[TUNED].projection == "tuned/x.npz"  # the newest
    assert pick_data_recipes(records, old_hash)[TUNED].projection == "tuned/old.npz"  # the vectors'
    assert pick_data_recipes(records, "c" * 64)[TUNED].projection == "tuned/x.npz"
    local = pick_data_recipes(records)
    chosen = choose_recipe(stored_backbone=TINY, stored_recipe=TUNED, default_backbone=DEFAULT_BACKBONE, local=local)
    assert chosen == tuned
    assert choose_recipe(recipe=TUNED, backbone=TINY, default_backbone=DEFAULT_BACKBONE, local=local) == tuned
    # A registered name is never shadowed by a data directory's.
    shadow = dataclasses.replace(tuned, name="lite0-flip")
    assert get_recipe("lite0-flip", {"lite0-flip": shadow}).backbone == "efficientnet_lite0"
    assert DataRecipe.from_dict(json.loads(json.dumps(records[1].to_dict()))) == records[1]
    with pytest.raises(ConfigurationError, match="unknown fields"):
        DataRecipe.from_dict({"recipe": {**tuned.to_dict(), "colour": "red"}, "base": TINY})


@pytest.fixture
def run(tiny_weights, tmp_path, monkeypatch):
    """The CLI with no backbone pinned: commands follow the data directory's."""
    return cli_runner(monkeypatch, tmp_path / "data", tiny_weights, backbone=None)


def test_cli_tune(run, catalogue40):
    assert run("index", str(catalogue40), "--backbone", TINY).exit_code == 0
    dry = run("tune", "--dim", "16", "--epochs", "3", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "recall@1 of the held-out products' photos" in dry.stdout and "nothing recorded" in dry.stdout
    refused = run("tune", "--dim", "16", "--epochs", "3", "--holdout", "0", "--json")
    assert refused.exit_code == 1 and "tune_refused" in refused.output
    assert json.loads(refused.stdout)["improved"] is None
    done = run("tune", "--dim", "16", "--epochs", "3", "--views", "2", "--force", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert {"recipe", "base_recipe", "dim", "in_dim", "images", "products", "held_out_products", "queries",
            "views", "epochs", "recall_at_1", "improved", "loss", "projection", "projection_sha256", "seconds",
            "reembed"} <= set(report)
    assert set(report["recall_at_1"]) == {"identity", "pca", "tuned"} and report["views"] == 2
    assert report["recipe"] == TUNED and report["reembed"]["switched"] and report["queries"] == 8 * 2 * 2
    stats = json.loads(run("stats", "--json").stdout)
    assert stats["recipe"] == TUNED and stats["dim"] == 16
    found = json.loads(run("search", str(Path(catalogue40).parent / "img" / "p5-0.png"), "--json").stdout)
    assert found["results"][0]["sku"] == "P5"
    refused = run("search", str(Path(catalogue40).parent / "img" / "p5-0.png"), "--recipe", TINY)
    assert refused.exit_code == 1 and "recipe_mismatch" in refused.output
    too_big = run("tune", "--dim", "64")
    assert too_big.exit_code == 1 and "--dim must be" in too_big.output


def test_the_default_dimension_fits_a_small_catalogue(tiny_settings, tmp_path):
    """Without --dim, a catalogue with fewer training vectors than dimensions still tunes
    (PCA gives at most N - 1 directions) instead of failing on a default it cannot learn."""
    folder = tmp_path / "small"
    (folder / "img").mkdir(parents=True)
    rows = []
    for number in range(4):
        make_image(folder / "img" / f"s{number}.png", seed=500 + number, size=64)
        rows.append({"sku": f"S{number}", "image": f"img/s{number}.png"})
    VisualSearch(tiny_settings).index(write_catalogue(folder, rows))
    options = dataclasses.replace(FAST, dim=None, views=2, holdout=0.25, dry_run=True)
    report = tune(VisualSearch(tiny_settings), options)
    # 3 training products x (1 original + 2 photos) = 9 vectors: 8 directions at most.
    assert report.dim == 8 and report.in_dim == 32


# --- replicas: the projection lives in the catalogue, data directories only cache it --------


@pytest.fixture
def tuned_replicas(tiny_settings, catalogue40, tmp_path):
    """A data directory that tuned, and the settings of a replica sharing its catalogue and
    vector store (a Milvus Lite file) with a data directory of its own, still empty."""
    pytest.importorskip("milvus_lite")
    first = dataclasses.replace(tiny_settings, vector_store=str(tmp_path / "shared-vectors.db"))
    VisualSearch(first).index(catalogue40)
    report = tune(VisualSearch(first), FAST)
    replica = dataclasses.replace(first, data_dir=tmp_path / "replica" / "data", db_url=first.catalogue_url)
    return first, replica, report


def _hits(vs: VisualSearch, photo: Path) -> list[tuple[str, float]]:
    return [(hit.sku, hit.score) for hit in vs.search(photo, top_k=5).hits]


@pytest.mark.catalogue_databases("sqlite", "postgresql")
def test_a_replica_with_an_empty_data_directory_fetches_the_projection_from_the_catalogue(tuned_replicas,
                                                                                          catalogue40,
                                                                                          catalogue_db):
    first, replica, report = tuned_replicas
    assert not replica.data_dir.exists()
    photo = _image(catalogue40, 7)
    expected = _hits(VisualSearch(first), photo)
    other = VisualSearch(replica)
    found = _hits(other, photo)
    assert other.embedder.recipe.name == TUNED and other.embedder.dim == 16
    assert [sku for sku, _ in found] == [sku for sku, _ in expected] and found[0][0] == "P7"
    assert [score for _, score in found] == pytest.approx([score for _, score in expected], abs=1e-5)
    cached = replica.data_dir / report.projection  # now this replica's cache
    assert Projection.load(cached).sha256 == report.projection_sha256


def test_a_damaged_projection_file_is_replaced_from_the_catalogue(tuned_replicas, catalogue40):
    first, _, report = tuned_replicas
    path = first.data_dir / report.projection
    expected = _hits(VisualSearch(first), _image(catalogue40, 3))
    path.write_bytes(b"not the projection")
    assert _hits(VisualSearch(first), _image(catalogue40, 3)) == expected
    assert Projection.load(path).sha256 == report.projection_sha256


def test_a_projection_in_neither_place_says_to_tune_again(tuned_replicas, catalogue40):
    first, replica, report = tuned_replicas
    with VisualSearch(first).session() as session:
        session.execute(sa.delete(StoredProjection))
    with pytest.raises(ConfigurationError, match=re.escape(f"recipe '{TUNED}' projects with {report.projection}")) \
            as raised:
        VisualSearch(replica).search(_image(catalogue40, 3))
    assert "re-run `visualsearch tune`" in str(raised.value)
    # The host that tuned still has its copy (a cache, but the right bytes), and shares it
    # again (as for a catalogue tuned before it kept projections): the replica then loads.
    assert _hits(VisualSearch(first), _image(catalogue40, 3))[0][0] == "P3"
    assert _hits(VisualSearch(replica), _image(catalogue40, 3))[0][0] == "P3"


def test_only_the_projections_of_recorded_recipes_are_kept(tiny_settings, catalogue40):
    VisualSearch(tiny_settings).index(catalogue40)
    shas = [tune(VisualSearch(tiny_settings), dataclasses.replace(FAST, epochs=5, seed=seed, force=True))
            .projection_sha256 for seed in range(3)]
    vs = VisualSearch(tiny_settings)
    with vs.sessions() as session:
        kept = set(session.scalars(sa.select(StoredProjection.sha256)))
        recorded = {record.projection_sha256 for record in catalogue.data_recipes(session)}
    # The answering definition and the newest one (the same after the last switch).
    assert kept == recorded and shas[-1] in kept and shas[0] not in kept
