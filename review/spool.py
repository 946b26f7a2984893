"""Append-only spool: a prediction whose id was returned survives a kill -9 of the process.

``append`` writes the record (JSON metadata + the upload's bytes) to the current segment file with one
``write()`` before the caller returns the prediction id: once ``write()`` returns, the bytes are in the kernel's
page cache, which outlives the process. The background writer fsyncs the segment about every ``sync_s`` seconds
(a power cut loses at most that much of what is not in the database yet) and tells the spool which records are in
the database (``done``): a segment whose records are all in is emptied (the current one) or deleted.

Layout: ``<root>/<owner>/<seq>.seg``, one owner directory per process, held with ``flock`` while it lives (the
kernel drops the lock when the process dies, however it dies). At start, ``claim_orphans`` takes the directories
whose lock is free: they belong to dead processes, and the caller replays their records (``Orphan.records``)
before removing them (``Orphan.remove``). Records already in the database are the caller's to skip.

Record: header ``<4sIII`` (magic, metadata length, data length, crc32 of metadata + data), metadata, data. A torn
tail (a crash during the write, a power cut) fails the length or the crc check and is ignored, with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
MAGIC = b"LPS1"
HEADER = struct.Struct("<4sIII")
LOCK = "lock"
SEGMENT_BYTES = 32 << 20  # rotate past this; a segment is deleted once all its records are in the database


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if a live process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, *, sync_s: float = 1.0, segment_bytes: int = SEGMENT_BYTES):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Created and locked under a dot-name, then renamed: claim_orphans (which skips dot-names) in another
        # process never sees this directory unlocked and mistakes it for a dead process's.
        name = uuid.uuid4().hex
        staging = self.root / f".new-{name}"
        staging.mkdir()
        self._lock_fd = _lock(staging / LOCK)
        if self._lock_fd is None:
            raise RuntimeError(f"cannot lock the new spool directory {staging}")
        self.dir = self.root / name
        os.rename(staging, self.dir)
        _fsync_dir(self.root)
        self._sync_s, self._segment_bytes = sync_s, segment_bytes
        self._lock = threading.Lock()
        self._seq = 0
        self._fd = self._open(0)
        self._size = 0
        self._live: dict[int, int] = {0: 0}  # segment -> records appended and not yet done
        self._dirty = False
        self._last_sync = time.monotonic()
        self.error: str | None = None  # why the last append failed, until one succeeds (health)
        self.closed = False

    def _open(self, seq: int) -> int:
        return os.open(self.dir / f"{seq:08d}.seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    # --- request threads ------------------------------------------------------------------------------------
    def append(self, meta: dict, data: bytes | None) -> int | None:
        """Write one record; returns its segment (for ``done``), or None if it could not be written (logged)."""
        m = json.dumps(meta, separators=(",", ":")).encode()
        d = data or b""
        parts = [HEADER.pack(MAGIC, len(m), len(d), zlib.crc32(d, zlib.crc32(m))), m, d]
        total = HEADER.size + len(m) + len(d)
        with self._lock:
            if self.closed:
                return None
            try:
                _write_all(self._fd, parts, total)
            except OSError as exc:
                self._failed(exc)
                return None
            self._size += total
            self._live[self._seq] += 1
            self._dirty = True
            if self.error is not None:
                log.warning("prediction spool writable again: acknowledged predictions are crash-safe again")
                self.error = None
            return self._seq

    def _failed(self, exc: OSError) -> None:
        try:  # cut the partial record off, so the records appended after it stay readable
            os.ftruncate(self._fd, self._size)
        except OSError:
            pass  # then the torn record ends this segment for replay; the crc check still keeps it out
        if self.error is None:
            log.error("prediction spool %s cannot be written (%s): predictions are still logged, but those not yet "
                      "in the database are lost if the process is killed", self.dir, exc)
        self.error = f"{type(exc).__name__}: {exc}"

    # --- the writer thread --------------------------------------------------------------------------------------
    def done(self, segments: list[int | None]) -> None:
        """These records are in the database (or given up on): their bytes are no longer needed."""
        old_fd = None
        with self._lock:
            for seg in segments:
                if seg is not None:
                    self._live[seg] -= 1
            for seg in [s for s, n in self._live.items() if n == 0 and s != self._seq]:
                del self._live[seg]
                (self.dir / f"{seg:08d}.seg").unlink(missing_ok=True)
            if self.closed:
                return
            if self._live[self._seq] == 0 and self._size:
                os.ftruncate(self._fd, 0)  # everything appended is in the database: start the segment afresh
                self._size = 0
                self._dirty = False
            elif self._size >= self._segment_bytes:
                old_fd = self._fd
                self._seq += 1
                self._fd, self._size = self._open(self._seq), 0
                self._live[self._seq] = 0
        if old_fd is not None:  # only this thread closes segment fds, so fsync outside the lock is safe
            os.fsync(old_fd)
            os.close(old_fd)
            _fsync_dir(self.dir)

    def sync(self, *, force: bool = False) -> None:
        """fsync the current segment if something was appended since the last sync (at most every sync_s)."""
        if not self._dirty or (not force and time.monotonic() - self._last_sync < self._sync_s):
            return
        with self._lock:
            if self.closed:
                return
            fd, self._dirty = self._fd, False
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("prediction spool: fsync failed (%s)", exc)
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Remove the spool if everything in it reached the database; otherwise keep it for the next start."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            live = sum(self._live.values())
            os.close(self._fd)
        if live:
            log.error("prediction spool: %d records not in the database; they are replayed at the next start", live)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)


def _write_all(fd: int, parts: list[bytes], total: int) -> None:
    written = os.writev(fd, parts)
    if written == total:
        return
    rest = b"".join(parts)[written:]  # a short write (disk full, signal): rare, so the copy does not matter
    while rest:
        n = os.write(fd, rest)
        if n == 0:
            raise OSError("short write to the prediction spool")
        rest = rest[n:]


class Orphan:
    """The spool of a process that died: its records, in the order they were appended."""

    def __init__(self, path: Path, lock_fd: int):
        self.dir, self._lock_fd = path, lock_fd

    def records(self) -> Iterator[tuple[dict, bytes]]:
        for seg in sorted(self.dir.glob("*.seg")):
            yield from _read_segment(seg)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)


def claim_orphans(root: Path) -> list[Orphan]:
    """Spool directories under ``root`` left by dead processes, locked for us."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for d in sorted(root.iterdir()):
        try:
            fd = _lock(d / LOCK)
        except (FileNotFoundError, NotADirectoryError):  # not a spool, or removed meanwhile by another process
            continue
        if fd is None:  # a live process
            continue
        if d.name.startswith(".new-"):  # died while creating its spool: nothing in it was acknowledged
            shutil.rmtree(d, ignore_errors=True)
            os.close(fd)
            continue
        found.append(Orphan(d, fd))
    return found


def _read_segment(path: Path) -> Iterator[tuple[dict, bytes]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while header := f.read(HEADER.size):
            ok = len(header) == HEADER.size
            if ok:
                magic, meta_len, data_len, crc = HEADER.unpack(header)
                # lengths from a torn header could be anything: never read past the end of the file
                ok = magic == MAGIC and f.tell() + meta_len + data_len <= size
            if ok:
                meta, data = f.read(meta_len), f.read(data_len)
                ok = len(meta) == meta_len and len(data) == data_len and zlib.crc32(data, zlib.crc32(meta)) == crc
            if not ok:
                log.warning("prediction spool %s: torn record at byte %d and after ignored (a crash during the "
                            "write, so its id was never returned; or a power cut before the fsync)", path, f.tell())
                return
            yield json.loads(meta), data
