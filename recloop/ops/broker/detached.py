"""A detached broker for the CLI: it survives the command that started it.

``recloop kafka up`` starts a ``LocalBroker`` under ``RECLOOP_HOME`` and records its pid,
ports and version in ``state.json``; ``down`` stops only that pid, and only while its command
line still names our ``server.properties`` (a pid can be reused after a reboot).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from recloop.ops.broker.config import free_port, port_open
from recloop.ops.broker.jars import KAFKA_VERSION, BrokerError, kafka_home
from recloop.ops.broker.process import STOP_GRACE_S, LocalBroker

DEFAULT_PORT = 9092


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
