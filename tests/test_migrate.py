"""A database of an earlier Loupe release is upgraded in place at start (review/migrate.py, Alembic), keeps every
row, and ends with exactly today's tables; a fresh database is created and stamped with the newest revision.

The release database is made by running revision 0001 (the first release's tables, as its create_all made them) and
dropping ``alembic_version`` (that release had no migrations), then filled with rows the way that release wrote
them: a prediction, a queued item, a reviewer's decision."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from review import migrate
from review.db import Base
from review.desk import ReviewDesk
from review.store import ReviewStore
from tests.review_fixtures import MODEL, make_settings

pytest_plugins = ["tests.review_fixtures"]

NOW = datetime(2026, 6, 1, tzinfo=UTC)
ROWS = {
    "models": {"version": MODEL.version, "name": MODEL.name, "sha256": MODEL.sha256, "vocab": json.dumps(MODEL.vocab),
               "first_seen": NOW},
    "images": {"sha256": "cd" * 32, "width": 8, "height": 8, "size_bytes": 100, "created": NOW},
    "predictions": {"id": "p" * 32, "created": NOW, "source": "upload", "model_version": MODEL.version,
                    "image_sha256": "cd" * 32, "predicted": "red", "probs": json.dumps([0.5, 0.3, 0.2]),
                    "confidence": 0.5, "margin": 0.2, "entropy": 1.0, "latency_ms": 3.0, "width": 8, "height": 8,
                    "brightness": 0.4},
    "queue_items": {"id": 1, "image_sha256": "cd" * 32, "prediction_id": "p" * 32, "predicted": "red",
                    "model_version": MODEL.version, "low_confidence": True, "high_loss": False, "audit": False,
                    "dataset": False, "user_flagged": False, "priority": 0.5, "status": "open",
                    "required_decisions": 1, "n_decisions": 0, "created": NOW},
    "decisions": {"id": 1, "item_id": 1, "reviewer": "ann", "created": NOW, "action": "skip",
                  "model_version": MODEL.version, "idempotency_key": "k1"},
}


def head() -> str:
    return ScriptDirectory(str(migrate.MIGRATIONS)).get_current_head()


def schema_diff(engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def revision(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def make_release_database(url: str) -> None:
    from alembic import command

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(migrate.config(conn), migrate.FIRST_RELEASE)
        conn.exec_driver_sql("DROP TABLE alembic_version")
        for table, row in ROWS.items():
            conn.execute(text(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"),
                         row)
    engine.dispose()


def test_a_first_release_database_is_upgraded_in_place_and_keeps_its_rows(db_url, tmp_path):
    make_release_database(db_url)
    engine = create_engine(db_url)
    assert schema_diff(engine), "the release schema should differ from today's (else this test checks nothing)"
    assert revision(engine) is None

    store = ReviewStore(make_settings(tmp_path, db_url))  # what every start does
    try:
        assert schema_diff(engine) == []
        assert revision(engine) == head()
        with engine.connect() as conn:
            for table in ROWS:
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 1, table
            assert conn.execute(text("SELECT saturation, unfamiliar FROM predictions")).one() == (None, None)
            # queue reasons added since: false for what was queued before them
            assert tuple(conn.execute(text("SELECT unfamiliar, claimed_out_of_domain FROM queue_items")).one()) \
                in {(False, False), (0, 0)}
        # The old rows work with today's code: the reviewer's queued item is served, and decided.
        desk = ReviewDesk(store)
        item = desk.next_item("bob")
        assert item is not None and item.predicted == "red"
        desk.decide("bob", item.item_id, action="confirm", label=None, idempotency_key="k2")
        counts = desk.counts()
        assert (counts["queue_open"], counts["queue_done"], counts["predictions"]) == (0, 1, 1)
    finally:
        store.close()
        engine.dispose()

    ReviewStore(make_settings(tmp_path, db_url)).close()  # a second start: nothing left to do, nothing breaks
    engine = create_engine(db_url)
    assert revision(engine) == head() and schema_diff(engine) == []
    engine.dispose()


def test_a_fresh_database_gets_todays_tables_stamped_with_the_newest_revision(db_url, tmp_path):
    ReviewStore(make_settings(tmp_path, db_url)).close()
    engine = create_engine(db_url)
    assert revision(engine) == head()
    assert schema_diff(engine) == []
    engine.dispose()
