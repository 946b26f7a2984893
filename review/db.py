"""Tables (SQLAlchemy 2.0 typed) and engines for SQLite and PostgreSQL.

Data functions elsewhere take a ``Session``; whoever calls them owns the transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers queue behind BEGIN IMMEDIATE; 30 s is far above any real transaction


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python; timestamptz on PostgreSQL, sortable naive-UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        # SQLite compares these as text: one fixed format without offset keeps that order chronological.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Model(Base):
    """One row per served model version, so predictions do not repeat the vocab."""

    __tablename__ = "models"
    version: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    vocab: Mapped[list] = mapped_column(JSON)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class StoredImage(Base):
    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Prediction(Base):
    __tablename__ = "predictions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    created: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    source: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(ForeignKey("models.version"))
    # NULL when storing uploads is switched off: the prediction is still counted, never reviewed.
    image_sha256: Mapped[str | None] = mapped_column(ForeignKey("images.sha256"), index=True)
    predicted: Mapped[str] = mapped_column(String(200))
    probs: Mapped[list] = mapped_column(JSON)  # in the model's vocab order
    confidence: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    brightness: Mapped[float | None] = mapped_column(Float)
    # mean chroma (model/reference.py): greyscale share for drift alarms; measured by the writer like brightness
    saturation: Mapped[float | None] = mapped_column(Float)
    feedback_correct: Mapped[bool | None] = mapped_column(Boolean)
    claimed_label: Mapped[str | None] = mapped_column(String(200))
    loss: Mapped[float | None] = mapped_column(Float)  # known once a label is claimed
    # unlike the model's reference images (model/unfamiliar.py); NULL: unknown (no detector or no features)
    unfamiliar: Mapped[bool | None] = mapped_column(Boolean)
    unfamiliar_score: Mapped[float | None] = mapped_column(Float)  # its Mahalanobis distance (threshold: reference)

    __table_args__ = (
        # rescoring walks the labelled predictions only
        Index("ix_predictions_claimed", "image_sha256", postgresql_where=text("claimed_label IS NOT NULL"),
              sqlite_where=text("claimed_label IS NOT NULL")),
        # the drift window: a version's latest predictions (review/monitor.py), without sorting the whole log
        Index("ix_predictions_model_created", "model_version", "created"),
    )


class QueueEntry(Base):
    """One per image: exact duplicates are reviewed once. Claimed = a live lease, status stays 'open'."""

    __tablename__ = "queue_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # no FK to images: a purge may drop the image while decided items (and their decisions) stay
    image_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # indexed: deleting predictions (purge) makes the database look up the items that point at them
    prediction_id: Mapped[str | None] = mapped_column(ForeignKey("predictions.id", ondelete="SET NULL"), index=True)
    predicted: Mapped[str] = mapped_column(String(200))  # copied from the prediction for index-only filters
    model_version: Mapped[str] = mapped_column(String(200))
    low_confidence: Mapped[bool] = mapped_column(Boolean, default=False)
    high_loss: Mapped[bool] = mapped_column(Boolean, default=False)
    audit: Mapped[bool] = mapped_column(Boolean, default=False)
    dataset: Mapped[bool] = mapped_column(Boolean, default=False)
    user_flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    # Reasons added after the first release: a server default fills the rows queued before them ("0": false in
    # SQLite and PostgreSQL alike, and a plain string lets SQLite add the column without copying the table).
    unfamiliar: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    claimed_out_of_domain: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    priority: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(8), default="open")  # open | done
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    required_decisions: Mapped[int] = mapped_column(Integer, default=1)
    n_decisions: Mapped[int] = mapped_column(Integer, default=0)
    label: Mapped[str | None] = mapped_column(String(200))  # the reviewers' current label (None if excluded)
    outcome: Mapped[str | None] = mapped_column(String(16))  # last decisive action
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def _partial(name: str, *cols, where: str) -> Index:
    # Queries must repeat `where` verbatim (literal SQL, not a bound parameter) for the index to apply.
    return Index(name, *cols, postgresql_where=text(where), sqlite_where=text(where))


_Q = QueueEntry
# The claim query is "status = 'open' ORDER BY priority DESC, id LIMIT 1": this index answers it by reading its
# first entries, and serves the per-status counts. Full, not partial, so any planner picks it without statistics.
Index("ix_queue_next", _Q.status, _Q.priority.desc(), _Q.id)
Index("ix_queue_predicted", _Q.status, _Q.predicted, _Q.priority.desc(), _Q.id)
Index("ix_queue_model", _Q.status, _Q.model_version, _Q.priority.desc(), _Q.id)
for _reason in ("low_confidence", "high_loss", "audit", "dataset", "user_flagged", "unfamiliar",
                "claimed_out_of_domain"):
    # Partial on the reason alone (with status as the first column): SQLite's planner then picks it for
    # "status = 'open' AND <reason>"; with the status in the WHERE it preferred scanning ix_queue_next.
    _partial(f"ix_queue_{_reason}", _Q.status, _Q.priority.desc(), _Q.id, where=_reason)
_partial("ix_queue_claimed", _Q.claimed_by, where="claimed_by IS NOT NULL")  # a reviewer's current claim
_partial("ix_queue_second", _Q.status, _Q.n_decisions, where="required_decisions >= 2")  # second-opinion counts


class Decision(Base):
    """Append-only: rows are never updated or deleted. An undo is a new row pointing at what it reverses."""

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("queue_items.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(200))
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(String(16))  # ACTIONS or "undo"
    label: Mapped[str | None] = mapped_column(String(200))
    previous_label: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    # UNIQUE: a decision can be reversed at most once, even by two racing undo clicks
    reverses_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"), unique=True)

    __table_args__ = (Index("ix_decisions_reviewer", "reviewer", "id"),)


class ReviewerMark(Base):
    """Mutable companion of the log: items a reviewer has decided or skipped are not offered to them again."""

    __tablename__ = "reviewer_marks"
    item_id: Mapped[int] = mapped_column(ForeignKey("queue_items.id"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(200), primary_key=True)
    action: Mapped[str] = mapped_column(String(16))


# --- model versions (issue 8): the registry model/versions.py works on. New tables, not new columns on `models`:
# create_all adds missing tables to an existing database but never alters existing ones.
class ModelVersion(Base):
    """A trained model that can be served: its file, lineage, data snapshot, metrics and rollout status."""

    __tablename__ = "model_versions"
    version: Mapped[str] = mapped_column(String(200), primary_key=True)  # "<name>@<sha256[:12]>" = ModelInfo.version
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)  # the pin every load checks
    path: Mapped[str] = mapped_column(String(1000))  # export.pkl; relative to the data dir unless absolute
    vocab: Mapped[list] = mapped_column(JSON)
    parent: Mapped[str | None] = mapped_column(String(200))  # the version it was fine-tuned from
    status: Mapped[str] = mapped_column(String(16))  # model.versions.STATUSES
    note: Mapped[str] = mapped_column(String(2000), default="")
    data: Mapped[dict] = mapped_column(JSON)  # snapshot: counts per class and source, base dataset, decisions used
    metrics: Mapped[dict] = mapped_column(JSON)  # held-out error rate, per-class precision/recall
    recipe: Mapped[dict | None] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_changed: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        # At most one current version, whatever replicas race: the database refuses a second one.
        Index("ux_model_versions_current", "status", unique=True, postgresql_where=text("status = 'current'"),
              sqlite_where=text("status = 'current'")),
    )


class ModelVersionEvent(Base):
    """Append-only history of status changes: the audit trail, and where a rollback finds the previous current."""

    __tablename__ = "model_version_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"), index=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(String(2000), default="")


class TrainingImage(Base):
    """Which images (and labels) a version was trained and validated on: the gate compares versions on reviewed
    items a candidate never saw, and import-dataset warns when it audits a model on its own training images."""

    __tablename__ = "model_training_images"
    version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"), primary_key=True)
    image_sha256: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    label: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(5))  # train | valid
    source: Mapped[str] = mapped_column(String(32))  # review.trainset.SOURCES


# --- rollout (issue 8, section 5): new tables, so create_all adds them to existing databases ------------------------
class ShadowPrediction(Base):
    """A candidate's answer to a live request it did not serve (role "shadow"): logged beside the served
    prediction, never shown. The promotion gate counts these and the disagreements among them."""

    __tablename__ = "shadow_predictions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The served prediction (predictions.id). No foreign key: the served row is written by the prediction log's
    # own background writer, which may commit after this one; a purge may also drop it first.
    prediction_id: Mapped[str] = mapped_column(String(32), index=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    role: Mapped[str] = mapped_column(String(16))  # "shadow"
    model_version: Mapped[str] = mapped_column(String(200))  # the candidate that scored it
    served_version: Mapped[str] = mapped_column(String(200))  # the model whose answer the user got
    served_label: Mapped[str] = mapped_column(String(200))
    predicted: Mapped[str] = mapped_column(String(200))  # the candidate's top class
    confidence: Mapped[float] = mapped_column(Float)
    probs: Mapped[list] = mapped_column(JSON)  # in the candidate's vocab order
    agrees: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_shadow_version", "model_version", "served_version", "agrees", "id"),)


class RolloutAction(Base):
    """Append-only log of what people did to the rollout: shadow, canary (with its share), stop, "seen" (looked at
    the shadow disagreements), promote (with what the gate checked, and any override), rollback."""

    __tablename__ = "rollout_actions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(200), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    canary_share: Mapped[float | None] = mapped_column(Float)
    against: Mapped[str | None] = mapped_column(String(200))  # the current version at the time (seen, promote)
    seen_upto: Mapped[int | None] = mapped_column(Integer)  # seen: the last shadow_predictions.id looked at
    gate: Mapped[dict | None] = mapped_column(JSON)  # promote: every check, its numbers and its verdict
    override: Mapped[str | None] = mapped_column(String(2000))  # promote over a failed gate: the person's reason
    note: Mapped[str] = mapped_column(String(2000), default="")


def make_engine(url: str, *, deferred: bool = False) -> Engine:
    """Engine for ``url``. SQLite: WAL, busy timeout, foreign keys, every transaction ``BEGIN IMMEDIATE``.

    ``deferred=True`` (SQLite only) gives plain ``BEGIN`` for read-only work: WAL readers need no lock, and an
    IMMEDIATE read would queue behind writers for nothing.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_size=16, max_overflow=16, connect_args={"check_same_thread": False})
    begin = "BEGIN" if deferred else "BEGIN IMMEDIATE"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Autocommit at the driver: pysqlite would otherwise emit its own deferred BEGIN (SQLAlchemy's
        # "Serializable isolation / Savepoints / Transactional DDL" recipe). We BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # WAL + NORMAL commits survive a killed process but not a power cut; FULL also fsyncs the WAL, which costs
        # a few ms. Transactions run with execution option durable=True (decisions: a person's work) get FULL;
        # being sequential, that fsync also makes every earlier NORMAL commit durable.
        durable = bool(conn.get_execution_options().get("durable"))
        if conn.info.get("durable") != durable:
            conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            conn.info["durable"] = durable
        # IMMEDIATE takes the write lock up front: a deferred read-then-write transaction fails at once with
        # "database is locked" (SQLITE_BUSY_SNAPSHOT) when another connection committed in between.
        conn.exec_driver_sql(begin)

    return engine



def create_all(engine: Engine) -> None:
    """Create the schema, or upgrade an existing one to this version's (review.migrate: Alembic)."""
    from review.migrate import upgrade

    upgrade(engine)
