"""A world = document model + user model + choice model; a Simulation steps users through it.

``World`` is immutable (first catalogue, models, sizes). ``Simulation`` holds the mutable
state of a fixed number of user slots, the current catalogue, and four generators spawned
from one seed: one for the user model (sampling users, interest coin flips), one for the
document model (candidate sets), one for the choice model (clicks) and one for new
documents. Steps act on any subset of slots at once, so the in-process runner can step
everyone together while the Kafka shell steps whoever's slate has just arrived.

Resampling (RecSim's fresh documents, ``World.resample_every`` > 0): once every
``resample_every`` user-steps, ``resample_count`` new documents are drawn from the world's
document model (``new_documents``) and take the place of the oldest as many in the *live*
window of ``n_items`` documents that candidates are drawn from. New documents get the next
ids (a retired document's id is never reused, so a late event still names the right item).
``Simulation.resample`` returns the grown catalogue as the next ``ItemCatalogue`` version:
the caller registers it (publishes it) before any request names its new ids. Rules:

1. candidates (and, without a candidate list, what an in-process policy ranks) are the
   live window ``[live_lo, n_total)``; retired documents stay in the catalogue (a slate
   answering an earlier request may still show one), never offered again;
2. resampling happens only between rounds of requests (``resample_due`` then ``resample``),
   never inside one, so every request of a round names items of one catalogue version;
3. the catalogue grows by ``resample_count`` rows per resample (a long run's catalogue is
   ``n_items + resamples x resample_count`` rows, every version published).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from recloop.core.catalogue import ItemCatalogue
from recloop.core.spec import WorldSpec
from recloop.producer_sim.choice import ChoiceModel, sample
from recloop.producer_sim.documents import Catalogue, sample_candidates
from recloop.producer_sim.users import InterestUsers, Population


@dataclass(frozen=True)
class World:
    """Everything static about a simulated world."""

    name: str
    catalogue: Catalogue
    users: InterestUsers
    choice: ChoiceModel
    slate_size: int
    num_candidates: int
    resample_every: int = 0
    """Every this many user-steps, replace ``resample_count`` live documents (0: never; the
    module docstring's rules)."""
    resample_count: int = 0
    """How many documents each resample draws (1 .. the catalogue's size)."""
    new_documents: Callable[[int, np.random.Generator], Catalogue] | None = None
    """The document model: ``new_documents(m, rng)`` draws ``m`` fresh documents."""

    def __post_init__(self) -> None:
        if self.users.config.dim != self.catalogue.feature_dim:
            raise ValueError("user interest and item feature dimensions differ")
        pool = self.num_candidates or self.catalogue.n_items
        if not 1 <= self.slate_size <= pool:
            raise ValueError(f"slate size {self.slate_size} must be in [1, {pool}]")
        if self.resample_every < 0:
            raise ValueError(f"resample_every must be >= 0, got {self.resample_every}")
        if self.resample_every and (
            self.new_documents is None or not 1 <= self.resample_count <= self.catalogue.n_items
        ):
            raise ValueError(f"resampling needs a document model and resample_count in "
                             f"[1, {self.catalogue.n_items}], got {self.resample_count}")  # fmt: skip

    @property
    def spec(self) -> WorldSpec:
        """The world's sizes, as a learner is built for them (``history_len`` left default:
        that is the learner's choice, not the world's)."""
        return WorldSpec(
            n_items=self.catalogue.n_items,
            user_obs_dim=self.users.config.dim,
            item_feature_dim=self.catalogue.feature_dim,
            slate_size=self.slate_size,
            num_candidates=self.num_candidates,
        )

    @cached_property
    def item_catalogue(self) -> ItemCatalogue:
        """What recommenders may know of the items: the observable features as catalogue
        version 1, which the simulator publishes before its first request (the clusters,
        qualities and lengths stay hidden in the world)."""
        return ItemCatalogue(self.catalogue.features_NF, version=1)

    def item_features(self, ids: np.ndarray) -> np.ndarray:
        """Observable features of item ids (any shape) -> ``ids.shape + (F,)``, float32, of
        the world's first documents (a resampling ``Simulation`` keeps its own catalogue)."""
        return self.catalogue.features(ids)

    def click_probabilities(self, user_obs_UD: np.ndarray, slate_UK: np.ndarray) -> np.ndarray:
        """True choice probabilities (U, K + 1; last column: no click) of users whose interests
        are ``user_obs_UD`` for the given slates. Ground truth: only baselines may use it."""
        affinity_UK = self.users.affinity(
            user_obs_UD.astype(np.float64), self.item_features(slate_UK)
        )
        return self.choice.probabilities(affinity_UK)


@dataclass(frozen=True)
class StepOutcome:
    """What happened to each stepped user (rows follow the ``slots`` passed to ``step``)."""

    position_U: np.ndarray  # int64, chosen slate position or -1 for no click
    item_U: np.ndarray  # int64, clicked item id or -1
    reward_U: np.ndarray  # float64, watch time (0 without a click)
    quality_U: np.ndarray  # float64, clicked item's quality (0 without a click)
    done_U: np.ndarray  # bool, the session is over


class Simulation:
    """The live users of one run of a world, reproducible from ``seed``."""

    def __init__(self, world: World, capacity: int, seed: int) -> None:
        self.world = world
        # spawn(4)'s first three children are spawn(3)'s: runs without resampling replay.
        user_ss, doc_ss, choice_ss, new_ss = np.random.SeedSequence(seed).spawn(4)
        self.rng_users = np.random.default_rng(user_ss)
        self.rng_documents = np.random.default_rng(doc_ss)
        self.rng_choice = np.random.default_rng(choice_ss)
        self.rng_new_documents = np.random.default_rng(new_ss)
        self.pop = Population.empty(capacity, world.users.config.dim)
        self.users_started = 0
        self.catalogue = world.catalogue
        """Every document so far (the world's first ones, then each resample's)."""
        self.item_catalogue = world.item_catalogue
        """What recommenders may know of ``catalogue``: its features, one version per resample."""
        self.live_lo = 0
        """The first id of the live window (module docstring, rule 1)."""
        self._steps_since_resample = 0

    @property
    def n_live(self) -> int:
        return self.world.catalogue.n_items

    def resample_due(self) -> bool:
        """Whether ``resample_every`` user-steps have passed since the last resample."""
        every = self.world.resample_every
        return every > 0 and self._steps_since_resample >= every

    def resample(self) -> ItemCatalogue:
        """Draw ``resample_count`` new documents and retire as many of the oldest live ones;
        returns the next catalogue version, for the caller to publish before requesting."""
        world = self.world
        assert world.new_documents is not None, "World.__post_init__ checks it"
        new = world.new_documents(world.resample_count, self.rng_new_documents)
        self.catalogue = self.catalogue.extended(new)
        self.item_catalogue = self.item_catalogue.extended(new.features_NF)
        self.live_lo = self.catalogue.n_items - self.n_live
        self._steps_since_resample = 0
        return self.item_catalogue

    def spawn(self, slots: np.ndarray) -> None:
        """Put fresh users into ``slots``, numbered in order."""
        slots = np.asarray(slots, dtype=np.int64)
        pop = self.pop
        pop.interests_UD[slots], pop.budget_U[slots] = self.world.users.sample(
            len(slots), self.rng_users
        )
        pop.steps_U[slots] = 0
        pop.return_U[slots] = 0.0
        pop.clicks_U[slots] = 0
        pop.clicked_quality_U[slots] = 0.0
        pop.serial_U[slots] = self.users_started + np.arange(len(slots))
        pop.active_U[slots] = True
        self.users_started += len(slots)

    def retire(self, slots: np.ndarray) -> None:
        self.pop.active_U[np.asarray(slots, dtype=np.int64)] = False

    def observe(self, slots: np.ndarray) -> np.ndarray:
        """Observations of ``slots``, shape (U, D) float64 (see ``InterestUsers.observe``)."""
        return self.world.users.observe(self.pop.interests_UD[slots])

    def candidates(self, slots: np.ndarray) -> np.ndarray | None:
        """A fresh candidate set per slot, shape (U, C), or None for the whole catalogue."""
        if self.world.num_candidates == 0:
            return None
        ids_UC = sample_candidates(
            self.n_live, len(slots), self.world.num_candidates, self.rng_documents
        )
        return ids_UC + self.live_lo if self.live_lo else ids_UC

    def step(self, slots: np.ndarray, slate_UK: np.ndarray) -> StepOutcome:
        """Show each slot its slate; sample the response; update and score the users."""
        slots = np.asarray(slots, dtype=np.int64)
        world, pop, cat = self.world, self.pop, self.catalogue
        interests_UD = pop.interests_UD[slots]
        features_UKF = cat.features(slate_UK)
        probs_UK1 = world.choice.probabilities(world.users.affinity(interests_UD, features_UKF))
        position_U = sample(probs_UK1, self.rng_choice)
        clicked_U = position_U >= 0
        rows_U = np.arange(len(slots))
        item_U = np.where(clicked_U, slate_UK[rows_U, np.maximum(position_U, 0)], -1)
        safe_item_U = np.maximum(item_U, 0)
        watch_U = np.where(
            clicked_U, np.minimum(pop.budget_U[slots], cat.length_N[safe_item_U]), 0.0
        )
        quality_U = np.where(clicked_U, cat.quality_N[safe_item_U], 0.0)

        if clicked_U.any():
            who = np.flatnonzero(clicked_U)
            pop.interests_UD[slots[who]] = world.users.update_interests(
                interests_UD[who],
                features_UKF[who, position_U[who]].astype(np.float64),
                self.rng_users,
            )
        pop.budget_U[slots] = world.users.spend(pop.budget_U[slots], clicked_U, watch_U, quality_U)
        pop.steps_U[slots] += 1
        pop.return_U[slots] += watch_U
        pop.clicks_U[slots] += clicked_U
        pop.clicked_quality_U[slots] += quality_U
        self._steps_since_resample += len(slots)
        return StepOutcome(position_U, item_U, watch_U, quality_U, pop.budget_U[slots] <= 0.0)
