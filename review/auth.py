"""Reviewer accounts from configuration, and the Hugging Face OAuth allowlist.

``settings.reviewers`` is ``"name:hash,name2:hash2"``; a hash is ``pbkdf2_sha256$<iterations>$<salt>$<digest>``
(salt and digest urlsafe-base64, no padding; stdlib PBKDF2-HMAC-SHA256, made by ``python -m review
hash-password``). The characters of a hash never include ',' or ':', so the list needs no quoting.

Both lists are checked when Settings is built (settings.py), so a malformed value stops the start with a message
instead of failing at the first login.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

from review.types import ReviewError

ALGORITHM = "pbkdf2_sha256"
ITERATIONS = 600_000  # OWASP 2023 guidance for PBKDF2-HMAC-SHA256: ~0.3 s per login here, fine for reviewers
DIGEST_BYTES = 32  # sha256
_DUMMY = f"{ALGORITHM}${ITERATIONS}$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43
# Hugging Face user names: letters, digits, '-', '_' and '.', at most 96 characters.
_HF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_QUOTING_HINT = ("A shell expanded its '$' fields: write the value in single quotes, e.g. "
                 "LOUPE_REVIEWERS='alice:pbkdf2_sha256$600000$...' (in a docker-compose file write each $ as $$).")


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


def parse_hash(encoded: str) -> tuple[int, bytes, bytes]:
    """``pbkdf2_sha256$<iterations>$<salt>$<digest>`` -> (iterations, salt, digest), or ReviewError saying what is wrong."""
    fields = encoded.split("$")
    if len(fields) != 4 and fields[0].startswith(ALGORITHM):
        # e.g. "pbkdf2_sha25600000": bash replaced "$6" and "$<salt>" with (empty) variables inside double quotes
        raise ReviewError(f"the hash has lost its '$'-separated fields ({ALGORITHM}$iterations$salt$digest). "
                          + _QUOTING_HINT)
    if len(fields) != 4:
        raise ReviewError(f"malformed password hash (expected {ALGORITHM}$iterations$salt$digest)")
    algorithm, iterations, salt, digest = fields
    if algorithm != ALGORITHM:
        raise ReviewError(f"unsupported password hash {algorithm!r} (expected {ALGORITHM})")
    try:
        rounds = int(iterations)
        salt_bytes, digest_bytes = _unb64(salt), _unb64(digest)
    except (ValueError, binascii.Error) as exc:
        raise ReviewError(f"malformed password hash (expected {ALGORITHM}$iterations$salt$digest)") from exc
    if rounds < 1 or not salt_bytes or len(digest_bytes) != DIGEST_BYTES:
        raise ReviewError(f"malformed password hash (expected {ALGORITHM}$iterations$salt$digest with a "
                          f"{DIGEST_BYTES}-byte digest)")
    return rounds, salt_bytes, digest_bytes


def check_password(password: str, encoded: str) -> bool:
    rounds, salt, expected = parse_hash(encoded)
    actual = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, rounds)
    return hmac.compare_digest(actual, expected)


def parse_reviewers(spec: str) -> dict[str, str]:
    """``"name:hash,..."`` -> {name: hash}; malformed entries raise (better a failed start than an open door)."""
    accounts: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, encoded = entry.partition(":")
        name, encoded = name.strip(), encoded.strip()
        if not sep or not name or not encoded.startswith(ALGORITHM):
            raise ReviewError(f"LOUPE_REVIEWERS entry for {name or '?'!r} must look like name:{ALGORITHM}$... "
                              "(make the hash with `python -m review hash-password`)")
        if name in accounts:
            raise ReviewError(f"reviewer {name!r} is listed twice in LOUPE_REVIEWERS")
        try:
            parse_hash(encoded)
        except ReviewError as e:
            raise ReviewError(f"LOUPE_REVIEWERS entry for {name!r}: {e.args[0]}") from None
        accounts[name] = encoded
    return accounts


def parse_hf_allowlist(spec: str) -> frozenset[str]:
    """``"alice, Bob"`` -> casefolded names; anything that cannot be a Hugging Face user name raises."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if not _HF_NAME.fullmatch(name):
            raise ReviewError(f"LOUPE_HF_ALLOWLIST: {name!r} is not a Hugging Face user name (give user names, "
                              "not e-mail addresses or URLs, separated by commas)")
    return frozenset(n.casefold() for n in names)


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
    return name.casefold() in parse_hf_allowlist(settings.hf_allowlist)
