"""Outcome windows keep the spread of their episodes' returns, for confidence intervals.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: windows recorded before this revision have no spread, and say so.
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("return_sd", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_column("return_sd")
