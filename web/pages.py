"""HTML pages: the upload "find similar" page, product pages, and catalogue image files."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, abort, render_template, send_file
from sqlalchemy import select

from visualsearch.catalogue import ImageStatus, Product
from visualsearch.catalogue.store import get_image, get_product
from visualsearch.errors import InvalidRequestError, ProductNotFoundError
from visualsearch.search import similar_products

from .engine import get_engine

bp = Blueprint("pages", __name__)

SIMILAR_ON_PRODUCT_PAGE = 12


@bp.get("/")
def index():
    with get_engine().sessions() as session:
        categories = session.scalars(
            select(Product.category).distinct().where(Product.category.is_not(None)).order_by(Product.category)
        ).all()
        brands = session.scalars(
            select(Product.brand).distinct().where(Product.brand.is_not(None)).order_by(Product.brand)
        ).all()
    return render_template("index.html", categories=categories, brands=brands)


@bp.get("/products/<path:sku>")
def product(sku: str):
    engine = get_engine()
    with engine.sessions() as session:
        try:
            item = get_product(session, sku)
        except ProductNotFoundError:
            abort(404)
        images = [image for image in item.images if image.status == ImageStatus.INDEXED]
    try:
        similar = similar_products(engine, sku, top_k=SIMILAR_ON_PRODUCT_PAGE).hits
    except InvalidRequestError:  # no indexed image yet
        similar = []
    return render_template("product.html", product=item, images=images, similar=similar)


MAX_IMAGE_ID = 2**63 - 1  # SQL integers; a larger id cannot exist


@bp.get("/images/<int:image_id>")
def image(image_id: int):
    if image_id > MAX_IMAGE_ID:
        abort(404)
    with get_engine().sessions() as session:
        row = get_image(session, image_id)
    # The id, not a path, comes from the URL, and only files that were decoded and
    # indexed as images are served: a manifest row naming /etc/passwd stays "failed".
    if row is None or row.status != ImageStatus.INDEXED or not Path(row.path).is_file():
        abort(404)
    return send_file(row.path, max_age=3600, conditional=True)
