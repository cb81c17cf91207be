"""A faust consumer that hands each fetched batch of input records to one batch handler.

faust delivers records one at a time: for every record its fetch loop starts two tasks (the
delivery and a flow-control wait), the conductor looks up the record's channel, the channel
decodes it into an ``Event`` and queues it, the agent's stream takes it off the queue, and
``take_events`` gathers it back into a batch and acks it on the next iteration. Measured on
the streams worker, that path cost ~180 µs of CPU per record against ~40 µs for the fold
itself, which capped one worker at ~4.5k records per CPU-second.

``BatchConsumer`` keeps everything else of faust's consumer (the group and its assignor, the
consumer thread, flow control across rebalances, table recovery, offset tracking, commits
that flush the producer first) and changes only the last step of its fetch loop: the records
of one ``getmany`` whose topic has a batch handler go to that handler as one list, and every
other record takes faust's ordinary per-record route.

The at-least-once bookkeeping is faust's own: each record is tracked (``track_message``)
before the handler sees it and acked (``ack``) after the handler returned, so

- a commit only covers records whose results the handler has given to the producer, and the
  commit flushes the producer first;
- a rebalance waits for the batch in hand (``stream_wait_empty`` waits until nothing tracked
  is unacked) before it gives partitions away;
- a handler that raises acks nothing; the error stops the worker like a crashing agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

BatchHandler = Callable[[list[Any]], Awaitable[None]]
"""Takes a list of faust ``Message``s (``topic``, ``partition``, ``offset``, ``key``,
``value``), all of one fetch, in each partition's order."""


class BatchConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer with batch delivery for the topics in ``batch_handlers``."""

    batch_handlers: dict[str, BatchHandler] = {}  # noqa: RUF012 - set per app by install()

    async def _drain_messages(self, fetcher: Any) -> None:  # the Fetcher's background loop
        handlers = self.batch_handlers
        deliver_one = self.callback
        read_offset = self._read_offset
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        stopping = self._stopped.is_set
        fetcher_stopping = fetcher._stopped.is_set
        while not (stopping() or fetcher_stopping()):
            # Give the loop a turn between fetches, as faust does: getmany may return at once.
            await self.sleep(0)
            if self.should_stop:
                break
            batches: dict[str, list[Any]] = {}
            async for tp, message in self.getmany(timeout=1.0):
                offset = message.offset
                last = read_offset[tp]
                if last is not None and offset < last:
                    continue  # already delivered before a seek back; faust drops these too
                if last is not None and offset - last > 1 and acks_enabled_for(message.topic):
                    # Offsets the broker skipped (compaction, transaction markers) must
                    # count as acked, or commits would stall at the hole.
                    await self._add_gap(tp, last + 1, offset)
                read_offset[tp] = offset
                handler_batch = batches.get(message.topic)
                if handler_batch is None and message.topic in handlers:
                    handler_batch = batches[message.topic] = []
                if handler_batch is None:
                    # faust's own route, unchanged: a rebalance may abandon the delivery.
                    await self.wait_first(deliver_one(message), self.suspend_flow.wait())
                else:
                    self.track_message(message)
                    handler_batch.append(message)
            for handler, messages in _by_handler(batches, handlers).items():
                await handler(messages)
                for message in messages:
                    self.ack(message)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()


def _by_handler(
    batches: dict[str, list[Any]], handlers: dict[str, BatchHandler]
) -> dict[BatchHandler, list[Any]]:
    """One list per handler: topics that share a handler are folded in one call.

    Handlers are compared by equality, not identity: each ``obj.method`` access makes a
    new bound method, equal to the others.
    """
    merged: dict[BatchHandler, list[Any]] = {}
    for topic, messages in batches.items():
        merged.setdefault(handlers[topic], []).extend(messages)
    return merged


def install(app: faust.App, handlers: dict[str, BatchHandler]) -> None:
    """Make ``app`` consume ``handlers``' topics in batches; call before any topic is made.

    The app still subscribes to those topics through an agent or ``app.topic`` (that is
    what puts them in the group's assignment and co-partitions the tables with them).
    """
    # faust builds the consumer itself from the transport's class attribute, so the handlers
    # ride on a subclass made for this app (several apps may live in one process: tests).
    consumer = type("BatchConsumer", (BatchConsumer,), {"batch_handlers": handlers})
    transport = type("BatchTransport", (faust_aiokafka.Transport,), {"Consumer": consumer})
    app.transport = transport(app.conf.broker_consumer, app)
