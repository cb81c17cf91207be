"""Apache Kafka's jars from Maven Central, and the JVM that runs them.

No Docker and no tarball: ``ensure_kafka_libs`` asks Maven to copy ``kafka_2.13`` (the broker
and its storage tool), ``kafka-tools`` (the consumer-group command) and a log4j2 binding into a
version-specific cache folder outside the repository (``~/.cache/recloop/kafka-<version>/``).
The folder counts as fetched only once Maven succeeded. The version lives in ``KAFKA_VERSION``
only; ``java`` and ``classpath`` say how any JVM here is started on those jars.

Verified, not trusted: Maven runs with ``-C`` (a checksum mismatch fails the fetch instead of
being a warning) and its warnings are logged, and the SHA-256 of every jar is pinned in
``jars.sha256`` next to this module. ``ensure_kafka_libs`` checks the folder against the pins on
every call, so on every broker start: a jar that is not pinned, differs from its pin, or is
missing is refused with a ``BrokerError`` naming it. Hashing all ~44 MB takes about 0.1 s, next
to a JVM start of seconds, so there is no cache that a kept mtime could fool.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from recloop.core.settings import default_home

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.2"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.25.3"
SLF4J_VERSION = "1.7.36"  # Kafka 4.x logs through SLF4J 1.x; log4j-slf4j-impl is its binding.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"

_COMPLETE_MARKER = ".complete.json"
PINS_FILE = Path(__file__).with_name("jars.sha256")

# Stop at the C1 compiler: a short-lived JVM (a tool, or a broker in a test session) starts
# about 2.5x faster on a loaded 2-core machine; long-running brokers keep the full JIT.
QUICK_JIT = "-XX:TieredStopAtLevel=1"


class BrokerError(RuntimeError):
    """The local broker could not be assembled, started or stopped (every step raises it)."""


def kafka_home(cache_dir: Path | None = None, version: str = KAFKA_VERSION) -> Path:
    """The versioned folder for one Kafka version's jars (outside the repository)."""
    return (cache_dir or default_home()) / f"kafka-{version}"


@dataclass(frozen=True)
class LibsInfo:
    """Where the jars are, and how long assembling them took the first time."""

    libs_dir: Path
    fetch_seconds: float
    fetched_now: bool


def pinned_hashes(pins_file: Path = PINS_FILE) -> dict[str, str]:
    """The pinned SHA-256 of each jar by file name, from ``sha256sum`` lines (``#`` comments)."""
    pins: dict[str, str] = {}
    for line in pins_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            pins[name.lstrip("*")] = digest.lower()
    return pins


def verify_libs(libs_dir: Path, pins: Mapping[str, str]) -> None:
    """Raise a one-line ``BrokerError`` unless ``libs_dir`` holds exactly the pinned jars.

    Every file but the dot-files is checked, not only ``*.jar`` (nothing else belongs there):
    one not in ``pins``, one whose SHA-256 differs from its pin, and a pinned jar that is
    missing are each refused by name, with what to do.
    """
    fix = f"delete {libs_dir.parent} to fetch the jars again, and check {PINS_FILE.name}"
    present = sorted(p for p in libs_dir.iterdir() if not p.name.startswith("."))
    for path in present:
        expected = pins.get(path.name)
        if expected is None:
            raise BrokerError(f"Kafka jar {path} is not pinned in {PINS_FILE.name}: {fix}")
        with open(path, "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != expected:
            raise BrokerError(
                f"Kafka jar {path} has SHA-256 {actual}, not the pinned {expected}: {fix}"
            )
    missing = sorted(set(pins) - {p.name for p in present})
    if missing:
        raise BrokerError(f"pinned Kafka jar {missing[0]} is missing from {libs_dir}: {fix}")


def pom(version: str) -> str:
    """A Maven project that only declares the jars to copy: the broker, the command-line
    tools without connect-runtime (it drags in Jetty and Jersey), and the log4j2 binding."""
    deps = [
        ("org.apache.kafka", f"kafka_{SCALA_VERSION}", version, ""),
        (
            "org.apache.kafka",
            "kafka-tools",
            version,
            # connect-runtime drags in Jetty/Jersey; the command-line tools don't need it.
            "<exclusions><exclusion><groupId>org.apache.kafka</groupId>"
            "<artifactId>connect-runtime</artifactId></exclusion></exclusions>",
        ),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION, ""),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION, ""),
        ("org.apache.logging.log4j", "log4j-api", LOG4J_VERSION, ""),
        ("org.slf4j", "slf4j-api", SLF4J_VERSION, ""),
    ]
    dep_xml = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version>{extra}</dependency>"
        for g, a, v, extra in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>recloop.local</groupId>
  <artifactId>kafka-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dep_xml}
  </dependencies>
  <build><pluginManagement><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId>
    <artifactId>maven-dependency-plugin</artifactId>
    <version>{DEPENDENCY_PLUGIN_VERSION}</version>
  </plugin></plugins></pluginManagement></build>
</project>
"""


def ensure_kafka_libs(cache_dir: Path | None = None, version: str = KAFKA_VERSION) -> LibsInfo:
    """Return the jar folder for ``version``, fetching it with Maven the first time.

    The folder counts as complete only once Maven succeeded (a marker file records it and the
    time the fetch took); fetched now or before, it is returned only once ``verify_libs`` passed
    against the pins. A file lock keeps concurrent test sessions from fetching twice.
    """
    home = kafka_home(cache_dir, version)
    libs = home / "libs"
    marker = home / _COMPLETE_MARKER
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            seconds = float(json.loads(marker.read_text()).get("fetch_seconds", 0.0))
            verify_libs(libs, pinned_hashes())
            return LibsInfo(libs, seconds, fetched_now=False)
        if shutil.which("mvn") is None:
            raise BrokerError("Maven ('mvn') is needed to fetch the Kafka jars; install it first")
        # A half-copied folder from an interrupted fetch could mix versions: start clean.
        shutil.rmtree(libs, ignore_errors=True)
        project = home / "fetch"
        project.mkdir(exist_ok=True)
        (project / "pom.xml").write_text(pom(version))
        log.info("fetching Apache Kafka %s jars from Maven Central into %s", version, libs)
        t0 = time.monotonic()
        cmd = [
            # -C: a checksum mismatch fails the fetch (Maven 3 only warns without it).
            "mvn", "-B", "-C", "-f", str(project / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            "-Dmdep.prependGroupId=true",
            f"-DoutputDirectory={libs}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - t0
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith("[WARNING]"):
                log.warning("maven: %s", line.removeprefix("[WARNING]").strip())
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise BrokerError(f"Maven could not fetch the Kafka {version} jars:\n{tail}")
        if not any(libs.glob(f"org.apache.kafka.kafka_{SCALA_VERSION}-{version}.jar")):
            raise BrokerError(f"Maven finished but no kafka_{SCALA_VERSION} jar is in {libs}")
        verify_libs(libs, pinned_hashes())
        marker.write_text(json.dumps({"version": version, "fetch_seconds": round(seconds, 1)}))
        log.info("fetched Kafka %s jars in %.1f s", version, seconds)
        return LibsInfo(libs, seconds, fetched_now=True)


def java() -> str:
    """The ``java`` executable, or a ``BrokerError`` that says to install it."""
    path = shutil.which("java")
    if path is None:
        raise BrokerError("Java 17+ ('java') is needed to run the Kafka broker; install it first")
    return path


def classpath(libs_dir: Path) -> str:
    """Every jar in ``libs_dir`` as one ``-cp`` argument; Java itself expands the wildcard."""
    return f"{libs_dir}/*"
