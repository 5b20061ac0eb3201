"""Stateless replicas: PostgreSQL + one Milvus server + two gunicorn processes on two ports,
each with a data directory of its own (holding nothing they share). A product written
through one is found, served and deleted through the other.

Milvus Lite opens a ``.db`` in one process only, so both replicas talk to one
``milvus-lite server`` (tests/milvus_server.py) over gRPC, as they would to a cluster.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from visualsearch.service import VisualSearch

from .conftest import make_image
from .milvus_server import milvus_server  # noqa: F401  (a fixture)
from .test_gunicorn import GUNICORN, Server, gunicorn

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not GUNICORN.exists(), reason="gunicorn is not installed (extra 'serve')")]

KEY = "replica-key"


def _request(server: Server, method: str, path: str, *, fields: dict | None = None,
             photo: Path | None = None) -> tuple[int, dict | bytes]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in (fields or {}).items():
        body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
    if photo is not None:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{photo.name}\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode() + photo.read_bytes() + b"\r\n"
    headers = {"Authorization": f"Bearer {KEY}"}
    if body:
        body += f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body or None, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, data, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        status, data, kind = error.code, error.read(), error.headers.get_content_type()
    return status, json.loads(data) if kind == "application/json" else data


def _search(server: Server, photo: Path) -> list[str]:
    status, body = _request(server, "POST", "/api/v1/search", fields={"top_k": "5"}, photo=photo)
    assert status == 200, body
    return [hit["sku"] for hit in body["results"]]


def test_a_write_through_one_replica_is_seen_through_the_other(tmp_path, tiny_settings, small_catalogue,
                                                               postgres_url, milvus_server):  # noqa: F811
    shared_uploads = tmp_path / "shared-uploads"
    settings = replace(tiny_settings, db_url=postgres_url, vector_store=f"{milvus_server}/products",
                       uploads=str(shared_uploads), api_key=KEY)
    VisualSearch(settings).index(small_catalogue)  # the batch run, before the replicas start
    environment = {"VISUALSEARCH_DB_URL": postgres_url, "VISUALSEARCH_VECTOR_STORE": f"{milvus_server}/products",
                   "VISUALSEARCH_UPLOADS": str(shared_uploads), "VISUALSEARCH_API_KEY": KEY}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    photo = make_image(tmp_path / "new-product.png", seed=777)
    with gunicorn(tmp_path / "a", replace(settings, data_dir=tmp_path / "a" / "data"), **environment) as one, \
            gunicorn(tmp_path / "b", replace(settings, data_dir=tmp_path / "b" / "data"), **environment) as two:
        assert _search(two, small_catalogue.parent / "img" / "p3-0.png")[0] == "P3"  # the batch run's
        assert "NEW" not in _search(two, photo)

        status, created = _request(one, "PUT", "/api/v1/products/NEW", fields={"title": "Sent to A"}, photo=photo)
        assert status == 201, created
        image_id = created["images"][0]["id"]
        # B's very next search finds it, with A's catalogue fields, and serves its photo.
        assert _search(two, photo)[0] == "NEW"
        status, product = _request(two, "GET", "/api/v1/products/NEW")
        assert status == 200 and product["title"] == "Sent to A"
        status, served = _request(two, "GET", f"/images/{image_id}")
        assert status == 200 and served == photo.read_bytes()
        assert [path.read_bytes() for path in (shared_uploads / "uploads").iterdir()] == [photo.read_bytes()]

        # A write through B is seen by A: the product, its vector and its file are gone.
        assert _request(two, "DELETE", "/api/v1/products/NEW")[0] == 200
        assert "NEW" not in _search(one, photo)
        assert _request(one, "GET", "/api/v1/products/NEW")[0] == 404
        assert list((shared_uploads / "uploads").iterdir()) == []
    # Neither replica kept anything of the catalogue on its own disk.
    for replica in ("a", "b"):
        data = tmp_path / replica / "data"
        assert not (data / "catalogue.db").exists() and not (data / "uploads").exists()
