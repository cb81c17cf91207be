"""The broker's configuration, as pure functions: loopback ports, cluster id, properties, JVM.

One combined broker+controller (KRaft) on 127.0.0.1, sized for a laptop or a 2-core CI box:
every internal topic has replication 1 (one node), thread pools are small and the heap is
bounded. Nothing here starts a process; ``process.LocalBroker`` writes these files and runs it.
"""

from __future__ import annotations

import base64
import socket
import uuid
from pathlib import Path

from recloop.core.dlq import BROKER_MESSAGE_MAX_BYTES
from recloop.ops.broker.jars import QUICK_JIT


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
        # Explicit, since recloop's clients and dead letters are sized by it.
        "message.max.bytes": str(BROKER_MESSAGE_MAX_BYTES),
    }


def render_properties(props: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


LOG4J2 = """\
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
