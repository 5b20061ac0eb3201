"""Every error becomes ``{"error": {"code", "message"}}`` with the right HTTP status."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from visualsearch.errors import (
    BackboneMismatchError,
    ConfigurationError,
    ImageDecodeError,
    ImageError,
    ImageTooLargeError,
    IndexCorruptError,
    InvalidRequestError,
    ManifestError,
    ProductNotFoundError,
    UnsupportedImageError,
    VisualSearchError,
    WriterBusyError,
)

logger = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status.
STATUS_BY_ERROR: list[tuple[type[VisualSearchError], int]] = [
    (InvalidRequestError, 400),
    (ManifestError, 400),
    (ProductNotFoundError, 404),
    (ImageTooLargeError, 413),
    (UnsupportedImageError, 415),
    (ImageDecodeError, 422),
    (ImageError, 422),
    # The deployment, not the request, is wrong: say so instead of a bare 500.
    (BackboneMismatchError, 503),
    (ConfigurationError, 503),
    (IndexCorruptError, 503),
    (WriterBusyError, 409),  # another process is indexing: retry later
]


class ApiError(Exception):
    """An error raised by a view with its own status and code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def status_of(error: VisualSearchError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return error_response(error.status, error.code, error.message)

    @app.errorhandler(VisualSearchError)
    def _library_error(error: VisualSearchError):
        status = status_of(error)
        if status >= 500:
            logger.error("request failed: %s", error)
        if not request.path.startswith("/api/"):
            return render_template("error.html", status=status, message=str(error)), status
        return error_response(status, error.code, str(error))

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        if not request.path.startswith("/api/"):
            return error  # pages keep Flask's HTML error pages
        code = (error.name or "error").lower().replace(" ", "_")
        if error.code == 413:
            code, message = "too_large", (
                f"upload larger than {app.config['MAX_CONTENT_LENGTH']:,} bytes")
        else:
            message = error.description or error.name
        return error_response(error.code or 500, code, message)
