"""``recloop bench decode``, run tiny: the shape of its output, and records the contract takes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from recloop.bench.decode import VARIANTS, DecodeBenchConfig, build_record, run
from recloop.cli import _register, app
from recloop.core import codec, events
from recloop.core.dlq import MAX_RECORD_BYTES

_register()


def test_a_tiny_run_prints_a_table_and_one_json_line_with_positive_ratios() -> None:
    lines: list[str] = []
    figures = run(DecodeBenchConfig(seconds=0.0005, types=("Click", "SessionEnd")), lines.append)
    report = json.loads(lines[-1])
    assert report["bench"] == "decode" and report["max_record_bytes"] == MAX_RECORD_BYTES
    rows = report["figures"]
    assert [(r["record_type"], r["variant"]) for r in rows] == [
        (t, v) for t in ("Click", "SessionEnd") for v in VARIANTS
    ]
    for row in rows:
        assert row["ratio"] > 0 and row["us_per_kb"] > 0 and row["raw_us_per_kb"] > 0
        assert row["us_per_record"] > 0 and row["n"] >= 1 and row["bytes"] > 0
    assert len(figures) == len(rows) and len(lines) == 2 + len(rows) + 1


@pytest.mark.parametrize("record_type", events.ALL_RECORD_TYPES, ids=lambda t: t.__name__)
def test_every_variant_is_a_record_the_contract_accepts(record_type: type) -> None:
    sizes = {}
    for variant in VARIANTS:
        data = build_record(record_type, variant)  # raises if the codec refuses it
        assert isinstance(codec.decode(data, record_type), record_type)
        assert len(data) <= MAX_RECORD_BYTES
        sizes[variant] = len(data)
    assert sizes["largest"] > sizes["typical"]


@pytest.mark.parametrize("record_type", [events.SessionState, events.ItemChunk])
def test_the_largest_record_of_a_type_with_room_for_it_fills_the_record_limit(record_type) -> None:
    # An item chunk's bytes are bounded at MAX_CHUNK_BYTES: base64 makes 4/3 of them.
    limit = min(MAX_RECORD_BYTES, events.MAX_CHUNK_BYTES * 4 // 3 + 200)
    assert len(build_record(record_type, "largest")) > 0.95 * limit


@pytest.mark.parametrize("record_type", [events.RecRequest, events.SlateServed,
                                         events.Transition], ids=lambda t: t.__name__)  # fmt: skip
def test_the_largest_ids_only_record_holds_every_list_at_its_bound(record_type) -> None:
    """Since schema v2 no feature rows: a request, slate or transition is bounded by its
    lists (10,000 candidate ids at most) far below the record limit, and the largest has
    each list at its bound."""
    data = build_record(record_type, "largest")
    record = codec.decode(data, record_type)
    assert len(record.candidates) == events.MAX_CANDIDATES
    assert 200_000 < len(data) < 0.7 * MAX_RECORD_BYTES


def test_the_command_is_registered_and_refuses_an_unknown_type() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "decode", "--types", "Click", "--variants", "typical",
                                 "--seconds", "0.0005", "--runs", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["figures"][0]["ratio"] > 0
    result = runner.invoke(app, ["bench", "decode", "--types", "Nope"])
    assert result.exit_code == 2 and "unknown record type" in " ".join(result.output.split())
