"""Bring a catalogue database's schema to the newest migration (Alembic, run in-process).

Every writable open goes through :func:`upgrade`: a fresh database gets every
revision, one made before migrations existed is brought to the baseline and stamped,
one already at the head costs one query. Two processes opening a new catalogue at
once are serialised by the database itself (SQLite's write lock taken up front,
PostgreSQL's transaction-level advisory lock), so the second finds the work done.
Read-only opens never migrate.
"""

from __future__ import annotations

import functools
import logging
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from .migrations.baseline import bring_to_baseline

logger = logging.getLogger(__name__)

BASELINE_REVISION = "0001"
VERSION_TABLE = "alembic_version"
# Serialises migrations of one PostgreSQL database across hosts ("vsschema").
_MIGRATION_LOCK_KEY = 0x7673_7363_6865_6D61


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the packaged migrations (no ``alembic.ini``)."""
    config = Config()
    config.set_main_option("script_location", str(resources.files(__package__) / "migrations"))
    config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision() -> str:
    """The newest migration's revision id."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision a database is at (None: never migrated, or empty)."""
    if not inspect(connection).has_table(VERSION_TABLE):  # (quieter than a MigrationContext)
        return None
    return connection.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))


def upgrade(engine: Engine) -> None:
    """Create or migrate the schema to :func:`head_revision`.

    Raises:
        sqlalchemy.exc.DBAPIError: the database refused (callers translate it).
        ConfigurationError: a catalogue made before migrations that cannot be brought to
            the baseline in place.
    """
    with engine.connect() as connection:
        if current_revision(connection) == head_revision():
            return
    with engine.connect() as connection:
        _lock_for_migration(connection)
        revision = current_revision(connection)  # again: another process may have done it meanwhile
        if revision != head_revision():
            config = alembic_config(connection)
            if revision is None and inspect(connection).has_table("products"):
                logger.info("catalogue made before migrations: bringing it to revision %s", BASELINE_REVISION)
                bring_to_baseline(connection)
                command.stamp(config, BASELINE_REVISION)
            command.upgrade(config, "head")
            logger.info("catalogue schema at revision %s (was %s)", head_revision(), revision)
        connection.commit()


def _lock_for_migration(connection: Connection) -> None:
    """Start the migration's transaction holding the database's write lock."""
    if connection.dialect.name == "sqlite":
        # pysqlite begins lazily and never before DDL: take the write lock now, so that
        # the check above and the migration are one transaction (busy_timeout waits).
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
