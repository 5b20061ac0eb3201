"""Shared fixtures: a tiny registered test backbone, tiny catalogues, and the real demo index."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visualsearch.backbones import (
    BackboneNetwork,
    BackboneSpec,
    Preprocessing,
    WeightsSource,
    load_weights_strictly,
    register_backbone,
)
from visualsearch.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "data" / "demo" / "catalogue.csv"
TINY = "test_tiny"


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(32, 1000)


def _build_tiny(weights: Path) -> BackboneNetwork:
    model = _TinyNet()
    load_weights_strictly(model, weights, TINY)
    return BackboneNetwork(model.trunk, lambda f: model.fc(f.mean(dim=(2, 3))))


register_backbone(BackboneSpec(
    name=TINY, embedding_dim=32, build=_build_tiny,
    weights=WeightsSource(filename="test_tiny.pth"),
    preprocessing=Preprocessing(input_size=32, resize_size=32, interpolation="bilinear"),
    description="two-layer CNN for fast tests", hidden=True,
))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A deterministic weights file for the tiny test backbone."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_tiny.pth"
    torch.save(_TinyNet().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (tests/postgres.py); skips where no binaries exist."""
    from .postgres import PostgresServer, find_binaries

    binaries = find_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    server = PostgresServer(binaries)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh PostgreSQL database holding an empty catalogue, dropped after the test."""
    url = postgres_server.new_database()
    yield url
    postgres_server.drop_database(url)


CATALOGUE_DATABASES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    """Tests marked ``catalogue_databases("sqlite", "postgresql")`` (a module's or their
    own, the closest wins) run once per catalogue database, through ``catalogue_db``."""
    marker = metafunc.definition.get_closest_marker("catalogue_databases")
    if marker is not None and "catalogue_db" in metafunc.fixturenames:
        metafunc.parametrize("catalogue_db", marker.args or CATALOGUE_DATABASES, indirect=True)


# A maintainer's matrix run: the whole suite's tiny deployments on other engines, e.g.
#   VISUALSEARCH_TEST_CATALOGUE=postgresql VISUALSEARCH_TEST_VECTOR_STORE=milvus-lite pytest
# (tests that are about SQLite files or the FAISS folders themselves then fail by design).
DEFAULT_TEST_CATALOGUE = os.environ.get("VISUALSEARCH_TEST_CATALOGUE", "sqlite")
DEFAULT_TEST_VECTOR_STORE = os.environ.get("VISUALSEARCH_TEST_VECTOR_STORE", "faiss")


@pytest.fixture
def catalogue_db(request) -> str | None:
    """The catalogue database URL of the test's settings: None (the SQLite file in the data
    directory) unless the test runs parametrized on PostgreSQL."""
    if getattr(request, "param", DEFAULT_TEST_CATALOGUE) == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def tiny_settings(tmp_path, tiny_weights, catalogue_db) -> Settings:
    vector_store = str(tmp_path / "vectors.db") if DEFAULT_TEST_VECTOR_STORE == "milvus-lite" else None
    return Settings(data_dir=tmp_path / "data", db_url=catalogue_db, backbone=TINY, weights=str(tiny_weights),
                    workers=0, batch_size=8, threads=None, vector_store=vector_store)


def make_image(path: Path, seed: int, size: int = 48) -> Path:
    """A distinct, deterministic picture: random blocks of colour."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(path)
    return path


def write_catalogue(folder: Path, rows: list[dict], name: str = "catalogue.csv") -> Path:
    """Write a CSV manifest with the union of the rows' columns."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = folder / name
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def small_catalogue(tmp_path) -> Path:
    """12 products, 2 images each, 3 categories, prices 10..120."""
    folder = tmp_path / "catalogue"
    (folder / "img").mkdir(parents=True)
    rows = []
    for number in range(12):
        for view in range(2):
            make_image(folder / "img" / f"p{number}-{view}.png", seed=number * 10 + view)
            rows.append({"sku": f"P{number}", "image": f"img/p{number}-{view}.png",
                         "title": f"Product {number}", "category": ["shoes", "bags", "hats"][number % 3],
                         "brand": "Acme" if number < 6 else "Globex", "price": 10 * (number + 1),
                         "colour": random.Random(number).choice(["red", "blue"])})
    return write_catalogue(folder, rows)


class Crash(Exception):
    """Stands for the process dying mid-run."""


class CrashAfterFirstBatch:
    """An indexing progress reporter that "kills" the run once the first batch is committed."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def set_total(self, total: int) -> None:
        pass

    def advance(self, count: int) -> None:
        if count == self.batch_size:
            raise Crash()


def cli_runner(monkeypatch: pytest.MonkeyPatch, data_dir: Path, weights: Path, *, backbone: str | None = TINY,
               db_url: str | None = None):
    """Run ``visualsearch ARGS...`` in this process on ``data_dir`` (and the catalogue
    database ``db_url``, if given) with the tiny test weights (and backbone, unless None:
    a command then follows the data directory's).
    Returns ``invoke(*args, input=None) -> click Result``."""
    from click.testing import CliRunner

    from indexer.cli import main

    monkeypatch.setenv("VISUALSEARCH_DATA_DIR", str(data_dir))
    if db_url is not None:
        monkeypatch.setenv("VISUALSEARCH_DB_URL", db_url)
    if backbone is not None:
        monkeypatch.setenv("VISUALSEARCH_BACKBONE", backbone)
    monkeypatch.setenv("VISUALSEARCH_WEIGHTS", str(weights))
    monkeypatch.setenv("VISUALSEARCH_WORKERS", "0")
    runner = CliRunner()

    def invoke(*args, input: str | None = None):
        return runner.invoke(main, [str(arg) for arg in args], catch_exceptions=False, input=input)

    return invoke


@pytest.fixture
def run(tiny_weights, tmp_path, monkeypatch, catalogue_db):
    """The CLI on ``tmp_path / "data"`` with the tiny backbone (see :func:`cli_runner`)."""
    return cli_runner(monkeypatch, tmp_path / "data", tiny_weights, db_url=catalogue_db)


@pytest.fixture(scope="session")
def demo_settings(tmp_path_factory) -> Settings:
    """The bundled demo catalogue indexed once with the real default backbone."""
    from visualsearch.service import VisualSearch

    settings = Settings(data_dir=tmp_path_factory.mktemp("demo-data"), workers=0)
    report = VisualSearch(settings).index(DEMO_MANIFEST)
    assert report.failures == [] and report.embedded == 45
    return settings
