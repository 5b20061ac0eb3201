"""Write endpoints: PUT and DELETE /api/v1/products/<sku>, behind a bearer key."""

from __future__ import annotations

import functools
import hmac
import json

from flask import Blueprint, current_app, jsonify, request

from visualsearch.catalogue_manifest import ProductRecord, parse_price
from visualsearch.images import load_image

from .api import product_json
from .errors import ApiError
from .library import get_search
from .security import is_web_link

bp = Blueprint("api_write", __name__, url_prefix="/api/v1")

TEXT_FIELDS = ("title", "category", "brand", "url")


def require_api_key(view):
    """403 while no key is configured; 401 unless ``Authorization: Bearer <key>`` matches."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        key = current_app.config["VISUALSEARCH_SETTINGS"].api_key
        if not key:
            raise ApiError(403, "forbidden", "write endpoints are disabled: set VISUALSEARCH_API_KEY")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <VISUALSEARCH_API_KEY>'")
        return view(*args, **kwargs)

    return wrapper


@bp.put("/products/<path:sku>")
@require_api_key
def put_product(sku: str):
    """Create or update a product: JSON metadata, or multipart metadata plus image files."""
    if sku.endswith("/similar"):  # GET would route it to the similar-products endpoint
        raise ApiError(400, "bad_request", "a sku may not end in '/similar'")
    vs = get_search()
    if request.is_json:
        fields, uploads = _json_fields(), []
    else:
        fields, uploads = request.form.to_dict(), request.files.getlist("image")
    record = _record(sku, fields)
    # Every upload is decoded before anything is stored: a bad file changes nothing.
    files = [upload.read() for upload in uploads]
    checked = [(data, _check_image(data, vs.settings.max_image_pixels)) for data in files]
    product, report, created = vs.put_product(record, uploads=checked)
    body = product_json(product)
    body["indexing"] = {"embedded": report.embedded, "reused": report.reused, "unchanged": report.unchanged,
                        "failures": [failure.message for failure in report.failures]}
    return jsonify(body), 201 if created else 200


@bp.delete("/products/<path:sku>")
@require_api_key
def delete_product(sku: str):
    result = get_search().remove([sku])
    if not result.removed:
        raise ApiError(404, "product_not_found", f"no product with sku {sku!r}")
    return jsonify({"removed": sku})


def _json_fields() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the JSON body must be an object of product fields")
    return body


def _record(sku: str, fields: dict) -> ProductRecord:
    record = ProductRecord(sku=sku)
    unknown = set(fields) - {*TEXT_FIELDS, "price", "attributes"}
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    for name in TEXT_FIELDS:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "bad_request", f"{name} must be a string")
        setattr(record, name, (value or "").strip() or None)
    if record.url is not None and not is_web_link(record.url):
        raise ApiError(400, "bad_request", "url must be an http:// or https:// address")
    try:
        record.price = parse_price(fields.get("price"))
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    attributes = fields.get("attributes")
    if isinstance(attributes, str):  # multipart: a JSON object in a form field
        try:
            attributes = json.loads(attributes)
        except ValueError:
            raise ApiError(400, "bad_request", "attributes must be a JSON object") from None
    if attributes is not None and not isinstance(attributes, dict):
        raise ApiError(400, "bad_request", "attributes must be a JSON object")
    record.attributes = attributes or {}
    return record


def _check_image(data: bytes, max_pixels: int) -> str:
    """Raises the library's typed image errors (-> 413/415/422); returns the format."""
    return load_image(data, max_pixels=max_pixels).info["format"]

