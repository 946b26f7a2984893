"""Who may review: configured reviewer accounts, or allowlisted Hugging Face users.

Two layers, on purpose:
1. the /review mount refuses anonymous visitors (Gradio ``auth=auth_fn(settings)`` shows a login form, whose POST
   is answered by ui/review_login.py: ``auth_fn`` runs there in a worker thread, behind lockouts; on a Space,
   ``auth_dependency=hf_auth_dependency(settings)`` admits only allowlisted HF OAuth sessions);
2. every review handler calls ``require_reviewer`` again, because a mount mistake (or a handler reachable from another
   Blocks) must not turn into an open door, and ``gr.LoginButton`` by itself restricts nothing.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr

from review.auth import allowed_hf_user, parse_reviewers, verify_reviewer
from settings import Settings

# HF identities get a prefix so a HF user can never pass for the configured password account of the same name
# (and the decision log says which kind of login made each decision).
HF_PREFIX = "hf:"
LOGIN_MESSAGE = "Log in as a reviewer"


def reviewer_names(settings: Settings) -> frozenset[str]:
    """Names of the password accounts in ``settings.reviewers``."""
    return frozenset(parse_reviewers(settings.reviewers))


def auth_fn(settings: Settings) -> Callable[[str, str], bool]:
    """Gradio ``auth=`` callable for the /review mount: (username, password) -> bool. Blocking (PBKDF2): never call
    it on the event loop (Gradio's own login route would; ui/review_login.py shadows it)."""

    def check(username: str, password: str) -> bool:
        # HF identities cannot log in with a password: their name space is reserved for OAuth sessions.
        if not username or not password or username.startswith(HF_PREFIX):
            return False
        return verify_reviewer(settings, username, password)

    return check


def _oauth_username(session: Mapping[str, Any] | None) -> str | None:
    """The HF username of a live OAuth session (Gradio stores it under 'oauth_info'), expired sessions ignored."""
    info = (session or {}).get("oauth_info")
    if not isinstance(info, Mapping):
        return None
    expires_at = info.get("expires_at")
    if expires_at is not None and expires_at < time.time():
        return None
    userinfo = info.get("userinfo")
    name = userinfo.get("preferred_username") if isinstance(userinfo, Mapping) else None
    return name if isinstance(name, str) and name else None


def hf_auth_dependency(settings: Settings) -> Callable[[Any], str | None]:
    """Gradio ``auth_dependency=`` for the /review mount on a Space: 'hf:<user>' for allowlisted users, else None.

    Needs a SessionMiddleware in front of the /review mount that can read Gradio's OAuth session cookie (the
    OAuth callback lives on the public app at '/', so the parent FastAPI app must share that session).
    """

    def dependency(request: Any) -> str | None:
        scope = getattr(request, "scope", None)
        session = scope.get("session") if isinstance(scope, dict) else None
        name = _oauth_username(session)
        if name is None or not allowed_hf_user(settings, name):
            return None
        return HF_PREFIX + name

    return dependency


def _is_reviewer_name(settings: Settings, username: str) -> bool:
    if username.startswith(HF_PREFIX):
        return allowed_hf_user(settings, username[len(HF_PREFIX) :])
    # compare_digest over every name: which names exist should not leak through timing.
    return any(hmac.compare_digest(username, name) for name in reviewer_names(settings))


def require_reviewer(request: gr.Request | None, settings: Settings, profile: gr.OAuthProfile | None = None) -> str:
    """The reviewer's name, or gr.Error. Call first thing in every review handler.

    ``request.username`` is set by Gradio from the mount's ``auth``/``auth_dependency``; it is checked against the
    configuration again (not trusted because it is set). An OAuth profile counts only if ``allowed_hf_user`` says so.
    """
    if profile is not None and allowed_hf_user(settings, profile):
        return HF_PREFIX + profile.username
    username = getattr(request, "username", None) if request is not None else None
    if isinstance(username, str) and username and _is_reviewer_name(settings, username):
        return username
    raise gr.Error(LOGIN_MESSAGE, title="Reviewers only")
