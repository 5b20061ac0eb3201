"""The upload page in a real browser (Debian's Chromium) against a real server and real weights."""

from __future__ import annotations

import random
import shutil

import pytest
from playwright.sync_api import expect

from benchmarks.demo_retrieval import DEMO_MANIFEST, shopper_photo
from web import create_app

from .browsers import serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright's own browser download cannot work offline: use the system Chromium.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
        ])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    yield context.new_page()
    context.close()


@pytest.fixture
def live_server(demo_settings):
    with serve(create_app(settings=demo_settings)) as origin:
        yield origin


def test_upload_a_photo_and_open_a_result(page, live_server, tmp_path):
    photo = tmp_path / "snapshot.jpg"
    photo.write_bytes(shopper_photo(DEMO_MANIFEST.parent / "images" / "saleor-white-plimsolls-2.jpg",
                                    random.Random(7)))
    page.goto(live_server + "/")
    page.set_input_files("#file", str(photo))
    first = page.locator("#results .card").first
    first.wait_for(timeout=30_000)
    assert page.locator("#results .card").count() == 10
    assert "Plimsolls" in first.locator(".title").inner_text()
    assert "similar products in" in page.locator("#status").inner_text()

    # Filtering by category re-runs the search with only that category.
    page.select_option("select[name=category]", "Paints")
    expect(page.locator("#status")).to_contain_text("5 similar", timeout=30_000)
    assert page.locator("#results .card").count() == 5

    # The price range narrows it further (every paint costs 15.00).
    page.fill("input[name=max_price]", "10")
    page.dispatch_event("input[name=max_price]", "change")
    expect(page.locator("#status")).to_contain_text("No products match", timeout=30_000)
    assert page.locator("#results .card").count() == 0
    page.fill("input[name=max_price]", "")
    page.dispatch_event("input[name=max_price]", "change")
    expect(page.locator("#status")).to_contain_text("5 similar", timeout=30_000)

    # Attribute filters: the demo products have no colour, so none is red; emptied, all come back.
    page.fill("#attribute-filters", "colour=red|blue")
    page.dispatch_event("#attribute-filters", "change")
    expect(page.locator("#status")).to_contain_text("No products match", timeout=30_000)
    page.fill("#attribute-filters", "")
    page.dispatch_event("#attribute-filters", "change")
    expect(page.locator("#status")).to_contain_text("5 similar", timeout=30_000)

    first = page.locator("#results .card").first
    first.click()
    page.wait_for_url("**/products/*")
    assert page.locator("h2", has_text="More like this").is_visible()


def test_the_filters_offer_the_catalogue_facets(page, live_server):
    page.goto(live_server + "/")
    categories = page.locator("select[name=category] option").all_inner_texts()
    assert categories == ["any", "Alcohol", "Footwear", "Homewares", "Hoodies", "Juices", "Paints",
                          "Polo Shirts", "T-shirts"]
    assert page.locator("select[name=brand] option").all_inner_texts() == ["any", "Saleor"]


def test_the_page_runs_under_its_content_security_policy(page, live_server):
    """Every script and style comes from /static: the CSP blocks nothing the page needs."""
    violations = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.goto(live_server + "/")
    page.set_input_files("#file", str(DEMO_MANIFEST.parent / "images" / "saleor-white-plimsolls-2.jpg"))
    expect(page.locator("#results .card").first).to_be_visible(timeout=30_000)  # preview, fetch, render
    assert violations == []


def test_a_non_image_shows_an_error(page, live_server, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    page.goto(live_server + "/")
    page.set_input_files("#file", str(text))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "not a supported image" in page.locator("#status").inner_text()
