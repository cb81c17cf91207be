"""The whole loop in one process, without Kafka: for fast experiments, tests and benchmarks.

    world = interest_evolution()
    agent = registry.make_agent("slateq", spec_for(world), seed=0)
    trained = train(world, agent, episodes=300, seed=1)      # learning on
    report = evaluate(world, agent.policy(), episodes=300, seed=2)  # learning off, no exploration
    paired = evaluate_paired(world, {"slateq": agent.policy(), "random": RandomPolicy(3)},
                             episodes=300, seed=2)
    paired.difference("slateq", "random")    # mean ± 95% CI of the per-episode difference

``train`` runs the product's own services on the in-memory bus (``recloop.core.membus``),
round-robin in one thread: ``SimService`` (its world's catalogue on items + catalogue,
requests out, slates in, feedback out), ``FoldStep`` (the streams fold: transitions and
session.state), ``LearnerService`` (follows the catalogue into its agent, ``learn_many`` on
chunks of at most ``learn_chunk``, snapshots announced on policy.snapshots) and
``ServeService`` (follows the catalogue and indexes it, ``SlateServer``: traffic split,
fallback, exploration). As in the deployed loop the simulator publishes the catalogue first
and the other services read it off the bus; nothing hands them the world. Only the
snapshot store differs: an announcement installs the agent's *live*
policy, the object that keeps learning, so serving answers with what it has learned so far;
the learner announces version 1 before the first request, so no slate of training comes
from the fallback unless a test asks for one (``serve_from_start=False``).

``evaluate`` and ``evaluate_paired`` (learning off) drive ``producer_sim.runner`` with the
policy directly: common random numbers need one simulation per episode, which the runner
gives exactly.

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
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from recloop.core.events import (
    EpisodeOutcome,
    PolicyPublished,
)
from recloop.core.membus import MemoryBus
from recloop.core.settings import Settings
from recloop.core.spec import WorldSpec
from recloop.producer_sim.runner import Estimate, RunReport, run_episodes
from recloop.producer_sim.world import World
from recloop.services.fold_step import FoldStep
from recloop.services.learn import LearnConfig, LearnerService
from recloop.services.serve import ServeOptions, ServeService
from recloop.services.sim import SimConfig, SimService
from recloop.serving.host import PolicyHost, StaleVersionError
from recloop.serving.server import ServeConfig
from recloop.serving.snapshots import InstallResult
from recloop.serving.split import TrafficSplit


def spec_for(world: World, history_len: int = 5) -> WorldSpec:
    """The world's spec with the learner's history length H."""
    return dataclasses.replace(world.spec, history_len=history_len)


@dataclass(frozen=True)
class TrainReport:
    run: RunReport
    transitions: int
    learn_s: float
    last_metrics: dict[str, float]


class LiveInstaller:
    """Installs an announced version of a policy as the live object in ``policies``."""

    def __init__(self, host: PolicyHost, policies: Mapping[str, object]) -> None:
        self.host, self.policies = host, dict(policies)
        self.counts: Counter[str] = Counter()
        self.last_refusal = ""

    def install(self, published: PolicyPublished) -> InstallResult:
        name, version = published.policy, published.version
        if name not in self.policies or not self.host.hosts(name):
            result = InstallResult("ignored", name, version, "not a policy this loop serves")
        else:
            try:
                self.host.swap(name, version, self.policies[name],  # type: ignore[arg-type]
                               algorithm=published.algorithm)  # fmt: skip
                result = InstallResult("swapped", name, version)
            except StaleVersionError as exc:
                result = InstallResult("stale", name, version, str(exc))
        self.counts[result.status] += 1
        return result


class LiveSnapshots:
    """The learner's snapshot store in process: announcements only, nothing written."""

    def latest(self, policy: str) -> None:
        return None

    def write(self, policy: str, version: int, agent, ids: list[str],
              manifest: dict) -> PolicyPublished:  # fmt: skip
        return PolicyPublished(
            policy=policy, algorithm=manifest["algorithm"], version=version, path="",
            weights_sha256="", manifest_sha256="", created_ts=time.time(),
            transitions_applied=manifest["transitions_applied"], metrics=manifest["metrics"],
        )  # fmt: skip


@dataclass
class Loop:
    """The four services of one in-process run on one ``MemoryBus``."""

    bus: MemoryBus
    sim: SimService
    streams: FoldStep
    learners: list[LearnerService]
    serve: ServeService
    learn_s: float = 0.0

    def round(self) -> bool:
        """One round of every service; False once the simulator is done."""
        going = self.sim.step()
        self.streams.step()
        for learner in self.learners:
            started = time.perf_counter()
            learner.step(timeout=0.0)
            self.learn_s += time.perf_counter() - started
        self.serve.step()
        return going

    def run(self) -> None:
        """Rounds until the simulator is done, then until the last transitions are learned."""
        while self.round():
            pass
        while self.streams.step():
            pass
        for learner in self.learners:
            while learner.step(timeout=0.0):
                pass

    def report(self, world: World, policy_name: str, started: float) -> RunReport:
        return report_of(world.name, policy_name, self.sim.stats.kept_outcomes,
                         time.perf_counter() - started)  # fmt: skip


def report_of(world: str, policy: str, outcomes: list[EpisodeOutcome], wall_s: float) -> RunReport:
    """A RunReport from the simulator's ground-truth outcomes, in the order they finished."""
    return RunReport(
        world=world, policy=policy,
        return_E=np.array([o.total_return for o in outcomes], dtype=np.float64),
        steps_E=np.array([o.steps for o in outcomes], dtype=np.int64),
        clicks_E=np.array([o.clicks for o in outcomes], dtype=np.int64),
        clicked_quality_E=np.array([o.clicked_quality_sum for o in outcomes], dtype=np.float64),
        wall_s=wall_s,
    )  # fmt: skip


def build_loop(world: World, agents: Mapping[str, object], episodes: int, seed: int, *,
               split: TrafficSplit | None = None, fallback: str = "uniform",
               epsilon: float = 0.0, learn_chunk: int = 32, users_in_parallel: int = 16,
               snapshot_every: int = 500, run_tag: str | None = None,
               serve_from_start: bool = True, index_kind: str = "auto") -> Loop:  # fmt: skip
    """The services of ``recloop`` wired on a fresh ``MemoryBus``.

    ``agents`` maps policy names to agents (each learns from every transition, as one learner
    process per policy does); ``split`` defaults to all traffic on the first one. With
    ``serve_from_start`` each learner announces version 1 before the first request.
    ``index_kind`` is serving's faiss index of the catalogue (``flat``: exact, and no
    minutes-long HNSW build for a million items in a benchmark).
    """
    settings = Settings()
    bus = MemoryBus(settings.partitions)
    split = split or TrafficSplit(((next(iter(agents)), 1.0),))
    config = SimConfig(users=min(users_in_parallel, episodes), seed=seed, max_sessions=episodes,
                       slate_timeout_s=0.0, run_tag=run_tag or f"train{seed}",
                       keep_outcomes=True)  # fmt: skip
    sim = SimService(settings, config, bus=bus, world=world)
    sim.start()  # the catalogue on the bus, then the first requests
    serve_config = ServeConfig(split=split, fallback=fallback, epsilon=epsilon, seed=seed)
    policies = {name: agent.policy() for name, agent in agents.items()}  # type: ignore[attr-defined]
    host = PolicyHost(serve_config.learned_policies)
    options = ServeOptions(batch_size=10**6, index_kind=index_kind)
    serve = ServeService(settings, serve_config, bus=bus, options=options,
                         installer=LiveInstaller(host, policies), host=host)  # fmt: skip
    learners = []
    for name, agent in agents.items():
        algo = type(agent).__module__.rsplit(".", 1)[-1]
        learn_config = LearnConfig(algo=algo, policy=name, seed=seed, poll_max=learn_chunk,
                                   poll_timeout_s=0.0, snapshot_every_transitions=snapshot_every,
                                   snapshot_every_s=float("inf"))  # fmt: skip
        learner = LearnerService(settings, learn_config, spec_for(world), bus=bus,
                                 snapshots=LiveSnapshots(), agent=agent)  # fmt: skip
        if serve_from_start:
            learner.publish()
        learners.append(learner)
    return Loop(bus, sim, FoldStep(settings, bus), learners, serve)


def train(world: World, agent, episodes: int, seed: int, learn_chunk: int = 32,
          users_in_parallel: int = 16, index_kind: str = "auto") -> TrainReport:
    """Serve ``episodes`` sessions with the agent's live, exploring policy while it learns,
    through the product's services on the in-memory bus (see the module docstring)."""
    started = time.perf_counter()
    name = agent.policy().name
    loop = build_loop(world, {name: agent}, episodes, seed, learn_chunk=learn_chunk,
                      users_in_parallel=users_in_parallel, index_kind=index_kind)  # fmt: skip
    loop.run()
    learner = loop.learners[0]
    return TrainReport(loop.report(world, name, started), learner.progress.transitions_applied,
                       loop.learn_s, learner.metrics)  # fmt: skip


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


def evaluate_paired(world: World, policies: Mapping[str, Any], episodes: int,
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
