"""A partition whose commits stalled is read again, and its group commits to the log end.

After a broker outage the chaos run met a streams worker that went on folding every record but
never committed some partitions again: offsets between the committed one and the lowest acked
one had been delivered but were missing from faust's acked bookkeeping, so faust waited for a
hole that nothing would fill (``recloop.streams.faust_internals``, "The stalled-commit
guard"). The worker here is put in exactly that state on purpose: its first delivery of five
feedback records of one partition is folded but never acked. The guard must notice, read the
partition again from its committed offset, and the group must then commit every partition to
its log end, with every expected transition out, none wrong.
"""

from __future__ import annotations

import time

import pytest

from recloop.ops.chaos_readback import behind
from recloop.streams.synthetic import causal_events
from tests.integration.test_streams_kafka import (
    WORKLOAD,
    TransitionReader,
    assert_exactly,
    expected,
    produce,
    workers,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.integration

NEVER_ACKED = range(5, 10)
"""Offsets of feedback partition 0 whose first delivery is folded but not acked."""

# Runs in the worker's process before recloop's command line: the first ack of each offset
# in NEVER_ACKED on feedback partition 0 is lost, as the outage lost them.
PRELUDE = f"""
from recloop.streams import faust_internals
lost = set()
real_ack = faust_internals.BatchConsumer.ack
def ack(self, message):
    if (message.topic.endswith("rec.feedback") and message.partition == 0
            and message.offset in range({NEVER_ACKED.start}, {NEVER_ACKED.stop})
            and message.offset not in lost):
        lost.add(message.offset)
        return False
    return real_ack(self, message)
faust_internals.BatchConsumer.ack = ack
from recloop.cli import main
main()
"""


def test_a_partition_stalled_by_lost_acks_is_read_again_and_committed(kafka_settings, workers):  # noqa: F811
    events = causal_events(WORKLOAD)
    want = expected(events)
    app_id = f"{kafka_settings.topic_prefix}streams"
    produce(kafka_settings, events)
    workers.start(kafka_settings, app_id, "stalled", entry=("-c", PRELUDE))
    topics = [kafka_settings.topics.slates, kafka_settings.topics.feedback]
    reader = TransitionReader(kafka_settings, "check")
    try:
        reader.read_until(set(want), timeout=60)
        deadline = time.monotonic() + 60
        lag, where = behind(kafka_settings, app_id, topics)
        while lag != 0 and time.monotonic() < deadline:
            time.sleep(1)
            lag, where = behind(kafka_settings, app_id, topics)
        reader.read_until(set(want), timeout=5)  # any copies the re-read sent
    finally:
        reader.close()
    assert lag == 0, f"the group is {where} behind\n{workers.logs()}"
    assert "stalled at offset 5" in workers.logs()
    # The re-read folds records the worker had folded already: no new or different transition.
    assert_exactly(reader, want, workers)
