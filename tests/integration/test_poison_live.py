"""The live poison test: every poison kind of issue 12 into every input topic of a running loop.

The loop runs as the chaos run starts it (``recloop.ops.chaos_fleet.Fleet``: streams, learn,
serve and sim as ``python -m recloop`` children, tracked by pid, so "restarts: 0" is a real
count) on the suite's broker, with the demo's ``LoopMonitor`` in this process (the reader of
``sim.outcomes``). Once a learned snapshot is out, each poison kind goes into every topic of
the topic table: random bytes, truncated JSON, NaN, a wrong version, a 996-deep array in an
unknown field, 5000-deep nesting, a 1,000,000-byte value, a RecRequest of 10,000 candidate
ids none of which is in the catalogue (since schema v2 a request carries ids only: the
largest the contract accepts is ~300 kB), a SessionState with ``history=[10**15]``, three
slates of 10,000 candidate ids for one user (more numbers than a held slate may carry) and
forged announcements (an absolute path, ``..``, a huge version). The catalogue's topics
(``items``, ``catalogue``) get the kinds that do not decode, which every catalogue follower
(serving's side reader, the learner's) dead-letters. Valid probe requests follow each
poison on ``rec.requests``, on the poison's partition.

Checked: no process exits or restarts and each stops cleanly; each poison record is in its
``<topic>.dlq`` from every consumer that reads the topic with a reason header (oversized
ones truncated, with the original size), or, where it decodes and policy refuses it, the
refusal shows and changed nothing (a hostile-state user is answered; forged announcements
are refused and real versions are still installed and served); valid records around them
were processed (probes answered, transitions emitted, a new version served, every consumer
committed past every poison). The counts are printed for the closing note.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from recloop.core import codec, events, topics
from recloop.core.dlq import (
    HEADER_CONSUMER,
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_ORIGINAL_SIZE,
    HEADER_PARTITION,
    HEADER_TOPIC,
    MAX_RECORD_BYTES,
    TRUNCATED_BYTES,
)
from recloop.core.settings import Settings
from recloop.core.snapshot import SnapshotError, latest_snapshot
from recloop.kafka.lag import group_lag
from recloop.ops.chaos_fleet import Fleet
from recloop.ops.chaos_readback import log_ends, read_records
from recloop.ops.demo import child_env
from recloop.ops.monitor import LoopMonitor
from recloop.storage.store import Storage
from tests.fixtures import example_events

pytestmark = pytest.mark.integration

ALGO = "slateq"
BROKER_VALUE = 1_000_000
"""The largest value the broker takes (``message.max.bytes`` 1,048,588 less batch overhead
and headroom); the producer here raises its own limit to send it."""
KINDS = ("streams", "learn", "serve", "sim")
READERS = {
    "rec.requests": ["recloop-serve"],
    "rec.slates": ["producer_sim", "streams"],
    "rec.feedback": ["streams"],
    "session.state": ["recloop-serve-side"],
    "rec.transitions": [f"learner:{ALGO}"],
    "policy.snapshots": ["recloop-serve-side"],
    "sim.outcomes": [],  # the monitor's: it skips what does not decode, and dead-letters nothing
    "items": ["recloop-serve-side", f"learner-{ALGO}-catalogue"],
    "catalogue": ["recloop-serve-side", f"learner-{ALGO}-catalogue"],
}
"""Each topic's dead-lettering consumers, as their dead letters name them."""
HOSTILE_STATE_USER = "poison-state-user"
SLATES_USER = "poison-slates-user"


# -- the poison --------------------------------------------------------------------------


def _example(value_type: Any) -> events.Record:
    members = tuple(getattr(value_type, "__args__", (value_type,)))
    return next(r for r in example_events() if isinstance(r, members))


def _padded(record: events.Record, size: int) -> bytes:
    obj = msgspec.json.decode(codec.encode(record))
    obj["zz_padding"] = ""
    head = msgspec.json.encode(obj)
    out = head.replace(b'"zz_padding":""', b'"zz_padding":"' + b"p" * (size - len(head)) + b'"')
    assert len(out) == size
    return out


UNKNOWN_IDS = list(range(10**15, 10**15 + events.MAX_CANDIDATES))
"""10,000 candidate ids (the contract's most), valid on the wire, none an item of the world."""


def poison_for(base: str, template: events.RecRequest) -> list[tuple[str, bytes, bytes]]:
    """``(kind, key, value)`` of every poison kind for topic ``base``."""
    spec = topics.spec(base)
    example = _example(spec.value)
    valid = codec.encode(example)
    key = b"poison-user"
    deep996 = msgspec.json.decode(valid)
    deep996["zz_unknown"] = "@@"
    deep996_bytes = msgspec.json.encode(deep996).replace(b'"@@"', b"[" * 996 + b"]" * 996)
    now = time.time()
    big_request = codec.encode(msgspec.structs.replace(
        template, request_id="poison-10k-ids", user_id="poison-user", candidates=UNKNOWN_IDS))  # fmt: skip
    state = msgspec.structs.replace(
        _example(events.SessionState), user_id=HOSTILE_STATE_USER, session_id="poison-s",
        view=events.UserView(history=[10**15], history_rewards=[1.0]), pending=[],
        early_feedback=[], last_event_ts=now,
    )  # fmt: skip
    slate = _example(events.SlateServed)
    slates = [
        codec.encode(msgspec.structs.replace(
            slate, request_id=f"poison-slate-{i}", user_id=SLATES_USER, session_id="poison-s",
            step=i, ts=now, request_ts=now, candidates=UNKNOWN_IDS))
        for i in range(3)
    ]  # fmt: skip
    announced = _example(events.PolicyPublished)
    forged = [
        msgspec.structs.replace(announced, policy=ALGO, version=10**6, path="/etc"),
        msgspec.structs.replace(
            announced, policy=ALGO, version=10**6 + 1, path="../../../../tmp/x"
        ),
        msgspec.structs.replace(announced, policy=ALGO, version=2**62, path=f"{ALGO}/v1"),
    ]
    nan = re.sub(rb'"ts":[-0-9.e+]+', b'"ts":NaN', valid, count=1)
    if nan == valid:
        nan = re.sub(rb":(-?[0-9]+\.[0-9]+)", b":NaN", valid, count=1)
    assert b"NaN" in nan, base
    out = [
        ("random bytes", key, random.Random(base).randbytes(2048)),
        ("truncated JSON", key, valid[: len(valid) // 2]),
        ("NaN", key, nan),
        ("wrong version", key, valid.replace(b'"v":2', b'"v":99', 1)),
        ("996-deep array in an unknown field", key, deep996_bytes),
        ("5000-deep nesting", key, b"[" * 5000 + b"]" * 5000),
        ("1,000,000-byte value", key, _padded(example, BROKER_VALUE)),
        ("RecRequest of 10,000 unknown ids", key, big_request),
        ("SessionState history=[10**15]", HOSTILE_STATE_USER.encode(), codec.encode(state)),
        *[("10,000-candidate slate", SLATES_USER.encode(), s) for s in slates],
        *[(f"forged announcement ({p.path[:12]}, v{p.version})", ALGO.encode(), codec.encode(p))
          for p in forged],
    ]  # fmt: skip
    assert "\x00" not in "".join(k for k, _, _ in out)
    return out


def _decodes_as_topic_type(value: bytes, base: str) -> bool:
    try:
        codec.decode(value, topics.spec(base).value)
    except Exception:  # classifying the poison here; the loop's processes are under test
        return False
    return True


# -- the run ---------------------------------------------------------------------------------


class _Sent:
    """Where each produced record landed (from its delivery report)."""

    def __init__(self) -> None:
        self.where: dict[int, tuple[int, int]] = {}
        self.errors: list[str] = []

    def callback(self, n: int) -> Any:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                self.errors.append(f"#{n}: {err}")
            else:
                self.where[n] = (msg.partition(), msg.offset())

        return on_delivery


def _newest_version(settings: Settings) -> int:
    try:
        ref = latest_snapshot(settings.resolved_snapshot_dir, ALGO)
    except SnapshotError:
        return 0
    return 0 if ref is None else ref.version


def _serve_status(log: Path) -> dict[str, Any]:
    """Serving's last JSON status line (``recloop serve`` prints one every few seconds)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"installs"' in line:
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def test_every_poison_kind_in_every_input_topic_stops_and_steers_nothing(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    settings = kafka_settings.model_copy(update={
        "snapshot_dir": tmp_path / "snapshots", "snapshot_key": SecretStr("poison-live-test-key"),
        "database_url": f"sqlite:///{tmp_path / 'recloop.db'}",
    })  # fmt: skip
    names = settings.topics
    storage = Storage.from_settings(settings)  # migrated once, before any process opens it
    run_id = storage.start_run({"test": "poison-live"}, notes="poison live test")
    (tmp_path / "logs").mkdir()
    commands = {
        "streams": ["streams", "--app-id", f"{settings.topic_prefix}recloop-streams",
                    "--data-dir", str(tmp_path / "streams-data"), "--session-timeout", "86400"],
        "learn": ["learn", "--algo", ALGO, "--snapshot-every", "100", "--snapshot-seconds", "3",
                  "--config", "choice_model=proportional", "--config", "update_every=8"],
        "serve": ["serve", "--policy", f"{ALGO}=0.5", "--policy", "random=0.5"],
        "sim": ["sim", "--preset", "interest_evolution", "--users", "16", "--rate", "25"],
    }  # fmt: skip
    fleet = Fleet(tmp_path / "logs", child_env(settings, RECLOOP_METRICS_PORT="0"), commands, t0)
    monitor = LoopMonitor(settings, storage, run_id,
                          learner_groups=[names.group(f"recloop-learner-{ALGO}")])  # fmt: skip
    exits: list[tuple[str, int | None]] = []

    monitor_errors: list[str] = []

    def wait(seconds: float) -> None:
        # Supervise the children and run the monitor, as the demo's own process does; the
        # monitor dying is noted (and fails the test at the end, with the counts printed).
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            exits.extend(fleet.exited())
            if monitor_errors:
                time.sleep(0.5)
                continue
            try:
                monitor.poll(min(0.5, max(0.0, end - time.monotonic())))
            except Exception as exc:
                monitor_errors.append(f"{type(exc).__name__}: {exc}")

    def tails() -> str:
        return "\n".join(f"--- {k}\n{fleet.tail(k)}" for k in KINDS)

    producer = Producer({**settings.kafka_client_config(), "acks": "all",
                         "message.max.bytes": 1_048_576, "linger.ms": 5})  # fmt: skip
    try:
        for kind in KINDS:
            fleet.start(kind)
        # Warm up: the loop has learned and published once.
        deadline = time.monotonic() + 120
        while _newest_version(settings) < 1:
            assert time.monotonic() < deadline, "no snapshot within 120 s\n" + tails()
            assert not exits, f"{exits} exited during warm-up\n{tails()}"
            wait(1.0)
        wait(3.0)
        requests = read_records(settings, names.requests)
        template = codec.decode(requests[-1].value, events.RecRequest)

        def probe(i: int, user: str) -> events.RecRequest:
            return msgspec.structs.replace(template, request_id=f"probe-{user}-{i}",
                                           user_id=user, session_id=f"probe-s-{i}", step=0,
                                           ts=time.time())  # fmt: skip

        sent = _Sent()
        plan: list[tuple[str, str, bytes, bytes]] = []  # (topic base, kind, key, value)

        def produce(base: str, kind: str, key: bytes, value: bytes) -> None:
            n = len(plan)
            plan.append((base, kind, key, value))
            producer.produce(names.name(base), value, key, on_delivery=sent.callback(n))
            producer.poll(0)

        before = {t: sum(log_ends(settings, names.name(t)).values())
                  for t in ("rec.slates", "rec.transitions", "session.state")}  # fmt: skip
        for i in range(5):
            produce("rec.requests", "probe", b"probe-user", codec.encode(probe(i, "probe-user")))
        producer.flush(30)
        version_at_injection = _newest_version(settings)
        for spec in topics.TOPIC_TABLE:
            for kind, key, value in poison_for(spec.base_name, template):
                produce(spec.base_name, kind, key, value)
                if spec.base_name == "rec.requests":  # a valid request right behind it
                    produce("rec.requests", "probe", key,
                            codec.encode(probe(len(plan), key.decode())))  # fmt: skip
        assert producer.flush(60) == 0, "poison not delivered"
        assert not sent.errors, sent.errors
        wait(4.0)  # serving has read the hostile state by now; now ask for that user
        for i in range(3):
            produce("rec.requests", "probe", HOSTILE_STATE_USER.encode(),
                    codec.encode(probe(1000 + i, HOSTILE_STATE_USER)))  # fmt: skip
        assert producer.flush(30) == 0 and not sent.errors, sent.errors
        injected = [(i, p) for i, p in enumerate(plan) if p[1] != "probe"]
        print(f"\npoison: {len(injected)} records injected at {time.monotonic() - t0:.0f} s "
              f"(newest version v{version_at_injection})")  # fmt: skip

        # Wait for the loop to work through it: every dead letter, every probe answered, a
        # version newer than at injection served, every reader committed past the poison.
        def letters() -> dict[str, list[Any]]:
            return {spec.base_name: read_records(settings, names.dlq(names.name(spec.base_name)))
                    for spec in topics.TOPIC_TABLE}  # fmt: skip

        def served_after() -> list[int]:
            return sorted(
                v
                for (p, v), info in monitor.versions.items()
                if p == ALGO and v > version_at_injection and info.first_served_ts
            )

        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            wait(5.0)
            if exits:
                break
            if served_after() and not _dead_letter_problems(letters(), names, sent, injected):
                break
        wait(3.0)
        dlq = letters()
        slates = [codec.decode(r.value, events.SlateServed)
                  for r in read_records(settings, names.slates)
                  if _decodes_as_topic_type(r.value, "rec.slates")]  # fmt: skip
        after = {t: sum(log_ends(settings, names.name(t)).values()) for t in before}
        status = _serve_status(fleet.log("serve"))
        live = {kind: fleet.procs[kind].poll() is None for kind in fleet.procs}
    finally:
        codes = {kind: fleet.stop(kind, timeout=30.0) for kind in list(fleet.procs)}
        monitor.close()
        storage.close()
    groups = {
        "rec.requests": "recloop-serve",
        "rec.slates": "recloop-streams",
        "rec.feedback": "recloop-streams",
        "rec.transitions": f"recloop-learner-{ALGO}",
    }
    committed = {base: group_lag(settings, names.group(group), [names.name(base)],
                                 with_seconds=False)
                 for base, group in groups.items()}  # fmt: skip

    # -- the counts, for the closing note ----------------------------------------------------
    tally: dict[str, Counter[str]] = defaultdict(Counter)
    for base, records in dlq.items():
        for r in records:
            tally[base][r.headers.get(HEADER_CONSUMER, "?")] += 1
    answered = {s.request_id for s in slates}
    probes = [codec.decode(v, events.RecRequest).request_id
              for _, kind, _, v in plan if kind == "probe"]  # fmt: skip
    restarts = sum(n - 1 for n in fleet.starts.values())
    counts = {
        "injected": len(injected),
        "injected_per_topic": dict(Counter(base for _, (base, *_r) in injected)),
        "dead_lettered_per_topic": {b: dict(c) for b, c in sorted(tally.items())},
        "monitor_skipped": monitor.skipped,
        "probes_sent": len(probes), "probes_answered": len(set(probes) & answered),
        "before_injection": before, "after": after,
        "versions_served_after_injection": served_after(),
        "process_restarts": restarts, "exits": exits, "stop_codes": codes,
        "monitor_errors": monitor_errors,
        "installs": status.get("installs"), "last_refusal": status.get("last_refusal"),
        "wall_s": round(time.monotonic() - t0, 1),
    }  # fmt: skip
    print("poison live counts: " + json.dumps(counts, sort_keys=True, default=str))

    # -- every process kept running ----------------------------------------------------------
    assert not exits and restarts == 0, f"exits {exits}, restarts {restarts}\n{tails()}"
    assert all(live.values()), f"not running at the end: {live}\n{tails()}"
    assert all(code == 0 for code in codes.values()), f"stop codes {codes}\n{tails()}"
    assert not monitor_errors, f"the monitor (reader of sim.outcomes) died: {monitor_errors}"
    errors = [e for e in status.get("errors", []) if "side loop stopped" in e]
    assert not errors, f"serving's side loop died: {errors}"

    # -- each poison record is dead-lettered, with its reason, by each of its readers --------
    problems = _dead_letter_problems(dlq, names, sent, injected)
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} problems)\n{tails()}"

    # -- refused by policy: changed nothing --------------------------------------------------
    hostile = [p for p in probes if p.startswith(f"probe-{HOSTILE_STATE_USER}")]
    assert set(hostile) <= answered, "a user with a hostile session state was not answered"
    newest = _newest_version(settings)
    assert all(s.policy_version <= newest for s in slates if s.policy == ALGO), (
        "a slate was served by a version the learner never made"
    )
    # What the streams worker wrote (the poison injected into session.state itself aside).
    poison_at = {sent.where[i] for i, (b, *_r) in injected if b == "session.state"}
    states = [r for r in read_records(settings, names.session_state)
              if (r.partition, r.offset) not in poison_at]  # fmt: skip
    assert all(len(r.value or b"") <= MAX_RECORD_BYTES for r in states), (
        f"a session state of {max(len(r.value or b'') for r in states):,} B was written"
    )

    # -- valid records around them were processed --------------------------------------------
    assert set(probes) <= answered, f"unanswered probes: {sorted(set(probes) - answered)[:10]}"
    assert after["rec.transitions"] > before["rec.transitions"], "no transition after injection"
    assert served_after(), "no version newer than the injection's was served after it"
    for base, lags in committed.items():
        ends = defaultdict(int)
        for i, (b, *_r) in injected:
            if b == base:
                partition, offset = sent.where[i]
                ends[partition] = max(ends[partition], offset + 1)
        for lag in lags:
            if lag.partition in ends:
                assert lag.committed is not None and lag.committed >= ends[lag.partition], (
                    f"{base}[{lag.partition}] committed {lag.committed}, "
                    f"poison up to {ends[lag.partition]}")  # fmt: skip
    assert time.monotonic() - t0 < 240, "the live poison test took over 4 minutes"


def _expected_readers(base: str, kind: str, value: bytes) -> tuple[list[str], bool]:
    """The consumers that must dead-letter a poison record, and whether all of them must
    (False: a record that decodes, which policy may refuse instead, checked elsewhere)."""
    readers = READERS[base]
    if not _decodes_as_topic_type(value, base) or len(value) > MAX_RECORD_BYTES:
        return readers, True
    if base == "rec.slates" and kind == "10,000-candidate slate":
        return ["streams"], False  # one of the three at least: the state has no room
    return [], False  # a hostile state, a forged announcement: refused by policy


def _letters_by_source(
    dlq: dict[str, list[Any]],
) -> dict[tuple[str, int, int], dict[str, Any]]:
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for records in dlq.values():
        for r in records:
            h = r.headers
            try:
                where = (h[HEADER_TOPIC], int(h[HEADER_PARTITION]), int(h[HEADER_OFFSET]))
            except (KeyError, ValueError):
                continue
            consumer = h.get(HEADER_CONSUMER, "?").split(":")[0]
            if consumer.startswith("learner"):
                consumer = h.get(HEADER_CONSUMER, "?")
            out.setdefault(where, {})[consumer] = r
    return out


def _dead_letter_problems(
    dlq: dict[str, list[Any]], names: topics.Topics, sent: _Sent, injected: list[Any]
) -> list[str]:
    """What is missing or wrong among the dead letters of the ``injected`` records."""
    by_source = _letters_by_source(dlq)
    problems = []
    slates_refused = 0
    for i, (base, kind, _key, value) in injected:
        partition, offset = sent.where[i]
        where = (names.name(base), partition, offset)
        readers, required = _expected_readers(base, kind, value)
        got = by_source.get(where, {})
        if base == "rec.slates" and kind == "10,000-candidate slate":
            slates_refused += "streams" in got
        for reader in readers:
            letter = got.get(reader)
            if letter is None:
                if required:
                    problems.append(f"{base} {kind!r} at {where[1:]}: no dead letter from "
                                    f"{reader} (have {sorted(got)})")  # fmt: skip
                continue
            if not letter.headers.get(HEADER_ERROR):
                problems.append(f"{base} {kind!r}: dead letter from {reader} without a reason")
            if len(value) > MAX_RECORD_BYTES:
                if letter.headers.get(HEADER_ORIGINAL_SIZE) != str(len(value)):
                    problems.append(f"{base} {kind!r}: {len(value):,} B dead letter from "
                                    f"{reader} without its original size header")  # fmt: skip
                if len(letter.value or b"") > TRUNCATED_BYTES:
                    problems.append(f"{base} {kind!r}: oversized dead letter not truncated")
    if slates_refused == 0:
        problems.append("rec.slates: none of the three 10,000-candidate slates was "
                        "dead-lettered by streams (a held slate had room for 10,000 ids)")  # fmt: skip
    return problems
