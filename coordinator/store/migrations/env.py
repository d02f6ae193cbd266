"""Alembic's environment: runs on the connection coordinator/store/migrate.py hands it, inside the
write transaction it already opened (so a migration is all-or-nothing, on SQLite too)."""

from alembic import context

from coordinator.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
