"""Simulated users that speak in wire events: requests out, slates in, feedback out.

A ``Cohort`` wraps a ``Simulation`` with the bookkeeping both transports need: user ids,
the request each user is waiting on, the recently clicked items a policy may condition on,
and the count of slates each policy version served. The in-process runner and the Kafka
shell drive the same object, so they generate identical events:

    new = cohort.refresh_documents()                     # a new catalogue version, or None
    ...if new: register it (publish it) before the requests that may name its items...
    requests = cohort.request(slots, ts)                 # RecRequest per slot
    ...a policy answers (in process, or serving via Kafka)...
    answer = cohort.answer(slots, items_UK, policies, ts)  # feedback, outcomes, who finished
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import EpisodeOutcome, Record, RecRequest
from recloop.core.ports import Candidates, Observation
from recloop.producer_sim import wire
from recloop.producer_sim.world import Simulation, World


class InvalidSlate(ValueError):
    """A slate that the user it was served to cannot be shown."""


@dataclass(frozen=True)
class Answer:
    """The result of answering a batch of users' slates."""

    feedback: list[list[Record]]
    """Per answered slot, in order: Impressions, maybe a Click, maybe a SessionEnd."""
    outcomes: list[EpisodeOutcome] = field(default_factory=list)
    """Ground truth of the sessions that ended in this batch."""
    finished_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class Cohort:
    """``capacity`` user slots of one run of ``world``; reproducible from ``seed``."""

    def __init__(
        self, world: World, capacity: int, seed: int, run_tag: str = "sim", history_len: int = 10
    ) -> None:
        self.world = world
        self.sim = Simulation(world, capacity, seed)
        self.run_tag = run_tag
        self.user_ids: list[str] = [""] * capacity
        self.pending: list[RecRequest | None] = [None] * capacity
        self._obs: list[np.ndarray | None] = [None] * capacity
        self._cands: list[np.ndarray | None] = [None] * capacity
        self._history: list[deque[tuple[int, float]]] = [
            deque(maxlen=history_len) for _ in range(capacity)
        ]
        self._policy_steps: list[dict[str, int]] = [{} for _ in range(capacity)]
        self._all_items: Candidates | None = None

    @property
    def capacity(self) -> int:
        return self.sim.pop.capacity

    def start(self, slots: np.ndarray) -> None:
        """Fresh users (new ids, new sessions) in ``slots``."""
        self.sim.spawn(slots)
        for slot in np.asarray(slots).tolist():
            self.user_ids[slot] = wire.user_id_for(self.run_tag, int(self.sim.pop.serial_U[slot]))
            self.pending[slot] = None
            self._history[slot].clear()
            self._policy_steps[slot] = {}

    def refresh_documents(self) -> ItemCatalogue | None:
        """Resample the world's documents if it is time (``world`` module docstring): the
        new catalogue version, to register before the next ``request``; else None."""
        if not self.sim.resample_due():
            return None
        self._all_items = None
        return self.sim.resample()

    def request(self, slots: np.ndarray, ts: float) -> list[RecRequest]:
        """Each slot's next RecRequest (also remembered as the slot's pending request)."""
        slots = np.asarray(slots, dtype=np.int64)
        obs_UD = self.sim.observe(slots)
        obs_rows = obs_UD.tolist()
        obs32_UD = obs_UD.astype(np.float32)  # what serving gets decoding the request
        cands_UC = self.sim.candidates(slots)
        k = self.world.slate_size
        steps = self.sim.pop.steps_U[slots].tolist()
        out = []
        for i, slot in enumerate(slots.tolist()):
            cand_C = None if cands_UC is None else cands_UC[i]
            cand_list = [] if cand_C is None else cand_C.tolist()
            req = wire.make_request(self.user_ids[slot], steps[i], ts, k, obs_rows[i], cand_list)
            self.pending[slot], self._obs[slot], self._cands[slot] = req, obs32_UD[i], cand_C
            out.append(req)
        return out

    def observation(self, slot: int) -> Observation:
        """What an in-process policy sees for the slot's pending request."""
        req, obs = self.pending[slot], self._obs[slot]
        if req is None or obs is None:  # both are set together, with the request
            raise RuntimeError(f"slot {slot} has no pending request")
        hist = self._history[slot]
        return Observation(
            user_id=req.user_id,
            user_obs=obs,
            history=tuple(i for i, _ in hist),
            history_rewards=tuple(r for _, r in hist),
            step=req.step,
        )

    def candidates(self, slot: int) -> Candidates:
        """The candidate set of the slot's pending request (the catalogue if it had none)."""
        ids_C = self._cands[slot]
        catalogue = self.sim.catalogue
        if ids_C is None:
            if self._all_items is None:
                live_N = np.arange(self.sim.live_lo, catalogue.n_items, dtype=np.int64)
                features_NF = catalogue.features_NF[self.sim.live_lo :]
                self._all_items = Candidates(ids=live_N, features_NF=features_NF)
            return self._all_items
        return Candidates(ids=ids_C, features_NF=catalogue.features(ids_C))

    def check_slate(self, slot: int, items: list[int] | np.ndarray) -> list[int]:
        """The slate as a list of ids, or InvalidSlate saying why the user cannot be shown it."""
        req = self.pending[slot]
        if req is None:
            raise InvalidSlate(f"slot {slot} is not waiting for a slate")
        # Plain Python on a handful of ids is several times faster than numpy set routines.
        ids = [int(i) for i in items]
        if len(ids) != req.k:
            raise InvalidSlate(
                f"slate has {len(ids)} items, request {req.request_id} asked for {req.k}"
            )
        distinct = set(ids)
        if len(distinct) != req.k:
            raise InvalidSlate(f"slate for {req.request_id} repeats an item")
        if req.candidates:
            if not distinct.issubset(req.candidates):
                raise InvalidSlate(
                    f"slate for {req.request_id} names an item outside its candidates"
                )
        elif min(ids) < 0 or max(ids) >= self.sim.catalogue.n_items:
            raise InvalidSlate(f"slate for {req.request_id} names an item outside the catalogue")
        return ids

    def answer(
        self, slots: np.ndarray, items_UK: np.ndarray, policies: list[tuple[str, int]], ts: float
    ) -> Answer:
        """Show the slots their (checked) slates; return the feedback and finished sessions.

        Finished slots are retired; the caller decides whether to ``start`` new users there.
        """
        slots = np.asarray(slots, dtype=np.int64)
        outcome = self.sim.step(slots, items_UK)
        pop = self.sim.pop
        feedback, outcomes = [], []
        position, reward, done = (
            outcome.position_U.tolist(),
            outcome.reward_U.tolist(),
            outcome.done_U.tolist(),
        )
        for i, slot in enumerate(slots.tolist()):
            req = self.pending[slot]
            assert req is not None, "answer() for a slot without a pending request"
            key = wire.policy_key(*policies[i])
            steps_by_policy = self._policy_steps[slot]
            steps_by_policy[key] = steps_by_policy.get(key, 0) + 1
            feedback.append(
                wire.make_feedback(req, items_UK[i].tolist(), position[i], reward[i], done[i], ts)
            )
            if position[i] >= 0:
                self._history[slot].append((int(items_UK[i, position[i]]), reward[i]))
            self.pending[slot] = None
            if done[i]:
                outcomes.append(
                    wire.make_outcome(
                        req.user_id,
                        ts,
                        pop.return_U[slot],
                        pop.steps_U[slot],
                        pop.clicks_U[slot],
                        pop.clicked_quality_U[slot],
                        steps_by_policy,
                    )
                )
        finished = slots[outcome.done_U]
        self.sim.retire(finished)
        return Answer(feedback=feedback, outcomes=outcomes, finished_slots=finished)
