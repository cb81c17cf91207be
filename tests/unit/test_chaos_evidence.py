"""The chaos run's judge and plan: each check fails when what it guards is broken."""

from __future__ import annotations

from pathlib import Path

import pytest

from recloop.core import codec, dlq
from recloop.core.events import RecRequest, SessionEnd, SlateServed
from recloop.core.topics import Topics
from recloop.learner.publishing import id_digest
from recloop.ops.chaos_evidence import STREAMS_CONSUMER, Evidence, Exit, TopicRecord, judge, replay
from recloop.ops.chaos_plan import KINDS, ChaosOptions, options_from_env, plan_faults
from recloop.streams import fold
from recloop.streams.synthetic import slate_feedback

TOPICS = Topics(prefix="t.")
USERS = ("u1", "u2")
STEPS = 3


def _slate(user: str, step: int, version: int = 1) -> SlateServed:
    return SlateServed(
        request_id=f"{user}-r{step}", user_id=user, session_id=f"{user}-s0", step=step,
        ts=100.0 + step, request_ts=100.0 + step, items=[step, step + 10],
        scores=[0.0, 0.0], propensities=[0.5, 0.5], policy="learned", policy_version=version,
        candidates=[step, step + 10],
    )  # fmt: skip


def _request(user: str, step: int) -> RecRequest:
    return RecRequest(request_id=f"{user}-r{step}", user_id=user, session_id=f"{user}-s0",
                      step=step, ts=100.0 + step, k=2)  # fmt: skip


def _world(versions: tuple[int, ...] = (1, 1, 2)) -> dict[str, list]:
    """Two users' sessions of ``STEPS`` slates each, step by step, all on partition 0, and
    the fold's transitions of them."""
    requests, slates, feedback = [], [], []
    for step, version in zip(range(STEPS), versions, strict=True):
        for user in USERS:
            requests.append(_request(user, step))
            slates.append(_slate(user, step, version))
            feedback += slate_feedback(user, f"{user}-s0", f"{user}-r{step}", [step, step + 10],
                                       0 if step % 2 else None, 1.0, 200.0 + step)  # fmt: skip
    for user in USERS:
        feedback.append(SessionEnd(event_id=f"{user}-end", user_id=user,
                                   session_id=f"{user}-s0", steps=STEPS, ts=300.0))  # fmt: skip
    transitions, state = [], {}
    for event in [*slates, *feedback]:
        state[event.user_id], out = fold.apply(state.get(event.user_id), event)
        transitions += out
    return {"requests": requests, "slates": slates, "feedback": feedback,
            "transitions": transitions}  # fmt: skip


def _records(values: list) -> list[TopicRecord]:
    return [TopicRecord(0, i, codec.encode(v)) for i, v in enumerate(values)]


def _evidence(world: dict[str, list], **changes) -> Evidence:
    ids = {t.transition_id for t in world["transitions"]}
    manifest = {"version": 4, "transitions_applied": len(ids),
                "service": {"applied_digest": str(id_digest(ids))}}  # fmt: skip
    records = {
        TOPICS.requests: _records(world["requests"]),
        TOPICS.slates: _records(world["slates"]),
        TOPICS.feedback: _records(world["feedback"]),
        TOPICS.transitions: _records(world["transitions"]),
    }
    fields = {"topics": TOPICS, "records": records, "policy": "learned", "manifest": manifest,
              "kills": {"learn": 1}, "broker_kills": 1, **changes}  # fmt: skip
    return Evidence(**fields)


def test_a_loop_that_lost_nothing_passes_with_its_counts():
    world = _world()
    # A re-emission after a crash repeats an id with the same outcome: counted, allowed.
    world["transitions"].append(world["transitions"][0])
    verdict = judge(_evidence(world))
    assert verdict.failures == []
    counts = verdict.counts
    assert (counts["expected"], counts["on_topic"], counts["duplicates"]) == (6, 6, 1)
    assert (counts["missing"], counts["extra"], counts["applied"]) == (0, 0, 6)
    assert (counts["requests"], counts["answered"], counts["slates"]) == (6, 6, 6)
    assert counts["backwards"] == 0 and counts["top_version"] == 2


def test_a_transition_missing_from_the_topic_is_named():
    world = _world()
    lost = world["transitions"].pop(1)
    verdict = judge(_evidence(world))
    assert verdict.counts["missing"] == 1
    assert any(lost.transition_id in f and "not on the topic" in f for f in verdict.failures)
    # The learner applied what was on the topic, so only the transitions check fails.
    assert len(verdict.failures) == 1


def test_an_extra_or_changed_transition_fails():
    world = _world()
    first = world["transitions"][0]
    world["transitions"][0] = first.__class__(**{
        **{f: getattr(first, f) for f in first.__struct_fields__}, "reward": 9.0})  # fmt: skip
    verdict = judge(_evidence(world))
    assert verdict.counts["differ"] == 1
    world = _world()
    stray = world["transitions"][0].__class__(**{
        **{f: getattr(world["transitions"][0], f) for f in first.__struct_fields__},
        "transition_id": "f" * 32})  # fmt: skip
    world["transitions"].append(stray)
    assert judge(_evidence(world)).counts["extra"] == 1


def test_a_manifest_that_applied_too_few_or_other_ids_fails():
    world = _world()
    ids = sorted({t.transition_id for t in world["transitions"]})
    short = {"version": 2, "transitions_applied": 5,
             "service": {"applied_digest": str(id_digest(ids[:5]))}}  # fmt: skip
    assert any(
        "applied 5 transitions, 6" in f for f in judge(_evidence(world, manifest=short)).failures
    )
    other = {"version": 3, "transitions_applied": 6,
             "service": {"applied_digest": str(id_digest([*ids[:5], ids[0]]))}}  # fmt: skip
    assert any("not the same ones" in f for f in judge(_evidence(world, manifest=other)).failures)
    assert any("no valid snapshot" in f for f in judge(_evidence(world, manifest=None)).failures)


def test_an_unanswered_request_fails_unless_serving_dead_lettered_it():
    world = _world()
    world["requests"].append(_request("u9", 0))
    verdict = judge(_evidence(world))
    assert verdict.counts["unanswered"] == 1 and any("u9-r0" in f for f in verdict.failures)
    letter = TopicRecord(0, 0, b"{}", {dlq.HEADER_ERROR: "k above the candidates",
                                       dlq.HEADER_TOPIC: TOPICS.requests,
                                       dlq.HEADER_PARTITION: "0",
                                       dlq.HEADER_OFFSET: str(len(world["requests"]) - 1)})  # fmt: skip
    evidence = _evidence(world)
    evidence.records[TOPICS.dlq(TOPICS.requests)] = [letter]
    verdict = judge(evidence)
    assert verdict.failures == [] and verdict.counts["requests_dead_lettered"] == 1


def test_a_version_served_after_a_newer_one_on_its_partition_fails():
    verdict = judge(_evidence(_world(versions=(1, 3, 0))))
    assert verdict.counts["backwards"] == 2  # once per user, both on partition 0
    assert any("v0 at 00:01:42 UTC after v3" in f for f in verdict.failures)


def test_feedback_the_streams_worker_dead_lettered_is_left_out_of_the_replay():
    world = _world()
    # The worker dead-lettered the SessionEnd of u1 (with a reason): its terminal transition
    # is not expected, so its absence is no loss.
    end = next(i for i, f in enumerate(world["feedback"]) if isinstance(f, SessionEnd))
    terminal = next(t for t in world["transitions"] if t.done and t.user_id == "u1")
    world["transitions"].remove(terminal)
    evidence = _evidence(world)
    evidence.records[TOPICS.dlq(TOPICS.feedback)] = [TopicRecord(0, 0, b"{}", {
        dlq.HEADER_ERROR: "early feedback overflow", dlq.HEADER_TOPIC: TOPICS.feedback,
        dlq.HEADER_PARTITION: "0", dlq.HEADER_OFFSET: str(end), dlq.HEADER_CONSUMER: "streams",
    })]  # fmt: skip
    verdict = judge(evidence)
    assert verdict.failures == [] and verdict.counts["dead_letters"] == {TOPICS.feedback: 1}
    # Without its reason the same dead letter is a failure of its own.
    del evidence.records[TOPICS.dlq(TOPICS.feedback)][0].headers[dlq.HEADER_ERROR]
    assert any("carry no reason" in f for f in judge(evidence).failures)


def test_the_replay_puts_a_users_slates_before_their_feedback():
    world = _world()
    rows = [(TOPICS.feedback, 0, i, f) for i, f in enumerate(world["feedback"])]
    slates = [(TOPICS.slates, 0, i, s) for i, s in enumerate(world["slates"])]
    # Feedback handed over first (as a fetch grouped by topic might) changes nothing.
    assert set(replay(slates, rows)) == {t.transition_id for t in world["transitions"]}


def test_a_process_that_exited_on_its_own_fails_the_run():
    verdict = judge(_evidence(_world(), exits=[Exit("learn", 1, 42.0)]))
    assert verdict.failures == ["exits: 1 process(es) exited on their own: learn (code 1) at 42 s"]


def test_the_plan_kills_every_kind_and_the_broker_as_often_as_asked():
    options = ChaosOptions(kills=7, broker_kills=2, seconds=100, seed=3)
    plan = plan_faults(options)
    targets = [f.target for f in plan]
    assert set(KINDS) <= set(targets) and len(targets) == 9 and targets.count("broker") == 2
    assert [f.at_s for f in plan] == sorted(f.at_s for f in plan) and plan[-1].at_s < 100
    assert all(10 <= f.down_s <= 20 for f in plan if f.target == "broker")
    assert (
        plan_faults(options)
        == plan
        != plan_faults(ChaosOptions(kills=7, broker_kills=2, seconds=100, seed=4))
    )


def test_settings_from_the_environment_are_named_when_wrong():
    options = options_from_env({"RECLOOP_CHAOS_KILLS": "12", "RECLOOP_CHAOS_SEED": "5"}, Path("w"))
    assert (options.kills, options.seed, options.work_dir) == (12, 5, Path("w"))
    with pytest.raises(ValueError, match="RECLOOP_CHAOS_KILLS='many' is not int"):
        options_from_env({"RECLOOP_CHAOS_KILLS": "many"}, Path("w"))
    with pytest.raises(ValueError, match="at least 4.*RECLOOP_CHAOS_KILLS"):
        options_from_env({"RECLOOP_CHAOS_KILLS": "2"}, Path("w"))


def test_the_judge_knows_the_streams_workers_name_in_dead_letter_headers():
    from recloop.streams.app import CONSUMER_NAME

    assert STREAMS_CONSUMER == CONSUMER_NAME


def _long_session(user: str, steps: int) -> tuple[list[SlateServed], list, list]:
    """One user's session of ``steps`` slates as the live worker folds it (each slate, then
    its feedback, as the simulator sends them), with the transitions that gives."""
    slates, feedback, live, state = [], [], [], None
    for step in range(steps):
        slate = _slate(user, step)
        answer = slate_feedback(user, f"{user}-s0", slate.request_id, slate.items,
                                0 if step % 3 == 0 else None, 1.0, 200.0 + step)  # fmt: skip
        slates.append(slate)
        feedback += answer
        for event in [slate, *answer]:
            state, out = fold.apply(state, event)
            live += out
    end = SessionEnd(event_id=f"{user}-end", user_id=user, session_id=f"{user}-s0",
                     steps=steps, ts=900.0)  # fmt: skip
    feedback.append(end)
    state, out = fold.apply(state, end)
    return slates, feedback, live + out


def test_the_replay_of_a_session_longer_than_the_buffer_caps_emits_what_the_worker_did():
    # The slates-first order holds the whole session: 100 pending slates, past the worker's
    # pending_slates (64), which the live worker, answered slate by slate, never nears. The
    # bounded-state commit ae74f88 replayed with the worker's caps and refused 36 of them.
    steps = 100
    assert steps > fold.DEFAULT.pending_slates
    slates, feedback, live = _long_session("u1", steps)
    assert len(live) == steps
    rows = [(TOPICS.slates, 0, i, s) for i, s in enumerate(slates)]
    rows_fb = [(TOPICS.feedback, 0, i, f) for i, f in enumerate(feedback)]
    assert replay(rows, rows_fb) == {t.transition_id: t for t in live}
    # With the worker's own caps the slates-first order would refuse what the worker took.
    assert len(replay(rows, rows_fb, config=fold.DEFAULT)) < steps


def test_a_slate_the_worker_refused_for_a_cap_is_left_out_and_counted():
    world = _world()
    # The worker refused u2's last slate for a cap (so the slate before it ended the session
    # as the terminal transition, and the refused one emitted nothing).
    refused = next(i for i, s in enumerate(world["slates"]) if s.request_id == f"u2-r{STEPS - 1}")
    state, live = None, []
    for event in [*world["slates"], *world["feedback"]]:
        if event.user_id != "u2" or event is world["slates"][refused]:
            continue
        try:
            state, out = fold.apply(state, event)
        except fold.InvalidEvent:
            continue
        live += out
    world["transitions"] = [t for t in world["transitions"] if t.user_id != "u2"] + live
    evidence = _evidence(world)
    reason = f"SlateServed u2-r{STEPS - 1}: ... ({fold.BUFFER_FULL} pending_slates=64)"
    evidence.records[TOPICS.dlq(TOPICS.slates)] = [TopicRecord(0, 0, b"{}", {
        dlq.HEADER_ERROR: reason, dlq.HEADER_TOPIC: TOPICS.slates, dlq.HEADER_PARTITION: "0",
        dlq.HEADER_OFFSET: str(refused), dlq.HEADER_CONSUMER: STREAMS_CONSUMER,
    })]  # fmt: skip
    verdict = judge(evidence)
    assert verdict.failures == []
    assert verdict.counts["buffer_full"] == {"pending_slates": 1}
    assert judge(_evidence(_world())).counts["buffer_full"] == {}
