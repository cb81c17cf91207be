"""The whole loop in one process, without Kafka: for fast experiments, tests and benchmarks.

    world = interest_evolution()
    agent = registry.make_agent("slateq", spec_for(world), seed=0)
    trained = train(world, agent, episodes=300, seed=1)      # learning on
    report = evaluate(world, agent.policy(), episodes=300, seed=2)  # learning off, no exploration

The same pure cores as the product path, wired directly instead of through topics:
producer_sim's runner emits the wire events (RecRequest, SlateServed, Impression, Click,
SessionEnd, EpisodeOutcome) to a sink; slates and feedback go through the streams fold
``apply(state, event) -> (state, transitions)``; transitions go to ``agent.learn_many`` in
chunks of ``learn_chunk`` (as the Kafka learner consumes in batches); and the agent's live
policy answers the runner's next requests, so it serves what it has learned so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from core.events import Click, Impression, Record, SessionEnd, SessionState, SlateServed
from learner.spec import WorldSpec
from producer_sim.runner import RunReport, run_episodes
from producer_sim.world import World
from streams import fold


def spec_for(world: World, history_len: int = 5) -> WorldSpec:
    """The learner's view of a producer_sim world."""
    s = world.spec
    return WorldSpec(n_items=s.n_items, user_obs_dim=s.user_obs_dim,
                     item_feature_dim=s.item_feature_dim, slate_size=s.slate_size,
                     num_candidates=s.num_candidates, history_len=history_len)


@dataclass
class LearningSink:
    """Folds wire events into transitions and feeds them to an agent in chunks."""

    agent: object
    learn_chunk: int = 32
    states: dict[str, SessionState] = field(default_factory=dict)
    pending: list = field(default_factory=list)
    transitions: int = 0
    learn_s: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)

    def __call__(self, record: Record) -> None:
        if not isinstance(record, SlateServed | Impression | Click | SessionEnd):
            return  # requests and ground-truth outcomes are not learning inputs
        state, out = fold.apply(self.states.get(record.user_id), record)
        if state.ended:
            self.states.pop(record.user_id, None)  # one session per simulated user
        else:
            self.states[record.user_id] = state
        self.pending += out
        if len(self.pending) >= self.learn_chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        started = time.perf_counter()
        metrics = self.agent.learn_many(self.pending)
        self.learn_s += time.perf_counter() - started
        self.transitions += len(self.pending)
        self.pending = []
        if metrics:
            self.last_metrics = metrics


@dataclass(frozen=True)
class TrainReport:
    run: RunReport
    transitions: int
    learn_s: float
    last_metrics: dict[str, float]


def train(world: World, agent, episodes: int, seed: int, learn_chunk: int = 32,
          users_in_parallel: int = 16) -> TrainReport:
    """Serve ``episodes`` sessions with the agent's live, exploring policy while it learns."""
    sink = LearningSink(agent, learn_chunk)
    policy = agent.policy()
    run = run_episodes(world, policy, episodes, seed=seed, sink=sink,
                       users_in_parallel=users_in_parallel, run_tag=f"train{seed}")
    sink.flush()
    return TrainReport(run, sink.transitions, sink.learn_s, sink.last_metrics)


def evaluate(world: World, policy, episodes: int, seed: int,
             users_in_parallel: int = 64) -> RunReport:
    """Learning off and exploration off (where the policy has an ``explore`` switch)."""
    explore = getattr(policy, "explore", None)
    if explore is not None:
        policy.explore = False
    try:
        return run_episodes(world, policy, episodes, seed=seed,
                            users_in_parallel=users_in_parallel, run_tag=f"eval{seed}")
    finally:
        if explore is not None:
            policy.explore = explore
