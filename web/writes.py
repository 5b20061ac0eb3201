"""Write endpoints behind a bearer key: PUT, PATCH and DELETE /api/v1/products/<sku>, and
DELETE /api/v1/products/<sku>/images/<id>.

Field semantics (PUT and PATCH alike): a field left out is kept; ``null`` (or an empty
string, the only way a form can say it) clears it. ``attributes`` differ: PUT replaces
the whole dict (``{}`` or ``null`` leaves none), PATCH merges into it as a JSON Merge
Patch does (RFC 7386: a ``null`` value deletes that attribute).
"""

from __future__ import annotations

import functools
import hmac
import json
import re

from flask import Blueprint, current_app, jsonify, request

from visualsearch.catalogue_manifest import ProductRecord, parse_price
from visualsearch.images import load_image

from .api import product_json
from .errors import ApiError
from .library import get_search
from .security import is_web_link

bp = Blueprint("api_write", __name__, url_prefix="/api/v1")

TEXT_FIELDS = ("title", "category", "brand", "url")
FIELDS = frozenset({*TEXT_FIELDS, "price", "attributes"})
# SKUs other routes would capture: GET .../similar, DELETE .../images/<id>.
_ROUTED_SUFFIX = re.compile(r"/(similar|images/\d+)$")


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
    """Create or update a product: JSON metadata, or multipart metadata plus image files.
    Attributes given replace the stored ones."""
    return _write_product(sku, merge_attributes=False)


@bp.patch("/products/<path:sku>")
@require_api_key
def patch_product(sku: str):
    """Update an existing product: the fields given are set, attributes merge in."""
    get_search().product(sku)  # 404 for an unknown SKU: PATCH never creates
    return _write_product(sku, merge_attributes=True)


def _write_product(sku: str, *, merge_attributes: bool):
    match = _ROUTED_SUFFIX.search(sku)
    if match:
        raise ApiError(400, "bad_request", f"a sku may not end in '/{match.group(1)}'")
    vs = get_search()
    if request.is_json:
        fields, uploads = _json_fields(), []
    else:
        fields, uploads = request.form.to_dict(), request.files.getlist("image")
    record = _record(sku, fields, merge_attributes=merge_attributes)
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


@bp.delete("/products/<path:sku>/images/<int:image_id>")
@require_api_key
def delete_image(sku: str, image_id: int):
    """Remove one image (its vector, and its uploaded file once no image names it)."""
    return jsonify(product_json(get_search().remove_image(sku, image_id)))


def _json_fields() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the JSON body must be an object of product fields")
    return body


def _record(sku: str, fields: dict, *, merge_attributes: bool) -> ProductRecord:
    """The record of a PUT or PATCH body (see the module doc for what each field means)."""
    unknown = set(fields) - FIELDS
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    record = ProductRecord(sku=sku)
    clear = set()
    for name in TEXT_FIELDS:
        if name not in fields:
            continue
        value = fields[name]
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "bad_request", f"{name} must be a string or null")
        text = (value or "").strip() or None
        if text is None:
            clear.add(name)
        setattr(record, name, text)
    if record.url is not None and not is_web_link(record.url):
        raise ApiError(400, "bad_request", "url must be an http:// or https:// address")
    if "price" in fields:
        try:
            record.price = parse_price(fields["price"])
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        if record.price is None:
            clear.add("price")
    record.clear = frozenset(clear)
    if "attributes" in fields:
        record.attributes = _attributes(fields["attributes"])
        record.replace_attributes = not merge_attributes or fields["attributes"] in (None, "")
    return record


def _attributes(value) -> dict:
    """A JSON object (a form sends it as JSON text); null or an empty form field: none."""
    if isinstance(value, str):  # multipart: a JSON object in a form field
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except ValueError:
            raise ApiError(400, "bad_request", "attributes must be a JSON object") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "bad_request", "attributes must be a JSON object")
    return value


def _check_image(data: bytes, max_pixels: int) -> str:
    """Raises the library's typed image errors (-> 413/415/422); returns the format."""
    return load_image(data, max_pixels=max_pixels).info["format"]
