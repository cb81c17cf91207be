"""The local copy of the ``session.state`` changelog that serving conditions on.

One entry per user: the latest ``SessionState``. Updates arrive on a background thread and
reads happen on the request path; a dict assignment is atomic in CPython, so no lock is
needed for a reader to see either the old or the new state. Each update also feeds the
popularity counts with the positives that are new since the previous state.

Anyone who can write to the topic can write a state, and the topic is compacted, so a
hostile state comes back after every restart. A state whose view names an item outside the
catalogue (``[0, n_items)``, the size of the catalogue serving now; ``[0, 2**63)`` before
the first) in its history is
refused: the user's previous state is kept, the refusal counted in ``refused`` with its
reason in ``last_refusal``, and no id of it reaches a policy or the counts. (A policy
indexes its embeddings by these ids; the popularity counts never size an array by one.)
"""

from __future__ import annotations

from recloop.core.events import SessionState, UserView
from recloop.serving.fallback import PopularityCounts, history_increment

_INT64 = 1 << 63


class SessionCache:
    """user_id -> latest SessionState, plus click counts for the popularity fallback."""

    def __init__(self, popularity: PopularityCounts | None = None, n_items: int = 0) -> None:
        self._states: dict[str, SessionState] = {}
        self.popularity = popularity
        # The catalogue's size: given, or known to the counts (the server builds them with it).
        self.n_items = n_items or (popularity.n_items if popularity is not None else 0)
        self.updates = 0
        self.refused = 0
        self.last_refusal = ""

    def __len__(self) -> int:
        return len(self._states)

    def update(self, state: SessionState) -> str | None:
        """Cache ``state``; returns why it was refused instead, or None (module docstring)."""
        problem = self.problem(state)
        if problem is not None:
            self.refused += 1
            self.last_refusal = problem
            return problem
        previous = self._states.get(state.user_id)
        if self.popularity is not None:
            same_session = previous is not None and previous.session_id == state.session_id
            old = previous.view.history if same_session and previous is not None else []
            self.popularity.add(history_increment(list(old), list(state.view.history)))
        self._states[state.user_id] = state
        self.updates += 1
        return None

    def problem(self, state: SessionState) -> str | None:
        """Why ``state`` cannot be served from, or None."""
        history = state.view.history
        limit = self.n_items or _INT64
        if not history or (min(history) >= 0 and max(history) < limit):
            return None
        bad = next(i for i in history if not 0 <= i < limit)
        return (
            f"SessionState of user {state.user_id[:64]!r}: history item {str(bad)[:32]} is "
            f"outside the catalogue [0, {self.n_items or '2**63'})"
        )

    def follow_catalogue(self, n_items: int) -> None:
        """The catalogue serving answers from now has ``n_items`` items: later states are
        checked against it, and the counts count up to it."""
        self.n_items = n_items
        if self.popularity is not None:
            self.popularity.follow_catalogue(n_items)

    def view(self, user_id: str, session_id: str) -> UserView | None:
        """The user's view in this session, or ``None`` if none is known for it yet.

        A state from an earlier session is not used: its history belongs to that session,
        and the learner sees states of the session the slate was served in.
        """
        state = self._states.get(user_id)
        if state is None or state.session_id != session_id:
            return None
        return state.view
