"""Alembic migrations for recloop's storage schema (applied by ``recloop.storage.migrate``)."""
