"""HTML pages: the upload "find similar" page, product pages, and catalogue image files."""

from __future__ import annotations

import io

from flask import Blueprint, abort, current_app, redirect, render_template, request, send_file, send_from_directory

from visualsearch.errors import InvalidRequestError, ProductNotFoundError

from .library import get_search
from .security import is_web_link

bp = Blueprint("pages", __name__)

SIMILAR_ON_PRODUCT_PAGE = 12
MAX_IMAGE_ID = 2**63 - 1  # SQL integers; a larger id cannot exist


@bp.get("/")
def index():
    facets = get_search().facets()
    return render_template("index.html", categories=facets.categories, brands=facets.brands)


WIDGET_MAX_AGE = 3600  # shops pick up a new widget within the hour; the ETag makes rechecks cheap


@bp.get("/widget.js")
def widget_script():
    """The storefront widget, at a fixed address for shops to include."""
    response = send_from_directory(current_app.static_folder, "widget.js", mimetype="text/javascript",
                                   max_age=WIDGET_MAX_AGE)
    # Public code: a shop may pin it with Subresource Integrity, which needs CORS.
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


@bp.get("/widget-demo")
def widget_demo():
    """The widget on a page of this app (same origin: no CORS needed), with its snippet."""
    return render_template("widget_demo.html", sku=request.args.get("sku", "").strip())


@bp.get("/products/<path:sku>")
def product(sku: str):
    vs = get_search()
    try:
        item = vs.product(sku)
    except ProductNotFoundError:
        abort(404)
    try:
        similar = vs.similar(sku, top_k=SIMILAR_ON_PRODUCT_PAGE).hits
    except InvalidRequestError:  # no indexed image yet
        similar = []
    return render_template("product.html", product=item, images=item.indexed_images, similar=similar)


@bp.get("/images/<int:image_id>")
def image(image_id: int):
    if image_id > MAX_IMAGE_ID:
        abort(404)
    vs = get_search()
    # An image fetched from an http(s) URL when it was indexed: the browser gets it there
    # (the CSP's img-src allows http(s) images; a redirect never makes it a page of ours).
    remote = vs.image_url(image_id)
    if remote is not None and is_web_link(remote):
        return redirect(remote, code=302)
    # The id, not a path, comes from the URL, and only files that were decoded and
    # indexed as images are served: a manifest row naming /etc/passwd stays "failed".
    source = vs.image_file(image_id)
    if isinstance(source, bytes):  # an upload kept in an object store
        source = io.BytesIO(source)
    mimetype = raster_type(source) if source is not None else None
    if mimetype is None:
        abort(404)
    if isinstance(source, io.BytesIO):
        source.seek(0)
    # The type comes from decoding the file, never from its name: a catalogue file named
    # .html or .svg is served as the raster image it is (or not at all).
    return send_file(source, mimetype=mimetype, max_age=3600, conditional=True)


RASTER_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heif",
                "AVIF": "image/avif"}


def raster_type(path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    from visualsearch.images import register_heif_opener

    register_heif_opener()
    try:
        with Image.open(path) as image:
            return RASTER_TYPES.get(image.format or "")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
