"""The app's parts assembled in-process exactly as ``app.main()`` does, for tests that need no subprocess."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from app import Parts, assemble
from ui.server import build_server


def app_parts(settings, predictor) -> Parts:
    # No background re-scoring: tests that want it start the real app (tests/test_app_rescore.py).
    # No monitor thread either: tests call parts.monitor.refresh() when they want a check.
    return assemble(settings, predictor, rescore=False, watch=False)


def server_for(settings, parts: Parts, **kw):
    return build_server(settings, pipeline=parts.pipeline, store=parts.store, desk=parts.desk, monitor=parts.monitor,
                        **kw)


@contextmanager
def serving(settings, parts: Parts, *, proxy_headers: bool = True, **build_kw) -> Iterator[str]:
    """The real HTTP surface (``build_server`` behind uvicorn) on a free port, in a thread: yields its base URL, and
    stops it afterwards. ``proxy_headers=False`` makes the test client look like a remote peer (uvicorn otherwise
    applies X-Forwarded-* itself for connections from 127.0.0.1)."""
    import uvicorn

    from tests.browser_support import free_port, wait_for

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(server_for(settings, parts, **build_kw), host="127.0.0.1", port=port,
                                           log_level="warning", proxy_headers=proxy_headers,
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=60, what="the server to start")
        assert server.started, "the server did not start (see its log above)"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
