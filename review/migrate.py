"""The database schema: created fresh, or upgraded in place from an earlier Loupe release (Alembic).

Reviewers' decisions live in this database, so a new Loupe version must never ask people to start over: every
schema change since the first release is an Alembic revision in review/migrations/versions/, and every start runs
``upgrade(engine)``:

* an empty database gets today's tables (``create_all``) and is stamped with the newest revision;
* a database of the first release (tables, no ``alembic_version``; migrations did not exist yet) is stamped
  "0001" and upgraded;
* any other is upgraded to the newest revision (nothing to do when it is current).

tests/test_migrate.py holds the tables and the revisions to each other: a first-release database upgraded to the
newest revision must match ``review.db``'s tables exactly, so a column added without its revision fails the suite.
Replicas starting together on PostgreSQL take turns under a transaction-scoped advisory lock.

Adding a column or table: change review.db, then write the next revision file by hand or from what Alembic's
``autogenerate.produce_migrations`` reports against a database at the previous head (render_as_batch=True for
SQLite); give new NOT NULL columns a server default so existing rows get a value.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, inspect

from review.db import Base

MIGRATIONS = Path(__file__).with_name("migrations")
FIRST_RELEASE = "0001"
_SCHEMA_LOCK = 0x4C6F757065  # "Loupe": the advisory lock replicas share while they create or upgrade the schema


def config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
        _upgrade(conn)


def _upgrade(conn: Connection) -> None:
    cfg = config(conn)
    tables = set(inspect(conn).get_table_names())
    if "predictions" not in tables:
        Base.metadata.create_all(conn)
        command.stamp(cfg, "head")
        return
    if "alembic_version" not in tables:
        command.stamp(cfg, FIRST_RELEASE)
    command.upgrade(cfg, "head")
