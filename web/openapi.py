"""The OpenAPI 3 description of /api/v1, served at /api/v1/openapi.json.

A test checks that every API route is described here and vice versa.
"""

from __future__ import annotations

from visualsearch import __version__
from visualsearch.catalogue.limits import FIELD_LENGTHS
from visualsearch.search import MAX_OFFSET, MAX_TOP_K

from .requests import DEFAULT_TOP_K


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_TOP_K = {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": DEFAULT_TOP_K}
_OFFSET = {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0,
           "description": f"Products of the ranking to skip: results offset..offset+top_k (at most {MAX_OFFSET}). "
                          "Pages of one query never repeat or skip a product."}
_FILTERS = {
    "category": {"type": "string", "description": "Only products of this category; several accepted values "
                                                  "separated by '|' (Unicode case-insensitive)."},
    "brand": {"type": "string", "description": "Only products of this brand; 'A|B' for either "
                                               "(Unicode case-insensitive)."},
    "min_price": {"type": "number", "minimum": 0},
    "max_price": {"type": "number", "minimum": 0},
}
# Every other field filters on the product attribute of that name (colour=red, in_stock=true).
_ATTRIBUTE_FILTERS = {"type": "string", "description": "Any other field: only products whose attribute of that "
                                                       "name has this value ('red|blue' for either)."}
_TOO_LARGE = _error("Too large: the upload (VISUALSEARCH_MAX_UPLOAD_SIZE), the image (pixels, or sides more "
                    "than 20:1 apart), more than 100 form parts, or a form field over 128 KiB; the message "
                    "says which.")
_RESULTS = {"description": "Products, best first, one entry per product.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SearchResponse"}}}}


def spec() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "visualsearch API", "version": __version__,
                 "description": "Find the catalogue products that look most like a photo. Browsers on "
                                "the origins listed in VISUALSEARCH_CORS_ORIGINS may call the read "
                                "endpoints cross-origin (CORS); the write endpoints, never."},
        "paths": {
            "/api/v1/search": {"post": {
                "summary": "Search by photo",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object",
                    "description": "The photo: the file 'image', or its http(s) URL 'image_url' (one of the two).",
                    "properties": {
                        "image": {"type": "string", "format": "binary",
                                  "description": "JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP or TIFF."},
                        "image_url": {"type": "string", "format": "uri",
                                      "description": "Fetch the photo from this http(s) URL instead (the upload "
                                                     "size limit, VISUALSEARCH_REMOTE_TIMEOUT/_DEADLINE; private "
                                                     "and metadata addresses refused). took_ms then has 'fetch'."},
                        "top_k": _TOP_K, "offset": _OFFSET, **_FILTERS,
                        "crop": {"type": "string", "pattern": r"^\d+,\d+,\d+,\d+$",
                                 "description": "x,y,w,h in pixels of the uploaded image."},
                    },
                    "additionalProperties": _ATTRIBUTE_FILTERS}}}},
                "responses": {"200": _RESULTS,
                              "400": _error("Bad parameters (top_k over 100, offset over 1000...); no photo "
                                            "or both; image_url not http(s) "
                                            "(remote_bad_url), or leading to a non-public address or a port not in "
                                            "VISUALSEARCH_REMOTE_PORTS (remote_refused)."),
                              "413": _TOO_LARGE, "415": _error("Not a supported image (remote_not_image: the "
                                                               "image_url's server sent no image)."),
                              "422": _error("The image cannot be decoded, or the image_url's server answered "
                                            "404/410 (remote_not_found)."),
                              "502": _error("image_url: the server cannot be reached (refused, unreachable "
                                            "or too slow to connect: remote_unreachable) or answered an error "
                                            "(remote_http_error)."),
                              "504": _error("image_url: the server was too slow to answer (remote_timeout)."),
                              "503": _error("The deployment is misconfigured or its storage refused (see "
                                            "other endpoints), or every slot for image_url fetches is taken "
                                            "(remote_fetch_busy, with Retry-After: retry, or upload the file)."),
                              },
            }},
            "/api/v1/products/{sku}/similar": {"get": {
                "summary": "Products similar to a catalogue product",
                "parameters": [_SKU, *[{"name": name, "in": "query", "schema": schema}
                                       for name, schema in {"top_k": _TOP_K, "offset": _OFFSET, **_FILTERS}.items()],
                               {"name": "attributes", "in": "query", "style": "form", "explode": True,
                                "description": "Attribute filters as plain query fields: ?colour=red&size=M|L.",
                                "schema": {"type": "object", "additionalProperties": {"type": "string"}}}],
                "responses": {"200": _RESULTS, "400": _error("Bad parameters."),
                              "404": _error("Unknown product."), **_UNAVAILABLE},
            }},
            "/api/v1/products/{sku}": {
                "get": {
                    "summary": "A product's metadata and images",
                    "parameters": [_SKU],
                    "responses": {"200": _PRODUCT, "404": _error("Unknown product."), **_UNAVAILABLE},
                },
                "put": {
                    "summary": "Create or update a product",
                    "description": "A field left out is kept; null (or an empty string) clears it. 'attributes' "
                                   "REPLACES the stored attributes ({} or null: none left). Uploaded images are "
                                   "added and indexed.",
                    "security": [{"bearer": []}],
                    "parameters": [_SKU],
                    "requestBody": _PRODUCT_BODY,
                    "responses": {"200": _PRODUCT, "201": _PRODUCT, **_WRITE_ERRORS,
                                  "413": _TOO_LARGE, "415": _error("Not a supported image."),
                                  "422": _error("An image cannot be decoded.")},
                },
                "patch": {
                    "summary": "Update an existing product",
                    "description": "A field left out is kept; null (or an empty string) clears it. 'attributes' "
                                   "is MERGED into the stored attributes as a JSON Merge Patch (RFC 7386): a "
                                   "null value deletes that attribute ('attributes': null deletes them all). "
                                   "Uploaded images are added and indexed.",
                    "security": [{"bearer": []}],
                    "parameters": [_SKU],
                    "requestBody": {**_PRODUCT_BODY, "content": {
                        **_PRODUCT_BODY["content"],
                        "application/merge-patch+json": _PRODUCT_BODY["content"]["application/json"]}},
                    "responses": {"200": _PRODUCT, "404": _error("Unknown product."), **_WRITE_ERRORS,
                                  "413": _TOO_LARGE, "415": _error("Not a supported image."),
                                  "422": _error("An image cannot be decoded.")},
                },
                "delete": {
                    "summary": "Remove a product and its vectors",
                    "security": [{"bearer": []}],
                    "parameters": [_SKU],
                    "responses": {"200": {"description": "Removed.", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {"removed": {"type": "string"}}}}}},
                        "404": _error("Unknown product."), **_WRITE_ERRORS},
                },
            },
            "/api/v1/products/{sku}/images/{image_id}": {"delete": {
                "summary": "Remove one image of a product",
                "description": "Deletes the image and its vector (and its uploaded file once no image names it); "
                               "the product stays, with its other images.",
                "security": [{"bearer": []}],
                "parameters": [_SKU, {"name": "image_id", "in": "path", "required": True,
                                      "schema": {"type": "integer", "minimum": 0},
                                      "description": "The image's id (Product.images[].id)."}],
                "responses": {"200": {**_PRODUCT, "description": "The product as now stored."},
                              "404": _error("Unknown product (product_not_found), or not an image of it "
                                            "(image_not_found)."), **_WRITE_ERRORS},
            }},
            "/api/v1/health": {"get": {
                "summary": "Liveness and index state",
                "responses": {"200": {"description": "Counts, writability, backbone, recipe and index state.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              **_UNAVAILABLE},
            }},
            "/api/v1/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3 document.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "The value of VISUALSEARCH_API_KEY."}},
            "schemas": _SCHEMAS,
        },
    }


_SKU = {"name": "sku", "in": "path", "required": True, "schema": {"type": "string", "maxLength": FIELD_LENGTHS["sku"]}}
_PRODUCT = {"description": "The product.", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Product"}}}}
_UNAVAILABLE = {"503": _error("The deployment is misconfigured (no catalogue yet, another backbone...), or "
                              "its storage refused (storage_read_only, storage_busy with Retry-After, "
                              "storage_unavailable); nothing was changed.")}
_WRITE_ERRORS = {**_UNAVAILABLE, "400": _error("Bad fields (also: a value longer than its maxLength, or "
                                                "holding a NUL character, anywhere in sku, fields or attributes)."),
                 "401": _error("Missing or wrong bearer key."),
                 "403": _error("Write endpoints disabled: no VISUALSEARCH_API_KEY configured."),
                 "409": _error("Another process is writing; retry later."),
                 "507": _error("The disk is full (storage_full): nothing was changed, searches go on.")}
_PRODUCT_BODY = {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ProductFields"}},
    "multipart/form-data": {"schema": {"allOf": [
        {"$ref": "#/components/schemas/ProductFields"},
        {"type": "object", "properties": {
            "attributes": {"type": "string", "description": "A JSON object (an empty field: none)."},
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        }}]}},
}}
_SCHEMAS = {
    "ProductFields": {
        "type": "object", "additionalProperties": False,
        "description": "Left out: kept. null or an empty string: cleared. attributes: see the operation.",
        "properties": {
            "title": {"type": "string", "nullable": True},
            "category": {"type": "string", "nullable": True, "maxLength": FIELD_LENGTHS["category"]},
            "brand": {"type": "string", "nullable": True, "maxLength": FIELD_LENGTHS["brand"]},
            "url": {"type": "string", "nullable": True, "description": "An http(s) address."},
            "price": {"type": "number", "minimum": 0, "nullable": True},
            "attributes": {"type": "object", "nullable": True}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "SearchHit": {"type": "object",
                  "description": "Keys come in this order.",
                  "required": ["sku", "title", "category", "brand", "price", "url", "image_url", "score",
                               "attributes"],
                  "properties": {
                      "sku": {"type": "string"}, "title": {"type": "string", "nullable": True},
                      "category": {"type": "string", "nullable": True},
                      "brand": {"type": "string", "nullable": True},
                      "price": {"type": "number", "nullable": True},
                      "url": {"type": "string", "nullable": True},
                      "image_url": {"type": "string"},
                      "score": {"type": "number", "description": "Cosine similarity, -1..1."},
                      "attributes": {"type": "object", "description": "The product's other fields."}}},
    "SearchResponse": {"type": "object", "required": ["results", "took_ms"], "properties": {
        "results": {"type": "array", "items": {"$ref": "#/components/schemas/SearchHit"}},
        "took_ms": {"type": "object", "properties": {
            stage: {"type": "number"} for stage in ("fetch", "decode", "embed", "search", "total")}}}},
    "Product": {"type": "object", "properties": {
        "sku": {"type": "string"}, "title": {"type": "string", "nullable": True},
        "category": {"type": "string", "nullable": True}, "brand": {"type": "string", "nullable": True},
        "price": {"type": "number", "nullable": True}, "url": {"type": "string", "nullable": True},
        "attributes": {"type": "object"},
        "images": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "image_url": {"type": "string"}, "status": {"type": "string"},
            "width": {"type": "integer", "nullable": True},
            "height": {"type": "integer", "nullable": True}}}}}},
}
