"""Bulk synthetic traffic for benchmarks: N predictions (+ image rows, + queue items) inserted fast.

No image files are written (benchmarks of the queue query do not read pixels); rows go in with Core
``executemany`` in chunks, one transaction per chunk. Scores and queue reasons come from the real scoring
functions, so the queue has a realistic mix of reasons and priorities.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import Engine, insert
from sqlalchemy.dialects import postgresql, sqlite

from review import scoring
from review.db import Model, Prediction, QueueEntry, StoredImage, create_all, utcnow
from review.ingest import Thresholds
from review.types import REASONS

DEFAULT_THRESHOLDS = Thresholds(low_confidence=0.6, low_margin=0.2, high_loss=1.0, audit_rate=0.02,
                                second_opinion_rate=0.0)


def populate(engine: Engine, n: int, *, vocab: tuple[str, ...] = ("cat", "dog", "bird", "fish"),
             model_version: str = "synthetic@000000000000", alpha: float = 0.6, claimed_share: float = 0.05,
             th: Thresholds = DEFAULT_THRESHOLDS, chunk: int = 20_000, seed: int = 0) -> dict:
    """Insert ``n`` predictions; returns {"predictions": n, "queued": number of queue items}."""
    create_all(engine)
    rng = np.random.default_rng(seed)
    ins = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    with engine.begin() as conn:
        conn.execute(ins(Model).on_conflict_do_nothing(index_elements=["version"]),
                     [{"version": model_version, "name": "synthetic", "sha256": "0" * 64, "vocab": list(vocab),
                       "first_seen": utcnow()}])
    start = utcnow() - timedelta(days=1)
    queued = 0
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        probs = rng.dirichlet([alpha] * len(vocab), size=m)
        ids = [uuid.UUID(int=int(x), version=4).hex for x in rng.integers(0, 2**63, size=m)]
        shas = [f"{x:016x}" * 4 for x in rng.integers(0, 2**63, size=m)]
        conf, marg, ent = scoring.confidence(probs), scoring.margin(probs), scoring.entropy(probs)
        labels = np.where(rng.random(m) < claimed_share, rng.integers(0, len(vocab), size=m), -1)
        loss = scoring.loss(labels, probs)
        reasons = scoring.review_reasons(conf, marg, loss, scoring.is_audit(ids, th.audit_rate),
                                         low_confidence=th.low_confidence, low_margin=th.low_margin,
                                         high_loss=th.high_loss)
        prio = scoring.queue_priority(reasons, conf, marg, loss)
        top = probs.argmax(axis=1)
        times = [start + timedelta(seconds=0.05 * (lo + i)) for i in range(m)]
        images = [{"sha256": shas[i], "width": 224, "height": 224, "size_bytes": 50_000, "created": times[i]}
                  for i in range(m)]
        preds = [{"id": ids[i], "created": times[i], "source": "upload", "model_version": model_version,
                  "image_sha256": shas[i], "predicted": vocab[top[i]], "probs": [round(float(p), 6) for p in probs[i]],
                  "confidence": float(conf[i]), "margin": float(marg[i]), "entropy": float(ent[i]),
                  "latency_ms": 20.0, "width": 224, "height": 224, "brightness": 0.5, "feedback_correct": None,
                  "claimed_label": vocab[labels[i]] if labels[i] >= 0 else None,
                  "loss": None if np.isnan(loss[i]) else float(loss[i])} for i in range(m)]
        queue = [{"image_sha256": shas[i], "prediction_id": ids[i], "predicted": vocab[top[i]],
                  "model_version": model_version, "priority": float(prio[i]), "status": "open",
                  "required_decisions": 1, "n_decisions": 0, "created": times[i],
                  **{name: bool(reasons[i] & bit) for name, bit in REASONS.items()}}
                 for i in range(m) if reasons[i]]
        with engine.begin() as conn:
            _bulk(conn, StoredImage, images)
            _bulk(conn, Prediction, preds)
            _bulk(conn, QueueEntry, queue)
        queued += len(queue)
    return {"predictions": n, "queued": queued}


def _bulk(conn, table, rows: list[dict]) -> None:
    """executemany straight to the driver: SQLAlchemy's per-row parameter processing was 2/3 of the time.

    Values are converted the way the column types would: datetimes to SQLite's text format (aware UTC for
    PostgreSQL), JSON to text (PostgreSQL casts it), booleans to 0/1 on SQLite.
    """
    if not rows:
        return
    cols = list(rows[0])
    dialect = conn.dialect
    compiled = insert(table).compile(dialect=dialect, column_keys=cols)
    sql = str(compiled)
    sqlite_db = dialect.name == "sqlite"

    def conv(v):
        if isinstance(v, datetime):
            return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite_db else v
        if isinstance(v, list):
            return json.dumps(v)
        if isinstance(v, bool) and sqlite_db:
            return int(v)
        return v

    if dialect.paramstyle == "qmark":
        order = compiled.positiontup  # the table's column order, not the dict's
        params = [tuple(conv(r[c]) for c in order) for r in rows]
    else:
        params = [{c: conv(r[c]) for c in cols} for r in rows]
    conn.exec_driver_sql(sql, params)
