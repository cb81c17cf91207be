"""The whole-loop chaos run: the demo's four processes on a broker of their own, killed.

``run_chaos(options)`` starts a private ``LocalBroker`` (its own work dir and ports), a fresh
set of topics, a SQLite file and a snapshot dir under ``options.work_dir``, and the demo's
processes as ``python -m recloop ...`` children: streams, learn, serve and sim. Once a
learned snapshot exists it follows the plan ``plan_faults`` draws from ``options.seed``:
kill -9 of a process (every kind at least once) and its restart after a short pause, and
kill -9 of the broker with its restart on the same ports and data dir. A process that exits
on its own is recorded and restarted, as a supervisor would. Then the sim stops gracefully,
the rest drain (serving's and the streams worker's groups have nothing left to read, and the
learner's newest manifest covers ``rec.transitions``) and stop, and every topic is read from
the beginning to its high watermark for ``recloop.ops.chaos_evidence.judge``.

Rules the run keeps: it signals only processes it started, by pid; it stops everything on
the way out, also on failure; every child dies with this process (parent-death signal); the
streams worker's session timeout outlasts the run, so no session expires (the replay does
not expire sessions either); logs go to ``work_dir/logs``, and a failed run's report ends
with the tail of each.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from recloop.core.settings import Settings
from recloop.core.snapshot import SnapshotError, latest_snapshot
from recloop.kafka.admin import create_topics
from recloop.ops.broker import LocalBroker
from recloop.ops.chaos_evidence import Evidence, Exit, Verdict, judge
from recloop.ops.chaos_fleet import TAIL_LINES, Fleet
from recloop.ops.chaos_plan import BROKER, KINDS, ChaosOptions, Fault, plan_faults
from recloop.ops.chaos_readback import (
    behind,
    committer,
    log_ends,
    newest_valid_manifest,
    read_records,
    transition_ids,
)
from recloop.ops.demo import child_env
from recloop.storage.store import Storage


@dataclass
class ChaosResult:
    """A run's verdict, with what it takes to explain a failure."""

    verdict: Verdict
    wall_s: float
    tails: dict[str, str] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, Any]:
        return {**self.verdict.counts, "wall_s": round(self.wall_s, 1)}

    def summary_line(self) -> str:
        parts = []
        for key, value in self.counts.items():
            if isinstance(value, dict):
                value = ",".join(f"{k}:{v}" for k, v in value.items()) or "-"
            parts.append(f"{key}={value}")
        return "chaos: " + " ".join(parts)

    def json_line(self) -> str:
        return json.dumps({**self.counts, "ok": self.verdict.ok}, sort_keys=True)

    def report(self) -> str:
        """The summary, one line per failed check and, if any failed, every log's tail."""
        lines = [self.summary_line(), *(f"FAILED {f}" for f in self.verdict.failures)]
        if not self.verdict.ok:
            lines += [f"--- {name} (last lines)\n{tail}" for name, tail in self.tails.items()]
        return "\n".join(lines)


def run_chaos(options: ChaosOptions, say: Callable[[str], None] = print) -> ChaosResult:
    """Run the loop through the planned faults and judge what it left on the topics."""
    run = _Run(options, say)
    try:
        run.start()
        run.warm_up()
        for fault in plan_faults(options):
            run.inject(fault)
        run.wait(options.seconds - run.chaos_elapsed())
        run.drain()
        evidence = run.evidence()
    except BaseException:
        say("chaos: the run broke off; log tails follow\n" + _tails_text(run.tails()))
        raise
    finally:
        run.close()
    return ChaosResult(judge(evidence), time.monotonic() - run.t0, run.tails())


class ChaosError(RuntimeError):
    """The run could not get the loop going at all; the message says where it stopped."""


class _Run:
    """One chaos run's state: the broker, the children, and what happened to them."""

    def __init__(self, options: ChaosOptions, say: Callable[[str], None]) -> None:
        self.options, self._say = options, say
        self.t0 = time.monotonic()
        self.chaos_t0: float | None = None
        work = options.work_dir.resolve()
        self.work = work
        if work.exists() and any(work.iterdir()):
            # Its broker data, snapshots and database would be another run's evidence.
            raise ChaosError(f"work dir {work} is not empty: a chaos run needs a fresh one")
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.broker = LocalBroker(work / "broker", die_with_parent=True, quick_start=True,
                                  heap="512m")  # fmt: skip
        self.kills: Counter[str] = Counter()
        self.broker_kills = 0
        self.exits: list[Exit] = []
        self.recoveries: dict[str, list[float]] = {}
        self.problems: list[str] = []
        self.settings: Settings | None = None
        self.fleet: Fleet | None = None
        self._serve_group: str | None = None

    def say(self, text: str) -> None:
        self._say(f"[{time.monotonic() - self.t0:6.1f} s] {text}")

    def chaos_elapsed(self) -> float:
        return 0.0 if self.chaos_t0 is None else time.monotonic() - self.chaos_t0

    # -- start -----------------------------------------------------------------------------

    def start(self) -> None:
        o, work = self.options, self.work
        self.broker.start()
        self.say(f"broker up on {self.broker.bootstrap} (pid {self.broker.pid})")
        settings = Settings(
            kafka_bootstrap=self.broker.bootstrap, topic_prefix=f"chaos-{o.seed}.",
            partitions=4, home=work, snapshot_dir=work / "snapshots",
            database_url=f"sqlite:///{work / 'recloop.db'}",
        )  # fmt: skip
        self.settings = settings
        create_topics(settings)
        Storage.from_settings(settings).close()  # migrate once, before any process opens it
        # Four processes on one host: no metrics endpoint to clash on.
        env = child_env(settings, RECLOOP_METRICS_PORT="0")
        share = o.learned_share
        commands = {
            "streams": ["streams", "--app-id", f"{settings.topic_prefix}recloop-streams",
                        "--data-dir", str(work / "streams-data"),
                        # Longer than the run: no session expires (the replay expires none).
                        "--session-timeout", "86400"],
            # Learner and serving take the catalogue the simulator publishes: no world.
            "learn": ["learn", "--algo", o.algo,
                      "--snapshot-every", str(o.snapshot_every),
                      "--snapshot-seconds", str(o.snapshot_seconds), *o.learn_args],
            "serve": ["serve", "--policy", f"{o.algo}={share}", "--policy", f"random={1 - share}"],
            "sim": ["sim", "--preset", o.preset, "--users", str(o.users), "--rate", str(o.rate)],
        }  # fmt: skip
        self.fleet = Fleet(work / "logs", env, commands, self.t0)
        for kind in ("streams", "learn", "serve", "sim"):
            self.fleet.start(kind)
        self.say("started " + ", ".join(f"{k} (pid {self.fleet.pid(k)})" for k in KINDS))

    def warm_up(self) -> None:
        """Wait for the first learned snapshot: faults start on a loop that has run."""
        deadline = time.monotonic() + self.options.warmup_timeout_s
        while self._manifest() is None:
            if time.monotonic() > deadline:
                raise ChaosError(
                    f"no {self.options.algo} snapshot within {self.options.warmup_timeout_s:.0f} s"
                    " of the start: the loop never ran"
                )
            self.wait(1.0)
        self.chaos_t0 = time.monotonic()
        plan = ", ".join(f"{f.target}@{f.at_s:.0f}s" for f in plan_faults(self.options))
        self.say(f"first snapshot written; faults begin: {plan}")

    # -- faults ----------------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        """Wait for the fault's time, kill its target, restart it after ``down_s``, and wait
        until the whole loop moves again, so that the next fault meets traffic."""
        self.wait(fault.at_s - self.chaos_elapsed())
        fleet = self._fleet()
        if fault.target == BROKER:
            pid = self.broker.pid
            assert pid is not None, "the broker is not running"
            os.kill(pid, signal.SIGKILL)
            while self.broker.is_alive():
                time.sleep(0.05)
            self.broker_kills += 1
            self.say(f"kill -9 broker (pid {pid}); down for {fault.down_s} s")
            self.wait(fault.down_s)
            self.broker.start()
            restarted = (
                f"broker (pid {self.broker.pid}, ready in {self.broker.ready_seconds:.1f} s)"
            )
        else:
            pid = fleet.kill(fault.target)
            self.kills[fault.target] += 1
            self.say(f"kill -9 {fault.target} (pid {pid}); restart in {fault.down_s} s")
            self.wait(fault.down_s)
            fleet.start(fault.target)
            restarted = f"{fault.target} (pid {fleet.pid(fault.target)})"
        self.say(f"restarted {restarted}")
        self._await_recovery(fault.target)

    def _await_recovery(self, target: str) -> None:
        """Wait until requests, slates, transitions and snapshots all moved on since the
        restart (a failure to within ``recovery_timeout_s`` is a problem of the run)."""
        t0 = time.monotonic()
        start = now = self._progress()
        deadline = t0 + self.options.recovery_timeout_s
        while time.monotonic() < deadline:
            self.wait(1.0)
            now = self._progress()
            if all(b > a for a, b in zip(start, now, strict=True)):
                seconds = time.monotonic() - t0
                self.recoveries.setdefault(target, []).append(round(seconds, 1))
                self.say(f"loop moving again {seconds:.1f} s after restarting {target} (requests "
                         f"{now[0]}, slates {now[1]}, transitions {now[2]}, v{now[3]})")  # fmt: skip
                return
        self.problems.append(
            f"recovery: the loop did not move within {self.options.recovery_timeout_s:.0f} s "
            f"of restarting {target} (requests, slates, transitions, version: {start} -> {now})"
        )
        self.say(self.problems[-1])

    def _progress(self) -> tuple[int, int, int, int]:
        """Records on rec.requests, rec.slates and rec.transitions, and the newest snapshot
        version: all four move only when every process does its part."""
        settings = self._settings()
        topics = settings.topics
        ends = [sum(log_ends(settings, t).values())
                for t in (topics.requests, topics.slates, topics.transitions)]  # fmt: skip
        return ends[0], ends[1], ends[2], int((self._manifest() or {}).get("version", 0))

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` while supervising: a child that exits is recorded and restarted."""
        end = time.monotonic() + max(0.0, seconds)
        while True:
            self.supervise()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))

    def supervise(self) -> None:
        fleet = self._fleet()
        for kind, code in fleet.exited():
            at = time.monotonic() - self.t0
            self.exits.append(Exit(kind, code, at))
            self.say(f"{kind} exited on its own (code {code}); restarting it")
            fleet.start(kind)

    # -- drain and read back ---------------------------------------------------------------

    def drain(self) -> None:
        fleet = self._fleet()
        code = fleet.stop("sim")
        self.say(f"sim stopped (code {code}); draining")
        if code != 0:
            self.problems.append(f"stop: sim exited with code {code} on SIGTERM")
        t0 = time.monotonic()
        deadline = t0 + self.options.drain_timeout_s
        status = ""
        while time.monotonic() < deadline:
            self.supervise()
            done, status = self._drained()
            if done:
                self.say(f"drained in {time.monotonic() - t0:.1f} s: {status}")
                break
            time.sleep(2.0)
        else:
            self.problems.append(
                f"drain: not done {self.options.drain_timeout_s:.0f} s after the sim stopped: "
                f"{status}"
            )
            self.say(self.problems[-1])
        for kind in ("serve", "streams", "learn"):
            code = fleet.stop(kind)
            if code != 0:
                self.problems.append(f"stop: {kind} exited with code {code} on SIGTERM")
        self.say("streams, learn and serve stopped")

    def _drained(self) -> tuple[bool, str]:
        """Whether serving, the streams worker and the learner have finished the topics."""
        settings = self._settings()
        topics = settings.topics
        serve_group = self._serve_group or committer(settings, topics.requests)
        self._serve_group = serve_group
        serve_n, serve_where = behind(settings, serve_group, [topics.requests])
        streams_n, streams_where = behind(settings, f"{settings.topic_prefix}recloop-streams",
                                          [topics.slates, topics.feedback])  # fmt: skip
        manifest = self._manifest()
        ends = log_ends(settings, topics.transitions)
        covered = (manifest or {}).get("consumed_offsets", {}).get(topics.transitions, {})
        learner_behind = sum(max(0, end - int(covered.get(str(p), 0))) for p, end in ends.items())
        status = (
            f"serving {serve_where} behind on requests, streams {streams_where} behind on "
            f"slates+feedback, learner's newest manifest "
            f"(v{(manifest or {}).get('version', 0)}) {learner_behind} behind on transitions"
        )
        upstream = serve_n == 0 and streams_n == 0
        if upstream and learner_behind and manifest is not None and self._learner_idle(manifest):
            # A tail of re-emitted repeats moves no snapshot: judge by the distinct ids.
            distinct = len(transition_ids(settings))
            if int(manifest["transitions_applied"]) >= distinct:
                return True, status + f" (only repeats: {distinct} distinct ids applied)"
        return upstream and learner_behind == 0, status

    def _learner_idle(self, manifest: dict[str, Any]) -> bool:
        """No snapshot for twice the learner's schedule: it has nothing new to apply (or is
        stuck, which the final check then shows)."""
        return time.time() - float(manifest["created_ts"]) > 2 * self.options.snapshot_seconds + 3

    def evidence(self) -> Evidence:
        settings = self._settings()
        topics = settings.topics
        # The judged topics, and every dead-letter topic (a dead letter anywhere is evidence).
        judged = [topics.requests, topics.slates, topics.feedback, topics.transitions]
        dlqs = [topics.dlq(name) for name, _ in topics.all()]
        records = {topic: read_records(settings, topic) for topic in [*judged, *dlqs]}
        manifest, skipped = newest_valid_manifest(settings, self.options.algo)
        self.problems += [f"learner: snapshot unreadable, skipped: {s}" for s in skipped]
        return Evidence(topics, records, self.options.algo, manifest, dict(self.kills),
                        self.broker_kills, self.exits, self.recoveries, self.problems)  # fmt: skip

    # -- bookkeeping -----------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any] | None:
        """The newest snapshot's manifest as written (cheap: the weights are not read)."""
        try:
            ref = latest_snapshot(self._settings().resolved_snapshot_dir, self.options.algo)
        except SnapshotError:
            return None
        return None if ref is None else ref.manifest

    def tails(self) -> dict[str, str]:
        out = {kind: self.fleet.tail(kind) for kind in KINDS} if self.fleet else {}
        out[BROKER] = self.broker.log_tail(TAIL_LINES)
        return out

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.stop_all()
        self.broker.stop()

    def _fleet(self) -> Fleet:
        assert self.fleet is not None, "the run has not started"
        return self.fleet

    def _settings(self) -> Settings:
        assert self.settings is not None, "the run has not started"
        return self.settings


def _tails_text(tails: dict[str, str]) -> str:
    return "\n".join(f"--- {name}\n{tail}" for name, tail in tails.items())
