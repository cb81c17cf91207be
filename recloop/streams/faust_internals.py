"""Every use of faust-streaming's, mode's and aiokafka's internals, in one guarded place.

The streams worker is fast because it steps around two of faust's costs (see
``recloop.streams.app``), and both detours go through names the libraries do not promise to
keep. They are all here, and nowhere else in ``recloop``; the rest of ``recloop.streams``
uses only this module's functions. On import it checks the installed versions against
``TESTED`` and refuses any other (``UntestedVersion``): a renamed private attribute would
otherwise not fail loudly but quietly turn batch delivery off or break at-least-once.
``RELIED_ON`` lists every name used, and ``tests/unit/test_faust_internals.py`` checks that
each one still exists on the installed libraries.

**Batch delivery** (``install_batch_delivery``). faust delivers records one at a time: for
every record its fetch loop starts two tasks (the delivery and a flow-control wait), the
conductor looks up the record's channel, the channel decodes it into an ``Event`` and queues
it, the agent's stream takes it off the queue, and ``take_events`` gathers it back into a
batch and acks it on the next iteration. Measured on the streams worker, that path cost
~180 µs of CPU per record against ~40 µs for the fold itself, which capped one worker at
~4.5k records per CPU-second. ``BatchConsumer`` keeps everything else of faust's consumer
(the group and its assignor, the consumer thread, flow control across rebalances, table
recovery, offset tracking, commits that flush the producer first) and changes only the last
step of its fetch loop: the records of one ``getmany`` whose topic has a batch handler go to
that handler as one list; every other record takes faust's ordinary per-record route.

The at-least-once bookkeeping stays faust's own: each record is tracked (``track_message``)
before the handler sees it and acked (``ack``) after the handler returned, so

- a commit only covers records whose results the handler has given to the producer, and the
  commit flushes the producer first;
- a rebalance waits for the batch in hand (``stream_wait_empty`` waits until nothing tracked
  is unacked) before it gives partitions away;
- a handler that raises acks nothing; the error stops the worker like a crashing agent.

**The stalled-commit guard.** faust commits a partition up to the first hole in its acked
offsets, and only once the hole's offsets are acked. After a broker outage the chaos run met
partitions whose commits stopped for good while their records went on being folded: offsets
between the committed one and the lowest acked one had been delivered, yet never entered the
acked bookkeeping (or left it in a commit that did not land), so nothing would ever fill the
hole. ``stalled_partitions`` states the rule that tells such a hole from one still being
filled: the fetch loop has already *delivered past* the hole (``read offset >= lowest
acked``), so those offsets are not coming again, and this has held on two checks
``STALL_CHECK_S`` apart, across several commits (a hole the gap bookkeeping covers is closed by
the next commit). The loop then forgets that partition's acked offsets and seeks it back to
its committed offset: its records from there are delivered again and acked, commits move on. Re-delivery is what
at-least-once allows, and what the worker meets after any restart: the fold takes a record it
has already applied as a duplicate. Each re-read is logged, with the offsets.

The private names it needs, and why:

- ``Consumer._drain_messages(fetcher)`` (faust): the fetch loop itself. faust's ``Fetcher``
  service runs it as its background task; overriding it is the only place a whole
  ``getmany`` is in hand. Were it renamed, the override would never run and every record
  would silently take the slow per-record route.
- ``Consumer._read_offset`` (faust): the last delivered offset per topic-partition, which
  faust's seek and assignment code also writes. The loop reads it to drop records already
  delivered before a seek back, and to see holes; it sets it as faust's loop does.
- ``Consumer._add_gap(tp, from, to)`` (faust): marks offsets the broker skipped
  (compaction, transaction markers) as acked, or commits would stall at the hole.
- ``Consumer._commit_every`` and ``Consumer._n_acked`` (faust): the count-based commit
  (``broker_commit_every``) that faust's loop runs; ``ack`` counts into ``_n_acked``.
- ``Consumer._acked``, ``Consumer._acked_index`` and ``Consumer._committed_offset`` (faust):
  the acked offsets (a list and a set) and the offset last committed, per topic-partition.
  The stalled-commit guard reads them, and empties a stalled partition's acked offsets before
  ``Consumer.seek`` (public) moves it back, so that its re-delivered records are acked afresh.
- ``Service._stopped`` (mode, faust's service library) on the consumer and on the fetcher:
  the loop's stop condition, exactly as faust's loop tests it.

Public names used beyond their documented purpose: ``App.transport`` is replaced by a
subclass of faust's aiokafka ``Transport`` whose ``Consumer`` class attribute is
``BatchConsumer`` (faust builds the consumer from that attribute); and the loop drives the
consumer's ``callback``, ``getmany``, ``track_message``, ``ack``, ``commit``, ``wait_first``,
``sleep``, ``suspend_flow``, ``should_stop`` and the conductor's ``acks_enabled_for``, as
faust's own loop does.

**Whole record batches** (``aiokafka_producer``). faust's ``Producer.send`` makes a future
and walks aiokafka's accumulator per record; ``recloop.streams.sender`` hands aiokafka whole
record batches instead (``AIOKafkaProducer.create_batch`` / ``send_batch``, whose
``BatchBuilder.append`` returns None when the batch is full).

- ``Producer._ensure_producer()`` (faust): the ``AIOKafkaProducer`` inside faust's producer
  service, the one faust flushes before it commits offsets, so batches sent through it are
  covered by the same commit rule as faust's own sends.

**Writing the table's store** (``table_store``). ``Table.__setitem__`` sends a changelog
record per write (``Table.on_key_set``). The worker writes each touched user's state once per
batch and sends the changelog (the compacted ``session.state``) itself, in record batches,
so it writes ``Table.data``, the table's local store, directly: no second changelog record,
and the store keeps the decoded state (recovery fills it with the changelog's bytes).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from importlib import metadata
from typing import Any, Literal, NamedTuple

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

TESTED: dict[str, tuple[str, ...]] = {
    "faust-streaming": ("0.15.3",),
    "mode-streaming": ("0.7.1",),
    "aiokafka": ("0.14.0",),
}
"""The versions this module was checked against (pinned in pyproject and the lock file)."""


class Reliance(NamedTuple):
    """One name of a library this module relies on."""

    owner: str
    """``module:Class`` that holds the name."""
    name: str
    on: Literal["class", "instance"]
    """``instance``: set in ``__init__``, so only an instance has it."""

    def owner_class(self) -> type:
        module, _, qualname = self.owner.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj  # type: ignore[no-any-return]

    @property
    def private(self) -> bool:
        return self.name.startswith("_")


_CONSUMER = "faust.transport.drivers.aiokafka:Consumer"
_FETCHER = "faust.transport.consumer:Fetcher"

RELIED_ON: tuple[Reliance, ...] = (
    # Batch delivery: private.
    Reliance(_CONSUMER, "_drain_messages", "class"),
    Reliance(_CONSUMER, "_read_offset", "instance"),
    Reliance(_CONSUMER, "_add_gap", "class"),
    Reliance(_CONSUMER, "_commit_every", "instance"),
    Reliance(_CONSUMER, "_acked", "instance"),
    Reliance(_CONSUMER, "_acked_index", "instance"),
    Reliance(_CONSUMER, "_committed_offset", "instance"),
    Reliance(_CONSUMER, "seek", "class"),
    Reliance(_CONSUMER, "_n_acked", "class"),
    Reliance(_CONSUMER, "_stopped", "instance"),
    Reliance(_FETCHER, "_stopped", "instance"),
    # Batch delivery: public hooks.
    Reliance("faust:App", "transport", "class"),
    Reliance("faust.transport.drivers.aiokafka:Transport", "Consumer", "class"),
    Reliance(_CONSUMER, "callback", "instance"),
    Reliance(_CONSUMER, "getmany", "class"),
    Reliance(_CONSUMER, "track_message", "class"),
    Reliance(_CONSUMER, "ack", "class"),
    Reliance(_CONSUMER, "commit", "class"),
    Reliance(_CONSUMER, "wait_first", "class"),
    Reliance(_CONSUMER, "sleep", "class"),
    Reliance(_CONSUMER, "suspend_flow", "instance"),
    Reliance(_CONSUMER, "should_stop", "class"),
    Reliance("faust.transport.conductor:Conductor", "acks_enabled_for", "class"),
    # Whole record batches.
    Reliance("faust.transport.drivers.aiokafka:Producer", "_ensure_producer", "class"),
    Reliance("aiokafka:AIOKafkaProducer", "create_batch", "class"),
    Reliance("aiokafka:AIOKafkaProducer", "send_batch", "class"),
    Reliance("aiokafka.producer.message_accumulator:BatchBuilder", "append", "class"),
    Reliance("aiokafka.producer.message_accumulator:BatchBuilder", "record_count", "class"),
    # The table's store.
    Reliance("faust:Table", "data", "class"),
)
"""Every library name this module uses; the unit tests check each still exists."""


class UntestedVersion(ImportError):
    """An installed faust-streaming, mode-streaming or aiokafka this module was not checked
    against."""


def installed_versions() -> dict[str, str | None]:
    """The installed version of each distribution in ``TESTED`` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for dist in TESTED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Raise ``UntestedVersion`` unless every installed version is one in ``TESTED``."""
    installed = installed_versions() if installed is None else installed
    if all(installed.get(dist) in versions for dist, versions in TESTED.items()):
        return

    def listed(versions: Mapping[str, Any]) -> str:
        return ", ".join(f"{dist} {versions[dist] or '(not installed)'}" for dist in TESTED)

    tested = {dist: " or ".join(versions) for dist, versions in TESTED.items()}
    raise UntestedVersion(
        f"recloop.streams relies on internals of faust-streaming, mode-streaming and aiokafka "
        f"and is tested only with {listed(tested)}; installed: {listed(installed)}. Install "
        "the tested versions (pip install -r requirements/lock.txt), or check every name in "
        "recloop.streams.faust_internals.RELIED_ON against the installed libraries and add "
        "their versions to TESTED."
    )


check_versions()

log = logging.getLogger(__name__)


# --- Batch delivery ------------------------------------------------------------------------

STALL_CHECK_S = 10.0
"""How often the fetch loop looks for stalled commits; a partition is re-read once it was
stalled on two checks in a row (the commit timer runs every ~3 s in between)."""


def stalled_partitions(
    acked: Mapping[Any, list[int]],
    committed: Mapping[Any, int | None],
    read: Mapping[Any, int | None],
) -> dict[Any, tuple[int, int]]:
    """The partitions whose commits cannot move any more: ``{tp: (committed, lowest acked)}``.

    A partition is stalled when its lowest acked offset lies more than one past its committed
    offset (faust's commit waits for the hole between them to be acked) and the fetch loop has
    already delivered that lowest acked offset or later, so the hole's offsets are not coming
    again. A partition with nothing acked, nothing committed or nothing delivered yet is not.
    """
    stalled = {}
    for tp, offsets in acked.items():
        low = min(offsets, default=None)
        done = committed.get(tp)
        last = read.get(tp)
        if low is None or done is None or last is None:
            continue
        if low - done > 1 and last >= low:
            stalled[tp] = (done, low)
    return stalled


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
        suspects: dict[Any, tuple[int, int]] = {}
        checked_at = time.monotonic()
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
            for handler, messages in merge_by_handler(batches, handlers).items():
                await handler(messages)
                for message in messages:
                    self.ack(message)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            if time.monotonic() - checked_at >= STALL_CHECK_S:
                checked_at = time.monotonic()
                suspects = await self._reread_stalled(suspects)

    async def _reread_stalled(
        self, suspects: dict[Any, tuple[int, int]]
    ) -> dict[Any, tuple[int, int]]:
        """Seek back each batch partition stalled now and, with the same hole, at the last
        check; return the ones stalled now for the next check."""
        acked = {
            tp: offsets for tp, offsets in self._acked.items() if tp.topic in self.batch_handlers
        }
        stalled = stalled_partitions(acked, self._committed_offset, self._read_offset)
        for tp, (done, low) in stalled.items():
            if suspects.get(tp) != (done, low):
                continue
            log.warning(
                "streams: commits on %s[%d] stalled at offset %d: offsets up to %d were "
                "delivered but never acked; reading the partition again from %d",
                tp.topic, tp.partition, done, low - 1, done,
            )  # fmt: skip
            # Forget what was acked above the hole: it is delivered and acked again.
            self._acked[tp].clear()
            self._acked_index[tp].clear()
            await self.seek(tp, done)
        return stalled


def merge_by_handler(
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


def install_batch_delivery(app: faust.App, handlers: dict[str, BatchHandler]) -> None:
    """Make ``app`` consume ``handlers``' topics in batches; call before any topic is made.

    The app still subscribes to those topics through an agent or ``app.topic`` (that is
    what puts them in the group's assignment and co-partitions the tables with them).
    """
    # faust builds the consumer itself from the transport's class attribute, so the handlers
    # ride on a subclass made for this app (several apps may live in one process: tests).
    consumer = type("BatchConsumer", (BatchConsumer,), {"batch_handlers": handlers})
    transport = type("BatchTransport", (faust_aiokafka.Transport,), {"Consumer": consumer})
    app.transport = transport(app.conf.broker_consumer, app)


def installed_batch_handlers(app: faust.App) -> dict[str, BatchHandler]:
    """The handlers ``install_batch_delivery`` gave ``app`` (empty if it was not called)."""
    consumer = app.transport.Consumer
    if isinstance(consumer, type) and issubclass(consumer, BatchConsumer):
        return consumer.batch_handlers
    return {}


# --- Whole record batches ------------------------------------------------------------------


def aiokafka_producer(app: faust.App) -> Any:
    """The started ``AIOKafkaProducer`` inside ``app``'s producer (raises if not started)."""
    return app.producer._ensure_producer()  # type: ignore[attr-defined]


# --- The table's store ---------------------------------------------------------------------


def table_store(table: Any) -> MutableMapping[Any, Any]:
    """``table``'s local store: reading and writing it sends no changelog record."""
    store: MutableMapping[Any, Any] = table.data
    return store
