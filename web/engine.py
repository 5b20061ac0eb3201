"""Per-process engines, opened on first use and shared by the request threads."""

from __future__ import annotations

import threading
from typing import Callable

from flask import current_app

from visualsearch.engine import Engine

_lock = threading.Lock()


def _shared(key: str, open_engine: Callable[[], Engine]) -> Engine:
    engine = current_app.extensions.get(key)
    if engine is None:
        with _lock:  # two first requests at once must not load the CNN twice
            engine = current_app.extensions.get(key)
            if engine is None:
                engine = current_app.extensions[key] = open_engine()
    return engine


def get_engine() -> Engine:
    """The read-only engine of searches and pages (memory-mapped index)."""
    return _shared("visualsearch", lambda: Engine(current_app.config["VISUALSEARCH_SETTINGS"], read_only=True))


def get_writer_engine() -> Engine:
    """The engine of the write endpoints; it shares the reader's CNN when that is loaded."""

    def open_writer() -> Engine:
        reader = current_app.extensions.get("visualsearch")
        return Engine(current_app.config["VISUALSEARCH_SETTINGS"],
                      embedder=reader.embedder if reader is not None else None)

    return _shared("visualsearch-writer", open_writer)
