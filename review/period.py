"""What the Monitor tab and the report show for a period: traffic, confidence, latency, corrections, classes and
inputs against the reference, drift, accuracy, storage. One read transaction, bounded:

* time series are aggregated in SQL per hour or day over ``created`` (indexed), so they cost one pass over the
  period's rows, whatever their number; only latency percentiles need row values, read as one float per row;
* the per-prediction statistics of the current version (classes, confidence, input statistics for the plots against
  its reference) are its latest ``monitor_max_rows`` predictions of the period, read through
  ix_predictions_model_created.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from model.reference import Reference
from review import accuracy, drift
from review.db import Model, Prediction, StoredImage
from review.monitor import TRAFFIC, References, read_window, unfamiliar_column, window_query

P = Prediction


def bucket_expr(dialect: str, unit: str):
    """The prediction's UTC hour ('YYYY-MM-DD HH') or day ('YYYY-MM-DD') as text, in SQL."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", P.created), "YYYY-MM-DD HH24" if unit == "hour" else "YYYY-MM-DD")
    # SQLite stores UTC as sortable text 'YYYY-MM-DD HH:MM:SS.ffffff' (review.db.UTCDateTime)
    return func.substr(P.created, 1, 13 if unit == "hour" else 10)


def choose_bucket(since: datetime, until: datetime) -> str:
    return "hour" if until - since <= timedelta(days=3) else "day"


@dataclass
class PeriodData:
    since: datetime
    until: datetime
    bucket: str  # hour | day
    version: str  # the current version: classes, inputs and drift are its
    vocab: tuple[str, ...]
    reference: Reference | None
    reference_note: str
    traffic: dict[str, dict[str, int]]  # bucket -> source -> predictions
    confidence: list[tuple[str, int, float, float, float | None]]  # bucket, n, mean, low-confidence share, unfamiliar
    latency: list[tuple[str, int, float, float]]  # bucket, n, p50 ms, p95 ms
    corrections: list[tuple[str, int, int]]  # bucket, predictions, corrected
    window: drift.Window  # the current version's latest predictions in the period (at most max_rows)
    checks: list[drift.Check]  # window against the reference
    accuracy: dict[str, dict]  # version -> audit-sample accuracy with its interval
    confusion: dict
    storage: dict
    low_confidence: float
    capped: bool = False  # the window holds max_rows predictions: the period has more
    versions: dict[str, str] = field(default_factory=dict)  # role -> version serving now

    @property
    def total(self) -> int:
        return sum(sum(v.values()) for v in self.traffic.values())


def collect(session: Session, settings, *, version: str, since: datetime, until: datetime,
            references: References, versions: dict[str, str] | None = None) -> PeriodData:
    dialect = session.get_bind().dialect.name
    unit = choose_bucket(since, until)
    b = bucket_expr(dialect, unit).label("b")
    in_period = (P.created >= since, P.created < until, P.source.in_(TRAFFIC))

    traffic: dict[str, dict[str, int]] = {}
    for bucket, source, n in session.execute(select(b, P.source, func.count()).where(*in_period)
                                             .group_by("b", P.source).order_by("b")):
        traffic.setdefault(bucket, {})[source] = n

    flag = unfamiliar_column()
    cols = [b, func.count(), func.avg(P.confidence),
            func.avg(case((P.confidence < settings.low_confidence, 1.0), else_=0.0))]
    if flag is not None:
        cols.append(func.avg(case((flag.is_(None), None), (flag, 1.0), else_=0.0)))
    confidence = [(r[0], int(r[1]), float(r[2]), float(r[3]), (None if len(r) < 5 or r[4] is None else float(r[4])))
                  for r in session.execute(select(*cols).where(*in_period).group_by("b").order_by("b"))]

    lat: dict[str, list[float]] = {}
    for bucket, ms in session.connection().execute(select(b, P.latency_ms).where(*in_period).order_by(
            P.created.desc()).limit(settings.monitor_max_rows)).all():
        lat.setdefault(bucket, []).append(ms)
    latency = [(k, len(v), float(np.percentile(v, 50)), float(np.percentile(v, 95))) for k, v in sorted(lat.items())]

    corrections = accuracy.corrections_by_bucket(session, bucket_expr(dialect, unit), TRAFFIC, since, until)

    window = read_window(session, window_query(P.model_version == version, *in_period,
                                               size=settings.monitor_max_rows))
    vocab = tuple(session.scalar(select(Model.vocab).where(Model.version == version)) or ())
    sha = session.scalar(select(Model.sha256).where(Model.version == version))
    reference, note = references.get(sha) if sha else (None, "unknown model version")
    # Over a whole period the window is far larger than the live one: the noise floor shrinks with it.
    checks = drift.compare(reference, window, drift.Thresholds.from_settings(settings)) if reference else []

    return PeriodData(
        since=since, until=until, bucket=unit, version=version, vocab=vocab, reference=reference,
        reference_note=note, traffic=traffic, confidence=confidence, latency=latency, corrections=corrections,
        window=window, checks=checks, accuracy=accuracy.audit_accuracy(session, since, until),
        confusion=accuracy.reviewed_confusion(session, version, vocab, since, until),
        storage=storage(session, settings), low_confidence=settings.low_confidence,
        capped=len(window) >= settings.monitor_max_rows, versions=dict(versions or {"current": version}))


def storage(session: Session, settings) -> dict:
    n, size = session.execute(select(func.count(), func.coalesce(func.sum(StoredImage.size_bytes), 0))).one()
    out = {"images": int(n), "image_bytes": int(size), "max_bytes": int(settings.max_storage_gb * (1 << 30)) or None,
           "database_bytes": None, "free_bytes": None}
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        out["database_bytes"] = sum(os.path.getsize(p) for p in (url.database, url.database + "-wal")
                                    if os.path.exists(p))
    elif url.get_backend_name() == "postgresql":
        out["database_bytes"] = int(session.scalar(select(func.pg_database_size(func.current_database()))))
    try:
        out["free_bytes"] = shutil.disk_usage(settings.images_dir if settings.images_dir.exists()
                                              else settings.data_dir).free
    except OSError:
        pass  # no such folder yet: nothing stored, nothing to say
    return out
