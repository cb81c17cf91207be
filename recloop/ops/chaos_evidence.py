"""What a chaos run must show, judged from the records on the topics (pure: no I/O).

``recloop.ops.chaos`` reads every record of the loop's topics from the beginning to the high
watermark and hands them here as ``TopicRecord``s; ``judge`` returns the counts and one
failure line per check that does not hold:

- **transitions**: the reference is the offline replay of ``streams.fold.apply`` over every
  slate and feedback record the streams worker did not dead-letter, per user, the user's
  slates (in offset order) before their feedback (in offset order). In that order every
  slate precedes the feedback that refers to it, so the fold never has to buffer feedback,
  and the replay is what the worker must have emitted whatever interleaving it met. That
  order holds a user's whole session of slates at once, far more than the live worker
  holds, so the replay lifts the fold's buffer caps (``FoldConfig.without_buffer_caps``;
  ``recloop.streams.fold``, "Bounded state"): a record the worker refused for a cap is in
  its DLQ and left out like any other, and one it accepted is never refused here. The
  refusals for a cap are counted (``buffer_full``, per cap), not failed: they are the
  worker's, with their reasons, and a sane run has none. Expiry is not
  replayed: the harness runs the worker with a session timeout longer than the run. The
  distinct transition ids on ``rec.transitions`` must equal the replay's, none missing and
  none extra, and each must carry the replay's outcome (slate, click, reward, done). A
  repeated id (a re-emission after a crash) is counted, and must repeat the same outcome.
- **learner**: the newest valid snapshot's manifest counts every distinct id exactly once:
  ``transitions_applied`` is their number and ``applied_digest`` their ``id_digest``.
- **answers**: every request id on ``rec.requests`` has a ``SlateServed`` on
  ``rec.slates``, unless serving dead-lettered that request with a reason.
- **versions**: per partition of ``rec.slates`` in offset order, the learned policy's
  ``policy_version`` never decreases.
- **exits**: no process exited unless the harness stopped it.

A dead letter counts as evidence only with its reason (``recloop.core.dlq`` headers); one
without is a failure of its own.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from recloop.core import codec, dlq
from recloop.core.events import RecRequest, SlateServed, Transition
from recloop.core.topics import Topics, spec
from recloop.learner.publishing import id_digest
from recloop.streams import fold

EXAMPLES = 5
"""How many example ids a failure line names."""
STREAMS_CONSUMER = "streams"
"""The streams worker's name in dead-letter headers (``recloop.streams.app``)."""


@dataclass(frozen=True)
class TopicRecord:
    """One record as read from a topic: where it sits, its value bytes and its headers."""

    partition: int
    offset: int
    value: bytes | None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Exit:
    """A process that exited although nobody stopped it."""

    kind: str
    code: int | None
    at_s: float


@dataclass
class Evidence:
    """Everything a chaos run leaves behind, as read back by the harness."""

    topics: Topics
    records: dict[str, list[TopicRecord]]
    """Every record of each topic (resolved name), main topics and their DLQs."""
    policy: str
    """The learned policy whose versions must never go backwards."""
    manifest: dict[str, Any] | None
    """The newest valid snapshot's manifest, or ``None`` when there is none."""
    kills: dict[str, int]
    broker_kills: int
    exits: list[Exit] = field(default_factory=list)
    recoveries: dict[str, list[float]] = field(default_factory=dict)
    """Seconds from each restart until the loop moved again, per target."""
    problems: list[str] = field(default_factory=list)
    """What the harness itself saw go wrong (a drain that timed out, say)."""


@dataclass
class Verdict:
    """The counts of a run and one line per failed check."""

    counts: dict[str, Any]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def judge(evidence: Evidence) -> Verdict:
    """Every check of the module docstring over ``evidence``."""
    topics, failures = evidence.topics, list(evidence.problems)
    dead = _dead_letters(evidence, failures)
    slates = _decoded(evidence.records, topics.slates, SlateServed)
    feedback = _decoded(evidence.records, topics.feedback, spec("rec.feedback").value)
    transitions = _decoded(evidence.records, topics.transitions, Transition)
    requests = _decoded(evidence.records, topics.requests, RecRequest)
    streams_dead = {k for k, (consumer, _) in dead.items() if consumer == STREAMS_CONSUMER}
    expected = replay(
        [(topics.slates, p, o, s) for p, o, s in slates],
        [(topics.feedback, p, o, f) for p, o, f in feedback],
        streams_dead,
    )
    counts: dict[str, Any] = {}
    counts.update(_check_transitions(expected, [t for _, _, t in transitions], failures))
    counts["buffer_full"] = dict(Counter(
        cap for consumer, reason in dead.values()
        if consumer == STREAMS_CONSUMER and (cap := fold.overflow_cap(reason)) is not None
    ))  # fmt: skip
    counts.update(_check_manifest(evidence.manifest, {t.transition_id for _, _, t in transitions},
                                  failures))  # fmt: skip
    refused = {k for k in dead if k[0] == topics.requests}
    counts.update(_check_answers(requests, slates, refused, failures))
    counts.update(_check_versions(slates, evidence.policy, failures))
    counts["kills"] = dict(sorted(evidence.kills.items()))
    counts["broker_kills"] = evidence.broker_kills
    counts["exits"] = len(evidence.exits)
    counts["recovery_max_s"] = {k: max(v) for k, v in sorted(evidence.recoveries.items())}
    counts["dead_letters"] = dict(Counter(k[0] for k in dead))
    if evidence.exits:
        failures.append(
            f"exits: {len(evidence.exits)} process(es) exited on their own: "
            + ", ".join(f"{e.kind} (code {e.code}) at {e.at_s:.0f} s" for e in evidence.exits)
        )
    return Verdict(counts, failures)


def replay(
    slates: Iterable[tuple[str, int, int, Any]],
    feedback: Iterable[tuple[str, int, int, Any]],
    skip: AbstractSet[tuple[str, int, int]] = frozenset(),
    config: fold.FoldConfig | None = None,
) -> dict[str, Transition]:
    """The fold over each user's slates, then their feedback, each in the order given;
    ``(topic, partition, offset, event)`` tuples, those in ``skip`` left out. Feedback the
    fold refuses (``InvalidEvent``) is left out too, as the live worker dead-letters it.
    ``config`` defaults to the worker's with the buffer caps lifted (module docstring)."""
    config = config or fold.DEFAULT.without_buffer_caps()
    by_user: dict[str, list[Any]] = defaultdict(list)
    for source in (slates, feedback):
        for topic, partition, offset, event in source:
            if (topic, partition, offset) not in skip:
                by_user[event.user_id].append(event)
    out: dict[str, Transition] = {}
    for events in by_user.values():
        state = None
        for event in events:
            try:
                state, emitted = fold.apply(state, event, config)
            except fold.InvalidEvent:
                continue
            for t in emitted:
                out.setdefault(t.transition_id, t)
    return out


def outcome(t: Transition) -> tuple:
    """What must agree between the replay and the topic for one transition id."""
    return (t.session_id, t.request_id, tuple(t.slate), t.chosen_position, t.reward, t.done,
            t.policy, t.policy_version)  # fmt: skip


# -- the checks ------------------------------------------------------------------------------


def _check_transitions(
    expected: dict[str, Transition], on_topic: list[Transition], failures: list[str]
) -> dict[str, int]:
    first: dict[str, Transition] = {}
    repeats_differ: list[str] = []
    for t in on_topic:
        seen = first.setdefault(t.transition_id, t)
        if seen is not t and outcome(seen) != outcome(t):
            repeats_differ.append(t.transition_id)
    missing = sorted(set(expected) - set(first))
    extra = sorted(set(first) - set(expected))
    differ = sorted(
        i for i in set(expected) & set(first) if outcome(expected[i]) != outcome(first[i])
    )
    if missing:
        failures.append(
            f"transitions: {len(missing)} of {len(expected)} expected are not on the topic"
            f" ({_users_hit(expected, missing)}); e.g. {_requests_of(expected, missing)}"
        )
    if extra:
        failures.append(
            f"transitions: {len(extra)} on the topic that the replay does not emit; "
            f"e.g. {_requests_of(first, extra)}"
        )
    if differ:
        i = differ[0]
        failures.append(
            f"transitions: {len(differ)} carry another outcome than the replay's; e.g. {i}: "
            f"topic {outcome(first[i])} != replay {outcome(expected[i])}"
        )
    if repeats_differ:
        failures.append(
            f"transitions: {len(repeats_differ)} repeated ids carry another outcome than their "
            f"first emission; e.g. {repeats_differ[:EXAMPLES]}"
        )
    return {
        "expected": len(expected), "on_topic": len(first), "records": len(on_topic),
        "duplicates": len(on_topic) - len(first), "missing": len(missing), "extra": len(extra),
        "differ": len(differ),
    }  # fmt: skip


def _check_manifest(
    manifest: dict[str, Any] | None, ids: set[str], failures: list[str]
) -> dict[str, Any]:
    if manifest is None:
        failures.append(f"learner: no valid snapshot, {len(ids)} distinct transitions on the topic")
        return {"applied": None, "snapshot_version": None}
    applied = int(manifest["transitions_applied"])
    digest = int(manifest["service"]["applied_digest"])
    if applied != len(ids):
        failures.append(
            f"learner: snapshot v{manifest['version']} applied {applied} transitions, "
            f"{len(ids)} distinct ones are on the topic"
        )
    elif digest != id_digest(ids):
        failures.append(
            f"learner: snapshot v{manifest['version']} applied {applied} transitions, as many as "
            "are on the topic, but not the same ones (applied_digest differs)"
        )
    return {"applied": applied, "snapshot_version": int(manifest["version"])}


def _check_answers(
    requests: list[tuple[int, int, RecRequest]],
    slates: list[tuple[int, int, SlateServed]],
    dead: set[tuple[str, int, int]],
    failures: list[str],
) -> dict[str, int]:
    refused = {(p, o) for _, p, o in dead}
    asked = {r.request_id for p, o, r in requests if (p, o) not in refused}
    answered = {s.request_id for _, _, s in slates}
    unanswered = sorted(asked - answered)
    if unanswered:
        failures.append(
            f"answers: {len(unanswered)} of {len(asked)} requests have no slate; "
            f"e.g. {unanswered[:EXAMPLES]}"
        )
    return {
        "requests": len(asked), "answered": len(asked & answered), "unanswered": len(unanswered),
        "slates": len(slates), "requests_dead_lettered": len(refused),
    }  # fmt: skip


def _check_versions(
    slates: list[tuple[int, int, SlateServed]], policy: str, failures: list[str]
) -> dict[str, int]:
    newest: dict[int, tuple[int, int]] = {}  # partition -> (version, offset)
    backwards: list[str] = []
    learned = 0
    for partition, offset, slate in sorted(slates, key=lambda r: (r[0], r[1])):
        if slate.policy != policy:
            continue
        learned += 1
        top, top_offset = newest.get(partition, (0, -1))
        if slate.policy_version < top:
            served = time.strftime("%H:%M:%S", time.gmtime(slate.ts))
            backwards.append(f"[{partition}]@{offset} v{slate.policy_version} at {served} UTC "
                             f"after v{top}@{top_offset}")  # fmt: skip
        else:
            newest[partition] = (slate.policy_version, offset)
    if backwards:
        failures.append(
            f"versions: {len(backwards)} {policy} slates were served by an older version than "
            f"one served before on their partition; e.g. {', '.join(backwards[:EXAMPLES])}"
        )
    top_version = max((v for v, _ in newest.values()), default=0)
    return {"learned_slates": learned, "backwards": len(backwards), "top_version": top_version}


# -- helpers ---------------------------------------------------------------------------------


def _decoded(records: dict[str, list[TopicRecord]], topic: str, value_type: Any) -> list:
    """``(partition, offset, record)`` for every record of ``topic`` that decodes (the live
    consumers dead-letter the rest, which ``_dead_letters`` accounts for)."""
    decode = codec.decoder_for(value_type)
    out = []
    for r in records.get(topic, []):
        try:
            out.append((r.partition, r.offset, decode(r.value)))
        except codec.RecordDecodeError:
            continue
    return out


def _dead_letters(
    evidence: Evidence, failures: list[str]
) -> dict[tuple[str, int, int], tuple[str, str]]:
    """``(source topic, partition, offset) -> (consumer, reason)`` of every dead letter."""
    out: dict[tuple[str, int, int], tuple[str, str]] = {}
    unexplained = 0
    for topic, _ in evidence.topics.all():
        for r in evidence.records.get(evidence.topics.dlq(topic), []):
            reason = r.headers.get(dlq.HEADER_ERROR, "")
            if not reason:
                unexplained += 1
            key = (r.headers.get(dlq.HEADER_TOPIC, topic),
                   int(r.headers.get(dlq.HEADER_PARTITION, "-1")),
                   int(r.headers.get(dlq.HEADER_OFFSET, "-1")))  # fmt: skip
            out[key] = (r.headers.get(dlq.HEADER_CONSUMER, ""), reason)
    if unexplained:
        failures.append(f"dead letters: {unexplained} carry no reason ({dlq.HEADER_ERROR})")
    return out


def _users_hit(expected: dict[str, Transition], ids: list[str]) -> str:
    by_user = Counter(expected[i].user_id for i in ids)
    total = Counter(t.user_id for t in expected.values())
    worst = ", ".join(f"{u}: {n} of {total[u]}" for u, n in by_user.most_common(3))
    return f"{len(by_user)} users; most: {worst}"


def _requests_of(transitions: Mapping[str, Transition], ids: list[str]) -> str:
    return ", ".join(f"{i} ({transitions[i].request_id})" for i in ids[:EXAMPLES])
