"""The app's one library object, opened on first use and shared by the request threads.

Each request gets a view of it pinned to one vector generation: when ``visualsearch
reembed`` switches to another backbone, the new CNN and vectors load in the background
while requests go on answering from the old pair, and no request mixes the two.
"""

from __future__ import annotations

import threading

from flask import current_app, g

from visualsearch.service import VisualSearch

_lock = threading.Lock()


def get_search() -> VisualSearch:
    """The data directory this app serves (its catalogue must exist: serving never creates one),
    pinned for this request to the vector generation answering when it began."""
    view = g.get("visualsearch")
    if view is None:
        shared = _shared()
        # A cheap check (at most one catalogue read a second) for a re-embedding's switch.
        shared.follow_generation(max_age=1.0)
        view = g.visualsearch = shared.pinned()
    return view


def _shared() -> VisualSearch:
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
                # The ANN lists and re-rank codes: cached from the start, not query by query.
                vs.warm_page_cache_in_background()
    return vs
