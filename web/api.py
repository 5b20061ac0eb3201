"""REST API under /api/v1: search by upload, similar products, product metadata, health."""

from __future__ import annotations

import time
from dataclasses import replace

from flask import Blueprint, jsonify, request, url_for

from visualsearch.remote_images import FetchPolicy, api_fetch_slots, fetch_image
from visualsearch.results import SearchResult

from .errors import ApiError, error_response
from .library import get_search
from .metrics import observe_search
from .openapi import spec as openapi_spec
from .requests import parse_filters, parse_offset, parse_search_request, parse_top_k

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def results_json(result: SearchResult) -> dict:
    """Hits in the documented key order: sku, title, category, brand, price, url, image_url,
    score, attributes."""
    results = [hit.to_dict(image_url=url_for("pages.image", image_id=hit.image_id)) for hit in result.hits]
    return {"results": results, "took_ms": result.took_ms}


@bp.post("/search")
def search():
    upload = request.files.get("image")
    if upload is not None and not upload.filename and not upload.content_length:
        upload = None
    params = parse_search_request(request.form)
    if (upload is None) == (params.image_url is None):
        raise ApiError(400, "missing_image", "send the photo as multipart/form-data file field 'image', "
                                             "or its http(s) URL as field 'image_url' (one of the two)")
    vs = get_search()
    fetch_ms = 0.0
    if upload is not None:
        data = upload.read()
        if not data:
            raise ApiError(400, "missing_image", "the uploaded file 'image' is empty")
    else:
        # A bounded number of URL fetches at once per process, never waited for: each holds
        # a worker thread for up to VISUALSEARCH_REMOTE_DEADLINE.
        slots = api_fetch_slots(vs.settings.remote_api_concurrency)
        if not slots.acquire(blocking=False):
            busy = error_response(503, "remote_fetch_busy", (
                f"{vs.settings.remote_api_concurrency} image URLs are being fetched already "
                "(VISUALSEARCH_REMOTE_API_CONCURRENCY); retry in a second, or send the photo itself "
                "as the file field 'image'"))
            busy.headers["Retry-After"] = "1"
            return busy
        started = time.perf_counter()
        try:
            # Errors map like an upload's; the server there failing is a 502 (504: too slow).
            data = fetch_image(params.image_url, FetchPolicy.from_settings(vs.settings)).data
        finally:
            slots.release()
        fetch_ms = round((time.perf_counter() - started) * 1000, 2)
    result = vs.search(data, top_k=params.top_k, offset=params.offset, filters=params.filters, crop=params.crop)
    if params.image_url is not None:
        took = result.took_ms
        result = replace(result, took_ms={"fetch": fetch_ms, **took, "total": took.get("total", 0) + fetch_ms})
    observe_search(result.took_ms)
    return jsonify(results_json(result))


@bp.get("/products/<path:sku>/similar")
def similar(sku: str):
    result = get_search().similar(sku, top_k=parse_top_k(request.args.get("top_k")),
                                  offset=parse_offset(request.args.get("offset")),
                                  filters=parse_filters(request.args, reserved={"top_k", "offset"}))
    return jsonify(results_json(result))


@bp.get("/products/<path:sku>")
def product(sku: str):
    return jsonify(product_json(get_search().product(sku)))


def product_json(item) -> dict:
    body = item.to_dict()
    body["images"] = [
        {"id": image.id, "image_url": url_for("pages.image", image_id=image.id), "status": image.status,
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
