"""The learner's lag gauges: messages behind the log end, and the age of what it applied.

A watcher thread reads watermarks with a consumer of its own, so the gauges move while the
learner's loop is busy learning: lag is most worth seeing exactly when learning is slow.
"""

from __future__ import annotations

import contextlib
import threading
import time

from confluent_kafka import Consumer, TopicPartition

from recloop import metrics
from recloop.core.settings import Settings
from recloop.learner.publishing import Progress


class LagWatcher:
    """Exports ``recloop_learner_lag_*`` for ``policy`` once a second until ``close``."""

    def __init__(self, settings: Settings, group_id: str, policy: str, progress: Progress):
        self.settings, self.policy, self.progress = settings, policy, progress
        self._consumer = Consumer({
            **settings.kafka_client_config(), "group.id": f"{group_id}-lag-probe",
        })  # fmt: skip
        self._last_ts_ms: dict[int, int] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def seen(self, partition: int, timestamp_ms: int) -> None:
        self._last_ts_ms[partition] = timestamp_ms

    def update(self) -> dict[int, int]:
        """Messages behind the log end per partition (also exported as gauges)."""
        topic = self.settings.topics.transitions
        applied = dict(self.progress.offsets.get(topic, {}))  # copy: the loop may be writing
        lags: dict[int, int] = {}
        for partition in range(self.settings.partitions):
            tp = TopicPartition(topic, partition)
            low, high = self._consumer.get_watermark_offsets(tp, timeout=2, cached=False)
            behind = max(0, high - int(applied.get(str(partition), low)))
            lags[partition] = behind
            labels = (self.policy, str(partition))
            metrics.LEARNER_LAG_MESSAGES.labels(*labels).set(behind)
            last_ms = self._last_ts_ms.get(partition)
            seconds = 0.0 if not behind or last_ms is None else time.time() - last_ms / 1000
            metrics.LEARNER_LAG_SECONDS.labels(*labels).set(max(0.0, seconds))
        return lags

    def _watch(self) -> None:
        while not self._closed.wait(1.0):
            with contextlib.suppress(Exception):  # a metric must never stop the learner
                self.update()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._consumer.close()
