"""Turn what the disk, SQLite and a database server say into the library's typed storage errors.

A full disk, a read-only mount, a permission denied or a locked database surfaces
deep inside the vector store, FAISS or SQLAlchemy as an ``OSError`` or an
``OperationalError``. The service's public methods pass through
:func:`storage_errors`, so callers (the CLI, the web app) see one
:class:`~visualsearch.errors.StorageError` subclass with a message that says what
to do, and never a traceback. Every write path is atomic (temporary file + rename,
SQLite transactions), so after such an error the previous state is still what
readers see.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy.exc import DataError, DBAPIError

from .errors import InvalidRequestError, StorageBusyError, StorageError, StorageFullError, StorageReadOnlyError

F = TypeVar("F", bound=Callable)

READ_ONLY_ERRNOS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                    errno.EPERM: "operation not permitted"}
FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# SQLite reports a full disk while creating its -shm/-wal files as a generic I/O error:
# with less than this free, call it what it is.
NEARLY_FULL_BYTES = 1 << 20


def _advice_read_only(data_dir: Path) -> str:
    return (f"make {data_dir} writable for the user running visualsearch (or remount it read-write); "
            "searches keep working meanwhile")


def _advice_full(data_dir: Path) -> str:
    return (f"free disk space where {data_dir} lives and retry; what was committed before is kept, "
            "searches keep working meanwhile")


def storage_error_from(exc: BaseException, data_dir: Path) -> StorageError | None:
    """The typed error for ``exc``, or None when it is not a storage failure."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno == errno.EROFS or (exc.errno in READ_ONLY_ERRNOS and _inside(exc.filename, data_dir)):
            # (A permission denied on a file elsewhere, a shopper's upload or a manifest,
            # is that input's problem, not the data directory's.)
            return StorageReadOnlyError(f"{where}{READ_ONLY_ERRNOS[exc.errno]}; {_advice_read_only(data_dir)}")
        if exc.errno in FULL_ERRNOS:
            return StorageFullError(f"{where}{FULL_ERRNOS[exc.errno]}; {_advice_full(data_dir)}")
        if exc.errno == errno.EIO and _inside(exc.filename, data_dir):
            return StorageError(f"{where}input/output error: check the disk holding {data_dir}")
        return None
    original = exc.orig if isinstance(exc, DBAPIError) else exc
    if _sqlstate(original) is not None or _is_server_connection_error(original):
        return _server_error(exc, original)
    if not isinstance(original, sqlite3.OperationalError):  # (not constraint or programming errors)
        return None
    message = str(original).lower()
    cannot_open = "disk i/o error" in message or "unable to open database file" in message
    if "readonly" in message or "read-only" in message:
        return StorageReadOnlyError(f"the catalogue database is read-only: {_advice_read_only(data_dir)}")
    if "disk is full" in message or (cannot_open and _nearly_full(data_dir)):
        return StorageFullError(f"the catalogue database cannot grow (disk full): {_advice_full(data_dir)}")
    if "locked" in message or "busy" in message:
        return StorageBusyError("the catalogue database stayed locked by another writer past the busy timeout; "
                                "retry shortly")
    if "unable to open database file" in message and not _writable(data_dir):
        # SQLite could not create its -shm/-wal files beside the database.
        return StorageReadOnlyError(f"the catalogue database's folder is read-only: {_advice_read_only(data_dir)}")
    if cannot_open:
        return StorageError(f"the catalogue database cannot be opened or written ({original}): check that "
                            f"{data_dir} exists, is writable and its disk is healthy")
    return None


# PostgreSQL's SQLSTATEs for "another transaction was in the way; retrying works".
SERVER_BUSY_STATES = {"40001": "a concurrent write conflicted (serialization failure)",
                      "40P01": "a concurrent write deadlocked with this one",
                      "55P03": "a row or table stayed locked by another writer",
                      "57014": "a statement ran past the server's timeout",
                      "53300": "the server has no free connection slot"}


def _sqlstate(original: BaseException) -> str | None:
    """The SQLSTATE of a server database's error (psycopg 3, psycopg2), else None."""
    state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return state if isinstance(state, str) else None


def _is_server_connection_error(original: BaseException) -> bool:
    """A psycopg OperationalError without SQLSTATE: the server could not be reached or
    dropped the connection."""
    return type(original).__module__.split(".")[0] in ("psycopg", "psycopg2") and \
        type(original).__name__ == "OperationalError"


def _server_error(exc: BaseException, original: BaseException) -> StorageError | None:
    state = _sqlstate(original)
    if state in SERVER_BUSY_STATES:
        return StorageBusyError(f"the catalogue database is busy: {SERVER_BUSY_STATES[state]}; retry shortly")
    if state == "53100":
        return StorageFullError("the catalogue database server's disk is full: free space there and retry; "
                                "searches keep working meanwhile")
    if state == "25006":
        return StorageReadOnlyError("the catalogue database is read-only (a standby, or "
                                    "default_transaction_read_only): point VISUALSEARCH_DB_URL at the primary")
    # Connection failures, the server shutting down, a login refused (a rotated password).
    if state is None or state.startswith(("08", "57P", "28")):
        return StorageError(server_error_message(exc, None)
                            or f"the catalogue database cannot be reached: {_first_line(original)}")
    return None


def invalid_value_from(exc: BaseException) -> InvalidRequestError | None:
    """A value the catalogue database refused (SQLSTATE class 22, e.g. a text too long for
    its column or a NUL character; 54000, an index entry too large) as a bad request, or None.

    Input is checked against :mod:`visualsearch.catalogue.limits` before it is written, so
    this is the net for what those checks do not cover (a lookup by a SKU holding a NUL).
    """
    if not isinstance(exc, DBAPIError):
        return None
    state = _sqlstate(exc.orig) or ""
    if isinstance(exc, DataError) or state.startswith("22") or state == "54000":
        return InvalidRequestError(f"the catalogue database refused a value: {_first_line(exc.orig)}")
    return None


def server_error_message(exc: BaseException, url: object | None) -> str | None:
    """What to do about a database server that cannot be reached (None: not that)."""
    original = exc.orig if isinstance(exc, DBAPIError) else exc
    if not _is_server_connection_error(original) and not (_sqlstate(original) or "").startswith(("08", "57P", "28")):
        return None
    where = "the catalogue database"
    host = getattr(url, "host", None)
    if host is not None or getattr(url, "query", None):
        where = f"PostgreSQL at {host or 'its socket'}:{getattr(url, 'port', None) or 5432}"
    database = getattr(url, "database", None)
    return (f"cannot reach {where}{f' (database {database!r})' if database else ''}: {_first_line(original)}; "
            "is the server running and reachable from here, and do the URL's user, password and database exist? "
            "(--db / VISUALSEARCH_DB_URL; PostgreSQL needs psycopg: pip install 'visualsearch[postgres]')")


def _first_line(original: BaseException) -> str:
    return (str(original).strip().splitlines() or [type(original).__name__])[0]


def _inside(filename: object, data_dir: Path) -> bool:
    if not filename:
        return True  # the store's and SQLite's own files
    try:
        return Path(str(filename)).resolve().is_relative_to(data_dir.resolve())
    except OSError:
        return False


def check_writable(data_dir: Path) -> None:
    """Raise StorageReadOnlyError when ``data_dir`` exists and cannot be written."""
    if not _writable(data_dir):
        reason = "read-only file system" if is_read_only_file_system(data_dir) else "permission denied"
        raise StorageReadOnlyError(f"{data_dir}: {reason}; {_advice_read_only(data_dir)}")


def _writable(folder: Path) -> bool:
    return not folder.is_dir() or os.access(folder, os.W_OK)


def is_read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _nearly_full(data_dir: Path) -> bool:
    for folder in (data_dir, *data_dir.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    return False


@contextlib.contextmanager
def storage_errors(data_dir: Path) -> Iterator[None]:
    """Re-raise storage failures inside the block as typed :class:`StorageError`, and values
    the database refused as :class:`InvalidRequestError`."""
    try:
        yield
    except (OSError, DBAPIError, sqlite3.Error) as exc:
        typed = storage_error_from(exc, data_dir) or invalid_value_from(exc)
        if typed is None or typed is exc:
            raise
        raise typed from exc


def translates_storage_errors(method: F) -> F:
    """Decorate a method of an object with a ``data_dir`` with :func:`storage_errors`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with storage_errors(self.data_dir):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
