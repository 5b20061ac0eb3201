"""The catalogue schema as it was when migrations began: tables, indexes, counting triggers.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

from visualsearch.catalogue.migrations.baseline import create_baseline, drop_baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_baseline(op.get_bind())


def downgrade() -> None:
    drop_baseline(op.get_bind())
