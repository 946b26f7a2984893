"""Fixtures and helpers for tests/test_review_*.py (loaded with ``pytest_plugins = ["tests.review_fixtures"]``).

PostgreSQL: the ``db_url`` fixture runs each test on SQLite and on PostgreSQL. The PostgreSQL variant needs
``LOUPE_TEST_PG_URL`` (an admin URL such as postgresql+psycopg://postgres@127.0.0.1:55432/postgres); each test
gets a fresh database created through it and dropped afterwards. Unset: the variant is skipped, except under
``CI=true``, where a missing server is a failure.
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from model.predictor import ModelInfo
from review.desk import ReviewDesk
from review.store import ReviewStore
from serving.imageio import image_stats
from settings import Settings

PG_ENV = "LOUPE_TEST_PG_URL"
VOCAB = ("red", "green", "blue")
MODEL = ModelInfo(name="test-model", sha256="ab" * 32, vocab=VOCAB, backend="onnx")


def pg_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        example = f"e.g. {PG_ENV}=postgresql+psycopg://postgres@127.0.0.1:55432/postgres"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PG_ENV} is not set, but in CI (CI=true) the PostgreSQL tests must run ({example})")
        pytest.skip(f"{PG_ENV} is not set, so the PostgreSQL variant is skipped ({example})")
    return url


def _pg_database(admin: str):
    """Create a uniquely named database; returns (url, drop())."""
    name = f"loupe_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()  # no idle admin connection while the test runs (or forks)

    def drop() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()

    return make_url(admin).set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'loupe.db'}"
        return
    url, drop = _pg_database(pg_admin_url())
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'loupe.db'}"


def make_settings(tmp_path, url: str, **overrides) -> Settings:
    # by its alias: Settings ignores database_url=... (the field has a validation_alias and extra="ignore")
    values = {"data_dir": tmp_path / "data", "LOUPE_DATABASE_URL": url, "audit_rate": 0.0, "reviewers": "",
              "hf_allowlist": "", "retention_days": None, "second_opinion_rate": 0.0, "store_uploads": True}
    values.update(overrides)
    settings = Settings(_env_file=None, **values)
    assert settings.db_url == url, "the test database URL was not taken"
    return settings


class FakeClock:
    """Thread-safe settable clock (leases, retention)."""

    def __init__(self, start: datetime | None = None):
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, **kw) -> None:
        with self._lock:
            self._now += timedelta(**kw)


@dataclass
class Kit:
    """The review parts a test works with: the store, the reviewer desk, and the model it logs predictions for."""

    store: ReviewStore
    desk: ReviewDesk
    model: ModelInfo = MODEL

    def log(self, **kw) -> str:
        return self.store.log_prediction(model=self.model, **kw)

    def pipeline(self, predict_probs):
        """The real prediction pipeline around a stand-in model whose answers come from ``predict_probs``."""
        from serving.pipeline import Pipeline
        from serving.router import ModelRouter

        return Pipeline.from_settings(self.store.settings, ModelRouter(FakePredictor(self.model, predict_probs)),
                                      self.store)


@dataclass
class FakePredictor:
    info: ModelInfo
    predict_probs: object  # (images) -> (N, C) probabilities


def build_kit(settings: Settings, model: ModelInfo | None = MODEL, clock=None) -> Kit:
    # Spooled like the app's store: a test that kills a process must find every acknowledged record.
    store = ReviewStore(settings, spool=model is not None, **({"clock": clock} if clock else {}))
    if model is not None:
        store.register_model(model)
    return Kit(store, ReviewDesk(store), model)


@pytest.fixture
def services(tmp_path):
    """Factory: services(url, **settings_overrides) -> Kit; all stores closed at teardown."""
    built = []

    def make(url: str, *, model=MODEL, clock=None, **overrides) -> Kit:
        kit = build_kit(make_settings(tmp_path, url, **overrides), model, clock)
        built.append(kit)
        return kit

    yield make
    for kit in built:
        kit.store.close()


def square(rgb: tuple[int, int, int], size: int = 16, mark: int = 0) -> Image.Image:
    """A solid colour square; ``mark`` changes one pixel so images differ (distinct sha256)."""
    img = Image.new("RGB", (size, size), rgb)
    if mark:
        img.putpixel((mark % size, (mark // size) % size), ((rgb[0] + 1) % 256, rgb[1], rgb[2]))
    return img


def probs(*values: float) -> np.ndarray:
    p = np.asarray(values, dtype=np.float32)
    return p / p.sum()


def upload(img: Image.Image, fmt: str = "PNG") -> dict:
    """``log_prediction``'s image arguments for ``img``: the bytes a client would send, and their stats."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    return {"data": buf.getvalue(), "stats": image_stats(img)}
