"""recloop's storage layer: snapshot metadata, experiment runs and dashboard metrics.

SQLAlchemy 2 models with alembic migrations; SQLite by default, PostgreSQL by URL.
"""

from recloop.storage.engine import make_engine, normalise_url
from recloop.storage.schema import current_revision, head_revision, migrate
from recloop.storage.store import Outcome, Sample, SnapshotConflict, Storage, StorageError

__all__ = [
    "Outcome",
    "Sample",
    "SnapshotConflict",
    "Storage",
    "StorageError",
    "current_revision",
    "head_revision",
    "make_engine",
    "migrate",
    "normalise_url",
]
