"""Values the catalogue cannot store (too long for a column, a NUL character, an image path
too long for PostgreSQL's index) are refused alike on SQLite and PostgreSQL: a 400 from the
API and a bad row named by its line from the indexer, and nothing is written."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from visualsearch.catalogue.limits import FIELD_LENGTHS, MAX_IMAGE_PATH_BYTES
from visualsearch.errors import InvalidRequestError, ProductNotFoundError
from visualsearch.service import VisualSearch
from visualsearch.storage_errors import invalid_value_from

from . import test_api_writes
from .conftest import make_image, write_catalogue

# The write tests' fixtures: an app over the indexed small catalogue, with a write key.
AUTH, settings, client = test_api_writes.AUTH, test_api_writes.settings, test_api_writes.client

pytestmark = pytest.mark.catalogue_databases("sqlite", "postgresql")


def test_the_limits_are_the_columns_lengths():
    assert FIELD_LENGTHS == {"sku": 255, "category": 255, "brand": 255}


def _refused(response, *words: str) -> None:
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "bad_request"
    for word in words:
        assert word in error["message"], error["message"]


def test_api_writes_refuse_what_the_catalogue_cannot_store(client):
    before = client.get("/api/v1/products/P1").get_json()
    long_sku = "S" * 300
    _refused(client.put(f"/api/v1/products/{long_sku}", headers=AUTH, json={"title": "x"}), "sku", "300", "255")
    _refused(client.put("/api/v1/products/NEW", headers=AUTH, json={"category": "c" * 300}), "category", "255")
    _refused(client.put("/api/v1/products/NEW", headers=AUTH, json={"attributes": {"k": "v\x00"}}),
             "attribute 'k'", "NUL")
    _refused(client.put("/api/v1/products/A\x00B", headers=AUTH, json={"title": "x"}), "sku", "NUL")
    _refused(client.put("/api/v1/products/P1", headers=AUTH, json={"title": "a\x00b"}), "title", "NUL")
    _refused(client.put("/api/v1/products/P1", headers=AUTH, json={"brand": "b" * 256}), "brand", "256", "255")
    _refused(client.put("/api/v1/products/P1", headers=AUTH, json={"attributes": {"k\x00": "v"}}),
             "attribute name", "NUL")
    _refused(client.patch("/api/v1/products/P1", headers=AUTH, json={"attributes": {"sizes": ["M", "\x00"]}}),
             "attribute 'sizes'", "NUL")
    _refused(client.put("/api/v1/products/P1", headers=AUTH,
                        data={"title": "x", "attributes": json.dumps({"a": "\x00"})}), "NUL")
    # Nothing was stored: no new product, P1 as it was.
    for sku in (long_sku, "NEW"):
        assert client.get(f"/api/v1/products/{sku}").status_code == 404
    assert client.get("/api/v1/products/P1").get_json() == before
    assert client.get("/api/v1/health").get_json()["products"] == 12


def test_values_at_the_limit_are_stored(client):
    sku, category = "K" * 255, "é" * 255  # characters, not bytes, on both databases
    response = client.put(f"/api/v1/products/{sku}", headers=AUTH, json={"category": category})
    assert response.status_code == 201, response.get_json()
    assert client.get(f"/api/v1/products/{sku}").get_json()["category"] == category


def test_a_lookup_the_database_refuses_is_a_client_error(client, settings):
    # SQLite finds no such product; PostgreSQL refuses the NUL itself: never a 500.
    response = client.get("/api/v1/products/A\x00B")
    assert response.status_code in (400, 404) and "error" in response.get_json()
    with pytest.raises((InvalidRequestError, ProductNotFoundError)):
        VisualSearch(settings).product("A\x00B")


def test_a_data_error_becomes_a_bad_request():
    class TooLong(Exception):
        sqlstate = "22001"

        def __str__(self):
            return "value too long for type character varying(255)"

    error = invalid_value_from(sa.exc.DataError("INSERT ...", {}, TooLong()))
    assert isinstance(error, InvalidRequestError) and "character varying(255)" in str(error)
    assert invalid_value_from(sa.exc.IntegrityError("x", {}, Exception())) is None


def _manifest(folder, rows, name="catalogue.csv"):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for number, row in enumerate(rows):
        row.setdefault("image", str(make_image(folder / "img" / f"i{number}.png", seed=100 + number)))
    if name.endswith(".jsonl"):
        path = folder / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path
    return write_catalogue(folder, rows, name=name)


def test_a_manifest_row_the_catalogue_cannot_store_is_named_by_its_line(run, small_catalogue, tmp_path):
    """Like every bad row, it refuses the whole manifest before anything is written
    (README: "The whole manifest is validated first"), on both databases alike."""
    assert run("index", small_catalogue).exit_code == 0
    too_long = _manifest(tmp_path / "long", [
        {"sku": "GOOD-1", "title": "fine"},
        {"sku": "L" * 300, "title": "too long"},                      # line 3
        {"sku": "GOOD-2", "category": "c" * 256},                     # line 4
        {"sku": "GOOD-3", "image": "img/" + "x" * MAX_IMAGE_PATH_BYTES + ".png"},  # line 5
    ])
    result = run("index", too_long)
    assert result.exit_code == 1
    assert "3 bad row(s)" in result.output
    assert "line 3: sku 'LLL" in result.output
    assert "300 characters long; the catalogue holds at most 255" in result.output
    assert "line 4: category" in result.output and "'GOOD-2'" in result.output
    assert "line 5: image" in result.output and "at most 2,048" in result.output
    assert "line 2" not in result.output
    nul = _manifest(tmp_path / "nul", [
        {"sku": "GOOD-1"},
        {"sku": "N-1", "title": "a\x00b"},            # line 2
        {"sku": "N-2", "colour": {"name": "\x00"}},   # line 3: a nested attribute value
    ], name="catalogue.jsonl")
    result = run("index", nul)
    assert result.exit_code == 1
    assert "line 2: title of product 'N-1' contains a NUL" in result.output
    assert "line 3: attribute 'colour' of product 'N-2' contains a NUL" in result.output
    # Nothing was written: the catalogue is still the small one.
    stats = json.loads(run("stats", "--json").stdout)
    assert stats["products"] == 12
    assert run("show", "GOOD-1").exit_code == 1
