"""The app's parts assembled in-process exactly as ``app.main()`` does, for tests that need no subprocess."""

from __future__ import annotations

from app import Parts, assemble
from ui.server import build_server


def app_parts(settings, predictor) -> Parts:
    # No background re-scoring: tests that want it start the real app (tests/test_app_rescore.py).
    # No monitor thread either: tests call parts.monitor.refresh() when they want a check.
    return assemble(settings, predictor, rescore=False, watch=False)


def server_for(settings, parts: Parts, **kw):
    return build_server(settings, pipeline=parts.pipeline, store=parts.store, desk=parts.desk, monitor=parts.monitor,
                        **kw)
