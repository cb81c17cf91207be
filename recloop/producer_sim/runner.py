"""Drive a world with any slate policy in one process, without Kafka.

    report = run_episodes(interest_evolution(), RandomPolicy(seed=1), episodes=500, seed=0)
    print(report)            # return, CTR and clicked quality, with 95% CIs

Users are stepped ``users_in_parallel`` at a time: the policy is asked once per user (it
sees exactly what serving would see), then the world steps all of them with numpy. A
``sink`` receives, in causal order per user, the same wire events the Kafka shell publishes
(RecRequest, SlateServed, Impressions, Click, SessionEnd, EpisodeOutcome), so the streams
fold and an online learner can run in process on them.

A world that resamples its documents (``World.resample_every``) makes a new catalogue
version between rounds; ``on_catalogue(catalogue, first_new_id)`` is told of each before
any request names its items (the Kafka shell publishes it there).

CTR here is clicks per served slate (a slate gets at most one click); clicked quality is
the mean quality of the clicked items of an episode (episodes without a click are left out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import EpisodeOutcome, Record
from recloop.core.ports import SlatePolicy
from recloop.producer_sim import wire
from recloop.producer_sim.cohort import Cohort
from recloop.producer_sim.world import World


@dataclass(frozen=True)
class Estimate:
    """A sample mean with the half-width of its normal-approximation 95% interval."""

    mean: float
    ci95: float
    n: int

    @classmethod
    def of(cls, values: np.ndarray) -> Estimate:
        values = np.asarray(values, dtype=np.float64)
        n = int(values.size)
        if n == 0:
            return cls(math.nan, math.nan, 0)
        half = 1.96 * values.std(ddof=1) / math.sqrt(n) if n > 1 else math.inf
        return cls(float(values.mean()), float(half), n)

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.ci95:.3f}"


@dataclass(frozen=True)
class RunReport:
    """Per-episode ground truth of a run, in the order the episodes finished."""

    world: str
    policy: str
    return_E: np.ndarray
    steps_E: np.ndarray
    clicks_E: np.ndarray
    clicked_quality_E: np.ndarray  # sum of clicked items' quality per episode
    wall_s: float

    @property
    def episodes(self) -> int:
        return int(self.return_E.size)

    @property
    def mean_return(self) -> Estimate:
        return Estimate.of(self.return_E)

    @property
    def ctr(self) -> Estimate:
        return Estimate.of(self.clicks_E / np.maximum(self.steps_E, 1))

    @property
    def clicked_quality(self) -> Estimate:
        has = self.clicks_E > 0
        return Estimate.of(self.clicked_quality_E[has] / self.clicks_E[has])

    @property
    def user_steps_per_s(self) -> float:
        return float(self.steps_E.sum()) / max(self.wall_s, 1e-9)

    def summary(self) -> dict[str, float]:
        """Flat figures, e.g. for a JSON line."""
        out: dict[str, float] = {
            "episodes": self.episodes,
            "user_steps_per_s": self.user_steps_per_s,
        }
        for name in ("mean_return", "ctr", "clicked_quality"):
            est = getattr(self, name)
            out[name], out[f"{name}_ci95"] = est.mean, est.ci95
        return out

    def __str__(self) -> str:
        return (
            f"{self.policy} on {self.world}: {self.episodes} episodes, return {self.mean_return}, "
            f"CTR {self.ctr}, clicked quality {self.clicked_quality}"
        )


def run_episodes(
    world: World,
    policy: SlatePolicy,
    episodes: int,
    seed: int = 0,
    sink: Callable[[Record], None] | None = None,
    users_in_parallel: int = 64,
    clock: Callable[[], float] = time.time,
    run_tag: str | None = None,
    on_catalogue: Callable[[ItemCatalogue, int], None] | None = None,
) -> RunReport:
    """Run ``episodes`` sessions (one fresh user each) of ``world`` served by ``policy``.

    ``seed`` seeds the users, candidate sets and clicks (the world's catalogue has its own
    seed); the same seed, users_in_parallel and a deterministic policy give the same
    trajectory.
    """
    if episodes < 1 or users_in_parallel < 1:
        raise ValueError("episodes and users_in_parallel must be >= 1")
    started = time.perf_counter()
    cohort = Cohort(world, min(users_in_parallel, episodes), seed, run_tag or f"run{seed}")
    cohort.start(np.arange(cohort.capacity))
    finished: list[tuple[float, int, int, float]] = []
    k = world.slate_size
    while True:
        slots = np.flatnonzero(cohort.sim.pop.active_U)
        if slots.size == 0:
            break
        known = cohort.sim.catalogue.n_items
        new = cohort.refresh_documents()
        if new is not None and on_catalogue is not None:
            on_catalogue(new, known)
        requests = cohort.request(slots, clock())
        items_UK = np.empty((slots.size, k), dtype=np.int64)
        served: list[tuple[str, int]] = []
        for i, slot in enumerate(slots.tolist()):
            slate = policy.recommend(cohort.observation(slot), cohort.candidates(slot), k)
            items_UK[i] = cohort.check_slate(slot, slate.items)
            name, version = policy.name, int(getattr(policy, "version", 0))
            served.append((name, version))
            if sink is not None:
                sink(requests[i])
                sink(wire.make_slate_served(requests[i], slate, name, version, clock()))
        answer = cohort.answer(slots, items_UK, served, clock())
        if sink is not None:
            _emit(sink, slots, answer.feedback, answer.outcomes, cohort)
        pop = cohort.sim.pop
        for slot in answer.finished_slots.tolist():
            finished.append(
                (
                    pop.return_U[slot],
                    pop.steps_U[slot],
                    pop.clicks_U[slot],
                    pop.clicked_quality_U[slot],
                )
            )
        # New users take the finished users' slots until enough episodes have started.
        refill = answer.finished_slots[: max(0, episodes - cohort.sim.users_started)]
        if refill.size:
            cohort.start(refill)
    cols = np.array(finished, dtype=np.float64).reshape(-1, 4)
    return RunReport(
        world=world.name,
        policy=policy.name,
        return_E=cols[:, 0],
        steps_E=cols[:, 1].astype(np.int64),
        clicks_E=cols[:, 2].astype(np.int64),
        clicked_quality_E=cols[:, 3],
        wall_s=time.perf_counter() - started,
    )


def _emit(
    sink: Callable[[Record], None],
    slots: np.ndarray,
    feedback: list[list[Record]],
    outcomes: list[EpisodeOutcome],
    cohort: Cohort,
) -> None:
    """Feedback per user, each session's outcome right after its SessionEnd."""
    by_user = {o.user_id: o for o in outcomes}
    for slot, records in zip(slots.tolist(), feedback, strict=True):
        for record in records:
            sink(record)
        outcome = by_user.get(cohort.user_ids[slot])
        if outcome is not None:
            sink(outcome)
