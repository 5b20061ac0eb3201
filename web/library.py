"""The app's one library object, opened on first use and shared by the request threads."""

from __future__ import annotations

import threading

from flask import current_app

from visualsearch.service import VisualSearch

_lock = threading.Lock()


def get_search() -> VisualSearch:
    """The data directory this app serves (its catalogue must exist: serving never creates one)."""
    vs = current_app.extensions.get("visualsearch")
    if vs is None:
        with _lock:  # two first requests at once must not load the CNN twice
            vs = current_app.extensions.get("visualsearch")
            if vs is None:
                vs = current_app.extensions["visualsearch"] = VisualSearch(
                    current_app.config["VISUALSEARCH_SETTINGS"], create=False)
                if vs.write_blocked is not None:
                    current_app.logger.warning("serving searches only, writes answer 503/507: %s",
                                               vs.write_blocked)
    return vs
