"""Admission control for password logins: failure lockouts per key, and a bounded pool of password checks.

Both live on the event loop of one server (asyncio, single-threaded), so they need no locks; each server builds its
own (nothing here is module state).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread

FIRST_LOCKOUT_S = 1.0
MAX_KEYS = 10_000  # per limiter: ~2 MB at most, whatever names and addresses a flood invents


@dataclass
class _Record:
    failures: int = 0
    in_flight: int = 0  # attempts admitted whose outcome is not known yet
    locked_until: float = 0.0
    last_failure: float = 0.0


class FailureLimiter:
    """Lockout with exponential back-off for one kind of key (a username, a client address).

    ``max_failures`` failures are free; the next locks the key for 1 s, and each further one doubles that, up to
    ``max_lockout_s``. While locked, attempts are refused without being counted (an attacker retrying cannot
    stretch someone's lockout beyond the doubling). A success clears the key. A key is forgotten after
    ``max_lockout_s`` without a failure. At most ``max_keys`` keys are kept, least recently used dropped first:
    memory stays bounded, and evicting a locked key needs ``max_keys`` other keys to fail first (i.e. that many
    addresses or usernames, each of which is limited itself).
    """

    def __init__(self, *, max_failures: int, max_lockout_s: float, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.max_lockout_s = max_lockout_s
        self.max_keys = max_keys
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def _get(self, key: str, now: float) -> _Record | None:
        rec = self._records.get(key)
        if rec is None:
            return None
        if rec.in_flight == 0 and now - max(rec.last_failure, rec.locked_until) > self.max_lockout_s:
            del self._records[key]
            return None
        self._records.move_to_end(key)
        return rec

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 if it may now."""
        now = self.clock()
        rec = self._get(key, now)
        if rec is None:
            return 0.0
        if rec.locked_until > now:
            return rec.locked_until - now
        # Attempts already in flight count as failures-to-be: 32 simultaneous requests must not all get past a
        # limit of 5 before the first answer is known. Past the limit, one attempt per lockout.
        if rec.in_flight >= max(1, self.max_failures - rec.failures):
            return FIRST_LOCKOUT_S
        return 0.0

    def begin(self, key: str) -> None:
        rec = self._get(key, self.clock())
        if rec is None:
            rec = self._records[key] = _Record()
            while len(self._records) > self.max_keys:
                self._records.popitem(last=False)
        rec.in_flight += 1

    def end(self, key: str, ok: bool | None) -> None:
        """The outcome of an attempt ``begin`` admitted: True success, False failure, None unknown (cancelled)."""
        now = self.clock()
        rec = self._records.get(key)
        if rec is None:  # evicted meanwhile
            if ok is not False:
                return
            rec = self._records[key] = _Record(in_flight=1)
        rec.in_flight = max(0, rec.in_flight - 1)
        if ok:
            rec.failures, rec.locked_until = 0, 0.0
        elif ok is False:
            rec.failures += 1
            rec.last_failure = now
            beyond = rec.failures - self.max_failures
            if beyond >= 0:
                rec.locked_until = now + min(self.max_lockout_s, FIRST_LOCKOUT_S * 2.0 ** min(beyond, 30))
        self._records.move_to_end(key)


class Busy(Exception):
    """Too many password checks are waiting already."""


class CheckPool:
    """Runs blocking password checks in worker threads, ``concurrency`` at a time, with at most ``max_waiting``
    waiting: a flood can take neither the event loop nor every worker thread."""

    def __init__(self, concurrency: int, max_waiting: int):
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the server's event loop
        self._waiting = 0

    async def run(self, fn: Callable[..., bool], *args) -> bool:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        if self._slots.locked() and self._waiting >= self.max_waiting:
            raise Busy
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            self._slots.release()


def address_key(host: str) -> str:
    """The unit an address limit applies to: an IPv4 address, or an IPv6 /64 (what one subscriber usually gets;
    limiting single IPv6 addresses would give an attacker 2^64 fresh keys)."""
    try:
        ip = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
