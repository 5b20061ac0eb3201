"""Open the catalogue database: engine and pool, WAL mode for SQLite, schema migrations."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import weakref
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigurationError
from ..storage_errors import is_read_only_file_system, server_error_message, storage_error_from
from . import schema

logger = logging.getLogger(__name__)

# How long a write waits for another writer's transaction before StorageBusyError.
BUSY_TIMEOUT_MS = 30_000
# Server databases: connections per process. A gunicorn worker serves up to its thread
# count of requests at once, each holding one connection for a moment; a batch run
# holds one more for its lock. Beyond the pool, overflow connections open and close.
POOL_SIZE = 8
MAX_OVERFLOW = 16
POOL_TIMEOUT_S = 30
# Recycle before server-side idle timeouts and proxies (PgBouncer, cloud NATs) drop them.
POOL_RECYCLE_S = 1800
CONNECT_TIMEOUT_S = 10
# libpq's TCP keepalives on this end: a connection whose path died (a NAT or firewall
# dropping it, the server's host gone) fails within IDLE + INTERVAL * COUNT seconds
# instead of the operating system's two hours, so the holder of an advisory lock learns
# of it at its next check (visualsearch.catalogue.locks). The server ends a session whose
# client vanished, releasing its locks, after the server's own tcp_keepalives_* settings.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


class NoCatalogueError(ConfigurationError):
    """A read-only open of a server database that holds no catalogue (nothing indexed yet)."""


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers (the web app) never block on the indexer's writes and vice versa.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # 64 MiB of page cache (the default is 2 MiB): at millions of images the sku and
    # sha256 indexes take random inserts and lookups that should not go to disk each time.
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.close()


def _read_only_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=1")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.close()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that works where nothing can be written.

    ``mode=ro`` still needs the WAL index (the -shm file), which SQLite creates if it is
    missing; on a read-only file system or a full disk it cannot, and then only an
    ``immutable`` connection can read the file. Immutable means no locking and no WAL:
    right for a file nobody can change, and the last committed (checkpointed) state
    otherwise, which is why it is only the fallback.
    """
    uri = path.resolve().as_uri()
    connection = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return connection
    except sqlite3.OperationalError as exc:
        connection.close()
        if not is_read_only_file_system(path):  # (on a read-only mount, immutable is simply true)
            logger.warning("catalogue %s opened immutable (%s): writes by other processes are not seen "
                           "until a restart", path, exc)
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite catalogue URL; None for in-memory SQLite and server databases."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///"))
    return None


def open_catalogue(url: str, *, read_only: bool = False) -> sessionmaker[Session]:
    """Connect to the catalogue at ``url`` (any SQLAlchemy URL), creating or migrating
    its schema to the newest revision (:mod:`.schema`) unless ``read_only``.

    Args:
        read_only: never change the schema. An existing SQLite catalogue is opened
            read-only, which works on a read-only file system or a full disk (see
            :func:`_connect_read_only`); a server database must already hold a catalogue.

    Returns:
        A session factory bound to the engine.

    Raises:
        StorageError: the disk refused (read-only, full, permission denied).
        ConfigurationError: the URL is malformed, its driver is not installed, the
            database cannot be reached, or (read-only, NoCatalogueError) it holds no catalogue.
    """
    database = sqlite_path(url)
    try:
        if read_only and database is not None:
            engine: Engine = create_engine(url, creator=lambda: _connect_read_only(database))
            event.listen(engine, "connect", _read_only_pragmas)
            return _sessions(engine)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        engine = _create_engine(url)
    except Exception as exc:
        _raise_storage_error(exc, database)
        raise ConfigurationError(_cannot_use(url, exc)) from None
    try:
        if read_only:
            _check_has_schema(engine)
        else:
            _migrate(engine, database)
    except ConfigurationError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        unreachable = server_error_message(exc, engine.url)  # (with the server's address, unlike a StorageError)
        if unreachable is not None:
            raise ConfigurationError(unreachable) from None
        _raise_storage_error(exc, database)
        raise ConfigurationError(f"cannot open catalogue database {engine.url!r}: {exc}") from None
    return _sessions(engine)


def _sessions(engine: Engine) -> sessionmaker[Session]:
    sessions = sessionmaker(engine, expire_on_commit=False)
    # Close the pooled connections when the factory goes (a server keeps each one open,
    # and its driver warns about any left to the garbage collector).
    weakref.finalize(sessions, engine.dispose)
    return sessions


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    options = {}
    if make_url(url).get_backend_name() == "postgresql":
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES}
    engine = create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW,
                           pool_timeout=POOL_TIMEOUT_S, pool_recycle=POOL_RECYCLE_S, **options)
    # A connection must never cross a fork (gunicorn --preload, multiprocessing): a
    # child that checks out its parent's connection drops it and opens its own.
    event.listen(engine, "connect", _remember_pid)
    event.listen(engine, "checkout", _refuse_other_pid)
    return engine


def _remember_pid(_dbapi_connection, record) -> None:
    record.info["pid"] = os.getpid()


def _refuse_other_pid(_dbapi_connection, record, proxy) -> None:
    if record.info.get("pid") != os.getpid():
        record.dbapi_connection = proxy.dbapi_connection = None
        raise DisconnectionError(f"connection made by process {record.info.get('pid')}, not {os.getpid()}")


def _migrate(engine: Engine, database: Path | None) -> None:
    try:
        schema.upgrade(engine)
    except OperationalError as exc:
        if engine.dialect.name != "sqlite":
            raise
        _raise_storage_error(exc, database)
        # SQLite's busy timeout ran out behind another process's long first open (or
        # the file's locking refused): one more try finds its work done.
        time.sleep(0.5)
        schema.upgrade(engine)


def _check_has_schema(engine: Engine) -> None:
    with engine.connect() as connection:
        revision = schema.current_revision(connection)
    if revision is None:
        raise NoCatalogueError(f"no catalogue in database {engine.url!r}: index one first with "
                               "'visualsearch index MANIFEST --db URL'")
    if revision != schema.head_revision():
        logger.warning("catalogue %r is at schema revision %s, this version expects %s: any writing "
                       "command migrates it", engine.url, revision, schema.head_revision())


def _cannot_use(url: str, exc: Exception) -> str:
    try:
        shown = repr(make_url(url))  # (the password masked)
    except ArgumentError:
        return f"cannot use catalogue database URL {url.split('@')[-1]!r}: not a database URL ({exc})"
    if isinstance(exc, (ModuleNotFoundError, NoSuchModuleError)):
        extra = " (pip install 'visualsearch[postgres]')" if "postgres" in url else ""
        return f"cannot use catalogue database {shown}: its driver is not installed{extra}: {exc}"
    return f"cannot use catalogue database {shown}: {exc}"


def _raise_storage_error(exc: Exception, database: Path | None) -> None:
    typed = storage_error_from(exc, database.parent if database is not None else Path.cwd())
    if typed is not None:
        raise typed from None
