"""Send a folded batch's results as whole Kafka record batches, one per topic-partition.

aiokafka's ``send`` makes a future and walks the accumulator for every record; a worker
writing thousands of states and transitions per folded batch paid that for each one (a
quarter of its CPU). Here the records of one topic-partition are appended to aiokafka's own
batch builder and handed over with ``send_batch``: one future per record batch, the same
bytes on the wire. The producer's ``flush`` waits for these batches like any other, so a
commit that flushes the producer first still covers them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any


class BatchSender:
    """Gathers (topic, partition, key, value) records; ``send`` hands them to a producer."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> None:
        self._pending.setdefault((topic, partition), []).append((key, value))

    def __len__(self) -> int:
        return sum(len(records) for records in self._pending.values())

    async def send(self, producer: Any) -> list[asyncio.Future]:
        """Send everything gathered through an ``AIOKafkaProducer``; one future per batch.

        A future resolves when its batch is on the broker (with the producer's acks).
        """
        pending, self._pending = self._pending, {}
        deliveries: list[asyncio.Future] = []
        for (topic, partition), records in pending.items():
            batch = producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is not None:
                    continue
                # Full: send it and start the next one with this record.
                deliveries.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    size = len(value or b"")
                    raise ValueError(
                        f"a {size}-byte record for {topic} does not fit in a producer batch; "
                        "raise the producer's max batch size"
                    )
            if batch.record_count():
                deliveries.append(await producer.send_batch(batch, topic, partition=partition))
        return deliveries


async def send_transitions_then_states(
    producer: Any,
    transitions: BatchSender,
    states: BatchSender,
    sent_before: Sequence[Awaitable[Any]] = (),
) -> list[asyncio.Future]:
    """Send a folded batch's results in the order recovery needs; return the states' futures.

    The transitions must be on the broker before the states that count them as sent: a state
    there without its transitions would, after a crash, make the replayed records duplicates
    and lose those transitions for good. So this waits for the transitions' acknowledgements
    (raising if one failed) before it hands over the states; likewise for ``sent_before``,
    deliveries already under way that the states must not overtake (dead letters of records
    the states no longer hold).
    """
    pending = [*sent_before, *(await transitions.send(producer) if len(transitions) else ())]
    if pending:
        await asyncio.gather(*pending)
    return await states.send(producer)
