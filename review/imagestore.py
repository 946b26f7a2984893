"""Content-addressed image files: ``<root>/<sha[:2]>/<sha>.jpg|.png``, written atomically, never overwritten.

The bytes are ``serving.imageio.encode_for_storage``'s: shrunk to ``LOUPE_STORE_MAX_SIDE``, metadata-free (no
EXIF/GPS/ICC), JPEG for photos and lossless PNG for small or few-colour images; deterministic, so one upload
always gives one name and duplicates are stored once. Files are written BEFORE their database row: a crash can
leave an orphan file (``review reconcile`` finds it), never a row without its file.

``StorageGuard`` caps the store (``LOUPE_MAX_STORAGE_GB``) and keeps ``LOUPE_MIN_FREE_DISK_GB`` free on its disk.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from review.types import ReviewError
from serving.imageio import decode_for_storage, encode_for_storage

log = logging.getLogger(__name__)
_SHA = re.compile(r"[0-9a-f]{64}")
TMP_SUFFIX = ".tmp"
SUFFIXES = (".jpg", ".png")  # what encode_for_storage writes; the first is looked up first
GB = 1 << 30


def check_sha(sha: str) -> str:
    """Refuse anything but 64 lowercase hex digits: the name becomes a path, so no '..', no '/'."""
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise ReviewError("not an image id (expected 64 hex digits)")
    return sha


class Stored(NamedTuple):
    sha256: str
    size_bytes: int
    width: int  # of the stored image (shrunk to fit max_side), not of the upload
    height: int


class ImageStore:
    def __init__(self, root: Path, *, max_side: int = 1024, max_bytes: int = 10 << 20,
                 max_pixels: int = 40_000_000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_side, self.max_bytes, self.max_pixels = max_side, max_bytes, max_pixels

    def path(self, sha: str) -> Path:
        """Where the image is; for an image not stored, where it would be as a PNG."""
        check_sha(sha)
        base = self.root / sha[:2] / sha
        for suffix in SUFFIXES:
            candidate = base.with_suffix(suffix)
            if candidate.exists():
                return candidate
        return base.with_suffix(".png")

    def decode(self, data: bytes) -> tuple[Image.Image, bool]:
        """Upload bytes -> (image, lossless_source), JPEGs decoded at reduced scale (see ``put_image``)."""
        return decode_for_storage(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels,
                                  max_side=self.max_side)

    def put_image(self, img: Image.Image, *, lossless_source: bool) -> Stored:
        """Shrink to max_side, encode (JPEG for photos, PNG for small or few-colour images) and store."""
        stored = encode_for_storage(img, max_side=self.max_side, lossless_source=lossless_source)
        with Image.open(io.BytesIO(stored)) as shrunk:  # our own bytes; reads the header only
            width, height = shrunk.size
        return Stored(self.put_bytes(stored), len(stored), width, height)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        final = self.root / sha[:2] / (sha + (".jpg" if data[:3] == b"\xff\xd8\xff" else ".png"))
        try:
            # Content-addressed: an existing file already holds exactly these bytes. Refresh its mtime anyway:
            # reconcile deletes only orphans older than its grace period, and this file's row is on its way.
            os.utime(final)
            return sha
        except FileNotFoundError:
            pass  # not stored yet (the normal case): write it below
        final.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{sha[:8]}-", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)  # ...and the name itself survives a power cut
        return sha

    def read(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            raise ReviewError("this image is no longer stored (purged or missing)") from None

    def exists(self, sha: str) -> bool:
        return self.path(sha).exists()

    def delete(self, sha: str) -> bool:
        try:
            self.path(sha).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_shas(self) -> Iterator[str]:
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                names = {f.stem for f in sub.iterdir() if f.suffix in SUFFIXES}
                yield from sorted(n for n in names if _SHA.fullmatch(n) and n[:2] == sub.name)

    def iter_temp_files(self) -> Iterator[Path]:
        """Leftovers of writes interrupted by a crash (never referenced by any row)."""
        yield from sorted(self.root.glob(f"*/.*{TMP_SUFFIX}"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StorageGuard:
    """Refuse new images while the store is over its cap or its disk is nearly full.

    The writer asks ``check()`` before storing; the request path reads ``full`` (a plain attribute) to leave the
    upload out of the log record at once. Entering and leaving the full state are logged once each, never per
    request. ``used`` (the images table's total size) is re-read every ``resync_s``: a purge run by the CLI frees
    space this process did not see.
    """

    def __init__(self, root: Path, *, max_bytes: int | None, min_free_bytes: int, used: Callable[[], int],
                 resync_s: float = 60.0):
        self.root = Path(root)
        self.max_bytes, self.min_free_bytes = max_bytes, min_free_bytes
        self._used_fn, self._resync_s = used, resync_s
        self.used = used()
        self._synced = time.monotonic()
        self.full: str | None = None  # why new images are refused, or None

    def added(self, size: int) -> None:
        self.used += size

    def check(self) -> str | None:
        if time.monotonic() - self._synced > self._resync_s:
            try:
                self.used = self._used_fn()
            except Exception:  # the database is down: keep counting from the last known total
                log.warning("image store size not re-read (database unavailable?)", exc_info=True)
            self._synced = time.monotonic()
        reason = None
        if self.max_bytes is not None and self.used >= self.max_bytes:
            reason = (f"the image store holds {self.used / GB:.2f} GB, its cap (LOUPE_MAX_STORAGE_GB) is "
                      f"{self.max_bytes / GB:.2f} GB")
        else:
            free = shutil.disk_usage(self.root).free
            if free < self.min_free_bytes:
                reason = (f"{free / GB:.2f} GB free on the disk of {self.root}, below LOUPE_MIN_FREE_DISK_GB "
                          f"({self.min_free_bytes / GB:.2f} GB)")
        if reason and not self.full:
            log.error("image storage full: %s. New images are NOT stored (predictions are still logged) until "
                      "space is freed (python -m review purge) or the limit is raised.", reason)
        elif self.full and not reason:
            log.warning("image storage has room again: new images are stored")
        self.full = reason
        return reason
