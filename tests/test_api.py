"""REST API: search by upload, similar, product, health, metrics, and JSON errors for bad input."""

from __future__ import annotations

import csv
import io
import re
import threading

import pytest
from PIL import Image
from werkzeug.serving import make_server

from visualsearch.results import RemoveResult
from visualsearch.service import VisualSearch
from web import create_app

from .conftest import TINY, make_image, write_catalogue


@pytest.fixture
def app(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    return create_app({"TESTING": True}, settings=tiny_settings)


@pytest.fixture
def client(app):
    return app.test_client()


def upload(path, **fields):
    data = {"image": (io.BytesIO(path.read_bytes()), path.name)}
    data.update(fields)
    return data


def test_search_returns_products_best_first(client, small_catalogue):
    response = client.post("/api/v1/search", data=upload(small_catalogue.parent / "img" / "p2-1.png", top_k="4"))
    assert response.status_code == 200
    body = response.get_json()
    assert [r["sku"] for r in body["results"]][0] == "P2" and len(body["results"]) == 4
    first = body["results"][0]
    assert list(first) == ["sku", "title", "category", "brand", "price", "url", "image_url", "score", "attributes"]
    assert first["attributes"] == {"colour": catalogue_rows(small_catalogue)["P2"]["colour"]}
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(body["took_ms"]) == {"decode", "embed", "search", "total"}
    with client.get(first["image_url"]) as image:
        assert image.status_code == 200 and image.mimetype == "image/png"


def test_the_app_starts_warming_the_page_cache_once_as_it_opens_the_data_directory(app, small_catalogue,
                                                                                    monkeypatch, caplog):
    """The first request opens the data directory and starts the warming thread (a small
    catalogue has no re-rank codes: it asks for nothing and logs no failure); later
    requests do not start it again."""
    threads = []
    real = VisualSearch.warm_page_cache_in_background
    monkeypatch.setattr(VisualSearch, "warm_page_cache_in_background", lambda self: threads.append(real(self)))
    client = app.test_client()
    for _ in range(3):
        response = client.post("/api/v1/search", data=upload(small_catalogue.parent / "img" / "p2-1.png"))
        assert response.status_code == 200
    assert len(threads) == 1 and threads[0].name == "visualsearch-warm-page-cache" and threads[0].daemon
    threads[0].join(timeout=30)
    assert not threads[0].is_alive()
    assert "did not warm" not in caplog.text


def test_filters_and_crop(client, small_catalogue):
    query = small_catalogue.parent / "img" / "p0-0.png"
    body = client.post("/api/v1/search", data=upload(query, category="hats", min_price="50")).get_json()
    assert {r["sku"] for r in body["results"]} == {"P5", "P8", "P11"}
    cropped = client.post("/api/v1/search", data=upload(query, crop="0,0,20,20", top_k="2"))
    assert cropped.status_code == 200 and len(cropped.get_json()["results"]) == 2


def catalogue_rows(manifest) -> dict[str, dict]:
    """The manifest's products by sku (two rows per product carry the same fields)."""
    with open(manifest, newline="") as handle:
        return {row["sku"]: row for row in csv.DictReader(handle)}


def test_several_categories_and_attribute_filters(client, small_catalogue):
    products = catalogue_rows(small_catalogue)
    query = small_catalogue.parent / "img" / "p0-0.png"

    def skus(**fields):
        response = client.post("/api/v1/search", data=upload(query, top_k="100", **fields))
        assert response.status_code == 200, response.get_json()
        return {hit["sku"] for hit in response.get_json()["results"]}

    hats_or_bags = {sku for sku, row in products.items() if row["category"] in ("hats", "bags")}
    assert len(hats_or_bags) == 8 and skus(category="hats|bags") == hats_or_bags
    assert skus(category="HATS | Bags") == hats_or_bags  # case-insensitive, spaces trimmed
    red = {sku for sku, row in products.items() if row["colour"] == "red"}
    assert 0 < len(red) < 12 and skus(colour="red") == red
    assert skus(colour="Red|BLUE") == set(products)
    red_shoes = {sku for sku in red if products[sku]["category"] == "shoes"}
    assert skus(colour="red", category="shoes") == red_shoes
    assert skus(colour="green") == set() and skus(material="leather") == set()
    # The same filters on "more like this".
    similar = client.get("/api/v1/products/P0/similar?top_k=100&colour=red&category=hats|bags").get_json()
    assert {hit["sku"] for hit in similar["results"]} == red & hats_or_bags - {"P0"}


def test_non_ascii_categories_match_case_insensitively(tiny_settings, tmp_path):
    folder = tmp_path / "unicode"
    (folder / "img").mkdir(parents=True)
    rows = []
    for number, category in enumerate(["Électronique", "Électronique", "Maison", "Straße"]):
        make_image(folder / "img" / f"u{number}.png", seed=500 + number)
        rows.append({"sku": f"U{number}", "image": f"img/u{number}.png", "category": category,
                     "matière": "Cuir" if number % 2 else "Bois"})
    VisualSearch(tiny_settings).index(write_catalogue(folder, rows))
    client = create_app({"TESTING": True}, settings=tiny_settings).test_client()
    query = folder / "img" / "u2.png"

    def skus(**fields):
        response = client.post("/api/v1/search", data=upload(query, **fields))
        assert response.status_code == 200, response.get_json()
        return {hit["sku"] for hit in response.get_json()["results"]}

    assert skus(category="électronique") == {"U0", "U1"}
    assert skus(category="ÉLECTRONIQUE|maison") == {"U0", "U1", "U2"}
    assert skus(category="STRASSE") == {"U3"}  # full Unicode casefolding, not lower()
    assert skus(category="electronique") == set()  # accents are not folded away
    assert skus(matière="cuir") == {"U1", "U3"}


def test_the_app_sees_writes_made_by_another_process(client, tiny_settings, small_catalogue, tmp_path):
    """An index or remove run from the CLI (another VisualSearch on the same data directory)
    shows in the running app's next request, with no restart."""
    query = small_catalogue.parent / "img" / "p3-0.png"
    assert client.post("/api/v1/search", data=upload(query, top_k="1")).get_json()["results"][0]["sku"] == "P3"
    other = VisualSearch(tiny_settings)
    assert other.remove(["P3", "NOPE"]) == RemoveResult(removed=["P3"], unknown=["NOPE"])
    (tmp_path / "late").mkdir()
    photo = make_image(tmp_path / "late" / "late.png", seed=777)
    other.index(write_catalogue(tmp_path / "late", [{"sku": "LATE", "image": "late.png", "category": "hats"}]))
    hits = client.post("/api/v1/search", data=upload(query, top_k="100")).get_json()["results"]
    assert "P3" not in {hit["sku"] for hit in hits} and len(hits) == 12
    assert client.get("/api/v1/products/P3").status_code == 404
    assert client.post("/api/v1/search", data=upload(photo, top_k="1")).get_json()["results"][0]["sku"] == "LATE"
    health = client.get("/api/v1/health").get_json()
    assert health["products"] == 12 and health["indexed_images"] == 23 and health["index"]["vectors"] == 23
    # Compacting and rebuilding the index elsewhere changes no answer either.
    other.compact(force=True)
    other.rebuild_index()
    again = client.post("/api/v1/search", data=upload(query, top_k="100")).get_json()["results"]
    assert [hit["sku"] for hit in again] == [hit["sku"] for hit in hits]
    assert client.get("/api/v1/health").get_json()["index"]["vectors"] == 23


@pytest.mark.parametrize("fields, code", [
    ({"top_k": "0"}, "bad_request"), ({"top_k": "101"}, "bad_request"), ({"top_k": "ten"}, "bad_request"),
    ({"min_price": "cheap"}, "bad_request"), ({"crop": "1,2,3"}, "bad_request"),
    ({"min_price": "9", "max_price": "1"}, "bad_request"), ({"crop": "5000,5000,10,10"}, "bad_request"),
])
def test_bad_parameters_are_400(client, small_catalogue, fields, code):
    response = client.post("/api/v1/search", data=upload(small_catalogue.parent / "img" / "p0-0.png", **fields))
    assert response.status_code == 400 and response.get_json()["error"]["code"] == code


def test_bad_uploads(client, app, tmp_path):
    before = client.get("/api/v1/health").get_json()
    assert client.post("/api/v1/search", data={}).status_code == 400
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    response = client.post("/api/v1/search", data=upload(text))
    assert response.status_code == 415 and response.get_json()["error"]["code"] == "unsupported_image"
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[:400])
    response = client.post("/api/v1/search", data=upload(truncated))
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "undecodable_image"
    app.config["MAX_CONTENT_LENGTH"] = 1000
    big = make_image(tmp_path / "big.png", seed=3, size=400)
    response = client.post("/api/v1/search", data=upload(big))
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "too_large"
    assert client.get("/api/v1/health").get_json() == before  # bad input changed nothing


def test_product_similar_health_metrics(client):
    product = client.get("/api/v1/products/P3").get_json()
    assert product["sku"] == "P3" and len(product["images"]) == 2 and product["attributes"]["colour"]
    similar = client.get("/api/v1/products/P3/similar?top_k=3").get_json()["results"]
    assert len(similar) == 3 and "P3" not in {r["sku"] for r in similar}
    missing = client.get("/api/v1/products/NOPE")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "product_not_found"
    assert client.get("/api/v1/products/NOPE/similar").status_code == 404
    assert client.get("/api/v1/products/P3/similar?top_k=x").status_code == 400
    health = client.get("/api/v1/health").get_json()
    assert health["status"] == "ok" and health["products"] == 12 and health["indexed_images"] == 24
    assert health["backbone"] == TINY
    assert health["index"]["vectors"] == 24 and health["index"]["type"]
    assert set(health) == {"status", "products", "indexed_images", "writable", "backbone", "recipe", "index"}
    assert health["writable"] is True
    assert set(health["index"]) == {"type", "vectors", "recall_at_10"}
    assert client.get("/api/v1/nothing-here").get_json()["error"]["code"] == "not_found"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "visualsearch_http_requests_total" in metrics


def test_pages_render(client):
    page = client.get("/")
    assert page.status_code == 200 and b'type="file"' in page.data and b"hats" in page.data
    product = client.get("/products/P3")
    assert product.status_code == 200 and b"Product 3" in product.data and b"More like this" in product.data
    assert client.get("/products/NOPE").status_code == 404


def test_over_a_real_http_server(app, small_catalogue):
    """The same search through a real socket and a real WSGI server."""
    import urllib.request
    import uuid

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        boundary = uuid.uuid4().hex
        image = (small_catalogue.parent / "img" / "p9-0.png").read_bytes()
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.server_port}/api/v1/search", data=body, method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            import json

            assert json.load(response)["results"][0]["sku"] == "P9"
    finally:
        server.shutdown()
        thread.join()


def test_openapi_describes_every_api_route(app, client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    described = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            served |= {(path, method) for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert described == served


def test_review_regressions(client, tiny_settings, tmp_path, small_catalogue):
    # A huge image id is a 404, not an SQL overflow.
    assert client.get("/images/99999999999999999999999").status_code == 404
    # A non-finite crop is a 400.
    query = small_catalogue.parent / "img" / "p0-0.png"
    assert client.post("/api/v1/search", data=upload(query, crop="inf,0,1,1")).status_code == 400
    # A manifest row naming a non-image file never makes it servable.
    folder = tmp_path / "evil"
    folder.mkdir()
    secret = folder / "secret.txt"
    secret.write_text("password")
    VisualSearch(tiny_settings).index(write_catalogue(folder, [
        {"sku": "EVIL", "image": str(secret)}, {"sku": "A/B-1", "image": str(query)}]))
    images = client.get("/api/v1/products/EVIL").get_json()["images"]
    assert images[0]["status"] == "failed"
    assert client.get(images[0]["image_url"]).status_code == 404
    # SKUs with a slash work in every route.
    assert client.get("/api/v1/products/A%2FB-1").get_json()["sku"] == "A/B-1"
    assert client.get("/api/v1/products/A%2FB-1/similar?top_k=2").status_code == 200
    assert client.get("/products/A%2FB-1").status_code == 200


def test_write_endpoints_are_forbidden_without_a_configured_key(client):
    for method in (client.put, client.delete):
        response = method("/api/v1/products/P1", json={"title": "x"})
        assert response.status_code == 403 and response.get_json()["error"]["code"] == "forbidden"


@pytest.fixture
def writer_client(tiny_settings, small_catalogue):
    from dataclasses import replace

    settings = replace(tiny_settings, api_key="s3cret")
    VisualSearch(settings).index(small_catalogue)
    return create_app({"TESTING": True}, settings=settings).test_client()


AUTH = {"Authorization": "Bearer s3cret"}


def test_put_and_delete_a_product(writer_client, small_catalogue, tmp_path):
    client = writer_client
    assert client.put("/api/v1/products/P1", json={"title": "x"}).status_code == 401
    assert client.put("/api/v1/products/P1", json={"title": "x"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    # Metadata-only update keeps the images.
    updated = client.put("/api/v1/products/P1", json={"title": "Renamed", "price": 5, "attributes": {"a": 1}},
                         headers=AUTH)
    assert updated.status_code == 200 and updated.get_json()["title"] == "Renamed"
    assert client.get("/api/v1/products/P1").get_json()["price"] == 5.0
    # A new product with an uploaded photo becomes searchable at once.
    photo = make_image(tmp_path / "new.png", seed=4242)
    created = client.put("/api/v1/products/NEW-1", headers=AUTH, data={
        "title": "New", "category": "hats", "image": (io.BytesIO(photo.read_bytes()), "new.png")})
    assert created.status_code == 201 and created.get_json()["indexing"]["embedded"] == 1
    hits = client.post("/api/v1/search", data=upload(photo, top_k="1")).get_json()["results"]
    assert hits[0]["sku"] == "NEW-1"
    health = client.get("/api/v1/health").get_json()
    assert health["products"] == 13 and health["indexed_images"] == 25 and health["index"]["vectors"] == 25
    # A bad upload is refused and changes nothing.
    before = client.get("/api/v1/health").get_json()
    bad = client.put("/api/v1/products/BAD", headers=AUTH, data={
        "title": "Bad", "image": (io.BytesIO(b"not an image"), "x.jpg")})
    assert bad.status_code == 415
    assert client.get("/api/v1/products/BAD").status_code == 404
    assert client.get("/api/v1/health").get_json() == before
    assert client.put("/api/v1/products/a/similar", json={}, headers=AUTH).status_code == 400
    for fields in ({"price": "free"}, {"price": "-1"}, {"colour": "red"}, {"attributes": "[1]"}):
        assert client.put("/api/v1/products/P2", headers=AUTH, data=fields).status_code == 400
    # Delete.
    assert client.delete("/api/v1/products/NEW-1", headers=AUTH).get_json() == {"removed": "NEW-1"}
    assert client.get("/api/v1/products/NEW-1").status_code == 404
    assert client.delete("/api/v1/products/NEW-1", headers=AUTH).status_code == 404
    health = client.get("/api/v1/health").get_json()
    assert health["products"] == 12 and health["indexed_images"] == 24 and health["index"]["vectors"] == 24
    hits = client.post("/api/v1/search", data=upload(photo, top_k="1")).get_json()["results"]
    assert hits[0]["sku"] != "NEW-1"


def test_serving_a_data_dir_that_was_never_indexed(tiny_settings, small_catalogue):
    client = create_app({"TESTING": True}, settings=tiny_settings).test_client()
    health = client.get("/api/v1/health")
    assert health.status_code == 503 and health.get_json()["error"]["code"]
    assert "visualsearch index" in health.get_json()["error"]["message"]
    query = small_catalogue.parent / "img" / "p0-0.png"
    assert client.post("/api/v1/search", data=upload(query)).status_code == 503
    assert client.get("/").status_code == 503
    assert not tiny_settings.data_dir.exists()  # serving never creates a catalogue
