"""Tuned recipes' projection files kept in the catalogue, so that every replica can load them.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("projections"):
        return  # a catalogue whose revision table was lost, stamped at the baseline again
    # Written out rather than taken from the models, which later revisions may change.
    op.create_table(
        "projections",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("projections")
