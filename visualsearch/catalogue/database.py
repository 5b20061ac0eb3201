"""Open the catalogue database: engine, WAL mode for SQLite, schema creation."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConfigurationError
from .counters import install_sqlite_triggers
from .models import Base


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers (the web app) never block on the indexer's writes and vice versa.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # 64 MiB of page cache (the default is 2 MiB): at millions of images the sku and
    # sha256 indexes take random inserts and lookups that should not go to disk each time.
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.close()


def _create_schema(engine: Engine) -> None:
    with engine.begin() as connection:
        Base.metadata.create_all(connection)
        if engine.dialect.name == "sqlite":
            install_sqlite_triggers(connection)


def open_catalogue(url: str) -> sessionmaker[Session]:
    """Connect to the catalogue at ``url`` (any SQLAlchemy URL), creating tables if needed.

    Returns:
        A session factory bound to the engine.

    Raises:
        ConfigurationError: the URL is malformed or the database cannot be reached.
    """
    try:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine: Engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    except Exception as exc:
        raise ConfigurationError(f"cannot use catalogue database {url!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        try:
            _create_schema(engine)
        except OperationalError:
            # Two processes creating a fresh catalogue at once: the loser's CREATE fails
            # because the winner's table now exists; checking again then finds it.
            time.sleep(0.5)
            _create_schema(engine)
    except Exception as exc:
        raise ConfigurationError(f"cannot open catalogue database {engine.url!r}: {exc}") from None
    return sessionmaker(engine, expire_on_commit=False)
