"""Alembic's environment: migrate the connection that visualsearch.catalogue.schema hands in."""

from __future__ import annotations

from alembic import context

from visualsearch.catalogue.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the catalogue migrations run through visualsearch.catalogue.schema.upgrade(), "
                       "which passes the connection in config.attributes['connection']")

# SQLite alters tables by copying them (batch mode); the caller's transaction wraps it all.
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
