"""REST API under /api/v1: search by upload, similar products, product metadata, health."""

from __future__ import annotations

from flask import Blueprint, jsonify, request, url_for

from visualsearch.results import SearchResult

from .errors import ApiError
from .library import get_search
from .metrics import observe_search
from .openapi import spec as openapi_spec
from .requests import parse_filters, parse_search_request, parse_top_k

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def results_json(result: SearchResult) -> dict:
    results = []
    for hit in result.hits:
        entry = hit.to_dict()
        entry["image_url"] = url_for("pages.image", image_id=entry.pop("image_id"))
        results.append(entry)
    return {"results": results, "took_ms": result.took_ms}


@bp.post("/search")
def search():
    upload = request.files.get("image")
    if upload is None or not upload.filename and not upload.content_length:
        raise ApiError(400, "missing_image", "send the photo as multipart/form-data file field 'image'")
    params = parse_search_request(request.form)
    data = upload.read()
    if not data:
        raise ApiError(400, "missing_image", "the uploaded file 'image' is empty")
    result = get_search().search(data, top_k=params.top_k, filters=params.filters, crop=params.crop)
    observe_search(result.took_ms)
    return jsonify(results_json(result))


@bp.get("/products/<path:sku>/similar")
def similar(sku: str):
    result = get_search().similar(sku, top_k=parse_top_k(request.args.get("top_k")),
                                  filters=parse_filters(request.args, reserved={"top_k"}))
    return jsonify(results_json(result))


@bp.get("/products/<path:sku>")
def product(sku: str):
    return jsonify(product_json(get_search().product(sku)))


def product_json(item) -> dict:
    body = item.to_dict()
    body["images"] = [
        {"image_url": url_for("pages.image", image_id=image.id), "status": image.status,
         "width": image.width, "height": image.height}
        for image in item.images
    ]
    return body


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_spec())


@bp.get("/health")
def health():
    return jsonify({"status": "ok", **get_search().health()})
