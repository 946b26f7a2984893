from types import SimpleNamespace

import pytest

from review import auth
from review.types import ReviewError


def settings(reviewers="", allow=""):
    return SimpleNamespace(reviewers=reviewers, hf_allowlist=allow)


@pytest.fixture(scope="module")
def accounts():
    # few iterations keep the test fast; the format records them, so verification follows
    return {"alice": auth.hash_password("correct horse", iterations=1000),
            "bob": auth.hash_password("hunter2", iterations=1000)}


def test_hash_format_and_salt(accounts):
    h = accounts["alice"]
    algorithm, iterations, salt, digest = h.split("$")
    assert (algorithm, iterations) == ("pbkdf2_sha256", "1000") and "," not in h and ":" not in h
    assert auth.hash_password("correct horse", iterations=1000) != h  # random salt
    assert auth.check_password("correct horse", h) and not auth.check_password("correct horse ", h)
    assert auth.hash_password("x").split("$")[1] == str(auth.ITERATIONS)


def test_verify_reviewer(accounts):
    s = settings(",".join(f"{n}:{h}" for n, h in accounts.items()))
    assert auth.verify_reviewer(s, "alice", "correct horse")
    assert auth.verify_reviewer(s, "bob", "hunter2")
    assert not auth.verify_reviewer(s, "alice", "hunter2")
    assert not auth.verify_reviewer(s, "mallory", "hunter2")
    assert not auth.verify_reviewer(s, "alice", "")
    assert not auth.verify_reviewer(s, "", "")
    assert not auth.verify_reviewer(settings(""), "alice", "correct horse")  # no accounts: nobody gets in


@pytest.mark.parametrize("spec, msg", [("alice", "must look like"), ("alice:plain-password", "must look like"),
                                       ("alice:pbkdf2_sha256$1$a$b,alice:pbkdf2_sha256$1$a$b", "twice")])
def test_malformed_reviewers_fail_loudly(spec, msg):
    with pytest.raises(ReviewError, match=msg):
        auth.verify_reviewer(settings(spec), "alice", "x")


def test_malformed_hash():
    with pytest.raises(ReviewError, match="malformed"):
        auth.check_password("x", "pbkdf2_sha256$many$salt$digest")
    with pytest.raises(ReviewError, match="unsupported"):
        auth.check_password("x", "md5$1$AAAA$AAAA")


class Profile(dict):  # shaped like gr.OAuthProfile: a dict with attributes
    @property
    def username(self):
        return self["preferred_username"]


def test_hf_allowlist():
    s = settings(allow="Alice, carol")
    assert auth.allowed_hf_user(s, Profile(preferred_username="alice"))
    assert auth.allowed_hf_user(s, {"preferred_username": "carol"})
    assert auth.allowed_hf_user(s, "CAROL")
    assert not auth.allowed_hf_user(s, Profile(preferred_username="mallory"))
    assert not auth.allowed_hf_user(s, None)  # anonymous (gr.LoginButton restricts nothing)
    assert not auth.allowed_hf_user(s, "")
    assert not auth.allowed_hf_user(settings(allow=""), "alice")
