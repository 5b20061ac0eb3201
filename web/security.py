"""Security headers on every response, and the rules for what pages may link to or serve."""

from __future__ import annotations

from flask import Flask

# No inline script or style anywhere in the pages: scripts and styles come from
# /static only. Photos the shopper picks are previewed through blob: URLs. Catalogue
# images indexed from http(s) URLs are shown from there (/images/<id> redirects), so
# img-src allows http(s) images; an image can run no script.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data: https: http:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}
LINK_SCHEMES = ("http://", "https://")


def is_web_link(url: str | None) -> bool:
    """Only http(s) product links are ever rendered (never javascript:, data:, ...)."""
    return bool(url) and url.strip().lower().startswith(LINK_SCHEMES)


def register(app: Flask) -> None:
    @app.after_request
    def _security_headers(response):
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    app.jinja_env.tests["web_link"] = is_web_link
