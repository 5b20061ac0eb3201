"""CORS for the read API, so that a shop's own pages (the storefront widget) may call it.

Only the origins in ``VISUALSEARCH_CORS_ORIGINS`` get CORS headers, and only on the read
endpoints. The write endpoints never do: they need the API key, and a key that a browser
on a shop's page could use is a key every visitor can read.
"""

from __future__ import annotations

from flask import Flask, current_app, request
from werkzeug.exceptions import HTTPException

# Endpoints a storefront may call from the browser, and the methods they answer.
READ_ENDPOINTS = frozenset({"api.search", "api.similar", "api.product", "api.health", "api.openapi"})
READ_METHODS = ("GET", "HEAD", "POST")
# Simple requests (GET, multipart POST) need no preflight; Content-Type is the one
# header a client may add that is not always CORS-safelisted. Authorization never is.
ALLOW_HEADERS = "Content-Type"
# Browsers cache a preflight for at most this long (Chromium caps it at 2 hours).
MAX_AGE_S = 3600


def allowed_origin(origin: str | None, allowed: tuple[str, ...]) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or ``None``."""
    if not origin or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin.lower() in allowed else None


def _read_endpoint(method: str) -> str | None:
    """The read endpoint this request's path routes to with ``method``, if any."""
    if method not in READ_METHODS:
        return None
    try:
        endpoint, _ = current_app.create_url_adapter(request).match(method=method)
    except HTTPException:  # no route, wrong method, or a redirect
        return None
    return endpoint if endpoint in READ_ENDPOINTS else None


def _preflight():
    """Answer a browser's OPTIONS preflight for a read endpoint; ``None`` lets Flask answer
    (with no CORS headers, so the browser refuses the call)."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    allowed = current_app.config["VISUALSEARCH_SETTINGS"].cors_origins
    value = allowed_origin(request.headers.get("Origin"), allowed)
    if value is None or not _read_endpoint(request.headers["Access-Control-Request-Method"].upper()):
        return None
    response = current_app.make_response(("", 204))
    response.headers["Access-Control-Allow-Origin"] = value
    response.headers["Access-Control-Allow-Methods"] = ", ".join(
        method for method in READ_METHODS if _read_endpoint(method))
    response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
    response.headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
    if value != "*":
        response.vary.add("Origin")
    return response


def _cors_headers(response):
    """CORS headers on a read endpoint's response (errors included, so a widget can read them)."""
    allowed = current_app.config["VISUALSEARCH_SETTINGS"].cors_origins
    rule = request.url_rule
    if not allowed or rule is None or rule.endpoint not in READ_ENDPOINTS or request.method not in READ_METHODS:
        return response
    if "*" not in allowed:
        # The answer depends on the Origin header: a shared cache must not hand one
        # origin's response (with or without the header) to another.
        response.vary.add("Origin")
    value = allowed_origin(request.headers.get("Origin"), allowed)
    if value is not None:
        response.headers["Access-Control-Allow-Origin"] = value
    return response


def register(app: Flask) -> None:
    """Install the preflight handler and the response hook (both idle while no origin is set)."""
    app.before_request(_preflight)
    app.after_request(_cors_headers)
