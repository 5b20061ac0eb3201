"""One module per catalogue schema revision (loaded by Alembic from this folder)."""
