"""Image files that products keep which came in a request, not from a manifest.

They are named by their content hash (two products sending the same photo share one
file) in an ``uploads`` folder that the deployment owns: removing the last image that
names one removes the file. The folder is, by ``VISUALSEARCH_UPLOADS``:

- unset: DATA_DIR/uploads, on the one machine that serves;
- a directory shared by every replica (an NFS or CSI mount): DIR/uploads;
- an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``): URL/uploads,
  with fsspec and the store's own package installed (``pip install 'visualsearch[objectstore]' s3fs``).

A replica that keeps a photo under its own data directory would leave the others with
an image path they cannot read; a shared location is what makes replicas stateless.
The catalogue stores the file's full path or URL, so every replica reads the same one.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from .durable import write_file_atomic, writer_gone
from .errors import ConfigurationError

UPLOADS_DIR = "uploads"
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
              "BMP": ".bmp", "TIFF": ".tif", "HEIF": ".heic", "AVIF": ".avif"}
# A half-written file in a shared folder may belong to a live process on another host
# (its pid means nothing here): it is only collected once this old.
SHARED_LEFTOVER_SECONDS = 3600.0


def is_fsspec_url(text: str) -> bool:
    """Whether ``text`` names a file through fsspec (``s3://``, ``file://``...), not a local path.

    http(s) URLs are excluded: those are images fetched from shops, never ours."""
    scheme, separator, _rest = text.partition("://")
    return bool(separator) and scheme.isascii() and scheme.replace("+", "").isalnum() and \
        scheme.lower() not in ("http", "https")


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise ConfigurationError(f"uploads location {url!r} is a URL, which needs fsspec: "
                                 "pip install 'visualsearch[objectstore]' (and the store's package, e.g. s3fs)"
                                 ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigurationError(f"cannot use uploads location {url!r}: {exc}") from None


class UploadFolder:
    """The folder kept uploads live in (see the module docstring).

    Args:
        location: ``VISUALSEARCH_UPLOADS`` (a directory or an fsspec URL), or None.
        data_dir: the deployment's data directory (the default's parent).
    """

    def __init__(self, location: str | None, data_dir: Path):
        self.shared = bool(location)
        self.url: str | None = None
        if location and is_fsspec_url(location):
            self.url = location.rstrip("/") + "/" + UPLOADS_DIR
            self._fs, self._root = _filesystem(self.url)
            self.path = None
        else:
            self.path = (Path(location).expanduser() if location else data_dir).resolve() / UPLOADS_DIR

    def __str__(self) -> str:
        return self.url or str(self.path)

    def keep(self, data: bytes, image_format: str) -> str:
        """Store ``data`` as <sha256><ext> atomically (or find it there); returns its path or URL.

        Raises:
            OSError: the disk or object store refused; no partial file is left behind.
        """
        name = hashlib.sha256(data).hexdigest() + EXTENSIONS.get(image_format, ".img")
        if self.url is not None:
            target = f"{self._root}/{name}"
            # Object stores write an object in one request and never show a partial one;
            # the size check also catches a file:// copy cut short by a crash.
            if not self._fs.exists(target) or self._fs.size(target) != len(data):
                self._fs.makedirs(self._root, exist_ok=True)  # (a no-op on object stores)
                self._fs.pipe_file(target, data)
            return f"{self.url}/{name}"
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / name
        if not path.exists():
            write_file_atomic(path, data)
        return str(path)

    def owns(self, path: str) -> bool:
        """Whether ``path`` is one of this folder's uploads (and so may be deleted)."""
        if self.url is not None:
            return path.startswith(self.url + "/") and "/" not in path[len(self.url) + 1:]
        if is_fsspec_url(path):
            return False
        return Path(path).parent.resolve() == self.path

    def remove(self, path: str) -> None:
        """Delete one of this folder's uploads (gone already is fine)."""
        if not self.owns(path):
            raise ValueError(f"{path} is not an upload of {self}")
        if self.url is not None:
            try:
                self._fs.rm_file(f"{self._root}/{path.rsplit('/', 1)[1]}")
            except FileNotFoundError:
                pass
            return
        Path(path).unlink(missing_ok=True)

    def collect_leftovers(self) -> list[str]:
        """Delete half-written files of crashed writers; returns their names. (Object
        stores leave none: an object is written in one request.)"""
        if self.url is not None or not self.path.is_dir():
            return []
        removed = []
        for path in self.path.glob(".*.tmp"):
            if self.shared:
                try:
                    gone = time.time() - path.stat().st_mtime > SHARED_LEFTOVER_SECONDS
                except FileNotFoundError:
                    continue
            else:
                gone = writer_gone(path.name)
            if gone:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed


def read_file_url(url: str) -> tuple[bytes, int, int | None]:
    """The bytes, size and modification time (ns, or None where the store has none) of
    an fsspec URL: an upload kept in an object store, read back to embed or serve it.

    Raises:
        FileNotFoundError: no such object.
        ConfigurationError: fsspec or the store's package is not installed.
    """
    fs, path = _filesystem(url)
    with fs.open(path, "rb") as handle:
        data = handle.read()
    modified = None
    try:
        stamp = fs.modified(path)
        modified = int(stamp.timestamp() * 1e9)
    except (NotImplementedError, AttributeError, OSError):
        pass
    return data, len(data), modified
