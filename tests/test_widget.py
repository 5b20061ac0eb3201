"""The storefront widget in a real browser: a shop's page on one origin, the app on another."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from playwright.sync_api import expect

from benchmarks.demo_retrieval import DEMO_MANIFEST, shopper_photo
from web import create_app

from .browsers import BROWSER_TEST, chromium, serve

pytestmark = BROWSER_TEST

SKU = "saleor-black-hoodie"
SHOP_JS = """document.getElementById("add").addEventListener("click", () => {
  const basket = document.getElementById("basket");
  basket.textContent = String(Number(basket.textContent) + 1);
});"""


def shop_page(app: str) -> str:
    """A shop's product page with the copy-paste snippet from the README."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>The shop</title>
<script src="{app}/widget.js" defer></script><script src="/shop.js" defer></script></head>
<body><h1>Black hoodie</h1><button id="add">Add to basket</button> <span id="basket">0</span>
<div id="similar" data-visualsearch-similar="{SKU}" data-top-k="4"></div>
<div id="search" data-visualsearch-search></div></body></html>"""


class Shop:
    """A plain static site on its own origin, under a strict CSP that allows the app's origin."""

    def __init__(self):
        self.pages: dict[str, str] = {}
        self.app_origins: list[str] = []

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/shop.js":
            body, content_type = SHOP_JS, "text/javascript"
        elif path in self.pages:
            body, content_type = self.pages[path], "text/html; charset=utf-8"
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        apps = " ".join(self.app_origins)
        # No 'unsafe-inline' styles: the widget must style itself without them.
        csp = (f"default-src 'self'; script-src 'self' {apps}; connect-src 'self' {apps}; "
               f"img-src 'self' {apps}; style-src 'self'")
        start_response("200 OK", [("Content-Type", content_type), ("Content-Security-Policy", csp)])
        return [body.encode()]


@pytest.fixture(scope="module")
def sites(demo_settings):
    """The shop, the app with CORS for the shop, and the app with CORS off: one each per module."""
    shop = Shop()
    with serve(shop) as shop_origin:
        cors_on = create_app(settings=replace(demo_settings, cors_origins=(shop_origin,)))
        cors_off = create_app(settings=replace(demo_settings, cors_origins=()))
        with serve(cors_on) as app, serve(cors_off) as app_off:
            shop.app_origins += [app, app_off]
            shop.pages.update({"/": shop_page(app), "/cors-off": shop_page(app_off)})
            yield {"shop": shop_origin, "app": app, "app_off": app_off}


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.problems = []  # uncaught errors and CSP violations on the shop's page
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.on("console", lambda message: page.problems.append(message.text)
            if "Content Security Policy" in message.text else None)
    yield page
    context.close()


def test_similar_products_render_on_the_shop_page(page, sites):
    page.goto(sites["shop"] + "/")
    cards = page.locator("#similar .card")
    expect(cards).to_have_count(4, timeout=30_000)
    titles = cards.locator(".title").all_inner_texts()
    assert {"Blue Hoodie", "Mustard Hoodie", "White Hoodie"} <= set(titles)
    assert page.locator("#similar .heading").inner_text() == "Visually similar"
    # Demo products have no shop url: cards link to the app's product page, images come from the app.
    first = cards.first
    assert first.get_attribute("href").startswith(sites["app"] + "/products/saleor-")
    assert first.locator("img").get_attribute("src").startswith(sites["app"] + "/images/")
    expect(first.locator("img")).to_have_js_property("complete", True)
    assert first.locator("img").evaluate("img => img.naturalWidth") > 0
    # The shadow root's stylesheet applies under the shop's CSP, and does not leak into the shop.
    assert page.locator("#similar .grid").evaluate("grid => getComputedStyle(grid).display") == "grid"
    assert page.locator("#add").evaluate("b => getComputedStyle(b).borderRadius") != "6px"
    assert page.problems == []


def test_search_by_photo_on_the_shop_page(page, sites, tmp_path):
    photo = tmp_path / "hoodie.jpg"
    photo.write_bytes(shopper_photo(DEMO_MANIFEST.parent / "images" / "saleor-white-hoodie-1.jpg",
                                    random.Random(3)))
    page.goto(sites["shop"] + "/")
    button = page.locator("#search button")
    assert button.inner_text() == "Search by photo"
    assert page.locator("#search input[type=file]").get_attribute("capture") is None  # camera or gallery
    with page.expect_file_chooser() as chooser:
        button.click()
    chooser.value.set_files(str(photo))
    cards = page.locator("#search .card")
    expect(cards).to_have_count(6, timeout=30_000)
    assert cards.first.locator(".title").inner_text() == "White Hoodie"
    assert page.problems == []


def test_without_cors_the_widget_says_so_and_the_shop_keeps_working(page, sites):
    page.goto(sites["shop"] + "/cors-off")
    status = page.locator("#similar .status.error")
    expect(status).to_have_text("Visual search is unavailable right now.", timeout=30_000)
    assert page.locator("#similar .card").count() == 0

    with page.expect_file_chooser() as chooser:
        page.locator("#search button").click()
    chooser.value.set_files(str(DEMO_MANIFEST.parent / "images" / "saleor-red-wine-1.jpg"))
    expect(page.locator("#search .status.error")).to_have_text("Visual search is unavailable right now.",
                                                               timeout=30_000)
    assert page.locator("#search .card").count() == 0
    expect(page.locator("#search button")).to_be_enabled()  # the shopper may try again

    page.locator("#add").click()
    expect(page.locator("#basket")).to_have_text("1")
    assert page.problems == []  # the failed fetch is the widget's to handle, not an uncaught error


def test_api_data_is_shown_as_text_and_only_web_links_are_followed(page, sites):
    hostile = '<img src=x onerror="window.pwned=1">'
    hits = [{"sku": "a/b?c", "title": hostile, "category": None, "brand": None, "price": 9.5,
             "url": "javascript:window.pwned=1", "image_url": "/images/1", "score": 0.9},
            {"sku": "B", "title": "Fine", "category": None, "brand": None, "price": None,
             "url": "https://shop.example/b", "image_url": "/images/2", "score": 0.8}]
    page.route(f"{sites['app']}/api/v1/products/*/similar*", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps({"results": hits, "took_ms": {}}),
        headers={"Access-Control-Allow-Origin": sites["shop"]}))
    page.goto(sites["shop"] + "/")
    cards = page.locator("#similar .card")
    expect(cards).to_have_count(2, timeout=30_000)
    assert cards.first.locator(".title").inner_text() == hostile
    assert cards.first.locator(".price").inner_text() == "9.50"
    assert cards.first.get_attribute("href") == sites["app"] + "/products/a%2Fb%3Fc"
    assert cards.nth(1).get_attribute("href") == "https://shop.example/b"
    assert cards.nth(1).locator(".price").count() == 0
    assert page.locator("#similar img").count() == 2  # the title's <img> stayed text
    assert page.evaluate("window.pwned") is None
    assert page.problems == []


def test_the_demo_page_runs_under_the_apps_own_csp(page, sites):
    page.goto(f"{sites['app']}/widget-demo?sku={SKU}")
    expect(page.locator("#demo-similar .card")).to_have_count(6, timeout=30_000)
    assert f'data-visualsearch-similar="{SKU}"' in page.locator("#snippet").inner_text()
    assert f'{sites["app"]}/widget.js' in page.locator("#snippet").inner_text()
    assert page.problems == []
