"""Events to tensors: the ONLY place where ``recloop.core.events`` records become torch tensors.

Three entry points:

- ``to_batch(transitions, spec, catalogue)`` turns answered slates into a ``TransitionBatch``
  for ``update``, including the slate actually served next (``Transition.next_slate``, which
  SARSA targets need; the streams fold fills it in, empty when ``done``).
- ``request_batch(observation, candidates, spec)`` turns one serving request
  (``recloop.core.ports.Observation`` + ``Candidates``) into a ``RequestBatch`` of batch size 1, so a
  policy sees exactly the layout its training batches had.
- ``whole_catalogue(spec, catalogue)``: every item with its catalogue features, what a policy
  ranks when a request names no candidates.

Item features. Records carry item ids only (schema v2, ``recloop.core.events``); every feature
row a batch holds (candidates, slate, next slate, next candidates) is looked up by id in the
``recloop.core.catalogue.ItemCatalogue``, the same table serving builds its ``Candidates``
from, so train-time and serve-time features of an item are one row. Without a catalogue
(id-only worlds, F = 0, or tests that need no features) they are zeros; a catalogue of another
width is an error, never silently cut or padded. An id the catalogue does not hold yet gets
zeros (``ItemCatalogue.features``).

Layout conventions (names carry shapes: B batch, U user obs, H history, K slate, N candidates,
F item features):

- history is the user's recent positive items, oldest first, the last H kept, left-aligned and
  padded with -1 (``history_mask_BH`` marks real entries);
- candidates are padded with -1 to the widest row in the batch (``candidates_mask_BN``);
  an empty candidate list means "the whole catalogue" and gives N = 0 for that row;
- ``slate_cand_idx_BK`` is each slate item's index among the row's candidates (-1 when absent
  or when the row has none); a slate item's features come from the catalogue either way;
- ``chosen_B`` indexes into the slate, -1 = no click;
- an item id outside the catalogue (``[0, spec.n_items)``) counts as absent, -1, wherever it
  is (history, candidates, slates, the chosen item): no network has a row for it, and an id
  past int64 would not even convert. The learner refuses such transitions before they get
  here (``refusal``; the contract's decoder refuses ids past int64 already); this keeps a
  transition that got in anyway from crashing every update that samples it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import Transition, UserView
from recloop.core.ports import Candidates, Observation
from recloop.core.spec import WorldSpec


def refusal(transition: Transition, spec: WorldSpec) -> str | None:
    """Why the learner must not learn from ``transition`` (an item id outside the catalogue),
    or None. For the consumer to dead-letter it with this reason before ``learn_many``."""
    n = spec.n_items
    rows = (transition.state.history, transition.next_state.history, transition.slate,
            transition.candidates, transition.next_slate, transition.next_candidates)  # fmt: skip
    for row in rows:
        if row and not (min(row) >= 0 and max(row) < n):
            bad = next(i for i in row if not 0 <= i < n)
            return (f"transition {transition.transition_id[:64]!r}: item {str(bad)[:32]} is "
                    f"outside the catalogue [0, {n})")  # fmt: skip
    chosen = transition.chosen_item
    if chosen is not None and not 0 <= chosen < n:
        return (f"transition {transition.transition_id[:64]!r}: chosen item {str(chosen)[:32]} "
                f"is outside the catalogue [0, {n})")  # fmt: skip
    return None


def _in_catalogue(ids: Sequence[int], n_items: int) -> Sequence[int]:
    """``ids`` with each id outside ``[0, n_items)`` as -1 (module docstring); the common,
    clean row comes back as is, checked in C."""
    if not ids or (min(ids) >= 0 and max(ids) < n_items):
        return ids
    return [i if 0 <= i < n_items else -1 for i in ids]


@dataclass(frozen=True)
class StateBatch:
    """What the policy conditions on, for B users."""

    user_obs_BU: torch.Tensor  # float32
    history_BH: torch.Tensor  # int64 item ids, -1 padded, oldest first, left-aligned
    history_mask_BH: torch.Tensor  # bool


@dataclass(frozen=True)
class RequestBatch:
    """One (or B) serving requests: the state plus the candidates to choose from."""

    state: StateBatch
    candidates_BN: torch.Tensor  # int64, -1 padded
    candidates_mask_BN: torch.Tensor  # bool
    cand_features_BNF: torch.Tensor  # float32, zeros where padded


@dataclass(frozen=True)
class TransitionBatch:
    """B answered slates. Tensors are never modified in place by learners."""

    user_obs_BU: torch.Tensor
    history_BH: torch.Tensor
    history_mask_BH: torch.Tensor
    next_user_obs_BU: torch.Tensor
    next_history_BH: torch.Tensor
    next_history_mask_BH: torch.Tensor
    slate_BK: torch.Tensor  # int64 item ids, -1 padded if a slate is shorter than K
    slate_mask_BK: torch.Tensor  # bool
    slate_cand_idx_BK: torch.Tensor  # int64 index of each slate item in candidates_BN, or -1
    propensities_BK: torch.Tensor  # float32 behaviour inclusion probability, 0 where padded
    candidates_BN: torch.Tensor
    candidates_mask_BN: torch.Tensor
    cand_features_BNF: torch.Tensor
    slate_features_BKF: torch.Tensor
    chosen_B: torch.Tensor  # int64 position in the slate, -1 = no click
    chosen_item_B: torch.Tensor  # int64 item id, -1 = no click
    reward_B: torch.Tensor  # float32
    done_B: torch.Tensor  # float32 0/1
    next_slate_mask_B: torch.Tensor  # bool: the slate served next is known
    next_slate_BK: torch.Tensor  # int64, -1 where unknown
    next_slate_item_mask_BK: torch.Tensor  # bool
    next_slate_features_BKF: torch.Tensor  # float32
    next_candidates_BN: torch.Tensor  # candidates of the next request (width may differ)
    next_candidates_mask_BN: torch.Tensor
    next_cand_features_BNF: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.reward_B.shape[0])

    @property
    def state(self) -> StateBatch:
        return StateBatch(self.user_obs_BU, self.history_BH, self.history_mask_BH)

    @property
    def next_state(self) -> StateBatch:
        return StateBatch(self.next_user_obs_BU, self.next_history_BH, self.next_history_mask_BH)

    @property
    def clicked_B(self) -> torch.Tensor:
        """bool: the user consumed an item of the slate."""
        return self.chosen_B >= 0

    def clone(self) -> TransitionBatch:
        """A deep copy (tests use it to check a learner left its batch alone)."""
        return TransitionBatch(**{f.name: getattr(self, f.name).clone() for f in fields(self)})


def _views_arrays(views: Sequence[UserView], spec: WorldSpec):
    B, H, U = len(views), spec.history_len, spec.user_obs_dim
    obs_BU = np.zeros((B, U), np.float32)
    hist_BH = np.full((B, H), -1, np.int64)
    if U:
        rows = [view.observation for view in views]
        if all(len(r) == U for r in rows):  # the common case: one conversion for the batch
            obs_BU[:] = np.asarray(rows, np.float32).reshape(B, U)
        else:
            for b, r in enumerate(rows):
                o = np.asarray(r, np.float32)[:U]
                obs_BU[b, : o.shape[0]] = o
    for b, view in enumerate(views):
        recent = _in_catalogue(view.history[-H:], spec.n_items)
        if recent:
            hist_BH[b, : len(recent)] = recent
    return obs_BU, hist_BH


def item_features(ids: np.ndarray, spec: WorldSpec,
                  catalogue: ItemCatalogue | None) -> np.ndarray:
    """float32 ``ids.shape + (F,)``: the catalogue's rows of ``ids`` (-1 and ids it does not
    hold give zeros), or zeros without a catalogue or features (module docstring)."""
    F = spec.item_feature_dim
    if catalogue is None or F == 0:
        return np.zeros((*ids.shape, F), np.float32)
    if catalogue.feature_dim != F:
        raise ValueError(f"catalogue v{catalogue.version} has {catalogue.feature_dim} item "
                         f"features, the agent's spec {F}")
    return catalogue.features(ids)


def _candidate_ids(cands: Sequence[Sequence[int]], spec: WorldSpec) -> np.ndarray:
    """int64 (B, N), -1 padded to the widest row (N = 0 when no row names candidates)."""
    B = len(cands)
    cands = [_in_catalogue(c, spec.n_items) for c in cands]
    N = max((len(c) for c in cands), default=0)
    if N and all(len(c) == N for c in cands):  # every row full: one conversion, no loop
        return np.asarray(cands, np.int64).reshape(B, N)
    ids_BN = np.full((B, N), -1, np.int64)
    for b, ids in enumerate(cands):
        if ids:
            ids_BN[b, : len(ids)] = ids
    return ids_BN


def _slate_index(slates_BK: np.ndarray, ids_BN: np.ndarray) -> np.ndarray:
    """Index of each slate item among its row's candidates, -1 if absent (or no candidates)."""
    B, K = slates_BK.shape
    if ids_BN.shape[1] == 0:  # whole-catalogue requests: nothing to look up
        return np.full((B, K), -1, np.int64)
    match_BKN = (slates_BK[:, :, None] == ids_BN[:, None, :]) & (slates_BK[:, :, None] >= 0)
    return np.where(match_BKN.any(-1), match_BKN.argmax(-1), -1).astype(np.int64)


def _slates(slates: Sequence[Sequence[int]], K: int, n_items: int) -> np.ndarray:
    out_BK = np.full((len(slates), K), -1, np.int64)
    for b, items in enumerate(slates):
        items = list(_in_catalogue(items, n_items))[:K]
        if items:
            out_BK[b, : len(items)] = items
    return out_BK


def to_batch(transitions: Sequence[Transition], spec: WorldSpec,
             catalogue: ItemCatalogue | None = None) -> TransitionBatch:
    """Stack transitions into tensors, every item feature row from ``catalogue`` (module
    docstring); rows whose ``next_slate`` is empty get ``next_slate_mask_B`` False: the
    episode ended or the successor is unknown."""
    if not transitions:
        raise ValueError("to_batch needs at least one transition")
    B, K = len(transitions), spec.slate_size
    obs_BU, hist_BH = _views_arrays([t.state for t in transitions], spec)
    nobs_BU, nhist_BH = _views_arrays([t.next_state for t in transitions], spec)
    ids_BN = _candidate_ids([t.candidates for t in transitions], spec)
    slate_BK = _slates([t.slate for t in transitions], K, spec.n_items)
    idx_BK = _slate_index(slate_BK, ids_BN)
    prop_BK = np.zeros((B, K), np.float32)
    chosen_B = np.full(B, -1, np.int64)
    for b, t in enumerate(transitions):
        p = np.asarray(t.propensities, np.float32)[:K]
        prop_BK[b, : p.shape[0]] = p
        if t.chosen_item is not None and 0 <= t.chosen_item < spec.n_items:
            pos = t.chosen_position
            if pos is None or pos >= K or slate_BK[b, pos] != t.chosen_item:
                hits = np.flatnonzero(slate_BK[b] == t.chosen_item)
                pos = int(hits[0]) if hits.size else -1
            chosen_B[b] = pos
    # The next request's slate and candidates (zero-width rows where there is no successor).
    has_next_B = np.array([len(t.next_slate) > 0 for t in transitions], bool)
    nslate_BK = _slates([t.next_slate for t in transitions], K, spec.n_items)
    nids_BN = _candidate_ids([t.next_candidates for t in transitions], spec)
    # One catalogue look-up for the four id tables (a single fancy index, no per-item loop).
    widths = np.cumsum([0, ids_BN.shape[1], K, K, nids_BN.shape[1]])
    feats = item_features(np.concatenate([ids_BN, slate_BK, nslate_BK, nids_BN], axis=1),
                          spec, catalogue)
    feat_BNF, sfeat_BKF, nsfeat_BKF, nfeat_BNF = (
        np.ascontiguousarray(feats[:, lo:hi])
        for lo, hi in zip(widths[:-1], widths[1:], strict=True))
    t_ = torch.from_numpy
    return TransitionBatch(
        user_obs_BU=t_(obs_BU),
        history_BH=t_(hist_BH),
        history_mask_BH=t_(hist_BH >= 0),
        next_user_obs_BU=t_(nobs_BU),
        next_history_BH=t_(nhist_BH),
        next_history_mask_BH=t_(nhist_BH >= 0),
        slate_BK=t_(slate_BK),
        slate_mask_BK=t_(slate_BK >= 0),
        slate_cand_idx_BK=t_(idx_BK),
        propensities_BK=t_(prop_BK),
        candidates_BN=t_(ids_BN),
        candidates_mask_BN=t_(ids_BN >= 0),
        cand_features_BNF=t_(feat_BNF),
        slate_features_BKF=t_(sfeat_BKF),
        chosen_B=t_(chosen_B),
        chosen_item_B=t_(np.array([t.chosen_item if t.chosen_item is not None
                                   and 0 <= t.chosen_item < spec.n_items else -1
                                   for t in transitions], np.int64)),
        reward_B=t_(np.array([t.reward for t in transitions], np.float32)),
        done_B=t_(np.array([float(t.done) for t in transitions], np.float32)),
        next_slate_mask_B=t_(has_next_B),
        next_slate_BK=t_(nslate_BK),
        next_slate_item_mask_BK=t_(nslate_BK >= 0),
        next_slate_features_BKF=t_(nsfeat_BKF),
        next_candidates_BN=t_(nids_BN),
        next_candidates_mask_BN=t_(nids_BN >= 0),
        next_cand_features_BNF=t_(nfeat_BNF),
    )


def request_batch(observation: Observation, candidates: Candidates, spec: WorldSpec) -> RequestBatch:
    """One serving request as a batch of size 1, laid out exactly like ``to_batch``'s rows."""
    view = UserView(
        observation=[float(x) for x in np.asarray(observation.user_obs).reshape(-1)],
        history=[int(i) for i in observation.history],
    )
    obs_BU, hist_BH = _views_arrays([view], spec)
    ids_N = np.asarray(candidates.ids, np.int64).reshape(-1)
    F = spec.item_feature_dim
    given = np.asarray(candidates.features_NF, np.float32)
    if given.shape == (ids_N.shape[0], F):
        feat_NF = np.ascontiguousarray(given)  # the common case: no per-request copy
    else:
        feat_NF = np.zeros((ids_N.shape[0], F), np.float32)
        if F and given.size:
            given = given.reshape(ids_N.shape[0], -1)[:, :F]
            feat_NF[:, : given.shape[1]] = given
    with warnings.catch_warnings():
        # Serving may hand over the catalogue's read-only matrix (a whole catalogue): it is
        # shared, not copied; no policy writes into a request's tensors.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        cand_features_BNF = torch.from_numpy(feat_NF[None])
    return RequestBatch(
        state=StateBatch(torch.from_numpy(obs_BU), torch.from_numpy(hist_BH),
                         torch.from_numpy(hist_BH >= 0)),
        candidates_BN=torch.from_numpy(ids_N[None, :].copy()),
        candidates_mask_BN=torch.ones((1, ids_N.shape[0]), dtype=torch.bool),
        cand_features_BNF=cand_features_BNF,
    )


def whole_catalogue(spec: WorldSpec, catalogue: ItemCatalogue | None) -> Candidates:
    """Every item ``0 .. spec.n_items - 1`` with its catalogue features: what a policy ranks
    when a request names no candidates. Zero-width features in an id-only world; a world with
    features and no catalogue is an error (ranking on zeros is what issue 13 removed)."""
    ids_N = np.arange(spec.n_items, dtype=np.int64)
    if catalogue is None and spec.item_feature_dim:
        raise ValueError(f"whole_catalogue: the world has {spec.item_feature_dim} item "
                         "features and no catalogue was given; refusing to rank on zeros")
    return Candidates(ids=ids_N, features_NF=item_features(ids_N, spec, catalogue))
