"""Write semantics: PUT (absent kept, null clears, attributes replace), PATCH (attributes
merge), and DELETE of one image, through the real app and the tiny backbone."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from visualsearch.catalogue import store as catalogue
from visualsearch.catalogue_manifest import ProductRecord
from visualsearch.errors import ImageNotFoundError, ProductNotFoundError
from visualsearch.service import VisualSearch
from visualsearch.uploads import UPLOADS_DIR
from web import create_app

from .conftest import make_image
from .test_api import catalogue_rows, upload

AUTH = {"Authorization": "Bearer s3cret"}

# The catalogue's queries and triggers run on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.catalogue_databases("sqlite", "postgresql")


@pytest.fixture
def settings(tiny_settings):
    return replace(tiny_settings, api_key="s3cret")


@pytest.fixture
def client(settings, small_catalogue):
    VisualSearch(settings).index(small_catalogue)
    return create_app({"TESTING": True}, settings=settings).test_client()


def _found(client, query, **filters) -> set[str]:
    response = client.post("/api/v1/search", data=upload(query, top_k="100", **filters))
    assert response.status_code == 200, response.get_json()
    return {hit["sku"] for hit in response.get_json()["results"]}


def test_put_null_clears_fields_and_filters_see_it(client, small_catalogue):
    row = catalogue_rows(small_catalogue)["P3"]  # a shoe by Acme at 40
    query = small_catalogue.parent / "img" / "p3-0.png"
    assert "P3" in _found(client, query, category="shoes") & _found(client, query, brand="Acme")
    response = client.put("/api/v1/products/P3", headers=AUTH, json={
        "category": None, "brand": None, "price": None, "url": None, "attributes": {}})
    assert response.status_code == 200, response.get_json()
    body = client.get("/api/v1/products/P3").get_json()
    assert body["title"] == row["title"]  # left out: kept
    assert (body["category"], body["brand"], body["price"], body["url"], body["attributes"]) == (
        None, None, None, None, {})
    # The vector store's copies of the fields changed too: the old values find it no more.
    assert "P3" not in _found(client, query, category="shoes")
    assert "P3" not in _found(client, query, brand="Acme")
    assert "P3" not in _found(client, query, colour=row["colour"])
    assert "P3" not in _found(client, query, min_price="0")
    assert "P3" in _found(client, query)
    # A form can only say "clear" with an empty field.
    client.put("/api/v1/products/P4", headers=AUTH, data={"title": "", "price": " "})
    cleared = client.get("/api/v1/products/P4").get_json()
    assert cleared["title"] is None and cleared["price"] is None and cleared["category"] == "bags"


def test_a_field_left_out_is_kept(client, small_catalogue):
    before = client.get("/api/v1/products/P1").get_json()
    assert client.put("/api/v1/products/P1", headers=AUTH, json={"title": "Renamed"}).status_code == 200
    after = client.get("/api/v1/products/P1").get_json()
    assert after == {**before, "title": "Renamed"}


def test_put_replaces_attributes_and_patch_merges_them(client, small_catalogue):
    query = small_catalogue.parent / "img" / "p7-0.png"
    put = client.put("/api/v1/products/P7", headers=AUTH, json={"attributes": {"size": "M", "fit": "slim"}})
    assert put.status_code == 200 and put.get_json()["attributes"] == {"size": "M", "fit": "slim"}
    patch = client.patch("/api/v1/products/P7", headers=AUTH,
                         json={"attributes": {"size": None, "material": "wool"}, "brand": None, "price": 12})
    assert patch.status_code == 200, patch.get_json()
    body = patch.get_json()
    assert body["attributes"] == {"fit": "slim", "material": "wool"}
    assert body["brand"] is None and body["price"] == 12.0 and body["title"] == "Product 7"
    assert "P7" in _found(client, query, material="wool") and "P7" not in _found(client, query, size="M")
    assert "P7" not in _found(client, query, brand="Globex")
    # JSON Merge Patch's own media type; "attributes": null deletes them all.
    merged = client.patch("/api/v1/products/P7", headers={**AUTH, "Content-Type": "application/merge-patch+json"},
                          data='{"attributes": {"colour": "teal"}}')
    assert merged.get_json()["attributes"] == {"fit": "slim", "material": "wool", "colour": "teal"}
    assert client.patch("/api/v1/products/P7", headers=AUTH, json={"attributes": None}).get_json()["attributes"] == {}
    # PATCH never creates; bad fields are refused as in PUT.
    missing = client.patch("/api/v1/products/NOPE", headers=AUTH, json={"title": "x"})
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "product_not_found"
    assert client.get("/api/v1/products/NOPE").status_code == 404
    for fields in ({"price": "free"}, {"colour": "red"}, {"attributes": [1]}, {"title": 5}):
        assert client.patch("/api/v1/products/P7", headers=AUTH, json=fields).status_code == 400
    assert client.patch("/api/v1/products/P7", json={"title": "x"}).status_code == 401


def test_library_clear_and_replace(settings, small_catalogue):
    vs = VisualSearch(settings)
    vs.index(small_catalogue)
    vs.put_product(ProductRecord(sku="P2", clear=frozenset({"category"}), attributes={"a": 1},
                                 replace_attributes=True))
    product = vs.product("P2")
    assert product.category is None and product.attributes == {"a": 1} and product.brand == "Acme"
    with vs.sessions() as session:  # the store caught up: nothing is left stale
        assert catalogue.stale_products(session) == []
    # A manifest row keeps its semantics: it sets what it names and clears nothing.
    vs.index(small_catalogue)
    again = vs.product("P2")
    assert again.category == "hats" and again.attributes == {"a": 1, "colour": again.attributes["colour"]}


def _photo(tmp_path, name: str, seed: int):
    path = make_image(tmp_path / name, seed=seed)
    return path, (io.BytesIO(path.read_bytes()), name)


def test_delete_one_image(client, settings, tmp_path):
    front, front_file = _photo(tmp_path, "front.png", 9001)
    back, back_file = _photo(tmp_path, "back.png", 9002)
    created = client.put("/api/v1/products/NEW", headers=AUTH, data={"title": "New", "image": [front_file, back_file]})
    assert created.status_code == 201 and created.get_json()["indexing"]["embedded"] == 2
    images = created.get_json()["images"]
    front_id, back_id = (image["id"] for image in images)
    uploads = sorted((settings.data_dir / UPLOADS_DIR).iterdir())
    assert len(uploads) == 2
    # The same photo kept for another product too: its file stays while that one names it.
    client.put("/api/v1/products/OTHER", headers=AUTH, data={"image": [_photo(tmp_path, "same.png", 9002)[1]]})
    vectors = client.get("/api/v1/health").get_json()["index"]["vectors"]
    hit = client.post("/api/v1/search", data=upload(front, top_k="1")).get_json()["results"][0]
    assert hit["sku"] == "NEW" and hit["image_url"].endswith(f"/{front_id}")

    response = client.delete(f"/api/v1/products/NEW/images/{front_id}", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert [image["id"] for image in response.get_json()["images"]] == [back_id]
    assert response.get_json()["sku"] == "NEW" and response.get_json()["title"] == "New"
    assert client.get("/api/v1/health").get_json()["index"]["vectors"] == vectors - 1
    # Its vector is gone: the product now matches only through its other image.
    hits = client.post("/api/v1/search", data=upload(front, top_k="100")).get_json()["results"]
    assert all(not hit["image_url"].endswith(f"/{front_id}") for hit in hits)
    assert {hit["image_url"] for hit in hits if hit["sku"] == "NEW"} == {f"/images/{back_id}"}
    assert client.get(f"/images/{front_id}").status_code == 404
    left = sorted((settings.data_dir / UPLOADS_DIR).iterdir())
    assert len(left) == 1 and left[0].read_bytes() == back.read_bytes()
    # The back photo is OTHER's too: removing it from NEW keeps the file.
    assert client.delete(f"/api/v1/products/NEW/images/{back_id}", headers=AUTH).get_json()["images"] == []
    assert sorted((settings.data_dir / UPLOADS_DIR).iterdir()) == left
    assert client.get("/api/v1/products/NEW").status_code == 200  # the product stays

    for path, code in ((f"/api/v1/products/NEW/images/{front_id}", "image_not_found"),
                       (f"/api/v1/products/P1/images/{back_id}", "image_not_found"),
                       ("/api/v1/products/NOPE/images/1", "product_not_found"),
                       ("/api/v1/products/NEW/images/99999999999999999999999", "image_not_found")):
        missing = client.delete(path, headers=AUTH)
        assert missing.status_code == 404 and missing.get_json()["error"]["code"] == code, path
    assert client.delete("/api/v1/products/P1/images/1").status_code == 401
    # A SKU the image route would capture cannot be created.
    assert client.put("/api/v1/products/A/images/3", headers=AUTH, json={}).status_code == 400


def test_image_deletes_need_a_configured_key(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    client = create_app({"TESTING": True}, settings=tiny_settings).test_client()
    image_id = client.get("/api/v1/products/P1").get_json()["images"][0]["id"]
    for response in (client.delete(f"/api/v1/products/P1/images/{image_id}", headers=AUTH),
                     client.patch("/api/v1/products/P1", headers=AUTH, json={"title": "x"})):
        assert response.status_code == 403 and response.get_json()["error"]["code"] == "forbidden"
    assert len(client.get("/api/v1/products/P1").get_json()["images"]) == 2


def test_library_remove_image(settings, small_catalogue):
    vs = VisualSearch(settings)
    vs.index(small_catalogue)
    first, second = (image.id for image in vs.product("P5").images)
    product = vs.remove_image("P5", first)
    assert [image.id for image in product.images] == [second]
    assert vs.health()["index"]["vectors"] == 23 and vs.health()["indexed_images"] == 23
    with pytest.raises(ImageNotFoundError):
        vs.remove_image("P5", first)
    with pytest.raises(ImageNotFoundError):
        vs.remove_image("P6", second)  # not P6's
    with pytest.raises(ProductNotFoundError):
        vs.remove_image("NOPE", second)
    assert all(hit.image_id != first for hit in vs.similar("P5", top_k=100).hits)
