"""``recloop bench learn``: what each algorithm learns, and how fast it updates.

For each algorithm, in one process (``recloop.inprocess``, the product's services on the
memory bus, the catalogue published by the simulator): train online on the world for
``train_episodes`` sessions, once per training seed, then evaluate ``eval_episodes``
sessions with learning and exploration off, next to three baselines:

- ``random``: uniform over the candidates (over the whole catalogue where a request names
  none);
- ``popularity``: the items clicked most in ``train_episodes`` sessions of uniformly random
  traffic under the same training seed (the data budget each algorithm gets, with no model
  of the user), ties broken by a fixed random order;
- ``myopic_oracle``: the top-k by true click probability (it reads the world's truth).

The table follows the SlateQ paper's: policy, average return, average clicked quality, CTR
(each mean ± 95% CI). Evaluation uses common random numbers (``evaluate_paired``): episode e
is the same user, candidate sets and click draws for every policy and every training seed,
so the paired table gives each algorithm's per-episode difference in return against each
baseline (and SARSA-TS against MYOP-TS), mean ± 95% CI. With several training seeds a
policy's episode-e return is its mean over the seeds (popularity's too: it is trained per
seed), the interval is over the evaluation users, and each seed's own mean difference is
listed beside it: the interval says how sure the mean over these seeds is, the per-seed
figures whether every seed agrees.

``world="large_catalogue"`` has no candidate list and ``n_items`` sets its size (100,000 by
default; the 1M variant is ``n_items=1_000_000``). Requests name no candidates, so a learned
policy is evaluated as serving runs it (``Retrieved``): the top 100 of the catalogue by the
user's observation, then the policy's ranking of those, which is also where its training
traffic came from (serving's index is exact here, ``flat``, as ``Retrieved`` is; serving
reaches recall >= 0.95 of it with HNSW above 250k items). The baselines rank the whole catalogue, and a fourth one,
``retrieved_random`` (uniform over the same 100), shows what retrieval alone gives: an
algorithm's difference against it is what its own ranking adds. ``as_served=False`` instead
lets each learned policy rank the whole catalogue alone.

Throughput, measured on the same transitions for every algorithm (a random policy's traffic
folded by the streams fold), in samples per second of gradient work:

- ``learn_many``: the full path, raw ``Transition`` records in (replay, events-to-tensors,
  the algorithm's own schedule); samples = updates × batch size;
- ``bare``: a bare torch loop of the same networks and loss, ``agent.update`` on one
  pre-built tensor batch over and over (no records, no replay, no conversion).

``ratio`` = learn_many / bare: the fraction of raw torch speed the product path keeps. Also
reported: ``ingest_tps``, raw transitions consumed per second by ``learn_many``
(``throughput_seconds=0`` skips them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recloop.core.events import (
    Click,
    Impression,
    Record,
    SessionEnd,
    SessionState,
    SlateServed,
    Transition,
)
from recloop.core.ports import Candidates, Observation, Slate
from recloop.inprocess import PairedReport, evaluate_paired, spec_for, train
from recloop.learner import registry
from recloop.learner.batch import to_batch
from recloop.producer_sim.policies import MyopicOraclePolicy, RandomPolicy
from recloop.producer_sim.presets import make_world
from recloop.producer_sim.runner import Estimate, RunReport, run_episodes
from recloop.producer_sim.world import World
from recloop.streams import fold

PRESET_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    # The world's choice model is known in the SlateQ paper's experiments.
    ("interest_evolution", "slateq"): {"choice_model": "proportional", "update_every": 4},
    ("interest_evolution", "slateq_myopic"): {"choice_model": "proportional", "update_every": 4},
    # One update per 4 transitions, MF's and REINFORCE's default, for the rest too: an update
    # ranks over 100k-1M items (Wolpertinger's k-NN, DRR's and SlateQ's next-slate argmax),
    # and the whole table must fit a shared 2-core machine.
    **{("large_catalogue", name): {"update_every": 4}
       for name in ("wolpertinger", "drr", "slateq", "slateq_myopic")},
}
BASELINES = ("random", "popularity", "myopic_oracle")
RETRIEVED_RANDOM = "retrieved_random"
"""Uniform over serving's retrieved candidates: what retrieval alone gives, without a catalogue
list (a learned policy's gain over it is what its ranking learned)."""


@dataclass(frozen=True)
class BenchConfig:
    world: str = "interest_evolution"
    n_items: int = 0
    """Catalogue size for presets that take one (0: the preset's own)."""
    algorithms: tuple[str, ...] = ()
    """Empty: every registered algorithm."""
    train_episodes: int = 100
    eval_episodes: int = 200
    seed: int = 0
    train_seeds: int = 1
    """Training seeds per algorithm: ``seed``, ``seed + 1``, ..."""
    throughput_seconds: float = 3.0
    """Wall time budget of each throughput measurement (0: none measured)."""
    as_served: bool = True
    """Without a candidate list: evaluate a learned policy behind serving's retrieval
    (``Retrieved``); False ranks the whole catalogue with the policy alone."""


class PopularityBaseline:
    """Top-k of the candidates by click count; a fixed random order breaks ties."""

    version = 0

    def __init__(self, counts_N: np.ndarray, seed: int, name: str = "popularity") -> None:
        self.name = name
        tie_N = np.random.default_rng(seed).random(counts_N.shape[0]) * 0.5
        self._score_N = counts_N.astype(np.float64) + tie_N
        self._top: np.ndarray | None = None

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        del observation
        if len(candidates) == self._score_N.shape[0]:  # the whole catalogue: one ranking
            if self._top is None or self._top.shape[0] < k:
                self._top = np.argsort(-self._score_N, kind="stable")[:k]
            items_K = candidates.ids[self._top[:k]]
        else:
            score_C = self._score_N[candidates.ids]
            items_K = candidates.ids[np.argsort(-score_C, kind="stable")[:k]]
        return Slate(items=items_K.astype(np.int64), scores=self._score_N[items_K],
                     propensities=np.ones(k))  # fmt: skip


class Retrieved:
    """``policy`` as serving runs it on a request without candidates: the top ``m`` items of
    the catalogue by inner product with the user's observation (serving's retrieval for a
    policy with no index of its own; exact here, serving's index reaches recall >= 0.95 of
    it), then the policy ranks those. Candidate lists are passed through untouched."""

    def __init__(self, policy: Any, features_NF: np.ndarray, m: int = 100,
                 name: str | None = None) -> None:  # fmt: skip
        self.policy, self.features_NF, self.m = policy, features_NF, m
        self.name = name or policy.name
        self.version = int(getattr(policy, "version", 0))

    @property
    def explore(self) -> Any:
        return getattr(self.policy, "explore", None)

    @explore.setter
    def explore(self, value: Any) -> None:
        if hasattr(self.policy, "explore"):
            self.policy.explore = value

    def recommend(self, observation: Observation, candidates: Candidates, k: int) -> Slate:
        if len(candidates) != self.features_NF.shape[0]:
            return self.policy.recommend(observation, candidates, k)
        affinity_N = self.features_NF @ observation.user_obs.astype(np.float32)
        ids_M = np.argpartition(-affinity_N, self.m - 1)[: self.m].astype(np.int64)
        sub = Candidates(ids=ids_M, features_NF=self.features_NF[ids_M])
        return self.policy.recommend(observation, sub, k)


def popularity(world: World, episodes: int, seed: int) -> PopularityBaseline:
    """Click counts of ``episodes`` sessions of uniformly random traffic seeded ``seed``."""
    counts_N = np.zeros(world.catalogue.n_items, np.int64)

    def sink(record: Record) -> None:
        if isinstance(record, Click):
            counts_N[record.item] += 1

    run_episodes(world, RandomPolicy(seed=seed), episodes, seed=seed, sink=sink,
                 run_tag=f"popularity{seed}")  # fmt: skip
    return PopularityBaseline(counts_N, seed)


def pooled(reports: list[RunReport]) -> RunReport:
    """One report of several training seeds' evaluations on the same users: episode e's
    return is the seeds' mean; its steps, clicks and clicked quality their sums (so CTR and
    clicked quality per click are the seeds' pooled ratios)."""
    first = reports[0]
    return RunReport(
        world=first.world, policy=first.policy,
        return_E=np.mean([r.return_E for r in reports], axis=0),
        steps_E=np.sum([r.steps_E for r in reports], axis=0),
        clicks_E=np.sum([r.clicks_E for r in reports], axis=0),
        clicked_quality_E=np.sum([r.clicked_quality_E for r in reports], axis=0),
        wall_s=float(sum(r.wall_s for r in reports)),
    )  # fmt: skip


def _row(report: RunReport) -> dict[str, float]:
    return {k: round(v, 4) for k, v in report.summary().items()}


def _collect_transitions(world, n: int, seed: int) -> list[Transition]:
    """The first ``n`` transitions the streams fold makes of a random policy's sessions."""
    states: dict[str, SessionState] = {}
    out: list[Transition] = []

    def sink(record: Record) -> None:
        if not isinstance(record, SlateServed | Impression | Click | SessionEnd):
            return  # requests and ground-truth outcomes are not learning inputs
        state, transitions = fold.apply(states.get(record.user_id), record)
        if state.ended:
            states.pop(record.user_id, None)  # one session per simulated user
        else:
            states[record.user_id] = state
        out.extend(transitions)

    # Few users at a time, so sessions end (and REINFORCE, which waits for them, learns).
    run_episodes(world, RandomPolicy(seed=seed), episodes=max(4, n // 20), seed=seed, sink=sink,
                 users_in_parallel=4)
    return out[:n]


def _timed(fn: Callable[[], int], budget_s: float) -> float:
    """Calls ``fn`` (returning samples done) until ``budget_s`` elapses; samples per second."""
    fn()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        done += fn()
    return done / (time.perf_counter() - started)


def throughput(name: str, spec, transitions: list[Transition], overrides: dict,
               budget_s: float, catalogue) -> dict[str, float]:  # fmt: skip
    agent = registry.make_agent(name, spec, seed=0, catalogue=catalogue, **overrides)
    bs = getattr(agent.config, "batch_size", 64)
    batch = to_batch(transitions[:bs], spec, catalogue)

    def bare() -> int:
        agent.update(batch)
        return bs

    bare_sps = _timed(bare, budget_s)
    agent = registry.make_agent(name, spec, seed=0, catalogue=catalogue, **overrides)
    agent.learn_many(transitions[:256])  # fill the replay past learning_starts
    chunk, pos = 64, [256]
    consumed = [0]

    def path() -> int:
        start = pos[0] % (len(transitions) - chunk)
        before = agent.updates
        agent.learn_many(transitions[start:start + chunk])
        pos[0] += chunk
        consumed[0] += chunk
        return (agent.updates - before) * bs

    started = time.perf_counter()
    path_sps = _timed(path, budget_s)
    ingest = consumed[0] / (time.perf_counter() - started)
    return {"bare_sps": round(bare_sps, 1), "learn_many_sps": round(path_sps, 1),
            "ratio": round(path_sps / bare_sps, 3), "ingest_tps": round(ingest, 1)}


def bench_world(config: BenchConfig) -> World:
    """The preset, at ``config.n_items`` items where it takes a size."""
    options = {"n_items": config.n_items} if config.n_items else {}
    return make_world(config.world, seed=config.seed, **options)


def run(config: BenchConfig, echo: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(1)
    world = bench_world(config)
    spec, catalogue = spec_for(world), world.item_catalogue
    names = list(config.algorithms) or registry.names()
    seeds = [config.seed + s for s in range(config.train_seeds)]
    eval_seed, episodes = config.seed + 1000, config.eval_episodes
    echo(_heading(config, world, seeds))
    whole = world.num_candidates == 0 and config.as_served
    features_NF = catalogue.features_NF

    def as_served(policy: Any, name: str | None = None) -> Any:
        return Retrieved(policy, features_NF, name=name) if whole else policy

    fixed_policies = {"random": RandomPolicy(seed=config.seed),
                      "myopic_oracle": MyopicOraclePolicy(world)}  # fmt: skip
    if whole:
        fixed_policies[RETRIEVED_RANDOM] = as_served(RandomPolicy(seed=config.seed),
                                                     RETRIEVED_RANDOM)  # fmt: skip
    baselines = (*BASELINES, RETRIEVED_RANDOM) if whole else BASELINES
    fixed = evaluate_paired(world, fixed_policies, episodes, eval_seed).reports
    per_seed: dict[str, list[RunReport]] = {name: [r] for name, r in fixed.items()}
    per_seed["popularity"] = [
        evaluate_paired(world, {"popularity": popularity(world, config.train_episodes, s + 1)},
                        episodes, eval_seed).reports["popularity"]
        for s in seeds
    ]  # fmt: skip
    transitions = _collect_transitions(world, 2000, config.seed) if config.throughput_seconds else []
    results: dict[str, dict] = {}
    for name in names:
        overrides = PRESET_OVERRIDES.get((config.world, name), {})
        per_seed[name], trains = [], []
        for s in seeds:
            agent = registry.make_agent(name, spec, seed=s, **overrides)
            trained = train(world, agent, config.train_episodes, seed=s + 1, index_kind="flat")
            # The same evaluation seed gives the same users as the baselines': paired.
            served = as_served(agent.policy())
            per_seed[name].append(evaluate_paired(world, {name: served}, episodes,
                                                  eval_seed).reports[name])  # fmt: skip
            trains.append(trained)
        tp = (throughput(name, spec, transitions, overrides, config.throughput_seconds, catalogue)
              if config.throughput_seconds else {})  # fmt: skip
        results[name] = {"eval": _row(pooled(per_seed[name])),
                         "train": [_row(t.run) for t in trains],
                         "transitions": [t.transitions for t in trains], **tp}  # fmt: skip
        echo(_table(name, per_seed, tp, baselines))
    reports = {name: pooled(r) for name, r in per_seed.items()}
    paired = PairedReport(reports, eval_seed)
    pairs = _pairs(names, baselines)
    echo(f"\npaired comparison on {config.world}: the same {episodes} evaluation users for "
         f"every policy; a policy's return per user is its mean over {len(seeds)} training "
         f"seed(s)\n{_paired_table(paired, per_seed, pairs)}")
    differences = {}
    for a, b in pairs:
        d = paired.difference(a, b)
        differences[f"{a} - {b}"] = {"mean": round(d.mean, 4), "ci95": round(d.ci95, 4),
                                     "per_seed": [round(x, 4) for x in _per_seed(per_seed, a, b)],
                                     "ci_above_zero": bool(d.mean - d.ci95 > 0)}  # fmt: skip
    figures = {"bench": "learn", "world": config.world, "n_items": world.catalogue.n_items,
               "num_candidates": world.num_candidates, "train_episodes": config.train_episodes,
               "eval_episodes": episodes, "seed": config.seed, "train_seeds": seeds,
               "baselines": {k: _row(reports[k]) for k in baselines}, "algorithms": results,
               "paired_differences": differences}  # fmt: skip
    echo(json.dumps(figures, sort_keys=True))
    return figures


def _per_seed(per_seed: Mapping[str, list[RunReport]], a: str, b: str) -> list[float]:
    """Each training seed's mean difference a - b (a baseline with one report: that one)."""
    out = []
    for i, ra in enumerate(per_seed[a]):
        rb = per_seed[b][i] if len(per_seed[b]) > 1 else per_seed[b][0]
        out.append(float(np.mean(ra.return_E - rb.return_E)))
    return out


def _pairs(names: list[str], baselines: tuple[str, ...]) -> list[tuple[str, str]]:
    """Each algorithm against every baseline, and SARSA-TS against MYOP-TS when both ran."""
    pairs = [(n, b) for n in names for b in baselines]
    if "slateq" in names and "slateq_myopic" in names:
        pairs.insert(0, ("slateq", "slateq_myopic"))
    return pairs


def _heading(config: BenchConfig, world: World, seeds: list[int]) -> str:
    where = (f"{world.num_candidates} candidates per request" if world.num_candidates
             else "no candidate list: the whole catalogue")  # fmt: skip
    return (f"bench learn on {config.world}: {world.catalogue.n_items:,} items, {where}; "
            f"{config.train_episodes} training sessions x {len(seeds)} seed(s) {seeds}, "
            f"{config.eval_episodes} evaluation users")


def _table(name: str, per_seed: Mapping[str, list[RunReport]], tp: dict,
           baselines: tuple[str, ...]) -> str:  # fmt: skip
    lines = [f"\n{name}: evaluation (mean ± 95% CI; over training seeds, the mean per user)",
             f"  {'policy':<16}{'avg return':>20}{'avg clicked quality':>24}{'CTR':>18}"
             f"{'return per seed':>28}"]  # fmt: skip
    for label in (name, *baselines):
        r = pooled(per_seed[label])
        seeds = ", ".join(f"{x.mean_return.mean:.2f}" for x in per_seed[label])
        lines.append(f"  {label:<16}{str(r.mean_return):>20}{str(r.clicked_quality):>24}"
                     f"{str(r.ctr):>18}{seeds:>28}")
    if tp:
        lines.append(f"  update throughput: learn_many {tp['learn_many_sps']:.0f} samples/s, bare "
                     f"torch loop {tp['bare_sps']:.0f} samples/s, ratio {tp['ratio']:.2f}; "
                     f"ingest {tp['ingest_tps']:.0f} transitions/s")
    return "\n".join(lines)


def _paired_table(paired: PairedReport, per_seed: Mapping[str, list[RunReport]],
                  pairs: list[tuple[str, str]]) -> str:  # fmt: skip
    lines = [f"  {'difference':<32}{'mean ± 95% CI':>20}{'CI > 0':>8}   per-seed means"]
    for a, b in pairs:
        d: Estimate = paired.difference(a, b)
        seeds = ", ".join(f"{x:+.2f}" for x in _per_seed(per_seed, a, b))
        above = "yes" if d.mean - d.ci95 > 0 else "no"
        lines.append(f"  {a + ' - ' + b:<32}{str(d):>20}{above:>8}   {seeds}")
    return "\n".join(lines)
