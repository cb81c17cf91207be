"""The topic table: every Kafka topic recloop uses, defined once.

All per-user topics are keyed by ``user_id`` and share one partition count, so a user's
requests, slates, feedback, state and transitions live on the same partition number
everywhere (faust needs that co-partitioning). A deployment prefix, if set, is prepended
to every name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recloop.core import events

DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class TopicSpec:
    """One row of the topic table."""

    base_name: str
    key: str
    value: Any  # a Record type or a union of them
    compacted: bool
    per_user: bool
    description: str


TOPIC_TABLE: tuple[TopicSpec, ...] = (
    TopicSpec("rec.requests", "user_id", events.RecRequest, False, True, "sim/clients -> serving"),
    TopicSpec("rec.slates", "user_id", events.SlateServed, False, True, "serving -> sim, streams"),
    TopicSpec("rec.feedback", "user_id", events.Feedback, False, True, "sim -> streams"),
    TopicSpec("session.state", "user_id", events.SessionState, True, True, "streams -> serving"),
    TopicSpec("rec.transitions", "user_id", events.Transition, False, True, "streams -> learner"),
    TopicSpec(
        "policy.snapshots", "policy", events.PolicyPublished, True, False, "learner -> serving"
    ),
    TopicSpec("sim.outcomes", "user_id", events.EpisodeOutcome, False, True, "sim -> dashboards"),
    TopicSpec("items", "first_item", events.ItemChunk, True, False, "catalogue owner -> all"),
    TopicSpec(
        "catalogue", "catalogue", events.CatalogueAnnounced, True, False, "catalogue owner -> all"
    ),
)


@dataclass(frozen=True)
class Topics:
    """Resolved topic names for one deployment (optionally prefixed)."""

    prefix: str = ""

    def name(self, base_name: str) -> str:
        if base_name not in _BY_NAME:
            raise KeyError(f"unknown topic {base_name!r}; known: {sorted(_BY_NAME)}")
        return f"{self.prefix}{base_name}"

    def group(self, name: str) -> str:
        """A consumer group (or faust app id) of this deployment: under the same prefix, so
        two deployments on one broker never share a group and stall each other's rebalances."""
        return f"{self.prefix}{name}"

    def dlq(self, topic: str) -> str:
        """The dead-letter topic of an already-resolved topic name."""
        return f"{topic}{DLQ_SUFFIX}"

    @property
    def requests(self) -> str:
        return self.name("rec.requests")

    @property
    def slates(self) -> str:
        return self.name("rec.slates")

    @property
    def feedback(self) -> str:
        return self.name("rec.feedback")

    @property
    def session_state(self) -> str:
        return self.name("session.state")

    @property
    def transitions(self) -> str:
        return self.name("rec.transitions")

    @property
    def snapshots(self) -> str:
        return self.name("policy.snapshots")

    @property
    def outcomes(self) -> str:
        return self.name("sim.outcomes")

    @property
    def items(self) -> str:
        return self.name("items")

    @property
    def catalogue(self) -> str:
        return self.name("catalogue")

    def all(self) -> list[tuple[str, TopicSpec]]:
        """Every topic with its spec, resolved for this prefix (DLQs not included)."""
        return [(self.name(spec.base_name), spec) for spec in TOPIC_TABLE]


_BY_NAME = {spec.base_name: spec for spec in TOPIC_TABLE}


def spec(base_name: str) -> TopicSpec:
    return _BY_NAME[base_name]
