"""The files a client may hand to a Gradio event: its own uploads (and Gradio's copies of our example images).

Gradio's own rule ("only files Gradio saved") is off under ``gr.mount_gradio_app``, and a Gradio upload path names
a directory anyone who knows the bytes can compute. So Loupe keeps its own record: every upload is written by
``ui.upload_route`` into ``<folder>/uploads/<random token>/<name>`` and registered here with the client that sent
it. An event may only name a registered, unexpired upload of the same client (``allows``), and the model's
handler re-checks with ``claim`` before opening anything.

Nothing here touches a path a client named: checks are dictionary look-ups. Files are deleted (``sweep``, run
off the event loop) a few seconds after the model read them, a minute after an event sent them, and at the
latest ``upload_ttl_s`` after they arrived.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("loupe.uploads")

MARKER = ".loupe-gradio-files"  # proves a folder is Loupe's own before start-up empties it
READ_GRACE_S = 10.0  # kept after the model read it: the browser may still be loading its preview
SENT_GRACE_S = 60.0  # kept after an event named it: long enough for the queue to reach it
BUDGET_WINDOW_S = 600.0
MAX_TRACKED_ADDRESSES = 10_000


class GradioFolderError(RuntimeError):
    """Loupe's Gradio folder cannot be used (not ours, not a directory); the message says what to do."""


def gradio_folder(settings) -> Path:
    """Loupe's own folder for Gradio's files: ``<parent>/loupe-<hash of the data dir>``.

    One per data dir, so start-up may empty it without touching another app's (or another Loupe's) files.
    """
    parent = Path(settings.gradio_temp_dir or tempfile.gettempdir()).resolve()
    if (parent / MARKER).exists() or re.fullmatch(r"loupe-[0-9a-f]{12}", parent.name):
        parent = parent.parent  # GRADIO_TEMP_DIR names a Loupe folder: an earlier build_server in this process set it
    tag = hashlib.sha256(str(Path(settings.data_dir).resolve()).encode()).hexdigest()[:12]
    return parent / f"loupe-{tag}"


def prepare_folder(folder: Path) -> None:
    """Create the folder, or empty it if a previous run left files (a kill -9 skips every clean-up)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise GradioFolderError(f"{folder} exists but is not a directory of this user: remove it or set "
                                    "LOUPE_GRADIO_TEMP_DIR to another folder.") from None
        children = [c for c in folder.iterdir() if c.name != MARKER]
        if children and not (folder / MARKER).exists():
            raise GradioFolderError(f"{folder} holds files Loupe did not write; it empties this folder at start-up, "
                                    "so it will not use it. Remove it or set LOUPE_GRADIO_TEMP_DIR.") from None
        _empty(children)
        if children:
            log.info("emptied %s (%d entries left by an earlier run)", folder, len(children))
    (folder / MARKER).touch()


def _empty(children) -> None:
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@dataclass
class Upload:
    owner: str
    cookieless: bool  # the upload request carried no client cookie (a browser that refuses cookies)
    size: int
    expires: float


class AddressBudget:
    """Bytes per client address over a rolling window; least recently seen addresses are forgotten first."""

    def __init__(self, limit: int, window_s: float = BUDGET_WINDOW_S):
        self.limit = limit
        self.window_s = window_s
        self._spent: OrderedDict[str, deque[tuple[float, int]]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[tuple[float, int]]:
        spent = self._spent.setdefault(address, deque())
        self._spent.move_to_end(address)
        while spent and spent[0][0] <= now - self.window_s:
            spent.popleft()
        while len(self._spent) > MAX_TRACKED_ADDRESSES:
            self._spent.popitem(last=False)
        return spent

    def remaining(self, address: str, now: float) -> int:
        return self.limit - sum(n for _, n in self._recent(address, now))

    def retry_after(self, address: str, now: float) -> int:
        spent = self._recent(address, now)
        return max(1, int(spent[0][0] + self.window_s - now) + 1) if spent else 1

    def charge(self, address: str, nbytes: int, now: float) -> None:
        self._recent(address, now).append((now, nbytes))


class UploadStore:
    def __init__(self, folder: Path, *, ttl_s: float, budget_bytes: int, disk_bytes: int,
                 clock=time.monotonic):
        self.folder = Path(folder)
        self.uploads_dir = self.folder / "uploads"
        self.ttl_s = ttl_s
        self.disk_bytes = disk_bytes
        self.budget = AddressBudget(budget_bytes)
        self.clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, Upload] = {}
        self._held = 0  # bytes of registered uploads not yet deleted, and of uploads under way
        self._static: frozenset[str] = frozenset()

    # ---- what the guard asks, on the event loop ----------------------------------------------------
    def set_static(self, paths) -> None:
        """Files Gradio copied from the app's own code (example images): any client may name them."""
        self._static = frozenset(os.path.normpath(p) for p in paths)

    def is_static(self, path: str) -> bool:
        return path in self._static

    def allows(self, path: str, owner: str | None) -> bool:
        """May a client (``owner`` = its cookie, None if it sent none) name this absolute, normalised path?"""
        if path in self._static:
            return True
        with self._lock:
            up = self._live(path)
            # A browser that refuses cookies still holds the 128-bit random path it was given.
            return up is not None and (up.owner == owner or (up.cookieless and owner is None))

    def _live(self, path: str) -> Upload | None:
        """The upload at ``path`` if it has not expired (the caller holds the lock)."""
        up = self._files.get(path)
        return None if up is None or up.expires <= self.clock() else up

    def mark_sent(self, paths) -> None:
        self._shorten(paths, SENT_GRACE_S)

    # ---- uploads ---------------------------------------------------------------------------------------
    def admit(self, address: str, nbytes: int) -> tuple[str, int] | None:
        """Reserve room for an upload of at most ``nbytes`` (its Content-Length): None if it may start, else
        (why, seconds to wait). The bytes count against the address's budget even if the upload then fails:
        they were received. Every admitted upload ends with ``register`` or ``release``."""
        now = self.clock()
        with self._lock:
            if self.budget.remaining(address, now) < nbytes:
                return "budget", self.budget.retry_after(address, now)
            if self._held + nbytes > self.disk_bytes:
                return "disk", int(SENT_GRACE_S)
            self.budget.charge(address, nbytes, now)
            self._held += nbytes
        return None

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes

    def new_dir(self) -> Path:
        """A fresh directory with an unguessable name for one upload."""
        import secrets

        path = self.uploads_dir / secrets.token_urlsafe(16)
        path.mkdir(parents=True, mode=0o700)
        return path

    def register(self, path: str, *, owner: str, cookieless: bool, size: int, reserved: int) -> None:
        """Record a written upload; ``reserved`` is what ``admit`` set aside for it."""
        with self._lock:
            self._files[os.path.normpath(path)] = Upload(owner, cookieless, size, self.clock() + self.ttl_s)
            self._held += size - reserved

    # ---- what the model's handler asks, in a worker thread ----------------------------------------------
    def claim(self, path: str) -> bool:
        """True if ``path`` is a live upload (any client: the guard already checked whose), which is then deleted
        READ_GRACE_S later, or one of the example images."""
        path = os.path.normpath(str(path))
        if path in self._static:
            return True
        with self._lock:
            up = self._live(path)
            if up is None:
                return False
            up.expires = min(up.expires, self.clock() + READ_GRACE_S)
            return True

    def _shorten(self, paths, grace_s: float) -> None:
        now = self.clock()
        with self._lock:
            for path in paths:
                if (up := self._files.get(path)) is not None:
                    up.expires = min(up.expires, now + grace_s)

    # ---- clean-up, off the event loop ---------------------------------------------------------------------
    def sweep(self, *, everything: bool = False) -> int:
        """Delete expired uploads (all of them with ``everything``); returns how many."""
        now = self.clock()
        with self._lock:
            gone = [p for p, up in self._files.items() if everything or up.expires <= now]
            for p in gone:
                self._held -= self._files.pop(p).size
        for p in gone:
            # Each upload has a directory of its own; it goes with the file.
            shutil.rmtree(os.path.dirname(p), ignore_errors=True)
        return len(gone)

    def close(self) -> None:
        """At shutdown: every upload, then the rest of the folder (Gradio's example copies are made again at start).
        The folder and its marker stay: a Blocks built later in this process still writes to GRADIO_TEMP_DIR, and a
        folder recreated without the marker would stop the next start (measured in the test suite)."""
        self.sweep(everything=True)
        if self.folder.is_dir():
            _empty([c for c in self.folder.iterdir() if c.name != MARKER])

    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)
