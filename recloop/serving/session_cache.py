"""The local copy of the ``session.state`` changelog that serving conditions on.

One entry per user: the latest ``SessionState``. Updates arrive on a background thread and
reads happen on the request path; a dict assignment is atomic in CPython, so no lock is
needed for a reader to see either the old or the new state. Each update also feeds the
popularity counts with the positives that are new since the previous state.
"""

from __future__ import annotations

from recloop.core.events import SessionState, UserView
from recloop.serving.fallback import PopularityCounts, history_increment


class SessionCache:
    """user_id -> latest SessionState, plus click counts for the popularity fallback."""

    def __init__(self, popularity: PopularityCounts | None = None) -> None:
        self._states: dict[str, SessionState] = {}
        self.popularity = popularity
        self.updates = 0

    def __len__(self) -> int:
        return len(self._states)

    def update(self, state: SessionState) -> None:
        previous = self._states.get(state.user_id)
        if self.popularity is not None:
            same_session = previous is not None and previous.session_id == state.session_id
            old = previous.view.history if same_session and previous is not None else []
            self.popularity.add(history_increment(list(old), list(state.view.history)))
        self._states[state.user_id] = state
        self.updates += 1

    def view(self, user_id: str, session_id: str) -> UserView | None:
        """The user's view in this session, or ``None`` if none is known for it yet.

        A state from an earlier session is not used: its history belongs to that session,
        and the learner sees states of the session the slate was served in.
        """
        state = self._states.get(user_id)
        if state is None or state.session_id != session_id:
            return None
        return state.view
