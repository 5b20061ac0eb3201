"""Pages and API under hostile catalogue data: security headers, escaped fields, no
javascript: links, catalogue files served by their decoded type, never as HTML."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from visualsearch.service import VisualSearch
from web import create_app
from web.security import HEADERS

from .conftest import make_image, write_catalogue

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def hostile(tiny_settings, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    make_image(folder / "plain.png", seed=1)
    # A real PNG whose name says HTML: a browser must never get it as HTML.
    (folder / "page.html").write_bytes(make_image(folder / "page.png", seed=2, size=40).read_bytes())
    rows = [
        {"sku": "EVIL<1>", "image": "plain.png", "title": HOSTILE, "category": HOSTILE, "brand": HOSTILE,
         "url": "javascript:alert(1)", "note": HOSTILE},
        {"sku": "HTML", "image": "page.html", "title": "named .html", "url": "https://shop.example/html"},
    ]
    settings = replace(tiny_settings, api_key="k")
    VisualSearch(settings).index(write_catalogue(folder, rows))
    return create_app({"TESTING": True}, settings=settings).test_client(), folder


def test_every_response_carries_the_security_headers(hostile):
    client, folder = hostile
    responses = [client.get("/"), client.get("/products/HTML"), client.get("/api/v1/health"),
                 client.get("/static/search.js"), client.get("/api/v1/products/nope"),
                 client.post("/api/v1/search", data={"image": (io.BytesIO((folder / "plain.png").read_bytes()),
                                                                "q.png")})]
    for response in responses:
        for name, value in HEADERS.items():
            assert response.headers.get(name) == value, (response.request.path, name)
        response.close()
    csp = HEADERS["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp


def test_pages_have_no_inline_script_or_style(hostile):
    client, _ = hostile
    for path in ("/", "/products/HTML"):
        html = client.get(path).get_data(as_text=True)
        assert "<script>" not in html and " style=" not in html and "<style" not in html
        assert '<img src=x onerror' not in html  # present only escaped


def test_hostile_fields_are_escaped_and_script_links_dropped(hostile):
    client, _ = hostile
    page = client.get("/products/EVIL%3C1%3E")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert HOSTILE not in html and "&lt;script&gt;" in html
    assert "javascript:" not in html and "View in the shop" not in html
    assert "View in the shop" in client.get("/products/HTML").get_data(as_text=True)  # http(s) links stay
    index = client.get("/").get_data(as_text=True)
    assert HOSTILE not in index  # the category and brand lists


def test_a_catalogue_file_named_html_is_served_as_the_image_it_is(hostile):
    client, _ = hostile
    product = client.get("/api/v1/products/HTML").get_json()
    response = client.get(product["images"][0]["image_url"])
    assert response.status_code == 200
    assert response.mimetype == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    response.close()


def test_a_put_with_a_script_url_is_refused(hostile):
    client, _ = hostile
    auth = {"Authorization": "Bearer k"}
    for url in ("javascript:alert(1)", "data:text/html,<b>x</b>", "  JaVaScRiPt:alert(1)", "ftp://x/y"):
        response = client.put("/api/v1/products/NEW", json={"title": "t", "url": url}, headers=auth)
        assert response.status_code == 400 and "http" in response.get_json()["error"]["message"]
    assert client.put("/api/v1/products/NEW", json={"url": "https://shop.example/new"}, headers=auth).status_code == 201
