"""Typed errors of the library; the CLI and the web app convert them once, at their edge."""

from __future__ import annotations


class VisualSearchError(Exception):
    """Base class of every error the library raises on purpose.

    ``code`` is a stable machine-readable name (used as the API's ``error.code``).
    """

    code = "visualsearch_error"


class ConfigurationError(VisualSearchError):
    """A setting has a value that cannot work (unknown backbone, bad unit, ...)."""

    code = "bad_configuration"


class WeightsUnavailableError(ConfigurationError):
    """The pretrained weights of a backbone are not on this machine."""

    code = "weights_unavailable"


class BackboneMismatchError(VisualSearchError):
    """An index built with one backbone (or weights) was opened with another."""

    code = "backbone_mismatch"


class ImageError(VisualSearchError):
    """Base class of the errors about one input image."""

    code = "bad_image"


class UnsupportedImageError(ImageError):
    """The bytes are not an image in a format we accept."""

    code = "unsupported_image"


class ImageDecodeError(ImageError):
    """The file claims a supported format but cannot be decoded (truncated, corrupt)."""

    code = "undecodable_image"


class ImageTooLargeError(ImageError):
    """The image has more pixels (or bytes) than the configured limit."""

    code = "image_too_large"


class InvalidRequestError(VisualSearchError):
    """A parameter of a library call is out of range or malformed."""

    code = "bad_request"


class ManifestError(VisualSearchError):
    """A catalogue manifest cannot be read (missing columns, bad rows, unknown format)."""

    code = "bad_manifest"


class ProductNotFoundError(VisualSearchError):
    """No product with that SKU is in the catalogue."""

    code = "product_not_found"


class ImageNotFoundError(ProductNotFoundError):
    """The product has no image with that id (a not-found like an unknown SKU: the API
    answers 404 for both)."""

    code = "image_not_found"


class WriterBusyError(VisualSearchError):
    """Another process is indexing or removing in this data directory."""

    code = "writer_busy"


class IndexCorruptError(VisualSearchError):
    """The stored vector index cannot be read; it can be rebuilt from the catalogue."""

    code = "index_corrupt"


class StorageError(VisualSearchError):
    """The data directory or catalogue database refused a read or write (the disk, not
    the request, is at fault). What was committed before stays readable."""

    code = "storage_unavailable"


class StorageReadOnlyError(StorageError):
    """The data directory is on a read-only file system, or this user may not write it."""

    code = "storage_read_only"


class StorageFullError(StorageError):
    """The disk (or the user's quota) is full."""

    code = "storage_full"


class StorageBusyError(StorageError):
    """The catalogue database stayed locked by another writer past the busy timeout."""

    code = "storage_busy"
