"""ASGI middleware in front of both Gradio mounts ("/" and "/review"): what a client may send Gradio, and what
Gradio may send back.

- Only the ``/gradio_api`` routes Loupe's pages and ``gradio_client`` use are reachable; the rest (deep links that
  write state files, the public-URL file proxy, component servers, recordings, monitoring ...) answer 404.
- Uploads go through ``ui.upload_route`` (one file, sized, budgeted, bound to the client's cookie).
- Every event body is JSON whose file references ``ui.payload_check`` accepts, else 403, before Gradio reads it.
- ``/gradio_api/file=`` serves only the client's own uploads and Gradio's copies of the example images.
- Responses never name the server's folders: Loupe's Gradio folder is shown as ``gradio-files/...`` and mapped back.

A client is its ``loupe_client`` cookie (random, HttpOnly), set on the first page, config or upload response.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from urllib.parse import quote

from starlette.datastructures import MutableHeaders
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse, Response

from ui.payload_check import Refused, check_payload
from ui.upload_route import refuse, upload
from ui.upload_store import UploadStore

COOKIE = "loupe_client"
ALIAS = "gradio-files"
REVIEW_MOUNT = "/review"
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_GET_ROUTES = re.compile(r"/(user|login_check|token|app_id|info|openapi\.json|theme\.css|queue/status|queue/data"
                         r"|startup-events)/?|/heartbeat/[^/]+|/call/[^/]+/[^/]+")
_POST_ROUTES = re.compile(r"/(queue/join|cancel|reset)/?|/(call|run|api)/[^/]+/?|/call/v2/[^/]+/?"
                          r"|/stream/[^/]+(/close)?")
_REWRITTEN = ("application/json", "text/html", "text/event-stream")


class PathAlias:
    """Loupe's Gradio folder as clients see it (``gradio-files/...``) and back."""

    def __init__(self, folder):
        self.root = os.path.normpath(str(folder))
        self._pairs = [(self.root.encode(), ALIAS.encode()), (quote(self.root).encode(), ALIAS.encode())]

    def hide(self, data: bytes) -> bytes:
        for real, shown in self._pairs:
            data = data.replace(real, shown)
        return data

    def show(self, path: str) -> str:
        return self.hide(path.encode()).decode()

    def reveal(self, path: str) -> str | None:
        """The normalised server path a client's path names; None for anything else (relative paths, URLs)."""
        if path == ALIAS or path.startswith(ALIAS + "/"):
            path = self.root + path[len(ALIAS):]
        return os.path.normpath(path) if path.startswith("/") and "\0" not in path else None


class HttpGuard:
    def __init__(self, app, *, store: UploadStore, alias: PathAlias, max_upload_bytes: int, secure_cookie: bool,
                 upload_mounts: tuple[str, ...] = ("",)):
        self.app = app
        self.store = store
        self.alias = alias
        self.max_upload_bytes = max_upload_bytes
        # Live frames arrive as base64 data: URLs, twice (data and event_data), plus the JSON around them.
        self.max_event_body = 3 * max_upload_bytes + 64 * 1024
        self.secure_cookie = secure_cookie  # a Space: the page is framed by huggingface.co (a third party)
        self.upload_mounts = upload_mounts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        mount = REVIEW_MOUNT if path == REVIEW_MOUNT or path.startswith(REVIEW_MOUNT + "/") else ""
        sub = path[len(mount):]
        if sub.startswith("/monitoring"):
            return await _not_found(scope, receive, send)
        if sub.startswith("/gradio_api/"):
            return await self._api(scope, receive, send, mount, sub[len("/gradio_api"):])
        if sub in ("/", "/config", "/config/"):
            return await self._forward(scope, receive, send, set_cookie=True)
        return await self.app(scope, receive, send)

    # ---- routes ------------------------------------------------------------------------------------------
    async def _api(self, scope, receive, send, mount: str, route: str):
        method = scope["method"]
        if route.startswith("/file="):
            if method not in ("GET", "HEAD"):
                return await _not_found(scope, receive, send)
            return await self._file(scope, receive, send, mount, route[len("/file="):])
        if route == "/upload" and method == "POST":
            if mount not in self.upload_mounts:
                return await _not_found(scope, receive, send)
            return await self._upload(scope, receive, send)
        if route == "/upload_progress" and method == "GET":
            # Our uploads are not tracked by Gradio; its progress bar only needs to hear that they are done.
            return await Response('data: {"msg": "done"}\n\n', media_type="text/event-stream")(scope, receive, send)
        if method in ("GET", "HEAD") and _GET_ROUTES.fullmatch(route):
            return await self._forward(scope, receive, send, set_cookie=route.startswith("/info"))
        if method == "POST" and _POST_ROUTES.fullmatch(route):
            return await self._event(scope, receive, send)
        if method == "OPTIONS":  # CORS preflight: answered (and refused) by the CORS middleware inside
            return await self.app(scope, receive, send)
        return await _not_found(scope, receive, send)

    async def _file(self, scope, receive, send, mount: str, named: str):
        real = self.alias.reveal(named)
        if real is None or not self.store.allows(real, self._client(scope)):
            return await _not_found(scope, receive, send)
        new_path = f"{mount}/gradio_api/file={real}"
        scope = {**scope, "path": new_path, "raw_path": quote(new_path).encode()}
        return await self.app(scope, receive, send)

    async def _upload(self, scope, receive, send):
        owner = self._client(scope)
        new_owner = owner or secrets.token_urlsafe(24)
        response = await upload(Request(scope, receive), self.store, max_bytes=self.max_upload_bytes,
                                owner=new_owner, cookieless=owner is None, public_path=self.alias.show)
        if owner is None:
            self._set_cookie(response.headers, new_owner, scope)
        await response(scope, receive, send)

    async def _event(self, scope, receive, send):
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_event_body:
            return await refuse(413, "Request too large.")(scope, receive, send)
        body = await _read_body(receive, self.max_event_body)
        if body is None:
            return await refuse(413, "Request too large.")(scope, receive, send)
        if body.strip():
            client = self._client(scope)
            try:
                payload = json.loads(body)
                named = check_payload(payload, reveal=self.alias.reveal,
                                      allowed=lambda p: self.store.allows(p, client))
            except Refused as e:
                return await refuse(403, e.args[0])(scope, receive, send)
            except (ValueError, RecursionError):
                return await refuse(400, "The request body must be JSON.")(scope, receive, send)
            # Gradio gets what was checked (and nothing a second JSON parser might read differently).
            body = json.dumps(payload).encode()
            self.store.mark_sent(named)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        return await self._forward(scope, _replay(body, receive), send, set_cookie=False)

    async def _forward(self, scope, receive, send, *, set_cookie: bool):
        """Pass to Gradio uncompressed, so that its answer can be rid of server paths on the way out."""
        headers = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        new_cookie = secrets.token_urlsafe(24) if set_cookie and self._client(scope) is None else None
        await self.app({**scope, "headers": headers}, receive,
                       self._hiding_send(send, new_cookie, scope))

    # ---- helpers -------------------------------------------------------------------------------------------
    def _client(self, scope) -> str | None:
        for key, value in scope["headers"]:
            if key == b"cookie":
                found = cookie_parser(value.decode("latin-1")).get(COOKIE)
                if found and _COOKIE_VALUE.fullmatch(found):
                    return found
        return None

    def _set_cookie(self, headers: MutableHeaders, value: str, scope) -> None:
        # On a Space the app runs in huggingface.co's iframe: a third-party context, which needs SameSite=None
        # (and Partitioned, where browsers keep third-party cookies per top-level site).
        if self.secure_cookie:
            attrs = "; SameSite=None; Secure; Partitioned"
        else:
            attrs = "; SameSite=Lax" + ("; Secure" if scope.get("scheme") == "https" else "")
        headers.append("set-cookie", f"{COOKIE}={value}; Path=/; HttpOnly{attrs}")

    def _hiding_send(self, send, new_cookie: str | None, scope):
        held: dict = {}
        head_only = scope["method"] == "HEAD"  # no body to rewrite; its Content-Length describes the GET's

        async def hiding_send(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message["headers"]))
                if new_cookie:
                    self._set_cookie(headers, new_cookie, scope)
                kind = headers.get("content-type", "")
                if headers.get("content-encoding") or not kind.startswith(_REWRITTEN) or head_only:
                    held["mode"] = "pass"
                elif kind.startswith("text/event-stream"):
                    held["mode"] = "stream"
                else:
                    held.update(mode="buffer", chunks=[])
                    if "content-length" in headers:
                        del headers["content-length"]
                message = {**message, "headers": headers.raw}
                if held["mode"] == "buffer":
                    held["start"] = message
                    return
                return await send(message)
            if message["type"] != "http.response.body" or held.get("mode") == "pass":
                return await send(message)
            if held["mode"] == "stream":
                return await send({**message, "body": self.alias.hide(message.get("body", b""))})
            held["chunks"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = self.alias.hide(b"".join(held["chunks"]))
            start = held["start"]
            start["headers"] = [*start["headers"], (b"content-length", str(len(body)).encode())]
            await send(start)
            await send({"type": "http.response.body", "body": body})

        return hiding_send


async def _not_found(scope, receive, send):
    await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as Starlette expects

    return replay
