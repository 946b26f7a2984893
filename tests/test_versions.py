"""The model registry (model.versions): registration, lineage, status rules, the pinned load, the CLI."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from model import versions as V
from model import versions_cli
from model.loading import ModelLoadError
from review.db import ModelVersion
from tests import review_fixtures as rf

services, sqlite_url, db_url = rf.services, rf.sqlite_url, rf.db_url  # fixtures

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def reg(kit, sha, *, name="digits", parent=None, **kw):
    return kit.store.transaction(lambda s: V.register(s, name=name, sha256=sha, path=f"models/{sha}/export.pkl",
                                                      vocab=("0", "1"), now=kit.store.clock(), parent=parent, **kw))


def status(kit, version, to, note=""):
    return kit.store.transaction(lambda s: V.set_status(s, version, to, now=kit.store.clock(), note=note))


def read(kit, fn):
    return kit.store.transaction(fn, read=True)


def test_register_get_and_vocab_registry(services, db_url):
    kit = services(db_url)
    a = reg(kit, SHA_A, metrics={"error_rate": 0.1}, data={"counts": {"total": 10}}, note="first",
            training_images=[("1" * 64, "0", "train", "dataset"), ("2" * 64, "1", "valid", "dataset")])
    assert a.version == "digits@aaaaaaaaaaaa" and a.status == "candidate" and a.parent is None
    assert reg(kit, SHA_A, name="other") == a  # the same file again: the existing record, nothing new
    b = reg(kit, SHA_B, parent=a.version)
    assert read(kit, lambda s: V.get(s, a.version)) == a
    assert read(kit, lambda s: V.get(s, "bbbbbbbb")).version == b.version  # sha256 prefix
    assert read(kit, lambda s: V.get(s, "nope")) is None
    assert [r.version for r in read(kit, V.list_versions)] == [a.version, b.version]
    # logging works for every registered version: the store's vocab registry knows it under the same string
    assert kit.store.vocab(b.version) == ("0", "1")
    assert read(kit, lambda s: V.training_images(s, a.version)) == {"1" * 64: "0", "2" * 64: "1"}
    assert read(kit, lambda s: V.trained_on(s, a.version, ["1" * 64, "2" * 64, "3" * 64])) == {"1" * 64}
    with pytest.raises(V.VersionError, match="unknown parent"):
        reg(kit, SHA_C, parent="nobody@123")
    with pytest.raises(V.VersionError, match="starts as candidate"):
        reg(kit, SHA_C, status="current")


def test_status_rules_one_current_one_role_and_rollback(services, db_url):
    kit = services(db_url)
    a, b, c = reg(kit, SHA_A), reg(kit, SHA_B), reg(kit, SHA_C)
    assert read(kit, V.current) is None
    status(kit, a.version, "current")
    status(kit, b.version, "shadow")
    status(kit, c.version, "canary")  # one candidate in a role at a time: b goes back to candidate
    assert read(kit, lambda s: V.get(s, b.version)).status == "candidate"
    assert read(kit, V.in_role).version == c.version
    status(kit, c.version, "current", note="promoted")  # the old current is retired in the same transaction
    assert read(kit, V.current).version == c.version
    assert read(kit, lambda s: V.get(s, a.version)).status == "retired"
    assert read(kit, V.in_role) is None
    with pytest.raises(V.VersionError, match="current; it can become retired"):
        status(kit, c.version, "candidate")
    with pytest.raises(V.VersionError, match="unknown status"):
        status(kit, c.version, "live")
    # rollback: the previous current comes back, the faulty one is retired
    assert read(kit, V.previous_current).version == a.version
    status(kit, a.version, "current", note="rollback")
    assert read(kit, V.current).version == a.version
    assert read(kit, lambda s: V.get(s, c.version)).status == "retired"
    assert read(kit, V.previous_current).version == c.version
    assert status(kit, a.version, "current").status == "current"  # idempotent
    moves = [(e.from_status, e.to_status) for e in read(kit, lambda s: V.history(s, a.version))]
    assert moves == [(None, "candidate"), ("candidate", "current"), ("current", "retired"), ("retired", "current")]


def test_database_refuses_a_second_current(services, db_url):
    """Not only the code: the unique partial index stops two replicas from each making a version current."""
    kit = services(db_url)
    a, b = reg(kit, SHA_A), reg(kit, SHA_B)
    status(kit, a.version, "current")

    def force(s):
        s.get(ModelVersion, b.version).status = "current"
        s.flush()

    with pytest.raises(IntegrityError):
        kit.store.transaction(force, attempts=1)


def test_adopt_served_registers_the_settings_model_as_current_once(services, sqlite_url):
    kit = services(sqlite_url)
    now = kit.store.clock()
    first = kit.store.transaction(lambda s: V.adopt_served(s, name="demo", sha256=SHA_A, path="/m/export.pkl",
                                                          vocab=("0", "1"), now=now))
    assert first.status == "current"
    other = kit.store.transaction(lambda s: V.adopt_served(s, name="x", sha256=SHA_B, path="/m/b.pkl",
                                                          vocab=("0", "1"), now=now + timedelta(seconds=1)))
    assert other.status == "candidate" and read(kit, V.current).version == first.version


def test_load_predictor_checks_the_registry_pin(services, sqlite_url, tmp_path):
    from model.demo import DEMO_EXPORT, DEMO_SHA256, VOCAB

    kit = services(sqlite_url, backend="torch")
    rec = kit.store.transaction(lambda s: V.register(s, name="digits-demo", sha256=DEMO_SHA256, path=DEMO_EXPORT,
                                                     vocab=VOCAB, now=kit.store.clock()))
    predictor = V.load_predictor(rec, kit.store.settings)
    assert predictor.info.version == rec.version and predictor.info.vocab == VOCAB
    # the file changed after registration (or the row lies): refused, never unpickled
    copy = tmp_path / "export.pkl"
    copy.write_bytes(DEMO_EXPORT.read_bytes() + b"tampered")
    with pytest.raises(ModelLoadError, match="Refusing to load"):
        V.load_predictor(V.VersionRecord(**{**rec.__dict__, "path": str(copy)}), kit.store.settings)


def test_compare_and_cli(services, sqlite_url, monkeypatch, capsys):
    kit = services(sqlite_url)
    a = reg(kit, SHA_A, metrics={"error_rate": 0.2, "per_class": {"0": {"precision": 0.7, "recall": 0.9}}},
            data={"counts": {"total": 10, "by_class": {"0": 5, "1": 5}}, "snapshot_sha256": "x"})
    b = reg(kit, SHA_B, parent=a.version, metrics={"error_rate": 0.1},
            data={"counts": {"total": 12, "by_class": {"0": 6, "1": 6}}, "snapshot_sha256": "y"})
    cmp = V.compare(a, b)
    assert cmp["error_rate"] == {"a": 0.2, "b": 0.1} and cmp["lineage"] == "b descends from a"
    assert cmp["per_class"]["0"]["precision"] == {"a": 0.7, "b": None}
    assert cmp["images_by_class"]["1"] == {"a": 5, "b": 6} and "differ" in cmp["caveat"]
    settings = kit.store.settings
    monkeypatch.setenv("LOUPE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("LOUPE_DATABASE_URL", settings.db_url)
    assert versions_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert a.version in out and b.version in out and "0.1000" in out
    assert versions_cli.main(["show", "bbbbbbbbbb"]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == a.version
    assert versions_cli.main(["compare", a.version, b.version]) == 0
    assert json.loads(capsys.readouterr().out)["lineage"] == "b descends from a"
    assert versions_cli.main(["show", "missing"]) == 2
    assert "unknown model version" in capsys.readouterr().err
