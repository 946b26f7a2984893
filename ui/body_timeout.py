"""ASGI middleware: a request body must keep arriving, or the request ends with 408 and the connection closes.

uvicorn has no request-body timeout: a client that sends its headers (with a Content-Length) and then
nothing keeps the handler waiting in ``receive()`` for as long as the socket stays open. Anything held
meanwhile (an admission slot, a reading allowance, a half-written upload in Gradio's cache) is held by
that client. This middleware bounds every body read of every route, Gradio's ``/gradio_api/upload`` included.

Two limits, as in mod_reqtimeout and nginx: no single wait for the next chunk may exceed ``timeout_s``
(so a client that sends part of its body and then stalls is cut off ``timeout_s`` later, whatever it sent
before), and the total wait may not exceed ``timeout_s`` plus one second per ``min_rate`` bytes received
(so a trickle below ``min_rate`` on average is cut off too). Only the time the server actually spends
waiting for the client's bytes counts (not time the app spends elsewhere before reading), so a slow server
never times out an honest client; an upload that keeps up ``min_rate`` without a ``timeout_s`` pause
always fits. Once the body is complete nothing is timed: event streams wait for ``http.disconnect`` for
as long as they like.
"""

from __future__ import annotations

import logging
import time

import anyio

log = logging.getLogger(__name__)

CLOSE_408 = [(b"content-type", b"application/json"), (b"connection", b"close")]


class BodyTimeout(Exception):
    """Raised into the app by ``receive()`` when the client took too long to send its body."""


class BodyTimeoutMiddleware:
    def __init__(self, app, *, timeout_s: float, min_rate: float):
        if timeout_s <= 0 or min_rate <= 0:
            raise ValueError("timeout_s and min_rate must be > 0")
        self.app = app
        self.timeout_s = timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _TimedBody(self, scope, receive, send)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            # Whatever the app made of the BodyTimeout (re-raised, wrapped, a ClientDisconnect): the client
            # already has its 408. Any other failure is the app's and goes on to uvicorn's handler.
            if not body.timed_out:
                raise


class _TimedBody:
    """One request: wraps ``receive`` with the budget and ``send`` so a timed-out request answers once."""

    def __init__(self, mw: BodyTimeoutMiddleware, scope, receive, send):
        self.mw, self.scope, self._receive, self._send = mw, scope, receive, send
        self.waited = 0.0  # seconds spent inside receive() waiting for body bytes
        self.received = 0
        self.complete = False  # body fully received (or client gone): stop timing
        self.response_started = False
        self.timed_out = False

    async def receive(self):
        if self.complete:
            return await self._receive()
        if self.timed_out:
            raise BodyTimeout("request body timed out")
        earned = self.mw.timeout_s + self.received / self.mw.min_rate - self.waited
        remaining = min(self.mw.timeout_s, earned)
        t0 = time.monotonic()
        message = None
        with anyio.move_on_after(max(remaining, 0)):
            message = await self._receive()
        self.waited += time.monotonic() - t0
        if message is None:
            await self._time_out()
            raise BodyTimeout("request body timed out")
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True  # http.disconnect: nothing more will come
        return message

    async def send(self, message) -> None:
        if self.timed_out:
            return  # the client got its 408 and the connection is closing: drop the app's late answer
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _time_out(self) -> None:
        self.timed_out = True
        client = self.scope.get("client")
        log.info("request body timed out: %s %s from %s after %.1f s (%d bytes received)", self.scope["method"],
                 self.scope["path"], client[0] if client else "?", self.waited, self.received)
        if self.response_started:
            return  # too late for a status; the app sees BodyTimeout and uvicorn closes the connection
        msg = b'{"error": "The request body did not arrive in time; send it promptly and try again."}'
        await self._send({"type": "http.response.start", "status": 408,
                          "headers": [*CLOSE_408, (b"content-length", str(len(msg)).encode())]})
        await self._send({"type": "http.response.body", "body": msg, "more_body": False})
