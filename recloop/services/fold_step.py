"""The streams fold on a ``Bus`` without faust: the in-process loop's streams worker.

One ``step()`` reads what ``rec.slates`` and ``rec.feedback`` have, folds each event into its
user's state with the pure ``recloop.streams.fold.apply`` and publishes, per batch, the
transitions on ``rec.transitions`` *before* the changed states on ``session.state`` (the
order the faust worker keeps: a state never runs ahead of the transitions it implies),
then commits. The states live in a dict (the faust worker's table); an event the fold
refuses (feedback that contradicts its slate, no room in a buffer) is dead-lettered by the
``Reader``, and so is feedback the fold had buffered and can never use
(``fold.take_rejected``), re-encoded with offset -1.
"""

from __future__ import annotations

from recloop.core import codec
from recloop.core.events import SessionState
from recloop.core.ports import Bus
from recloop.core.settings import Settings
from recloop.kafka.deadletter import Consumed, Reader
from recloop.streams import fold
from recloop.streams.fold import FoldConfig


class FoldStep:
    """``fold.apply`` over ``rec.slates`` + ``rec.feedback``; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        group_id: str = "recloop-streams",
        config: FoldConfig = fold.DEFAULT,
    ) -> None:
        self.topics = settings.topics
        self.bus = bus
        self.config = config
        self.reader = Reader(bus, self.topics, ["rec.slates", "rec.feedback"],
                             self.topics.group(group_id),
                             "streams")  # fmt: skip
        self.states: dict[str, SessionState] = {}
        self.transitions = 0

    def step(self, max_records: int = 5000) -> int:
        """Fold one batch; returns how many events it read."""
        batch = self.reader.poll_batch(max_records, timeout=0.0)
        if not batch:
            return 0
        changed: dict[str, SessionState] = {}
        partitions: dict[str, int] = {}
        for item in batch:
            event = item.value
            user_id: str = event.user_id  # type: ignore[attr-defined]  # slates and feedback
            try:
                state, out = fold.apply(self.states.get(user_id), event, self.config)
            except fold.InvalidEvent as exc:
                self.reader.dead_letter(item, str(exc))
                continue
            self.states[user_id] = changed[user_id] = state
            partitions[user_id] = item.partition
            for transition in out:
                self.bus.publish(self.topics.transitions, transition.user_id.encode(),
                                 codec.encode(transition))  # fmt: skip
            self.transitions += len(out)
        for user_id, state in changed.items():
            if state.early_feedback:
                state = self._take_rejected(user_id, partitions[user_id], state)
            self.bus.publish(self.topics.session_state, user_id.encode(), codec.encode(state))
        self.bus.flush()
        self.reader.commit()
        return len(batch)

    def _take_rejected(self, user_id: str, partition: int, state: SessionState) -> SessionState:
        """``state`` without the buffered feedback it can never use, now dead-lettered."""
        state, taken = fold.take_rejected(state)
        for feedback, reason in taken:
            buffered = Consumed(self.topics.feedback, partition, -1, user_id.encode(), feedback, 0)
            self.reader.dead_letter(buffered, reason)
        self.states[user_id] = state
        return state
