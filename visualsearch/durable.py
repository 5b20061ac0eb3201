"""Files that are either wholly written or not there: temporary file, fsync, rename, fsync."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers (and a crash) see the old or the new file.

    The temporary file is ``.<name>.<random>.<pid>.tmp`` beside it: the pid lets a later
    clean-up tell a dead writer's leftover from a live writer's file.

    Raises:
        OSError: the disk refused; no temporary file is left behind.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (the entry is on disk, not only the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writer_gone(name: str) -> bool:
    """Whether ``name`` is a temporary file ``.<name>.<pid>.tmp`` (as
    :func:`write_file_atomic` names them) whose writing process no longer exists."""
    if not name.endswith(".tmp"):
        return False
    try:
        pid = int(name.rsplit(".", 2)[-2])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user: alive
        return False
    return False
