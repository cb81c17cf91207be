"""The command line says what is wrong: bad arguments and an unreachable broker."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from recloop.cli import _register, app

_register()
runner = CliRunner()
UNREACHABLE = "127.0.0.1:1"


@pytest.mark.parametrize(
    "args",
    [["learn"], ["serve"], ["sim", "--duration", "1"], ["topics", "create"], ["lag"], ["streams"]],
    ids=lambda a: " ".join(a),
)
def test_unreachable_broker_names_the_setting_and_the_fix(args, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RECLOOP_KAFKA_BOOTSTRAP", UNREACHABLE)
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert UNREACHABLE in text and "RECLOOP_KAFKA_BOOTSTRAP" in text
    assert "recloop kafka up" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["learn", "--algo", "nope"], "unknown algorithm 'nope'"),
        (["sim", "--preset", "nowhere"], "unknown preset 'nowhere'"),
        (["learn", "--config", "nonsense"], "is not KEY=VALUE"),
        (["learn", "--config", "no_such_field=1"], "unknown config field"),
        (["serve", "--fallback", "oracle"], "oracle"),
        (["demo", "--algo", "nope"], "unknown algorithm 'nope'"),
        (["demo", "--bootstrap", "localhost"], "'localhost' is not host:port"),
        (["demo", "--bootstrap", "localhost:kafka"], "is not host:port"),
    ],
)
def test_bad_arguments_are_named(args, expected, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RECLOOP_KAFKA_BOOTSTRAP", UNREACHABLE)
    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_every_command_has_help_with_an_example() -> None:
    commands = ["demo", "chaos", "learn", "sim", "serve", "streams", "lag", "report",
                "kafka up", "topics create", "db upgrade",
                "bench sim", "bench streams", "bench learn", "bench serve", "bench loop"]
    for command in commands:
        result = runner.invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Example" in result.output or "example" in result.output, command
