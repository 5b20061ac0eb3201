"""Locks that every process writing one catalogue honours, on any host.

A catalogue on a server database (PostgreSQL) may be written from several machines,
so a file lock in one machine's data directory guards nothing: there the lock is a
session-level ``pg_advisory_lock`` held on a connection of its own, released when the
block ends or, should the process die, when the server closes its connection. An
SQLite catalogue lives in one data directory, and there it is an ``fcntl`` lock on a
file beside it, as it always was.

Names in use: :data:`INDEX_LOCK` (one batch run at a time: index, prune, compact,
rebuild, reembed) and :data:`VECTOR_COMMIT_LOCK` (for a vector store shared by
several hosts, e.g. Milvus, whose commits must be serialised with the catalogue's).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import time
from pathlib import Path
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ..errors import WriterBusyError

logger = logging.getLogger(__name__)

INDEX_LOCK = "index"
VECTOR_COMMIT_LOCK = "vector-commit"
POLL_SECONDS = 0.2


def lock_file(data_dir: Path, name: str) -> Path:
    """The file an SQLite catalogue's lock ``name`` is held on (``index``: ``.index.lock``)."""
    return Path(data_dir) / f".{name}.lock"


def advisory_key(name: str) -> int:
    """The 64-bit PostgreSQL advisory lock key of the lock ``name`` (stable across hosts and versions)."""
    digest = hashlib.blake2b(f"visualsearch:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.contextmanager
def catalogue_lock(catalogue: Engine | sessionmaker[Session], name: str, *, data_dir: Path, timeout: float,
                   busy_message: str) -> Iterator[None]:
    """Hold the catalogue-wide lock ``name`` for the block (not reentrant: a second
    acquisition in the same process waits like any other holder).

    Args:
        catalogue: the catalogue's engine or session factory.
        name: which lock (e.g. :data:`INDEX_LOCK`, :data:`VECTOR_COMMIT_LOCK`).
        data_dir: where an SQLite catalogue's lock file lives.
        timeout: seconds to wait for another holder (0: try once).
        busy_message: the message of the WriterBusyError.

    Raises:
        WriterBusyError: another holder kept it for ``timeout`` seconds.
    """
    engine = catalogue if isinstance(catalogue, Engine) else catalogue.kw["bind"]
    if engine.dialect.name == "postgresql":
        lock = _advisory_lock(engine, name, timeout, busy_message)
    else:
        lock = _file_lock(lock_file(data_dir, name), timeout, busy_message)
    with lock:
        yield


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, busy_message: str) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WriterBusyError(busy_message) from None
                time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _advisory_lock(engine: Engine, name: str, timeout: float, busy_message: str) -> Iterator[None]:
    key = advisory_key(name)
    deadline = time.monotonic() + timeout
    # Autocommit: the connection holding the lock must not sit idle in a transaction
    # for the whole run (servers kill those, and they hold back vacuum).
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        while not connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}):
            if time.monotonic() >= deadline:
                raise WriterBusyError(busy_message)
            time.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            except Exception as exc:
                # Closing the connection releases the lock too; never hand one that may
                # still hold it back to the pool.
                logger.warning("catalogue lock %r: unlock failed (%s); closing its connection", name, exc)
                connection.invalidate()
    finally:
        connection.close()
