"""The Flask web app: the "find similar" pages and the REST API under /api/v1."""

from __future__ import annotations

from typing import Any, Mapping

from flask import Flask

from visualsearch.settings import Settings


def create_app(test_config: Mapping[str, Any] | None = None, *, settings: Settings | None = None) -> Flask:
    """Build the app. Configuration comes from ``VISUALSEARCH_*`` variables (or ``settings``);
    ``test_config`` overrides Flask config keys in tests."""
    app = Flask(__name__)
    settings = settings or Settings.from_env()
    app.config.from_mapping(
        VISUALSEARCH_SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.max_upload_size,
        # A search sends the photo, six parameters and one field per attribute filter; a
        # product PUT its fields and images. Each file part of a large request holds a
        # temporary file open until the request ends, so 100 (not Flask's 1,000) also
        # keeps a worker well inside the usual limit of 1,024 file descriptors.
        MAX_FORM_PARTS=100,
        # Longest non-file field in bytes (file parts are not bound by it). The longest real
        # one is a product PUT's attributes JSON. Werkzeug reads 64 KiB at a time and also
        # applies this to its read buffer, so the limit must stay well above 64 KiB.
        MAX_FORM_MEMORY_SIZE=128 * 1024,
    )
    # Responses keep the documented key order (sku, title, ..., score, attributes); Flask 3
    # ignores the old JSON_SORT_KEYS setting.
    app.json.sort_keys = False
    if test_config:
        app.config.update(test_config)

    from visualsearch.vectors import configure_threads

    from . import api, cors, errors, metrics, pages, security, writes

    configure_threads(serving=True)

    errors.register(app)
    security.register(app)
    cors.register(app)
    metrics.register(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(writes.bp)
    app.register_blueprint(pages.bp)
    return app
