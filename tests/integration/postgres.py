"""A throwaway PostgreSQL server for the test suite, run from Debian's postgresql binaries.

``PostgresServer`` runs ``initdb`` into a temporary directory and starts ``postgres`` itself
(not through ``pg_ctl``, so the test process holds the server's pid), listening on a free
port on 127.0.0.1 with its unix socket in the same temporary directory. ``stop`` ends that
pid and removes the directory. PostgreSQL refuses to run as root, so when the suite runs as
root the server runs as the ``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres) were not found. Install them with\n"
    "    apt-get install -y postgresql    (Debian/Ubuntu; or set RECLOOP_PG_BIN to their directory)"
)
SUPERUSER = "recloop"


class PostgresUnavailable(RuntimeError):
    """The binaries or a non-root user to run them as are missing."""


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, newest Debian version first."""
    candidates: list[Path] = []
    if override := os.environ.get("RECLOOP_PG_BIN"):
        candidates.append(Path(override))
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    candidates.extend(debian)
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    return None


def _die_with_parent() -> None:
    """In the server's child process: get a fast-shutdown SIGINT if pytest dies (kill -9).

    Runs after the switch to the server's user, which would otherwise clear the setting.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """Whom to run the server as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresUnavailable(
            "running as root and there is no 'postgres' user to run the server as;\n" + INSTALL_HINT
        ) from exc


class PostgresServer:
    """One PostgreSQL server in a temporary directory; use as a context manager."""

    def __init__(self, bin_dir: Path | None = None, start_timeout_s: float = 30.0) -> None:
        found = bin_dir or find_pg_bin()
        if found is None:
            raise PostgresUnavailable(INSTALL_HINT)
        self.bin_dir = found
        self.user = _server_user()
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp: Path | None = None

    @property
    def admin_url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database`` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        user = self.user
        self.tmp = Path(tempfile.mkdtemp(prefix="recloop-pg-"))
        if user is not None:
            os.chown(self.tmp, user.pw_uid, user.pw_gid)
        data = self.tmp / "data"
        self._run_as(
            user,
            [
                str(self.bin_dir / "initdb"),
                f"--pgdata={data}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",  # a test server: durability across power loss is irrelevant
            ],
        )
        self.port = _free_port()
        log = open(self.tmp / "server.log", "wb")  # noqa: SIM115 - kept open for the server
        self.proc = subprocess.Popen(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(data),
                f"--port={self.port}",
                f"--unix_socket_directories={self.tmp}",
                "--listen_addresses=127.0.0.1",
                "--fsync=off",
                "--full_page_writes=off",
                "--max_connections=50",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            start_new_session=True,  # Ctrl-C in pytest must not reach the server first
            preexec_fn=_die_with_parent,
        )
        log.close()
        # Belt and braces for an interpreter that exits without running the fixture's end.
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server by its pid (fast shutdown, then kill) and delete its files."""
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients and exit cleanly.
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None
        atexit.unregister(self.stop)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.tmp is not None
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited early:\n{self._log_tail()}")
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.1)
        raise RuntimeError(
            f"postgres not ready in {self.start_timeout_s}s: {last_error}\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        assert self.tmp is not None
        try:
            return (self.tmp / "server.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no server log)"

    @staticmethod
    def _run_as(user: pwd.struct_passwd | None, argv: list[str]) -> None:
        result = subprocess.run(
            argv,
            capture_output=True,
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            # initdb reads the environment; HOME of root would be unreadable to postgres.
            env={**os.environ, "HOME": "/tmp", "LC_ALL": "C.UTF-8"},
            cwd="/tmp",
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({result.returncode}):\n{result.stderr.decode(errors='replace')}"
            )
