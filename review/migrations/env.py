"""Alembic environment: migrations run on the connection review.migrate hands over (inside its transaction)."""

from alembic import context

from review.db import Base

connection = context.config.attributes["connection"]
# SQLite alters tables by copying them ("batch" mode); PostgreSQL alters in place.
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
