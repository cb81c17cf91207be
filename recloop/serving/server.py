"""The pure serving core: a batch of ``RecRequest`` in, one ``SlateServed`` per request out.

No Kafka here (``recloop.services.serve`` is the shell). For each request the core

1. picks the user's policy by the deterministic traffic split;
2. takes that policy's current ``ActivePolicy`` once (a swap mid-batch cannot mix versions),
   or the declared fallback when no snapshot has arrived yet;
3. builds the ``Observation`` from the request and the cached session view, and the
   ``Candidates``: the request's ids or, when it has none, the top-M of a faiss retrieval
   (the snapshot's learned item embeddings where it has them, else the catalogue's
   features; queries of one index are searched together, in one call), each with its
   features looked up in the current catalogue by id;
4. asks the policy for a slate, mixes in uniform exploration at rate ε with honest
   propensities, and tags the slate with the policy name and version that drew it.

A policy that raises or returns an invalid slate never fails the request: the fallback
answers it instead and the error is counted.

The catalogue (``serving.items.ServedCatalogue``) is the only source of the number of items
and of their features; the server answers nothing before it has one. A batch takes the
current catalogue once (``set_catalogue`` swaps it whole), so a new version never mixes
into a batch. A slate carries ids only: the candidates it was drawn from (the request's, or
the retrieved ones), never their features.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import RecRequest, SlateServed
from recloop.core.ports import Candidates, Observation, Slate, SlatePolicy
from recloop.serving.exploration import explore
from recloop.serving.fallback import (
    FALLBACK_NAMES,
    PopularityCounts,
    PopularityPolicy,
    UniformPolicy,
)
from recloop.serving.host import ActivePolicy, PolicyHost
from recloop.serving.items import ServedCatalogue, index_catalogue
from recloop.serving.retrieval import CatalogueIndex
from recloop.serving.session_cache import SessionCache
from recloop.serving.split import TrafficSplit

BUILTIN_POLICIES = {"uniform": "uniform", "random": "uniform", "popularity": "popularity"}
"""Names that always serve a built-in policy (an A/B control arm), never a snapshot."""

# Propensities computed as sums of products may exceed 1 by round-off.
_PROB_TOL = 1e-6


@dataclass(frozen=True)
class ServeConfig:
    """How the serving core answers requests."""

    split: TrafficSplit
    """Policies served and their shares of users."""
    fallback: str = "uniform"
    """What a learned policy's users get before its first snapshot: uniform or popularity."""
    epsilon: float = 0.0
    """Probability of serving a uniform random slate instead of the policy's (exploration)."""
    retrieve_m: int = 100
    """Candidates retrieved from the catalogue when a request names none."""
    seed: int = 0
    """Seed of the generator behind every random draw (fallbacks, exploration)."""

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACK_NAMES:
            raise ValueError(f"fallback {self.fallback!r}; choose one of {FALLBACK_NAMES}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.retrieve_m < 1:
            raise ValueError("retrieve_m must be >= 1")

    @property
    def learned_policies(self) -> list[str]:
        """Policies that wait for snapshots (every name that is not built in)."""
        return [name for name in self.split.names if name not in BUILTIN_POLICIES]


def validate_request(request: RecRequest, catalogue: ItemCatalogue | None) -> str | None:
    """Why ``request`` cannot be answered from ``catalogue``, or ``None`` if it can (the shell
    dead-letters it)."""
    if catalogue is None:
        return "no catalogue yet: this server has not received one on items + catalogue"
    n, n_items = len(request.candidates), catalogue.n_items
    if n == 0:
        if request.k > n_items:
            return f"k={request.k} exceeds the catalogue of {n_items} items"
        return None
    if request.k > n:
        return f"k={request.k} exceeds the {n} candidates"
    ids = np.asarray(request.candidates, dtype=np.int64)
    if not catalogue.contains(ids).all():
        return f"candidate ids must lie in [0, {n_items}) (catalogue v{catalogue.version})"
    if np.unique(ids).shape[0] != n:
        return "candidates contain duplicates"
    return None


@dataclass
class _Job:
    """One request on its way through a batch."""

    request: RecRequest
    served_as: str
    version: int
    policy: SlatePolicy
    active: ActivePolicy | None
    observation: Observation
    candidates: Candidates | None = None
    echo_candidates: bool = True
    """Whether the slate names its (retrieved) candidates; a whole-catalogue one does not."""


class SlateServer:
    """Answers batches of requests; counters in ``stats``."""

    def __init__(
        self,
        config: ServeConfig,
        host: PolicyHost,
        cache: SessionCache | None = None,
        catalogue: ServedCatalogue | ItemCatalogue | None = None,
    ) -> None:
        missing = sorted(set(config.learned_policies) - set(host.names))
        if missing:
            raise ValueError(f"the policy host does not hold {missing}")
        self.config = config
        self.host = host
        self.cache = cache if cache is not None else SessionCache(PopularityCounts())
        self.served: ServedCatalogue | None = None
        if catalogue is not None:
            self.set_catalogue(catalogue)
        self.rng = np.random.default_rng(config.seed)
        popularity = self.cache.popularity
        if popularity is None:
            popularity = PopularityCounts()
        self._fallback: SlatePolicy = (
            UniformPolicy(self.rng)
            if config.fallback == "uniform"
            else PopularityPolicy(popularity, self.rng)
        )
        self._builtin: dict[str, SlatePolicy] = {}
        for name in config.split.names:
            kind = BUILTIN_POLICIES.get(name)
            if kind == "uniform":
                self._builtin[name] = UniformPolicy(self.rng, name=name)
            elif kind == "popularity":
                self._builtin[name] = PopularityPolicy(popularity, self.rng, name=name)
        self.stats: Counter[str] = Counter()
        self.last_error = ""

    # -- the catalogue -----------------------------------------------------------------------

    def set_catalogue(self, catalogue: ServedCatalogue | ItemCatalogue) -> None:
        """Answer from ``catalogue`` from the next batch on (an ``ItemCatalogue`` is indexed
        here, in the caller's thread; the service hands over built ones)."""
        if isinstance(catalogue, ItemCatalogue):
            catalogue = index_catalogue(catalogue, recall_m=self.config.retrieve_m)
        self.served = catalogue
        self.cache.follow_catalogue(catalogue.n_items)

    @property
    def catalogue(self) -> ItemCatalogue | None:
        served = self.served
        return None if served is None else served.catalogue

    # -- the batch ---------------------------------------------------------------------------

    def serve_batch(self, requests: Sequence[RecRequest],
                    served: ServedCatalogue | None = None) -> list[SlateServed]:  # fmt: skip
        """One SlateServed per request, in order, from ``served`` (default: the current
        catalogue, taken once). Requests must pass ``validate_request`` against it."""
        served = served or self.served
        if served is None:
            if requests:
                raise RuntimeError("no catalogue to serve from yet (set_catalogue first)")
            return []
        jobs = [self._job(request) for request in requests]
        self._retrieve(jobs, served)
        return [self._answer(job) for job in jobs]

    def _job(self, request: RecRequest) -> _Job:
        arm = self.config.split.arm(request.user_id)
        observation = self._observation(request)
        if arm in self._builtin:
            return _Job(request, arm, 0, self._builtin[arm], None, observation)
        active = self.host.current(arm)
        if active is None:
            # Before its first snapshot an arm serves the declared fallback as its version 0,
            # so an A/B comparison sees every slate of the arm under the arm's name.
            return _Job(request, arm, 0, self._fallback, None, observation)
        return _Job(request, active.name, active.version, active.policy, active, observation)

    def _observation(self, request: RecRequest) -> Observation:
        view = self.cache.view(request.user_id, request.session_id)
        obs = request.observation or (view.observation if view is not None else [])
        return Observation(
            user_id=request.user_id,
            user_obs=np.asarray(obs, dtype=np.float32),
            history=tuple(view.history) if view is not None else (),
            history_rewards=tuple(view.history_rewards) if view is not None else (),
            step=request.step,
        )

    # -- candidates --------------------------------------------------------------------------

    def _retrieve(self, jobs: list[_Job], served: ServedCatalogue) -> None:
        """Fill every job's candidates; retrieval queries are batched per index."""
        catalogue = served.catalogue
        pending: dict[int, tuple[CatalogueIndex, list[tuple[_Job, np.ndarray]]]] = {}
        for job in jobs:
            request = job.request
            if request.candidates:
                ids_N = np.asarray(request.candidates, dtype=np.int64)
                job.candidates = Candidates(ids=ids_N, features_NF=catalogue.features(ids_N))
                continue
            found = _index_and_query(job, served)
            if found is None:
                # Nothing to search with: the policy ranks the whole catalogue itself.
                job.candidates = self._whole_catalogue(served, with_features=job.active is not None)
                job.echo_candidates = False
                self.stats["whole_catalogue"] += 1
            else:
                index, query_D = found
                pending.setdefault(id(index), (index, []))[1].append((job, query_D))
        for index, group in pending.values():
            queries_QD = np.stack([query for _, query in group])
            m = max(self.config.retrieve_m, *(job.request.k for job, _ in group))
            ids_QM, _ = index.search(queries_QD, m)
            for (job, _), ids_M in zip(group, ids_QM, strict=True):
                # A learned index may hold items the catalogue no longer has; -1 is a miss.
                ids_M = ids_M[catalogue.contains(ids_M)]
                job.candidates = Candidates(ids=ids_M, features_NF=catalogue.features(ids_M))
            self.stats["retrieved"] += len(group)

    @staticmethod
    def _whole_catalogue(served: ServedCatalogue, with_features: bool) -> Candidates:
        catalogue = served.catalogue
        ids_N = np.arange(catalogue.n_items, dtype=np.int64)
        # The catalogue's own read-only matrix: no copy of a million rows per request. The
        # fallbacks ignore features, so they get none.
        features_NF = (catalogue.features_NF if with_features
                       else np.zeros((ids_N.shape[0], 0), dtype=np.float32))  # fmt: skip
        return Candidates(ids=ids_N, features_NF=features_NF)

    # -- the answer --------------------------------------------------------------------------

    def _answer(self, job: _Job) -> SlateServed:
        request, candidates = job.request, job.candidates
        assert candidates is not None
        slate, policy, served_as, version = self._recommend(job)
        explored = explore(
            policy, slate, job.observation, candidates, request.k, self.config.epsilon, self.rng
        )
        self.stats[f"branch_{explored.branch}"] += 1
        self.stats[f"served:{served_as}:{version}"] += 1
        final = explored.slate
        echo = job.echo_candidates and not request.candidates
        return SlateServed(
            request_id=request.request_id,
            user_id=request.user_id,
            session_id=request.session_id,
            step=request.step,
            ts=time.time(),
            request_ts=request.ts,
            items=np.asarray(final.items, dtype=np.int64).tolist(),
            scores=np.asarray(final.scores, dtype=np.float64).tolist(),
            propensities=np.clip(np.asarray(final.propensities, np.float64), 0.0, 1.0).tolist(),
            policy=served_as,
            policy_version=version,
            candidates=candidates.ids.tolist() if echo else list(request.candidates),
            observation=list(request.observation),
        )

    def _recommend(self, job: _Job) -> tuple[Slate, SlatePolicy, str, int]:
        """The policy's slate, or the fallback's if the policy fails (counted)."""
        k, candidates = job.request.k, job.candidates
        assert candidates is not None
        try:
            slate = job.policy.recommend(job.observation, candidates, k)
            problem = slate_problem(slate, candidates, k)
        except Exception as exc:  # a policy bug must not fail the request
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return slate, job.policy, job.served_as, job.version
        self.stats["policy_errors"] += 1
        self.last_error = f"{job.served_as} v{job.version}: {problem}"
        slate = self._fallback.recommend(job.observation, candidates, k)
        return slate, self._fallback, self._fallback.name, 0


def slate_problem(slate: Slate, candidates: Candidates, k: int) -> str | None:
    """Why ``slate`` is not a valid answer (K distinct candidates, finite scores, p in [0,1])."""
    items_K = np.asarray(slate.items)
    scores_K = np.asarray(slate.scores, dtype=np.float64)
    props_K = np.asarray(slate.propensities, dtype=np.float64)
    if items_K.shape != (k,) or scores_K.shape != (k,) or props_K.shape != (k,):
        return f"expected {k} items, scores and propensities, got {items_K.shape}, {scores_K.shape}, {props_K.shape}"
    if np.unique(items_K).shape[0] != k:
        return "slate items are not distinct"
    if not np.all(np.isin(items_K, candidates.ids)):
        return "slate holds items that are not candidates"
    if not np.all(np.isfinite(scores_K)):
        return "non-finite scores"
    if not np.all((props_K >= 0.0) & (props_K <= 1.0 + _PROB_TOL)):
        return "propensities outside [0, 1]"
    return None


def _index_and_query(
    job: _Job, served: ServedCatalogue
) -> tuple[CatalogueIndex, np.ndarray] | None:
    """Where a learned policy's request retrieves from, and with which query: the snapshot's
    own index if the query fits it, else the catalogue features' index if it fits that.
    The query is the policy's ``query_vector(observation)`` if it has one, else the user's
    observation. Built-in arms and fallbacks never retrieve (their propensities are over the
    whole catalogue)."""
    active = job.active
    if active is None:
        return None
    own = getattr(active.policy, "query_vector", None)
    if callable(own):
        query_D = np.asarray(own(job.observation), dtype=np.float32).reshape(-1)
    else:
        query_D = job.observation.user_obs
    if not np.all(np.isfinite(query_D)):
        return None
    for index in (active.index, served.index):
        if index is not None and query_D.shape == (index.dim,):
            return index, query_D
    return None
