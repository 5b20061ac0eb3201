"""Every error becomes ``{"error": {"code", "message"}}`` with the right HTTP status."""

from __future__ import annotations

import logging
import typing as t

from flask import Flask, Request, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser

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
    StorageBusyError,
    StorageError,
    StorageFullError,
    UnsupportedImageError,
    VisualSearchError,
    WriterBusyError,
)
from visualsearch.remote_images import RemoteTimeoutError, RemoteUpstreamError

logger = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status.
STATUS_BY_ERROR: list[tuple[type[VisualSearchError], int]] = [
    # An image URL's server failed (or was too slow): the request was fine, upstream was not.
    (RemoteTimeoutError, 504),
    (RemoteUpstreamError, 502),
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
    # The disk refused: nothing was changed, reads go on; retry once it is fixed.
    (StorageFullError, 507),
    (StorageError, 503),
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


class UploadTooLarge(RequestEntityTooLarge):
    """The body went past MAX_CONTENT_LENGTH while the form parser was reading it."""


class TooManyFormFields(RequestEntityTooLarge):
    def __init__(self, limit: int):
        super().__init__(f"too many form fields (files included): the limit is {limit:,}")


class FormFieldTooLong(RequestEntityTooLarge):
    def __init__(self, limit: int):
        super().__init__(f"a form field is longer than {limit:,} bytes")


class _LimitStream:
    """Marks a 413 raised by the request stream itself (MAX_CONTENT_LENGTH) as the upload's."""

    def __init__(self, stream: t.IO[bytes]):
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except RequestEntityTooLarge:
            raise UploadTooLarge() from None


class _LimitNamingMultiPartParser(MultiPartParser):
    """Werkzeug raises one bare 413 for MAX_CONTENT_LENGTH, MAX_FORM_PARTS and
    MAX_FORM_MEMORY_SIZE; this one counts the parts it has finished to tell them apart
    (the parts limit trips on the part after the last allowed one), and closes the
    temporary files of file parts that a refused request leaves behind."""

    def parse(self, stream, boundary, content_length):
        self._finished_parts = 0
        self._files: list[t.IO[bytes]] = []
        try:
            return super().parse(_LimitStream(stream), boundary, content_length)
        except UploadTooLarge:
            self._close_files()
            raise
        except RequestEntityTooLarge:
            self._close_files()
            if self.max_form_parts is not None and self._finished_parts >= self.max_form_parts:
                raise TooManyFormFields(self.max_form_parts) from None
            raise FormFieldTooLong(self.max_form_memory_size) from None

    def get_part_charset(self, headers):  # called once per finished form field
        self._finished_parts += 1
        return super().get_part_charset(headers)

    def start_file_streaming(self, event, total_content_length):  # once per file part
        self._finished_parts += 1  # a file part counts as soon as it starts, as werkzeug's
        container = super().start_file_streaming(event, total_content_length)
        self._files.append(container)
        return container

    def _close_files(self) -> None:
        for container in self._files:
            container.close()


class _LimitNamingFormDataParser(FormDataParser):
    def _parse_multipart(self, stream, mimetype, content_length, options):
        # As werkzeug's own (3.1), with the parser above.
        parser = _LimitNamingMultiPartParser(
            stream_factory=self.stream_factory, max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts, cls=self.cls)
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class LimitNamingRequest(Request):
    """A Flask request whose form-parsing 413s say which limit tripped."""

    form_data_parser_class = _LimitNamingFormDataParser


def register(app: Flask) -> None:
    """Install the error handlers, and the request class whose 413s name their limit."""
    app.request_class = LimitNamingRequest

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return error_response(error.status, error.code, error.message)

    @app.errorhandler(VisualSearchError)
    def _library_error(error: VisualSearchError):
        status = status_of(error)
        if status >= 500:
            logger.error("request failed: %s", error)
        if not request.path.startswith("/api/"):
            response = app.make_response((render_template("error.html", status=status, message=str(error)), status))
        else:
            response = error_response(status, error.code, str(error))
        if isinstance(error, StorageBusyError):
            response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        if not request.path.startswith("/api/"):
            return error  # pages keep Flask's HTML error pages
        code = (error.name or "error").lower().replace(" ", "_")
        if isinstance(error, (TooManyFormFields, FormFieldTooLong)):
            code, message = "too_large", error.description
        elif error.code == 413:  # MAX_CONTENT_LENGTH, checked before or while reading the body
            code, message = "too_large", (
                f"upload larger than {app.config['MAX_CONTENT_LENGTH']:,} bytes")
        else:
            message = error.description or error.name
        return error_response(error.code or 500, code, message)
