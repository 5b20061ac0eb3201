"""CORS: only the configured origins, only the read API, with preflights; the widget's address."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from visualsearch.errors import ConfigurationError
from visualsearch.service import VisualSearch
from visualsearch.settings import Settings
from web import create_app
from web.cors import MAX_AGE_S

SHOP = "https://shop.example.com"
ACAO = "Access-Control-Allow-Origin"


@pytest.fixture
def indexed(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    return replace(tiny_settings, api_key="k")


def client_for(settings, origins):
    return create_app({"TESTING": True}, settings=replace(settings, cors_origins=origins)).test_client()


@pytest.fixture
def client(indexed):
    return client_for(indexed, (SHOP, "http://localhost:3000"))


def photo(small_catalogue):
    return {"image": (io.BytesIO((small_catalogue.parent / "img" / "p2-1.png").read_bytes()), "q.png")}


def read_calls(client, small_catalogue, origin):
    headers = {"Origin": origin}
    return [client.get("/api/v1/products/P1/similar?top_k=3", headers=headers),
            client.get("/api/v1/products/P1", headers=headers),
            client.get("/api/v1/health", headers=headers),
            client.get("/api/v1/openapi.json", headers=headers),
            client.post("/api/v1/search", data=photo(small_catalogue), headers=headers)]


def test_reads_from_a_listed_origin_get_its_origin_back(client, small_catalogue):
    for response in read_calls(client, small_catalogue, SHOP):
        assert response.status_code == 200, response.request.path
        assert response.headers[ACAO] == SHOP
        assert "Origin" in response.vary
        assert "Access-Control-Allow-Credentials" not in response.headers
    # Errors carry it too, so the widget can read the message.
    missing = client.get("/api/v1/products/nope/similar", headers={"Origin": "http://localhost:3000"})
    assert missing.status_code == 404 and missing.headers[ACAO] == "http://localhost:3000"


def test_other_origins_and_other_paths_get_no_cors_headers(client, small_catalogue):
    for response in read_calls(client, small_catalogue, "https://evil.example"):
        assert response.status_code == 200
        assert ACAO not in response.headers
        assert "Origin" in response.vary  # a cache must not reuse it for a listed origin
    for path in ("/", "/products/P1", "/metrics"):
        assert ACAO not in client.get(path, headers={"Origin": SHOP}).headers, path
    # Same scheme and host on another port, or http for https, is another origin.
    for origin in ("https://shop.example.com:8443", "http://shop.example.com", "null"):
        assert ACAO not in client.get("/api/v1/health", headers={"Origin": origin}).headers


def test_preflight_for_a_read_endpoint(client):
    response = client.options("/api/v1/search", headers={
        "Origin": SHOP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert response.status_code == 204
    assert response.headers[ACAO] == SHOP and "Origin" in response.vary
    assert response.headers["Access-Control-Allow-Methods"] == "POST"
    assert response.headers["Access-Control-Allow-Headers"] == "Content-Type"
    assert response.headers["Access-Control-Max-Age"] == str(MAX_AGE_S)
    similar = client.options("/api/v1/products/P1/similar", headers={
        "Origin": SHOP, "Access-Control-Request-Method": "GET"})
    assert similar.status_code == 204 and similar.headers["Access-Control-Allow-Methods"] == "GET, HEAD"


def test_preflights_that_are_refused(client):
    refused = [
        ("/api/v1/search", "https://evil.example", "POST"),  # an origin not listed
        ("/api/v1/products/P1", SHOP, "PUT"),  # write endpoints are never cross-origin
        ("/api/v1/products/P1", SHOP, "DELETE"),
        ("/api/v1/products/P1", SHOP, "PATCH"),
        ("/api/v1/products/P1/images/1", SHOP, "DELETE"),
        ("/api/v1/health", SHOP, "POST"),  # a method the endpoint does not answer
        ("/api/v1/nothing-here", SHOP, "GET"),
    ]
    for path, origin, method in refused:
        response = client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method})
        assert response.status_code in (200, 404), (path, method)
        assert not any(name.startswith("Access-Control-") for name in response.headers.keys()), (path, method)


def test_write_endpoints_never_answer_with_cors_headers(client):
    headers = {"Origin": SHOP, "Authorization": "Bearer k"}
    put = client.put("/api/v1/products/NEW", json={"title": "new"}, headers=headers)
    assert put.status_code == 201 and ACAO not in put.headers
    patch = client.patch("/api/v1/products/NEW", json={"title": "newer"}, headers=headers)
    assert patch.status_code == 200 and ACAO not in patch.headers
    delete = client.delete("/api/v1/products/NEW", headers=headers)
    assert delete.status_code == 200 and ACAO not in delete.headers


def test_off_by_default(indexed):
    assert Settings().cors_origins == ()
    client = create_app({"TESTING": True}, settings=indexed).test_client()
    response = client.get("/api/v1/health", headers={"Origin": SHOP})
    assert response.status_code == 200 and ACAO not in response.headers and "Origin" not in response.vary
    preflight = client.options("/api/v1/search", headers={"Origin": SHOP, "Access-Control-Request-Method": "POST"})
    assert ACAO not in preflight.headers


def test_any_origin(indexed):
    client = client_for(indexed, ("*",))
    response = client.get("/api/v1/health", headers={"Origin": "https://anyone.example"})
    assert response.headers[ACAO] == "*" and "Origin" not in response.vary
    assert ACAO not in client.put("/api/v1/products/X", json={}, headers={
        "Origin": "https://anyone.example", "Authorization": "Bearer k"}).headers


@pytest.mark.parametrize("text, origins", [
    ("", ()),
    (" https://Shop.Example.com/ , http://localhost:3000", ("https://shop.example.com", "http://localhost:3000")),
    ("https://shop.example.com:443,http://a.example:80,http://[::1]:8080",
     ("https://shop.example.com", "http://a.example", "http://[::1]:8080")),
    ("*", ("*",)),
])
def test_origins_setting(text, origins):
    assert Settings.from_env({"VISUALSEARCH_CORS_ORIGINS": text}).cors_origins == origins


@pytest.mark.parametrize("text", ["shop.example.com", "https://shop.example.com/path", "ftp://x.example",
                                  "https://*.example.com", "https://shop.example.com?x=1"])
def test_origins_setting_refuses_what_is_not_an_origin(text):
    with pytest.raises(ConfigurationError, match="VISUALSEARCH_CORS_ORIGINS"):
        Settings.from_env({"VISUALSEARCH_CORS_ORIGINS": text})


def test_the_widget_script_is_served_for_other_origins(indexed):
    client = create_app({"TESTING": True}, settings=indexed).test_client()
    with client.get("/widget.js") as response:
        assert response.status_code == 200
        assert response.content_type == "text/javascript; charset=utf-8"
        assert response.cache_control.public and response.cache_control.max_age == 3600
        assert response.headers[ACAO] == "*"  # public code: lets a shop pin it with SRI
        assert "document.currentScript" in response.get_data(as_text=True)
        etag = response.headers["ETag"]
    with client.get("/widget.js", headers={"If-None-Match": etag}) as again:
        assert again.status_code == 304
