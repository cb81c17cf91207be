"""Tables: snapshot metadata, experiment runs, per-version outcomes, and metric samples.

Every change to these classes needs a migration under
``recloop/storage/migrations/versions``; the integration tests compare the migrated schema
against these models on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL (indexable, compact); plain JSON text elsewhere.
JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
UtcDateTime = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base with a fixed naming convention, so migrations name things stably."""


Base.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class SnapshotRow(Base):
    """One published policy snapshot: where it lies, its hashes, and what it had learned."""

    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("policy", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    policy: Mapped[str] = mapped_column(String(128))
    algorithm: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]] = mapped_column(JsonType)
    consumed_offsets: Mapped[dict[str, Any]] = mapped_column(JsonType)
    transitions_applied: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType)


class RunRow(Base):
    """One experiment run (a demo, a benchmark, a learning test)."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    started: Mapped[datetime] = mapped_column(UtcDateTime)
    ended: Mapped[datetime | None] = mapped_column(UtcDateTime)
    config: Mapped[dict[str, Any]] = mapped_column(JsonType)
    notes: Mapped[str] = mapped_column(Text, default="")


class OutcomeRow(Base):
    """What slates served by one policy version achieved in one time window of a run."""

    __tablename__ = "outcomes"
    __table_args__ = (Index(None, "run_id", "policy", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    policy: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    window_start: Mapped[datetime] = mapped_column(UtcDateTime)
    window_end: Mapped[datetime] = mapped_column(UtcDateTime)
    episodes: Mapped[int] = mapped_column(BigInteger)
    mean_return: Mapped[float] = mapped_column(Float)
    ctr: Mapped[float] = mapped_column(Float)
    clicked_quality: Mapped[float] = mapped_column(Float)
    served_slates: Mapped[int] = mapped_column(BigInteger)
    return_sd: Mapped[float | None] = mapped_column(Float, nullable=True)


class SampleRow(Base):
    """One observation of a time series (learner lag, freshness, events per second...)."""

    __tablename__ = "samples"
    __table_args__ = (Index(None, "run_id", "name", "ts"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(UtcDateTime)
    name: Mapped[str] = mapped_column(String(128))
    labels: Mapped[dict[str, str]] = mapped_column(JsonType)
    value: Mapped[float] = mapped_column(Float)
