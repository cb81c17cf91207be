"""``recloop sim``'s preset options: no preset is special-cased by name; an option a preset's
builder does not take, or sizes it refuses, is a one-line error naming the flag."""

from __future__ import annotations

import pytest
import typer

from recloop.cli.sim import _preset_options


def test_options_go_to_the_presets_that_take_them() -> None:
    assert _preset_options("interest_evolution", 4, 12) == {"slate_size": 4, "num_candidates": 12}
    assert _preset_options("tiny_world", 2, None) == {"slate_size": 2}
    assert _preset_options("large_catalogue", None, None) == {}
    assert _preset_options("interest_evolution", None, None, 50, 10) == {
        "resample_every": 50, "resample_count": 10,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "slate_size", "candidates", "flag", "says"),
    [
        ("tiny_world", None, 3, "--candidates", "tiny_world takes no --candidates (it takes --slate-size)"),
        ("large_catalogue", None, 10, "--candidates", "large_catalogue takes no --candidates"),
        ("interest_evolution", 3, 2, "--slate-size/--candidates", "slate size 3 must be in [1, 2]"),
        ("tiny_world", 7, None, "--slate-size", "slate size 7 must be in [1, 6]"),
        ("nope", None, None, "--preset", "unknown preset 'nope'"),
        ("tiny_world", None, None, "--resample-every", "tiny_world takes no --resample-every"),
        ("interest_evolution", None, None, "--resample-every", "needs a document model and resample_count"),
    ],
)  # fmt: skip
def test_a_bad_option_is_one_line_naming_the_flag(preset, slate_size, candidates, flag, says):
    resample = 10 if flag == "--resample-every" else None
    with pytest.raises(typer.BadParameter) as bad:
        _preset_options(preset, slate_size, candidates, resample)
    message = str(bad.value)
    assert bad.value.param_hint == flag and says in message and "\n" not in message
