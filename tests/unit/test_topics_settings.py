"""The topic table and settings: names, prefixes, compaction, and environment parsing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from recloop.core import events
from recloop.core.settings import Settings
from recloop.core.topics import TOPIC_TABLE, Topics


def test_every_per_user_topic_is_keyed_by_user() -> None:
    for spec in TOPIC_TABLE:
        assert (spec.key == "user_id") == spec.per_user, spec.base_name
    # All but the snapshot announcements, which are keyed by policy.
    per_user = {spec.base_name for spec in TOPIC_TABLE if spec.per_user}
    assert per_user == {"rec.requests", "rec.slates", "rec.feedback", "session.state",
                        "rec.transitions", "sim.outcomes"}  # fmt: skip
    assert next(s for s in TOPIC_TABLE if s.base_name == "policy.snapshots").key == "policy"


def test_state_and_snapshot_topics_are_compacted_and_streams_are_not() -> None:
    compacted = {spec.base_name for spec in TOPIC_TABLE if spec.compacted}
    assert compacted == {"session.state", "policy.snapshots", "items", "catalogue"}


def test_prefix_applies_to_every_name_and_dlq_follows_the_topic() -> None:
    topics = Topics(prefix="staging.")
    assert topics.requests == "staging.rec.requests"
    assert topics.dlq(topics.slates) == "staging.rec.slates.dlq"
    assert all(name.startswith("staging.") for name, _ in topics.all())


def test_unknown_topic_name_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown topic"):
        Topics().name("rec.nope")


def test_feedback_topic_carries_the_three_feedback_types() -> None:
    spec = next(s for s in TOPIC_TABLE if s.base_name == "rec.feedback")
    assert spec.value == events.Impression | events.Click | events.SessionEnd


def test_settings_read_the_environment_at_construction(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RECLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    monkeypatch.setenv("RECLOOP_TOPIC_PREFIX", "t1.")
    monkeypatch.setenv("RECLOOP_PARTITIONS", "8")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    settings = Settings()
    assert settings.kafka_client_config()["bootstrap.servers"] == "127.0.0.1:19092"
    assert settings.topics.transitions == "t1.rec.transitions"
    assert settings.partitions == 8
    assert settings.resolved_database_url == "postgresql+psycopg://u@h/db"
    assert settings.resolved_snapshot_dir == tmp_path / "snapshots"


def test_sqlite_is_the_default_database(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("RECLOOP_DATABASE_URL", raising=False)
    assert Settings(home=tmp_path).resolved_database_url == f"sqlite:///{tmp_path / 'recloop.db'}"


def test_bad_setting_names_the_field(monkeypatch) -> None:
    monkeypatch.setenv("RECLOOP_PARTITIONS", "zero")
    with pytest.raises(ValidationError, match="partitions"):
        Settings()
