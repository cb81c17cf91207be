"""The Kafka jars are pinned: ``ensure_kafka_libs`` refuses a folder that differs from the pins."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from recloop.ops.broker.jars import (
    KAFKA_VERSION,
    LOG4J_VERSION,
    SCALA_VERSION,
    SLF4J_VERSION,
    BrokerError,
    ensure_kafka_libs,
    kafka_home,
    pinned_hashes,
    verify_libs,
)


def _fetched_folder(cache: Path, jars: dict[str, bytes]) -> Path:
    """A cache folder as a finished fetch leaves it (marker written), holding ``jars``."""
    home = kafka_home(cache)
    libs = home / "libs"
    libs.mkdir(parents=True)
    for name, data in jars.items():
        (libs / name).write_bytes(data)
    (home / ".complete.json").write_text(json.dumps({"version": KAFKA_VERSION}))
    return libs


def test_the_pin_file_names_every_declared_jar_with_a_sha256():
    pins = pinned_hashes()
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in pins.values())
    for name in (
        f"org.apache.kafka.kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar",
        f"org.apache.kafka.kafka-tools-{KAFKA_VERSION}.jar",
        f"org.apache.logging.log4j.log4j-core-{LOG4J_VERSION}.jar",
        f"org.slf4j.slf4j-api-{SLF4J_VERSION}.jar",
    ):
        assert name in pins


def test_a_tampered_jar_is_refused_on_start_by_name(tmp_path):
    name = f"org.apache.kafka.kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar"
    _fetched_folder(tmp_path, {name: b"not the jar Maven Central serves"})
    with pytest.raises(BrokerError, match=rf"{re.escape(name)} has SHA-256 .* not the pinned"):
        ensure_kafka_libs(tmp_path)


def test_a_jar_missing_from_the_pin_list_is_refused_on_start(tmp_path):
    _fetched_folder(tmp_path, {"evil-agent.jar": b"anything"})
    with pytest.raises(BrokerError, match=r"evil-agent\.jar is not pinned in jars\.sha256"):
        ensure_kafka_libs(tmp_path)


def test_a_folder_matching_its_pins_passes_and_each_deviation_is_refused(tmp_path):
    jars = {"a.jar": b"alpha", "b.jar": b"beta"}
    pins = {name: hashlib.sha256(data).hexdigest() for name, data in jars.items()}
    libs = tmp_path / "libs"
    libs.mkdir()
    for name, data in jars.items():
        (libs / name).write_bytes(data)
    verify_libs(libs, pins)

    (libs / "b.jar").write_bytes(b"betA")  # same size, one byte changed
    with pytest.raises(BrokerError, match=r"b\.jar has SHA-256"):
        verify_libs(libs, pins)
    (libs / "b.jar").unlink()
    with pytest.raises(BrokerError, match=r"pinned Kafka jar b\.jar is missing"):
        verify_libs(libs, pins)


def test_the_error_is_one_line_that_says_what_to_do(tmp_path):
    _fetched_folder(tmp_path, {"x.jar": b"x"})
    with pytest.raises(BrokerError) as err:
        ensure_kafka_libs(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"delete {kafka_home(tmp_path)} to fetch the jars again" in message


def test_verifying_a_broker_sized_folder_is_cheap(tmp_path):
    """44 MB in 53 jars, as Kafka's are: well under a second, against a JVM start of seconds."""
    data = {f"j{i}.jar": bytes([i]) * 830_000 for i in range(53)}
    libs = tmp_path / "libs"
    libs.mkdir()
    for name, blob in data.items():
        (libs / name).write_bytes(blob)
    pins = {name: hashlib.sha256(blob).hexdigest() for name, blob in data.items()}
    t0 = time.perf_counter()
    verify_libs(libs, pins)
    assert time.perf_counter() - t0 < 2.0
