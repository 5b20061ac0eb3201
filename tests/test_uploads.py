"""Kept uploads in a shared location (VISUALSEARCH_UPLOADS): a directory every replica
mounts, or an fsspec URL; the default stays DATA_DIR/uploads."""

from __future__ import annotations

import io
import os
import time
from dataclasses import replace

import pytest

from visualsearch import indexing
from visualsearch.service import VisualSearch
from visualsearch.uploads import SHARED_LEFTOVER_SECONDS, UploadFolder, is_fsspec_url, read_file_url
from web import create_app

from .conftest import make_image
from .test_api import upload

AUTH = {"Authorization": "Bearer s3cret"}


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket/prefix", True), ("file:///srv/shared", True), ("gs://b", True), ("simplecache::s3://b", False),
    ("/mnt/shared", False), ("relative/dir", False), ("https://cdn.example.com/x", False), ("http://x", False),
    ("C:\\data", False), ("", False),
])
def test_which_locations_are_fsspec_urls(text, expected):
    assert is_fsspec_url(text) is expected


def test_default_folder_is_in_the_data_directory(tmp_path):
    folder = UploadFolder(None, tmp_path)
    path = folder.keep(b"\x89PNG fake", "PNG")
    assert path == str(tmp_path.resolve() / "uploads" / (path.rsplit("/", 1)[1]))
    assert path.endswith(".png") and folder.owns(path)
    assert folder.keep(b"\x89PNG fake", "PNG") == path  # named by content: kept once
    assert not folder.owns(str(tmp_path / "elsewhere" / "x.png"))
    assert not folder.owns("file://" + path)
    folder.remove(path)
    assert not os.path.exists(path)
    with pytest.raises(ValueError):
        folder.remove("/etc/passwd")


def test_shared_directory_and_its_leftovers(tmp_path):
    shared = tmp_path / "nfs"
    folder = UploadFolder(str(shared), tmp_path / "data")
    path = folder.keep(b"GIF89a", "GIF")
    assert path.startswith(str(shared.resolve() / "uploads")) and folder.owns(path)
    # A half-written file may be a live writer's on another host: its pid means nothing
    # here, so only its age lets it go.
    fresh = shared / "uploads" / f".{'a' * 64}.png.x.{os.getpid() + 10**6}.tmp"
    old = shared / "uploads" / f".{'b' * 64}.png.y.1.tmp"
    fresh.write_bytes(b"x")
    old.write_bytes(b"y")
    stale = time.time() - SHARED_LEFTOVER_SECONDS - 60
    os.utime(old, (stale, stale))
    assert folder.collect_leftovers() == [old.name]
    assert fresh.exists() and not old.exists()


def test_fsspec_url_folder(tmp_path):
    url = (tmp_path / "bucket").as_uri()  # file:///...: fsspec's real code path, on this disk
    folder = UploadFolder(url, tmp_path / "data")
    kept = folder.keep(b"\xff\xd8\xff photo", "JPEG")
    assert kept.startswith(url + "/uploads/") and kept.endswith(".jpg") and folder.owns(kept)
    assert (tmp_path / "bucket" / "uploads" / kept.rsplit("/", 1)[1]).read_bytes() == b"\xff\xd8\xff photo"
    data, size, modified = read_file_url(kept)
    assert data == b"\xff\xd8\xff photo" and size == len(data) and modified is not None
    assert not folder.owns(url + "/uploads/sub/x.jpg") and not folder.owns(str(tmp_path / "x.jpg"))
    folder.remove(kept)
    folder.remove(kept)  # gone already is fine
    with pytest.raises(FileNotFoundError):
        read_file_url(kept)


@pytest.mark.parametrize("kind", ["directory", "fsspec-url"])
def test_two_replicas_share_kept_uploads(kind, tiny_settings, small_catalogue, tmp_path):
    """Two app instances with their own data directories but one catalogue and one
    uploads location: a photo PUT through one is served and deleted through the other."""
    location = str(tmp_path / "shared") if kind == "directory" else (tmp_path / "shared").as_uri()
    first = replace(tiny_settings, api_key="s3cret", uploads=location,
                    db_url=tiny_settings.catalogue_url)
    VisualSearch(first).index(small_catalogue)
    second = replace(first, data_dir=tmp_path / "replica")  # nothing of its own on disk
    one = create_app({"TESTING": True}, settings=first).test_client()
    two = create_app({"TESTING": True}, settings=second).test_client()

    photo = make_image(tmp_path / "photo.png", seed=4242)
    created = one.put("/api/v1/products/NEW", headers=AUTH,
                      data={"title": "New", "image": [(io.BytesIO(photo.read_bytes()), "photo.png")]})
    assert created.status_code == 201, created.get_json()
    image_id = created.get_json()["images"][0]["id"]
    kept = list((tmp_path / "shared" / "uploads").iterdir())
    assert [path.read_bytes() for path in kept] == [photo.read_bytes()]
    assert not (tmp_path / "replica" / "uploads").exists() and not (first.data_dir / "uploads").exists()

    with two.get(f"/images/{image_id}") as served:
        assert served.status_code == 200 and served.data == photo.read_bytes()
        assert served.mimetype == "image/png"
    # The first replica embedded it from the shared location: the second finds it.
    hit = one.post("/api/v1/search", data=upload(photo, top_k="1")).get_json()["results"][0]
    assert hit["sku"] == "NEW"

    assert two.delete("/api/v1/products/NEW", headers=AUTH).status_code == 200
    assert list((tmp_path / "shared" / "uploads").iterdir()) == []
    assert one.get(f"/images/{image_id}").status_code == 404


def test_a_field_change_never_downloads_the_kept_uploads_again(tiny_settings, small_catalogue, tmp_path,
                                                               monkeypatch):
    """Uploads in an object store are named by their content hash: a PUT or PATCH of the
    product's fields knows them unchanged from their names, without a request per photo."""
    settings = replace(tiny_settings, api_key="s3cret", uploads=(tmp_path / "bucket").as_uri())
    VisualSearch(settings).index(small_catalogue)
    client = create_app({"TESTING": True}, settings=settings).test_client()
    photo = make_image(tmp_path / "photo.png", seed=4343)
    created = client.put("/api/v1/products/NEW", headers=AUTH,
                         data={"image": [(io.BytesIO(photo.read_bytes()), "photo.png")]})
    assert created.status_code == 201 and created.get_json()["indexing"]["embedded"] == 1

    def no_download(url):
        raise AssertionError(f"{url} was read again")

    monkeypatch.setattr(indexing, "read_file_url", no_download)
    patched = client.patch("/api/v1/products/NEW", headers=AUTH, json={"title": "Renamed"})
    assert patched.status_code == 200, patched.get_json()
    assert patched.get_json()["indexing"]["unchanged"] == 1
    assert client.post("/api/v1/search", data=upload(photo, top_k="1")).get_json()["results"][0]["sku"] == "NEW"
