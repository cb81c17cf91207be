"""Malformed item records and schema-1 records in a live run (issue 13: "a record of the old
schema and a malformed item record in a live run end in the DLQ with their reasons; nothing
else is lost").

The loop runs as the chaos run starts it (``recloop.ops.chaos_fleet.Fleet``: streams, learn,
serve and sim as ``python -m recloop`` children, tracked by pid) on the suite's broker. Once
a learned snapshot is out, into the running loop go:

- on ``items``: a chunk whose byte length disagrees with its rows, a chunk of NaN features
  and bytes that are no record; each catalogue follower (serving's side reader, the
  learner's) dead-letters each with its reason and keeps the catalogue it has;
- a schema-1 record, with its candidate feature rows, on every topic whose type v2 changed:
  a RecRequest on ``rec.requests`` (followed by a valid probe), a SlateServed on
  ``rec.slates``, a SessionState on ``session.state``, a Transition on ``rec.transitions``;
  each of its readers dead-letters it with the "schema version 1" reason.

Checked: no process exits, restarts or stops uncleanly; every dead letter with its reason
from every reader; serving still serves catalogue v1 (the simulator's, sha256 unchanged,
no second swap) and refused exactly the two chunks that decode; every probe answered, new
transitions and a newer snapshot served after the injection, and every reader committed past
what was injected.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from recloop.core import codec, events
from recloop.core.dlq import (
    HEADER_CONSUMER,
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
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
KINDS = ("streams", "learn", "serve", "sim")
FOLLOWERS = ["recloop-serve-side", f"learner-{ALGO}-catalogue"]
V1_READERS = {
    "rec.requests": ["recloop-serve"],
    "rec.slates": ["producer_sim", "streams"],
    "session.state": ["recloop-serve-side"],
    "rec.transitions": [f"learner:{ALGO}"],
}
GROUPS = {"rec.requests": "recloop-serve", "rec.slates": "recloop-streams",
          "rec.transitions": f"recloop-learner-{ALGO}"}  # fmt: skip
USER = "catalogue-poison-user"


def _v1(record: events.Record, dim: int) -> bytes:
    """``record`` as schema 1 wrote it: ``v`` 1, each candidate's feature row beside it."""
    obj = msgspec.json.decode(codec.encode(record))
    obj["v"] = 1
    rows = [[0.5] * dim for _ in obj.get("candidates", [])]
    if "candidates" in obj:
        obj["candidate_features"] = rows
    if isinstance(record, events.Transition):
        obj["next_candidate_features"] = rows
    for pending in obj.get("pending", []):
        pending["candidate_features"] = [[0.5] * dim for _ in pending.get("candidates", [])]
    return msgspec.json.encode(obj)


def _bad_items(dim: int) -> list[tuple[str, bytes, bytes, str]]:
    """``(kind, key, value, reason fragment)`` of each malformed item record."""
    length = events.ItemChunk(first_item=0, n=4, dim=dim, features=b"\x00" * (16 * dim - 3))
    nan = np.full((4, dim), np.nan, dtype="<f4").tobytes()
    nan_chunk = events.ItemChunk(first_item=4, n=4, dim=dim, features=nan)
    return [
        ("bad byte length", b"bad-length", codec.encode(length),
         f"{16 * dim - 3} feature bytes, 4 rows x {dim} float32 need {16 * dim}"),
        ("NaN features", b"bad-nan", codec.encode(nan_chunk), "holds NaN or infinity"),
        ("undecodable bytes", b"bad-bytes", b'{"type":"ItemChunk","v":2,"n":\xfe\xff', "cannot decode"),
    ]  # fmt: skip


def _newest_version(settings: Settings) -> int:
    try:
        ref = latest_snapshot(settings.resolved_snapshot_dir, ALGO)
    except SnapshotError:
        return 0
    return 0 if ref is None else ref.version


def _serve_status(log: Path) -> dict[str, Any]:
    import json

    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"installs"' in line:
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def _letters(settings: Settings, bases: list[str]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Dead letters by where their record was (topic, partition, offset), then by reader."""
    out: dict[tuple[str, int, int], dict[str, Any]] = defaultdict(dict)
    names = settings.topics
    for base in bases:
        for r in read_records(settings, names.dlq(names.name(base)), timeout_s=30.0):
            h = r.headers
            where = (h[HEADER_TOPIC], int(h[HEADER_PARTITION]), int(h[HEADER_OFFSET]))
            out[where][h.get(HEADER_CONSUMER, "?")] = r
    return out


def test_malformed_items_and_v1_records_in_a_live_run_are_dead_lettered_and_nothing_is_lost(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    settings = kafka_settings.model_copy(update={
        "snapshot_dir": tmp_path / "snapshots", "snapshot_key": SecretStr("catalogue-live-key"),
        "database_url": f"sqlite:///{tmp_path / 'recloop.db'}",
    })  # fmt: skip
    names = settings.topics
    storage = Storage.from_settings(settings)
    run_id = storage.start_run({"test": "catalogue-live"}, notes="catalogue live test")
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

    def wait(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            exits.extend(fleet.exited())
            monitor.poll(min(0.5, max(0.0, end - time.monotonic())))

    def tails() -> str:
        return "\n".join(f"--- {k}\n{fleet.tail(k)}" for k in KINDS)

    producer = Producer({**settings.kafka_client_config(), "acks": "all", "linger.ms": 5})
    where: dict[int, tuple[int, int]] = {}
    plan: list[tuple[str, str, bytes, str]] = []  # (topic base, kind, value, reason)
    try:
        for kind in KINDS:
            fleet.start(kind)
        deadline = time.monotonic() + 120
        while _newest_version(settings) < 1:
            assert time.monotonic() < deadline, "no snapshot within 120 s\n" + tails()
            assert not exits, f"{exits} exited during warm-up\n{tails()}"
            wait(1.0)
        wait(3.0)
        status = _serve_status(fleet.log("serve"))
        assert status.get("catalogue", {}).get("version") == 1, status
        dim = status["catalogue"]["feature_dim"]
        template = codec.decode(read_records(settings, names.requests)[-1].value, events.RecRequest)
        examples = {type(r): r for r in example_events()}

        def produce(base: str, kind: str, key: bytes, value: bytes, reason: str = "") -> None:
            n = len(plan)
            plan.append((base, kind, value, reason))

            def delivered(err: Any, msg: Any) -> None:
                assert err is None, err
                where[n] = (msg.partition(), msg.offset())

            producer.produce(names.name(base), value, key, on_delivery=delivered)
            producer.poll(0)

        def probe(i: int) -> bytes:
            return codec.encode(msgspec.structs.replace(
                template, request_id=f"probe-{i}", user_id=USER, session_id="probe-s", step=0,
                ts=time.time()))  # fmt: skip

        before = {t: sum(log_ends(settings, names.name(t)).values())
                  for t in ("rec.slates", "rec.transitions")}  # fmt: skip
        version_at_injection = _newest_version(settings)
        v1_reason = "schema version 1 ("
        for kind, key, value, reason in _bad_items(dim):
            produce("items", kind, key, value, reason)
        produce("rec.requests", "v1 RecRequest", USER.encode(), _v1(template, dim), v1_reason)
        produce("rec.requests", "probe", USER.encode(), probe(0))
        slate = msgspec.structs.replace(examples[events.SlateServed], user_id=USER)
        produce("rec.slates", "v1 SlateServed", USER.encode(), _v1(slate, dim), v1_reason)
        state = msgspec.structs.replace(examples[events.SessionState], user_id=USER)
        produce("session.state", "v1 SessionState", USER.encode(), _v1(state, dim), v1_reason)
        transition = msgspec.structs.replace(examples[events.Transition], user_id=USER)
        produce("rec.transitions", "v1 Transition", USER.encode(), _v1(transition, dim),
                v1_reason)  # fmt: skip
        for i in range(1, 4):
            produce("rec.requests", "probe", USER.encode(), probe(i))
        assert producer.flush(30) == 0 and len(where) == len(plan)
        injected = [(i, p) for i, p in enumerate(plan) if p[1] != "probe"]

        def problems() -> list[str]:
            letters = _letters(settings, ["items", *V1_READERS])
            out = []
            for i, (base, kind, value, reason) in injected:
                got = letters.get((names.name(base), *where[i]), {})
                for reader in FOLLOWERS if base == "items" else V1_READERS[base]:
                    letter = got.get(reader)
                    if letter is None:
                        out.append(f"{base} {kind}: no dead letter from {reader} ({sorted(got)})")
                    elif letter.value != value or reason not in letter.headers[HEADER_ERROR]:
                        out.append(f"{base} {kind} from {reader}: {letter.headers[HEADER_ERROR]}")
            return out

        def answered() -> set[str]:
            return {codec.decode(r.value, events.SlateServed).request_id
                    for r in read_records(settings, names.slates)
                    if r.value and b'"v":2' in r.value and USER.encode() in r.value}  # fmt: skip

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not exits:
            wait(4.0)
            if (not problems() and _newest_version(settings) > version_at_injection
                    and {f"probe-{i}" for i in range(4)} <= answered()):  # fmt: skip
                break
        wait(4.0)  # a status line after it all
        status = _serve_status(fleet.log("serve"))
        found = problems()
        got_answers = answered()
        after = {t: sum(log_ends(settings, names.name(t)).values()) for t in before}
        live = {kind: fleet.procs[kind].poll() is None for kind in fleet.procs}
    finally:
        codes = {kind: fleet.stop(kind, timeout=30.0) for kind in list(fleet.procs)}
        monitor.close()
        storage.close()
    committed = {base: group_lag(settings, names.group(group), [names.name(base)],
                                 with_seconds=False)
                 for base, group in GROUPS.items()}  # fmt: skip
    print(
        f"\ncatalogue live: {len(injected)} injected, serving status catalogue "
        f"{status.get('catalogue')}, chunks refused {status.get('catalogue_chunks_refused')}, "
        f"before {before}, after {after}, stop codes {codes}, {time.monotonic() - t0:.0f} s"
    )

    assert not exits and all(live.values()), f"exits {exits}, live {live}\n{tails()}"
    assert all(c == 0 for c in codes.values()) and sum(fleet.starts.values()) == len(KINDS), codes
    assert not found, "\n".join(found) + "\n" + tails()
    # Serving kept the simulator's catalogue: v1, one swap, the two decodable chunks refused.
    assert status["catalogue"]["version"] == 1 and status["catalogue_swaps"] == 1, status
    assert status["catalogue_chunks_refused"] == 2, status
    assert {f"probe-{i}" for i in range(4)} <= got_answers, got_answers
    assert after["rec.transitions"] > before["rec.transitions"]
    assert _newest_version(settings) > version_at_injection
    for base, lags in committed.items():
        ends: dict[int, int] = {}
        for i, (b, *_r) in injected:
            if b == base:
                partition, offset = where[i]
                ends[partition] = max(ends.get(partition, 0), offset + 1)
        for lag in lags:
            if lag.partition in ends:
                assert lag.committed is not None and lag.committed >= ends[lag.partition], (
                    base,
                    lag,
                )
