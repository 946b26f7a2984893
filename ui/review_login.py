"""Loupe's own POST /review/login and POST /review/logout, in front of Gradio's.

Why: Gradio's ``async def login`` calls the mount's synchronous ``auth`` on the event loop, so each PBKDF2 check
(0.15-0.3 s) stalled every request of the server: 32 clients posting wrong passwords held /healthz for seconds.
These routes are added to the parent app *before* the /review mount, so they shadow Gradio's. Login:
1. refuses at once (429 + Retry-After, no hashing) a username or a client address that failed too often;
2. runs the mount's own ``auth`` check in a worker thread, ``login_concurrency`` at a time, with a short bounded
   wait line (503 + Retry-After beyond it);
3. on success sets exactly what Gradio's login sets: a token in the mounted review app's ``tokens`` and its two
   ``access-token[-unsecure]-<cookie_id>`` cookies, so Gradio's ``get_current_user`` accepts the session.
Logout is POST only (a link, an <img> or a prefetch must not end a session; GET answers 405) and gives the
reviewer's claimed item back to the queue.
"""

from __future__ import annotations

import inspect
import math
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount

from ui.login_limits import Busy, CheckPool, FailureLimiter, address_key

MOUNT = "/review"
MAX_WAITING_PER_SLOT = 8  # at ~0.3 s a check, the last in line waits a few seconds, not a minute
MAX_USERNAME, MAX_PASSWORD = 128, 1024  # beyond: a failure without hashing (and bounded limiter keys)
MAX_FORM_BYTES = 16 * 1024  # two short fields; the form parser would otherwise read any body into memory


def client_host(request: Request, settings) -> str:
    """The client's address: the connection's peer, or, behind a trusted proxy (``settings.behind_proxy``), the
    last X-Forwarded-For entry (the one that proxy appended; earlier entries are whatever the client sent).

    Note: uvicorn itself already replaces the peer by X-Forwarded-For for connections from FORWARDED_ALLOW_IPS
    (default 127.0.0.1, i.e. a proxy on the same host); that is a proxy the operator put there.
    """
    if settings.behind_proxy:
        hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
        if hops:
            return hops[-1]
    return request.client.host if request.client else "unknown"


def is_https(request: Request, settings) -> bool:
    """Whether the browser talks HTTPS to us: the request's scheme, or a trusted proxy's X-Forwarded-Proto."""
    if settings.behind_proxy:
        protos = [p.strip().lower() for p in request.headers.get("x-forwarded-proto", "").split(",") if p.strip()]
        if protos:
            return protos[-1] == "https"
    return request.url.scheme == "https"


def mounted_app(app: FastAPI, path: str = MOUNT):
    """The Gradio ``App`` mounted at ``path`` (it is created by mount_gradio_app, after our routes exist)."""
    for route in app.routes:
        if isinstance(route, Mount) and route.path == path:
            return route.app
    raise LookupError(f"nothing is mounted at {path}")


def _review_root(request: Request) -> str:
    return request.scope.get("root_path", "") + MOUNT + "/"


def _cookie_names(review) -> tuple[str, str]:
    return f"access-token-{review.cookie_id}", f"access-token-unsecure-{review.cookie_id}"


def _refuse(status: int, message: str, retry_after: float) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status,
                        headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class ReviewLogin:
    def __init__(self, app: FastAPI, settings, desk):
        self.app = app
        self.settings = settings
        self.desk = desk  # releases the reviewer's claim at logout
        limits = dict(max_failures=settings.login_max_failures, max_lockout_s=settings.login_lockout_max_s)
        self.users = FailureLimiter(**limits)
        self.addresses = FailureLimiter(**limits)
        self.checks = CheckPool(settings.login_concurrency, MAX_WAITING_PER_SLOT * settings.login_concurrency)

    def _set_session_cookies(self, response: Response, review, token: str, request: Request) -> None:
        secure_name, plain_name = _cookie_names(review)
        # On a Space the app runs in an iframe on huggingface.co: a cross-site context, where only SameSite=None
        # cookies are sent. Elsewhere Lax: never sent with cross-site POSTs (a CSRF defence for free).
        response.set_cookie(secure_name, token, httponly=True, secure=True,
                            samesite="none" if self.settings.space_id else "lax")
        # The plain-HTTP fallback (a browser drops Secure cookies on http:// hosts other than localhost): Secure
        # as soon as the request came over HTTPS, so it never travels in clear text afterwards.
        response.set_cookie(plain_name, token, httponly=True, secure=is_https(request, self.settings),
                            samesite="lax")

    async def login(self, request: Request) -> Response:
        review = mounted_app(self.app)
        if review.auth is None:  # OAuth mode (auth_dependency): nothing to log in to here, as in Gradio
            return RedirectResponse(_review_root(request), status_code=302)
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_FORM_BYTES:
            return JSONResponse({"detail": "Send the login form (username, password) with a Content-Length."},
                                status_code=413 if length.isdigit() else 411)
        async with request.form(max_files=0, max_fields=8) as form:
            username = str(form.get("username") or "").strip()
            password = str(form.get("password") or "")
        user_key = username[:MAX_USERNAME]
        addr_key = address_key(client_host(request, self.settings))
        wait = max(self.users.retry_after(user_key), self.addresses.retry_after(addr_key))
        if wait > 0:
            return _refuse(429, f"Too many failed logins: try again in {math.ceil(wait)} s.", wait)
        self.users.begin(user_key)
        self.addresses.begin(addr_key)
        ok: bool | None = None
        try:
            if len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD:
                ok = False
            else:
                ok = bool(await self.checks.run(review.auth, username, password))
        except Busy:
            return _refuse(503, "The login is busy: try again in a moment.", 1)
        finally:
            self.users.end(user_key, ok)
            self.addresses.end(addr_key, ok)
        if not ok:
            return JSONResponse({"detail": "Incorrect credentials."}, status_code=400)  # Gradio's form expects 400
        token = secrets.token_urlsafe(32)
        review.tokens[token] = username
        response = JSONResponse({"success": True})
        self._set_session_cookies(response, review, token, request)
        return response

    async def logout(self, request: Request) -> Response:
        review = mounted_app(self.app)
        secure_name, plain_name = _cookie_names(review)
        token = request.cookies.get(secure_name) or request.cookies.get(plain_name)
        user = review.tokens.get(token) if token else None
        if user is None and review.auth_dependency is not None:  # a Hugging Face session
            user = review.auth_dependency(request)
            if inspect.isawaitable(user):
                user = await user
        if "session" in request.scope:
            request.session.pop("oauth_info", None)  # the HF sign-in itself ends too
        response = RedirectResponse(_review_root(request), status_code=303)  # back to the login form
        response.delete_cookie(secure_name, path="/")
        response.delete_cookie(plain_name, path="/")
        if user:
            # every session of this reviewer, as Gradio's own logout does by default
            for key in [k for k, v in review.tokens.items() if v == user]:
                del review.tokens[key]
            await run_in_threadpool(self.desk.release, user)
        return response


def install_review_login(app: FastAPI, settings, desk) -> ReviewLogin:
    """Add the login/logout routes; call before mounting the review app at /review, or Gradio's would win."""
    routes = ReviewLogin(app, settings, desk)
    for path in (f"{MOUNT}/login", f"{MOUNT}/login/"):
        app.add_api_route(path, routes.login, methods=["POST"], include_in_schema=False)
    # (GET /review/logout/ is redirected to /review/logout by the review app itself, and lands here too.)
    app.add_api_route(f"{MOUNT}/logout", routes.logout, methods=["POST"], include_in_schema=False)
    app.add_api_route(f"{MOUNT}/logout", _logout_needs_post, methods=["GET", "HEAD"], include_in_schema=False)
    return routes


def _logout_needs_post() -> Response:
    return JSONResponse({"detail": "Log out with POST (the Log out button)."}, status_code=405,
                        headers={"Allow": "POST"})
