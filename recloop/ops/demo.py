"""The demo: the whole loop as separate processes, a live view, and a report at the end.

``run_demo`` starts a local Kafka broker unless one answers, creates a fresh set of topics
for the run (a per-run prefix, so every demo starts clean), starts ``recloop streams``,
``recloop learn``, ``recloop serve`` and ``recloop sim`` as child processes (the simulator
publishes its world's catalogue; the learner and serving wait for it and take every size
from it, the stream and the snapshots, never from a preset), watches them
with ``LoopMonitor`` for the configured time, stops them (SIGTERM, then SIGKILL, by pid),
and writes the report. Serving splits users between the learning policy and a uniform-random
control arm, so the report's learning curve shows one against the other in the same traffic.
With ``external=True`` (docker compose) the processes are someone else's: the demo only
watches and reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live

from recloop.core.settings import Settings
from recloop.kafka.admin import create_topics
from recloop.ops.broker import LocalBroker, port_open
from recloop.ops.monitor import LoopMonitor
from recloop.ops.report import build_report, summarise
from recloop.storage.store import Storage


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs and for how long."""

    duration_s: float = 240.0
    """Seconds of the running loop, from the first slate served."""
    startup_timeout_s: float = 1800.0
    """Longest wait for the first slate (catalogue publication, index build)."""
    algo: str = "slateq"
    users: int = 48
    rate: float = 80.0
    """Requests per second the simulator may send: sized so one 2-core machine keeps up."""
    preset: str = "interest_evolution"
    """The simulator's world; the learner and serving take the catalogue it publishes."""
    n_items: int = 0
    """Catalogue size for a preset that takes one (0: the preset's own; large_catalogue at
    1,000,000 is the million-item run)."""
    learned_share: float = 0.5
    """Share of users served by the learning policy; the rest get uniform random slates."""
    snapshot_every: int = 1000
    snapshot_seconds: float = 5.0
    out_dir: Path = Path("artifacts/demo")
    external: bool = False
    window_s: float = 10.0
    extra_learn_args: tuple[str, ...] = ("--config", "update_every=8")
    """One update of 64 per 8 new transitions keeps the learner ahead of the stream."""

    def learn_args(self) -> list[str]:
        """``recloop learn``'s arguments: no world, only the algorithm and its schedule. SlateQ
        assumes a known choice model, and interest_evolution's is proportional (the other
        presets' multinomial logit is SlateQ's default)."""
        known = (["--config", "choice_model=proportional"]
                 if self.algo.startswith("slateq") and self.preset == "interest_evolution"
                 else [])  # fmt: skip
        return ["learn", "--algo", self.algo, "--snapshot-every", str(self.snapshot_every),
                "--snapshot-seconds", str(self.snapshot_seconds), *known,
                *self.extra_learn_args]  # fmt: skip

    def sim_args(self) -> list[str]:
        """``recloop sim``'s arguments: the world (it publishes the catalogue) and its users."""
        size = ["--n-items", str(self.n_items)] if self.n_items else []
        return ["sim", "--preset", self.preset, *size, "--users", str(self.users),
                "--duration", str(self.duration_s), "--rate", str(self.rate)]  # fmt: skip


@dataclass
class ChildProcesses:
    """Processes the demo started, so it stops exactly those (by pid)."""

    log_dir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "recloop", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() not in (None, 0)]

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of the loop's child processes: this process's, with the settings
    they must share (broker, prefix, home, partitions, snapshots, database) as RECLOOP_*.

    The children also share a snapshot key, so the learner signs its announcements and
    serving refuses any it did not sign: the configured one, else one generated for this
    run's topics and snapshots (``core.snapshot_auth.launch_key``, the same on every call).
    """
    from recloop.core import snapshot_auth

    key = settings.snapshot_key or snapshot_auth.launch_key(
        f"{settings.topic_prefix}|{settings.resolved_snapshot_dir}"
    )
    return {
        **os.environ,
        "RECLOOP_SNAPSHOT_KEY": key.get_secret_value(),
        "RECLOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RECLOOP_TOPIC_PREFIX": settings.topic_prefix,
        "RECLOOP_HOME": str(settings.home),
        "RECLOOP_PARTITIONS": str(settings.partitions),
        "RECLOOP_SNAPSHOT_DIR": str(settings.resolved_snapshot_dir),
        "RECLOOP_DATABASE_URL": settings.resolved_database_url,
        **extra,
    }


def _bootstrap_port(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return host, int(port)


def run_demo(
    settings: Settings,
    options: DemoOptions,
    console: Console | None = None,
    on_tick: Callable[[LoopMonitor], None] | None = None,
) -> dict:
    """Run the loop for ``options.duration_s``; returns the summary (also in the report)."""
    console = console or Console()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    out_dir = options.out_dir / run_id
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    broker = None
    if not options.external:
        # A run is a deployment of its own: its topics, its snapshots (versions from 1) and,
        # unless DATABASE_URL names one, its own database; a shared one would already hold
        # another run's versions.
        _refuse_database_with_snapshots(settings, options.algo)
        settings = settings.model_copy(
            update={
                "topic_prefix": f"{settings.topic_prefix}demo-{run_id}.",
                "snapshot_dir": out_dir / "snapshots",
                "database_url": settings.database_url
                or f"sqlite:///{(out_dir / 'recloop.db').resolve()}",
            }
        )
        host, port = _bootstrap_port(settings.kafka_bootstrap)
        if not port_open(port, host):
            console.print(f"no broker at {settings.kafka_bootstrap}: starting a local one")
            broker = LocalBroker(settings.home / "demo-broker", port, die_with_parent=True)
            broker.start()
        create_topics(settings)
    children = ChildProcesses(out_dir / "logs", child_env(settings))
    storage = Storage.from_settings(settings)
    run_config = {
        "options": {k: str(v) for k, v in options.__dict__.items()},
        "topic_prefix": settings.topic_prefix,
    }
    storage.start_run(run_config, notes="recloop demo", run_id=run_id)
    share = options.learned_share
    try:
        if not options.external:
            children.start("streams", [
                "streams", "--app-id", f"{settings.topic_prefix}recloop-streams",
                "--data-dir", str(out_dir / "streams-data"),
                "--session-timeout", "120",
            ])
            children.start("learn", options.learn_args())
            children.start("serve", ["serve", "--policy", f"{options.algo}={share}",
                                     "--policy", f"random={1 - share}"])  # fmt: skip
            children.start("sim", options.sim_args())
        monitor = LoopMonitor(
            settings, storage, run_id,
            learner_groups=[f"{settings.topic_prefix}recloop-learner-{options.algo}"],
            window_s=options.window_s,
        )  # fmt: skip
        # The clock starts at the first slate: publishing a large catalogue and building its
        # index come first (minutes at 1M items) and are not the loop's running time.
        started = time.monotonic()
        deadline: float | None = None
        with Live(monitor.table(), console=console, refresh_per_second=1) as live:
            while deadline is None or time.monotonic() < deadline:
                if deadline is None and monitor.first_slate_at is not None:
                    deadline = monitor.first_slate_at + options.duration_s
                elif deadline is None and time.monotonic() - started > options.startup_timeout_s:
                    raise RuntimeError(
                        f"serving sent no slate in {options.startup_timeout_s:.0f} s; see "
                        f"{out_dir / 'logs'} (serve.log says what it waits for)"
                    )
                monitor.poll(1.0)
                live.update(monitor.table())
                if on_tick:
                    on_tick(monitor)
                dead = children.dead()
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited early; see {out_dir / 'logs'}")
        monitor.close()
    finally:
        children.stop()
        storage.end_run(run_id)
        if broker is not None:
            broker.stop()
    page = build_report(storage, run_id, out_dir / "report")
    outcomes = storage.outcome_series(run_id)
    summary = {
        "run_id": run_id,
        "topic_prefix": settings.topic_prefix,
        "snapshot_dir": str(settings.resolved_snapshot_dir),
        "database_url": settings.resolved_database_url,
        "report": str(page),
        "overall": [s.__dict__ for s in summarise(outcomes)],
        "learned_versions_only": [s.__dict__ for s in summarise(outcomes, learned_only=True)],
    }
    storage.close()
    return summary


def _refuse_database_with_snapshots(settings: Settings, policy: str) -> None:
    """A demo run numbers its snapshots from 1, so a given database must not hold any yet."""
    if not settings.database_url:
        return
    with Storage.from_settings(settings) as storage:
        latest = storage.latest_snapshot(policy)
    if latest is not None:
        raise DemoError(
            f"DATABASE_URL already records {policy} snapshots (up to v{latest['version']}) "
            "from another deployment, and a demo run numbers its own from v1. Point "
            "DATABASE_URL at an empty database, or unset it: each run then keeps a SQLite "
            "database in its own folder."
        )


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says what to change."""
