import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from review import auth
from review.types import ReviewError

REPO = Path(__file__).resolve().parents[1]


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


GOOD = "pbkdf2_sha256$1000$c2FsdHNhbHQ$" + "A" * 43  # a well-formed hash (of no particular password)


@pytest.mark.parametrize("spec, msg", [
    ("alice", "must look like"), ("alice:plain-password", "must look like"),
    (f"alice:{GOOD},alice:{GOOD}", "twice"),
    ("alice:pbkdf2_sha256$1000$c2FsdA$c2hvcnQ", "32-byte digest"),
    ("alice:pbkdf2_sha256$1000$c2FsdA", "lost its"),
    # what bash leaves of "alice:pbkdf2_sha256$600000$<salt>$<digest>" in double quotes ($6, $0 and $<salt> expanded)
    ("alice:pbkdf2_sha25600000bashrpzEylEigusA8YETmaK0Q-7MvK4oiiBsL6-E1Fzo922J22FiQw", "single quotes"),
])
def test_malformed_reviewers_fail_loudly(spec, msg):
    with pytest.raises(ReviewError, match=msg):
        auth.parse_reviewers(spec)
    with pytest.raises(ReviewError, match=msg):
        auth.verify_reviewer(settings(spec), "alice", "x")


def test_malformed_hash():
    assert auth.parse_reviewers(f" alice : {GOOD} ,") == {"alice": GOOD}
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


@pytest.mark.parametrize("spec", ["alice@example.com", "https://huggingface.co/alice", "hf:alice", "al ice", "-alice"])
def test_hf_allowlist_entries_must_be_user_names(spec):
    with pytest.raises(ReviewError, match="not a Hugging Face user name"):
        auth.parse_hf_allowlist(f"carol,{spec}")


def _run(args, env=None, stdin=None):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("env, says", [
    ({"LOUPE_REVIEWERS": "alice:pbkdf2_sha25600000bashrpzEylEigusA8YETmaK0Q-7MvK4oiiBsL6"}, "single quotes"),
    ({"LOUPE_REVIEWERS": "alice"}, "hash-password"),
    ({"LOUPE_HF_ALLOWLIST": "carol@example.com"}, "not a Hugging Face user name"),
])
def test_the_app_refuses_to_start_with_malformed_accounts(env, says, tmp_path):
    """At start, with a message and exit code 2, not a traceback at the first login; and the value (it could be
    a real hash) is not echoed."""
    # a missing model would stop the start too, later (exit 2 as well): the settings must be refused first
    done = _run(["app.py"], {**env, "LOUPE_DATA_DIR": str(tmp_path / "data"), "LOUPE_MODEL_PATH": str(tmp_path / "x.pkl")})
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "LOUPE_" in done.stderr
    assert "Traceback" not in done.stderr and "rpzEylEig" not in done.stderr


def test_hash_password_reads_a_piped_password():
    """`echo 'my password' | python -m review hash-password`, as the README says."""
    done = _run(["-m", "review", "hash-password"], stdin="my password\n")
    assert done.returncode == 0, done.stderr
    encoded = done.stdout.strip()
    assert auth.parse_reviewers(f"alice:{encoded}") == {"alice": encoded}
    assert auth.check_password("my password", encoded) and not auth.check_password("my password\n", encoded)
