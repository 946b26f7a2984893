"""Content-addressed image files: ``<root>/<sha[:2]>/<sha>.png``, written atomically, never overwritten.

The bytes are ``serving.imageio.encode_for_storage(img)`` (lossless PNG, all metadata stripped), so the same pixels
always give the same name and duplicates are stored once. Files are written BEFORE their database row: a crash
can leave an orphan file (``review reconcile`` finds it), never a row without its file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from review.types import ReviewError
from serving.imageio import encode_for_storage

_SHA = re.compile(r"[0-9a-f]{64}")
TMP_SUFFIX = ".tmp"


def check_sha(sha: str) -> str:
    """Refuse anything but 64 lowercase hex digits: the name becomes a path, so no '..', no '/'."""
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise ReviewError("not an image id (expected 64 hex digits)")
    return sha


class ImageStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        check_sha(sha)
        return self.root / sha[:2] / f"{sha}.png"

    def put_image(self, img: Image.Image) -> tuple[str, int]:
        """Encode and store; returns (sha256, size in bytes)."""
        data = encode_for_storage(img)
        return self.put_bytes(data), len(data)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        final = self.path(sha)
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
                for f in sorted(sub.glob("*.png")):
                    if _SHA.fullmatch(f.stem) and f.stem[:2] == sub.name:
                        yield f.stem

    def iter_temp_files(self) -> Iterator[Path]:
        """Leftovers of writes interrupted by a crash (never referenced by any row)."""
        yield from sorted(self.root.glob(f"*/.*{TMP_SUFFIX}"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
