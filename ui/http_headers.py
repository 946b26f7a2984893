"""Security headers on every response (REST, both Gradio apps, errors), and no cross-origin access.

CORS: Gradio's own middleware reflects any ``Origin`` with credentials when the Host is not localhost. Loupe's pages
and ``gradio_client`` never need cross-origin reads (a Space's iframe talks to its own origin), so every
``Access-Control-Allow-*`` header is dropped here; ``server.py`` also installs Starlette's CORS middleware with no
allowed origin, which turns Gradio's off.

CSP: Gradio's frontend needs inline and eval'd scripts (its config and ``js=`` hooks), inline styles, ``data:`` and
``blob:`` images (webcam, sketch), ``blob:``/``mediastream:`` media and workers. What the policy still buys:
nothing loads from or talks to another origin (the theme's fonts are served locally), no plugins, no ``<base>``
tricks, forms post only here, and framing only by huggingface.co on a Space (otherwise by no one).
"""

from __future__ import annotations

from starlette.responses import PlainTextResponse

HF_ORIGIN = "https://huggingface.co"


def content_security_policy(frame_ancestors: str) -> str:
    return "; ".join([
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        "font-src 'self' data:",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob: mediastream:",
        "connect-src 'self' data: blob:",
        "worker-src 'self' blob:",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        f"frame-ancestors {frame_ancestors}",
    ])


def security_headers(space: bool) -> list[tuple[bytes, bytes]]:
    headers = {
        "content-security-policy": content_security_policy(HF_ORIGIN if space else "'none'"),
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",  # file URLs name upload tokens: never hand them to another site
        "permissions-policy": "camera=(self), microphone=(), geolocation=(), payment=(), usb=()",
        "cross-origin-resource-policy": "same-origin",
    }
    if not space:  # X-Frame-Options cannot name huggingface.co; on a Space frame-ancestors alone decides
        headers["x-frame-options"] = "DENY"
    return [(k.encode(), v.encode()) for k, v in headers.items()]


class SecurityHeaders:
    def __init__(self, app, *, space: bool):
        self.app = app
        self.headers = security_headers(space)
        self._names = {k for k, _ in self.headers}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", [])
                        if k.lower() not in self._names and not k.lower().startswith(b"access-control-allow-")]
                message = {**message, "headers": kept + self.headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette's error page is sent outside every middleware; send ours (with the headers) instead.
            if not started:
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send_with_headers)
            raise
