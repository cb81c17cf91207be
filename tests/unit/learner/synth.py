"""Synthetic ``recloop.core.events.Transition`` records for learner unit tests.

Sessions of a few steps: random observations, candidates (ids only, as on the wire since
schema v2), a slate of K distinct candidates with propensities, clicks drawn from a fixed rule
(the user clicks the slate item whose catalogue features align best with its observation, if
positive), ``next_slate`` filled from the following step and ``done`` on the last one, exactly
as the streams fold emits them. The clicks follow ``make_catalogue(spec)`` (one catalogue
per spec, whatever the transitions' seed, as one world has one catalogue) unless a test
passes its own: an agent learns from them with ``make_agent(..., catalogue=make_catalogue())``.
"""

from __future__ import annotations

import numpy as np

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition, UserView
from recloop.core.ports import Candidates, Observation
from recloop.core.spec import WorldSpec

SPEC = WorldSpec(n_items=30, user_obs_dim=4, item_feature_dim=4, slate_size=3,
                 num_candidates=6, history_len=5)


def make_catalogue(spec: WorldSpec = SPEC, seed: int = 0) -> ItemCatalogue:
    """The world's items: seeded standard-normal features, 3 decimals."""
    rng = np.random.default_rng(seed)
    return ItemCatalogue(rng.normal(size=(spec.n_items, spec.item_feature_dim)).round(3))


def make_transitions(spec: WorldSpec = SPEC, n: int = 64, seed: int = 0,
                     steps_per_session: int = 4,
                     catalogue: ItemCatalogue | None = None) -> list[Transition]:
    rng = np.random.default_rng(seed)
    rng.normal(size=(spec.n_items, spec.item_feature_dim))  # the stream as it always was
    item_feat = (catalogue or make_catalogue(spec)).features_NF
    out: list[Transition] = []
    session = 0
    while len(out) < n:
        session += 1
        user, sess = f"u{session}", f"s{session}"
        history: list[int] = []
        steps = []
        for _ in range(steps_per_session):
            obs = rng.normal(size=spec.user_obs_dim).round(3).tolist()
            pool = spec.num_candidates or spec.n_items
            cands = rng.choice(spec.n_items, size=pool, replace=False).tolist()
            slate = [cands[i] for i in rng.choice(pool, size=spec.slate_size, replace=False)]
            affinity = [float(np.dot(item_feat[i][: spec.user_obs_dim], obs[: spec.item_feature_dim]))
                        for i in slate]
            best = int(np.argmax(affinity))
            chosen = best if affinity[best] > 0.3 else None
            steps.append((obs, cands, slate, chosen, list(history)))
            if chosen is not None:
                history.append(slate[chosen])
        for step, (obs, cands, slate, chosen, hist) in enumerate(steps):
            last = step == len(steps) - 1
            nxt = None if last else steps[step + 1]
            out.append(Transition(
                transition_id=f"{sess}-{step}", user_id=user, session_id=sess,
                request_id=f"{sess}-r{step}",
                state=UserView(observation=obs, history=hist, step=step),
                slate=slate,
                propensities=[spec.slate_size / len(cands)] * spec.slate_size,
                candidates=cands if spec.num_candidates else [],
                policy="random", policy_version=0,
                chosen_item=None if chosen is None else slate[chosen],
                chosen_position=chosen,
                reward=0.0 if chosen is None else 1.0 + 0.1 * step,
                next_state=UserView(observation=nxt[0] if nxt else obs,
                                    history=nxt[4] if nxt else hist, step=step + 1),
                next_slate=nxt[2] if nxt else [],
                next_candidates=(nxt[1] if spec.num_candidates else []) if nxt else [],
                done=last, served_ts=float(step), outcome_ts=float(step) + 0.5,
            ))
    return out[:n]


def make_request(spec: WorldSpec = SPEC, seed: int = 0,
                 catalogue: ItemCatalogue | None = None) -> tuple[Observation, Candidates]:
    """A request with candidates, featured as serving features them (from ``catalogue``), or
    with random rows where a test needs no catalogue."""
    rng = np.random.default_rng(seed + 1000)
    n = spec.num_candidates or spec.n_items
    ids = rng.choice(spec.n_items, size=n, replace=False).astype(np.int64)
    feats = rng.normal(size=(n, spec.item_feature_dim)).astype(np.float32)
    if catalogue is not None:
        feats = catalogue.features(ids)
    obs = Observation(user_id="u", user_obs=rng.normal(size=spec.user_obs_dim).astype(np.float32),
                      history=tuple(int(i) for i in ids[:2]))
    return obs, Candidates(ids=ids, features_NF=feats)


def bandit_step(agent, policy, spec: WorldSpec, rng: np.random.Generator, t: int) -> None:
    """One step of a one-step bandit: the user clicks item 0 whenever it is shown (reward 1).

    The candidates are the whole catalogue in a fresh order, or none where the world offers
    none; the agent learns from the transition at once.
    """
    ids = rng.permutation(spec.n_items).astype(np.int64) if spec.num_candidates else \
        np.zeros(0, np.int64)
    obs = [0.5, -0.5]
    slate = policy.recommend(Observation("u", np.array(obs, np.float32)),
                             Candidates(ids, np.zeros((len(ids), 0), np.float32)), spec.slate_size)
    items = [int(i) for i in slate.items]
    pos = items.index(0) if 0 in items else None
    agent.learn_many([Transition(
        transition_id=str(t), user_id="u", session_id=str(t), request_id=str(t),
        state=UserView(observation=obs), slate=items,
        propensities=[float(p) for p in slate.propensities], candidates=[int(i) for i in ids],
        policy=policy.name, policy_version=0, chosen_item=None if pos is None else 0,
        chosen_position=pos, reward=0.0 if pos is None else 1.0,
        next_state=UserView(observation=obs), done=True, served_ts=0.0, outcome_ts=0.0)])
