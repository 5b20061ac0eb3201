"""Image files that products keep which came in a request, not from a manifest.

They live in DATA_DIR/uploads, named by their content hash (two products sending the
same photo share one file), so the data directory owns them: removing the last image
that names one removes the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .durable import write_file_atomic

UPLOADS_DIR = "uploads"
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
              "BMP": ".bmp", "TIFF": ".tif", "HEIF": ".heic", "AVIF": ".avif"}


def keep_upload(data_dir: Path, data: bytes, image_format: str) -> Path:
    """Write ``data`` to DATA_DIR/uploads/<sha256><ext> atomically (or find it there).

    Raises:
        OSError: the disk refused; no partial file is left behind.
    """
    folder = data_dir / UPLOADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha256(data).hexdigest() + EXTENSIONS.get(image_format, ".img"))
    if path.exists():
        return path
    write_file_atomic(path, data)
    return path


def is_upload(data_dir: Path, path: str | Path) -> bool:
    """Whether ``path`` is one of the data directory's uploads (and so may be deleted)."""
    return Path(path).parent.resolve() == (data_dir / UPLOADS_DIR).resolve()
