"""Initial schema: snapshots, runs, outcomes, samples.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types as they were in this revision (not imported from
# models, which will move on).
JSON_T = sa.JSON().with_variant(JSONB(), "postgresql")
ID_T = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS_T = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", ID_T, primary_key=True, autoincrement=True),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created", TS_T, nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest", JSON_T, nullable=False),
        sa.Column("consumed_offsets", JSON_T, nullable=False),
        sa.Column("transitions_applied", sa.BigInteger(), nullable=False),
        sa.Column("metrics", JSON_T, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_snapshots"),
        sa.UniqueConstraint("policy", "version", name="uq_snapshots_policy_version"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("started", TS_T, nullable=False),
        sa.Column("ended", TS_T, nullable=True),
        sa.Column("config", JSON_T, nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_table(
        "outcomes",
        sa.Column("id", ID_T, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("window_start", TS_T, nullable=False),
        sa.Column("window_end", TS_T, nullable=False),
        sa.Column("episodes", sa.BigInteger(), nullable=False),
        sa.Column("mean_return", sa.Float(), nullable=False),
        sa.Column("ctr", sa.Float(), nullable=False),
        sa.Column("clicked_quality", sa.Float(), nullable=False),
        sa.Column("served_slates", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outcomes"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_outcomes_run_id_runs", ondelete="CASCADE"
        ),
    )
    op.create_index(
        "ix_outcomes_run_id_policy_version", "outcomes", ["run_id", "policy", "version"]
    )
    op.create_table(
        "samples",
        sa.Column("id", ID_T, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("ts", TS_T, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("labels", JSON_T, nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_samples_run_id_runs", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_samples_run_id_name_ts", "samples", ["run_id", "name", "ts"])


def downgrade() -> None:
    op.drop_index("ix_samples_run_id_name_ts", table_name="samples")
    op.drop_table("samples")
    op.drop_index("ix_outcomes_run_id_policy_version", table_name="outcomes")
    op.drop_table("outcomes")
    op.drop_table("runs")
    op.drop_table("snapshots")
