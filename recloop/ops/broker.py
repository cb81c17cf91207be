"""A real single-node Apache Kafka broker (KRaft) assembled from Maven Central jars.

No Docker and no tarball: ``ensure_kafka_libs`` asks Maven to copy ``kafka_2.13`` (the broker
and its storage tool), ``kafka-tools`` (the consumer-group command) and a log4j2 binding into a
version-specific cache folder; ``LocalBroker`` writes ``server.properties`` for one combined
broker+controller on 127.0.0.1, formats the data dir and runs ``java kafka.Kafka``. The test
suite's session fixture and ``recloop kafka up|down|status`` share this code.

Facts used here are in ``shared/design/kafka-local.md``; the version lives in ``KAFKA_VERSION``
only.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from recloop.core.settings import default_home

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.2"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.25.3"
SLF4J_VERSION = "1.7.36"  # Kafka 4.x logs through SLF4J 1.x; log4j-slf4j-impl is its binding.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
DEFAULT_PORT = 9092

_COMPLETE_MARKER = ".complete.json"


class BrokerError(RuntimeError):
    """The local broker could not be assembled, started or stopped."""


# --------------------------------------------------------------------------------------------
# Jars


def kafka_home(cache_dir: Path | None = None, version: str = KAFKA_VERSION) -> Path:
    """The versioned folder for one Kafka version's jars (outside the repository)."""
    return (cache_dir or default_home()) / f"kafka-{version}"


@dataclass(frozen=True)
class LibsInfo:
    """Where the jars are, and how long assembling them took the first time."""

    libs_dir: Path
    fetch_seconds: float
    fetched_now: bool


def _pom(version: str) -> str:
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
    time the fetch took). A file lock keeps concurrent test sessions from fetching twice.
    """
    home = kafka_home(cache_dir, version)
    libs = home / "libs"
    marker = home / _COMPLETE_MARKER
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            seconds = float(json.loads(marker.read_text()).get("fetch_seconds", 0.0))
            return LibsInfo(libs, seconds, fetched_now=False)
        if shutil.which("mvn") is None:
            raise BrokerError("Maven ('mvn') is needed to fetch the Kafka jars; install it first")
        # A half-copied folder from an interrupted fetch could mix versions: start clean.
        shutil.rmtree(libs, ignore_errors=True)
        project = home / "fetch"
        project.mkdir(exist_ok=True)
        (project / "pom.xml").write_text(_pom(version))
        log.info("fetching Apache Kafka %s jars from Maven Central into %s", version, libs)
        t0 = time.monotonic()
        cmd = [
            "mvn", "-B", "-q", "-f", str(project / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            "-Dmdep.prependGroupId=true",
            f"-DoutputDirectory={libs}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise BrokerError(f"Maven could not fetch the Kafka {version} jars:\n{tail}")
        if not any(libs.glob(f"org.apache.kafka.kafka_{SCALA_VERSION}-{version}.jar")):
            raise BrokerError(f"Maven finished but no kafka_{SCALA_VERSION} jar is in {libs}")
        marker.write_text(json.dumps({"version": version, "fetch_seconds": round(seconds, 1)}))
        log.info("fetched Kafka %s jars in %.1f s", version, seconds)
        return LibsInfo(libs, seconds, fetched_now=True)


# --------------------------------------------------------------------------------------------
# Configuration


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes in base64url, 22 chars, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def server_properties(port: int, controller_port: int, data_dir: Path) -> dict[str, str]:
    """server.properties for one combined broker+controller on loopback."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir),
        # One node: internal topics with replication 3 would never get a coordinator.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Small thread pools for a laptop or a 2-core CI box.
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        # The cleaner stays on (faust changelogs are compacted) but its 128 MiB default
        # dedupe buffer would sit on a 512 MiB heap.
        "log.cleaner.enable": "true",
        "log.cleaner.dedupe.buffer.size": "16777216",
        "num.partitions": "1",
    }


def render_properties(props: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
"""


# Stop at the C1 compiler: a short-lived JVM (a tool, or a broker in a test session) starts
# about 2.5x faster on a loaded 2-core machine; long-running brokers keep the full JIT.
QUICK_JIT = "-XX:TieredStopAtLevel=1"


def jvm_options(work_dir: Path, heap: str = "512m", quick_start: bool = False) -> list[str]:
    """JVM flags: a bounded heap (the default would be a quarter of RAM) and local dirs."""
    return [
        f"-Xmx{heap}",
        "-Xms64m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        *([QUICK_JIT] if quick_start else []),
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={work_dir / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={work_dir / 'logs'}",
        f"-Djava.io.tmpdir={work_dir / 'tmp'}",
    ]


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("Java 17+ ('java') is needed to run the Kafka broker; install it first")
    return java


def _classpath(libs_dir: Path) -> str:
    # One argument; Java itself expands the wildcard.
    return f"{libs_dir}/*"


# --------------------------------------------------------------------------------------------
# The broker process


def _set_parent_death_signal() -> None:
    # Runs in the child between fork and exec: ask Linux to SIGTERM the JVM if the parent dies
    # (pytest killed with SIGKILL, say), so no JVM outlives the test session.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalBroker:
    """One KRaft broker+controller on 127.0.0.1, started with ``java``.

    ``work_dir`` holds server.properties, the data dir (``data/``) and logs (``logs/``).
    ``die_with_parent`` ties the JVM's life to this Python process (tests); the CLI's
    detached broker leaves it off. ``quick_start`` trades peak JIT for start-up time (tests).
    """

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        controller_port: int | None = None,
        *,
        cache_dir: Path | None = None,
        heap: str = "512m",
        ready_timeout: float = READY_TIMEOUT_S,
        die_with_parent: bool = False,
        quick_start: bool = False,
    ) -> None:
        self.work_dir = Path(work_dir)
        # Ports we picked ourselves may be taken by someone else before the JVM binds them
        # (several test sessions start brokers at once); those we may re-pick and retry.
        self._auto_ports = port is None and controller_port is None
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.cache_dir = cache_dir
        self.heap = heap
        self.ready_timeout = ready_timeout
        self.die_with_parent = die_with_parent
        self.quick_start = quick_start
        self.libs_dir = kafka_home(cache_dir) / "libs"
        self.ready_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def properties_file(self) -> Path:
        return self.work_dir / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "logs" / "server.log"

    @property
    def console_file(self) -> Path:
        return self.work_dir / "logs" / "console.log"

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalBroker:
        """Fetch jars if needed, format the data dir unless it is, start the JVM, wait."""
        if self.is_alive():
            return self
        for port in (self.port, self.controller_port):
            if port_open(port):
                raise BrokerError(f"port {port} on 127.0.0.1 is already in use")
        self.libs_dir = ensure_kafka_libs(self.cache_dir).libs_dir
        fresh = not (self.data_dir / "meta.properties").exists()
        for attempt in range(3):
            if fresh:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            self._write_config()
            if fresh:
                self._format()
            t0 = time.monotonic()
            self._spawn()
            try:
                self._wait_ready(t0)
            except BrokerError:
                lost_port_race = self._log_mentions("Address already in use")
                if not (lost_port_race and self._auto_ports and fresh and attempt < 2):
                    raise
                for path in (self.console_file, self.log_file):  # keep, but out of the way
                    if path.exists():
                        path.rename(path.with_name(f"{path.name}.attempt{attempt}"))
                self.port, self.controller_port = free_port(), free_port()
                continue
            self.ready_seconds = time.monotonic() - t0
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_GRACE_S``; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def detach(self) -> None:
        """Forget the process without stopping it: it runs on in its own session."""
        self._proc = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- steps -------------------------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in ("data", "logs", "tmp"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        props = server_properties(self.port, self.controller_port, self.data_dir)
        self.properties_file.write_text(render_properties(props))
        (self.work_dir / "log4j2.properties").write_text(_LOG4J2.format(log_file=self.log_file))

    def _base_cmd(self, quick_start: bool) -> list[str]:
        opts = jvm_options(self.work_dir, self.heap, quick_start)
        return [_java(), *opts, "-cp", _classpath(self.libs_dir)]

    def _format(self) -> None:
        cmd = [
            *self._base_cmd(quick_start=True), "kafka.tools.StorageTool", "format",
            "-t", new_cluster_id(), "-c", str(self.properties_file),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            raise BrokerError(f"formatting {self.data_dir} failed:\n{proc.stdout}{proc.stderr}")

    def _spawn(self) -> None:
        cmd = [*self._base_cmd(self.quick_start), "kafka.Kafka", str(self.properties_file)]
        with open(self.console_file, "ab") as console:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal must not reach the JVM first.
                preexec_fn=_set_parent_death_signal if self.die_with_parent else None,
                cwd=self.work_dir,
            )

    def _wait_ready(self, t0: float) -> None:
        # With a fixed port the broker binds its listener only once it can serve, so a TCP
        # connect means ready; meanwhile the process must stay alive.
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else None
                self._proc = None
                raise BrokerError(
                    f"Kafka broker exited (code {code}) before it was ready\n{self.log_tail()}"
                )
            if port_open(self.port, timeout=0.5):
                return
            if time.monotonic() - t0 > self.ready_timeout:
                self.stop()
                raise BrokerError(
                    f"Kafka broker not ready on {self.bootstrap} after {self.ready_timeout:.0f} s"
                    f"\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def _log_mentions(self, text: str) -> bool:
        return any(
            p.exists() and text in p.read_text(errors="replace")
            for p in (self.console_file, self.log_file)
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the broker's console output and server.log, for error messages."""
        parts = []
        for path in (self.console_file, self.log_file):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts) or f"(no log written under {self.work_dir / 'logs'})"


# --------------------------------------------------------------------------------------------
# A detached broker for the CLI: survives the command that started it.


@dataclass(frozen=True)
class BrokerState:
    """What ``recloop kafka up`` remembers about the broker it started."""

    pid: int
    port: int
    controller_port: int
    work_dir: str
    version: str
    started_ts: float
    ready_seconds: float

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def runtime_dir(home: Path | None = None) -> Path:
    """Where the CLI's broker keeps its config, data, logs and state file.

    ``home`` is ``Settings.home`` (``RECLOOP_HOME``); the jars stay in the shared cache.
    """
    return kafka_home(home) / "broker"


def _state_file(home: Path | None) -> Path:
    return runtime_dir(home) / "state.json"


def read_state(home: Path | None = None) -> BrokerState | None:
    path = _state_file(home)
    if not path.exists():
        return None
    try:
        return BrokerState(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def _is_our_broker(state: BrokerState) -> bool:
    # A pid can be reused after a reboot; only a JVM running our server.properties is ours.
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    props = str(Path(state.work_dir) / "server.properties").encode()
    return b"kafka.Kafka" in cmdline and props in cmdline


def broker_status(home: Path | None = None) -> tuple[BrokerState | None, bool, bool]:
    """(state, process alive, port answering) of the broker ``kafka up`` started, if any."""
    state = read_state(home)
    if state is None:
        return None, False, False
    alive = _is_our_broker(state)
    return state, alive, alive and port_open(state.port)


def start_detached(port: int = DEFAULT_PORT, home: Path | None = None) -> BrokerState:
    """Start a broker that outlives this process, remembering its pid in the state file."""
    state, alive, _ = broker_status(home)
    if state is not None and alive:
        if state.port != port:
            raise BrokerError(
                f"a recloop broker already runs on {state.bootstrap} (pid {state.pid}); "
                "run 'recloop kafka down' first"
            )
        return state
    work = runtime_dir(home)
    controller_port = _saved_controller_port(work) or free_port()
    broker = LocalBroker(work, port, controller_port, cache_dir=None)
    broker.start()
    assert broker.pid is not None and broker.ready_seconds is not None
    (work / "controller.port").write_text(str(controller_port))
    state = BrokerState(
        pid=broker.pid,
        port=port,
        controller_port=controller_port,
        work_dir=str(work),
        version=KAFKA_VERSION,
        started_ts=time.time(),
        ready_seconds=round(broker.ready_seconds, 2),
    )
    _state_file(home).write_text(json.dumps(asdict(state)))
    broker.detach()
    return state


def _saved_controller_port(work: Path) -> int | None:
    # A formatted data dir remembers its controller's address; keep the port across restarts.
    path = work / "controller.port"
    if not path.exists():
        return None
    saved = int(path.read_text().strip())
    return None if port_open(saved) else saved


def stop_detached(home: Path | None = None, grace: float = STOP_GRACE_S) -> BrokerState | None:
    """Stop the broker ``start_detached`` started (only that pid). Returns its state, if any."""
    state = read_state(home)
    if state is None:
        return None
    if _is_our_broker(state):
        _terminate_pid(state.pid, grace)
    _state_file(home).unlink(missing_ok=True)
    return state


def _terminate_pid(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_running(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; it only waits for its parent to reap it.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------------------------
# The consumer-group command, as users check lag


@dataclass(frozen=True)
class GroupOffsetRow:
    """One row of ``kafka-consumer-groups --describe``; ``None`` where it prints '-'."""

    group: str
    topic: str
    partition: int
    current_offset: int | None
    log_end_offset: int | None
    lag: int | None
    consumer_id: str | None
    host: str | None
    client_id: str | None


def parse_group_describe(output: str) -> list[GroupOffsetRow]:
    """Parse the table ConsumerGroupCommand prints (GROUP TOPIC PARTITION ... CLIENT-ID)."""
    rows: list[GroupOffsetRow] = []
    header: list[str] | None = None
    for line in output.splitlines():
        cols = line.split()
        if not cols:
            continue
        if cols[0] == "GROUP" and "PARTITION" in cols:
            header = cols
            continue
        if header is None or len(cols) < 6:
            continue
        rec = dict(zip(header, cols, strict=False))

        def num(name: str, rec: dict[str, str] = rec) -> int | None:
            value = rec.get(name, "-")
            return None if value == "-" else int(value)

        def text(name: str, rec: dict[str, str] = rec) -> str | None:
            value = rec.get(name, "-")
            return None if value == "-" else value

        rows.append(
            GroupOffsetRow(
                group=rec["GROUP"],
                topic=rec["TOPIC"],
                partition=int(rec["PARTITION"]),
                current_offset=num("CURRENT-OFFSET"),
                log_end_offset=num("LOG-END-OFFSET"),
                lag=num("LAG"),
                consumer_id=text("CONSUMER-ID"),
                host=text("HOST"),
                client_id=text("CLIENT-ID"),
            )
        )
    return rows


def describe_group(
    bootstrap: str, group: str, cache_dir: Path | None = None, timeout: float = 60.0
) -> list[GroupOffsetRow]:
    """Run Kafka's own ConsumerGroupCommand for ``group`` and return its lag table."""
    libs = ensure_kafka_libs(cache_dir).libs_dir
    cmd = [
        _java(), "-Xmx256m", QUICK_JIT, "-Dlog4j2.level=WARN", "-cp", _classpath(libs),
        "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        "--bootstrap-server", bootstrap, "--describe", "--group", group,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"ConsumerGroupCommand failed for group {group!r}:\n{proc.stderr}")
    return parse_group_describe(proc.stdout)
