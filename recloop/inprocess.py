"""The whole loop in one process, without Kafka: for fast experiments, tests and benchmarks.

    world = interest_evolution()
    agent = registry.make_agent("slateq", spec_for(world), seed=0)
    trained = train(world, agent, episodes=300, seed=1)      # learning on
    report = evaluate(world, agent.policy(), episodes=300, seed=2)  # learning off, no exploration
    paired = evaluate_paired(world, {"slateq": agent.policy(), "random": RandomPolicy(3)},
                             episodes=300, seed=2)
    paired.difference("slateq", "random")    # mean ± 95% CI of the per-episode difference

The same pure cores as the product path, wired directly instead of through topics:
producer_sim's runner emits the wire events (RecRequest, SlateServed, Impression, Click,
SessionEnd, EpisodeOutcome) to a sink; slates and feedback go through the streams fold
``apply(state, event) -> (state, transitions)``; transitions go to ``agent.learn_many`` in
chunks of ``learn_chunk`` (as the Kafka learner consumes in batches); and the agent's live
policy answers the runner's next requests, so it serves what it has learned so far.

``evaluate_paired`` compares policies with common random numbers: evaluation episode e runs
in its own simulation seeded by (seed, e) for every policy, so each policy meets the same
user, the same candidate sets and the same click draws until its choices change the
trajectory. The per-episode differences then cancel the user-to-user spread that dominates
an episode's return, and their confidence interval is far tighter than comparing two
independent intervals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from recloop.core.events import Click, Impression, Record, SessionEnd, SessionState, SlateServed
from recloop.learner.spec import WorldSpec
from recloop.producer_sim.runner import Estimate, RunReport, run_episodes
from recloop.producer_sim.world import World
from recloop.streams import fold


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
    with without_exploration(policy):
        return run_episodes(world, policy, episodes, seed=seed,
                            users_in_parallel=users_in_parallel, run_tag=f"eval{seed}")


def episode_seed(seed: int, episode: int) -> int:
    """The simulation seed of evaluation episode ``episode`` of an evaluation seeded ``seed``."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


@contextlib.contextmanager
def without_exploration(policy) -> Iterator[None]:
    """The policy's ``explore`` switch (where it has one) off inside, restored after."""
    explore = getattr(policy, "explore", None)
    if explore is not None:
        policy.explore = False
    try:
        yield
    finally:
        if explore is not None:
            policy.explore = explore


def _concat(reports: list[RunReport]) -> RunReport:
    first = reports[0]
    return RunReport(
        world=first.world, policy=first.policy,
        return_E=np.concatenate([r.return_E for r in reports]),
        steps_E=np.concatenate([r.steps_E for r in reports]),
        clicks_E=np.concatenate([r.clicks_E for r in reports]),
        clicked_quality_E=np.concatenate([r.clicked_quality_E for r in reports]),
        wall_s=float(sum(r.wall_s for r in reports)),
    )


@dataclass(frozen=True)
class PairedReport:
    """Per-policy evaluation reports whose episode e is the same user for every policy."""

    reports: dict[str, RunReport]
    seed: int

    @property
    def episodes(self) -> int:
        return next(iter(self.reports.values())).episodes

    def mean_return(self, name: str) -> Estimate:
        return self.reports[name].mean_return

    def difference(self, a: str, b: str) -> Estimate:
        """Mean and 95% CI of return(a) - return(b), paired by episode."""
        return Estimate.of(self.reports[a].return_E - self.reports[b].return_E)

    def table(self, baseline_pairs: list[tuple[str, str]] | None = None) -> str:
        """Each policy's return, and each requested paired difference (default: all pairs)."""
        names = list(self.reports)
        pairs = baseline_pairs if baseline_pairs is not None else [
            (a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        lines = [f"  {'policy':<28}{'avg return':>20}{'CTR':>18}{'clicked quality':>20}"]
        for name, r in self.reports.items():
            lines.append(f"  {name:<28}{str(r.mean_return):>20}{str(r.ctr):>18}"
                         f"{str(r.clicked_quality):>20}")
        lines.append(f"  paired differences over the same {self.episodes} users "
                     f"(mean ± 95% CI):")
        for a, b in pairs:
            lines.append(f"  {a + ' - ' + b:<28}{str(self.difference(a, b)):>20}")
        return "\n".join(lines)


def evaluate_paired(world: World, policies: Mapping[str, object], episodes: int,
                    seed: int) -> PairedReport:
    """Evaluate every policy on the same ``episodes`` users with common random numbers.

    Episode e of every policy is a one-user run seeded ``episode_seed(seed, e)``: the user's
    interests, the candidate set of each step and the uniform draw behind each click are the
    same for every policy at the same step. Learning and exploration are off. Returns are
    aligned by episode, so ``difference`` is a paired comparison.
    """
    if episodes < 1 or not policies:
        raise ValueError("evaluate_paired needs at least one policy and one episode")
    seeds = [episode_seed(seed, e) for e in range(episodes)]
    reports: dict[str, RunReport] = {}
    for name, policy in policies.items():
        with without_exploration(policy):
            runs = [run_episodes(world, policy, 1, seed=s, users_in_parallel=1,
                                 run_tag=f"eval{seed}-{e}") for e, s in enumerate(seeds)]
        reports[name] = dataclasses.replace(_concat(runs), policy=name)
    return PairedReport(reports, seed)
