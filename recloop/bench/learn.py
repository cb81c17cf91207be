"""``recloop bench learn``: what each algorithm learns, and how fast it updates.

For each algorithm, in one process (``recloop.inprocess``): train online on the world for
``train_episodes`` sessions, then evaluate ``eval_episodes`` sessions with learning and
exploration off, next to uniform random and the myopic oracle. The table follows the SlateQ
paper's: policy, average return, average clicked quality, CTR (each mean ± 95% CI).

Evaluation uses common random numbers (``evaluate_paired``): evaluation episode e is the same
user, candidate sets and click draws for every policy, so after the per-algorithm tables a
paired table gives each algorithm's per-episode difference in return against random and the
myopic oracle (and SARSA-TS against MYOP-TS), mean ± 95% CI.

Throughput, measured on the same transitions for every algorithm (a random policy's traffic
folded by the streams fold), in samples per second of gradient work:

- ``learn_many``: the full path, raw ``Transition`` records in (replay, events-to-tensors,
  the algorithm's own schedule); samples = updates × batch size;
- ``bare``: a bare torch loop of the same networks and loss, ``agent.update`` on one
  pre-built tensor batch over and over (no records, no replay, no conversion).

``ratio`` = learn_many / bare: the fraction of raw torch speed the product path keeps. Also
reported: ``ingest_tps``, raw transitions consumed per second by ``learn_many``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

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
from recloop.inprocess import PairedReport, evaluate_paired, spec_for, train
from recloop.learner import registry
from recloop.learner.batch import to_batch
from recloop.producer_sim.policies import MyopicOraclePolicy, RandomPolicy
from recloop.producer_sim.presets import make_world
from recloop.producer_sim.runner import RunReport, run_episodes
from recloop.streams import fold

PRESET_OVERRIDES = {
    # The world's choice model is known in the SlateQ paper's experiments.
    ("interest_evolution", "slateq"): {"choice_model": "proportional", "update_every": 4},
    ("interest_evolution", "slateq_myopic"): {"choice_model": "proportional", "update_every": 4},
}


@dataclass(frozen=True)
class BenchConfig:
    world: str = "interest_evolution"
    algorithms: tuple[str, ...] = ()
    """Empty: every registered algorithm."""
    train_episodes: int = 100
    eval_episodes: int = 200
    seed: int = 0
    throughput_seconds: float = 3.0
    """Wall time budget of each throughput measurement."""


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
               budget_s: float) -> dict[str, float]:
    agent = registry.make_agent(name, spec, seed=0, **overrides)
    bs = getattr(agent.config, "batch_size", 64)
    batch = to_batch(transitions[:bs], spec)

    def bare() -> int:
        agent.update(batch)
        return bs

    bare_sps = _timed(bare, budget_s)
    agent = registry.make_agent(name, spec, seed=0, **overrides)
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


def run(config: BenchConfig, echo: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(1)
    world = make_world(config.world, seed=config.seed)
    spec = spec_for(world)
    names = list(config.algorithms) or registry.names()
    eval_seed = config.seed + 1000
    baselines = evaluate_paired(
        world, {"random": RandomPolicy(seed=config.seed), "myopic_oracle": MyopicOraclePolicy(world)},
        config.eval_episodes, eval_seed).reports
    transitions = _collect_transitions(world, 2000, config.seed)
    results: dict[str, dict] = {}
    reports: dict[str, RunReport] = dict(baselines)
    for name in names:
        overrides = PRESET_OVERRIDES.get((config.world, name), {})
        agent = registry.make_agent(name, spec, seed=config.seed, **overrides)
        trained = train(world, agent, config.train_episodes, seed=config.seed + 1)
        # The same evaluation seed gives the same users as the baselines': paired.
        report = evaluate_paired(world, {name: agent.policy()}, config.eval_episodes,
                                 eval_seed).reports[name]
        tp = throughput(name, spec, transitions, overrides, config.throughput_seconds)
        results[name] = {"eval": _row(report), "train": _row(trained.run),
                         "transitions": trained.transitions, **tp}
        reports[name] = report
        echo(_table(name, report, baselines, tp, config))
    paired = PairedReport(reports, eval_seed)
    pairs = _pairs(names)
    echo(f"\npaired comparison on {config.world}: the same {config.eval_episodes} evaluation "
         f"users for every policy\n{paired.table(pairs)}")
    differences = {}
    for a, b in pairs:
        d = paired.difference(a, b)
        differences[f"{a} - {b}"] = {"mean": round(d.mean, 4), "ci95": round(d.ci95, 4)}
    figures = {"bench": "learn", "world": config.world, "train_episodes": config.train_episodes,
               "eval_episodes": config.eval_episodes, "seed": config.seed,
               "baselines": {k: _row(v) for k, v in baselines.items()}, "algorithms": results,
               "paired_differences": differences}
    echo(json.dumps(figures, sort_keys=True))
    return figures


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    """Each algorithm against both baselines, and SARSA-TS against MYOP-TS when both ran."""
    pairs = [(n, b) for n in names for b in ("random", "myopic_oracle")]
    if "slateq" in names and "slateq_myopic" in names:
        pairs.insert(0, ("slateq", "slateq_myopic"))
    return pairs


def _table(name: str, report: RunReport, baselines: dict[str, RunReport], tp: dict,
           config: BenchConfig) -> str:
    lines = [f"\n{name} on {config.world}: {config.train_episodes} training episodes, "
             f"{config.eval_episodes} evaluation episodes (mean ± 95% CI)",
             f"  {'policy':<16}{'avg return':>20}{'avg clicked quality':>24}{'CTR':>18}"]
    for label, r in [(name, report), *baselines.items()]:
        lines.append(f"  {label:<16}{str(r.mean_return):>20}{str(r.clicked_quality):>24}"
                     f"{str(r.ctr):>18}")
    lines.append(f"  update throughput: learn_many {tp['learn_many_sps']:.0f} samples/s, bare torch "
                 f"loop {tp['bare_sps']:.0f} samples/s, ratio {tp['ratio']:.2f}; "
                 f"ingest {tp['ingest_tps']:.0f} transitions/s")
    return "\n".join(lines)
