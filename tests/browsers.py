"""Shared by the widget and phone browser tests: Debian's Chromium and live servers."""

from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest
from werkzeug.serving import make_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As tests/test_browser.py: Playwright's own browser download cannot work offline.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
BROWSER_TEST = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (.ci/run installs it)"),
]


@contextmanager
def chromium() -> Iterator:
    """A headless system Chromium for a module's tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def closing_responses(app):
    """``app``, with each response closed however its sending ends. A browser that drops a
    connection mid-image (a results grid re-rendered while its thumbnails load) makes
    werkzeug's development server skip the response's ``close()``: the image file it was
    sending then stays open until collected, a ResourceWarning that the suite's
    warnings-as-errors turns into a failure of whichever test runs then."""

    def wrapped(environ, start_response):
        response = app(environ, start_response)
        try:
            yield from response
        finally:
            close = getattr(response, "close", None)
            if close is not None:
                close()

    return wrapped


@contextmanager
def serve(app) -> Iterator[str]:
    """Serve a WSGI app on a free local port; yields its origin (``http://127.0.0.1:PORT``)."""
    server = make_server("127.0.0.1", 0, closing_responses(app), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
