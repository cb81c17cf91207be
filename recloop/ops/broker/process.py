"""One local Kafka broker process: write its config, format its data dir, start, wait, stop.

``LocalBroker`` runs ``java kafka.Kafka`` on the jars ``jars.ensure_kafka_libs`` fetched, with
the files ``config`` renders. The test suite's session fixture, the benchmarks, the demo and
``recloop kafka up`` (through ``detached``) share it. Readiness is a TCP connect to the client
port: with a fixed port the broker binds its listener only once it can serve.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import time
from pathlib import Path

from recloop.ops.broker.config import (
    LOG4J2,
    free_port,
    jvm_options,
    new_cluster_id,
    port_open,
    render_properties,
    server_properties,
)
from recloop.ops.broker.jars import BrokerError, classpath, ensure_kafka_libs, java, kafka_home

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0


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
        (self.work_dir / "log4j2.properties").write_text(LOG4J2.format(log_file=self.log_file))

    def _base_cmd(self, quick_start: bool) -> list[str]:
        opts = jvm_options(self.work_dir, self.heap, quick_start)
        return [java(), *opts, "-cp", classpath(self.libs_dir)]

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
