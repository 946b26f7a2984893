"""Every file reference in a Gradio event payload, checked before Gradio sees it.

A file reference is any JSON object with a ``path`` or ``url`` key, or Gradio's FileData ``meta`` tag, wherever it
sits: in ``data``, in ``event_data``, in a batch, in Sketchpad's ``background``/``layers``/``composite``, with or
without ``meta``. Its ``path`` must be a file this client may name (``allowed``); a ``url`` without a path must be an
inline ``data:image/`` URL (live-webcam frames); a ``url`` beside a path must point at that same file. So no event
makes the server open, hash, copy or download anything a client merely named.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

FILE_ROUTE = "/gradio_api/file="
NOT_YOURS = "This file was not uploaded in this session (or has expired); please upload it again."


class Refused(Exception):
    """The payload names something it may not; ``args[0]`` is safe to show the client."""


def is_file_ref(d: dict) -> bool:
    meta = d.get("meta")
    return "path" in d or "url" in d or (isinstance(meta, dict) and meta.get("_type") == "gradio.FileData")


def check_payload(body: Any, *, reveal: Callable[[str], str | None],
                  allowed: Callable[[str], bool]) -> list[str]:
    """Check every file reference in ``body`` in place (alias paths become the server paths Gradio expects);
    returns the server paths named. Raises ``Refused``."""
    named: list[str] = []
    stack = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if is_file_ref(node):
                _check_ref(node, reveal, allowed, named)
            stack.extend(node.values())
    return named


def _check_ref(ref: dict, reveal, allowed, named: list[str]) -> None:
    path, url = ref.get("path"), ref.get("url")
    if path is not None:
        if not isinstance(path, str):
            raise Refused("A file reference must name its file as a string.")
        real = reveal(path)
        if real is None or not allowed(real):
            raise Refused(NOT_YOURS)
        ref["path"] = real
        named.append(real)
    if url is None:
        return
    if not isinstance(url, str):
        raise Refused("A file URL must be a string.")
    if path is None:
        # Live-webcam frames arrive inline. Any other URL would have the server fetch it (SSRF).
        if not url.startswith("data:image/"):
            raise Refused("Send the file itself (upload it first), not a URL.")
        return
    # Gradio ignores a URL beside a path today; one that names another file is refused, not trusted later.
    _, sep, tail = url.partition(FILE_ROUTE)
    if not sep or reveal(unquote(tail.split("?", 1)[0])) != os.path.normpath(ref["path"]):
        raise Refused("A file's URL does not match its path.")
