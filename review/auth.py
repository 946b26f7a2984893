"""Reviewer accounts from configuration, and the Hugging Face OAuth allowlist.

``settings.reviewers`` is ``"name:hash,name2:hash2"``; a hash is ``pbkdf2_sha256$<iterations>$<salt>$<digest>``
(salt and digest urlsafe-base64, no padding; stdlib PBKDF2-HMAC-SHA256, made by ``python -m review
hash-password``). The characters of a hash never include ',' or ':', so the list needs no quoting.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping

from review.types import ReviewError

ALGORITHM = "pbkdf2_sha256"
ITERATIONS = 600_000  # OWASP 2023 guidance for PBKDF2-HMAC-SHA256: ~0.3 s per login here, fine for reviewers
_DUMMY = f"{ALGORITHM}${ITERATIONS}$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, iterations: int = ITERATIONS) -> str:
    if not password:
        raise ReviewError("the password must not be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{ALGORITHM}${iterations}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, encoded: str) -> bool:
    try:
        algorithm, iterations, salt, digest = encoded.split("$")
        expected = _unb64(digest)
        rounds = int(iterations)
        salt_bytes = _unb64(salt)
    except ValueError as exc:  # binascii.Error is a ValueError too
        raise ReviewError(f"malformed password hash (expected {ALGORITHM}$iterations$salt$digest)") from exc
    if algorithm != ALGORITHM or rounds < 1:
        raise ReviewError(f"unsupported password hash {algorithm!r} (expected {ALGORITHM})")
    actual = hashlib.pbkdf2_hmac("sha256", password.encode(), salt_bytes, rounds)
    return hmac.compare_digest(actual, expected)


def parse_reviewers(spec: str) -> dict[str, str]:
    """``"name:hash,..."`` -> {name: hash}; malformed entries raise (better a failed start than an open door)."""
    accounts: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, encoded = entry.partition(":")
        name = name.strip()
        if not sep or not name or not encoded.startswith(f"{ALGORITHM}$"):
            raise ReviewError(f"LOUPE_REVIEWERS entry for {name or '?'!r} must look like name:{ALGORITHM}$...")
        if name in accounts:
            raise ReviewError(f"reviewer {name!r} is listed twice in LOUPE_REVIEWERS")
        accounts[name] = encoded.strip()
    return accounts


def verify_reviewer(settings, username: str, password: str) -> bool:
    """True only for a configured reviewer with the right password. Unknown names cost a full hash as well, so
    response times do not reveal which reviewer names exist."""
    accounts = parse_reviewers(settings.reviewers)
    encoded = accounts.get(username or "")
    ok = check_password(password or "", encoded or _DUMMY)
    return encoded is not None and bool(password) and ok


def hf_username(profile) -> str | None:
    """Username from a ``gr.OAuthProfile`` (a dict subclass), a plain mapping, or a string; None if anonymous."""
    if profile is None:
        return None
    if isinstance(profile, str):
        return profile or None
    name = getattr(profile, "username", None)
    if name is None and isinstance(profile, Mapping):
        name = profile.get("preferred_username")
    return name or None


def allowed_hf_user(settings, profile) -> bool:
    """HF OAuth login is only identification: access needs the name on ``settings.hf_allowlist``."""
    name = hf_username(profile)
    if name is None:
        return False
    allowed = {n.strip().casefold() for n in settings.hf_allowlist.split(",") if n.strip()}
    return name.casefold() in allowed
