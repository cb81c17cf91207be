"""The chaos run's children: one ``python -m recloop ...`` process per kind, killed by pid.

``Fleet`` starts each kind with its command and environment, writes its output to
``<log_dir>/<kind>.log`` (appended across restarts, each start marked), kills one with
SIGKILL by its pid, stops one with SIGTERM then SIGKILL, and reports children that exited
although nobody stopped them. Every child dies with the process that started it (Linux's
parent-death signal), so a run killed from outside leaves no process behind.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

TAIL_LINES = 20
LINE_CHARS = 240
"""A tail's lines are cut to this length (serving's status lines are JSON of a few KiB)."""


class Fleet:
    """The children of a run, one per kind, each with a log file that survives restarts."""

    def __init__(self, log_dir: Path, env: dict[str, str], commands: dict[str, list[str]],
                 t0: float) -> None:  # fmt: skip
        self.log_dir, self.env, self.commands, self.t0 = log_dir, env, commands, t0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()

    def log(self, kind: str) -> Path:
        return self.log_dir / f"{kind}.log"

    def pid(self, kind: str) -> int:
        return self.procs[kind].pid

    def start(self, kind: str) -> None:
        self.starts[kind] += 1
        with self.log(kind).open("ab") as log:
            log.write(f"=== chaos: start #{self.starts[kind]} of {kind} at "
                      f"{time.monotonic() - self.t0:.1f} s ===\n".encode())  # fmt: skip
            log.flush()
            self.procs[kind] = subprocess.Popen(
                [sys.executable, "-m", "recloop", *self.commands[kind]],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    def kill(self, kind: str) -> int:
        """kill -9 the child of ``kind`` (by its pid) and reap it."""
        proc = self.procs.pop(kind)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return proc.pid

    def stop(self, kind: str, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if not running)."""
        proc = self.procs.pop(kind, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            return proc.returncode

    def exited(self) -> list[tuple[str, int | None]]:
        """Children that exited although nobody stopped them (forgotten once reported)."""
        gone = [(kind, p.returncode) for kind, p in self.procs.items() if p.poll() is not None]
        for kind, _ in gone:
            del self.procs[kind]
        return gone

    def stop_all(self) -> None:
        for kind in list(self.procs):
            self.stop(kind, timeout=20.0)

    def tail(self, kind: str, lines: int = TAIL_LINES) -> str:
        """The exceptions each start of ``kind`` ended with, then the log's last ``lines``
        without the clients' connection chatter (``_CHATTER``)."""
        path = self.log(kind)
        if not path.exists():
            return f"(no log at {path})"
        text = [line for line in path.read_text(errors="replace").splitlines()
                if not _CHATTER.search(line)]  # fmt: skip
        errors, start = [], "?"
        for line in text:
            if line.startswith("=== chaos: start"):
                start = line.strip("= ")
            elif _EXCEPTION.match(line):
                errors.append(f"  {start}: {line.strip()}")
        head = ["exceptions:", *errors[-10:]] if errors else []
        return "\n".join([*head, *(line[:LINE_CHARS] for line in text[-lines:])])


_CHATTER = re.compile(
    r"^%\d\||Connect call failed|NodeNotReadyError|Unable to update metadata|Unable connect to"
)
"""Client chatter while the broker is away (librdkafka's ``%3|...`` lines, aiokafka's
connection errors): thousands of lines per outage that would bury a log's tail."""
_EXCEPTION = re.compile(r"^[A-Za-z_.]*(Error|Exception|Exit)\b.*:")


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: Linux SIGTERMs it if this process dies
    # (pytest killed by a CI timeout, say), so no child of a run outlives it.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
