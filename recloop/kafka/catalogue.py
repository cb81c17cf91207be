"""The catalogue over a ``Bus``: publish a version, follow the newest one.

``publish_catalogue`` writes a catalogue's chunks to ``items``, waits until the bus has
acknowledged them, then announces the version on ``catalogue`` (``recloop.core.catalogue``
says why in that order). ``CatalogueFollower`` keeps a process's local copy: it reads both
compacted topics from the beginning in a consumer group of its own that never commits
(every process needs the whole catalogue, however late it joins), folds them with
``CatalogueAssembler`` and hands out each new version once it is complete and checks. A
record that does not decode, or a chunk the assembler refuses (wrong byte length, NaN,
past the item limit), goes to ``<topic>.dlq`` with the reason, like any other bad record.

A process that already reads other topics in a side loop (serving) can pass those records
to ``handle`` instead of polling the follower's own reader.

This module imports no Kafka client: the in-process loop uses it with ``MemoryBus``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from recloop.core import codec
from recloop.core.catalogue import CatalogueAssembler, CatalogueRecordError, ItemCatalogue
from recloop.core.events import CatalogueAnnounced, ItemChunk
from recloop.core.ports import Bus
from recloop.core.topics import Topics
from recloop.kafka.deadletter import Consumed, Reader

log = logging.getLogger(__name__)

CATALOGUE_KEY = b"catalogue"
CATALOGUE_TOPICS = ("items", "catalogue")


class NoCatalogue(RuntimeError):
    """No complete catalogue arrived in time (the message names the topics and what to run)."""


def publish_catalogue(
    bus: Bus,
    topics: Topics,
    catalogue: ItemCatalogue,
    first: int = 0,
    timeout: float | None = None,
) -> int:
    """Publish the chunks holding items ``>= first`` (every chunk by default), flush, then
    announce the version; returns the number of chunks sent. Raises what the bus raises if a
    record is not acknowledged (nothing is announced then)."""
    chunks = catalogue.chunks(first=first)
    for chunk in chunks:
        bus.publish(topics.items, str(chunk.first_item).encode(), codec.encode(chunk))
        bus.serve()
    bus.flush(timeout)
    bus.publish(topics.catalogue, CATALOGUE_KEY, codec.encode(catalogue.announcement()))
    bus.flush(timeout)
    log.info("catalogue v%d published: %d items x %d features, %d chunks, sha256 %s",
             catalogue.version, catalogue.n_items, catalogue.feature_dim, len(chunks),
             catalogue.sha256[:12])  # fmt: skip
    return len(chunks)


class CatalogueFollower:
    """One process's copy of the newest catalogue (module docstring)."""

    def __init__(self, bus: Bus, topics: Topics, name: str, group_prefix: str = "recloop") -> None:
        self.bus, self.topics, self.name = bus, topics, name
        self._group = topics.group(f"{group_prefix}-catalogue-{name}-{uuid.uuid4().hex[:12]}")
        self._reader: Reader | None = None
        self.assembler = CatalogueAssembler()
        self.refused = 0
        self.on_version: list[Callable[[ItemCatalogue], None]] = []

    @property
    def current(self) -> ItemCatalogue | None:
        return self.assembler.current

    @property
    def reader(self) -> Reader:
        if self._reader is None:
            self._reader = Reader(self.bus, self.topics, list(CATALOGUE_TOPICS), self._group,
                                  f"{self.name}-catalogue")  # fmt: skip
        return self._reader

    def handle(self, item: Consumed, reader: Reader | None = None) -> None:
        """Fold one record read from ``items`` or ``catalogue`` (others are ignored); a chunk
        the assembler refuses is dead-lettered through ``reader`` (default: the follower's)."""
        record = item.value
        if isinstance(record, ItemChunk):
            try:
                self.assembler.add_chunk(record)
            except CatalogueRecordError as exc:
                self.refused += 1
                (reader or self.reader).dead_letter(item, str(exc))
        elif isinstance(record, CatalogueAnnounced):
            self.assembler.announce(record)

    def install(self) -> ItemCatalogue | None:
        """The new version, if the records folded so far complete one (then also passed to
        every ``on_version`` callback), else None."""
        new = self.assembler.install()
        if new is not None:
            log.info("%s: catalogue v%d installed (%d items x %d features)",
                     self.name, new.version, new.n_items, new.feature_dim)  # fmt: skip
            for callback in self.on_version:
                callback(new)
        return new

    def poll(self, timeout: float = 0.0, max_records: int = 2000) -> ItemCatalogue | None:
        """Read what the follower's own reader has; the new version if one completed."""
        for item in self.reader.poll_batch(max_records, timeout=timeout):
            self.handle(item)
        return self.install()

    def wait(self, timeout_s: float, stop: Callable[[], bool] | None = None) -> ItemCatalogue:
        """Poll until a catalogue is installed; raises ``NoCatalogue`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.current is None:
            if stop is not None and stop():
                raise NoCatalogue(f"{self.name}: stopped before a catalogue arrived")
            if time.monotonic() >= deadline:
                raise NoCatalogue(
                    f"no complete catalogue on {self.topics.items} + {self.topics.catalogue} "
                    f"within {timeout_s:.0f} s: start `recloop sim` (it publishes its world's "
                    f"catalogue) or `recloop catalogue publish`, or raise "
                    f"RECLOOP_CATALOGUE_WAIT_S"
                )
            self.poll(timeout=0.2)
        return self.current

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
