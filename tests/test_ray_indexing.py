"""Indexing on Ray (``--engine ray``): the same catalogue and vectors as the local engine."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from visualsearch.catalogue import ImageStatus, store
from visualsearch.embedder import Embedder
from visualsearch.errors import ConfigurationError, ManifestError, WeightsUnavailableError
from visualsearch.ray_indexing import (
    ActorPlan,
    EmbedderConfig,
    _IdBitmap,
    _library_error,
    _refusal,
    plan_actors,
)
from visualsearch.recipes import Recipe, learn_pca_whitening
from visualsearch.service import VisualSearch

from .conftest import TINY, _TinyNet, make_image, write_catalogue

ray = pytest.importorskip("ray")

# Ray Data's own DataContext() sets one of its deprecated fields.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (the engine uses it, and leaves it running)."""
    # Ray waits 30 s for its GCS server to bind a port; a first start in a fresh venv on a
    # busy 2-core CI machine took longer (fresh-clone run, 2026-11-28), failing the module.
    wait = "RAY_gcs_server_port_wait_time_s"
    ours = wait not in os.environ
    os.environ.setdefault(wait, "180")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    if ours:
        os.environ.pop(wait, None)


def _catalogue_rows(vs: VisualSearch) -> dict:
    """Every product and image as stored (ids aside), and each image's vector."""
    rows = {}
    with vs.sessions() as session:
        for sku in sorted(product.sku for product in _products(session)):
            product = store.get_product(session, sku)
            for image in product.images:
                rows[(sku, image.path)] = (product.title, product.category, product.price,
                                           ImageStatus(image.status).value,
                                           image.sha256, image.width, image.height, image.error, image.id)
    ids = [row[-1] for row in rows.values() if row[3] == "indexed"]
    found, vectors = vs.store().get_vectors(ids)
    vector_of = dict(zip(found.tolist(), vectors))
    return {key: (row[:-1], vector_of.get(row[-1])) for key, row in rows.items()}


def _products(session):
    from visualsearch.catalogue.models import Product

    return session.query(Product).all()


def _same(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert left[key][0] == right[key][0], key
        if left[key][1] is None:
            assert right[key][1] is None, key
        else:
            assert np.allclose(left[key][1], right[key][1], atol=1e-5), key


@pytest.fixture
def mixed_catalogue(tmp_path):
    """8 products, a shared picture, a broken and a missing file."""
    folder = tmp_path / "cat"
    folder.mkdir()
    rows = []
    for number in range(8):
        make_image(folder / f"{number}.png", seed=number)
        rows.append({"sku": f"S{number}", "image": f"{number}.png", "title": f"T{number}",
                     "category": ["shoes", "bags"][number % 2], "price": number + 1})
    (folder / "copy.png").write_bytes((folder / "3.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [{"sku": "S0", "image": "copy.png", "title": "T0", "category": "shoes", "price": 1},
             {"sku": "B", "image": "broken.jpg"}, {"sku": "M", "image": "missing.png"}]
    return write_catalogue(folder, rows)


@pytest.mark.slow  # starts Ray workers and actors
def test_ray_engine_matches_the_local_engine(local_ray, tiny_settings, mixed_catalogue, tmp_path):
    on_ray = VisualSearch(tiny_settings.with_overrides(data_dir=tmp_path / "ray"))
    report = on_ray.index(mixed_catalogue, engine="ray")
    assert {failure.sku for failure in report.failures} == {"B", "M"}  # and the run went on
    assert {entry["code"] for entry in map(json.loads, on_ray.failures_path.read_text().splitlines())} == {
        "file_not_found", "undecodable_image"}
    local = VisualSearch(tiny_settings.with_overrides(data_dir=tmp_path / "local"))
    expected = local.index(mixed_catalogue)
    assert (report.products, report.images, report.embedded, report.reused, report.unchanged) == (
        expected.products, expected.images, expected.embedded, expected.reused, expected.unchanged) == (
        10, 11, 9, 0, 0)
    assert report.failures == expected.failures
    _same(_catalogue_rows(on_ray), _catalogue_rows(local))
    assert on_ray.stats()["index"]["vectors"] == 9 and on_ray.stats()["failed_images"] == 2

    again = on_ray.index(mixed_catalogue, engine="ray")
    assert (again.embedded, again.reused, again.unchanged, len(again.failures)) == (0, 0, 9, 2)


@pytest.mark.slow  # starts Ray workers and actors
def test_content_already_indexed_is_reused_not_embedded(local_ray, tiny_settings, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    for number in range(3):
        make_image(folder / f"{number}.png", seed=number)
    vs = VisualSearch(tiny_settings)
    vs.index(write_catalogue(folder, [{"sku": f"A{n}", "image": f"{n}.png"} for n in range(3)]))
    for number in range(3):
        (folder / f"again{number}.png").write_bytes((folder / f"{number}.png").read_bytes())
    make_image(folder / "new.png", seed=42)
    more = write_catalogue(folder, [{"sku": f"B{n}", "image": f"again{n}.png"} for n in range(3)]
                           + [{"sku": "C", "image": "new.png"}], name="more.csv")
    report = vs.index(more, engine="ray")
    assert (report.reused, report.embedded, report.failures) == (3, 1, [])
    vectors = {sku: vs.store().get_vectors([vs.product(sku).images[0].id])[1][0] for sku in ("A1", "B1")}
    assert np.array_equal(vectors["A1"], vectors["B1"])


@pytest.mark.slow  # starts Ray workers and actors
def test_cli_index_on_ray(local_ray, run, small_catalogue):
    result = run("index", small_catalogue, "--engine", "ray", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["products"], report["embedded"], report["failures"]) == (12, 24, [])
    assert json.loads(run("stats", "--json").output)["indexed_images"] == 24
    result = run("index", small_catalogue, "--engine", "ray")
    assert result.exit_code == 0 and "0 embedded" in result.output and "24 unchanged" in result.output


@pytest.fixture
def other_weights_on_the_workers(monkeypatch, tmp_path):
    """The workers find other weights than the driver's (as on a node whose weights file
    differs): the embedding actors are sent another file than the one the driver loaded."""
    torch.manual_seed(1)
    other = tmp_path / "other-weights" / "test_tiny.pth"
    other.parent.mkdir()
    torch.save(_TinyNet().state_dict(), other)
    driver_config = EmbedderConfig.of

    def config_with_other_weights(embedder, **options):
        return dataclasses.replace(driver_config(embedder, **options), weights_path=other)

    monkeypatch.setattr(EmbedderConfig, "of", config_with_other_weights)


def test_a_recipes_projection_travels_to_the_actors_in_their_configuration(tiny_weights, tmp_path):
    """An actor on another node has neither the driver's data directory nor its catalogue."""
    data_dir = tmp_path / "data"
    sample = np.random.default_rng(0).normal(size=(64, 32))
    learn_pca_whitening(sample, 8).save(data_dir / "tuned" / "pca8.npz")
    recipe = Recipe(name="tiny-pca8-ray", backbone=TINY, projection="tuned/pca8.npz", hidden=True)
    driver = Embedder(TINY, recipe=recipe, projection_dir=data_dir, weights_path=tiny_weights)
    config = EmbedderConfig.of(driver, projection_dir=data_dir, plan=ActorPlan(actors=1, cpus=1, gpus=0, threads=1))
    shutil.rmtree(data_dir)
    actor = pickle.loads(pickle.dumps(config)).load()
    assert actor.identity == driver.identity and actor.dim == 8
    assert np.array_equal(actor.projection.matrix, driver.projection.matrix)


@pytest.mark.slow  # starts Ray workers and actors
def test_a_worker_refusing_other_weights_is_a_typed_error(local_ray, other_weights_on_the_workers, tiny_settings,
                                                          run, small_catalogue):
    with pytest.raises(ConfigurationError, match="a Ray worker loaded other weights") as raised:
        VisualSearch(tiny_settings).index(small_catalogue, engine="ray")
    assert not isinstance(raised.value, ray.exceptions.RayError)  # the worker's own error, not Ray's wrapper

    result = run("index", small_catalogue, "--engine", "ray")
    assert result.exit_code == 1
    assert result.output.startswith("Error: a Ray worker loaded other weights"), result.output
    assert "[bad_configuration]" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # no traceback


def test_ray_errors_become_library_errors():
    refusal = ManifestError("no such column")
    task_error = ray.exceptions.RayTaskError("decode", "Traceback ...\nManifestError: no such column", refusal)
    assert _library_error(task_error.as_instanceof_cause()) is refusal
    noted = ManifestError("no such column\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
                          "To change retry attempts, configure ...")  # what Ray Data appends
    assert str(_library_error(ray.exceptions.RayTaskError("decode", "...", noted))) == "no such column"

    # Ray Data wraps a task's error in a UserCodeException, of which the driver gets the text only.
    wrapped = ray.exceptions.RayTaskError("decode", (
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in decode\n"
        "MemoryError: out of memory\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n  File \"y.py\", line 2, in map\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
        "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\nTo change retry attempts, ..."),
        ray.exceptions.UserCodeException("UDF failed to process a data block."))
    error = _library_error(wrapped)
    assert isinstance(error, ConfigurationError)
    assert str(error) == "the Ray pipeline failed: MemoryError: out of memory"
    assert str(_library_error(ray.exceptions.ActorDiedError())) == (
        "the Ray pipeline failed: " + ray.exceptions.ActorDiedError.BASE_ERROR_MSG)


def test_an_actors_refusal_is_rebuilt_from_its_code():
    assert type(_refusal("weights_unavailable", "no weights here")) is WeightsUnavailableError
    assert type(_refusal("bad_configuration", "other weights")) is ConfigurationError
    assert str(_refusal("from_a_newer_version", "?")) == "?"  # unknown: a ConfigurationError


def test_cli_refuses_combinations_that_make_no_sense(run, small_catalogue):
    result = run("index", small_catalogue, "--ray-address", "auto")
    assert result.exit_code == 2 and "--engine ray" in result.output
    result = run("index", small_catalogue, "--engine", "ray", "--workers", "2")
    assert result.exit_code == 2 and "--workers" in result.output


def test_missing_ray_says_how_to_install_it(tiny_settings, small_catalogue, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now fails as if not installed
    vs = VisualSearch(tiny_settings)
    with pytest.raises(ConfigurationError, match=r"pip install 'visualsearch\[ray\]'"):
        vs.index(small_catalogue, engine="ray")
    assert vs.stats()["products"] == 0  # refused before writing anything


@pytest.mark.parametrize("device, cpus, gpus, plan", [
    ("cpu", 1, 0, ActorPlan(actors=1, cpus=1, gpus=0, threads=1)),
    ("cpu", 2, 0, ActorPlan(actors=1, cpus=1, gpus=0, threads=1)),
    ("cpu", 4, 0, ActorPlan(actors=1, cpus=3, gpus=0, threads=3)),
    ("cpu", 8, 4, ActorPlan(actors=2, cpus=3, gpus=0, threads=3)),  # cpu asked for: the GPUs stay idle
    ("cpu", 16, 0, ActorPlan(actors=3, cpus=4, gpus=0, threads=4)),
    ("auto", 64, 0, ActorPlan(actors=12, cpus=4, gpus=0, threads=4)),
    ("auto", 16, 2, ActorPlan(actors=2, cpus=1, gpus=1, threads=1)),
    ("cuda", 8, 1, ActorPlan(actors=1, cpus=1, gpus=1, threads=1)),
    ("cuda:1", 8, 4, ActorPlan(actors=4, cpus=1, gpus=1, threads=1)),
])
def test_actor_plan(device, cpus, gpus, plan):
    assert plan_actors(device, cluster_cpus=cpus, cluster_gpus=gpus) == plan


def test_actor_plan_refuses_cuda_without_gpus():
    with pytest.raises(ConfigurationError, match="no GPU"):
        plan_actors("cuda", cluster_cpus=8, cluster_gpus=0)
    with pytest.raises(ConfigurationError, match="unknown device"):
        plan_actors("tpu", cluster_cpus=8, cluster_gpus=0)


def test_id_bitmap():
    ids = _IdBitmap()
    for image_id in (1, 8, 9, 1000, 70_000):
        ids.add(image_id)
    assert [i for i in range(70_010) if i in ids] == [1, 8, 9, 1000, 70_000]
    assert "1" not in ids
