"""Ready-made worlds, by name.

- ``interest_evolution``: RecSim's interest-evolution environment (Ie et al. 2019), the world
  the SlateQ results come from: 20 clusters, quality means evenly spaced on [-3, 0] for the
  14 "trashy" clusters and [0, 3] for the 6 "nutritious" ones, quality std 0.1, length 4,
  budget 200, multinomial-proportional choice (scores ⟨u, f⟩ + 1, null score 2). Published
  baselines at 10 candidates and slate 3: uniform random ≈ 160 return per episode, a myopic
  ranking by true click probability ≈ 166-167. With ``resample_every`` > 0 it also replaces
  ``resample_count`` documents every that many user-steps with fresh draws from the same
  document model, as RecSim samples fresh documents (``producer_sim.world``: new ids, each
  version published before it is requested).
- ``tiny_world``: six items, two kinds of users, slates of two, ten steps per session, no
  drift, multinomial logit with a null logit of 3. Each kind loves two items (logit +3) and
  is cold on the other four (logit -3). The best policy is known: show the user's two loved
  items (``MyopicOraclePolicy``): 2/3 click probability per step, 6.67 clicks per episode,
  against 0.313 and 3.13 for uniform random.
- ``large_catalogue``: 100k items with unit 32-d embeddings around 100 cluster centres; no
  candidate list (recommenders retrieve from the whole catalogue, e.g. by nearest
  neighbours); multinomial-logit choice; budget 60.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from recloop.producer_sim.choice import ChoiceModel, MultinomialLogit, MultinomialProportional
from recloop.producer_sim.documents import Catalogue, cluster_catalogue, embedding_catalogue
from recloop.producer_sim.users import InterestUsers, UserConfig
from recloop.producer_sim.world import World


def recsim_cluster_quality_means(n_clusters: int = 20) -> np.ndarray:
    """RecSim's per-cluster quality means: 70% of clusters on [-3, 0], 30% on [0, 3]."""
    trashy = np.linspace(-3.0, 0.0, int(n_clusters * 0.7))
    nutritious = np.linspace(0.0, 3.0, int(n_clusters * 0.3))
    return np.concatenate([trashy, nutritious])


def interest_evolution(
    seed: int = 0,
    num_candidates: int = 10,
    slate_size: int = 3,
    n_items: int = 10_000,
    choice: ChoiceModel | None = None,
    resample_every: int = 0,
    resample_count: int = 0,
) -> World:
    """RecSim's interest-evolution world; ``seed`` draws the catalogue. ``resample_every``
    user-steps (0: never), ``resample_count`` documents are replaced by fresh ones."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    documents = partial(_cluster_documents, recsim_cluster_quality_means(20), 0.1, 4.0)
    catalogue = documents(n_items, rng)
    return World(
        name="interest_evolution",
        catalogue=catalogue,
        users=InterestUsers(UserConfig()),
        choice=choice or MultinomialProportional(no_click_mass=1.0, min_normalizer=-1.0),
        slate_size=slate_size,
        num_candidates=num_candidates,
        resample_every=resample_every,
        resample_count=resample_count,
        new_documents=documents if resample_every else None,
    )


def _cluster_documents(
    quality_means: np.ndarray, quality_std: float, length: float, n: int, rng: np.random.Generator
) -> Catalogue:
    return cluster_catalogue(n, quality_means, quality_std, length, rng)


TINY_PROTOTYPES = (
    (1.0, 1.0, -1.0, -1.0, -1.0, -1.0),
    (-1.0, -1.0, 1.0, 1.0, -1.0, -1.0),
)


def tiny_world(seed: int = 0, slate_size: int = 2) -> World:
    """Six one-hot items, two user kinds, sessions of exactly ten steps; reward 1 per click."""
    del seed  # nothing random to build: the catalogue is fixed
    n = len(TINY_PROTOTYPES[0])
    features_NF = np.eye(n, dtype=np.float32)
    catalogue = Catalogue(
        cluster_N=np.arange(n, dtype=np.int64),
        quality_N=np.zeros(n),
        length_N=np.ones(n),
        features_NF=features_NF,
    )
    # Every step costs exactly one unit of budget: a click watches 1, a miss costs 1, and
    # quality 0 refunds nothing; so the return is the number of clicks in ten steps.
    users = InterestUsers(
        UserConfig(
            dim=n,
            time_budget=10.0,
            no_click_cost=1.0,
            interest_step=0.0,
            prototypes=TINY_PROTOTYPES,
        )
    )
    return World(
        name="tiny_world",
        catalogue=catalogue,
        users=users,
        choice=MultinomialLogit(null_logit=3.0, scale=3.0),
        slate_size=slate_size,
        num_candidates=n,
    )


def large_catalogue(
    seed: int = 0, n_items: int = 100_000, dim: int = 32, slate_size: int = 5, n_clusters: int = 100
) -> World:
    """A 100k-item embedding world whose requests carry no candidate list."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    quality_means = rng.permutation(np.linspace(-2.0, 2.0, n_clusters))
    catalogue = embedding_catalogue(n_items, n_clusters, dim, 0.5, quality_means, 0.1, 4.0, rng)
    return World(
        name="large_catalogue",
        catalogue=catalogue,
        users=InterestUsers(UserConfig(dim=dim, time_budget=60.0, interest_step=0.0)),
        choice=MultinomialLogit(null_logit=3.0, scale=3.0),
        slate_size=slate_size,
        num_candidates=0,
    )


PRESETS: dict[str, Callable[..., World]] = {
    "interest_evolution": interest_evolution,
    "tiny_world": tiny_world,
    "large_catalogue": large_catalogue,
}


def make_world(name: str, seed: int = 0, **options: object) -> World:
    """Build a preset by name; ``options`` go to its builder (e.g. ``slate_size=3``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](seed=seed, **options)
