"""Open the catalogue database: engine, WAL mode for SQLite, schema creation."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigurationError
from ..storage_errors import is_read_only_file_system, storage_error_from
from .counters import install_sqlite_triggers
from .models import Base

logger = logging.getLogger(__name__)

# How long a write waits for another writer's transaction before StorageBusyError.
BUSY_TIMEOUT_MS = 30_000


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


def _create_schema(engine: Engine) -> None:
    with engine.begin() as connection:
        Base.metadata.create_all(connection)
        _add_missing_columns(connection)
        for table in Base.metadata.sorted_tables:  # indexes added since a catalogue was created
            for index in table.indexes:
                index.create(connection, checkfirst=True)
        if engine.dialect.name == "sqlite":
            install_sqlite_triggers(connection)


def _add_missing_columns(connection: Connection) -> None:
    """Add the nullable columns added to the models since a catalogue was created
    (e.g. ``product_images.source_etag``); create_all only creates missing tables."""
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable or column.server_default is not None:
                raise ConfigurationError(f"catalogue table {table.name} lacks column {column.name}, which "
                                         "cannot be added in place: rebuild the catalogue")
            kind = column.type.compile(dialect=connection.dialect)
            preparer = connection.dialect.identifier_preparer
            connection.execute(text(f"ALTER TABLE {preparer.quote(table.name)} "
                                    f"ADD COLUMN {preparer.quote(column.name)} {kind}"))
            logger.info("catalogue: added column %s.%s", table.name, column.name)


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite catalogue URL; None for in-memory SQLite and server databases."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///"))
    return None


def open_catalogue(url: str, *, read_only: bool = False) -> sessionmaker[Session]:
    """Connect to the catalogue at ``url`` (any SQLAlchemy URL), creating tables if needed.

    Args:
        read_only: open an existing SQLite catalogue read-only: no schema changes, and
            it opens on a read-only file system or a full disk (see
            :func:`_connect_read_only`). Other databases ignore it.

    Returns:
        A session factory bound to the engine.

    Raises:
        StorageError: the disk refused (read-only, full, permission denied).
        ConfigurationError: the URL is malformed or the database cannot be reached.
    """
    database = sqlite_path(url)
    try:
        if read_only and database is not None:
            engine: Engine = create_engine(url, creator=lambda: _connect_read_only(database))
            event.listen(engine, "connect", _read_only_pragmas)
            return sessionmaker(engine, expire_on_commit=False)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    except Exception as exc:
        _raise_storage_error(exc, database)
        raise ConfigurationError(f"cannot use catalogue database {url!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        try:
            _create_schema(engine)
        except OperationalError as exc:
            _raise_storage_error(exc, database)
            # Two processes creating a fresh catalogue at once: the loser's CREATE fails
            # because the winner's table now exists; checking again then finds it.
            time.sleep(0.5)
            _create_schema(engine)
    except Exception as exc:
        engine.dispose()
        _raise_storage_error(exc, database)
        raise ConfigurationError(f"cannot open catalogue database {engine.url!r}: {exc}") from None
    return sessionmaker(engine, expire_on_commit=False)


def _raise_storage_error(exc: Exception, database: Path | None) -> None:
    typed = storage_error_from(exc, database.parent if database is not None else Path.cwd())
    if typed is not None:
        raise typed from None
