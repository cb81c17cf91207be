"""The streams worker's metrics observer: a buffer overflow is counted per cap, other
rejects as decode errors, and both as dead letters (issue 12, bounded state)."""

from __future__ import annotations

from recloop import metrics
from recloop.cli.streams import _metrics_observer
from recloop.core.settings import Settings
from recloop.streams.batch import BatchResult, RawRecord


def _value(counter, *labels: str) -> float:
    return counter.labels(*labels)._value.get()


def test_overflow_is_counted_per_cap_and_other_rejects_as_decode_errors(tmp_path) -> None:
    settings = Settings(home=tmp_path, topic_prefix="obs-test.")
    feedback = settings.topics.feedback
    observe = _metrics_observer(settings)
    record = RawRecord(feedback, 0, 7, b"u-1", b"{}")
    result = BatchResult()
    result.rejects.append((record, "click for r-9 refused (buffer full: early_feedback=320)"))
    result.rejects.append((record, "cannot decode Feedback: malformed JSON"))
    before = (_value(metrics.FOLD_OVERFLOW, "early_feedback"),
              _value(metrics.DECODE_ERRORS, "streams", feedback),
              _value(metrics.DLQ, "streams", feedback))  # fmt: skip
    observe([record, record], result)
    after = (_value(metrics.FOLD_OVERFLOW, "early_feedback"),
             _value(metrics.DECODE_ERRORS, "streams", feedback),
             _value(metrics.DLQ, "streams", feedback))  # fmt: skip
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 2]
