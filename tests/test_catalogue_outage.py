"""The PostgreSQL catalogue goes away under a running app and comes back: requests get a
JSON 503 that says so (never a 500 or a hang), writes change nothing, and the same
process serves again once the server is back, without a restart.

The server is one of its own (tests/postgres.py), since stopping the session's shared
one would take the other tests' databases with it.
"""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from visualsearch.service import VisualSearch
from web import create_app

from .conftest import make_image
from .test_api import upload

AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def own_postgres():
    from .postgres import PostgresServer, find_binaries

    binaries = find_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    server = PostgresServer(binaries)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_catalogue_outage_is_a_503_and_the_app_recovers_without_a_restart(own_postgres, tiny_settings,
                                                                             small_catalogue, tmp_path):
    settings = replace(tiny_settings, db_url=own_postgres.new_database(), api_key="s3cret")
    VisualSearch(settings).index(small_catalogue)
    client = create_app({"TESTING": True}, settings=settings).test_client()
    photo = small_catalogue.parent / "img" / "p3-0.png"
    assert client.post("/api/v1/search", data=upload(photo, top_k="3")).get_json()["results"][0]["sku"] == "P3"

    own_postgres.halt()
    try:
        for response in (client.post("/api/v1/search", data=upload(photo, top_k="3")),
                         client.get("/api/v1/products/P3"),
                         client.get("/api/v1/products/P3/similar"),
                         client.delete("/api/v1/products/P3", headers=AUTH),
                         client.put("/api/v1/products/NEW", headers=AUTH, data={
                             "title": "New", "image": [(io.BytesIO(make_image(tmp_path / "n.png", 5).read_bytes()),
                                                        "n.png")]})):
            assert response.status_code == 503, response.get_data(as_text=True)
            error = response.get_json()["error"]
            assert error["code"] == "storage_unavailable" and "PostgreSQL" in error["message"], error
        health = client.get("/api/v1/health")
        assert health.status_code == 503 and health.get_json()["error"]["code"] == "storage_unavailable"
    finally:
        own_postgres.resume()

    # The same app, the same pools: stale connections are replaced on first use.
    assert client.post("/api/v1/search", data=upload(photo, top_k="3")).get_json()["results"][0]["sku"] == "P3"
    assert client.get("/api/v1/products/P3").status_code == 200  # the DELETE changed nothing
    assert client.get("/api/v1/products/NEW").status_code == 404  # nor the PUT
    assert client.get("/api/v1/health").status_code == 200
