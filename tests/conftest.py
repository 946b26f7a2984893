"""Shared fixtures. Tests never touch the network; learners are built on the fly and cached per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", module="fastai")


@pytest.fixture(scope="module")
def browser(playwright):
    """Debian's Chromium (tests/browser_support.launch_args; never a downloaded one), one per test module. A module
    that needs other flags (a fake camera) defines its own."""
    from tests.browser_support import launch_args

    b = playwright.chromium.launch(**launch_args())
    yield b
    b.close()


@pytest.fixture(scope="session")
def color_data(tmp_path_factory) -> Path:
    from tests.learners import make_color_dataset

    return make_color_dataset(tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, color_data):
    """kind -> (export path, sha256), each learner trained and exported once per session."""
    from tests.learners import build_learner, export_learner

    cache: dict[str, tuple[Path, str]] = {}

    def get(kind: str) -> tuple[Path, str]:
        if kind not in cache:
            learn = build_learner(kind, color_data)
            cache[kind] = export_learner(learn, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def demo_settings(tmp_path_factory):
    """Settings serving the embedded demo model, with its bundle converted once per session."""
    from settings import Settings

    return Settings(data_dir=tmp_path_factory.mktemp("demo-data"))


@pytest.fixture(scope="session")
def demo_predictor(demo_settings):
    from model.loading import load_predictor

    return load_predictor(demo_settings)
