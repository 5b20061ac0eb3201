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

An advisory lock lives as long as its connection. Should that connection die while the
lock is held (a NAT or firewall dropping an idle connection, the server restarting),
the server releases the lock and another writer may take it, while the holder, idle,
does not know. The catalogue's engines set TCP keepalives (``database.KEEPALIVES``) so
that such a connection fails within a minute rather than hours; :meth:`HeldLock.check`
asks whether it still holds (one ``SELECT 1`` round trip: a session that answers still
holds its session-level locks), and the end of the block reports, at ERROR level, a lock
that was found lost. Nothing checks before each step inside the block on its own: the
vector stores enter the commit lock once per ``writing()`` block and discard the
:class:`HeldLock`, so a store that wants the check before each commit must keep it and
call :meth:`HeldLock.check` (MilvusVectorStore does not yet). What a lost lock can cost:
the steps of two writers interleaving, so that the vector store may keep a product's
older fields or a deleted image's vector; indexing the products written meanwhile again,
and ``visualsearch compact``, repair it.

Not supported: PgBouncer (or any pooler) in *transaction* pooling mode between the
application and PostgreSQL. It hands each transaction whichever server session is
free, so a session-level advisory lock taken by one transaction is held by a session
the next one may not get, and may be released by someone else's. Connect these
processes to PostgreSQL directly or through session pooling.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StorageError, WriterBusyError
from ..file_locks import file_lock

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


class HeldLock:
    """A held catalogue lock, as its ``with`` block sees it."""

    def __init__(self, name: str, connection: Connection | None = None):
        self.name = name
        self._connection = connection  # None: a file lock, held as long as this process lives
        self.lost: BaseException | None = None

    def check(self) -> None:
        """Raise unless the lock is still held: for an advisory lock, its connection must
        still answer (a round trip to the server; a file lock needs none).

        Raises:
            StorageError: the connection holding it failed, so the server has released it
                (or will) and another writer may hold it now.
        """
        if self._connection is None:
            return
        if self.lost is None:
            try:
                self._connection.scalar(text("SELECT 1"))
            except Exception as exc:
                self.lost = exc
        if self.lost is not None:
            raise StorageError(f"the catalogue connection holding lock {self.name!r} was lost "
                               f"({_first_line(self.lost)}); another writer may hold it now: retry")


@contextlib.contextmanager
def catalogue_lock(catalogue: Engine | sessionmaker[Session], name: str, *, data_dir: Path, timeout: float,
                   busy_message: str) -> Iterator[HeldLock]:
    """Hold the catalogue-wide lock ``name`` for the block (not reentrant: a second
    acquisition in the same process waits like any other holder). The block gets a
    :class:`HeldLock`, whose ``check()`` says whether it is still held (see the module doc).

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
    with lock as held:
        yield held


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, busy_message: str) -> Iterator[HeldLock]:
    with file_lock(path, timeout, busy_message):
        yield HeldLock(path.name)  # held as long as this process lives: nothing to check


@contextlib.contextmanager
def _advisory_lock(engine: Engine, name: str, timeout: float, busy_message: str) -> Iterator[HeldLock]:
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
        held = HeldLock(name, connection)
        try:
            yield held
        finally:
            try:
                if held.lost is not None:
                    raise held.lost
                if not connection.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": key}):
                    raise StorageError("the session no longer held it")
            except Exception as exc:
                # A session that lost its connection lost its locks with it, possibly
                # long before this: another writer may have held it meanwhile.
                logger.error("catalogue lock %r was lost while held (%s): another writer may have written "
                             "meanwhile; index the products written since again and run 'visualsearch compact'",
                             name, _first_line(exc))
                # Closing the connection releases the lock too; never hand one that may
                # still hold it back to the pool.
                connection.invalidate()
    finally:
        connection.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
