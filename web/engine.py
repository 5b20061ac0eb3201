"""One read-only engine per process, opened on first use and shared by request threads."""

from __future__ import annotations

import threading

from flask import current_app

from visualsearch.engine import Engine

_lock = threading.Lock()


def get_engine() -> Engine:
    engine = current_app.extensions.get("visualsearch")
    if engine is None:
        with _lock:
            engine = current_app.extensions.get("visualsearch")
            if engine is None:
                engine = Engine(current_app.config["VISUALSEARCH_SETTINGS"], read_only=True)
                current_app.extensions["visualsearch"] = engine
    return engine


def get_writer_engine() -> Engine:
    """The engine the write endpoints use; it shares the reader's loaded CNN."""
    writer = current_app.extensions.get("visualsearch-writer")
    if writer is None:
        with _lock:
            writer = current_app.extensions.get("visualsearch-writer")
            if writer is None:
                reader = current_app.extensions.get("visualsearch")
                writer = Engine(current_app.config["VISUALSEARCH_SETTINGS"],
                                embedder=reader.embedder if reader is not None else None)
                current_app.extensions["visualsearch-writer"] = writer
    return writer
