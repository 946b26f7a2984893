"""On a Space with an allowlist, reviewers sign in with Hugging Face; only allowlisted users get /review."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner

from settings import Settings
from tests.app_support import app_parts, server_for

SECRET = "space-oauth-secret"


def _session_cookie(username: str, secret: str = SECRET) -> str:
    """A session cookie exactly as Starlette's SessionMiddleware (with Gradio's OAuth key) would sign it."""
    key = hashlib.sha256((secret + "-v4").encode()).hexdigest()
    session = {"oauth_info": {"userinfo": {"preferred_username": username}, "expires_at": time.time() + 600}}
    data = base64.b64encode(json.dumps(session).encode())
    return TimestampSigner(key).sign(data).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory, demo_predictor):
    import gradio.oauth

    # What a Space with `hf_oauth: true` provides (Gradio reads these at import). Nothing is fetched: the
    # provider's metadata is only requested when someone actually clicks "Sign in".
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gradio.oauth, "get_space", lambda: "someone/loupe")
        for name, value in [("OAUTH_CLIENT_ID", "client-id"), ("OAUTH_CLIENT_SECRET", SECRET),
                            ("OAUTH_SCOPES", "openid profile"), ("OPENID_PROVIDER_URL", "https://hf.invalid")]:
            mp.setattr(gradio.oauth, name, value)
        yield from _client(tmp_path_factory, demo_predictor)


def _client(tmp_path_factory, demo_predictor):
    settings = Settings(data_dir=tmp_path_factory.mktemp("space"), space_id="someone/loupe", hf_allowlist="carol",
                        oauth_client_secret=SECRET)
    service = app_parts(settings, demo_predictor)
    with TestClient(server_for(settings, service), base_url="https://testserver") as c:
        yield c
    service.store.close()


def test_public_app_offers_hf_sign_in(client):
    config = client.get("/config").json()
    assert any(c.get("props", {}).get("elem_id") == "hf-login" for c in config["components"])


@pytest.mark.parametrize("who, status", [("carol", 200), ("mallory", 401), (None, 401)])
def test_review_requires_an_allowlisted_hf_session(client, who, status):
    client.cookies.clear()
    if who is not None:
        client.cookies.set("session", _session_cookie(who))
    assert client.get("/review/config").status_code == status


def test_a_session_signed_with_another_secret_is_refused(client):
    client.cookies.clear()
    client.cookies.set("session", _session_cookie("carol", secret="forged"))
    assert client.get("/review/config").status_code == 401


def test_logout_ends_the_hf_session_for_review_by_post_only(client):
    client.cookies.clear()
    # the domain the cookie jar files the server's own cookies under, so the logout's Set-Cookie replaces it
    client.cookies.set("session", _session_cookie("carol"), domain="testserver.local")
    assert client.get("/review/logout").status_code == 405
    assert client.get("/review/config").status_code == 200
    r = client.post("/review/logout", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review/"
    assert client.get("/review/config").status_code == 401
