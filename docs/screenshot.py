"""Regenerate docs/screenshot.png: the results page for a shopper photo of the demo catalogue.

    .venv/bin/python docs/screenshot.py   (needs Debian's chromium; indexes data/demo in a temp dir)
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
from pathlib import Path

from werkzeug.serving import make_server

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.demo_retrieval import DEMO_MANIFEST, shopper_photo  # noqa: E402
from visualsearch.service import VisualSearch  # noqa: E402
from visualsearch.settings import Settings  # noqa: E402
from web import create_app  # noqa: E402


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=Path(folder) / "data", workers=0)
        VisualSearch(settings).index(DEMO_MANIFEST)
        photo = Path(folder) / "snapshot.jpg"
        photo.write_bytes(shopper_photo(DEMO_MANIFEST.parent / "images" / "saleor-white-plimsolls-2.jpg",
                                        random.Random(7)))
        server = make_server("127.0.0.1", 0, create_app(settings=settings), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            page.set_input_files("#file", str(photo))
            page.locator("#results .card").nth(9).wait_for()
            page.wait_for_function("[...document.images].every(i => i.complete)")
            page.screenshot(path=str(REPO / "docs" / "screenshot.png"), full_page=True)
            browser.close()
        server.shutdown()


if __name__ == "__main__":
    main()
