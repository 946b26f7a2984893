"""The model registry: every trained model with its sha256, lineage, data snapshot, metrics and rollout status.

Data functions take a SQLAlchemy ``Session``; the caller owns the transaction (``ReviewStore.transaction``).
Tables: review.db ``ModelVersion``, ``ModelVersionEvent`` (append-only status history), ``TrainingImage``.

Statuses and the allowed transitions (``TRANSITIONS``)::

    candidate -> shadow | canary | current | retired
    shadow    -> candidate | canary | current | retired
    canary    -> candidate | shadow | current | retired
    current   -> retired                  (only when another version becomes current: promote or rollback)
    retired   -> candidate | current      (current: a rollback)

There is at most one ``current`` (a unique partial index: racing replicas cannot make two) and at most one
candidate in a role (``shadow`` or ``canary``), as the router (serving.router.Routes) holds one candidate. Making a
version current retires the previous current; putting one in a role sends the previous one back to candidate.

A registered version loads only through the pinned path: ``load_predictor(record, settings)`` reads the file once,
checks the registry's sha256 and unpickles those bytes (model.loading). Every registered version is also in the
``models`` table (review.store's vocab registry, used by logging) under the same version string.

CLI (model.versions_cli): ``python -m model.versions list | show <version> | compare <a> <b>`` (read-only), and
the rollout commands (``shadow | canary | stop | disagreements | seen | gate | promote | rollback | history``:
model.rollout_cli), which change statuses only through model.rollout, so promotion always goes through the gate
(model.promotion).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from review.db import Model, ModelVersion, ModelVersionEvent, TrainingImage

STATUSES = ("candidate", "shadow", "canary", "current", "retired")
ROLES = ("shadow", "canary")
TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"shadow", "canary", "current", "retired"}),
    "shadow": frozenset({"candidate", "canary", "current", "retired"}),
    "canary": frozenset({"candidate", "shadow", "current", "retired"}),
    "current": frozenset({"retired"}),
    "retired": frozenset({"candidate", "current"}),
}


class VersionError(ValueError):
    """A registry mistake (unknown version, a transition that is not allowed); ``args[0]`` is safe to show."""


@dataclass(frozen=True)
class VersionRecord:
    version: str
    name: str
    sha256: str
    path: str
    vocab: tuple[str, ...]
    parent: str | None
    status: str
    note: str
    data: dict
    metrics: dict
    recipe: dict | None
    created: datetime
    status_changed: datetime

    def export_path(self, data_dir: Path) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() else Path(data_dir) / p

    def report_dir(self, data_dir: Path) -> Path:
        return self.export_path(data_dir).parent / "report"

    @property
    def error_rate(self) -> float | None:
        return self.metrics.get("error_rate")


def version_of(name: str, sha256: str) -> str:
    """The version string, the same as model.predictor.ModelInfo.version."""
    return f"{name}@{sha256[:12]}"


def _record(row: ModelVersion) -> VersionRecord:
    return VersionRecord(row.version, row.name, row.sha256, row.path, tuple(row.vocab), row.parent, row.status,
                         row.note or "", dict(row.data or {}), dict(row.metrics or {}),
                         dict(row.recipe) if row.recipe is not None else None, row.created, row.status_changed)


def _insert_vocab(session: Session, version: str, name: str, sha256: str, vocab, now: datetime) -> None:
    ins = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(ins(Model).on_conflict_do_nothing(index_elements=["version"]),
                    [{"version": version, "name": name, "sha256": sha256, "vocab": list(vocab), "first_seen": now}])


def register(session: Session, *, name: str, sha256: str, path: str | Path, vocab, now: datetime,
             parent: str | None = None, data: dict | None = None, metrics: dict | None = None,
             recipe: dict | None = None, note: str = "", status: str = "candidate",
             training_images: list[tuple[str, str, str, str]] | None = None) -> VersionRecord:
    """Register a model file (idempotent on its sha256: registering the same file again returns the existing
    record). ``training_images``: (image sha256, label, split, source) of every image it was trained on."""
    if len(sha256) != 64:
        raise VersionError("sha256 must be 64 hex digits")
    if status not in STATUSES or status in ("current", *ROLES):
        # promotion goes through set_status so that its rules (one current, history) always apply
        raise VersionError(f"a new version starts as candidate or retired, not {status!r}")
    existing = session.scalar(select(ModelVersion).where(ModelVersion.sha256 == sha256))
    if existing is not None:
        return _record(existing)
    if parent is not None and session.get(ModelVersion, parent) is None:
        raise VersionError(f"unknown parent version {parent!r}")
    version = version_of(name, sha256)
    row = ModelVersion(version=version, name=name, sha256=sha256, path=str(path), vocab=[str(v) for v in vocab],
                       parent=parent, status=status, note=note, data=data or {}, metrics=metrics or {},
                       recipe=recipe, created=now, status_changed=now)
    session.add(row)
    session.flush()
    session.add(ModelVersionEvent(version=version, created=now, from_status=None, to_status=status, note=note))
    _insert_vocab(session, version, name, sha256, vocab, now)
    if training_images:
        session.execute(TrainingImage.__table__.insert(), [
            {"version": version, "image_sha256": sha, "label": label, "split": split, "source": source}
            for sha, label, split, source in training_images])
    return _record(row)


def adopt_served(session: Session, *, name: str, sha256: str, path: str | Path, vocab, now: datetime,
                 note: str = "served from settings (LOUPE_MODEL_PATH or the demo)") -> VersionRecord:
    """Make the model the app serves from its settings known to the registry: registered if missing, and current
    if nothing is current yet (a fresh install). Returns its record."""
    rec = register(session, name=name, sha256=sha256, path=path, vocab=vocab, now=now, note=note)
    if rec.status == "candidate" and current(session) is None:
        rec = set_status(session, rec.version, "current", now=now, note=note)
    return rec


def get(session: Session, version: str) -> VersionRecord | None:
    """By version string, or by a unique sha256 prefix (at least 8 hex digits)."""
    row = session.get(ModelVersion, version)
    if row is None and len(version) >= 8 and all(c in "0123456789abcdef" for c in version.lower()):
        rows = session.scalars(select(ModelVersion).where(ModelVersion.sha256.startswith(version.lower()))).all()
        row = rows[0] if len(rows) == 1 else None
    return None if row is None else _record(row)


def by_sha256(session: Session, sha256: str) -> VersionRecord | None:
    row = session.scalar(select(ModelVersion).where(ModelVersion.sha256 == sha256))
    return None if row is None else _record(row)


def list_versions(session: Session, *, status: str | None = None) -> list[VersionRecord]:
    """Oldest first."""
    stmt = select(ModelVersion).order_by(ModelVersion.created, ModelVersion.version)
    if status is not None:
        stmt = stmt.where(ModelVersion.status == status)
    return [_record(r) for r in session.scalars(stmt)]


def current(session: Session) -> VersionRecord | None:
    row = session.scalar(select(ModelVersion).where(ModelVersion.status == "current"))
    return None if row is None else _record(row)


def in_role(session: Session) -> VersionRecord | None:
    """The candidate running as shadow or canary, if any."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.status.in_(ROLES)))
    return None if row is None else _record(row)


def history(session: Session, version: str | None = None) -> list[ModelVersionEvent]:
    """Status changes, oldest first (of one version, or of all)."""
    stmt = select(ModelVersionEvent).order_by(ModelVersionEvent.id)
    if version is not None:
        stmt = stmt.where(ModelVersionEvent.version == version)
    return list(session.scalars(stmt))


def previous_current(session: Session) -> VersionRecord | None:
    """The version that was current before the present one (a rollback's target), if it still exists."""
    now_current = current(session)
    events = session.scalars(select(ModelVersionEvent).where(ModelVersionEvent.to_status == "current")
                             .order_by(ModelVersionEvent.id.desc())).all()
    for ev in events:
        if now_current is None or ev.version != now_current.version:
            rec = get(session, ev.version)
            if rec is not None and rec.status == "retired":
                return rec
    return None


def _move(session: Session, row: ModelVersion, status: str, now: datetime, note: str) -> None:
    session.add(ModelVersionEvent(version=row.version, created=now, from_status=row.status, to_status=status,
                                  note=note))
    row.status, row.status_changed = status, now


def set_status(session: Session, version: str, status: str, *, now: datetime, note: str = "") -> VersionRecord:
    """Move a version to ``status`` if ``TRANSITIONS`` allows it; keeps one current and one candidate in a role.
    Setting the status it already has is a no-op (idempotent)."""
    if status not in STATUSES:
        raise VersionError(f"unknown status {status!r}; choose one of {', '.join(STATUSES)}")
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version).with_for_update())
    if row is None:
        raise VersionError(f"unknown model version {version!r}")
    if row.status == status:
        return _record(row)
    if status not in TRANSITIONS[row.status]:
        allowed = ", ".join(sorted(TRANSITIONS[row.status]))
        hint = " (a current version is retired by making another one current)" if row.status == "current" else ""
        raise VersionError(f"{version} is {row.status}; it can become {allowed}, not {status}{hint}")
    if status == "current":
        for old in session.scalars(select(ModelVersion).where(ModelVersion.status == "current").with_for_update()):
            _move(session, old, "retired", now, f"replaced by {version}")
        session.flush()  # the old current is retired before the unique index sees the new one
    elif status in ROLES:
        for old in session.scalars(select(ModelVersion).where(ModelVersion.status.in_(ROLES),
                                                              ModelVersion.version != version).with_for_update()):
            _move(session, old, "candidate", now, f"{version} took the {status} role")
    _move(session, row, status, now, note)
    session.flush()
    return _record(row)


def training_images(session: Session, version: str) -> dict[str, str]:
    """image sha256 -> label, of everything the version was trained or validated on."""
    return dict(session.execute(select(TrainingImage.image_sha256, TrainingImage.label)
                                .where(TrainingImage.version == version)).all())


def trained_on(session: Session, version: str, image_shas: list[str]) -> set[str]:
    """Which of these images the version saw in training (its train split)."""
    found: set[str] = set()
    for i in range(0, len(image_shas), 500):
        found |= set(session.scalars(select(TrainingImage.image_sha256).where(
            TrainingImage.version == version, TrainingImage.split == "train",
            TrainingImage.image_sha256.in_(image_shas[i:i + 500]))))
    return found


def model_file(record: VersionRecord, settings) -> Path:
    """Where this version's export is on this machine. First the shared model store
    (``settings.model_store_dir/<sha256>/export.pkl``: content-addressed, so every replica finds it under its own
    mount point), else the path recorded at registration (relative to the data dir unless absolute)."""
    shared = Path(settings.model_store_dir) / record.sha256 / "export.pkl"
    return shared if shared.is_file() else record.export_path(settings.data_dir)


def located(record: VersionRecord, settings) -> VersionRecord:
    """The record with its path resolved on this machine (its report is next to the export)."""
    return replace(record, path=str(model_file(record, settings)))


def load_predictor(record: VersionRecord, settings):
    """A serving predictor for a registered version, through model.loading's pinned read (sha256 from the
    registry; a cached ONNX bundle if there is one). Raises model.loading.ModelLoadError with a clear message."""
    from model.loading import ModelLoadError, ModelSource
    from model.loading import load_predictor as load

    path = model_file(record, settings)
    if not path.is_file():
        raise ModelLoadError(
            f"the model file of {record.version} is not on this machine: neither in the model store "
            f"({Path(settings.model_store_dir) / record.sha256 / 'export.pkl'}) nor at {path}. Every replica must "
            "reach the registered model files: share LOUPE_MODELS_DIR.")
    return load(settings, ModelSource(path, record.sha256, record.name))


# --- summaries (the CLI: model.versions_cli; the Models tab) -------------------------------------------------
def summary(rec: VersionRecord) -> dict:
    counts = rec.data.get("counts", {})
    return {"version": rec.version, "status": rec.status, "parent": rec.parent, "created": rec.created.isoformat(),
            "error_rate": rec.error_rate, "images": counts.get("total"), "classes": len(rec.vocab),
            "note": rec.note}


def compare(a: VersionRecord, b: VersionRecord) -> dict:
    """Side by side: held-out error rates, per-class precision/recall changes, data differences (b minus a)."""
    def per_class(rec):
        return rec.metrics.get("per_class", {})

    classes = list(dict.fromkeys([*a.vocab, *b.vocab]))
    rows = {}
    for c in classes:
        pa, pb = per_class(a).get(c, {}), per_class(b).get(c, {})
        rows[c] = {k: {"a": pa.get(k), "b": pb.get(k)} for k in ("precision", "recall")}
    by_class_a = a.data.get("counts", {}).get("by_class", {})
    by_class_b = b.data.get("counts", {}).get("by_class", {})
    note = ("the held-out splits differ (different data): compare on the same reviewed items before promoting"
            if a.data.get("snapshot_sha256") != b.data.get("snapshot_sha256") else "same data snapshot")
    return {"a": summary(a), "b": summary(b),
            "error_rate": {"a": a.error_rate, "b": b.error_rate},
            "per_class": rows,
            "images_by_class": {c: {"a": by_class_a.get(c, 0), "b": by_class_b.get(c, 0)} for c in classes},
            "lineage": "b descends from a" if b.parent == a.version else
                       ("a descends from b" if a.parent == b.version else "unrelated"),
            "caveat": note}


if __name__ == "__main__":
    # The CLI lives in model.versions_cli (it imports this module properly, so model.rollout's VersionError is the
    # class it catches; under ``python -m`` this file's own copy would be another class).
    from model.versions_cli import main

    sys.exit(main())
