"""Recipes: the default is today's embedding, variants change it deterministically, the
catalogue records the recipe, a mismatch is an error, reembed --recipe switches, PCA whitening."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from visualsearch import recipes
from visualsearch.backbones import get_backbone
from visualsearch.backbones_builtin import DEFAULT_BACKBONE
from visualsearch.catalogue import store as catalogue
from visualsearch.embedder import GEM_P, Embedder, centre_prior, gem_pool
from visualsearch.errors import BackboneMismatchError, ConfigurationError
from visualsearch.recipes import (
    Projection,
    Recipe,
    RecipeMismatchError,
    choose_recipe,
    default_recipe,
    get_recipe,
    learn_pca_whitening,
    list_recipes,
    register_recipe,
)
from visualsearch.service import VisualSearch

from .conftest import TINY, cli_runner, make_image

FLIP, PAD, SCALES, GEM1, PCA = (f"{TINY}-flip", f"{TINY}-pad-48", f"{TINY}-scales", f"{TINY}-gem1", f"{TINY}-pca8")
register_recipe(Recipe(name=FLIP, backbone=TINY, flip=True, hidden=True))
register_recipe(Recipe(name=PAD, backbone=TINY, resize="pad", input_size=48, hidden=True))
register_recipe(Recipe(name=SCALES, backbone=TINY, scales=(1.0, 0.5, 1.5), hidden=True))
register_recipe(Recipe(name=GEM1, backbone=TINY, gem_p=1.0, hidden=True))
register_recipe(Recipe(name=PCA, backbone=TINY, projection="pca8.npz", hidden=True))
QUERIES = f"{TINY}-queries"
register_recipe(Recipe(name=QUERIES, backbone=TINY, query_input_size=48, query_centre_prior=0.35, hidden=True))


def _pictures() -> list[Image.Image]:
    """Asymmetric pictures of several shapes (a mirror image differs from each)."""
    rng = np.random.default_rng(7)
    shapes = [(48, 48), (64, 40), (30, 72)]
    return [Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
            .resize((width, height), Image.NEAREST) for width, height in shapes]


def _pre_recipe_vectors(embedder: Embedder, images: list[Image.Image]) -> np.ndarray:
    """The embedding as it was before recipes (transform, GeM p=3, L2), written out again."""
    pre = embedder.spec.preprocessing
    interpolation = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    transform = T.Compose([T.PILToTensor(), T.Resize(pre.resize_size, interpolation=interpolation[pre.interpolation],
                                                      antialias=True),
                           T.CenterCrop(pre.input_size), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(mean=list(pre.mean), std=list(pre.std))])
    batch = torch.stack([transform(image) for image in images]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(gem_pool(embedder.network(batch).float()), dim=1)
    return vectors.numpy().astype(np.float32, copy=False)


# --- the default recipe is today's embedding ------------------------------------------------


def test_default_recipe_reproduces_the_embedding_bit_for_bit(tiny_weights):
    images = _pictures()
    embedder = Embedder(TINY, weights_path=tiny_weights)
    assert embedder.recipe == default_recipe(TINY) and embedder.recipe.name == TINY
    today = _pre_recipe_vectors(embedder, images)
    assert embedder.embed_images(images).tobytes() == today.tobytes()
    named = Embedder(TINY, recipe=TINY, weights_path=tiny_weights)
    assert named.embed_images(images).tobytes() == today.tobytes()
    assert named.decode_size == 32 and named.input_size == 32 and named.dim == 32


@pytest.mark.slow
def test_default_backbone_recipe_reproduces_the_embedding_bit_for_bit():
    photos = [Image.fromarray(skimage.data.coffee()), Image.fromarray(skimage.data.chelsea())]
    embedder = Embedder(DEFAULT_BACKBONE)
    assert embedder.embed_images(photos).tobytes() == _pre_recipe_vectors(embedder, photos).tobytes()


def test_backbone_preprocessing_is_its_default_recipe():
    lite0 = get_recipe("efficientnet_lite0")
    assert (lite0.backbone, lite0.input_size, lite0.resize_size, lite0.resize, lite0.gem_p, lite0.flip,
            lite0.scales, lite0.projection) == ("efficientnet_lite0", 224, 224, "crop", 3.0, False, (1.0,), None)
    assert lite0.gem_p == GEM_P == recipes.DEFAULT_GEM_P
    mobilenet = get_recipe("mobilenet_v2")
    spec = get_backbone("mobilenet_v2").preprocessing
    assert (mobilenet.input_size, mobilenet.resize_size) == (spec.input_size, spec.resize_size) == (224, 256)
    # A variant at another input size keeps the backbone's crop ratio.
    assert recipes.resolve_recipe(Recipe(name="x", backbone="mobilenet_v2", input_size=112)).resize_size == 128
    assert get_recipe("lite0-pad-288").tensor_size == 288 and get_recipe("lite0-pad-288").resize == "pad"


def test_registry_lists_the_named_recipes():
    names = list_recipes()
    for name in ("efficientnet_lite0", "lite0-flip", "lite0-pad-288", "lite0-multiscale", "mobilenet_v2", "resnet50"):
        assert name in names
    assert FLIP not in names and TINY not in names  # hidden test recipe and backbone
    assert get_recipe(FLIP).flip and get_recipe(TINY).name == TINY
    with pytest.raises(ConfigurationError, match="choose one of.*lite0-flip"):
        get_recipe("no-such-recipe")


@pytest.mark.parametrize("pinned_recipe, pinned_backbone, stored_backbone, stored_recipe, expected", [
    (None, None, None, None, DEFAULT_BACKBONE),          # a new data directory
    (None, "mobilenet_v2", None, None, "mobilenet_v2"),  # --backbone alone: its own recipe
    ("lite0-flip", None, None, None, "lite0-flip"),      # --recipe names its backbone
    (None, None, TINY, FLIP, FLIP),                      # queries use the catalogue's recipe
    (None, TINY, TINY, FLIP, FLIP),                      # ... also with the same --backbone pinned
    (None, None, TINY, None, TINY),                      # recorded before recipes: the default
    (None, "mobilenet_v2", TINY, FLIP, "mobilenet_v2"),  # another backbone (refused later, by name)
    (FLIP, TINY, None, None, FLIP),
])
def test_choose_recipe(pinned_recipe, pinned_backbone, stored_backbone, stored_recipe, expected):
    chosen = choose_recipe(recipe=pinned_recipe, backbone=pinned_backbone, stored_backbone=stored_backbone,
                           stored_recipe=stored_recipe, default_backbone=DEFAULT_BACKBONE)
    assert chosen.name == expected


def test_a_recipe_for_another_backbone_is_refused():
    with pytest.raises(ConfigurationError, match="is for backbone 'efficientnet_lite0', not 'test_tiny'"):
        choose_recipe(recipe="lite0-flip", backbone=TINY, default_backbone=DEFAULT_BACKBONE)
    with pytest.raises(ConfigurationError):
        Embedder(TINY, recipe="lite0-flip")


def test_recipes_are_validated_and_fingerprinted_canonically():
    for bad in (dict(resize="stretch"), dict(scales=()), dict(gem_p=0.5), dict(input_size=4), dict(version=0),
                dict(scales=(1.0, 1.0))):
        with pytest.raises(ConfigurationError):
            Recipe(name="bad", backbone=TINY, **bad)
    base = get_recipe(TINY)
    same = recipes.resolve_recipe(Recipe(name="other-name", backbone=TINY, scales=(1,), gem_p=3, description="x"))
    assert same.fingerprint() == base.fingerprint()  # name and description are not parameters
    fingerprints = {base.fingerprint(), *(get_recipe(name).fingerprint() for name in (FLIP, PAD, SCALES, GEM1))}
    assert len(fingerprints) == 5
    projected = get_recipe(PCA)
    assert projected.fingerprint("a" * 64) != projected.fingerprint("b" * 64) != base.fingerprint()
    assert len(base.fingerprint()) == 64


# --- the variants ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [FLIP, PAD, SCALES, GEM1])
def test_variants_change_vectors_deterministically_and_stay_unit_norm(tiny_weights, name):
    images = _pictures()
    default = Embedder(TINY, weights_path=tiny_weights).embed_images(images)
    embedder = Embedder(TINY, recipe=name, weights_path=tiny_weights)
    vectors = embedder.embed_images(images)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors, default, atol=1e-4)
    again = Embedder(TINY, recipe=name, weights_path=tiny_weights).embed_images(images)
    assert again.tobytes() == vectors.tobytes()
    alone = embedder.embed_images(images[1:2])  # batch-independent, as before
    assert np.allclose(alone[0], vectors[1], atol=1e-5)
    assert embedder.identity.recipe == name and embedder.identity.recipe_hash == get_recipe(name).fingerprint()


def test_flip_averaging_makes_the_mirror_image_embed_alike(tiny_weights):
    square = _pictures()[0]  # square: the centre crop is symmetric
    mirror = ImageOps.mirror(square)
    plain = Embedder(TINY, weights_path=tiny_weights).embed_images([square, mirror])
    flipped = Embedder(TINY, recipe=FLIP, weights_path=tiny_weights).embed_images([square, mirror])
    assert not np.allclose(plain[0], plain[1], atol=1e-3)
    assert np.allclose(flipped[0], flipped[1], atol=1e-5)


def test_pad_keeps_the_whole_image_on_white(tiny_weights):
    embedder = Embedder(TINY, recipe=PAD, weights_path=tiny_weights)
    wide = Image.new("RGB", (96, 48), (0, 0, 0))
    tensor = embedder.preprocess(wide)
    assert tensor.shape == (3, 48, 48) and embedder.decode_size == 48
    pre = embedder.spec.preprocessing
    white = (1.0 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    black = -torch.tensor(pre.mean) / torch.tensor(pre.std)
    assert torch.allclose(tensor[:, 0, :], white[:, None].expand(3, 48), atol=1e-5)   # padding above
    assert torch.allclose(tensor[:, 24, :], black[:, None].expand(3, 48), atol=1e-5)  # the image, all of its width


def test_scales_preprocess_at_the_largest_and_decode_for_it(tiny_weights):
    embedder = Embedder(TINY, recipe=SCALES, weights_path=tiny_weights)
    assert embedder.decode_size == 48 and embedder.input_size == 32
    assert embedder.preprocess(_pictures()[1]).shape == (3, 48, 48)
    assert get_recipe(SCALES).views == 3 and get_recipe(FLIP).views == 2


# --- query photos ---------------------------------------------------------------------------


def test_recipes_without_query_settings_keep_the_fingerprints_their_indexes_recorded():
    recipe = get_recipe(TINY)
    # The parameters every recipe had before query settings existed, hashed as then.
    before = {"backbone": TINY, "input_size": 32, "resize_size": 32, "resize": "crop", "gem_p": 3.0, "flip": False,
              "scales": [1.0], "projection_sha256": None}
    assert recipe.parameters() == before
    assert recipe.fingerprint() == hashlib.sha256(
        json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    queries = get_recipe(QUERIES)
    assert queries.parameters() == {**before, "query_input_size": 48, "query_centre_prior": 0.35}
    assert queries.fingerprint() != recipe.fingerprint()
    assert dataclasses.replace(queries, query_centre_prior=0.5).fingerprint() != queries.fingerprint()
    for bad in (dict(query_input_size=4), dict(query_centre_prior=0.0), dict(query_centre_prior=11)):
        with pytest.raises(ConfigurationError, match="query_"):
            Recipe(name="bad", backbone=TINY, **bad)


def test_query_photos_are_seen_larger_and_pooled_towards_the_centre(tiny_weights):
    images = _pictures()
    plain = Embedder(TINY, weights_path=tiny_weights)
    embedder = Embedder(TINY, recipe=QUERIES, weights_path=tiny_weights)
    # Catalogue images embed exactly as with the backbone's own recipe...
    assert embedder.embed_images(images).tobytes() == plain.embed_images(images).tobytes()
    assert embedder.decode_size == 32 and embedder.query_decode_size == 48
    # ... and a recipe without query settings embeds query photos like catalogue images.
    assert plain.embed_queries(images).tobytes() == plain.embed_images(images).tobytes()
    # Query photos: the 48-pixel input, GeM weighed by the centred Gaussian.
    batch = torch.stack([embedder.query_transform(image) for image in images])
    assert batch.shape == (len(images), 3, 48, 48)
    with torch.inference_mode():
        feature_map = embedder.network(batch.contiguous(memory_format=torch.channels_last)).float()
        weights = centre_prior(*feature_map.shape[2:], 0.35)
        expected = torch.nn.functional.normalize(gem_pool(feature_map, weights=weights), dim=1).numpy()
    queries = embedder.embed_queries(images)
    assert np.allclose(queries, expected, atol=1e-6)
    assert not np.allclose(queries, embedder.embed_images(images), atol=1e-3)
    assert np.allclose(embedder.embed_queries(images[1:2])[0], queries[1], atol=1e-5)  # batch-independent


@pytest.mark.parametrize("settings, tensor_side, decode_size", [
    (dict(), 48, 48),                                                  # crop: the backbone's 1:1 ratio
    (dict(resize_size=40), 48, 60),                                    # crop ratio 40/32 kept at 48
    (dict(resize="pad", input_size=40), 48, 48),                       # pad: resized to the query side
    (dict(scales=(1.0, 0.5)), 48, 48),                                 # scales of the query side
    (dict(scales=(1.0, 1.5), flip=True), 72, 72),
])
def test_query_photos_keep_the_recipes_geometry_at_their_own_size(tiny_weights, settings, tensor_side, decode_size):
    recipe = Recipe(name="query-geometry", backbone=TINY, query_input_size=48, hidden=True, **settings)
    embedder = Embedder(TINY, recipe=recipe, weights_path=tiny_weights)
    queries = embedder.query_recipe
    assert queries.input_size == 48 and (queries.resize, queries.scales, queries.flip) == (
        recipe.resize, recipe.scales, recipe.flip)
    assert embedder.query_transform(_pictures()[1]).shape == (3, tensor_side, tensor_side)
    assert embedder.query_decode_size == decode_size
    vectors = embedder.embed_queries(_pictures())
    assert vectors.shape == (3, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The catalogue side is untouched by the query size.
    assert embedder.transform(_pictures()[1]).shape[-1] == embedder.recipe.tensor_size


def test_query_settings_survive_the_catalogues_record_and_older_records_still_read():
    tuned = dataclasses.replace(get_recipe(QUERIES), name=QUERIES + "+tuned", projection="tuned/x.npz")
    record = recipes.DataRecipe(tuned, base=QUERIES, projection_sha256="c" * 64)
    again = recipes.DataRecipe.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.recipe == tuned and again.fingerprint() == record.fingerprint()
    assert (again.recipe.query_input_size, again.recipe.query_centre_prior) == (48, 0.35)
    # A recipe without them records exactly the fields every earlier build knows.
    assert set(get_recipe(FLIP).to_dict()) == {"name", "backbone", "version", "input_size", "resize_size", "resize",
                                               "gem_p", "flip", "scales", "projection", "description", "hidden"}


def test_the_centre_prior_is_a_centred_gaussian_and_matches_the_benchmark_harness():
    from benchmarks.quality.explore import centre_weights

    weights = centre_prior(7, 5, 0.35)
    assert weights.shape == (7, 5) and float(weights[3, 2]) == pytest.approx(1.0)
    assert torch.allclose(weights, weights.flip(0)) and torch.allclose(weights, weights.flip(1))
    assert float(weights[0, 0]) < float(weights[1, 1]) < float(weights[3, 2])
    # 35 positions right of the centre of 201 are 35 / 100.5 half-sides from it.
    assert float(centre_prior(1, 201, 0.35)[0, 100 + 35]) == pytest.approx(np.exp(-(35 / 100.5) ** 2 / (2 * 0.35**2)))
    assert np.allclose(weights.numpy(), centre_weights(7, 5, 0.35), atol=1e-6)
    # Even weights make the plain GeM.
    feature_map = torch.rand(2, 4, 3, 3)
    assert torch.allclose(gem_pool(feature_map, weights=torch.ones(3, 3)), gem_pool(feature_map), atol=1e-6)


def test_a_search_embeds_the_upload_as_a_query_photo(tiny_settings, small_catalogue):
    settings = dataclasses.replace(tiny_settings, recipe=QUERIES)
    vs = VisualSearch(settings)
    vs.index(small_catalogue)
    assert vs.stored_identity().recipe_hash == get_recipe(QUERIES).fingerprint()
    photo = _query(small_catalogue, 3)
    top = vs.search(photo, top_k=1).hits[0]
    with Image.open(photo) as opened:
        picture = opened.convert("RGB")
    embedder = Embedder(TINY, recipe=QUERIES, weights_path=tiny_settings.weights)
    query = embedder.embed_queries([picture])[0]
    stored = embedder.embed_images([picture])[0]  # the catalogue holds this very image
    assert top.sku == "P3"
    assert top.score == pytest.approx(float(query @ stored), abs=1e-4)
    assert top.score < 0.9999  # the query is not embedded like the catalogue image


# --- PCA whitening --------------------------------------------------------------------------


def _correlated(count: int = 4000, width: int = 16, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width)) * np.linspace(3.0, 0.1, width)[:, None]
    return (rng.normal(size=(count, width)) @ mixing + 5.0).astype(np.float32)


def test_pca_whitening_decorrelates_and_outputs_unit_vectors(tmp_path):
    data = _correlated()
    assert abs(np.corrcoef(data, rowvar=False)[0, 1:]).max() > 0.2  # correlated to begin with
    projection = learn_pca_whitening(data, 8)
    assert (projection.in_dim, projection.out_dim) == (16, 8)
    whitened = projection.apply(data, normalise=False)
    assert np.allclose(np.cov(whitened, rowvar=False), np.eye(8), atol=1e-3)
    assert np.allclose(whitened.mean(axis=0), 0.0, atol=1e-3)
    unit = projection.apply(data)
    assert unit.dtype == np.float32 and np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)

    saved = projection.save(tmp_path / "pca.npz")
    assert saved.sha256 == hashlib.sha256((tmp_path / "pca.npz").read_bytes()).hexdigest()
    loaded = Projection.load(tmp_path / "pca.npz")
    assert loaded.sha256 == saved.sha256 and np.array_equal(loaded.apply(data), unit)
    assert [path.name for path in tmp_path.iterdir()] == ["pca.npz"]  # no temporary file left
    for dim in (0, 17):
        with pytest.raises(ConfigurationError, match="whitening dimension"):
            learn_pca_whitening(data, dim)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigurationError, match="cannot read projection"):
        Projection.load(tmp_path / "broken.npz")
    with pytest.raises(ConfigurationError, match="does not exist"):
        Projection.load(tmp_path / "missing.npz")


def _learn_tiny_projection(data_dir: Path, tiny_weights: Path, seed: int = 0) -> Projection:
    rng = np.random.default_rng(seed)
    sample = [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((40, 40), Image.NEAREST)
              for _ in range(64)]
    vectors = Embedder(TINY, weights_path=tiny_weights).embed_images(sample)
    return learn_pca_whitening(vectors, 8).save(data_dir / "pca8.npz")


def test_the_embedder_applies_a_recipes_projection(tmp_path, tiny_weights):
    with pytest.raises(ConfigurationError, match="does not exist"):
        Embedder(TINY, recipe=PCA, projection_dir=tmp_path, weights_path=tiny_weights)
    projection = _learn_tiny_projection(tmp_path, tiny_weights)
    embedder = Embedder(TINY, recipe=PCA, projection_dir=tmp_path, weights_path=tiny_weights)
    images = _pictures()
    vectors = embedder.embed_images(images)
    assert embedder.dim == 8 and vectors.shape == (3, 8) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    plain = Embedder(TINY, weights_path=tiny_weights).embed_images(images)
    assert np.allclose(vectors, projection.apply(plain), atol=1e-6)
    assert embedder.identity.dim == 8
    assert embedder.identity.recipe_hash == get_recipe(PCA).fingerprint(projection.sha256)
    assert embedder.embed_images([]).shape == (0, 8)


# --- the catalogue's record, and mismatches -------------------------------------------------


def _query(small_catalogue: Path, number: int) -> Path:
    return small_catalogue.parent / "img" / f"p{number}-0.png"


def test_the_catalogue_records_the_recipe(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    stored = vs.stored_identity()
    identity = vs.embedder.identity
    assert (stored.recipe, stored.recipe_version, stored.recipe_hash) == (TINY, 1, get_recipe(TINY).fingerprint())
    assert identity.recipe_hash == stored.recipe_hash
    assert vs.stats()["recipe"] == TINY and vs.stats()["recipe_version"] == 1 and vs.health()["recipe"] == TINY

    flipped = dataclasses.replace(tiny_settings, data_dir=tiny_settings.data_dir.parent / "flip", backbone=None,
                                  recipe=FLIP)
    other = VisualSearch(flipped)
    other.index(small_catalogue)
    assert other.stored_identity().recipe == FLIP and other.stats()["recipe"] == FLIP
    # Queries use the stored recipe when none is pinned (the backbone may be).
    for settings in (dataclasses.replace(flipped, recipe=None), dataclasses.replace(flipped, recipe=None,
                                                                                    backbone=TINY)):
        reader = VisualSearch(settings, read_only=True)
        assert reader.embedder.recipe.name == FLIP
        top = reader.search(_query(small_catalogue, 4), top_k=1).hits[0]
        assert top.sku == "P4" and top.score == pytest.approx(1.0, abs=1e-4)
    stored_vector = dict(zip(*other.store().get_vectors([1])))[1]
    path = Path(other.image_file(1))
    assert np.allclose(stored_vector, Embedder(TINY, recipe=FLIP, weights_path=tiny_settings.weights)
                       .embed_images([Image.open(path).convert("RGB")])[0], atol=1e-5)


def test_another_recipe_is_refused_for_search_and_index(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    pinned = dataclasses.replace(tiny_settings, recipe=FLIP)
    with pytest.raises(RecipeMismatchError) as caught:
        VisualSearch(pinned).search(_query(small_catalogue, 2))
    message = str(caught.value)
    assert f"indexed with recipe '{TINY}', not '{FLIP}'" in message
    assert f"visualsearch reembed --recipe {FLIP}" in message
    assert isinstance(caught.value, BackboneMismatchError) and caught.value.code == "recipe_mismatch"
    with pytest.raises(RecipeMismatchError):
        VisualSearch(pinned).index(small_catalogue)
    # The default recipe pinned by name is the catalogue's: fine.
    named = VisualSearch(dataclasses.replace(tiny_settings, recipe=TINY))
    assert named.search(_query(small_catalogue, 2), top_k=1).hits[0].sku == "P2"


def test_a_changed_recipe_definition_or_projection_file_is_refused(tiny_settings, small_catalogue, monkeypatch):
    settings = dataclasses.replace(tiny_settings, recipe=PCA)
    settings.data_dir.mkdir(parents=True)
    _learn_tiny_projection(settings.data_dir, tiny_settings.weights)
    vs = VisualSearch(settings)
    vs.index(small_catalogue)
    assert vs.stats()["dim"] == 8 and vs.store().dim == 8
    assert vs.search(_query(small_catalogue, 6), top_k=1).hits[0].sku == "P6"

    _learn_tiny_projection(settings.data_dir, tiny_settings.weights, seed=1)  # another projection file
    with pytest.raises(RecipeMismatchError, match=f"recipe '{PCA}' changed since"):
        VisualSearch(dataclasses.replace(settings, recipe=None)).search(_query(small_catalogue, 6))

    monkeypatch.setitem(recipes._REGISTRY, FLIP, dataclasses.replace(get_recipe(FLIP), version=2))
    flipped = dataclasses.replace(tiny_settings, data_dir=tiny_settings.data_dir.parent / "flip", recipe=FLIP)
    VisualSearch(flipped).index(small_catalogue)
    monkeypatch.setitem(recipes._REGISTRY, FLIP, dataclasses.replace(get_recipe(FLIP), version=3))
    with pytest.raises(RecipeMismatchError, match="version 2.*now version 3"):
        VisualSearch(flipped).search(_query(small_catalogue, 6))


def test_a_catalogue_without_a_recipe_key_is_the_backbones_default(tiny_settings, small_catalogue):
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    with vs.session() as session:  # what a catalogue indexed before recipes holds
        for key in catalogue.RECIPE_KEYS:
            catalogue.delete_meta(session, key)
    for settings in (tiny_settings, dataclasses.replace(tiny_settings, backbone=None),
                     dataclasses.replace(tiny_settings, recipe=TINY)):
        legacy = VisualSearch(settings)
        stored = legacy.stored_identity()
        assert stored.recipe is None and stored.recipe_name == TINY
        assert legacy.embedder.recipe.name == TINY and legacy.stats()["recipe"] == TINY
        assert legacy.search(_query(small_catalogue, 8), top_k=1).hits[0].sku == "P8"
    again = VisualSearch(tiny_settings).index(small_catalogue)
    assert again.unchanged == 24
    with pytest.raises(RecipeMismatchError):
        VisualSearch(dataclasses.replace(tiny_settings, recipe=FLIP)).search(_query(small_catalogue, 8))
    # Nothing was migrated: the catalogue still holds no recipe keys.
    assert VisualSearch(tiny_settings).stored_identity().recipe is None


# --- switching recipes ----------------------------------------------------------------------


def test_reembed_with_another_recipe_on_the_same_backbone_switches(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    server = VisualSearch(tiny_settings)  # pins --backbone test_tiny, no recipe
    assert server.embedder.recipe.name == TINY
    vs = VisualSearch(tiny_settings)
    report = vs.reembed(recipe=FLIP, weights=str(tiny_settings.weights))
    assert report.switched and report.embedded == 24 and report.failures == []
    assert (report.backbone, report.previous_backbone, report.recipe, report.previous_recipe) == (TINY, TINY, FLIP,
                                                                                                   TINY)
    assert report.generation == f"generations/1-{FLIP}"
    assert vs.stats()["recipe"] == FLIP and vs.stored_identity().recipe_hash == get_recipe(FLIP).fingerprint()
    assert server.follow_generation(0, wait=True) and server.embedder.recipe.name == FLIP
    top = server.search(_query(small_catalogue, 5), top_k=1).hits[0]
    assert top.sku == "P5" and top.score == pytest.approx(1.0, abs=1e-4)

    assert not vs.reembed(recipe=FLIP, weights=str(tiny_settings.weights)).switched  # nothing to do
    with pytest.raises(ConfigurationError, match="name the backbone or the recipe"):
        vs.reembed(weights=str(tiny_settings.weights))
    back = vs.reembed(backbone=TINY, weights=str(tiny_settings.weights))  # --backbone alone: its own recipe
    assert back.switched and back.recipe == TINY and VisualSearch(tiny_settings).stats()["recipe"] == TINY


# --- the command line -----------------------------------------------------------------------


@pytest.fixture
def run(tiny_weights, tmp_path, monkeypatch):
    """The CLI with no backbone pinned: commands follow the data directory's."""
    return cli_runner(monkeypatch, tmp_path / "data", tiny_weights, backbone=None)


def test_cli_recipes_index_search_and_reembed(run, small_catalogue, tmp_path):
    listed = json.loads(run("recipes", "--json").stdout)
    by_name = {recipe["name"]: recipe for recipe in listed}
    assert by_name["lite0-flip"]["flip"] is True and by_name["efficientnet_lite0"]["input_size"] == 224
    assert len(by_name["efficientnet_lite0"]["fingerprint"]) == 64
    assert "lite0-pad-288" in run("recipes").stdout
    shopper = by_name["mnv2-shopper"]
    assert (shopper["backbone"], shopper["input_size"], shopper["query_input_size"], shopper["query_centre_prior"]) == (
        "mobilenet_v2", 224, 320, 0.35)
    assert "query_input_size" not in by_name["efficientnet_lite0"]  # unset: left out of records
    assert "queries at 320, query centre prior 0.35" in run("recipes").stdout

    assert run("index", str(small_catalogue), "--backbone", TINY).exit_code == 0
    query = str(_query(small_catalogue, 3))
    refused = run("search", query, "--recipe", FLIP)
    assert refused.exit_code == 1 and "recipe_mismatch" in refused.output and "reembed --recipe" in refused.output
    switched = run("reembed", "--recipe", FLIP, "--json")
    assert switched.exit_code == 0, switched.output
    report = json.loads(switched.stdout)
    assert report["switched"] and report["recipe"] == FLIP and report["previous_recipe"] == TINY
    assert json.loads(run("stats", "--json").stdout)["recipe"] == FLIP
    found = json.loads(run("search", query, "--json").stdout)["results"]
    assert found[0]["sku"] == "P3"
    assert json.loads(run("search", query, "--recipe", FLIP, "--json").stdout)["results"][0]["sku"] == "P3"
    unknown = run("search", query, "--recipe", "nope")
    assert unknown.exit_code != 0 and "unknown recipe" in unknown.output
    image = make_image(tmp_path / "new.png", seed=99)
    assert run("search", str(image), "--backbone", TINY, "--json").exit_code == 0


def test_the_index_manifest_records_the_recipe(tiny_settings, small_catalogue):
    """The data directory's manifest.json says which recipe made its vectors."""
    import json

    from visualsearch.service import VisualSearch

    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    manifest = json.loads((tiny_settings.data_dir / "manifest.json").read_text())
    stored = vs.stored_identity()
    assert manifest["recipe"] == stored.recipe_name == TINY and manifest["recipe_hash"] == stored.recipe_hash
    assert len(manifest["recipe_hash"]) >= 12
