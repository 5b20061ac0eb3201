"""The upload page on a phone (touch, 390x844): take a photo or choose one from the gallery."""

from __future__ import annotations

import random

import pytest
from playwright.sync_api import expect

from benchmarks.demo_retrieval import DEMO_MANIFEST, shopper_photo
from web import create_app

from .browsers import BROWSER_TEST, chromium, serve

pytestmark = BROWSER_TEST

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 3}


@pytest.fixture(scope="module")
def live_server(demo_settings):
    with serve(create_app(settings=demo_settings)) as origin:
        yield origin


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def phone(browser):
    context = browser.new_context(**PHONE)
    yield context.new_page()
    context.close()


def test_a_phone_offers_the_camera_and_the_gallery(phone, live_server, tmp_path):
    photo = tmp_path / "IMG_0001.jpg"
    photo.write_bytes(shopper_photo(DEMO_MANIFEST.parent / "images" / "saleor-yellow-plimsolls-1.jpg",
                                    random.Random(5)))
    phone.goto(live_server + "/")
    camera, gallery = phone.get_by_text("Take a photo"), phone.get_by_text("Choose a photo")
    for control in (camera, gallery):
        expect(control).to_be_visible()
        box = control.bounding_box()
        assert box["height"] >= 44 and box["x"] >= 0 and box["x"] + box["width"] <= 390  # a thumb's target
    assert phone.locator("#camera").get_attribute("capture") == "environment"
    assert phone.locator("#file").get_attribute("capture") is None
    assert {phone.locator(i).get_attribute("accept") for i in ("#camera", "#file")} == {"image/*"}
    expect(phone.locator("#preview-wrap")).to_be_hidden()  # nothing to preview yet
    expect(phone.locator("#drop-hint")).to_be_hidden()  # no drag and drop, no Ctrl+V on a phone
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling

    # Tapping "Take a photo" opens the picker of the camera input.
    with phone.expect_file_chooser() as chooser:
        camera.tap()
    assert chooser.value.element.get_attribute("id") == "camera"

    # Tapping "Choose a photo" opens the gallery input's; the photo chosen there runs the search.
    with phone.expect_file_chooser() as chooser:
        gallery.tap()
    assert chooser.value.element.get_attribute("id") == "file"
    chooser.value.set_files(str(photo))
    first = phone.locator("#results .card").first
    expect(first).to_be_visible(timeout=30_000)
    assert "Plimsolls" in first.locator(".title").inner_text()
    expect(phone.locator("#status")).to_contain_text("10 similar products in")


def test_a_desktop_offers_drop_paste_and_a_file_picker(browser, live_server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(live_server + "/")
    expect(page.locator("#drop-hint")).to_contain_text("Drop a photo here or paste one")
    expect(page.get_by_text("Choose a photo")).to_be_visible()
    expect(page.get_by_text("Take a photo")).to_be_hidden()  # capture means nothing on a desktop
    context.close()
