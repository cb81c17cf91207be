"""Alembic environment: runs on the connection ``recloop.storage.migrate`` hands it.

Run programmatically only (``recloop.storage.migrate(url)`` or ``recloop db upgrade``); there is no
alembic.ini to keep in step with the settings.
"""

from __future__ import annotations

from alembic import context

from recloop.storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through recloop.storage.migrate(url), not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
