"""Loupe's replacement for Gradio's ``POST /gradio_api/upload``: one file per request, size checked before the body
is read, bytes per client address budgeted, the file stored under a random directory and registered to the
client (``ui.upload_store``).

Gradio's own route takes up to 1000 parts of any total size and names each file after a hash of its bytes
(so the path is guessable and shared between clients). The answer has Gradio's shape (a JSON list with the
file's path), so Gradio's frontend and ``gradio_client`` upload exactly as before.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ui.upload_store import UploadStore

FORM_OVERHEAD = 64 * 1024  # multipart framing around the one file
MAX_FILES = 1  # every Loupe input sends one file per request (Sketchpad's layers come one request each)
MAX_FIELDS = 4
MAX_FIELD_BYTES = 16 * 1024
MAX_NAME = 64
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


def refuse(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def safe_name(filename: str | None) -> str:
    """A short, URL-safe file name; anything but an image suffix gets '.bin' so it is never served as a page."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename or "").name).lstrip(".") or "upload"
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
        stem, suffix = name, "bin"
    return f"{stem[: MAX_NAME - len(suffix) - 1]}.{suffix}"


def _copy(src, dest: Path) -> None:
    src.seek(0)
    with open(dest, "xb") as out:
        shutil.copyfileobj(src, out)


async def upload(request: Request, store: UploadStore, *, max_bytes: int, owner: str, cookieless: bool,
                 public_path: Callable[[str], str]) -> Response:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return refuse(415, "Send the file as multipart/form-data.")
    length = request.headers.get("content-length")
    if length is None:
        return refuse(411, "Send a Content-Length header.")
    if not length.isdigit():
        return refuse(400, "Invalid Content-Length header.")
    length = int(length)
    if length > max_bytes + FORM_OVERHEAD:
        return refuse(413, f"This file is too large; the limit is {max_bytes / (1 << 20):g} MB.")
    address = request.client.host if request.client else "unknown"
    refusal = store.admit(address, length)
    if refusal is not None:
        why, wait = refusal
        if why == "budget":
            return refuse(429, "Too many uploads from your address; please wait a few minutes.", wait)
        return refuse(503, "The server is busy; please try again in a minute.", wait)
    folder = None
    try:
        async with request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES) as form:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if len(files) != 1:
                store.release(length)
                return refuse(400, "Send exactly one file per request.")
            part = files[0]
            if part.size is None or part.size > max_bytes:
                store.release(length)
                return refuse(413, f"This file is too large; the limit is {max_bytes / (1 << 20):g} MB.")
            folder = store.new_dir()
            dest = folder / safe_name(part.filename)
            await run_in_threadpool(_copy, part.file, dest)
    except HTTPException as e:  # Starlette's multipart errors: too many files or fields, malformed body
        store.release(length)
        return refuse(400 if e.status_code < 500 else e.status_code, f"Malformed upload: {e.detail}")
    except ClientDisconnect:
        store.release(length)
        return refuse(400, "The upload was interrupted.")
    except BaseException:
        store.release(length)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    store.register(str(dest), owner=owner, cookieless=cookieless, size=part.size, reserved=length)
    return JSONResponse([public_path(str(dest))])
