"""Alembic migrations for recloop's storage schema (applied by ``storage.migrate``)."""
