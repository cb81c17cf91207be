"""Send a folded batch's results as whole Kafka record batches, one per topic-partition.

aiokafka's ``send`` makes a future and walks the accumulator for every record; a worker
writing thousands of states and transitions per folded batch paid that for each one (a
quarter of its CPU). Here the records of one topic-partition are appended to aiokafka's own
batch builder and handed over with ``send_batch``: one future per record batch, the same
bytes on the wire. The producer's ``flush`` waits for these batches like any other, so a
commit that flushes the producer first still covers them.

Dead letters (``DeadLetters``) go one at a time through faust's producer, and must always
be written (issue 12): one whose record is over ``core.dlq.MAX_RECORD_BYTES`` or would be
over the producer's request limit goes truncated at once (``core.dlq.truncated``: the first
``TRUNCATED_BYTES`` of its key and value, the value's size in the ``original_size`` header);
one the producer or the broker refuses for its size is sent again truncated. Any other
failure, or a truncated dead letter refused too, raises where its delivery is awaited: the
worker stops before it acks the record, so no commit passes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from faust.exceptions import ProducerSendError

from recloop.core.dlq import MAX_RECORD_BYTES, dlq_headers, truncated
from recloop.core.topics import DLQ_SUFFIX
from recloop.streams.batch import RawRecord

log = logging.getLogger(__name__)

SIZE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError)
"""What aiokafka raises, or fails a delivery with, for a record too large to send (faust's
``send`` raises ``ProducerSendError`` from it)."""

FRAMING_BYTES = 1024
"""More than a record batch's header and one record's framing take, on top of its bytes."""

Send = Callable[[str, bytes | None, bytes | None, list[tuple[str, bytes]]], Awaitable[Any]]
"""``send(topic, key, value, headers)``: faust's ``Producer.send``, whose awaitable resolves
to the delivery (a future of the broker's acknowledgement)."""


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


class DeadLetters:
    """Sends dead letters, whole or truncated; ``take`` hands over the deliveries under way.

    Each delivery taken resolves once its dead letter is on the broker (truncated if the whole
    one was refused for its size), or raises.
    """

    def __init__(self, send: Send, max_request_size: int, consumer: str) -> None:
        self._send = send
        self._max_request_size = max_request_size
        self._consumer = consumer
        self._deliveries: list[asyncio.Future] = []

    def take(self) -> list[asyncio.Future]:
        """The deliveries of the dead letters sent since the last ``take``."""
        deliveries, self._deliveries = self._deliveries, []
        return deliveries

    def fits_whole(self, record: RawRecord, error: str) -> bool:
        """Whether ``record``'s dead letter may go whole: the record is one the consumers
        decode at all, and the whole dead letter is within the producer's request limit."""
        value, key = record.value or b"", record.key or b""
        if len(value) > MAX_RECORD_BYTES:
            return False
        headers = self._headers(record, error, None)
        size = len(key) + len(value) + sum(len(k) + len(v) for k, v in headers) + FRAMING_BYTES
        return size <= self._max_request_size

    async def send(self, record: RawRecord, error: str) -> None:
        """Send ``record``'s dead letter with ``error`` as its reason."""
        if self.fits_whole(record, error):
            try:
                delivery = await self._send_one(record, error, whole=True)
            except (ProducerSendError, *SIZE_ERRORS) as exc:
                cause = exc.__cause__ if isinstance(exc, ProducerSendError) else exc
                if not isinstance(cause, SIZE_ERRORS):
                    raise
                log.warning("streams: a dead letter is too large to send (%s); truncated", exc)
            else:
                self._deliveries.append(
                    asyncio.ensure_future(self._whole_or_truncated(delivery, record, error))
                )
                return
        self._deliveries.append(await self._send_one(record, error, whole=False))

    async def _whole_or_truncated(
        self, delivery: asyncio.Future, record: RawRecord, error: str
    ) -> Any:
        try:
            return await delivery
        except SIZE_ERRORS as exc:
            log.warning("streams: the broker refused a whole dead letter (%r); truncated", exc)
        return await (await self._send_one(record, error, whole=False))

    async def _send_one(self, record: RawRecord, error: str, whole: bool) -> asyncio.Future:
        key, value, size = record.key, record.value, None
        if not whole:
            size = len(value or b"")
            key = None if key is None else truncated(key)
            value = None if value is None else truncated(value)
        headers = self._headers(record, error, size)
        delivery = await self._send(f"{record.topic}{DLQ_SUFFIX}", key, value, headers)
        return asyncio.ensure_future(delivery)

    def _headers(
        self, record: RawRecord, error: str, original_size: int | None
    ) -> list[tuple[str, bytes]]:
        return dlq_headers(
            error, record.topic, record.partition, record.offset, self._consumer, original_size
        )
